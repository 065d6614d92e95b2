//! An in-process fake raftwal node for the client's tests: the real generated gRPC services on
//! 127.0.0.1:0, a log shared by the nodes of one fake cluster, and scripted faults.
//!
//! The fake applies the producer rule with the real server's own code
//! (`raftwal_client::dedup`): a remembered sequence is a duplicate with its original offsets, a
//! sequence below the latest applied one otherwise is refused (out of order, or stale).

#![allow(dead_code)]

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use raftwal_client::proto::admin_server::{Admin, AdminServer};
use raftwal_client::proto::log_server::{Log, LogServer};
use raftwal_client::proto::{self, follow_response::Event};
use raftwal_client::{
    ClientConfig, TRAILER_FIRST_OFFSET, TRAILER_LEADER_ADDR, TRAILER_NEXT_OFFSET,
};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};
use tonic::{Code, Request, Response, Status, Streaming};

/// A client configuration for tests: fast backoff, a generous request timeout.
pub fn config<S: AsRef<str>>(endpoints: &[S]) -> ClientConfig {
    let mut config = ClientConfig::new(endpoints.iter().map(|e| e.as_ref().to_owned()));
    config.retry_backoff_min = Duration::from_millis(1);
    config.retry_backoff_max = Duration::from_millis(20);
    config.request_timeout = Duration::from_secs(10);
    config.connect_timeout = Duration::from_secs(5);
    config
}

/// A URL on which nothing listens: a port bound and released.
pub fn refused_url() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a probe port");
    let addr = listener.local_addr().expect("a bound address");
    drop(listener);
    format!("http://{addr}")
}

/// One append attempt as a node saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Seen {
    pub node: String,
    pub producer: Option<(u64, u64)>,
    pub request_id: u64,
    pub records: Vec<Vec<u8>>,
}

/// The committed log of a fake cluster.
#[derive(Debug)]
pub struct FakeLog {
    /// Records in offset order.
    pub records: Vec<proto::Record>,
    pub first_offset: u64,
    pub next_offset: u64,
    producers: HashMap<u64, raftwal_client::dedup::ProducerWindow>,
    pub seen: Vec<Seen>,
    committed: watch::Sender<u64>,
}

pub type SharedLog = Arc<Mutex<FakeLog>>;

pub fn lock(log: &SharedLog) -> MutexGuard<'_, FakeLog> {
    log.lock().expect("no test panicked while holding the fake log")
}

impl FakeLog {
    /// An empty log whose first offset is 1.
    pub fn new() -> SharedLog {
        FakeLog::with_history(0, 0)
    }

    /// A log of `count` records "r{i}"; after every `gap_every`-th record (if not 0) two
    /// offsets are taken by internal entries, so offsets skip.
    pub fn with_history(count: u64, gap_every: u64) -> SharedLog {
        let mut log = FakeLog {
            records: Vec::new(),
            first_offset: 1,
            next_offset: 1,
            producers: HashMap::new(),
            seen: Vec::new(),
            committed: watch::channel(1).0,
        };
        for i in 0..count {
            log.records.push(proto::Record {
                offset: log.next_offset,
                data: format!("r{i}").into_bytes(),
            });
            log.next_offset += 1;
            if gap_every != 0 && (i + 1) % gap_every == 0 {
                log.next_offset += 2;
            }
        }
        log.committed.send_replace(log.next_offset);
        Arc::new(Mutex::new(log))
    }

