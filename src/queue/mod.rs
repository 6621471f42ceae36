//! The queue: runs travel from the outbox to workers through it. One interface, two
//! implementations chosen from the config at start-up — RabbitMQ ([`rabbitmq`], for many
//! hosts) and a table queue in the database ([`table`], on SQLite for one host, or on Postgres
//! for sites without RabbitMQ). Scheduler, worker and listener use [`Queue`], [`Consumer`] and
//! [`Delivery`] and never know which one they have.
//!
//! Both keep the same promises: a published message is durable once `publish` answers
//! `Acked`; a delivery stays with its consumer until it is acknowledged, returned or
//! dead-lettered, and goes back to the queue when its consumer dies; a message handed out
//! too often (`delivery_limit`) is dead-lettered instead of delivered again.

pub mod rabbitmq;
pub mod table;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::config::{Config, QueueKind};
use crate::store::{NewRun, OutboxRun, Store, StoreError};

pub use rabbitmq::Broker;

#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("cannot connect to RabbitMQ at {target}: {source}")]
    Connect {
        target: String,
        source: lapin::Error,
    },
    #[error("queue {queue:?} exists on the broker with other settings than configured (type {queue_type}, delivery limit {delivery_limit}, dead-letter queue {queue:?}.dead): set rabbitmq.queue_type to match it, or delete the queue so it is declared anew ({source})")]
    QueueMismatch {
        queue: String,
        queue_type: &'static str,
        delivery_limit: u32,
        source: lapin::Error,
    },
    #[error("the RabbitMQ URL of {target} cannot be used: {message}")]
    Url { target: String, message: String },
    #[error("RabbitMQ error while {context}: {source}")]
    Amqp {
        context: &'static str,
        source: lapin::Error,
    },
    #[error("the broker refused (nacked) {0} message(s)")]
    Nacked(usize),
    #[error("the queue did not confirm published messages within {0:?}")]
    Timeout(std::time::Duration),
    #[error("table queue: {0}")]
    Table(#[from] StoreError),
}

impl QueueError {
    /// Whether the queue refused for good what was asked (in any declaration step): a queue
    /// or exchange that exists with other settings, one this user may not access, one another
    /// connection holds exclusively. Retrying cannot help.
    pub fn is_refusal(&self) -> bool {
        match self {
            QueueError::QueueMismatch { .. } => true,
            QueueError::Amqp { source, .. } => {
                let text = source.to_string();
                [
                    "ACCESS_REFUSED",
                    "PRECONDITION_FAILED",
                    "RESOURCE_LOCKED",
                    "NOT_ALLOWED",
                ]
                .iter()
                .any(|code| text.contains(code))
            }
            _ => false,
        }
    }

    /// Whether a consumer's error is RabbitMQ closing the channel because a delivery stayed
    /// unacknowledged longer than its `consumer_timeout`.
    pub fn is_consumer_timeout(&self) -> bool {
        let text = self.to_string();
        text.contains("acknowledgement timed out") || text.contains("consumer_timeout")
    }
}

/// A job on the wire: `{"cmd": "<job>", "args": {...}}` plus what this version adds. A message
/// with only `cmd` and `args` (as the original scheduler sends) is a valid job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobMessage {
    pub cmd: String,
    #[serde(default)]
    pub args: serde_json::Map<String, serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_id: Option<Uuid>,
    /// The job's stable name (the job file's `id`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preprocessing: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub postprocessing: Option<String>,
    /// Seconds a run may take.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retries: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempt: Option<i32>,
}

impl JobMessage {
    /// The message of a queued run.
    pub fn of_run(run: &OutboxRun) -> JobMessage {
        JobMessage {
            cmd: run.job.clone(),
            args: crate::store::object_or_empty(Some(&run.arguments)),
            run_id: Some(run.id),
            job_name: Some(run.job_name.clone()),
            preprocessing: run.preprocessing.clone(),
            postprocessing: run.postprocessing.clone(),
            timeout: run.timeout_seconds,
            retries: u32::try_from(run.max_retries).ok(),
            attempt: Some(run.attempt),
        }
    }

