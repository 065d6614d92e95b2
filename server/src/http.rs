//! The HTTP admin port: `/metrics` (Prometheus text), `/livez`, `/readyz` (has a leader and has
//! applied what it knows committed), `/v1/status` (JSON).

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Json};
use axum::routing::get;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::sync::watch;

use crate::api::status_response;
use crate::shell::Shared;

/// Latency buckets in seconds, from 50 us to 10 s.
const SECONDS_BUCKETS: &[f64] = &[
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0,
];

/// Group sizes in entries, 1 to 64 Ki.
const COUNT_BUCKETS: &[f64] =
    &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 1024.0, 4096.0, 16384.0, 65536.0];
/// Group sizes in bytes, 256 B to 64 MiB.
const BYTES_BUCKETS: &[f64] = &[
    256.0,
    1024.0,
    4096.0,
    16384.0,
    65536.0,
    262_144.0,
    1_048_576.0,
    4_194_304.0,
    16_777_216.0,
    67_108_864.0,
];

/// The process's Prometheus recorder, installed on first use (before any node creates its
/// metric handles, which would otherwise stay no-ops).
pub fn prometheus() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS_BUCKETS)
            .expect("the bucket list is not empty")
            .set_buckets_for_metric(
                Matcher::Full("raftwal_wal_group_entries".into()),
                COUNT_BUCKETS,
            )
            .expect("the bucket list is not empty")
            .set_buckets_for_metric(Matcher::Full("raftwal_wal_group_bytes".into()), BYTES_BUCKETS)
            .expect("the bucket list is not empty")
            .build_recorder();
        let handle = recorder.handle();
        // Another recorder may be installed already (a test harness): keep going without ours.
        let _ = metrics::set_global_recorder(recorder);
        let upkeep = handle.clone();
        std::thread::Builder::new()
            .name("raftwal-metrics-upkeep".into())
            .spawn(move || {
                loop {
                    std::thread::sleep(Duration::from_secs(5));
                    upkeep.run_upkeep();
                }
            })
            .expect("spawn the metrics upkeep thread");
        handle
    })
}

/// Serves the admin port until `shutdown` turns true.
pub fn serve(
    shared: Arc<Shared>,
    listener: tokio::net::TcpListener,
    max_connections: usize,
    mut shutdown: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    let app = Router::new()
        .route("/metrics", get(|| async { prometheus().render() }))
        .route("/livez", get(livez))
        .route("/readyz", get(readyz))
        .route("/v1/status", get(status))
        .with_state(shared);
    tokio::spawn(async move {
        let stop = async move {
            let _ = shutdown.wait_for(|s| *s).await;
        };
        let listener = crate::conn_limit::HttpListener::new(listener, max_connections, "http");
        if let Err(e) = axum::serve(listener, app).with_graceful_shutdown(stop).await {
            tracing::error!(error = %e, "the HTTP admin port stopped");
        }
    })
}

async fn livez(State(shared): State<Arc<Shared>>) -> impl IntoResponse {
    match shared.failure.borrow().clone() {
        None => (StatusCode::OK, "ok\n".to_string()),
        Some(e) => (StatusCode::SERVICE_UNAVAILABLE, format!("failed: {e}\n")),
    }
}

async fn readyz(State(shared): State<Arc<Shared>>) -> impl IntoResponse {
    let (leader, commit, repair_floor) = {
        let s = shared.status.read();
        (s.leader, s.commit, s.repair_floor)
    };
    let readable = *shared.readable.borrow();
    if shared.failure.borrow().is_some() {
        (StatusCode::SERVICE_UNAVAILABLE, "failed\n".to_string())
    } else if leader.is_none() {
        (StatusCode::SERVICE_UNAVAILABLE, "no leader\n".to_string())
    } else if let Some((index, term)) = repair_floor {
        let msg = format!("repairing from peers: the log must reach {term}/{index} again\n");
        (StatusCode::SERVICE_UNAVAILABLE, msg)
    } else if readable.0 + 1 < commit.0 {
        (StatusCode::SERVICE_UNAVAILABLE, format!("catching up: applied {readable} of {commit}\n"))
    } else {
        (StatusCode::OK, "ready\n".to_string())
    }
}

async fn status(State(shared): State<Arc<Shared>>) -> impl IntoResponse {
    let s = status_response(&shared, 0);
    let repair_floor = shared.status.read().repair_floor;
    Json(serde_json::json!({
        "repairing_to": repair_floor.map(|(index, term)| serde_json::json!({"offset": index.0, "term": term.0})),
        "node_id": s.node_id,
        "role": s.role,
        "term": s.term,
        "leader_id": s.leader_id,
        "leader_addr": s.leader_addr,
        "commit_offset": s.commit_offset,
        "applied_offset": s.applied_offset,
        "first_offset": s.first_offset,
        "last_offset": s.last_offset,
        "members": s.members.iter().map(|m| serde_json::json!({"id": m.id, "kind": m.kind, "addr": m.addr})).collect::<Vec<_>>(),
        "progress": s.progress.iter().map(|p| serde_json::json!({"id": p.id, "match_offset": p.match_offset, "next_offset": p.next_offset, "state": p.state, "active": p.active})).collect::<Vec<_>>(),
    }))
}
