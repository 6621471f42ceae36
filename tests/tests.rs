//! Integration tests: the real binary against the real Postgres (and, later, RabbitMQ), each test
//! on a database of its own.

mod util;

mod calendar;
mod cli;
mod control;
mod docs;
mod embedded;
mod hardening;
mod listener;
mod plugins;
mod python;
mod registry;
mod scheduling;
