#!/usr/bin/env bash
# raftwal against etcd on this machine, in one run: the same 3-member shape on 127.0.0.1,
# the same value size, the same number of requests in flight, fsync on in both.
#
#   bench/compare-etcd.sh                     # defaults: 256 B, 10 s per point
#   DURATION=20 VALUE=1024 bench/compare-etcd.sh
#
# It installs etcd from Debian's packages if missing (etcd-server), starts three members with
# their data in a temp dir, runs `raftwal-bench etcd` (KV.Put over etcd's gRPC API) and
# `raftwal-bench append --local 3` at each concurrency, prints a markdown table with the
# ratios, and stops everything it started (also on Ctrl-C or failure).
#
# Concurrency is requests in flight. etcd is driven by N clients with one put each (its own
# benchmark tool's shape). raftwal is driven twice: N clients with one append each (the same
# shape), and 16 clients pipelining N/16 appends each over AppendStream (the same number in
# flight, the way a raftwal producer writes).
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION="${DURATION:-10}"
WARMUP="${WARMUP:-2}"
VALUE="${VALUE:-256}"
CONCURRENCY="${CONCURRENCY:-1 64 1024}"

if ! command -v etcd >/dev/null 2>&1; then
    echo "installing etcd from Debian's packages..." >&2
    if [ "$(id -u)" -eq 0 ]; then
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q etcd-server >/dev/null
    else
        sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -q etcd-server >/dev/null
    fi
fi

cargo build --release -q -p raftwal-bench
BENCH=./target/release/raftwal-bench

WORK="$(mktemp -d "${TMPDIR:-/tmp}/raftwal-vs-etcd.XXXXXX")"
PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
    rm -rf "$WORK"
}
trap cleanup EXIT INT TERM

# Three members on 127.0.0.1; ports from a base that is free now.
BASE="${ETCD_BASE_PORT:-23790}"
CLUSTER=""
for i in 1 2 3; do
    CLUSTER+="m$i=http://127.0.0.1:$((BASE + 10 * i + 1)),"
done
CLUSTER="${CLUSTER%,}"
ENDPOINTS=""
for i in 1 2 3; do
    client=$((BASE + 10 * i))
    peer=$((BASE + 10 * i + 1))
    etcd --name "m$i" --data-dir "$WORK/m$i" \
        --listen-client-urls "http://127.0.0.1:$client" --advertise-client-urls "http://127.0.0.1:$client" \
        --listen-peer-urls "http://127.0.0.1:$peer" --initial-advertise-peer-urls "http://127.0.0.1:$peer" \
        --initial-cluster "$CLUSTER" --initial-cluster-state new --initial-cluster-token raftwal-bench \
        --quota-backend-bytes 8589934592 --log-level error >"$WORK/m$i.log" 2>&1 &
    PIDS+=("$!")
    ENDPOINTS+="http://127.0.0.1:$client,"
done
ENDPOINTS="${ENDPOINTS%,}"
for _ in $(seq 1 100); do
    if ETCDCTL_API=3 etcdctl --endpoints "$ENDPOINTS" endpoint health >/dev/null 2>&1; then break; fi
    sleep 0.2
done
ETCDCTL_API=3 etcdctl --endpoints "$ENDPOINTS" endpoint health >/dev/null 2>&1 || { echo "etcd did not become healthy; see $WORK/m*.log" >&2; exit 1; }

field() { python3 -c "import json,sys; print(round(json.loads(sys.stdin.read())['$1']))"; }

echo "| in flight | etcd puts/s | etcd p50 / p99 us | raftwal, same shape: records/s | p50 / p99 us | ratio | raftwal, pipelined: records/s | p50 / p99 us | ratio |"
echo "|---|---|---|---|---|---|---|---|---|"
for n in $CONCURRENCY; do
    etcd_json="$($BENCH etcd --endpoints "$ENDPOINTS" --clients "$n" --value-size "$VALUE" \
        --duration "$DURATION" --warmup "$WARMUP" --json)"
    same_json="$($BENCH append --local 3 --clients "$n" --depth 1 --record-size "$VALUE" \
        --duration "$DURATION" --warmup "$WARMUP" --json)"
    if [ "$n" -ge 16 ]; then
        piped_json="$($BENCH append --local 3 --clients 16 --depth $((n / 16)) --record-size "$VALUE" \
            --duration "$DURATION" --warmup "$WARMUP" --json)"
    else
        piped_json="$same_json"
    fi
    e=$(echo "$etcd_json" | field records_per_s)
    s=$(echo "$same_json" | field records_per_s)
    p=$(echo "$piped_json" | field records_per_s)
    echo "| $n | $e | $(echo "$etcd_json" | field p50_us) / $(echo "$etcd_json" | field p99_us) \
| $s | $(echo "$same_json" | field p50_us) / $(echo "$same_json" | field p99_us) \
| $(python3 -c "print(f'{$s/max($e,1):.1f}x')") \
| $p | $(echo "$piped_json" | field p50_us) / $(echo "$piped_json" | field p99_us) \
| $(python3 -c "print(f'{$p/max($e,1):.1f}x')") |"
done
echo
echo "3 members each on 127.0.0.1, $VALUE B values, fsync on in both (etcd $(etcd --version | head -1 | awk '{print $3}'), raftwal durability sync), ${DURATION}s measured after ${WARMUP}s warm-up."
