//! The Durable Streams HTTP protocol on its own listener: any path is a stream. PUT creates (or
//! forks), POST appends or closes, GET reads (catch-up, long-poll, SSE), HEAD describes,
//! DELETE deletes. Syntax is checked here, before anything is proposed; whatever depends on a
//! stream's state is decided when the command applies (`core::streams`), so concurrent writers
//! are judged in log order on every node. A follower hands its commands to the leader (the
//! `Forward` gRPC service, over the client API with the node's own certificate) and answers
//! the client itself.
//!
//! The port is TLS (the node's certificate; client certificates of the cluster CA when
//! `client_auth`) unless `client_plaintext`, like the client API.
//!
//! Offsets are `%016d_%016d`: the first field is always 0, the second a byte position in the
//! stream (docs/streams.md). Reads are linearizable: each read first passes a ReadIndex round,
//! so a client reads its own writes on any node.

// A refusal is the response itself, built once per failed request: not worth a box.
#![allow(clippy::result_large_err)]

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, header};
use axum::response::Response;
use base64::Engine as _;
use tokio::sync::watch;

use crate::conn_limit::{HttpListener, Limited};
use crate::core::streams::{
    self, Command, CreateSpec, ForkSpec, ProducerTuple, StreamOutcome, StreamView,
};
use crate::read::StreamMessage;
use crate::streams_api::{Refusal, StreamsApi, UNSTAMPED, now_ms};

/// Bytes one catch-up response carries at most (whole messages; at least one).
const READ_BYTES_MAX: u64 = 8 << 20;
/// A body over the limit is still read (and dropped) up to this many bytes before the refusal.
const DRAIN_BYTES_MAX: usize = 256 << 20;
/// The cursor epoch (2024-10-09T00:00:00Z) and interval of the protocol's cache-busting cursor.
const CURSOR_EPOCH_MS: u64 = 1_728_432_000_000;
const CURSOR_INTERVAL_MS: u64 = 20_000;

/// Request header (raftwal's extension): the stream version an append expects.
const EXPECTED_VERSION: &str = "raftwal-expected-version";
/// Response header (raftwal's extension): the stream's version (messages it holds).
const STREAM_VERSION: &str = "raftwal-stream-version";

/// Serves the streams API on `listener` until `shutdown`: over TLS with `tls`, else plain.
/// At most `max_connections` are open at once (`conn_limit`).
pub fn serve(
    api: StreamsApi,
    listener: tokio::net::TcpListener,
    max_connections: usize,
    tls: Option<Arc<rustls::ServerConfig>>,
    mut shutdown: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    let listener = HttpListener::new(listener, max_connections, "streams");
    let app = Router::new().fallback(handle).with_state(api);
    tokio::spawn(async move {
        let stop = async move {
            let _ = shutdown.wait_for(|s| *s).await;
        };
        let served = match tls {
            None => axum::serve(listener, app).with_graceful_shutdown(stop).await,
            Some(tls) => {
                let listener = TlsListener::start(listener, tls);
                axum::serve(listener, app).with_graceful_shutdown(stop).await
            }
        };
        if let Err(e) = served {
            tracing::error!(error = %e, "the streams HTTP server failed");
        }
    })
}

/// The streams port's TLS settings, from the node's certificate and key: TLS 1.3, HTTP/1.1,
/// and client certificates of the cluster CA required when `client_auth` is.
pub fn tls_config(
    pem: &crate::node::TlsPem,
    client_auth: bool,
) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    use anyhow::Context as _;
    use rustls_pki_types::pem::PemObject as _;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let certs = CertificateDer::pem_slice_iter(pem.cert.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .context("the node certificate")?;
    let key = PrivateKeyDer::from_pem_slice(pem.key.as_bytes()).context("the node key")?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .context("TLS versions")?;
    let builder = if client_auth {
        let mut roots = rustls::RootCertStore::empty();
        for ca in CertificateDer::pem_slice_iter(pem.ca.as_bytes()) {
            roots.add(ca.context("the CA certificate")?).context("the CA certificate")?;
        }
        let verifier =
            rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .context("client certificate verification")?;
        builder.with_client_cert_verifier(verifier)
    } else {
        builder.with_no_client_auth()
    };
    let mut config =
        builder.with_single_cert(certs, key).context("the node certificate and key")?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// How long a TLS handshake may take before the connection is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Accepts TCP connections and hands over those whose TLS handshake completed; handshakes run
/// on their own tasks, so a slow client never holds up the others.
struct TlsListener {
    ready: tokio::sync::mpsc::Receiver<(
        tokio_rustls::server::TlsStream<Limited>,
        std::net::SocketAddr,
    )>,
    local: std::net::SocketAddr,
    acceptor: tokio::task::JoinHandle<()>,
}

impl Drop for TlsListener {
    fn drop(&mut self) {
        // The accept loop owns the listening socket: it goes with the server.
        self.acceptor.abort();
    }
}

impl TlsListener {
    fn start(mut listener: HttpListener, tls: Arc<rustls::ServerConfig>) -> TlsListener {
        use axum::serve::Listener as _;
        let local = listener.local_addr().unwrap_or_else(|_| ([0, 0, 0, 0], 0).into());
        let (tx, ready) = tokio::sync::mpsc::channel(64);
        let acceptor = tokio_rustls::TlsAcceptor::from(tls);
        let task = tokio::spawn(async move {
            loop {
                // Within the connection bound; a failed accept pauses (conn_limit).
                let (tcp, peer) = listener.accept_limited().await;
                let (acceptor, tx) = (acceptor.clone(), tx.clone());
                tokio::spawn(async move {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(stream)) => {
                            let _ = tx.send((stream, peer)).await;
                        }
                        Ok(Err(e)) => {
                            tracing::debug!(%peer, error = %e, "streams API: TLS refused")
                        }
                        Err(_) => tracing::debug!(%peer, "streams API: TLS handshake timed out"),
                    }
                });
            }
        });
        TlsListener { ready, local, acceptor: task }
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = tokio_rustls::server::TlsStream<Limited>;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(conn) => conn,
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}

