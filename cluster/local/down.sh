#!/usr/bin/env bash
# Stop the local cluster that up.sh started: SIGTERM each recorded `ray start --block` (workers first, then the
# head), which shuts its node down; SIGKILL after a grace period. Touches no other Ray on the machine.
set -uo pipefail

STATE="${DTRAIN_CLUSTER_DIR:-/tmp/dtrain-local-cluster}"
GRACE="${GRACE:-30}"  # seconds to wait for a node to shut down cleanly

stop_pid_file() {
    local file="$1" pid
    pid="$(cat "$file")"
    if kill -0 "$pid" 2> /dev/null; then
        kill -TERM "$pid"
        for _ in $(seq 1 $((GRACE * 4))); do
            kill -0 "$pid" 2> /dev/null || break
            sleep 0.25
        done
        if kill -0 "$pid" 2> /dev/null; then
            echo "down.sh: $(basename "$file" .pid) (pid $pid) ignored SIGTERM; killing it" >&2
            kill -KILL "$pid" 2> /dev/null
        fi
    fi
    rm -f "$file"
}

shopt -s nullglob
files=("$STATE"/worker*.pid)
[ -f "$STATE/head.pid" ] && files+=("$STATE/head.pid")
if [ ${#files[@]} -eq 0 ]; then
    echo "down.sh: no local cluster recorded in $STATE"
    exit 0
fi
for file in "${files[@]}"; do
    stop_pid_file "$file"
done
rm -f "$STATE/address"
echo "Local Ray cluster in $STATE stopped"
