//! The RabbitMQ queue, through lapin: connecting, declaring queues, publishing with confirms,
//! consuming. No other module speaks AMQP.
//!
//! Queues are durable, on the default exchange with the queue name as routing key. By default a
//! queue is a quorum queue with a delivery limit, and dead-letters through the direct exchange
//! `<queue>.dead-letter` to the durable queue `<queue>.dead`, both declared alongside: unparsable messages, unknown jobs, and messages that keep killing
//! workers end there instead of looping.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use futures_util::future::join_all;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions,
    BasicPublishOptions, BasicQosOptions, BasicRejectOptions, ConfirmSelectOptions,
    ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, ExchangeKind,
};
use tokio::sync::Mutex;

use super::{Acker, Delivery, Outgoing, Published, QueueError};
use crate::config::{QueueType, RabbitmqConfig};

/// The largest AMQP frame this side asks for (unless the URL says `frame_max`).
const FRAME_MAX: u32 = 32 * 1024;

fn amqp(context: &'static str) -> impl FnOnce(lapin::Error) -> QueueError {
    move |source| QueueError::Amqp { context, source }
}

/// A connection with one channel in confirm mode.
pub struct Broker {
    connection: Connection,
    channel: Channel,
    config: RabbitmqConfig,
    /// Queues declared on this connection, so each is declared once.
    declared: Mutex<HashSet<String>>,
    /// One publisher at a time per channel: confirms of interleaved batches would mismatch.
    publishing: Mutex<()>,
}

impl Broker {
    /// Connects; `role` names the connection in the broker's management view, e.g.
    /// "scheduler" or "worker host1".
    pub async fn connect(config: &RabbitmqConfig, role: &str) -> Result<Broker, QueueError> {
        let target = config.describe();
        let name = format!(
            "jobschleuder {role} queue={} pid={}",
            config.queue,
            std::process::id()
        );
        let properties =
            ConnectionProperties::default().with_connection_name(LongString::from(name));
        let url = config.amqp_url();
        let mut uri: lapin::uri::AMQPUri =
            url.expose()
                .parse()
                .map_err(|message: String| QueueError::Url {
                    target: target.clone(),
                    message,
                })?;
        // The connection keeps a read and a write buffer of 32 frames each: at the broker's
        // default frame size (128 KiB) 8 MiB, resident for the process's life. Run messages
        // are small; larger ones go out in several frames.
        uri.query.frame_max.get_or_insert(FRAME_MAX);
        let connection = tokio::time::timeout(
            Duration::from_secs(30),
            Connection::connect_uri(uri, properties),
        )
        .await
        .map_err(|_| QueueError::Connect {
            target: target.clone(),
            source: lapin::Error::from(lapin::ErrorKind::InvalidConnectionState(
                lapin::ConnectionState::Closed,
            )),
        })?
        .map_err(|source| QueueError::Connect {
            target: target.clone(),
            source,
        })?;
        let channel = connection
            .create_channel()
            .await
            .map_err(amqp("opening a channel"))?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(amqp("enabling publisher confirms"))?;
        Ok(Broker {
            connection,
            channel,
            config: config.clone(),
            declared: Mutex::new(HashSet::new()),
            publishing: Mutex::new(()),
        })
    }

    pub fn is_connected(&self) -> bool {
        self.connection.status().connected() && self.channel.status().connected()
    }

    /// The dead-letter exchange of `queue` (direct, durable).
    pub fn dead_letter_exchange(queue: &str) -> String {
        format!("{queue}.dead-letter")
    }

    /// The dead-letter queue of `queue`.
    pub fn dead_letter_queue(queue: &str) -> String {
        format!("{queue}.dead")
    }

    /// Declares `queue` (and its dead-letter queue) as configured, once per connection. The
    /// declarations use a channel of their own: a refused declaration closes its channel, and
    /// must not take the publishing channel (and every other run of its batch) with it.
    pub async fn declare(&self, queue: &str) -> Result<(), QueueError> {
        let mut declared = self.declared.lock().await;
        if declared.contains(queue) {
            return Ok(());
        }
        let channel = self
            .connection
            .create_channel()
            .await
            .map_err(amqp("opening a channel to declare queues"))?;
        let result = self.declare_on(&channel, queue).await;
        if channel.status().connected() {
            let _ = channel.close(200, ShortString::from("declared")).await;
        }
        result?;
        declared.insert(queue.to_string());
        Ok(())
    }

