//! The table queue: messages are rows of `queue_messages` in the store's own database (SQLite
//! for one host, Postgres for sites without RabbitMQ).
//!
//! - **Publish** inserts rows in one transaction: durable once it commits.
//! - **Consume** claims ready rows for this consumer with a visibility lease (`queue.lease`),
//!   which the consumer renews while it holds them. A consumer that dies stops renewing; its
//!   rows become ready again when the lease runs out, and another consumer gets them.
//! - **Acknowledge** deletes the row; **requeue** makes it ready at once; **dead-letter** moves
//!   it to `queue_dead_letters` (`runs --dead-letters` shows them). A message handed out more
//!   than `delivery_limit` times is dead-lettered instead of handed out again.
//! - **Wake-ups**: within one process a publish wakes the consumers at once (no polling when
//!   everything runs in one process, as `standalone` does). Across processes, Postgres wakes
//!   them by LISTEN/NOTIFY, and SQLite by a short poll of the file's change counter
//!   (`queue.poll_interval`). A consumer also wakes when a lease it waits for runs out.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use tokio::sync::{mpsc, Notify};

use super::{Acker, Delivery, JobMessage, Outgoing, Published, QueueError};
use crate::config::Config;
use crate::store::{QueueWakeups, Store};

/// Rows claimed per statement at most.
const TAKE_BATCH: usize = 64;
/// Acknowledgements deleted per statement at most.
const ACK_BATCH: usize = 512;
/// The longest a consumer sleeps without looking (a missed wake-up costs at most this).
const MAX_SLEEP: Duration = Duration::from_secs(5);

/// The in-process wake-up of each queue name: publishers in this process notify it after
/// their commit, so consumers in this process need no poll.
fn local(queue: &str) -> Arc<Notify> {
    static QUEUES: OnceLock<Mutex<HashMap<String, Arc<Notify>>>> = OnceLock::new();
    let queues = QUEUES.get_or_init(|| Mutex::new(HashMap::new()));
    let mut queues = queues.lock().unwrap_or_else(|e| e.into_inner());
    queues
        .entry(queue.to_string())
        .or_insert_with(|| Arc::new(Notify::new()))
        .clone()
}

/// The table queue of one database.
#[derive(Clone)]
pub struct TableQueue {
    store: Store,
    lease: Duration,
    poll: Duration,
    delivery_limit: u32,
    max_message_size: usize,
    /// Consumers being closed: their last settlements and releases, which `close` waits for.
    closing: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>>,
}

impl TableQueue {
    pub fn new(store: Store, config: &Config) -> TableQueue {
        TableQueue {
            store,
            lease: config.queue.lease,
            poll: config.queue.poll_interval,
            delivery_limit: config.rabbitmq.delivery_limit,
            max_message_size: config.rabbitmq.max_message_size,
            closing: Arc::new(Mutex::new(Vec::new())),
        }
    }

    /// Inserts the messages in one transaction; all are `Acked` once it commits.
    pub async fn publish(&self, batch: &[Outgoing]) -> Result<Vec<Published>, QueueError> {
        let mut outcomes = Vec::with_capacity(batch.len());
        let mut rows = Vec::with_capacity(batch.len());
        for outgoing in batch {
            let body = outgoing.message.to_bytes();
            if body.len() > self.max_message_size {
                outcomes.push(Published::Refused(format!(
                    "its message of {} bytes is larger than rabbitmq.max_message_size ({} bytes)",
                    body.len(),
                    self.max_message_size
                )));
                continue;
            }
            rows.push((outgoing.queue.clone(), body));
            outcomes.push(Published::Acked);
        }
        if !rows.is_empty() {
            self.store.queue_publish(&rows).await?;
            wake(rows.iter().map(|r| r.0.as_str()));
        }
        Ok(outcomes)
    }

    /// Messages ready in `queue`.
    pub async fn depth(&self, queue: &str) -> Result<u32, QueueError> {
        Ok(self.store.queue_depth(queue).await?)
    }

