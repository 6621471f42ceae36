//! Writing claims and results of many concurrent runs in batches (one statement for many runs),
//! retrying while the database is away, and counting results on their way to it.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

use crate::store::{Claim, Finish, RunEnd, Store, StoreError};

/// Most requests written in one statement.
const BATCH_MAX: usize = 512;
/// From this many results and claims in one batch on, they are written as two at once (the
/// results, the claims) instead of together: one commit is cheaper when batches are small (a
/// burst on a few slots: a round of up to 31 slots, their results and next claims, is one
/// statement), two use more of the database's cores when they are large
/// (PERFORMANCE.md).
const SPLIT_AT: usize = 64;
/// The longest a batch waits for the results of the jobs the batch before it started.
const LINGER_MAX: Duration = Duration::from_millis(2);

/// What the writer knows of a request beyond its batch: short jobs that a batch's claims
/// start end soon, and the batch after it waits a little for their results (`Batcher`).
pub(super) trait Chained {
    /// The run whose job this request starts, once its batch is written (a claim).
    fn starts(&self) -> Option<Uuid>;
    /// The run whose end this request records (a result).
    fn ends(&self) -> Option<Uuid>;
}

/// Whether an answer lets its request's job start (a claim granted): a claim refused or
/// skipped (a duplicate, a finished run) starts nothing, and nothing waits for it.
pub(super) trait Answer {
    fn starts_job(&self) -> bool;
}

/// Collects requests from many tasks and serves them in batches; each caller gets its own
/// answer. The batch function retries until the database answers: state changes are never
/// dropped.
///
/// One batch of a kind at a time: the requests that arrive while it is written make the next
/// one. Fewer, larger statements cost the database less CPU per run than several small ones in
/// parallel, and on a machine where the database, the broker and the workers share the cores,
/// that CPU is what runs wait for (PERFORMANCE.md).
///
/// A batch that has requests waits for the results of the jobs the batch before it started,
/// as long as that batch took to write and `LINGER_MAX` at most (tokio's timer counts whole
/// milliseconds: up to about a millisecond more), and no longer once all of them are in.
/// Short jobs then go round together: in a burst, a slot's result and the next claim it
/// passes on share one commit with every other slot's, one batch a round, where slots that
/// fell out of step (one job ended while a batch was written) made two or more batches a
/// round, each waiting for the one before it. A long job costs the batch after its claim that
/// wait. A writer with nothing to write does not wait.
pub(super) struct Batcher<Req, Resp> {
    /// Requests handed over together travel together: they land in the same batch.
    sender: mpsc::Sender<Vec<(Req, oneshot::Sender<Resp>)>>,
}