    async fn declare_on(&self, channel: &Channel, queue: &str) -> Result<(), QueueError> {
        let dead = Self::dead_letter_queue(queue);
        let exchange = Self::dead_letter_exchange(queue);
        channel
            .exchange_declare(
                ShortString::from(exchange.as_str()),
                ExchangeKind::Direct,
                ExchangeDeclareOptions {
                    durable: true,
                    ..ExchangeDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(amqp("declaring the dead-letter exchange"))?;
        channel
            .queue_declare(
                ShortString::from(dead.as_str()),
                QueueDeclareOptions::durable(),
                FieldTable::default(),
            )
            .await
            .map_err(amqp("declaring the dead-letter queue"))?;
        channel
            .queue_bind(
                ShortString::from(dead.as_str()),
                ShortString::from(exchange.as_str()),
                ShortString::from(dead.as_str()),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(amqp("binding the dead-letter queue"))?;
        let mut arguments = FieldTable::default();
        arguments.insert(
            ShortString::from("x-dead-letter-exchange"),
            AMQPValue::LongString(LongString::from(exchange.as_str())),
        );
        arguments.insert(
            ShortString::from("x-dead-letter-routing-key"),
            AMQPValue::LongString(LongString::from(dead.as_str())),
        );
        if self.config.queue_type == QueueType::Quorum {
            arguments.insert(
                ShortString::from("x-queue-type"),
                AMQPValue::LongString(LongString::from("quorum")),
            );
            arguments.insert(
                ShortString::from("x-delivery-limit"),
                AMQPValue::LongInt(i32::try_from(self.config.delivery_limit).unwrap_or(i32::MAX)),
            );
        }
        channel
            .queue_declare(
                ShortString::from(queue),
                QueueDeclareOptions::durable(),
                arguments,
            )
            .await
            .map_err(|source| {
                let text = source.to_string();
                if text.contains("PRECONDITION_FAILED") || text.contains("inequivalent") {
                    QueueError::QueueMismatch {
                        queue: queue.to_string(),
                        queue_type: self.config.queue_type.as_str(),
                        delivery_limit: self.config.delivery_limit,
                        source,
                    }
                } else {
                    QueueError::Amqp {
                        context: "declaring the queue",
                        source,
                    }
                }
            })?;
        Ok(())
    }

    /// Publishes persistent messages and waits for the broker's confirms, all in flight at once.
    /// Returns what became of each message. A message that can never be published (its queue
    /// is refused, it is too large) is `Refused` without affecting the others; an error means
    /// the connection failed and nothing of the batch is known to be published.
    pub async fn publish(&self, batch: &[Outgoing]) -> Result<Vec<Published>, QueueError> {
        let _one_publisher = self.publishing.lock().await;
        // Per queue that cannot be used now: `Some(reason)` for good, `None` for this time.
        let mut refused_queues: HashMap<&str, Option<String>> = HashMap::new();
        for queue in batch
            .iter()
            .map(|o| o.queue.as_str())
            .collect::<HashSet<_>>()
        {
            match self.declare(queue).await {
                Ok(()) => {}
                // The broker refused this queue for good (it exists with other settings, or
                // this user may not use it): its runs cannot be published as they are, the
                // others can. Anything else (a node down, a lost connection) may pass later.
                Err(e) if e.is_refusal() => {
                    refused_queues
                        .insert(queue, Some(format!("queue {queue:?} cannot be used: {e}")));
                }
                // A queue that fails for now (its node is down) on a connection that works:
                // its runs wait for the next pass, the others go out.
                Err(e) if self.is_connected() => {
                    tracing::warn!(queue = %queue, error = %e, "cannot declare a queue now; its runs are published later");
                    refused_queues.insert(queue, None);
                }
                Err(e) => return Err(e),
            }
        }
        let mut outcomes: Vec<Option<Published>> = vec![None; batch.len()];
        let mut sending = Vec::with_capacity(batch.len());
        for (index, outgoing) in batch.iter().enumerate() {
            if let Some(refusal) = refused_queues.get(outgoing.queue.as_str()) {
                outcomes[index] = Some(match refusal {
                    Some(reason) => Published::Refused(reason.clone()),
                    None => Published::Nacked,
                });
                continue;
            }
            let payload = outgoing.message.to_bytes();
            if payload.len() > self.config.max_message_size {
                outcomes[index] = Some(Published::Refused(format!(
                    "its message of {} bytes is larger than rabbitmq.max_message_size ({} bytes)",
                    payload.len(),
                    self.config.max_message_size
                )));
                continue;
            }
            sending.push((index, outgoing.queue.as_str(), payload));
        }
        // Handed to the connection all at once, in order: its I/O loop writes them together,
        // instead of one hand-over (and thread switch) per message, each waited for.
        let sent = join_all(sending.iter().map(|(_, queue, payload)| {
            self.channel.basic_publish(
                ShortString::from(""),
                ShortString::from(*queue),
                // Mandatory: a message no queue takes (the queue was deleted) comes back
                // instead of vanishing.
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                payload,
                BasicProperties::default()
                    .with_delivery_mode(2)
                    .with_content_type(ShortString::from("application/json")),
            )
        }))
        .await;
        let mut confirms = Vec::with_capacity(sending.len());
        for ((index, _, _), confirm) in sending.iter().zip(sent) {
            confirms.push((*index, confirm.map_err(amqp("publishing"))?));
        }
        let (indexes, confirms): (Vec<usize>, Vec<_>) = confirms.into_iter().unzip();
        let results = join_all(confirms).await;
        let mut nacked = false;
        for (index, result) in indexes.into_iter().zip(results) {
            let outcome = match result.map_err(amqp("waiting for publisher confirms"))? {
                Confirmation::Ack(None) | Confirmation::NotRequested => Published::Acked,
                Confirmation::Ack(Some(_)) | Confirmation::Nack(_) => {
                    nacked = true;
                    Published::Nacked
                }
            };
            outcomes[index] = Some(outcome);
        }
        if nacked {
            // Perhaps a queue was deleted: declare queues again before the next publish.
            self.declared.lock().await.clear();
        }
        Ok(outcomes
            .into_iter()
            .map(|o| o.unwrap_or(Published::Nacked))
            .collect())
    }

    /// Messages ready in `queue` (0 if it does not exist), asked on a channel of its own: a
    /// passive declaration of a missing queue closes its channel.
    pub async fn queue_depth(&self, queue: &str) -> Result<u32, QueueError> {
        let channel = self
            .connection
            .create_channel()
            .await
            .map_err(amqp("opening a channel to inspect a queue"))?;
        let declared = channel
            .queue_declare(
                ShortString::from(queue),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await;
        if channel.status().connected() {
            let _ = channel.close(200, ShortString::from("inspected")).await;
        }
        match declared {
            Ok(declared) => Ok(declared.message_count()),
            Err(e) if e.to_string().contains("NOT_FOUND") => Ok(0),
            Err(e) => Err(QueueError::Amqp {
                context: "inspecting a queue",
                source: e,
            }),
        }
    }

    /// Starts consuming `queue` with at most `prefetch` unacknowledged deliveries.
    pub async fn consume(
        &self,
        queue: &str,
        prefetch: u16,
        tag: &str,
    ) -> Result<lapin::Consumer, QueueError> {
        self.declare(queue).await?;
        self.channel
            .basic_qos(prefetch, BasicQosOptions::default())
            .await
            .map_err(amqp("setting the prefetch count"))?;
        self.channel
            .basic_consume(
                ShortString::from(queue),
                ShortString::from(tag),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(amqp("starting to consume"))
    }

    /// Stops a consumer: the broker sends it nothing more; unacked deliveries stay with it.
    pub async fn cancel(&self, tag: &str) -> Result<(), QueueError> {
        self.channel
            .basic_cancel(ShortString::from(tag), BasicCancelOptions::default())
            .await
            .map_err(amqp("cancelling the consumer"))
    }

    /// Closes channel and connection cleanly.
    pub async fn close(&self) {
        let _ = self.channel.close(200, ShortString::from("bye")).await;
        let _ = self.connection.close(200, ShortString::from("bye")).await;
    }
}

/// A lapin delivery as the queue interface hands it out.
pub(super) fn delivery(delivery: lapin::message::Delivery) -> Delivery {
    Delivery {
        redelivered: delivery.redelivered,
        previous_deliveries: previous_deliveries(&delivery),
        message_id: delivery
            .properties
            .message_id()
            .as_ref()
            .map(|id| id.as_str().to_string()),
        data: delivery.data,
        acker: Acker::RabbitMq(delivery.acker),
    }
}

pub(super) async fn ack(acker: &lapin::Acker) -> Result<(), QueueError> {
    acker
        .ack(BasicAckOptions::default())
        .await
        .map(|_| ())
        .map_err(amqp("acknowledging a delivery"))
}

pub(super) async fn requeue(acker: &lapin::Acker) -> Result<(), QueueError> {
    acker
        .nack(BasicNackOptions {
            requeue: true,
            ..BasicNackOptions::default()
        })
        .await
        .map(|_| ())
        .map_err(amqp("returning a delivery to the queue"))
}

pub(super) async fn dead_letter(acker: &lapin::Acker) -> Result<(), QueueError> {
    acker
        .reject(BasicRejectOptions { requeue: false })
        .await
        .map(|_| ())
        .map_err(amqp("dead-lettering a delivery"))
}

/// How often the broker has handed this message out before (quorum queues count deliveries
/// that were not acknowledged); 0 for a first delivery.
fn previous_deliveries(delivery: &lapin::message::Delivery) -> u64 {
    let Some(headers) = delivery.properties.headers() else {
        return 0;
    };
    match headers.inner().get(&ShortString::from("x-delivery-count")) {
        Some(AMQPValue::LongLongInt(n)) => u64::try_from(*n).unwrap_or(0),
        Some(AMQPValue::LongInt(n)) => u64::try_from(*n).unwrap_or(0),
        Some(AMQPValue::LongUInt(n)) => u64::from(*n),
        Some(AMQPValue::ShortInt(n)) => u64::try_from(*n).unwrap_or(0),
        Some(AMQPValue::ShortShortInt(n)) => u64::try_from(*n).unwrap_or(0),
        Some(AMQPValue::ShortUInt(n)) => u64::from(*n),
        Some(AMQPValue::ShortShortUInt(n)) => u64::from(*n),
        _ => 0,
    }
}
