//! The threads a worker runs plugin calls on: blocking code, kept off the async runtime.
//!
//! Not tokio's blocking pool (`spawn_blocking`): that wakes the thread that has waited longest,
//! so a worker running short jobs goes round every thread it ever started (up to one per slot),
//! each with its stack and its caches cold, and all of them wait on one lock. Here a call goes
//! to the thread that went idle last, woken on its own. `bench throughput`, interleaved with the
//! blocking pool, four rounds each: 47-52 against 66-71 us of the worker's CPU per run
//! (PERFORMANCE.md).

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::Thread;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

/// How long a thread waits for its next call before it ends (as tokio's blocking threads do).
const KEEP_ALIVE: Duration = Duration::from_secs(10);

/// A call; what it returns hands its answer over (after its thread is idle again, so that the
/// caller's next call finds it).
type Call = Box<dyn FnOnce() -> Box<dyn FnOnce()> + Send>;

/// A call thread as its dispatcher sees it.
struct CallThread {
    /// The call handed to it, taken when it wakes.
    call: Mutex<Option<Call>>,
    thread: Thread,
}

/// What the dispatcher and its threads share.
struct Shared {
    /// The threads waiting for a call, the one idle most recently last.
    idle: Mutex<Vec<Arc<CallThread>>>,
    /// The dispatcher is gone: threads end instead of waiting for calls.
    closed: AtomicBool,
    keep_alive: Duration,
}

/// Nothing panics while holding these locks; should it happen all the same, what they guard is
/// still whole (a list, a slot), so it is used on.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Runs blocking calls on threads of its own, one call per thread at a time: a thread for each
/// call that runs, however many run at once. Its threads end when it is dropped, each once its
/// call has returned.
pub(super) struct CallThreads {
    shared: Arc<Shared>,
    /// Entered on every call thread, as on tokio's blocking threads; also the fallback when no
    /// thread can be started.
    runtime: tokio::runtime::Handle,
}

/// What a call returned, or that it panicked (with the panic's message).
pub(super) type Returned<T> = Result<T, String>;

impl CallThreads {
    /// Threads for the calls of the runtime this is made in.
    pub(super) fn new() -> CallThreads {
        CallThreads::keeping_alive(KEEP_ALIVE)
    }

    fn keeping_alive(keep_alive: Duration) -> CallThreads {
        CallThreads {
            shared: Arc::new(Shared {
                idle: Mutex::new(Vec::new()),
                closed: AtomicBool::new(false),
                keep_alive,
            }),
            runtime: tokio::runtime::Handle::current(),
        }
    }

    /// Starts `call` on the thread idle most recently, or on a new one; the answer comes when
    /// it returns. Nothing interrupts it: whoever stops waiting leaves it to end on its own.
    pub(super) fn run<T: Send + 'static>(
        &self,
        call: impl FnOnce() -> T + Send + 'static,
    ) -> oneshot::Receiver<Returned<T>> {
        let (reply, answer) = oneshot::channel();
        let call: Call = Box::new(move || {
            let returned = catch_unwind(AssertUnwindSafe(call)).map_err(|panic| {
                panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "a panic without a message".into())
            });
            Box::new(move || {
                let _ = reply.send(returned);
            })
        });
        let idle = lock(&self.shared.idle).pop();
        match idle {
            Some(thread) => {
                *lock(&thread.call) = Some(call);
                thread.thread.unpark();
            }
            None => self.start(call),
        }
        answer
    }

    /// A new thread, for `first`; it waits for more calls while it is called often enough.
    /// Should the system refuse a thread, the call goes to tokio's blocking pool, which waits
    /// for one of its threads instead.
    fn start(&self, first: Call) {
        let handed = Arc::new(Mutex::new(Some(first)));
        let (shared, runtime, first) = (self.shared.clone(), self.runtime.clone(), handed.clone());
        let started = std::thread::Builder::new()
            .name("jobschleuder-call".into())
            .spawn(move || {
                let _runtime = runtime.enter();
                let me = Arc::new(CallThread {
                    call: Mutex::new(lock(&first).take()),
                    thread: std::thread::current(),
                });
                drop(first);
                serve(&shared, &me);
            });
        if let Err(e) = started {
            if let Some(call) = lock(&handed).take() {
                tracing::warn!(error = %e, "cannot start a thread for a plugin call; it waits for a blocking thread");
                drop(self.runtime.spawn_blocking(move || call()()));
            }
        }
    }
}

impl Drop for CallThreads {
    fn drop(&mut self) {
        self.shared.closed.store(true, Ordering::SeqCst);
        for thread in lock(&self.shared.idle).drain(..) {
            thread.thread.unpark();
        }
    }
}