    /// The message of a run being created with id `id` (not tried yet), the same as
    /// [`JobMessage::of_run`] gives once it is stored.
    pub fn of_new_run(id: Uuid, run: &NewRun) -> JobMessage {
        JobMessage {
            cmd: run.job.clone(),
            args: run.arguments.clone(),
            run_id: Some(id),
            job_name: Some(run.job_name.clone()),
            preprocessing: run.preprocessing.clone(),
            postprocessing: run.postprocessing.clone(),
            timeout: run.timeout_seconds,
            retries: u32::try_from(run.max_retries).ok(),
            attempt: Some(0),
        }
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    pub fn parse(bytes: &[u8]) -> Result<JobMessage, String> {
        let message: JobMessage = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
        if message.cmd.trim().is_empty() {
            return Err("`cmd` is empty".into());
        }
        if let Some(timeout) = message.timeout {
            if !(timeout > 0.0 && timeout < 1e9) {
                return Err(format!(
                    "`timeout` {timeout} is not a number of seconds between 0 and 1e9"
                ));
            }
        }
        Ok(message)
    }
}

/// What became of one published message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Published {
    /// The queue has it, durably.
    Acked,
    /// The queue refused it for now (a nack, or it came back unroutable): try again later.
    Nacked,
    /// It can never be published as it is (its queue cannot be declared as configured, or it
    /// is too large): the reason, for the run's record.
    Refused(String),
}

/// One message to publish: the queue and the job.
#[derive(Debug, Clone)]
pub struct Outgoing {
    pub queue: String,
    pub message: JobMessage,
}

/// A connection to the configured queue.
pub enum Queue {
    RabbitMq(Box<Broker>),
    Table(table::TableQueue),
}

impl Queue {
    /// Connects to the queue the config names; `role` names the connection where the queue
    /// shows its clients, e.g. "scheduler" or "worker host1". The table queue lives in
    /// `store`'s database.
    pub async fn connect(config: &Config, store: &Store, role: &str) -> Result<Queue, QueueError> {
        match config.queue.kind {
            QueueKind::RabbitMq => Ok(Queue::RabbitMq(Box::new(
                Broker::connect(&config.rabbitmq, role).await?,
            ))),
            QueueKind::Table => Ok(Queue::Table(table::TableQueue::new(store.clone(), config))),
        }
    }

    /// Where it connects, for messages: never a password.
    pub fn describe(config: &Config) -> String {
        match config.queue.kind {
            QueueKind::RabbitMq => config.rabbitmq.describe(),
            QueueKind::Table => format!("the table queue in {}", config.database.describe()),
        }
    }

    pub fn is_connected(&self) -> bool {
        match self {
            Queue::RabbitMq(broker) => broker.is_connected(),
            Queue::Table(_) => true,
        }
    }

    /// Declares `queue` as configured (once per connection); the table queue needs nothing.
    pub async fn declare(&self, queue: &str) -> Result<(), QueueError> {
        match self {
            Queue::RabbitMq(broker) => broker.declare(queue).await,
            Queue::Table(_) => Ok(()),
        }
    }

    /// Publishes durable messages, all in flight at once, and says what became of each. A
    /// message that can never be published is `Refused` without affecting the others; an
    /// error means nothing of the batch is known to be published.
    pub async fn publish(&self, batch: &[Outgoing]) -> Result<Vec<Published>, QueueError> {
        match self {
            Queue::RabbitMq(broker) => broker.publish(batch).await,
            Queue::Table(queue) => queue.publish(batch).await,
        }
    }

    /// Messages ready in `queue` (0 if it does not exist).
    pub async fn queue_depth(&self, queue: &str) -> Result<u32, QueueError> {
        match self {
            Queue::RabbitMq(broker) => broker.queue_depth(queue).await,
            Queue::Table(table) => table.depth(queue).await,
        }
    }

    /// Starts consuming `queue` with at most `prefetch` unacknowledged deliveries.
    pub async fn consume(
        &self,
        queue: &str,
        prefetch: u16,
        tag: &str,
    ) -> Result<Consumer, QueueError> {
        match self {
            Queue::RabbitMq(broker) => Ok(Consumer::RabbitMq(
                broker.consume(queue, prefetch, tag).await?,
            )),
            Queue::Table(table) => Ok(Consumer::Table(table.consume(queue, prefetch, tag).await?)),
        }
    }

