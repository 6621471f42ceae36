//! Deliveries waiting in a worker for a slot (`worker.lookahead`), and giving them back when
//! the wait gets long.
//!
//! A slot whose job ends takes the oldest waiting delivery itself: the run's claim goes to the
//! writer with the ended job's result, in one batch (`delivery::handle`). A delivery that
//! waits `COPY_AFTER` (every slot busy with longer jobs) has its run published again, so that
//! a worker with a free slot takes it; the delivery itself stays here, so a worker whose list
//! is full has no room to take the copy (one with room may take it, and then both wait here).
//! Whichever delivery of the run is claimed first runs it; the other is acknowledged as a
//! duplicate. Once its run is out again and it has waited `LET_GO_AFTER`,
//! the delivery is acknowledged, long before RabbitMQ's `consumer_timeout` would close the
//! channel. The original's bare messages and unusable ones need no slot: they are recorded
//! (or dead-lettered) instead of copied.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::Notify;
use uuid::Uuid;

use crate::queue::{Delivery, JobMessage};

/// How long a delivery waits for a slot before its run is published again for other workers.
pub(super) const COPY_AFTER: Duration = Duration::from_secs(10);
/// How long a delivery waits for a slot before this worker lets it go (its run published
/// again).
pub(super) const LET_GO_AFTER: Duration = Duration::from_secs(60);

/// Where a waiting delivery's copy stands.
pub(super) struct CopyState(AtomicU8);

const NOT_YET: u8 = 0;
const UNDER_WAY: u8 = 1;
const OUT: u8 = 2;
const FAILED: u8 = 3;

impl CopyState {
    /// The run is published again (or needs no copy: it is not queued any more).
    pub(super) fn out(&self) {
        self.0.store(OUT, Ordering::SeqCst);
    }

    /// The database did not answer: tried again at the next look.
    pub(super) fn failed(&self) {
        self.0.store(FAILED, Ordering::SeqCst);
    }

    fn get(&self) -> u8 {
        self.0.load(Ordering::SeqCst)
    }
}

struct Entry {
    came: Instant,
    copy: Arc<CopyState>,
    delivery: Delivery,
}

/// The deliveries waiting for a slot, oldest first.
#[derive(Default)]
pub(super) struct Waiting {
    entries: Mutex<VecDeque<Entry>>,
    /// Told when a waiting delivery was taken: there is room for another.
    pub(super) taken: Notify,
}

/// A run to publish again for other workers, and where to say how that went.
pub(super) type Copy = (Uuid, Arc<CopyState>);

impl Waiting {
    fn entries(&self) -> MutexGuard<'_, VecDeque<Entry>> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn len(&self) -> usize {
        self.entries().len()
    }

    pub(super) fn push(&self, delivery: Delivery) {
        self.entries().push_back(Entry {
            came: Instant::now(),
            copy: Arc::new(CopyState(AtomicU8::new(NOT_YET))),
            delivery,
        });
    }

    /// The oldest delivery, for a slot.
    pub(super) fn take(&self) -> Option<Delivery> {
        let taken = self.entries().pop_front();
        if taken.is_some() {
            self.taken.notify_one();
        }
        taken.map(|entry| entry.delivery)
    }

    /// Every delivery (the worker stops, or its consumer ended).
    pub(super) fn take_all(&self) -> Vec<Delivery> {
        let taken: Vec<Delivery> = self.entries().drain(..).map(|e| e.delivery).collect();
        if !taken.is_empty() {
            self.taken.notify_one();
        }
        taken
    }

    /// Lets the deliveries go without a word: they return to the queue with the channel they
    /// came on (the connection was lost).
    pub(super) fn forget(&self) {
        self.entries().clear();
    }

    /// The runs of deliveries that have waited `COPY_AFTER` and are not published again yet
    /// (or whose copy failed); and the deliveries that name no run (the original's bare
    /// messages, unusable ones), taken out of the list: they need no slot.
    pub(super) fn to_copy(&self) -> (Vec<Copy>, Vec<Delivery>) {
        let mut entries = self.entries();
        let mut copies = Vec::new();
        let mut others = Vec::new();
        let mut kept = VecDeque::with_capacity(entries.len());
        for entry in entries.drain(..) {
            let due =
                entry.came.elapsed() >= COPY_AFTER && matches!(entry.copy.get(), NOT_YET | FAILED);
            if !due {
                kept.push_back(entry);
                continue;
            }
            match JobMessage::parse(&entry.delivery.data)
                .ok()
                .and_then(|message| message.run_id)
            {
                Some(run) => {
                    entry.copy.0.store(UNDER_WAY, Ordering::SeqCst);
                    copies.push((run, entry.copy.clone()));
                    kept.push_back(entry);
                }
                None => others.push(entry.delivery),
            }
        }
        *entries = kept;
        drop(entries);
        if !others.is_empty() {
            self.taken.notify_one();
        }
        (copies, others)
    }

    /// The deliveries that have waited `LET_GO_AFTER` and whose run is out again.
    pub(super) fn to_let_go(&self) -> Vec<Delivery> {
        let mut entries = self.entries();
        let mut gone = Vec::new();
        let mut kept = VecDeque::with_capacity(entries.len());
        for entry in entries.drain(..) {
            if entry.came.elapsed() >= LET_GO_AFTER && entry.copy.get() == OUT {
                gone.push(entry.delivery);
            } else {
                kept.push_back(entry);
            }
        }
        *entries = kept;
        drop(entries);
        if !gone.is_empty() {
            self.taken.notify_one();
        }
        gone
    }
}