/// A call thread's life: the calls handed to `me`, until it waits `keep_alive` for one in vain
/// or its dispatcher is gone.
fn serve(shared: &Shared, me: &Arc<CallThread>) {
    loop {
        if let Some(call) = lock(&me.call).take() {
            let answer = call();
            {
                let mut idle = lock(&shared.idle);
                if shared.closed.load(Ordering::SeqCst) {
                    drop(idle);
                    let _ = catch_unwind(AssertUnwindSafe(answer));
                    return;
                }
                idle.push(me.clone());
            }
            // Dropping what nobody waits for any more runs its code: a panic there must not end
            // a thread that is listed idle.
            let _ = catch_unwind(AssertUnwindSafe(answer));
        }
        let since = Instant::now();
        loop {
            std::thread::park_timeout(shared.keep_alive.saturating_sub(since.elapsed()));
            if lock(&me.call).is_some() {
                break;
            }
            let closed = shared.closed.load(Ordering::SeqCst);
            if !closed && since.elapsed() < shared.keep_alive {
                // Woken early: parking may end without a reason.
                continue;
            }
            // Idle long enough, or no dispatcher any more: ends, unless a dispatcher took it
            // for a call that is on its way.
            let mut idle = lock(&shared.idle);
            if let Some(at) = idle.iter().position(|t| Arc::ptr_eq(t, me)) {
                idle.remove(at);
                return;
            }
            drop(idle);
            if closed {
                return;
            }
            while lock(&me.call).is_none() {
                std::thread::park();
            }
            break;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;
    use std::thread::ThreadId;

    use super::*;

    fn this_thread() -> ThreadId {
        std::thread::current().id()
    }

    #[tokio::test]
    async fn a_call_goes_to_the_thread_idle_most_recently() {
        let threads = CallThreads::new();
        // Two calls at once, each on a thread of its own; the second returns last.
        let (release_first, first_waits) = mpsc::channel::<()>();
        let (release_second, second_waits) = mpsc::channel::<()>();
        let first = threads.run(move || {
            first_waits.recv().unwrap();
            this_thread()
        });
        let second = threads.run(move || {
            second_waits.recv().unwrap();
            this_thread()
        });
        release_first.send(()).unwrap();
        let first = first.await.unwrap().unwrap();
        release_second.send(()).unwrap();
        let second = second.await.unwrap().unwrap();
        assert_ne!(first, second);
        // Both idle now: the next calls go to the one that returned last, again and again.
        for _ in 0..3 {
            let next = threads.run(this_thread).await.unwrap().unwrap();
            assert_eq!(next, second);
        }
        assert_ne!(
            this_thread(),
            second,
            "calls never run on the caller's thread"
        );
    }

    #[tokio::test]
    async fn a_panicking_call_answers_with_its_message_and_its_thread_goes_on() {
        let threads = CallThreads::new();
        let first = threads.run(this_thread).await.unwrap().unwrap();
        let panicked = threads
            .run(|| -> u8 { panic!("the plugin host broke") })
            .await
            .unwrap();
        assert_eq!(panicked, Err("the plugin host broke".to_string()));
        let formatted = threads
            .run(|| -> u8 { panic!("broke {} times", 2) })
            .await
            .unwrap();
        assert_eq!(formatted, Err("broke 2 times".to_string()));
        assert_eq!(threads.run(this_thread).await.unwrap(), Ok(first));
    }

    /// Waits (up to 5 s) until no thread holds `shared` any more, `others` holding it besides.
    async fn threads_ended(shared: &Arc<Shared>, others: usize) -> bool {
        for _ in 0..500 {
            if Arc::strong_count(shared) == 1 + others {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        false
    }

    #[tokio::test]
    async fn an_idle_thread_ends_after_its_keep_alive_and_calls_go_on() {
        let threads = CallThreads::keeping_alive(Duration::from_millis(50));
        let first = threads.run(this_thread).await.unwrap().unwrap();
        let shared = threads.shared.clone();
        assert!(
            threads_ended(&shared, 1).await,
            "the idle thread still runs"
        );
        assert!(lock(&shared.idle).is_empty());
        let next = threads.run(this_thread).await.unwrap().unwrap();
        assert_ne!(next, first, "a thread that ended cannot take a call");
    }

    #[tokio::test]
    async fn dropping_the_threads_ends_the_idle_ones_and_a_running_one_once_it_returns() {
        let threads = CallThreads::new();
        let (release, waits) = mpsc::channel::<()>();
        threads.run(this_thread).await.unwrap().unwrap();
        let running = threads.run(move || waits.recv().is_ok());
        let shared = threads.shared.clone();
        drop(threads);
        assert!(
            Arc::strong_count(&shared) > 1,
            "the running call holds its thread"
        );
        release.send(()).unwrap();
        assert_eq!(
            running.await.unwrap(),
            Ok(true),
            "a running call still answers"
        );
        assert!(
            threads_ended(&shared, 0).await,
            "threads outlive their dispatcher"
        );
    }

    #[tokio::test]
    async fn a_call_thread_is_in_the_runtime_as_a_blocking_thread_is() {
        let threads = CallThreads::new();
        let inside = threads
            .run(|| tokio::runtime::Handle::try_current().is_ok())
            .await
            .unwrap();
        assert_eq!(inside, Ok(true));
    }
}
