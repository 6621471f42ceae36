//! SIGTERM/SIGINT: the first asks for a graceful stop, the second for an immediate one.
//!
//! A process that registers for the second signal ([`Shutdown::handle_forced`], the worker)
//! gets it as [`Shutdown::forced`] and must exit within `FORCED_EXIT_LIMIT`; it uses that time
//! to stop what it started and record it. Any other process exits at once with status 130.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

/// After a second signal, the longest a process that handles it may take before it is ended.
pub const FORCED_EXIT_LIMIT: Duration = Duration::from_secs(15);

/// No stop asked for, a graceful stop, an immediate stop.
const RUNNING: u8 = 0;
const GRACEFUL: u8 = 1;
const FORCED: u8 = 2;

/// A handle that resolves when a stop was asked for. Cheap to clone.
#[derive(Clone)]
pub struct Shutdown {
    receiver: watch::Receiver<u8>,
    handles_forced: Arc<AtomicBool>,
}

impl Shutdown {
    /// Installs the signal handlers. Call from within the runtime.
    pub fn install() -> Shutdown {
        let (sender, receiver) = watch::channel(RUNNING);
        let handles_forced = Arc::new(AtomicBool::new(false));
        let handled = handles_forced.clone();
        tokio::spawn(async move {
            let mut signals = 0;
            loop {
                wait_for_signal().await;
                signals += 1;
                if signals == 1 {
                    tracing::info!(
                        "stop requested: finishing what is running (a second signal stops at once)"
                    );
                    let _ = sender.send(GRACEFUL);
                } else if handled.load(Ordering::SeqCst) && signals == 2 {
                    tracing::warn!("second stop signal: stopping now");
                    let _ = sender.send(FORCED);
                    std::thread::spawn(|| {
                        std::thread::sleep(FORCED_EXIT_LIMIT);
                        std::process::exit(130);
                    });
                } else {
                    tracing::warn!("second stop signal: exiting now");
                    std::process::exit(130);
                }
            }
        });
        Shutdown {
            receiver,
            handles_forced,
        }
    }

    /// A handle that never fires (for one-shot commands and tests).
    pub fn never() -> Shutdown {
        let (sender, receiver) = watch::channel(RUNNING);
        std::mem::forget(sender);
        Shutdown {
            receiver,
            handles_forced: Arc::new(AtomicBool::new(false)),
        }
    }

    /// A handle and the sender that fires it (for tests and embedding): send `true` for a
    /// graceful stop; [`Shutdown::force`] for an immediate one.
    pub fn manual() -> (ManualStop, Shutdown) {
        let (sender, receiver) = watch::channel(RUNNING);
        (
            ManualStop { sender },
            Shutdown {
                receiver,
                handles_forced: Arc::new(AtomicBool::new(false)),
            },
        )
    }

    /// This process handles the second signal itself (see the module docs).
    pub fn handle_forced(&self) {
        self.handles_forced.store(true, Ordering::SeqCst);
    }

    pub fn requested(&self) -> bool {
        *self.receiver.borrow() >= GRACEFUL
    }

    /// Resolves once a stop is requested.
    pub async fn wait(&mut self) {
        self.wait_for(GRACEFUL).await
    }

    /// Resolves once an immediate stop is requested (a second signal).
    pub async fn forced(&mut self) {
        self.wait_for(FORCED).await
    }

    async fn wait_for(&mut self, level: u8) {
        if self
            .receiver
            .wait_for(|current| *current >= level)
            .await
            .is_err()
        {
            // The sender is gone: nobody can ask for a stop any more.
            std::future::pending::<()>().await;
        }
    }
}

/// Fires a [`Shutdown`] made by [`Shutdown::manual`].
pub struct ManualStop {
    sender: watch::Sender<u8>,
}

impl ManualStop {
    /// Asks for a graceful stop.
    pub fn stop(&self) {
        let _ = self.sender.send(GRACEFUL);
    }

    /// Asks for an immediate stop.
    pub fn force(&self) {
        let _ = self.sender.send(FORCED);
    }
}
async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) {
            (Ok(mut term), Ok(mut int)) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
            }
            _ => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