    /// A consumer of `queue` holding at most `prefetch` unacknowledged deliveries.
    pub async fn consume(
        &self,
        queue: &str,
        prefetch: u16,
        tag: &str,
    ) -> Result<TableConsumer, QueueError> {
        let wakeups = self.store.queue_wakeups(self.poll).await?;
        // A tag of its own per consumer: a restarted worker never takes over (or acknowledges)
        // what its previous life held.
        let tag = format!("{tag}-{}", uuid::Uuid::new_v4().simple());
        let shared = Arc::new(Shared {
            held: AtomicUsize::new(0),
            holding: Mutex::new(HashSet::new()),
            released: Notify::new(),
            cancelled: AtomicBool::new(false),
        });
        let (acks, receiver) = mpsc::unbounded_channel();
        let acker_task = tokio::spawn(acknowledge(self.store.clone(), receiver, shared.clone()));
        let renewer = tokio::spawn(renew(
            self.store.clone(),
            tag.clone(),
            self.lease,
            shared.clone(),
        ));
        // Taking messages happens in a task of its own: the worker drops `next()` whenever
        // another event comes first, and a take cut off half-way would lose what it took.
        let (deliveries, received) = mpsc::unbounded_channel();
        let fetcher = tokio::spawn(
            Fetcher {
                queue: self.clone(),
                name: queue.to_string(),
                tag: tag.clone(),
                prefetch: usize::from(prefetch.max(1)),
                wakeups,
                local: local(queue),
                shared: shared.clone(),
                acks,
                deliveries,
            }
            .run(),
        );
        Ok(TableConsumer {
            queue: self.clone(),
            tag,
            received,
            shared,
            acker_task: Some(acker_task),
            tasks: vec![fetcher, renewer],
        })
    }

    /// Waits (a few seconds at most) until dropped consumers have written their last
    /// settlements and returned what they still held to the queue.
    pub async fn close(&self) {
        let closing: Vec<_> = self
            .closing
            .lock()
            .map(|mut c| c.drain(..).collect())
            .unwrap_or_default();
        for task in closing {
            let _ = tokio::time::timeout(Duration::from_secs(10), task).await;
        }
    }
}

/// What a consumer shares with its ackers and background tasks.
struct Shared {
    /// Deliveries handed out and not yet settled.
    held: AtomicUsize,
    /// Their ids: the messages whose lease the consumer renews. A message leaves it once its
    /// settlement was written or given up on; one whose settlement was lost in a crash of the
    /// database is then no longer renewed and returns when its lease runs out.
    holding: Mutex<HashSet<i64>>,
    /// Told when a delivery is settled (room for another).
    released: Notify,
    cancelled: AtomicBool,
}

/// How a delivery was settled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Settle {
    Ack,
    Requeue,
    DeadLetter,
}

/// Settles one delivery of a table queue (see [`Acker`]).
#[derive(Clone)]
pub struct TableAcker {
    id: i64,
    settled: Arc<AtomicBool>,
    acks: mpsc::UnboundedSender<(i64, Settle, tokio::sync::oneshot::Sender<()>)>,
}

impl TableAcker {
    async fn settle(&self, how: Settle) -> Result<(), QueueError> {
        if self.settled.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        let (done, written) = tokio::sync::oneshot::channel();
        if self.acks.send((self.id, how, done)).is_err() {
            return Ok(()); // the consumer is gone: its lease runs out, the message returns
        }
        // Acknowledgements are written in batches behind the caller, as a broker's are: a
        // lost one means a re-delivery, which the run's claim recognizes.
        if how != Settle::Ack {
            let _ = written.await;
        }
        Ok(())
    }

    pub async fn ack(&self) -> Result<(), QueueError> {
        self.settle(Settle::Ack).await
    }

    pub async fn requeue(&self) -> Result<(), QueueError> {
        self.settle(Settle::Requeue).await
    }

    pub async fn dead_letter(&self) -> Result<(), QueueError> {
        self.settle(Settle::DeadLetter).await
    }
}

/// Writes settlements in batches until every acker and the consumer are gone.
async fn acknowledge(
    store: Store,
    mut receiver: mpsc::UnboundedReceiver<(i64, Settle, tokio::sync::oneshot::Sender<()>)>,
    shared: Arc<Shared>,
) {
    let mut batch = Vec::new();
    while receiver.recv_many(&mut batch, ACK_BATCH).await > 0 {
        let mut acked = Vec::new();
        let mut requeued = Vec::new();
        let mut dead = Vec::new();
        for (id, how, _) in &batch {
            match how {
                Settle::Ack => acked.push(*id),
                Settle::Requeue => requeued.push(*id),
                Settle::DeadLetter => dead.push(*id),
            }
        }
        let mut tries = 0;
        loop {
            tries += 1;
            let written = async {
                if !acked.is_empty() {
                    store.queue_ack(&acked).await?;
                }
                if !requeued.is_empty() {
                    store.queue_release(&requeued).await?;
                }
                if !dead.is_empty() {
                    store
                        .queue_dead_letter(&dead, "rejected by its worker")
                        .await?;
                }
                Ok::<_, crate::store::StoreError>(())
            }
            .await;
            match written {
                Ok(()) => break,
                Err(e) if e.is_transient() && tries < 5 => {
                    tracing::debug!(error = %e, "settling deliveries failed; trying again");
                    tokio::time::sleep(Duration::from_millis(200 * tries)).await;
                }
                Err(e) => {
                    // Left to their lease: the messages return and their runs' claims
                    // recognize them.
                    tracing::warn!(error = %e, deliveries = batch.len(), "settling deliveries failed; they return to the queue when their lease runs out");
                    break;
                }
            }
        }
        let settled = batch.len();
        if let Ok(mut holding) = shared.holding.lock() {
            for (id, _, _) in &batch {
                holding.remove(id);
            }
        }
        for (_, _, done) in batch.drain(..) {
            let _ = done.send(());
        }
        shared.held.fetch_sub(settled, Ordering::SeqCst);
        shared.released.notify_waiters();
    }
}

