//! The processes this process started: finding and killing them when the worker stops, so
//! that no job it started outlives it (`command` runs each program in a process group of its
//! own, which takes the program's children along).

/// Kills every child process of this process, and the process group each one leads, with
/// SIGKILL. Returns how many children there were.
pub fn kill_children() -> usize {
    let children = child_pids();
    for pid in &children {
        // SAFETY: kill(2) has no memory effects; a negative pid names the process group the
        // child leads (`command` makes each program a group leader), a positive one the child.
        unsafe {
            libc::kill(-*pid, libc::SIGKILL);
            libc::kill(*pid, libc::SIGKILL);
        }
    }
    // Reap them (for up to a second), so that none lingers as a zombie.
    let mut left = children.clone();
    for _ in 0..20 {
        // SAFETY: waitpid on our own child, with a status pointer that may be null.
        left.retain(|pid| unsafe { libc::waitpid(*pid, std::ptr::null_mut(), libc::WNOHANG) } == 0);
        if left.is_empty() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    children.len()
}

/// Pids whose parent is this process, from `/proc` (empty where there is none).
fn child_pids() -> Vec<i32> {
    let me = std::process::id().to_string();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|stat| parent_of(&stat).map(|ppid| ppid == me))
                .unwrap_or(false)
        })
        .collect()
}

/// The parent pid field of a `/proc/PID/stat` line. The command name in parentheses may hold
/// spaces and parentheses itself, so fields are counted after its last `)`.
fn parent_of(stat: &str) -> Option<String> {
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(1).map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parent_pid_is_read_past_odd_command_names() {
        assert_eq!(
            parent_of("123 (a b) c) S 77 123 123 0").as_deref(),
            Some("77")
        );
        assert_eq!(parent_of("garbage"), None);
    }

    #[test]
    fn children_are_found_and_killed() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("spawn sleep");
        let pid = child.id() as i32;
        assert!(child_pids().contains(&pid));
        assert!(kill_children() >= 1);
        // Killed and reaped: gone from the process table (waiting for it finds nothing).
        std::thread::sleep(std::time::Duration::from_millis(100));
        assert!(!child_pids().contains(&pid), "the child is still there");
        assert!(child.try_wait().is_err() || child.try_wait().is_ok_and(|s| s.is_some()));
    }
}