async fn handle(State(api): State<StreamsApi>, req: Request) -> Response {
    let mut resp = match *req.method() {
        Method::OPTIONS => empty(StatusCode::NO_CONTENT),
        Method::PUT => api.put(req).await,
        Method::POST => api.post(req).await,
        Method::GET => api.get(req, false).await,
        Method::HEAD => api.get(req, true).await,
        Method::DELETE => api.delete(req).await,
        _ => text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed"),
    };
    common_headers(resp.headers_mut());
    resp
}

// ----- responses -----

fn empty(status: StatusCode) -> Response {
    let mut r = Response::new(Body::empty());
    *r.status_mut() = status;
    r
}

fn text(status: StatusCode, msg: impl Into<String>) -> Response {
    let mut r = Response::new(Body::from(msg.into()));
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    r
}

impl From<Refusal> for Response {
    fn from(r: Refusal) -> Response {
        let mut resp = text(r.status, r.message);
        if r.retry {
            set(&mut resp, "retry-after", 1);
        }
        resp
    }
}

fn set(r: &mut Response, name: &'static str, value: impl ToString) {
    if let Ok(v) = HeaderValue::from_str(&value.to_string()) {
        r.headers_mut().insert(HeaderName::from_static(name), v);
    }
}

fn common_headers(h: &mut HeaderMap) {
    let fixed: [(&str, &str); 6] = [
        ("x-content-type-options", "nosniff"),
        ("cross-origin-resource-policy", "cross-origin"),
        ("access-control-allow-origin", "*"),
        ("access-control-allow-methods", "GET, POST, PUT, DELETE, HEAD, OPTIONS"),
        (
            "access-control-allow-headers",
            "content-type, authorization, if-none-match, Stream-Seq, Stream-TTL, \
             Stream-Expires-At, Stream-Closed, Producer-Id, Producer-Epoch, Producer-Seq, \
             Stream-Forked-From, Stream-Fork-Offset, Stream-Fork-Sub-Offset, \
             Raftwal-Expected-Version",
        ),
        (
            "access-control-expose-headers",
            "Stream-Next-Offset, Stream-Cursor, Stream-Up-To-Date, Stream-Closed, \
             Producer-Epoch, Producer-Seq, Producer-Expected-Seq, Producer-Received-Seq, etag, \
             content-type, content-encoding, vary, Location, Raftwal-Stream-Version",
        ),
    ];
    for (name, value) in fixed {
        h.insert(HeaderName::from_static(name), HeaderValue::from_static(value));
    }
}

/// The protocol's offset string for a stream position.
pub fn offset(pos: u64) -> String {
    format!("{:016}_{:016}", 0, pos)
}

/// Parses `\d+_\d+`; a position no stream reaches (a first field above 0) is `u64::MAX`.
fn parse_offset(s: &str) -> Option<u64> {
    let (hi, lo) = s.split_once('_')?;
    let digits = |x: &str| !x.is_empty() && x.bytes().all(|b| b.is_ascii_digit());
    if !digits(hi) || !digits(lo) {
        return None;
    }
    if hi.trim_start_matches('0').is_empty() {
        Some(lo.parse::<u64>().unwrap_or(u64::MAX))
    } else {
        Some(u64::MAX)
    }
}

fn header_str<'a>(h: &'a HeaderMap, name: &str) -> Result<Option<&'a str>, Response> {
    match h.get(name) {
        None => Ok(None),
        Some(v) => match v.to_str() {
            Ok(s) if s.len() <= streams::FIELD_BYTES_MAX => Ok(Some(s)),
            _ => Err(text(StatusCode::BAD_REQUEST, format!("bad {name} header"))),
        },
    }
}

fn is_true(v: Option<&str>) -> bool {
    v.is_some_and(|v| v.trim().eq_ignore_ascii_case("true"))
}

/// A decimal integer without sign, leading zeros or anything else.
fn strict_u64(s: &str) -> Option<u64> {
    if s == "0" {
        return Some(0);
    }
    if s.is_empty() || s.starts_with('0') || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

pub(crate) fn valid_content_type(ct: &str) -> bool {
    let media = ct.split(';').next().unwrap_or("").trim();
    let Some((a, b)) = media.split_once('/') else { return false };
    let token = |x: &str| {
        !x.is_empty() && x.bytes().all(|c| c.is_ascii_alphanumeric() || b"-_.+".contains(&c))
    };
    token(a) && token(b)
}

pub(crate) fn is_json(ct: &str) -> bool {
    streams::media_type(ct) == "application/json"
}

/// Whether SSE carries the content type as text (else base64).
fn sse_text(ct: &str) -> bool {
    let m = streams::media_type(ct);
    m.starts_with("text/") || m == "application/json"
}

/// A JSON body's messages: a top-level array is flattened one level; each element is kept
/// as its JSON text, joined by commas into one message. `Ok(None)`: an empty array.
fn json_message(body: &[u8]) -> Result<Option<Bytes>, String> {
    let bad = |e: serde_json::Error| format!("the body is not valid JSON: {e}");
    let mut out = Vec::with_capacity(body.len());
    let array = body.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'[');
    if array {
        // Each element's own text goes straight to the message: nothing is built per element,
        // so a large array takes about its own size again, not a tree of values.
        let mut de = serde_json::Deserializer::from_slice(body);
        serde::Deserializer::deserialize_seq(&mut de, Flatten(&mut out)).map_err(bad)?;
        de.end().map_err(bad)?;
        if out.is_empty() {
            return Ok(None);
        }
    } else {
        let value: &serde_json::value::RawValue = serde_json::from_slice(body).map_err(bad)?;
        out.extend_from_slice(value.get().as_bytes());
    }
    Ok(Some(Bytes::from(out)))
}