/// Renews the visibility lease of what the consumer holds, at a third of the lease.
async fn renew(store: Store, tag: String, lease: Duration, shared: Arc<Shared>) {
    let every = (lease / 3).max(Duration::from_millis(100));
    loop {
        tokio::time::sleep(every).await;
        let ids: Vec<i64> = match shared.holding.lock() {
            Ok(holding) => holding.iter().copied().collect(),
            Err(_) => continue,
        };
        if ids.is_empty() {
            continue;
        }
        if let Err(e) = store.queue_extend(&tag, &ids, lease).await {
            tracing::warn!(error = %e, "renewing the lease of held deliveries failed; trying again");
        }
    }
}

/// Deliveries of one table queue for one consumer.
pub struct TableConsumer {
    queue: TableQueue,
    tag: String,
    received: mpsc::UnboundedReceiver<Result<Delivery, QueueError>>,
    shared: Arc<Shared>,
    acker_task: Option<tokio::task::JoinHandle<()>>,
    /// The fetcher and the renewer.
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl TableConsumer {
    /// The next delivery (waiting for one); `None` once cancelled. Cancel-safe: dropping the
    /// future loses nothing.
    pub async fn next(&mut self) -> Option<Result<Delivery, QueueError>> {
        if self.shared.cancelled.load(Ordering::SeqCst) {
            return None;
        }
        self.received.recv().await
    }

    /// Takes nothing more; what it holds stays held until settled or the consumer is dropped.
    pub fn cancel(&mut self) {
        // The fetcher stops before its next take; it is never cut off in the middle of one.
        self.shared.cancelled.store(true, Ordering::SeqCst);
        self.shared.released.notify_waiters();
    }
}

/// Takes ready messages for one consumer while it has room (`prefetch` unsettled at most), and
/// waits for more when there are none.
struct Fetcher {
    queue: TableQueue,
    name: String,
    tag: String,
    prefetch: usize,
    wakeups: QueueWakeups,
    local: Arc<Notify>,
    shared: Arc<Shared>,
    acks: mpsc::UnboundedSender<(i64, Settle, tokio::sync::oneshot::Sender<()>)>,
    deliveries: mpsc::UnboundedSender<Result<Delivery, QueueError>>,
}

impl Fetcher {
    async fn run(mut self) {
        let mut backoff = Duration::from_millis(200);
        loop {
            if self.shared.cancelled.load(Ordering::SeqCst) {
                return;
            }
            // Registered before looking, so a publish between the look and the wait counts.
            let local = self.local.clone();
            let published = local.notified();
            tokio::pin!(published);
            published.as_mut().enable();
            let shared = self.shared.clone();
            let released = shared.released.notified();
            tokio::pin!(released);
            released.as_mut().enable();
            let room = self
                .prefetch
                .saturating_sub(self.shared.held.load(Ordering::SeqCst))
                .min(TAKE_BATCH);
            if room == 0 {
                released.await;
                continue;
            }
            match self.take(room).await {
                Ok(true) => {
                    backoff = Duration::from_millis(200);
                    continue;
                }
                Ok(false) => {}
                Err(e) => {
                    // A locked file or a lost connection passes: this task tries again and
                    // keeps its consumer (a new one would return what this one holds, and
                    // every return counts as a delivery). Anything else ends the consumer.
                    let passing = matches!(&e, QueueError::Table(store) if store.is_transient());
                    if passing {
                        tracing::warn!(error = %e, "taking queued messages failed; trying again in {backoff:?}");
                    } else if self.deliveries.send(Err(e)).is_err() {
                        return;
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                    continue;
                }
            }
            let sleep = match self.queue.store.queue_next_visible(&self.name).await {
                Ok(Some(wait)) => wait.min(MAX_SLEEP),
                _ => MAX_SLEEP,
            };
            tokio::select! {
                _ = published => {}
                woken = self.wakeups.next(&self.name) => {
                    if let Err(e) = woken {
                        tracing::debug!(error = %e, "waiting for queued messages failed; looking again");
                        tokio::time::sleep(backoff).await;
                    }
                }
                _ = tokio::time::sleep(sleep) => {}
            }
        }
    }

    /// Claims up to `room` ready messages and hands them to the consumer; whether any came.
    async fn take(&mut self, room: usize) -> Result<bool, QueueError> {
        let taken = self
            .queue
            .store
            .queue_take(
                &self.name,
                &self.tag,
                room as u32,
                self.queue.lease,
                self.queue.delivery_limit,
            )
            .await?;
        let any = !taken.is_empty();
        self.shared.held.fetch_add(taken.len(), Ordering::SeqCst);
        if let Ok(mut holding) = self.shared.holding.lock() {
            holding.extend(taken.iter().map(|m| m.id));
        }
        for message in taken {
            let previous = u64::try_from(message.deliveries.max(1) - 1).unwrap_or(0);
            let delivery = Delivery {
                redelivered: previous > 0,
                previous_deliveries: previous,
                message_id: message.message_id,
                data: message.body,
                acker: Acker::Table(TableAcker {
                    id: message.id,
                    settled: Arc::new(AtomicBool::new(false)),
                    acks: self.acks.clone(),
                }),
            };
            // A consumer that is gone: the message returns when the consumer's drop
            // releases what it holds.
            let _ = self.deliveries.send(Ok(delivery));
        }
        Ok(any)
    }
}

impl Drop for TableConsumer {
    /// Like a closed channel: what it holds goes back to the queue — at once for deliveries
    /// never handed out, after the last settlements are written for the others.
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
        let mut unused = Vec::new();
        while let Ok(received) = self.received.try_recv() {
            if let Ok(Delivery {
                acker: Acker::Table(acker),
                ..
            }) = received
            {
                unused.push(acker.id);
            }
        }
        let store = self.queue.store.clone();
        let tag = self.tag.clone();
        let acker_task = self.acker_task.take();
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let closing = runtime.spawn(async move {
            if !unused.is_empty() {
                let _ = store.queue_release(&unused).await;
            }
            // Ends once every acker is gone.
            if let Some(task) = acker_task {
                let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
            }
            let _ = store.queue_release_consumer(&tag).await;
        });
        if let Ok(mut tasks) = self.queue.closing.lock() {
            tasks.retain(|t| !t.is_finished());
            tasks.push(closing);
        }
    }
}

/// Wakes this process's consumers of `queues` (after a commit that queued messages).
pub fn wake<'a>(queues: impl Iterator<Item = &'a str>) {
    let mut queues: Vec<&str> = queues.collect();
    queues.sort_unstable();
    queues.dedup();
    for queue in queues {
        local(queue).notify_waiters();
    }
}

