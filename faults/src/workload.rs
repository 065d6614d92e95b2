//! The workload: clients that drive the cluster through the public gRPC API and record every
//! operation in the [`Recorder`].
//!
//! - unary producers (`u0`, `u1`, ...): one append at a time, each with its producer id and
//!   a new sequence; the client retries an append whose outcome is unknown with the same
//!   sequence and the server deduplicates;
//! - a raw producer (`x`, [`crate::raw`]) that retries an unknown outcome with the same
//!   sequence until it gets a definite answer;
//! - a pipelined producer (`a`): an [`raftwal_client::Appender`] with a window of appends in
//!   flight, batches of one to three records;
//! - an expected-offset producer (`e`): appends only at the offset it expects, learning the
//!   real next offset from each mismatch;
//! - linearizable readers (`r0`, ...) reading from just below the highest acknowledged offset;
//! - followers (`f0`, ...) following from offset 1 and reopening where they stood after an
//!   error.
//!
//! Each producer paces itself so that the log grows by a bounded rate (the data directories
//! may be small tmpfs mounts).

use std::sync::Arc;
use std::time::Duration;

use raftwal_client::{
    AppendOptions, Appended, Appender, AppenderConfig, Client, ClientConfig, ClientError,
    FollowEvent, Offset,
};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_stream::StreamExt as _;

use crate::history::{AppendOutcome, FollowLog, ReadOp, Recorder, record_bytes, record_id};
use crate::raw::{channels, raw_producer};

/// How the workload is shaped.
#[derive(Clone, Copy, Debug)]
pub struct Shape {
    pub producers: u32,
    pub readers: u32,
    pub followers: u32,
    pub record_bytes: usize,
    /// The pause after each unary append.
    pub producer_pause: Duration,
    /// The pause after each pipelined send.
    pub appender_pause: Duration,
}

/// How far a linearizable read starts below the highest acknowledged offset.
const READ_BACK_OFFSETS: u64 = 200;
const READ_RECORDS_MAX: u32 = 1000;

/// The running workload: stop it with [`Workload::stop`].
#[derive(Debug)]
pub struct Workload {
    stop: watch::Sender<bool>,
    tasks: JoinSet<()>,
}

impl Workload {
    pub fn start(
        client: &Client,
        config: &ClientConfig,
        shape: Shape,
        rec: Arc<Recorder>,
    ) -> anyhow::Result<Workload> {
        let (stop, stop_rx) = watch::channel(false);
        let mut tasks = JoinSet::new();
        let producer_id = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
            ^ u64::from(std::process::id()) << 32;
        tasks.spawn(raw_producer(
            channels(config)?,
            producer_id.max(1),
            shape.record_bytes,
            shape.producer_pause,
            rec.clone(),
            stop_rx.clone(),
        ));
        for p in 0..shape.producers {
            tasks.spawn(unary_producer(
                client.new_producer(),
                format!("u{p}"),
                shape,
                rec.clone(),
                stop_rx.clone(),
            ));
        }
        let appender = client.appender(AppenderConfig { window: 16 })?;
        tasks.spawn(pipelined_producer(appender, shape, rec.clone(), stop_rx.clone()));
        tasks.spawn(expecting_producer(client.new_producer(), shape, rec.clone(), stop_rx.clone()));
        for r in 0..shape.readers {
            tasks.spawn(reader(client.clone(), format!("r{r}"), rec.clone(), stop_rx.clone()));
        }
        for f in 0..shape.followers {
            tasks.spawn(follower(client.clone(), format!("f{f}"), rec.clone(), stop_rx.clone()));
        }
        Ok(Workload { stop, tasks })
    }

    /// Stops every client; waits up to `grace` for operations in flight to complete (those
    /// that do not stay unknown in the history).
    pub async fn stop(mut self, grace: Duration) -> bool {
        let _ = self.stop.send(true);
        let drained =
            tokio::time::timeout(grace, async { while self.tasks.join_next().await.is_some() {} })
                .await
                .is_ok();
        self.tasks.abort_all();
        drained
    }
}

fn outcome(result: &Result<Appended, ClientError>) -> AppendOutcome {
    match result {
        Ok(a) => AppendOutcome::Acked {
            first: a.first_offset.get(),
            last: a.last_offset.get(),
            duplicate: a.duplicate,
        },
        // The client's contract: these took no effect.
        Err(
            e @ (ClientError::Unavailable { .. }
            | ClientError::OffsetMismatch { .. }
            | ClientError::Overloaded { .. }
            | ClientError::InvalidArgument { .. }
            | ClientError::TooLarge { .. }),
        ) => AppendOutcome::Failed { error: e.to_string() },
        Err(e) => AppendOutcome::Unknown { error: e.to_string() },
    }
}

fn stopped(stop: &watch::Receiver<bool>) -> bool {
    *stop.borrow()
}

async fn pause(stop: &mut watch::Receiver<bool>, d: Duration) {
    tokio::select! {
        _ = stop.changed() => {}
        () = tokio::time::sleep(d) => {}
    }
}

