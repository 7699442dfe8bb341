#!/usr/bin/env bash
# Stop every daemon tests/cluster/slurm_up.sh started in STATE_DIR (by the PIDs it recorded), and the
# jobs' processes with them. Safe to run twice.
set -uo pipefail
STATE=$(realpath -m "${1:?usage: slurm_down.sh STATE_DIR}")
[ -f "$STATE/pids" ] || exit 0
if [ -f "$STATE/slurm.conf" ]; then  # cancel what is still queued or running
  SLURM_CONF="$STATE/slurm.conf" timeout 10 scancel --full --user="$(id -un)" 2>/dev/null || true
fi
tac "$STATE/pids" | while read -r name pid; do
  kill -TERM "$pid" 2>/dev/null || true
done
for _ in $(seq 100); do
  alive=0
  while read -r name pid; do kill -0 "$pid" 2>/dev/null && alive=1; done < "$STATE/pids"
  [ "$alive" = 0 ] && break
  sleep 0.1
done
while read -r name pid; do kill -KILL "$pid" 2>/dev/null || true; done < "$STATE/pids"
rm -f "$STATE/pids"