impl<Req: Chained + Send + 'static, Resp: Answer + Send + 'static> Batcher<Req, Resp> {
    pub(super) fn spawn<F, Fut>(serve: F) -> Self
    where
        F: Fn(Vec<Req>) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = Vec<Resp>> + Send + 'static,
    {
        let (sender, mut receiver) =
            mpsc::channel::<Vec<(Req, oneshot::Sender<Resp>)>>(BATCH_MAX * 4);
        tokio::spawn(async move {
            // The runs whose jobs the last batch started, and how long it took to write.
            let mut started = HashSet::<Uuid>::new();
            let mut took = Duration::ZERO;
            while let Some(mut requests) = receiver.recv().await {
                let deadline = tokio::time::Instant::now() + took.min(LINGER_MAX);
                ended(&mut started, &requests);
                while requests.len() < BATCH_MAX {
                    let next = match receiver.try_recv() {
                        Ok(next) => next,
                        Err(_) if started.is_empty() => break,
                        Err(_) => match tokio::time::timeout_at(deadline, receiver.recv()).await {
                            Ok(Some(next)) => next,
                            _ => break,
                        },
                    };
                    ended(&mut started, &next);
                    requests.extend(next);
                }
                let starts: Vec<Option<Uuid>> = requests.iter().map(|(r, _)| r.starts()).collect();
                let (inputs, replies): (Vec<Req>, Vec<oneshot::Sender<Resp>>) =
                    requests.into_iter().unzip();
                let began = tokio::time::Instant::now();
                // A task of its own: a batch that panics loses its answers (its callers see
                // the batcher gone), not the batcher.
                let served = tokio::spawn(serve(inputs)).await;
                took = began.elapsed();
                started.clear();
                match served {
                    Ok(answers) => {
                        for ((reply, answer), run) in replies.into_iter().zip(answers).zip(starts) {
                            if let Some(run) = run.filter(|_| answer.starts_job()) {
                                started.insert(run);
                            }
                            let _ = reply.send(answer);
                        }
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "a batch failed; its requests get no answer")
                    }
                }
            }
        });
        Batcher { sender }
    }

    pub(super) async fn call(&self, request: Req) -> Option<Resp> {
        self.enqueue(request).await?.await.ok()
    }

    /// Hands `request` over; once this returns, the request is the batcher's (it is served
    /// even if the caller goes away), and the receiver gets its answer.
    pub(super) async fn enqueue(&self, request: Req) -> Option<oneshot::Receiver<Resp>> {
        let mut answers = self.enqueue_together(vec![request]).await?;
        answers.pop()
    }

    /// `enqueue` for several requests that are served in the same batch; their receivers in
    /// the same order.
    pub(super) async fn enqueue_together(
        &self,
        requests: Vec<Req>,
    ) -> Option<Vec<oneshot::Receiver<Resp>>> {
        let (items, answers): (Vec<_>, Vec<_>) = requests
            .into_iter()
            .map(|request| {
                let (reply, answer) = oneshot::channel();
                ((request, reply), answer)
            })
            .unzip();
        self.sender.send(items).await.ok()?;
        Some(answers)
    }
}

/// Forgets the runs whose results are among `requests`.
fn ended<Req: Chained, Reply>(started: &mut HashSet<Uuid>, requests: &[(Req, Reply)]) {
    for (request, _) in requests {
        if let Some(run) = request.ends() {
            started.remove(&run);
        }
    }
}

