//! The documents a newcomer reads stay in step with the code.

use std::path::Path;

fn read(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The modules `src/lib.rs` declares (`pub mod NAME;`).
fn declared_modules() -> Vec<String> {
    read("src/lib.rs")
        .lines()
        .filter_map(|line| {
            line.trim()
                .strip_prefix("pub mod ")
                .and_then(|rest| rest.strip_suffix(';'))
                .map(str::to_string)
        })
        .collect()
}

#[test]
fn every_module_is_in_the_code_map_and_the_layout_doc() {
    let modules = declared_modules();
    assert!(modules.len() >= 10, "lib.rs declares {modules:?}");
    let architecture = read("ARCHITECTURE.md");
    let code_map = architecture
        .split("## Code map")
        .nth(1)
        .and_then(|rest| rest.split("\n## ").next())
        .expect("ARCHITECTURE.md has a \"Code map\" section");
    let lib = read("src/lib.rs");
    for module in &modules {
        assert!(
            code_map.contains(&format!("| `{module}` |")),
            "module `{module}` is missing from ARCHITECTURE.md's code map"
        );
        assert!(
            lib.contains(&format!("//! - [`{module}`]")),
            "module `{module}` is missing from the layout doc in src/lib.rs"
        );
    }
    // And nothing in the code map that is not a module any more.
    for row in code_map.lines().filter(|l| l.starts_with("| `")) {
        let name = row
            .trim_start_matches("| `")
            .split('`')
            .next()
            .unwrap_or("");
        assert!(
            modules.iter().any(|m| m == name),
            "ARCHITECTURE.md's code map names `{name}`, which src/lib.rs does not declare"
        );
    }
}

#[test]
fn the_readme_links_the_architecture_and_code_cites_it_by_number() {
    assert!(read("README.md").contains("(ARCHITECTURE.md)"));
    let architecture = read("ARCHITECTURE.md");
    let invariants = architecture
        .lines()
        .filter(|l| {
            let l = l.trim_start();
            l.split_once(". **")
                .is_some_and(|(n, _)| n.parse::<u32>().is_ok())
        })
        .count() as u32;
    // Every "ARCHITECTURE.md, invariant(s) N" in the code names invariants that exist.
    let mut files = Vec::new();
    let mut folders = vec![Path::new(env!("CARGO_MANIFEST_DIR")).join("src")];
    while let Some(folder) = folders.pop() {
        for entry in std::fs::read_dir(&folder).unwrap().map(Result::unwrap) {
            let path = entry.path();
            if path.is_dir() {
                folders.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                files.push(path);
            }
        }
    }
    let mut citing = 0;
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        let file = file.display();
        let cited: Vec<u32> = text
            .split("ARCHITECTURE.md, invariant")
            .skip(1)
            .flat_map(|rest| {
                rest.split(')')
                    .next()
                    .unwrap_or("")
                    .split(|c: char| !c.is_ascii_digit())
                    .filter_map(|n| n.parse::<u32>().ok())
                    .collect::<Vec<_>>()
            })
            .collect();
        if !cited.is_empty() {
            citing += 1;
        }
        for n in cited {
            assert!(
                (1..=invariants).contains(&n),
                "{file} cites invariant {n}; ARCHITECTURE.md has {invariants}"
            );
        }
    }
    assert!(
        citing >= 3,
        "the scheduler, the worker and cron cite their invariants"
    );
}