/// Splits an outbox batch for the table queue: the runs to mark published, the runs whose
/// message is too large (dead, with the reason), and the messages (queue, body).
#[allow(clippy::type_complexity)]
pub fn prepare(
    runs: &[crate::store::OutboxRun],
    outgoing: &[Outgoing],
    max_message_size: usize,
) -> (
    Vec<uuid::Uuid>,
    Vec<(uuid::Uuid, String)>,
    Vec<(String, Vec<u8>)>,
) {
    let mut ids = Vec::with_capacity(runs.len());
    let mut dead = Vec::new();
    let mut messages = Vec::with_capacity(runs.len());
    for (run, outgoing) in runs.iter().zip(outgoing) {
        let body = outgoing.message.to_bytes();
        if body.len() > max_message_size {
            dead.push((
                run.id,
                format!(
                    "cannot be published: its message of {} bytes is larger than rabbitmq.max_message_size ({max_message_size} bytes)",
                    body.len()
                ),
            ));
            continue;
        }
        ids.push(run.id);
        messages.push((outgoing.queue.clone(), body));
    }
    (ids, dead, messages)
}

/// The job message of a raw body, when it is one (for logs of dead letters).
pub fn describe_body(body: &[u8]) -> String {
    match JobMessage::parse(body) {
        Ok(message) => message.job_name.unwrap_or(message.cmd),
        Err(_) => String::from_utf8_lossy(body).chars().take(60).collect(),
    }
}
