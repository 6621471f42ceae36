//! SIGTERM/SIGINT: the first asks for a graceful stop, the second ends the process at once.

use tokio::sync::watch;

/// A handle that resolves when a stop was asked for. Cheap to clone.
#[derive(Clone)]
pub struct Shutdown {
    receiver: watch::Receiver<bool>,
}

impl Shutdown {
    /// Installs the signal handlers. Call from within the runtime.
    pub fn install() -> Shutdown {
        let (sender, receiver) = watch::channel(false);
        tokio::spawn(async move {
            let mut signals = 0;
            loop {
                wait_for_signal().await;
                signals += 1;
                if signals == 1 {
                    tracing::info!(
                        "stop requested: finishing what is running (a second signal stops at once)"
                    );
                    let _ = sender.send(true);
                } else {
                    tracing::warn!("second stop signal: exiting now; unacknowledged deliveries return to the queue");
                    std::process::exit(130);
                }
            }
        });
        Shutdown { receiver }
    }

    /// A handle that never fires (for one-shot commands and tests).
    pub fn never() -> Shutdown {
        let (sender, receiver) = watch::channel(false);
        std::mem::forget(sender);
        Shutdown { receiver }
    }

    /// A handle and the sender that fires it (for tests and embedding).
    pub fn manual() -> (watch::Sender<bool>, Shutdown) {
        let (sender, receiver) = watch::channel(false);
        (sender, Shutdown { receiver })
    }

    pub fn requested(&self) -> bool {
        *self.receiver.borrow()
    }

    /// Resolves once a stop is requested.
    pub async fn wait(&mut self) {
        while !*self.receiver.borrow_and_update() {
            if self.receiver.changed().await.is_err() {
                // The sender is gone: nobody can ask for a stop any more.
                std::future::pending::<()>().await;
            }
        }
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
