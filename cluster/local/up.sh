#!/usr/bin/env bash
# Start a Ray cluster on this machine, bound to 127.0.0.1: one head plus $WORKERS worker nodes.
# `up.sh --add N` adds N worker nodes to the cluster already running (a node joining an elastic run).
# Each node is a `ray start --block` process whose pid goes to $STATE/*.pid; down.sh stops exactly those.
# Token auth is on (RAY_AUTH_MODE=token); the token comes from RAY_AUTH_TOKEN or ~/.ray/auth_token (made if absent).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
RAY="${RAY:-$ROOT/.venv/bin/ray}"
STATE="${DTRAIN_CLUSTER_DIR:-/tmp/dtrain-local-cluster}"  # pid files, logs and Ray's temp dir (keep it short)
WORKERS="${WORKERS:-1}"                 # worker nodes besides the head
CPUS="${CPUS_PER_NODE:-1}"              # logical CPUs per node: 1 makes a 2-worker job span 2 nodes
GCS_PORT="${GCS_PORT:-6390}"            # not Ray's defaults (6379, 8265), so a default Ray can run beside it
DASHBOARD_PORT="${DASHBOARD_PORT:-8275}"
PORT_BASE="${PORT_BASE:-21000}"         # node i uses PORT_BASE + 100*i .. + 99 (agents, metrics, worker ports)

ADD=0
if [ "${1:-}" = "--add" ]; then ADD="${2:-1}"; fi

[ -x "$RAY" ] || { echo "up.sh: $RAY not found; run \`make install\` or set RAY=/path/to/ray" >&2; exit 2; }
if [ "$ADD" -gt 0 ] && [ ! -f "$STATE/head.pid" ]; then
    echo "up.sh: no cluster recorded in $STATE to add nodes to; run cluster/local/up.sh first" >&2; exit 2
fi
if [ "$ADD" -eq 0 ] && compgen -G "$STATE/*.pid" > /dev/null; then
    echo "up.sh: a cluster is already recorded in $STATE; run cluster/local/down.sh first" >&2; exit 2
fi
mkdir -p "$STATE"
# Jobs run `python -m dtrain ...`: that python must be the one next to ray.
export PATH="$(dirname "$RAY"):$PATH"
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"
# On SIGTERM a node drains first; a head never finishes draining, so keep down.sh from waiting Ray's 30 s.
export RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="${RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S:-3}"
if [ "$RAY_AUTH_MODE" = token ] && [ -z "${RAY_AUTH_TOKEN:-}" ] && [ -z "${RAY_AUTH_TOKEN_PATH:-}" ]; then
    "$RAY" get-auth-token --generate > /dev/null  # reuses ~/.ray/auth_token when it exists
fi

start_node() {  # start_node NAME INDEX ARGS...: start one node in the background and wait until it is up
    local name="$1" idx="$2" base=$((PORT_BASE + 100 * $2)); shift 2
    # A temp dir per node: nodes sharing one would share log and runtime_env directories, so each node's log
    # monitor would echo the other's lines and one node could delete a job's working_dir under the other.
    nohup "$RAY" start --block --node-ip-address 127.0.0.1 --num-cpus "$CPUS" --temp-dir "$STATE/n$idx" \
        --dashboard-agent-listen-port "$base" --dashboard-agent-grpc-port $((base + 1)) \
        --runtime-env-agent-port $((base + 2)) --metrics-export-port $((base + 3)) \
        --node-manager-port $((base + 4)) --object-manager-port $((base + 5)) \
        --min-worker-port $((base + 10)) --max-worker-port $((base + 99)) --disable-usage-stats "$@" \
        > "$STATE/$name.log" 2>&1 &
    echo $! > "$STATE/$name.pid"
    for _ in $(seq 1 240); do
        if grep -q "Ray runtime started" "$STATE/$name.log"; then return 0; fi
        if ! kill -0 "$(cat "$STATE/$name.pid")" 2> /dev/null; then break; fi
        sleep 0.5
    done
    echo "up.sh: node $name did not start; last lines of $STATE/$name.log:" >&2
    tail -n 20 "$STATE/$name.log" >&2
    exit 1
}

if [ "$ADD" -gt 0 ]; then  # new nodes take the next indices (and port blocks); a stopped node's are not reused
    last=0
    for log in "$STATE"/worker*.log; do
        [ -e "$log" ] || continue
        i="${log##*/worker}"; i="${i%.log}"
        [ "$i" -gt "$last" ] && last="$i"
    done
    for i in $(seq $((last + 1)) $((last + ADD))); do
        start_node "worker$i" "$i" --address "127.0.0.1:$GCS_PORT"
    done
    echo "Added $ADD worker node(s) to the local Ray cluster in $STATE"
    exit 0
fi

start_node head 0 --head --port "$GCS_PORT" --include-dashboard true --dashboard-host 127.0.0.1 \
    --dashboard-port "$DASHBOARD_PORT" --ray-client-server-port $((PORT_BASE + 6))
for i in $(seq 1 "$WORKERS"); do
    start_node "worker$i" "$i" --address "127.0.0.1:$GCS_PORT"
done

echo "http://127.0.0.1:$DASHBOARD_PORT" > "$STATE/address"
echo "Local Ray cluster up: head + $WORKERS worker node(s), $CPUS CPU(s) each, state in $STATE"
echo "  dashboard / Jobs API: http://127.0.0.1:$DASHBOARD_PORT   GCS: 127.0.0.1:$GCS_PORT"
echo "  try: .venv/bin/dtrain submit jobs/mlp_digits.yaml trainer.max_epochs=3 --address http://127.0.0.1:$DASHBOARD_PORT --follow"
echo "  stop: make cluster-down"