/// Retries a database write with backoff while the failure is transient (connection lost,
/// server restarting); a permanent failure (bad data) is returned.
pub(super) async fn until_ok<T, F, Fut>(what: &'static str, attempt: F) -> Result<T, StoreError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, StoreError>>,
{
    retrying(what, StoreError::is_transient, attempt).await
}

/// `until_ok`, retrying the failures `retry` picks.
async fn retrying<T, F, Fut>(
    what: &'static str,
    retry: impl Fn(&StoreError) -> bool,
    mut attempt: F,
) -> Result<T, StoreError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, StoreError>>,
{
    let mut backoff = Duration::from_millis(100);
    loop {
        match attempt().await {
            Ok(value) => return Ok(value),
            Err(e) if retry(&e) => {
                tracing::warn!(error = %e, "{what} failed; retrying in {backoff:?}");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
            Err(e) => return Err(e),
        }
    }
}

/// A write a delivery hands to its worker's writer: the claim before its job, the result
/// after it.
pub(super) enum Write {
    /// The run, and whether its delivery is a re-delivery.
    Claim(Uuid, bool),
    /// The result, counted until it is committed.
    Finish(Finish, Recording),
}

impl Chained for Write {
    fn starts(&self) -> Option<Uuid> {
        match self {
            Write::Claim(run, _) => Some(*run),
            Write::Finish(..) => None,
        }
    }

    fn ends(&self) -> Option<Uuid> {
        match self {
            Write::Claim(..) => None,
            Write::Finish(finish, _) => Some(finish.id),
        }
    }
}

impl Answer for Written {
    fn starts_job(&self) -> bool {
        matches!(self, Written::Claim(Claim::Claimed { .. }))
    }
}

/// The answer to a `Write`, of the same kind.
pub(super) enum Written {
    Claim(Claim),
    /// Whether the delivery may be settled.
    Finish(bool),
}

/// Who claims: this worker, under its lease.
#[derive(Clone)]
pub(super) struct Claimer {
    pub(super) store: Store,
    pub(super) worker: String,
    pub(super) token: i32,
    /// Whether this worker's session holds its lease.
    pub(super) held: tokio::sync::watch::Receiver<bool>,
}

/// Writes one batch of claims and results. When there are a few of both, the results and the
/// claims are written together (`Store::finish_and_claim_runs`, on Postgres one statement): a
/// slot's result and the next run's claim (of the same slot or another) cost one commit, not
/// two. Should that fail for good, each kind is written on its own, with its own fallbacks.
/// Many of both (`SPLIT_AT`) are written as two at once, results and claims. Claims wait for
/// locked rows only so long (see `together`).
pub(super) async fn write_batch(claimer: &Claimer, batch: Vec<Write>) -> Vec<Written> {
    let mut claims = Vec::new();
    let mut finishes = Vec::new();
    let mut recording = Vec::new();
    let kinds: Vec<bool> = batch
        .into_iter()
        .map(|write| match write {
            Write::Claim(id, redelivered) => {
                claims.push((id, redelivered));
                true
            }
            Write::Finish(finish, counted) => {
                finishes.push(finish);
                recording.push(counted);
                false
            }
        })
        .collect();
    // Fenced: while the lease is lost, a sweeper may hand this worker's runs to others, so
    // nothing new is claimed until it is held again (the claim statement checks it too).
    // Results are written all the same.
    let held = *claimer.held.borrow();
    let (settled, claimed) = if !held {
        let settled = record_batch(&claimer.store, &finishes).await;
        (settled, vec![Claim::Unavailable; claims.len()])
    } else if finishes.len() + claims.len() >= SPLIT_AT
        && !finishes.is_empty()
        && !claims.is_empty()
    {
        // Many of both: two transactions at once, as the database has more than one core.
        let ((settled, _), (_, claimed)) = tokio::join!(
            together(claimer, &finishes, &[]),
            together(claimer, &[], &claims)
        );
        (settled, claimed)
    } else {
        together(claimer, &finishes, &claims).await
    };
    // The guards go when the results are committed, not before.
    drop(recording);
    let (mut settled, mut claimed) = (settled.into_iter(), claimed.into_iter());
    kinds
        .into_iter()
        .map(|claim| {
            if claim {
                Written::Claim(claimed.next().unwrap_or(Claim::Unavailable))
            } else {
                Written::Finish(settled.next().unwrap_or(false))
            }
        })
        .collect()
}

/// Results and claims with one commit (either may be empty); per result whether its delivery
/// may be settled, per claim its answer.
///
/// A claim never holds results back for long: should a run being claimed be held by another
/// transaction (an outbox pass waiting for its confirms) longer than the claims may wait, the
/// results are written alone and the claims answered `Unavailable`, which their callers try
/// again shortly.
async fn together(
    claimer: &Claimer,
    finishes: &[Finish],
    claims: &[(Uuid, bool)],
) -> (Vec<bool>, Vec<Claim>) {
    // One nonce per statement: a retry after a lost reply recognizes its own claims.
    let nonce = Uuid::new_v4();
    let written = retrying(
        "recording and claiming runs",
        |e| e.is_transient() && !e.is_lock_timeout(),
        || {
            claimer.store.finish_and_claim_runs(
                finishes,
                &claimer.worker,
                claimer.token,
                nonce,
                claims,
            )
        },
    )
    .await;
    match written {
        Ok(written) => {
            log_not_recorded(finishes, &written.not_recorded);
            // The claims are committed whatever becomes of the results left: those go the
            // way of results written alone, with its fallbacks.
            let left: HashMap<Uuid, bool> = written
                .left
                .iter()
                .map(|f| f.id)
                .zip(record_batch(&claimer.store, &written.left).await)
                .collect();
            let settled = finishes
                .iter()
                .map(|f| left.get(&f.id).copied().unwrap_or(true))
                .collect();
            (settled, written.claims)
        }
        Err(e) if e.is_lock_timeout() => {
            tracing::debug!(claims = claims.len(), results = finishes.len(), "a row is held by another transaction (an outbox pass waiting for its confirms, a cancel); writing the results alone and claiming again shortly");
            (
                record_batch(&claimer.store, finishes).await,
                vec![Claim::Unavailable; claims.len()],
            )
        }
        Err(e) => {
            tracing::error!(error = %e, runs = finishes.len() + claims.len(), "recording and claiming runs together failed; writing them apart");
            (
                record_batch(&claimer.store, finishes).await,
                claim_batch(claimer, nonce, claims).await,
            )
        }
    }
}

/// Claims delivered runs; one answer per run. A batch that fails for good is claimed run by
/// run, so that one run's problem does not refuse the others. Every try says `nonce`, the
/// nonce of the write these claims were first part of: a run an earlier try claimed (its reply
/// lost) is found as this worker's claim, not skipped as another's.
async fn claim_batch(claimer: &Claimer, nonce: Uuid, batch: &[(Uuid, bool)]) -> Vec<Claim> {
    let Claimer {
        store,
        worker,
        token,
        ..
    } = claimer;
    match until_ok("claiming runs", || {
        store.claim_runs(worker, *token, nonce, batch)
    })
    .await
    {
        Ok(claims) => claims,
        Err(e) if batch.len() == 1 => {
            tracing::error!(error = %e, "claiming a run failed");
            vec![Claim::Refused(e.to_string())]
        }
        Err(e) => {
            tracing::error!(error = %e, runs = batch.len(), "claiming a batch failed; claiming its runs one by one");
            let mut answers = Vec::with_capacity(batch.len());
            let mut seen = std::collections::HashSet::new();
            for one in batch.chunks(1) {
                // The same run twice: the first claims it, the second is a duplicate (the
                // nonce would find the first's claim as its own).
                if !seen.insert(one[0].0) {
                    answers.push(Claim::Running);
                    continue;
                }
                let claimed = until_ok("claiming a run", || {
                    store.claim_runs(worker, *token, nonce, one)
                })
                .await;
                answers.push(match claimed {
                    Ok(mut claims) => claims.pop().unwrap_or(Claim::Unavailable),
                    Err(e) => Claim::Refused(e.to_string()),
                });
            }
            answers
        }
    }
}

/// Records finished runs; returns, per run, whether its delivery may be acknowledged. A batch
/// that fails for good is recorded run by run, and a run whose result cannot be stored is
/// recorded failed with the reason, so a worker never stalls on one. A run that cannot be
/// recorded at all is not acknowledged: its delivery returns to the queue. A result that
/// arrives for a run taken over meanwhile is logged.
async fn record_batch(store: &Store, batch: &[Finish]) -> Vec<bool> {
    if batch.is_empty() {
        return Vec::new();
    }
    match until_ok("recording runs", || store.finish_runs(batch)).await {
        Ok(not_recorded) => {
            log_not_recorded(batch, &not_recorded);
            return vec![true; batch.len()];
        }
        Err(e) => {
            tracing::error!(error = %e, runs = batch.len(), "recording a batch failed; recording its runs one by one")
        }
    }
    let mut settled = Vec::with_capacity(batch.len());
    for finish in batch {
        let one = std::slice::from_ref(finish);
        let e = match until_ok("recording a run", || store.finish_runs(one)).await {
            Ok(not_recorded) => {
                log_not_recorded(one, &not_recorded);
                settled.push(true);
                continue;
            }
            Err(e) => e,
        };
        let fallback = Finish {
            error: Some(format!("the run's result could not be recorded: {e}")),
            result: None,
            end: RunEnd::Failed,
            ..finish.clone()
        };
        match until_ok("recording a run", || {
            store.finish_runs(std::slice::from_ref(&fallback))
        })
        .await
        {
            Ok(_) => settled.push(true),
            Err(e) => {
                tracing::error!(run = %finish.id, error = %e, "the run cannot be recorded at all; its delivery is not acknowledged");
                settled.push(false);
            }
        }
    }
    settled
}

fn log_not_recorded(batch: &[Finish], not_recorded: &[Uuid]) {
    for finish in batch.iter().filter(|f| not_recorded.contains(&f.id)) {
        tracing::warn!(run = %finish.id, attempt = finish.attempt, "a late result was not recorded: the run was taken over by another worker (or interrupted) meanwhile");
    }
}

/// Counts a result on its way to the database. It travels with the result into the recorder
/// and is dropped once the batch holding it was written.
pub(super) struct Recording(Arc<AtomicUsize>);

impl Recording {
    pub(super) fn new(counter: &Arc<AtomicUsize>) -> Recording {
        counter.fetch_add(1, Ordering::SeqCst);
        Recording(counter.clone())
    }
}

impl Drop for Recording {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    impl Chained for usize {
        fn starts(&self) -> Option<Uuid> {
            None
        }

        fn ends(&self) -> Option<Uuid> {
            None
        }
    }

    impl Answer for usize {
        fn starts_job(&self) -> bool {
            false
        }
    }

    /// A claim, a result, or something else, of run `n`. The claims of runs from 100 on are
    /// refused: they are answered `Other`.
    #[derive(Clone, Copy, Debug, PartialEq)]
    enum Step {
        Claim(u128),
        End(u128),
        Other(u128),
    }

    impl Chained for Step {
        fn starts(&self) -> Option<Uuid> {
            match self {
                Step::Claim(n) => Some(Uuid::from_u128(*n)),
                _ => None,
            }
        }

        fn ends(&self) -> Option<Uuid> {
            match self {
                Step::End(n) => Some(Uuid::from_u128(*n)),
                _ => None,
            }
        }
    }

    impl Answer for Step {
        fn starts_job(&self) -> bool {
            matches!(self, Step::Claim(_))
        }
    }

    /// The batches a batcher wrote, in order.
    type Batches = Arc<std::sync::Mutex<Vec<Vec<Step>>>>;

    /// A batcher whose batches take `took(batch)` to write; the batches it wrote.
    fn recording(took: fn(&[Step]) -> Duration) -> (Batcher<Step, Step>, Batches) {
        let batches = Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = batches.clone();
        let batcher = Batcher::spawn(move |batch: Vec<Step>| {
            let seen = seen.clone();
            async move {
                tokio::time::sleep(took(&batch)).await;
                seen.lock().unwrap().push(batch.clone());
                batch
                    .into_iter()
                    .map(|step| match step {
                        Step::Claim(n) if n >= 100 => Step::Other(n),
                        step => step,
                    })
                    .collect()
            }
        });
        (batcher, batches)
    }

    /// Hands `steps` over together; how long until all of them were written.
    async fn written(batcher: &Batcher<Step, Step>, steps: Vec<Step>) -> Duration {
        let began = tokio::time::Instant::now();
        for answer in batcher.enqueue_together(steps).await.unwrap() {
            answer.await.unwrap();
        }
        began.elapsed()
    }

    const MS: Duration = Duration::from_millis(1);

    #[tokio::test(start_paused = true)]
    async fn a_batch_waits_for_the_results_of_the_jobs_the_batch_before_it_started() {
        let (batcher, batches) = recording(|batch| {
            if batch.contains(&Step::Claim(1)) {
                2 * MS
            } else {
                Duration::ZERO
            }
        });
        written(&batcher, vec![Step::Claim(1), Step::Claim(2)]).await;
        // Run 1's job ended at once, run 2's a millisecond later, while a batch that did not
        // wait would be written already; run 2's slot passes its next claim on with its result.
        let began = tokio::time::Instant::now();
        let first = batcher.enqueue(Step::End(1)).await.unwrap();
        tokio::time::sleep(MS).await;
        let rest = batcher
            .enqueue_together(vec![Step::End(2), Step::Claim(3)])
            .await
            .unwrap();
        first.await.unwrap();
        for answer in rest {
            answer.await.unwrap();
        }
        assert_eq!(
            batches.lock().unwrap()[1..],
            [vec![Step::End(1), Step::End(2), Step::Claim(3)]],
            "one round, one batch"
        );
        assert_eq!(
            began.elapsed(),
            MS,
            "written as soon as the last result came, not at the end of the wait"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_batch_waits_at_most_as_long_as_the_one_before_it_took_and_never_long() {
        let (batcher, _) = recording(|batch| match batch {
            [Step::Claim(1)] => 10 * MS,
            [Step::Other(7)] => MS,
            _ => Duration::ZERO,
        });
        // The claim's batch took 10 ms; its job does not end (a long one): the next batch
        // waits LINGER_MAX, then takes its own 1 ms to write.
        written(&batcher, vec![Step::Claim(1)]).await;
        assert_eq!(
            written(&batcher, vec![Step::Other(7)]).await,
            LINGER_MAX + MS,
            "waited for run 1's result, LINGER_MAX at most"
        );
        // That batch started no job: the next one is written at once.
        assert_eq!(
            written(&batcher, vec![Step::Other(8)]).await,
            Duration::ZERO,
            "waited for nothing"
        );

        // A claim's batch that took 1 ms makes the next one wait 1 ms at most.
        let (batcher, _) = recording(|batch| match batch {
            [Step::Claim(1)] => MS,
            _ => Duration::ZERO,
        });
        written(&batcher, vec![Step::Claim(1)]).await;
        assert_eq!(written(&batcher, vec![Step::Other(7)]).await, MS);
    }

    #[tokio::test(start_paused = true)]
    async fn a_claim_that_starts_no_job_is_not_waited_for() {
        let (batcher, batches) = recording(|batch| match batch {
            [Step::Claim(_)] => 10 * MS,
            _ => Duration::ZERO,
        });
        // Refused (a duplicate delivery, a finished run): no result will come.
        written(&batcher, vec![Step::Claim(100)]).await;
        assert_eq!(
            written(&batcher, vec![Step::Other(7)]).await,
            Duration::ZERO
        );
        assert_eq!(batches.lock().unwrap().len(), 2);
    }

    #[test]
    fn writes_say_which_runs_they_start_and_end() {
        let run = Uuid::from_u128(5);
        let claim = Write::Claim(run, false);
        assert_eq!((claim.starts(), claim.ends()), (Some(run), None));
        let finish = Finish {
            id: run,
            token: 1,
            attempt: 1,
            end: RunEnd::Succeeded,
            result: None,
            error: None,
        };
        let result = Write::Finish(finish, Recording::new(&Arc::new(AtomicUsize::new(0))));
        assert_eq!((result.starts(), result.ends()), (None, Some(run)));
        let granted = Written::Claim(Claim::Claimed {
            attempt: 1,
            trigger: "schedule".into(),
            run: crate::store::ClaimedRun {
                scheduled_for: None,
                parent: None,
                timezone: None,
            },
        });
        assert!(granted.starts_job());
        assert!(!Written::Claim(Claim::Running).starts_job());
        assert!(!Written::Claim(Claim::Finished("succeeded".into())).starts_job());
        assert!(!Written::Finish(true).starts_job());
    }

    #[tokio::test]
    async fn requests_handed_over_together_are_served_in_one_batch() {
        let (open, gate) = tokio::sync::watch::channel(false);
        let (started, mut first_started) = mpsc::unbounded_channel::<()>();
        let batches = Arc::new(std::sync::Mutex::new(Vec::<Vec<usize>>::new()));
        let seen = batches.clone();
        let batcher = Batcher::spawn(move |batch: Vec<usize>| {
            let (seen, mut gate, started) = (seen.clone(), gate.clone(), started.clone());
            async move {
                if batch == [0] {
                    // Everything else queues up behind this batch until the gate opens.
                    let _ = started.send(());
                    let _ = gate.wait_for(|open| *open).await;
                }
                seen.lock().unwrap().push(batch.clone());
                batch
            }
        });
        let mut answers = vec![batcher.enqueue(0).await.unwrap()];
        first_started.recv().await.unwrap();
        // One short of a full batch, then a pair: a batch boundary falls between the two
        // unless they travel together.
        for request in 1..BATCH_MAX {
            answers.push(batcher.enqueue(request).await.unwrap());
        }
        answers.extend(
            batcher
                .enqueue_together(vec![BATCH_MAX, BATCH_MAX + 1])
                .await
                .unwrap(),
        );
        open.send(true).unwrap();
        for (request, answer) in answers.into_iter().enumerate() {
            assert_eq!(
                answer.await.unwrap(),
                request,
                "each caller gets its own answer"
            );
        }
        let batches = batches.lock().unwrap();
        let with_pair = batches
            .iter()
            .find(|batch| batch.contains(&BATCH_MAX))
            .unwrap();
        assert!(
            with_pair.contains(&(BATCH_MAX + 1)),
            "the pair was split: batches of {:?}",
            batches.iter().map(Vec::len).collect::<Vec<_>>()
        );
    }
}