    /// Applies an append as the real server would.
    pub fn commit(
        &mut self,
        request: &proto::AppendRequest,
    ) -> Result<proto::AppendResponse, Status> {
        let answer = |first, last, duplicate| proto::AppendResponse {
            first_offset: first,
            last_offset: last,
            duplicate,
            request_id: request.request_id,
            error: None,
        };
        if let Some(p) = request.producer {
            use raftwal_client::dedup::{SequenceCheck, check};
            match check(self.producers.get(&p.id), p.sequence) {
                SequenceCheck::New => {}
                SequenceCheck::Duplicate { first, last } => return Ok(answer(first, last, true)),
                refused => {
                    return Err(Status::failed_precondition(format!(
                        "producer sequence {} refused: {refused:?}",
                        p.sequence
                    )));
                }
            }
        }
        if request.records.is_empty() {
            return Err(Status::invalid_argument("an empty append"));
        }
        if let Some(expected) = request.expected_next_offset
            && expected != self.next_offset
        {
            return Err(with_trailers(
                Status::failed_precondition("offset mismatch"),
                &[(TRAILER_NEXT_OFFSET, self.next_offset.to_string())],
            ));
        }
        let first = self.next_offset;
        for data in &request.records {
            self.records.push(proto::Record { offset: self.next_offset, data: data.clone() });
            self.next_offset += 1;
        }
        let last = self.next_offset - 1;
        if let Some(p) = request.producer {
            match self.producers.get_mut(&p.id) {
                Some(w) => w.record(p.sequence, first, last),
                None => {
                    let w = raftwal_client::dedup::ProducerWindow::new(p.sequence, first, last);
                    self.producers.insert(p.id, w);
                }
            }
        }
        self.committed.send_replace(self.next_offset);
        Ok(answer(first, last, false))
    }

    /// The offset of the record holding `data`, and how many records hold it.
    pub fn find(&self, data: &[u8]) -> (Option<u64>, usize) {
        let mut found = self.records.iter().filter(|r| r.data == data);
        let first = found.next().map(|r| r.offset);
        (first, usize::from(first.is_some()) + found.count())
    }
}