/// Writes a JSON array's elements, as they are written, comma-separated.
struct Flatten<'a>(&'a mut Vec<u8>);

impl<'de> serde::de::Visitor<'de> for Flatten<'_> {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON array")
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while let Some(raw) = seq.next_element::<&'de serde_json::value::RawValue>()? {
            if !self.0.is_empty() {
                self.0.push(b',');
            }
            self.0.extend_from_slice(raw.get().as_bytes());
        }
        Ok(())
    }
}

/// The body of a read: concatenated bytes, or one JSON array of every element.
fn body_of(json: bool, messages: &[StreamMessage]) -> Bytes {
    if json {
        let parts: Vec<&[u8]> = messages.iter().map(|m| &m.data[..]).collect();
        let mut out = Vec::with_capacity(parts.iter().map(|p| p.len() + 1).sum::<usize>() + 2);
        out.push(b'[');
        for (i, p) in parts.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            out.extend_from_slice(p);
        }
        out.push(b']');
        Bytes::from(out)
    } else {
        let mut out = Vec::with_capacity(messages.iter().map(|m| m.data.len()).sum());
        for m in messages {
            out.extend_from_slice(&m.data);
        }
        Bytes::from(out)
    }
}

/// The protocol's cursor: the current 20-second interval, or past the client's.
fn next_cursor(client: Option<&str>) -> u64 {
    let interval = now_ms().saturating_sub(CURSOR_EPOCH_MS) / CURSOR_INTERVAL_MS;
    match client.and_then(|c| c.parse::<u64>().ok()) {
        Some(c) if c >= interval => {
            let jitter = 1 + (now_ms() ^ 0x9e37_79b9) % 180;
            c.saturating_add(jitter)
        }
        _ => interval,
    }
}

/// Milliseconds since the epoch of an RFC 3339 timestamp (`2026-01-02T03:04:05.678Z`, or
/// with a `+HH:MM` / `-HH:MM` offset).
pub(crate) fn parse_rfc3339(s: &str) -> Option<u64> {
    let b = s.as_bytes();
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b't' | b' ') {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let part = s.get(r)?;
        if part.bytes().all(|c| c.is_ascii_digit()) { part.parse().ok() } else { None }
    };
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    if b[13] != b':' || b[16] != b':' {
        return None;
    }
    let (h, mi, sec) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || sec > 60 {
        return None;
    }
    let mut at = 19;
    let mut ms = 0i64;
    if b.get(at) == Some(&b'.') {
        let start = at + 1;
        let mut end = start;
        while end < b.len() && b[end].is_ascii_digit() {
            end += 1;
        }
        if end == start {
            return None;
        }
        let frac = &s[start..end.min(start + 3)];
        ms = frac.parse::<i64>().ok()? * 10i64.pow(3 - frac.len() as u32);
        at = end;
    }
    let offset_min = match b.get(at) {
        Some(b'Z' | b'z') if at + 1 == b.len() => 0,
        Some(sign @ (b'+' | b'-')) if at + 6 == b.len() && b[at + 3] == b':' => {
            let (oh, om) = (num(at + 1..at + 3)?, num(at + 4..at + 6)?);
            let m = oh * 60 + om;
            if *sign == b'+' { m } else { -m }
        }
        _ => return None,
    };
    // Days from the civil date (Howard Hinnant's algorithm).
    let (yy, mm) = if mo <= 2 { (y - 1, mo + 9) } else { (y, mo - 3) };
    let era = yy.div_euclid(400);
    let yoe = yy - era * 400;
    let doy = (153 * mm + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + h * 3600 + mi * 60 + sec - offset_min * 60;
    u64::try_from(secs * 1000 + ms).ok()
}

impl StreamsApi {
    async fn body(&self, req: Request) -> Result<(HeaderMap, String, Bytes), Response> {
        let path = req.uri().path().to_string();
        let (parts, body) = req.into_parts();
        let limit = self.body_bytes_max as usize;
        let mut data = body.into_data_stream();
        let mut buf = bytes::BytesMut::new();
        let mut seen = 0usize;
        while let Some(chunk) = tokio_stream::StreamExt::next(&mut data).await {
            let chunk =
                chunk.map_err(|e| text(StatusCode::BAD_REQUEST, format!("read the body: {e}")))?;
            seen += chunk.len();
            if seen <= limit {
                buf.extend_from_slice(&chunk);
            } else if seen > DRAIN_BYTES_MAX {
                // Not worth reading further: the client sees the connection close.
                break;
            }
        }
        if seen > limit {
            // Read to the end first (up to a bound), so that the client, still sending, gets
            // the answer rather than a broken pipe.
            return Err(text(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("the body is over {} bytes", self.body_bytes_max),
            ));
        }
        Ok((parts.headers, path, buf.freeze()))
    }

    // ----- PUT -----