    /// Stops a consumer: it gets nothing more; unacknowledged deliveries stay with it.
    pub async fn cancel(&self, consumer: &mut Consumer, tag: &str) -> Result<(), QueueError> {
        match (self, consumer) {
            (Queue::RabbitMq(broker), _) => broker.cancel(tag).await,
            (Queue::Table(_), Consumer::Table(consumer)) => {
                consumer.cancel();
                Ok(())
            }
            (Queue::Table(_), _) => Ok(()),
        }
    }

    /// Closes the connection cleanly: unacknowledged deliveries go back to the queue.
    pub async fn close(&self) {
        match self {
            Queue::RabbitMq(broker) => broker.close().await,
            Queue::Table(table) => table.close().await,
        }
    }
}

/// Deliveries of one queue, in order.
pub enum Consumer {
    RabbitMq(lapin::Consumer),
    Table(table::TableConsumer),
}

impl Consumer {
    /// The next delivery; `None` when the queue ended the consumer; an error when the
    /// connection was lost (unacknowledged deliveries return to the queue).
    pub async fn next(&mut self) -> Option<Result<Delivery, QueueError>> {
        match self {
            Consumer::RabbitMq(consumer) => {
                use futures_util::StreamExt;
                match consumer.next().await? {
                    Ok(delivery) => Some(Ok(rabbitmq::delivery(delivery))),
                    Err(source) => Some(Err(QueueError::Amqp {
                        context: "consuming",
                        source,
                    })),
                }
            }
            Consumer::Table(consumer) => consumer.next().await,
        }
    }
}

/// One message handed to this consumer.
pub struct Delivery {
    pub data: Vec<u8>,
    /// Handed out before (to this or another consumer) without being acknowledged.
    pub redelivered: bool,
    /// How often it was handed out before; 0 for a first delivery.
    pub previous_deliveries: u64,
    /// The `message_id` a sender gave the message, if any.
    pub message_id: Option<String>,
    pub acker: Acker,
}

/// Settles one delivery; kept apart from its delivery by whoever runs it.
#[derive(Clone)]
pub enum Acker {
    RabbitMq(lapin::Acker),
    Table(table::TableAcker),
}

impl Acker {
    /// Acknowledges: the job's result is recorded, the message goes.
    pub async fn ack(&self) -> Result<(), QueueError> {
        match self {
            Acker::RabbitMq(acker) => rabbitmq::ack(acker).await,
            Acker::Table(acker) => acker.ack().await,
        }
    }

    /// Puts the message back in the queue, to be delivered again.
    pub async fn requeue(&self) -> Result<(), QueueError> {
        match self {
            Acker::RabbitMq(acker) => rabbitmq::requeue(acker).await,
            Acker::Table(acker) => acker.requeue().await,
        }
    }

    /// Rejects without requeueing: the message goes to the dead letters.
    pub async fn dead_letter(&self) -> Result<(), QueueError> {
        match self {
            Acker::RabbitMq(acker) => rabbitmq::dead_letter(acker).await,
            Acker::Table(acker) => acker.dead_letter().await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_originals_bare_message_is_a_job() {
        let message =
            JobMessage::parse(br#"{"cmd": "hello_world", "args": {"hello": "world"}}"#).unwrap();
        assert_eq!(message.cmd, "hello_world");
        assert_eq!(message.run_id, None);
        assert_eq!(message.args["hello"], "world");
        assert!(JobMessage::parse(b"not json").is_err());
        assert!(JobMessage::parse(br#"{"args": {}}"#).is_err());
        assert!(JobMessage::parse(br#"{"cmd": " "}"#).is_err());
    }

    #[test]
    fn extra_fields_round_trip_and_stay_compatible() {
        let message = JobMessage {
            cmd: "command".into(),
            args: serde_json::Map::new(),
            run_id: Some(Uuid::nil()),
            job_name: Some("backup".into()),
            preprocessing: None,
            postprocessing: None,
            timeout: Some(5.0),
            retries: None,
            attempt: None,
        };
        let bytes = message.to_bytes();
        let value: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(value["cmd"], "command");
        assert!(value["args"].is_object());
        assert!(value.get("preprocessing").is_none());
        assert_eq!(JobMessage::parse(&bytes).unwrap(), message);
    }
}
