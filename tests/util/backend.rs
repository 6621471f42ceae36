//! The backend combinations the behavioural suite runs on, and whether this machine has the
//! servers each needs.
//!
//! `on_every_backend!` turns one test body into a test per combination (SQLite + table queue,
//! Postgres + table queue, Postgres + RabbitMQ). A combination whose servers are not reachable
//! is skipped with a notice on the terminal — unless `JOBSCHLEUDER_TEST_REQUIRE_SERVERS=1`
//! (CI sets it), which fails the test instead.

use std::io::Write;
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::OnceLock;
use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// The embedded default: one SQLite file, the table queue in it.
    SqliteTable,
    /// Postgres, with the table queue in it (`queue: postgres`).
    PostgresTable,
    /// Postgres and RabbitMQ, for many hosts.
    PostgresRabbitmq,
}

impl Backend {
    pub fn name(self) -> &'static str {
        match self {
            Backend::SqliteTable => "sqlite + table queue",
            Backend::PostgresTable => "postgres + table queue",
            Backend::PostgresRabbitmq => "postgres + rabbitmq",
        }
    }

    pub fn postgres(self) -> bool {
        self != Backend::SqliteTable
    }

    pub fn rabbitmq(self) -> bool {
        self == Backend::PostgresRabbitmq
    }

    /// Why this combination cannot run here (a server it needs does not answer); `None` when
    /// it can. With `JOBSCHLEUDER_TEST_REQUIRE_SERVERS=1` a missing server fails the test.
    pub fn unavailable(self, test: &str) -> Option<String> {
        let mut missing = Vec::new();
        if self.postgres() && !reachable(&super::admin_url(), 5432) {
            missing.push(format!("Postgres at {}", super::admin_url()));
        }
        if self.rabbitmq() && !reachable(&super::cluster::amqp_url(), 5672) {
            missing.push("RabbitMQ at the test AMQP URL".to_string());
        }
        if missing.is_empty() {
            return None;
        }
        let reason = format!("{} not reachable", missing.join(" and "));
        if std::env::var("JOBSCHLEUDER_TEST_REQUIRE_SERVERS").as_deref() == Ok("1") {
            panic!(
                "{test} [{}]: {reason}, and JOBSCHLEUDER_TEST_REQUIRE_SERVERS=1",
                self.name()
            );
        }
        // Straight to the terminal: the test harness shows captured output only on failure.
        let _ = writeln!(
            std::io::stderr().lock(),
            "SKIPPED {test} [{}]: {reason} (set JOBSCHLEUDER_TEST_REQUIRE_SERVERS=1 to fail instead)",
            self.name()
        );
        Some(reason)
    }
}

/// Whether the host and port of `url` accept a TCP connection (asked once per URL).
fn reachable(url: &str, default_port: u16) -> bool {
    static ANSWERS: OnceLock<std::sync::Mutex<std::collections::HashMap<String, bool>>> =
        OnceLock::new();
    let answers = ANSWERS.get_or_init(Default::default);
    if let Some(answer) = answers.lock().unwrap().get(url) {
        return *answer;
    }
    let answer = url::Url::parse(url)
        .ok()
        .and_then(|u| {
            let host = u.host_str()?.to_string();
            let port = u.port().unwrap_or(default_port);
            (host.as_str(), port).to_socket_addrs().ok()?.next()
        })
        .is_some_and(|addr| TcpStream::connect_timeout(&addr, Duration::from_secs(2)).is_ok());
    answers.lock().unwrap().insert(url.to_string(), answer);
    answer
}

/// One test per backend combination from one body: `async fn name(backend: Backend) { .. }`
/// becomes the module `name` with the tests `sqlite_table`, `postgres_table` and
/// `postgres_rabbitmq`.
#[macro_export]
macro_rules! on_every_backend {
    ($(#[$meta:meta])* async fn $name:ident($backend:ident: Backend) $body:block) => {
        $crate::on_backends! {
            [sqlite_table: SqliteTable, postgres_table: PostgresTable, postgres_rabbitmq: PostgresRabbitmq]
            $(#[$meta])* async fn $name($backend: Backend) $body
        }
    };
}

/// One test per store from one body, for tests the queue plays no part in (imports, the
/// registry's tables): `async fn name(backend: Backend) { .. }` becomes the module `name` with
/// the tests `sqlite` and `postgres`.
#[macro_export]
macro_rules! on_every_store {
    ($(#[$meta:meta])* async fn $name:ident($backend:ident: Backend) $body:block) => {
        $crate::on_backends! {
            [sqlite: SqliteTable, postgres: PostgresTable]
            $(#[$meta])* async fn $name($backend: Backend) $body
        }
    };
}

/// The module of one test body with a test per `test_name: Backend variant` listed.
#[macro_export]
macro_rules! on_backends {
    ([$($test:ident: $variant:ident),+]
     $(#[$meta:meta])* async fn $name:ident($backend:ident: Backend) $body:block) => {
        $(#[$meta])*
        mod $name {
            #[allow(unused_imports)]
            use super::*;
            use $crate::util::backend::Backend;

            async fn body($backend: Backend) $body

            $(
                #[tokio::test]
                async fn $test() {
                    body(Backend::$variant).await
                }
            )+
        }
    };
}

/// Returns from the test (after a notice) when Postgres does not answer here, unless
/// `JOBSCHLEUDER_TEST_REQUIRE_SERVERS=1`.
#[macro_export]
macro_rules! needs_postgres {
    ($test:expr) => {
        if $crate::util::backend::Backend::PostgresTable
            .unavailable($test)
            .is_some()
        {
            return;
        }
    };
}

/// Returns from the test (after a notice) when Postgres or RabbitMQ does not answer here,
/// unless `JOBSCHLEUDER_TEST_REQUIRE_SERVERS=1`.
#[macro_export]
macro_rules! needs_servers {
    ($test:expr) => {
        if $crate::util::backend::Backend::PostgresRabbitmq
            .unavailable($test)
            .is_some()
        {
            return;
        }
    };
}