    async fn put(&self, req: Request) -> Response {
        let host = req
            .headers()
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .unwrap_or("localhost")
            .to_string();
        let (h, name, body) = match self.body(req).await {
            Ok(x) => x,
            Err(r) => return r,
        };
        match self.put_inner(&h, &name, body).await {
            Ok(outcome) => created_response(outcome, &host, &name),
            Err(r) => r,
        }
    }

    async fn put_inner(
        &self,
        h: &HeaderMap,
        name: &str,
        body: Bytes,
    ) -> Result<StreamOutcome, Response> {
        if name.len() > streams::NAME_BYTES_MAX {
            return Err(text(StatusCode::BAD_REQUEST, "the stream name is too long"));
        }
        let forked_from = header_str(h, "stream-forked-from")?;
        let given_ct = header_str(h, "content-type")?.filter(|c| valid_content_type(c));
        let ttl = header_str(h, "stream-ttl")?;
        let expires = header_str(h, "stream-expires-at")?;
        if ttl.is_some() && expires.is_some() {
            return Err(text(
                StatusCode::BAD_REQUEST,
                "Stream-TTL and Stream-Expires-At exclude each other",
            ));
        }
        let ttl_secs = match ttl {
            Some(t) => Some(
                strict_u64(t)
                    .filter(|t| *t <= streams::TTL_SECS_MAX)
                    .ok_or_else(|| text(StatusCode::BAD_REQUEST, "bad Stream-TTL"))?,
            ),
            None => None,
        };
        let expires_at = match expires {
            Some(e) => {
                let ms = parse_rfc3339(e)
                    .ok_or_else(|| text(StatusCode::BAD_REQUEST, "bad Stream-Expires-At"))?;
                Some((e.to_string(), ms))
            }
            None => None,
        };
        let fork_offset = match header_str(h, "stream-fork-offset")? {
            Some(o) => Some(
                parse_offset(o)
                    .ok_or_else(|| text(StatusCode::BAD_REQUEST, "bad Stream-Fork-Offset"))?,
            ),
            None => None,
        };
        let sub_offset = match header_str(h, "stream-fork-sub-offset")? {
            Some(_) if forked_from.is_none() => {
                return Err(text(
                    StatusCode::BAD_REQUEST,
                    "Stream-Fork-Sub-Offset needs Stream-Forked-From",
                ));
            }
            Some(s) => strict_u64(s)
                .ok_or_else(|| text(StatusCode::BAD_REQUEST, "bad Stream-Fork-Sub-Offset"))?,
            None => 0,
        };
        let closed = is_true(header_str(h, "stream-closed")?);
        let mut spec = CreateSpec {
            content_type: given_ct.unwrap_or("application/octet-stream").to_string(),
            ttl_secs,
            expires_at,
            closed,
            fork: None,
        };
        let mut messages = Vec::new();
        if let Some(from) = forked_from {
            // One ReadIndex round on a follower, or on a leader that does not know the source
            // yet (still applying its log): the source a client already created is then seen.
            if !self.leads() || self.view(from).is_none() {
                self.barrier().await?;
            }
            let source = match self.view(from) {
                Some(v) if v.soft_deleted => {
                    return Err(text(StatusCode::CONFLICT, "the source stream was deleted"));
                }
                Some(v) if !v.expired(now_ms()) => v,
                _ => return Err(text(StatusCode::NOT_FOUND, "no such source stream")),
            };
            match given_ct {
                Some(ct)
                    if streams::media_type(ct) != streams::media_type(&source.content_type) =>
                {
                    return Err(text(
                        StatusCode::CONFLICT,
                        "the fork's content type differs from its source's",
                    ));
                }
                Some(_) => {}
                None => spec.content_type = source.content_type.clone(),
            }
            if spec.ttl_secs.is_none() && spec.expires_at.is_none() {
                spec.ttl_secs = source.ttl_secs;
                spec.expires_at = source.expires_at.clone();
            }
            let offset = fork_offset.unwrap_or(source.tail);
            if offset > source.tail {
                return Err(text(
                    StatusCode::BAD_REQUEST,
                    "the fork offset is beyond the source's tail",
                ));
            }
            // Offsets name message ends: one inside a message would cut it.
            if offset > 0
                && self.read(&source, offset - 1, 1)?.first().map(|m| m.end) != Some(offset)
            {
                return Err(text(
                    StatusCode::BAD_REQUEST,
                    "the fork offset is inside a message of the source",
                ));
            }
            if sub_offset > 0 {
                let next = self.read(&source, offset, 1)?;
                let Some(first) = next.first() else {
                    return Err(text(
                        StatusCode::BAD_REQUEST,
                        "no message follows the fork offset",
                    ));
                };
                let prefix = if is_json(&source.content_type) {
                    let text_ = format!("[{}]", String::from_utf8_lossy(&first.data));
                    let items: Vec<serde_json::Value> = serde_json::from_str(&text_)
                        .map_err(|e| text(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
                    if sub_offset as usize > items.len() {
                        return Err(text(
                            StatusCode::BAD_REQUEST,
                            "the sub-offset is beyond the message",
                        ));
                    }
                    let texts: Vec<String> =
                        items[..sub_offset as usize].iter().map(|v| v.to_string()).collect();
                    Bytes::from(texts.join(","))
                } else {
                    if sub_offset > first.data.len() as u64 {
                        return Err(text(
                            StatusCode::BAD_REQUEST,
                            "the sub-offset is beyond the message",
                        ));
                    }
                    first.data.slice(..sub_offset as usize)
                };
                messages.push(prefix);
            }
            spec.fork = Some(ForkSpec {
                from: from.to_string(),
                from_incarnation: source.incarnation,
                offset,
                offset_given: fork_offset.is_some(),
                sub_offset,
            });
        }
        if !body.is_empty() {
            if is_json(&spec.content_type) {
                match json_message(&body) {
                    Ok(Some(m)) => messages.push(m),
                    Ok(None) => {}
                    Err(e) => return Err(text(StatusCode::BAD_REQUEST, e)),
                }
            } else {
                messages.push(body);
            }
        }
        let total: u64 = messages.iter().map(|m| m.len() as u64).sum();
        if total > self.body_bytes_max {
            // A sub-offset prefix and the body together must still fit one log entry.
            return Err(text(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("the fork's first messages are over {} bytes", self.body_bytes_max),
            ));
        }
        let cmd = Command::Create { name: name.to_string(), now_ms: UNSTAMPED, spec, messages };
        Ok(self.command(cmd).await?)
    }

    // ----- POST -----

    async fn post(&self, req: Request) -> Response {
        let h = req.headers().clone();
        // Producer headers are checked before the body is read.
        let producer = match producer_of(&h) {
            Ok(p) => p,
            Err(r) => return r,
        };
        let (h, name, body) = match self.body(req).await {
            Ok(x) => x,
            Err(r) => return r,
        };
        let close = match header_str(&h, "stream-closed") {
            Ok(v) => is_true(v),
            Err(r) => return r,
        };
        let stream_seq = match header_str(&h, "stream-seq") {
            Ok(v) => v.map(str::to_string),
            Err(r) => return r,
        };
        // raftwal's extension for optimistic concurrency on one stream: the number of messages
        // the stream must hold before this append.
        let expected_version = match header_str(&h, EXPECTED_VERSION) {
            Ok(None) => None,
            Ok(Some(v)) => match strict_u64(v) {
                Some(v) => Some(v),
                None => return text(StatusCode::BAD_REQUEST, format!("bad {EXPECTED_VERSION}")),
            },
            Err(r) => return r,
        };
        if let Err(r) = self.catch_up_if_follower().await {
            return r.into();
        }
        let mut messages = Vec::new();
        let mut content_type = None;
        if body.is_empty() {
            if !close {
                return text(StatusCode::BAD_REQUEST, "an append needs a body");
            }
        } else {
            let ct = match header_str(&h, "content-type") {
                Ok(Some(ct)) => ct.to_string(),
                Ok(None) => return text(StatusCode::BAD_REQUEST, "an append needs a Content-Type"),
                Err(r) => return r,
            };
            // A JSON write is flattened unless this node knows the stream as another type (then
            // the state refuses it: 409). Refusals that depend on the stream (missing, closed,
            // another type) come from the state, in log order.
            let json = is_json(&ct) && self.view(&name).is_none_or(|v| is_json(&v.content_type));
            if json {
                match json_message(&body) {
                    Ok(Some(m)) => messages.push(m),
                    Ok(None) => {
                        return text(
                            StatusCode::BAD_REQUEST,
                            "an empty JSON array appends nothing",
                        );
                    }
                    Err(e) => return text(StatusCode::BAD_REQUEST, e),
                }
            } else {
                messages.push(body);
            }
            content_type = Some(ct);
        }
        let close_only = messages.is_empty();
        let cmd = Command::Append {
            name: name.clone(),
            now_ms: UNSTAMPED,
            content_type,
            messages,
            close,
            producer: producer.clone(),
            stream_seq,
            expected_version,
        };
        match self.command(cmd).await {
            Ok(outcome) => append_response(outcome, producer.as_ref(), close_only),
            Err(r) => r.into(),
        }
    }

    // ----- GET and HEAD -----

    async fn get(&self, req: Request, head: bool) -> Response {
        let name = req.uri().path().to_string();
        let query = req.uri().query().unwrap_or("").to_string();
        let h = req.headers().clone();
        let mut params: HashMap<String, Vec<String>> = HashMap::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let v = percent_decode(v);
            params.entry(percent_decode(k)).or_default().push(v);
        }
        if let Err(r) = self.barrier().await {
            return r.into();
        }
        let view = match self.live_view(&name) {
            Ok(v) => v,
            Err(r) => return r.into(),
        };
        if head {
            return head_response(&view);
        }
        let offset_param = match params.get("offset").map(Vec::as_slice) {
            None => None,
            Some([one]) if !one.is_empty() => Some(one.clone()),
            _ => return text(StatusCode::BAD_REQUEST, "give one non-empty offset"),
        };
        let live = params.get("live").and_then(|v| v.first()).cloned().unwrap_or_default();
        let live = match live.as_str() {
            "long-poll" | "sse" => Some(live),
            _ => None,
        };
        if live.is_some() && offset_param.is_none() {
            return text(StatusCode::BAD_REQUEST, "a live read needs an offset");
        }
        let now_offset = offset_param.as_deref() == Some("now");
        let from = match offset_param.as_deref() {
            None | Some("-1") => 0,
            Some("now") => view.tail,
            Some(o) => match parse_offset(o) {
                Some(p) => p,
                None => return text(StatusCode::BAD_REQUEST, "bad offset"),
            },
        };
        let cursor = params.get("cursor").and_then(|v| v.first()).cloned();
        if let Err(r) = self.touch_if_due(&view).await {
            return r.into();
        }
        match live.as_deref() {
            Some("sse") => self.sse(name, view, from, cursor),
            Some(_) => self.long_poll(&name, view, from, cursor.as_deref()).await,
            None => self.catch_up(&h, &name, &view, from, now_offset, offset_param.as_deref()),
        }
    }

    fn catch_up(
        &self,
        h: &HeaderMap,
        name: &str,
        view: &StreamView,
        from: u64,
        now_offset: bool,
        offset_param: Option<&str>,
    ) -> Response {
        let json = is_json(&view.content_type);
        let messages = match self.read(view, from, READ_BYTES_MAX) {
            Ok(m) => m,
            Err(r) => return r.into(),
        };
        // Past the tail (or at it) a read is empty and names the tail.
        let next = messages.last().map_or(view.tail, |m| m.end);
        let at_tail = next >= view.tail;
        let closed = view.closed && at_tail;
        let mut r = Response::new(Body::from(body_of(json, &messages)));
        set(&mut r, "content-type", &view.content_type);
        set(&mut r, "stream-next-offset", offset(next));
        if at_tail {
            set(&mut r, "stream-up-to-date", "true");
        }
        if closed {
            set(&mut r, "stream-closed", "true");
        }
        if now_offset {
            set(&mut r, "cache-control", "no-store");
            return r;
        }
        let b64 = base64::engine::general_purpose::STANDARD.encode(name.as_bytes());
        let etag = format!(
            "\"{b64}:{}:{}:{}{}\"",
            view.incarnation,
            offset_param.unwrap_or("-1"),
            offset(next),
            if closed { ":c" } else { "" }
        );
        if h.get(header::IF_NONE_MATCH).and_then(|v| v.to_str().ok()) == Some(etag.as_str()) {
            let mut r = empty(StatusCode::NOT_MODIFIED);
            set(&mut r, "etag", etag);
            return r;
        }
        set(&mut r, "etag", etag);
        r
    }

    async fn long_poll(
        &self,
        name: &str,
        view: Arc<StreamView>,
        from: u64,
        cursor: Option<&str>,
    ) -> Response {
        let json = is_json(&view.content_type);
        let incarnation = view.incarnation;
        // Subscribed before the view is taken again: an append published in between wakes us.
        let mut changed = self.shared.streams_changed.subscribe();
        let mut stopping = self.stopping.clone();
        let deadline = tokio::time::Instant::now() + self.long_poll;
        let mut timed_out = false;
        loop {
            let view = match self.view(name) {
                Some(v) if !v.soft_deleted && v.incarnation == incarnation => v,
                // Gone with this node's log restart (marked before the streams are dropped).
                _ if self.check_state().is_err() => {
                    return Refusal::unavailable("this node is fetching the stream state").into();
                }
                Some(v) if v.soft_deleted => {
                    return text(StatusCode::GONE, "the stream was deleted");
                }
                _ => return text(StatusCode::NOT_FOUND, "the stream was deleted"),
            };
            let messages = match self.read(&view, from, READ_BYTES_MAX) {
                Ok(m) => m,
                Err(r) => return r.into(),
            };
            if let Some(last) = messages.last() {
                let next = last.end;
                let mut r = Response::new(Body::from(body_of(json, &messages)));
                set(&mut r, "content-type", &view.content_type);
                set(&mut r, "stream-next-offset", offset(next));
                set(&mut r, "stream-cursor", next_cursor(cursor));
                if next >= view.tail {
                    set(&mut r, "stream-up-to-date", "true");
                    if view.closed {
                        set(&mut r, "stream-closed", "true");
                    }
                }
                return r;
            }
            if view.closed || timed_out {
                // Nothing after `from` in the view just read: its tail is where to go on.
                let mut r = empty(StatusCode::NO_CONTENT);
                set(&mut r, "stream-next-offset", offset(view.tail));
                set(&mut r, "stream-up-to-date", "true");
                if view.closed {
                    set(&mut r, "stream-closed", "true");
                } else {
                    set(&mut r, "stream-cursor", next_cursor(cursor));
                }
                return r;
            }
            tokio::select! {
                wait = tokio::time::timeout_at(deadline, changed.changed()) => {
                    timed_out = wait.is_err();
                }
                _ = stopping.wait_for(|s| *s) => {
                    return text(StatusCode::SERVICE_UNAVAILABLE, "the node is stopping");
                }
            }
        }
    }

    fn sse(
        &self,
        name: String,
        view: Arc<StreamView>,
        from: u64,
        cursor: Option<String>,
    ) -> Response {
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(16);
        let api = self.clone();
        let ct = view.content_type.clone();
        tokio::spawn(async move {
            api.sse_loop(name, view, from, cursor, tx).await;
        });
        let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
        let mut r = Response::new(Body::from_stream(stream));
        set(&mut r, "content-type", "text/event-stream");
        set(&mut r, "cache-control", "no-cache");
        if !sse_text(&ct) {
            set(&mut r, "stream-sse-data-encoding", "base64");
        }
        r
    }

    async fn sse_loop(
        &self,
        name: String,
        mut view: Arc<StreamView>,
        mut from: u64,
        cursor: Option<String>,
        tx: tokio::sync::mpsc::Sender<Result<Bytes, std::io::Error>>,
    ) {
        let json = is_json(&view.content_type);
        let text_mode = sse_text(&view.content_type);
        let incarnation = view.incarnation;
        let mut changed = self.shared.streams_changed.subscribe();
        let mut stopping = self.stopping.clone();
        // Taken again after subscribing: an append published in between wakes us.
        match self.view(&name) {
            Some(v) if !v.soft_deleted && v.incarnation == incarnation => view = v,
            _ => return,
        }
        let mut cursor = cursor;
        let mut sent_control = false;
        loop {
            let messages = match self.read(&view, from, READ_BYTES_MAX) {
                Ok(m) => m,
                Err(_) => return,
            };
            let mut event = String::new();
            if let Some(last) = messages.last() {
                from = last.end;
                let payload = body_of(json, &messages);
                let data = if text_mode {
                    String::from_utf8_lossy(&payload).into_owned()
                } else {
                    base64::engine::general_purpose::STANDARD.encode(&payload)
                };
                event.push_str("event: data\n");
                for line in data.split("\r\n").flat_map(|l| l.split(['\r', '\n'])) {
                    event.push_str("data:");
                    event.push_str(line);
                    event.push('\n');
                }
                event.push('\n');
            }
            let at_tail = from >= view.tail;
            let closed = view.closed && at_tail;
            if !messages.is_empty() || !sent_control {
                let mut control = serde_json::Map::new();
                control.insert("streamNextOffset".into(), offset(from.min(view.tail)).into());
                if !closed {
                    let c = next_cursor(cursor.as_deref());
                    cursor = Some(c.to_string());
                    control.insert("streamCursor".into(), c.to_string().into());
                }
                if at_tail {
                    control.insert("upToDate".into(), true.into());
                }
                if closed {
                    control.insert("streamClosed".into(), true.into());
                }
                event.push_str("event: control\ndata:");
                event.push_str(&serde_json::Value::Object(control).to_string());
                event.push_str("\n\n");
                sent_control = true;
                if tx.send(Ok(Bytes::from(event))).await.is_err() {
                    return;
                }
                if closed {
                    return;
                }
            }
            if !messages.is_empty() {
                // More may be there already.
                continue;
            }
            if view.closed && at_tail {
                return;
            }
            let wait = tokio::time::timeout(self.long_poll, changed.changed());
            tokio::select! {
                r = wait => {
                    if matches!(r, Ok(Err(_))) {
                        return;
                    }
                    if r.is_err() {
                        // Idle: a keep-alive control.
                        sent_control = false;
                    }
                }
                () = tx.closed() => return,
                _ = stopping.wait_for(|s| *s) => return,
            }
            match self.view(&name) {
                // A deleted and re-created stream is another stream: this read ends (as it
                // does when this node's log restarts and its streams go).
                Some(v) if !v.soft_deleted && v.incarnation == incarnation => view = v,
                _ => return,
            }
        }
    }

    // ----- DELETE -----

    async fn delete(&self, req: Request) -> Response {
        let name = req.uri().path().to_string();
        match self.command(Command::Delete { name, now_ms: UNSTAMPED }).await {
            Ok(StreamOutcome::Deleted) => empty(StatusCode::NO_CONTENT),
            Ok(outcome) => outcome_error(outcome),
            Err(r) => r.into(),
        }
    }
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => {
                let hex = std::str::from_utf8(&b[i + 1..i + 3])
                    .ok()
                    .and_then(|h| u8::from_str_radix(h, 16).ok());
                match hex {
                    Some(v) => {
                        out.push(v);
                        i += 3;
                    }
                    None => {
                        out.push(b'%');
                        i += 1;
                    }
                }
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn producer_of(h: &HeaderMap) -> Result<Option<ProducerTuple>, Response> {
    let id = header_str(h, "producer-id")?;
    let epoch = header_str(h, "producer-epoch")?;
    let seq = header_str(h, "producer-seq")?;
    match (id, epoch, seq) {
        (None, None, None) => Ok(None),
        (Some(id), Some(epoch), Some(seq)) => {
            if id.is_empty() {
                return Err(text(StatusCode::BAD_REQUEST, "Producer-Id is empty"));
            }
            let number = |s: &str| {
                s.parse::<u64>()
                    .ok()
                    .filter(|v| *v < (1u64 << 53) && s.bytes().all(|b| b.is_ascii_digit()))
            };
            let (Some(epoch), Some(seq)) = (number(epoch), number(seq)) else {
                return Err(text(
                    StatusCode::BAD_REQUEST,
                    "Producer-Epoch and Producer-Seq are integers",
                ));
            };
            Ok(Some(ProducerTuple { id: id.to_string(), epoch, seq }))
        }
        _ => Err(text(
            StatusCode::BAD_REQUEST,
            "Producer-Id, Producer-Epoch and Producer-Seq go together",
        )),
    }
}

fn created_response(outcome: StreamOutcome, host: &str, name: &str) -> Response {
    match outcome {
        StreamOutcome::Created { tail, content_type, closed } => {
            let mut r = empty(StatusCode::CREATED);
            set(&mut r, "content-type", content_type);
            set(&mut r, "stream-next-offset", offset(tail));
            set(&mut r, "location", format!("http://{host}{name}"));
            if closed {
                set(&mut r, "stream-closed", "true");
            }
            r
        }
        StreamOutcome::Exists { tail, content_type, closed } => {
            let mut r = empty(StatusCode::OK);
            set(&mut r, "content-type", content_type);
            set(&mut r, "stream-next-offset", offset(tail));
            if closed {
                set(&mut r, "stream-closed", "true");
            }
            r
        }
        other => outcome_error(other),
    }
}

fn append_response(
    outcome: StreamOutcome,
    producer: Option<&ProducerTuple>,
    close_only: bool,
) -> Response {
    match outcome {
        StreamOutcome::Appended { tail, closed, version } => {
            let status = if producer.is_some() && !close_only {
                StatusCode::OK
            } else {
                StatusCode::NO_CONTENT
            };
            let mut r = empty(status);
            set(&mut r, "stream-next-offset", offset(tail));
            set(&mut r, STREAM_VERSION, version);
            if closed {
                set(&mut r, "stream-closed", "true");
            }
            if let Some(p) = producer {
                set(&mut r, "producer-epoch", p.epoch);
                set(&mut r, "producer-seq", p.seq);
            }
            r
        }
        StreamOutcome::Duplicate { tail, closed, epoch, last_seq } => {
            let mut r = empty(StatusCode::NO_CONTENT);
            set(&mut r, "stream-next-offset", offset(tail));
            if closed {
                set(&mut r, "stream-closed", "true");
            }
            set(&mut r, "producer-epoch", epoch);
            set(&mut r, "producer-seq", last_seq);
            r
        }
        other => outcome_error(other),
    }
}

fn outcome_error(outcome: StreamOutcome) -> Response {
    match outcome {
        StreamOutcome::NotFound => text(StatusCode::NOT_FOUND, "no such stream"),
        StreamOutcome::Gone => text(StatusCode::GONE, "the stream was deleted"),
        StreamOutcome::Closed { tail } => {
            let mut r = text(StatusCode::CONFLICT, "the stream is closed");
            set(&mut r, "stream-closed", "true");
            set(&mut r, "stream-next-offset", offset(tail));
            r
        }
        StreamOutcome::Conflict(why) => text(StatusCode::CONFLICT, why),
        StreamOutcome::VersionMismatch { version } => {
            let mut r = text(
                StatusCode::CONFLICT,
                format!("the stream's version is {version}, not the one expected"),
            );
            set(&mut r, STREAM_VERSION, version);
            r
        }
        StreamOutcome::StaleEpoch { epoch } => {
            let mut r = text(
                StatusCode::FORBIDDEN,
                format!("a newer producer epoch ({epoch}) fenced this one"),
            );
            set(&mut r, "producer-epoch", epoch);
            r
        }
        StreamOutcome::SequenceGap { expected, received } => {
            let mut r = text(
                StatusCode::CONFLICT,
                format!("expected producer sequence {expected}, got {received}"),
            );
            set(&mut r, "producer-expected-seq", expected);
            set(&mut r, "producer-received-seq", received);
            r
        }
        StreamOutcome::Invalid(why) => text(StatusCode::BAD_REQUEST, why),
        other => text(StatusCode::INTERNAL_SERVER_ERROR, format!("unexpected outcome {other:?}")),
    }
}

fn head_response(view: &StreamView) -> Response {
    let mut r = empty(StatusCode::OK);
    set(&mut r, "content-type", &view.content_type);
    set(&mut r, "stream-next-offset", offset(view.tail));
    set(&mut r, "cache-control", "no-store");
    set(&mut r, STREAM_VERSION, view.version);
    if view.closed {
        set(&mut r, "stream-closed", "true");
    }
    if let Some(ttl) = view.ttl_secs {
        set(&mut r, "stream-ttl", ttl);
    }
    if let Some((at, _)) = &view.expires_at {
        set(&mut r, "stream-expires-at", at);
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_format_sort_and_parse() {
        assert_eq!(offset(0), "0000000000000000_0000000000000000");
        assert!(offset(9) < offset(10));
        assert_eq!(parse_offset(&offset(42)), Some(42));
        assert_eq!(parse_offset("9999999999999999_9999999999999999"), Some(u64::MAX));
        for bad in ["", "1", "_1", "1_", "a_1", "1_2_3", "-1_0", " 1_2"] {
            assert_eq!(parse_offset(bad), None, "{bad}");
        }
    }

    #[test]
    fn timestamps_parse_as_rfc3339() {
        assert_eq!(parse_rfc3339("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(parse_rfc3339("2000-03-01T00:00:00.5Z"), Some(951_868_800_500));
        assert_eq!(parse_rfc3339("2000-03-01T01:00:00+01:00"), Some(951_868_800_000));
        for bad in
            ["not-a-timestamp", "2000-13-01T00:00:00Z", "2000-03-01 00:00", "2000-03-01T00:00:00"]
        {
            assert_eq!(parse_rfc3339(bad), None, "{bad}");
        }
    }

    #[test]
    fn json_bodies_flatten_one_level() {
        assert_eq!(
            json_message(b"[1, [2,3], {\"a\":1}]"),
            Ok(Some(Bytes::from("1,[2,3],{\"a\":1}")))
        );
        assert_eq!(json_message(b"\"s\""), Ok(Some(Bytes::from("\"s\""))));
        assert_eq!(json_message(b"[]"), Ok(None));
        assert!(json_message(b"{oops").is_err());
        // Elements as written (a comma inside a string is not a separator); trailing bytes and
        // a broken element are refused.
        assert_eq!(
            json_message(b" [ \"a,b\" , {\"x\": [1, 2]} ] "),
            Ok(Some(Bytes::from("\"a,b\",{\"x\": [1, 2]}")))
        );
        assert!(json_message(b"[1] 2").is_err());
        assert!(json_message(b"[1, {]").is_err());
        let many: String = format!("[{}0]", "0,".repeat(100_000));
        let flat = json_message(many.as_bytes()).expect("valid").expect("elements");
        assert_eq!(flat.len(), many.len() - 2);
    }

    #[test]
    fn strict_integers_refuse_signs_zeros_and_fractions() {
        assert_eq!(strict_u64("3600"), Some(3600));
        assert_eq!(strict_u64("0"), Some(0));
        for bad in ["abc", "-1", "00060", "+60", "60.5", "1e3", ""] {
            assert_eq!(strict_u64(bad), None, "{bad}");
        }
    }
}