async fn unary_producer(
    client: Client,
    name: String,
    shape: Shape,
    rec: Arc<Recorder>,
    mut stop: watch::Receiver<bool>,
) {
    let mut n = 0u64;
    while !stopped(&stop) {
        let id = format!("{name}-{n}");
        n += 1;
        let index = rec.invoke_append(&name, vec![id.clone()], None);
        let result = client.append([record_bytes(&id, shape.record_bytes)]).await;
        let failed = result.is_err();
        rec.complete_append(index, outcome(&result));
        let wait = if failed { Duration::from_millis(100) } else { shape.producer_pause };
        pause(&mut stop, wait).await;
    }
}

async fn pipelined_producer(
    appender: Appender,
    shape: Shape,
    rec: Arc<Recorder>,
    mut stop: watch::Receiver<bool>,
) {
    let mut answers = JoinSet::new();
    let mut n = 0u64;
    while !stopped(&stop) {
        let count = 1 + (n % 3) as usize;
        let ids: Vec<String> = (0..count).map(|i| format!("a-{n}-{i}")).collect();
        n += 1;
        let records: Vec<Vec<u8>> =
            ids.iter().map(|id| record_bytes(id, shape.record_bytes)).collect();
        let index = rec.invoke_append("a", ids, None);
        match appender.send(records).await {
            Ok(ticket) => {
                let rec = rec.clone();
                answers.spawn(async move {
                    let result = ticket.await;
                    rec.complete_append(index, outcome(&result));
                });
            }
            Err(e) => {
                rec.complete_append(index, outcome(&Err(e)));
                pause(&mut stop, Duration::from_millis(100)).await;
            }
        }
        while answers.try_join_next().is_some() {}
        pause(&mut stop, shape.appender_pause).await;
    }
    let _ = appender.close().await;
    while answers.join_next().await.is_some() {}
}

async fn expecting_producer(
    client: Client,
    shape: Shape,
    rec: Arc<Recorder>,
    mut stop: watch::Receiver<bool>,
) {
    let mut expect = 1u64;
    let mut n = 0u64;
    while !stopped(&stop) {
        let id = format!("e-{n}");
        n += 1;
        let index = rec.invoke_append("e", vec![id.clone()], Some(expect));
        let options = AppendOptions { expected_next_offset: Some(Offset(expect)) };
        let result = client.append_with([record_bytes(&id, shape.record_bytes)], options).await;
        match &result {
            Ok(a) => expect = a.last_offset.get() + 1,
            Err(ClientError::OffsetMismatch { next_offset }) => expect = next_offset.get(),
            Err(_) => {}
        }
        let mismatch = matches!(result, Err(ClientError::OffsetMismatch { .. }));
        rec.complete_append(index, outcome(&result));
        // After a mismatch, try again at once at the offset the server named: under the other
        // producers' load any pause makes it stale.
        let wait = match &result {
            Ok(_) => shape.producer_pause,
            Err(_) if mismatch => Duration::ZERO,
            Err(_) => Duration::from_millis(100),
        };
        pause(&mut stop, wait).await;
    }
}

async fn reader(client: Client, name: String, rec: Arc<Recorder>, mut stop: watch::Receiver<bool>) {
    while !stopped(&stop) {
        let from = rec.acked_high().saturating_sub(READ_BACK_OFFSETS).max(1);
        let invoke_us = rec.now_us();
        let result = client.read_linearizable(Offset(from), READ_RECORDS_MAX, 0).await;
        let complete_us = rec.now_us();
        let (records, next_offset, error) = match result {
            Ok(batch) => (
                Some(batch.records.iter().map(|r| (r.offset.get(), record_id(&r.data))).collect()),
                batch.next_offset.get(),
                None,
            ),
            Err(e) => (None, 0, Some(e.to_string())),
        };
        let failed = error.is_some();
        rec.read(ReadOp {
            process: name.clone(),
            linearizable: true,
            from,
            records_max: READ_RECORDS_MAX,
            invoke_us,
            complete_us,
            records,
            next_offset,
            error,
        });
        pause(&mut stop, Duration::from_millis(if failed { 200 } else { 50 })).await;
    }
}

async fn follower(
    client: Client,
    name: String,
    rec: Arc<Recorder>,
    mut stop: watch::Receiver<bool>,
) {
    let mut log = FollowLog { process: name, from: 1, ..FollowLog::default() };
    let mut follow = client.follow(Offset(1));
    loop {
        let event = tokio::select! {
            _ = stop.changed() => break,
            e = follow.next() => e,
        };
        match event {
            Some(Ok(FollowEvent::Records(records))) => {
                log.records.extend(records.iter().map(|r| (r.offset.get(), record_id(&r.data))));
            }
            Some(Ok(FollowEvent::CaughtUp { .. })) => {}
            Some(Err(_)) | None => {
                // Reopen where it stood: one logical stream across reconnections.
                log.reopened += 1;
                let next = follow.next_offset();
                pause(&mut stop, Duration::from_millis(200)).await;
                follow = client.follow(next);
            }
        }
        if stopped(&stop) {
            break;
        }
    }
    rec.follow(log);
}
