//! The threads a worker runs plugin calls on: blocking code, kept off the async runtime.
//!
//! Not tokio's blocking pool (`spawn_blocking`): that wakes the thread that has waited longest,
//! so a worker running short jobs goes round every thread it ever started (up to one per slot),
//! each with its stack and its caches cold, and all of them wait on one lock. Here a call goes
//! to the thread that went idle last, woken on its own. `bench throughput`, interleaved with the
//! blocking pool, four rounds each: 47-52 against 66-71 us of the worker's CPU per run (README,
//! Performance).

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Mutex};
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

/// Runs blocking calls on threads of its own, one call per thread at a time: a thread for each
/// call that runs, however many run at once.
pub(super) struct CallThreads {
    /// The threads waiting for a call, the one idle most recently last.
    idle: Arc<Mutex<Vec<Arc<CallThread>>>>,
    /// Entered on every call thread, as on tokio's blocking threads.
    runtime: tokio::runtime::Handle,
}

/// What a call returned, or that it panicked (with the panic's message).
pub(super) type Returned<T> = Result<T, String>;

impl CallThreads {
    /// Threads for the calls of the runtime this is made in.
    pub(super) fn new() -> CallThreads {
        CallThreads {
            idle: Arc::new(Mutex::new(Vec::new())),
            runtime: tokio::runtime::Handle::current(),
        }
    }

    /// Starts `call` on the thread idle most recently, or on a new one; the answer comes when
    /// it returns. Nothing interrupts it: whoever stops waiting leaves it to end on its own.
    /// The answer is gone (the receiver errs) only if no thread could be started for it.
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
        let idle = self.idle.lock().ok().and_then(|mut idle| idle.pop());
        match idle {
            Some(thread) => {
                if let Ok(mut handed) = thread.call.lock() {
                    *handed = Some(call);
                }
                thread.thread.unpark();
            }
            None => self.start(call),
        }
        answer
    }

    /// A new thread, for `first`; it waits for more calls while it is called often enough.
    fn start(&self, first: Call) {
        let idle = self.idle.clone();
        let runtime = self.runtime.clone();
        let started = std::thread::Builder::new()
            .name("jobschleuder-call".into())
            .spawn(move || {
                let _runtime = runtime.enter();
                let me = Arc::new(CallThread {
                    call: Mutex::new(None),
                    thread: std::thread::current(),
                });
                let mut next = Some(first);
                loop {
                    if let Some(call) = next.take() {
                        let answer = call();
                        let idle_again = idle.lock().map(|mut idle| idle.push(me.clone()));
                        answer();
                        if idle_again.is_err() {
                            return;
                        }
                    }
                    let since = Instant::now();
                    loop {
                        std::thread::park_timeout(KEEP_ALIVE.saturating_sub(since.elapsed()));
                        next = me.call.lock().ok().and_then(|mut handed| handed.take());
                        if next.is_some() {
                            break;
                        }
                        if since.elapsed() < KEEP_ALIVE {
                            // Woken early: parking may end without a reason.
                            continue;
                        }
                        // Idle long enough: ends, unless a dispatcher took it for a call that
                        // is on its way.
                        let Ok(mut waiting) = idle.lock() else { return };
                        if let Some(at) = waiting.iter().position(|t| Arc::ptr_eq(t, &me)) {
                            waiting.remove(at);
                            return;
                        }
                        drop(waiting);
                        while next.is_none() {
                            std::thread::park();
                            next = me.call.lock().ok().and_then(|mut handed| handed.take());
                        }
                        break;
                    }
                }
            });
        if let Err(e) = started {
            tracing::error!(error = %e, "cannot start a thread for a plugin call");
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
        assert_eq!(threads.run(|| 7).await.unwrap(), Ok(7));
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
