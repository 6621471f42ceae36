//! The one error type commands return; `main` prints it and picks the exit code.

use crate::config::ConfigError;
use crate::jobfile::JobFileError;
use crate::logging::LoggingError;
use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Logging(#[from] LoggingError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    JobFile(#[from] JobFileError),
    /// The command line asks for something that cannot be done as asked.
    #[error("{0}")]
    Usage(String),
    #[error("{0}")]
    Runtime(String),
    /// Stopped at once by a second stop signal (after recording what it could).
    #[error("stopped by a second stop signal")]
    Interrupted,
}

impl From<std::io::Error> for Error {
    /// Writing output failed (a closed pipe, a full disk).
    fn from(e: std::io::Error) -> Self {
        Error::Runtime(format!("cannot write output: {e}"))
    }
}

impl Error {
    /// 2 for a command line that cannot work, 130 after a second stop signal, 1 for everything
    /// else.
    pub fn exit_code(&self) -> u8 {
        match self {
            Error::Usage(_) => 2,
            // As a shell reports a process ended by SIGINT.
            Error::Interrupted => 130,
            _ => 1,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