pub fn with_trailers(mut status: Status, trailers: &[(&'static str, String)]) -> Status {
    for (name, value) in trailers {
        status.metadata_mut().insert(*name, value.parse().expect("ASCII trailer"));
    }
    status
}

/// What one unary append attempt does instead of the normal path.
#[derive(Debug)]
pub enum Fault {
    /// Refuse with this code and message, appending nothing.
    Refuse(Code, &'static str),
    /// Append, then answer with this code: the answer is lost.
    CommitThenFail(Code),
    /// Append, then never answer.
    CommitThenHang,
}

/// What one Follow connection does.
#[derive(Clone, Copy, Debug, Default)]
pub struct FollowScript {
    /// Start this many records before the offset asked for (a misbehaving server).
    pub rewind: usize,
    /// Fail the stream after this many record batches.
    pub break_after_batches: Option<usize>,
    /// End the stream cleanly instead of failing it.
    pub end_cleanly: bool,
}

/// What one AppendStream does.
#[derive(Clone, Copy, Debug)]
pub enum StreamScript {
    /// Answer normally.
    Normal,
    /// Append the first `after` requests without answering, then fail the stream.
    CommitThenFail { after: usize },
}

/// A fake node. `leader_addr` None: it leads; Some(addr): a follower naming `addr` (empty: no
/// leader known).
pub struct FakeNode {
    me: Weak<FakeNode>,
    pub name: String,
    pub log: SharedLog,
    pub leader_addr: Mutex<Option<String>>,
    pub append_faults: Mutex<VecDeque<Fault>>,
    pub follow_scripts: Mutex<VecDeque<FollowScript>>,
    /// After the scripted follows ran out, refuse follows (a node that went away).
    pub refuse_follows_after_script: Mutex<bool>,
    pub stream_scripts: Mutex<VecDeque<StreamScript>>,
    /// AppendStream holds answers until this many requests wait, or until `release_total`
    /// requests were seen in all.
    pub stream_gate: AtomicUsize,
    pub release_total: AtomicUsize,
    /// AppendStream answers a released group in reverse order.
    pub answer_reversed: Mutex<bool>,
    pub follow_batch: usize,
    pub stream_seen: AtomicUsize,
    pub max_in_flight: AtomicUsize,
    pub calls: Mutex<HashMap<&'static str, usize>>,
    /// A stopped process (SIGSTOP): appends and status calls get no answer at all.
    pub paused: std::sync::atomic::AtomicBool,
    /// Its own client address, which a leader names in its status (set by `serve`).
    pub own_addr: Mutex<String>,
    /// The term its status reports.
    pub term: std::sync::atomic::AtomicU64,
}

impl FakeNode {
    pub fn leader(name: &str, log: &SharedLog) -> Arc<FakeNode> {
        FakeNode::new(name, log, None)
    }

    pub fn follower(name: &str, log: &SharedLog, leader_addr: &str) -> Arc<FakeNode> {
        FakeNode::new(name, log, Some(leader_addr.to_owned()))
    }

    fn new(name: &str, log: &SharedLog, leader_addr: Option<String>) -> Arc<FakeNode> {
        Arc::new_cyclic(|me| FakeNode {
            me: me.clone(),
            name: name.to_owned(),
            log: Arc::clone(log),
            leader_addr: Mutex::new(leader_addr),
            append_faults: Mutex::new(VecDeque::new()),
            follow_scripts: Mutex::new(VecDeque::new()),
            refuse_follows_after_script: Mutex::new(false),
            stream_scripts: Mutex::new(VecDeque::new()),
            stream_gate: AtomicUsize::new(1),
            release_total: AtomicUsize::new(usize::MAX),
            answer_reversed: Mutex::new(false),
            follow_batch: 50,
            stream_seen: AtomicUsize::new(0),
            max_in_flight: AtomicUsize::new(0),
            calls: Mutex::new(HashMap::new()),
            paused: std::sync::atomic::AtomicBool::new(false),
            own_addr: Mutex::new(String::new()),
            term: std::sync::atomic::AtomicU64::new(1),
        })
    }

    pub fn calls(&self, method: &'static str) -> usize {
        self.calls.lock().expect("calls").get(method).copied().unwrap_or(0)
    }

    pub fn push_faults(&self, faults: impl IntoIterator<Item = Fault>) {
        self.append_faults.lock().expect("faults").extend(faults);
    }

    fn self_arc(&self) -> Arc<FakeNode> {
        self.me.upgrade().expect("a node serving calls is alive")
    }

    fn count(&self, method: &'static str) {
        *self.calls.lock().expect("calls").entry(method).or_insert(0) += 1;
    }

    fn not_leader(&self) -> Option<Status> {
        let leader = self.leader_addr.lock().expect("leader").clone()?;
        Some(with_trailers(Status::unavailable("not leader"), &[(TRAILER_LEADER_ADDR, leader)]))
    }

    fn see(&self, request: &proto::AppendRequest) {
        lock(&self.log).seen.push(Seen {
            node: self.name.clone(),
            producer: request.producer.map(|p| (p.id, p.sequence)),
            request_id: request.request_id,
            records: request.records.clone(),
        });
    }
}

/// A fake node serving on 127.0.0.1.
pub struct Running {
    pub node: Arc<FakeNode>,
    pub addr: SocketAddr,
    pub url: String,
    task: JoinHandle<()>,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Serves `node` over plaintext HTTP/2 on a fresh port.
pub async fn serve(node: Arc<FakeNode>) -> Running {
    serve_with(node, None).await
}

/// Serves `node` on a fresh port, over TLS when `tls` is given.
pub async fn serve_with(node: Arc<FakeNode>, tls: Option<ServerTlsConfig>) -> Running {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind 127.0.0.1:0");
    let addr = listener.local_addr().expect("a bound address");
    *node.own_addr.lock().expect("own addr") = addr.to_string();
    let scheme = if tls.is_some() { "https" } else { "http" };
    let mut builder = Server::builder();
    if let Some(tls) = tls {
        builder = builder.tls_config(tls).expect("a valid server TLS configuration");
    }
    let router = builder
        .add_service(LogServer::from_arc(Arc::clone(&node)))
        .add_service(AdminServer::from_arc(Arc::clone(&node)));
    let task = tokio::spawn(async move {
        let _ = router.serve_with_incoming(TcpListenerStream::new(listener)).await;
    });
    Running { node, addr, url: format!("{scheme}://{addr}"), task }
}

/// Certificates for a TLS test: an authority, a server certificate for "localhost" and
/// 127.0.0.1, and a client certificate.
pub struct TestPki {
    pub ca_pem: String,
    pub server: Identity,
    pub client_cert_pem: String,
    pub client_key_pem: String,
}

impl TestPki {
    pub fn new() -> TestPki {
        let ca_key = rcgen::KeyPair::generate().expect("a CA key");
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = ca_params.self_signed(&ca_key).expect("a CA certificate");
        let leaf = |names: Vec<String>| {
            let key = rcgen::KeyPair::generate().expect("a key");
            let params = rcgen::CertificateParams::new(names).expect("params");
            let cert = params.signed_by(&key, &ca, &ca_key).expect("a signed certificate");
            (cert.pem(), key.serialize_pem())
        };
        let (server_cert, server_key) = leaf(vec!["localhost".into(), "127.0.0.1".into()]);
        let (client_cert_pem, client_key_pem) = leaf(vec!["client".into()]);
        TestPki {
            ca_pem: ca.pem(),
            server: Identity::from_pem(server_cert, server_key),
            client_cert_pem,
            client_key_pem,
        }
    }

    /// The server side: its identity, and client certificates required from this authority.
    pub fn server_tls(&self) -> ServerTlsConfig {
        ServerTlsConfig::new()
            .identity(self.server.clone())
            .client_ca_root(Certificate::from_pem(&self.ca_pem))
    }
}

type Answer<T> = Result<Response<T>, Status>;

#[tonic::async_trait]
impl Log for FakeNode {
    async fn append(
        &self,
        request: Request<proto::AppendRequest>,
    ) -> Answer<proto::AppendResponse> {
        self.count("append");
        if self.paused.load(Ordering::SeqCst) {
            std::future::pending::<()>().await;
        }
        let request = request.into_inner();
        self.see(&request);
        let fault = self.append_faults.lock().expect("faults").pop_front();
        match fault {
            Some(Fault::Refuse(code, message)) => Err(Status::new(code, message)),
            Some(Fault::CommitThenFail(code)) => {
                lock(&self.log).commit(&request)?;
                Err(Status::new(code, "the answer was lost"))
            }
            Some(Fault::CommitThenHang) => {
                lock(&self.log).commit(&request)?;
                std::future::pending().await
            }
            None => {
                if let Some(status) = self.not_leader() {
                    return Err(status);
                }
                Ok(Response::new(lock(&self.log).commit(&request)?))
            }
        }
    }

    type AppendStreamStream = ReceiverStream<Result<proto::AppendResponse, Status>>;

    async fn append_stream(
        &self,
        request: Request<Streaming<proto::AppendRequest>>,
    ) -> Answer<Self::AppendStreamStream> {
        self.count("append_stream");
        if let Some(status) = self.not_leader() {
            return Err(status);
        }
        let script = self
            .stream_scripts
            .lock()
            .expect("scripts")
            .pop_front()
            .unwrap_or(StreamScript::Normal);
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(4096);
        let node = self.self_arc();
        tokio::spawn(async move {
            let mut held: Vec<proto::AppendRequest> = Vec::new();
            let mut received = 0usize;
            while let Ok(Some(request)) = inbound.message().await {
                if node.paused.load(Ordering::SeqCst) {
                    // A stopped process reads nothing and answers nothing.
                    std::future::pending::<()>().await;
                }
                node.see(&request);
                received += 1;
                let seen = node.stream_seen.fetch_add(1, Ordering::SeqCst) + 1;
                held.push(request);
                node.max_in_flight.fetch_max(held.len(), Ordering::SeqCst);
                if let StreamScript::CommitThenFail { after } = script {
                    if received <= after {
                        let _ = lock(&node.log).commit(&held[held.len() - 1]);
                    }
                    if received == after {
                        let _ = tx.send(Err(Status::unavailable("stream broken"))).await;
                        return;
                    }
                    continue;
                }
                let gate = node.stream_gate.load(Ordering::SeqCst);
                if held.len() < gate && seen < node.release_total.load(Ordering::SeqCst) {
                    continue;
                }
                let mut answers = Vec::new();
                for request in held.drain(..) {
                    let answer = match lock(&node.log).commit(&request) {
                        Ok(answer) => answer,
                        Err(status) => proto::AppendResponse {
                            request_id: request.request_id,
                            error: Some(proto::Error {
                                code: status.code() as i32,
                                message: status.message().to_owned(),
                                next_offset: status
                                    .metadata()
                                    .get(TRAILER_NEXT_OFFSET)
                                    .and_then(|v| v.to_str().ok()?.parse().ok()),
                                leader_id: None,
                                leader_addr: String::new(),
                            }),
                            ..Default::default()
                        },
                    };
                    answers.push(answer);
                }
                if *node.answer_reversed.lock().expect("reversed") {
                    answers.reverse();
                }
                for answer in answers {
                    let failed = answer.error.is_some();
                    if tx.send(Ok(answer)).await.is_err() || failed {
                        return;
                    }
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn read(&self, request: Request<proto::ReadRequest>) -> Answer<proto::ReadResponse> {
        self.count("read");
        let request = request.into_inner();
        let log = lock(&self.log);
        if request.from_offset < log.first_offset {
            return Err(trimmed(log.first_offset));
        }
        let max = if request.max_records == 0 { 1000 } else { request.max_records as usize };
        let records: Vec<proto::Record> = log
            .records
            .iter()
            .filter(|r| r.offset >= request.from_offset)
            .take(max)
            .cloned()
            .collect();
        let next_offset = match records.last() {
            Some(last) if records.len() == max => last.offset + 1,
            _ => log.next_offset.max(request.from_offset),
        };
        Ok(Response::new(proto::ReadResponse {
            records,
            next_offset,
            commit_offset: log.next_offset - 1,
        }))
    }

    type FollowStream = ReceiverStream<Result<proto::FollowResponse, Status>>;

    async fn follow(&self, request: Request<proto::FollowRequest>) -> Answer<Self::FollowStream> {
        self.count("follow");
        let from = request.into_inner().from_offset;
        let script = self.follow_scripts.lock().expect("scripts").pop_front();
        let script = match script {
            Some(script) => script,
            None if *self.refuse_follows_after_script.lock().expect("refuse") => {
                return Err(Status::unavailable("this node is going away"));
            }
            None => FollowScript::default(),
        };
        let mut committed = {
            let log = lock(&self.log);
            if from < log.first_offset {
                return Err(trimmed(log.first_offset));
            }
            log.committed.subscribe()
        };
        let (tx, rx) = mpsc::channel(4);
        let log = Arc::clone(&self.log);
        let batch = self.follow_batch;
        tokio::spawn(async move {
            // Start `rewind` records before `from`, as a misbehaving server would.
            let mut cursor = {
                let log = lock(&log);
                let start = log.records.partition_point(|r| r.offset < from);
                log.records
                    .get(start.saturating_sub(script.rewind))
                    .map_or(from, |r| r.offset.min(from))
            };
            let mut batches = 0usize;
            let mut caught_up = false;
            loop {
                let (records, next_offset) = {
                    let log = lock(&log);
                    let records: Vec<proto::Record> = log
                        .records
                        .iter()
                        .filter(|r| r.offset >= cursor)
                        .take(batch)
                        .cloned()
                        .collect();
                    let next = match records.last() {
                        Some(last) if records.len() == batch => last.offset + 1,
                        _ => log.next_offset,
                    };
                    (records, next)
                };
                if !records.is_empty() {
                    if script.break_after_batches == Some(batches) {
                        if !script.end_cleanly {
                            let _ = tx.send(Err(Status::unavailable("stream broken"))).await;
                        }
                        return;
                    }
                    batches += 1;
                    cursor = next_offset;
                    let event = Event::Records(proto::RecordBatch { records, next_offset });
                    if tx.send(Ok(proto::FollowResponse { event: Some(event) })).await.is_err() {
                        return;
                    }
                    continue;
                }
                cursor = cursor.max(next_offset);
                if !caught_up {
                    caught_up = true;
                    let event = Event::CaughtUp(proto::CaughtUp { next_offset: cursor });
                    if tx.send(Ok(proto::FollowResponse { event: Some(event) })).await.is_err() {
                        return;
                    }
                }
                tokio::select! {
                    changed = committed.changed() => if changed.is_err() { return },
                    () = tx.closed() => return,
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn status(
        &self,
        _request: Request<proto::StatusRequest>,
    ) -> Answer<proto::StatusResponse> {
        self.count("status");
        if self.paused.load(Ordering::SeqCst) {
            std::future::pending::<()>().await;
        }
        let log = lock(&self.log);
        let leader_addr = self.leader_addr.lock().expect("leader").clone();
        let own = self.own_addr.lock().expect("own addr").clone();
        Ok(Response::new(proto::StatusResponse {
            role: if leader_addr.is_none() { "leader" } else { "follower" }.into(),
            term: self.term.load(Ordering::SeqCst),
            leader_addr: leader_addr.unwrap_or(own),
            commit_offset: log.next_offset - 1,
            first_offset: log.first_offset,
            ..Default::default()
        }))
    }
}

#[tonic::async_trait]
impl Admin for FakeNode {
    async fn add_learner(
        &self,
        request: Request<proto::AddLearnerRequest>,
    ) -> Answer<proto::MembershipResponse> {
        self.count("add_learner");
        if let Some(status) = self.not_leader() {
            return Err(status);
        }
        let request = request.into_inner();
        let member =
            proto::Member { id: request.node_id, kind: "learner".into(), addr: request.api_addr };
        Ok(Response::new(proto::MembershipResponse {
            offset: lock(&self.log).next_offset,
            members: vec![member],
        }))
    }

    async fn promote(
        &self,
        _request: Request<proto::PromoteRequest>,
    ) -> Answer<proto::MembershipResponse> {
        Err(Status::unimplemented("promote"))
    }

    async fn remove(
        &self,
        _request: Request<proto::RemoveRequest>,
    ) -> Answer<proto::MembershipResponse> {
        Err(Status::unimplemented("remove"))
    }

    async fn transfer_leader(
        &self,
        _request: Request<proto::TransferLeaderRequest>,
    ) -> Answer<proto::TransferLeaderResponse> {
        Err(Status::unimplemented("transfer_leader"))
    }

    async fn trim(&self, request: Request<proto::TrimRequest>) -> Answer<proto::TrimResponse> {
        self.count("trim");
        if let Some(status) = self.not_leader() {
            return Err(status);
        }
        let before = request.into_inner().before_offset;
        let mut log = lock(&self.log);
        log.first_offset = log.first_offset.max(before);
        let first = log.first_offset;
        log.records.retain(|r| r.offset >= first);
        Ok(Response::new(proto::TrimResponse { first_offset: first }))
    }
}

fn trimmed(first_offset: u64) -> Status {
    with_trailers(
        Status::out_of_range("trimmed"),
        &[(TRAILER_FIRST_OFFSET, first_offset.to_string())],
    )
}

/// A leader and a follower of one log, and a client configuration naming both with a 60 s
/// request timeout and leader checks after 100 ms: for tests of a leader that goes silent.
pub async fn leader_and_successor() -> (Running, Running, ClientConfig) {
    let log = FakeLog::new();
    let old = serve(FakeNode::leader("old", &log)).await;
    let new = serve(FakeNode::follower("new", &log, &old.addr.to_string())).await;
    let mut cfg = config(&[old.url.clone(), new.url.clone()]);
    cfg.request_timeout = Duration::from_secs(60);
    cfg.leader_check_after = Duration::from_millis(100);
    (old, new, cfg)
}

/// `old` stops (a paused process) and `new` leads, in a later term.
pub fn pause_and_hand_over(old: &Running, new: &Running) {
    old.node.paused.store(true, Ordering::SeqCst);
    *new.node.leader_addr.lock().expect("leader") = None;
    new.node.term.store(2, Ordering::SeqCst);
}
