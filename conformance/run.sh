#!/usr/bin/env bash
# Runs the Durable Streams server conformance suite (@durable-streams/server-conformance-tests,
# pinned in package.json and package-lock.json) against a raftwal cluster: three `raftwal node`
# processes on loopback, each serving the streams API. The suite runs once against the
# leader's streams port and once against a follower's, and prints vitest's own summary for
# each. Everything it starts is stopped on exit.
#
#   conformance/run.sh            # both runs
#   conformance/run.sh leader     # only against the leader (or: follower)
#
# Needs Node 20 or 22 with npm, curl, and cargo. RAFTWAL_BIN names a prebuilt binary.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/.." && pwd)"
which_runs="${1:-both}"

if [[ -z "${RAFTWAL_BIN:-}" ]]; then
  (cd "$root" && cargo build --quiet -p raftwal-server --bin raftwal)
  RAFTWAL_BIN="$root/target/debug/raftwal"
fi

(cd "$here" && npm ci --no-audit --no-fund --loglevel=error >/dev/null)

work="$(mktemp -d /tmp/raftwal-conformance.XXXXXX)"
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

# Free loopback ports: 4 per node (client API, peers, admin HTTP, streams).
mapfile -t ports < <(node -e '
  const net = require("net");
  const n = 12, out = [];
  (function next() {
    if (out.length === n) { console.log(out.join("\n")); return; }
    const s = net.createServer().listen(0, "127.0.0.1", () => { out.push(s.address().port); s.close(next); });
  })();')
api() { echo "127.0.0.1:${ports[$(( ($1 - 1) * 4 ))]}"; }
peer() { echo "127.0.0.1:${ports[$(( ($1 - 1) * 4 + 1 ))]}"; }
admin() { echo "127.0.0.1:${ports[$(( ($1 - 1) * 4 + 2 ))]}"; }
streams() { echo "127.0.0.1:${ports[$(( ($1 - 1) * 4 + 3 ))]}"; }

"$RAFTWAL_BIN" certs init --dir "$work/certs" --nodes 3 >/dev/null
cluster_id=$(( (RANDOM << 15 | RANDOM) + 1 ))
for id in 1 2 3; do
  peers=()
  for p in 1 2 3; do
    [[ $p == "$id" ]] || peers+=("$p@$(peer "$p")@$(api "$p")")
  done
  "$RAFTWAL_BIN" node --id "$id" --data-dir "$work/node-$id" \
    --api-listen "$(api "$id")" --peer-listen "$(peer "$id")" --http-listen "$(admin "$id")" \
    --peers "$(IFS=,; echo "${peers[*]}")" --client-plaintext \
    --set "cluster_id=$cluster_id" --set "tls_ca=$work/certs/ca.pem" \
    --set "tls_cert=$work/certs/node-$id.pem" --set "tls_key=$work/certs/node-$id.key" \
    --set "streams_listen=$(streams "$id")" --set "stream_long_poll_ms=500" \
    >"$work/node-$id.log" 2>&1 &
  pids+=("$!")
done

leader=""
for _ in $(seq 100); do
  for id in 1 2 3; do
    status=$(curl -sf "http://$(admin "$id")/v1/status" || true)
    [[ -n "$status" ]] || continue
    leader=$(node -e 'const s = JSON.parse(process.argv[1]); console.log(s.leader_id || "")' "$status")
    [[ -n "$leader" ]] && break 2
  done
  sleep 0.2
done
if [[ -z "$leader" ]]; then
  echo "no leader was elected; node logs:" >&2
  tail -n 20 "$work"/node-*.log >&2
  exit 1
fi
follower=$(( leader % 3 + 1 ))

status=0
run() {
  local role="$1" id="$2"
  echo "== conformance against the $role (node $id, http://$(streams "$id"))"
  (cd "$here" && CONFORMANCE_TEST_URL="http://$(streams "$id")" npx vitest run conformance.test.mjs) \
    || status=1
}
[[ "$which_runs" == "follower" ]] || run leader "$leader"
[[ "$which_runs" == "leader" ]] || run follower "$follower"
exit "$status"
