# Sourced by the Ray sbatch templates. `ray_up` starts a Ray cluster on this job's nodes: the head on
# the first node, one worker on each other node, every one an `srun` step (so Slurm tracks and kills
# them), and stops it when the script exits, so no Ray process outlives the job. Afterwards:
#   RAY_ADDRESS   the head's GCS (HOST:PORT), for `ray.address=auto` inside the cluster
#   RAY_JOB_API   the job API (http://HOST:PORT), for `defend submit ray` on the first node
# Needs PYTHON (an interpreter with ray installed); RAY_CPUS, RAY_GPUS per node; SRUN_CONTAINER (an array
# of srun options, possibly empty).
node_addr() { scontrol show node "$1" | grep -oP 'NodeAddr=\K\S+'; }

ray_up() {
  local nodes head i base
  mapfile -t nodes < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
  head=${nodes[0]}
  # every port from the job id: jobs sharing a node don't collide; all above Ray's worker range
  base=$((20000 + (SLURM_JOB_ID % 400) * 100))
  export RAY_ADDRESS="$(node_addr "$head"):$base" RAY_JOB_API="http://127.0.0.1:$((base + 1))"
  export RAY_AUTH_MODE=${RAY_AUTH_MODE:-token} RAY_USAGE_STATS_ENABLED=${RAY_USAGE_STATS_ENABLED:-0}
  if [[ $RAY_AUTH_MODE == token ]]; then  # `ray start` makes no token (Ray 2.60): one in ~/.ray/auth_token if none is set
    "$PYTHON" -m ray.scripts.scripts get-auth-token --generate >/dev/null  # (it prints the token: kept out of the log)
  fi
  RAY_STEP_PIDS=()
  RAY_TMP=${RAY_TMPDIR:-/tmp/ray-$SLURM_JOB_ID}  # the head's logs and sockets, kept for debugging
  trap ray_down EXIT
  local ray=("$PYTHON" -m ray.scripts.scripts start --block --num-cpus="${RAY_CPUS:-1}" --num-gpus="${RAY_GPUS:-0}")
  # the dashboard (job API) listens on the head's loopback only: the driver is submitted from there
  srun --overlap --nodes=1 --ntasks=1 -w "$head" ${SRUN_CONTAINER[@]+"${SRUN_CONTAINER[@]}"} "${ray[@]}" --head \
    --node-ip-address="$(node_addr "$head")" --port="$base" --dashboard-host=127.0.0.1 \
    --dashboard-port=$((base + 1)) --ray-client-server-port=$((base + 2)) \
    --dashboard-agent-listen-port=$((base + 3)) --temp-dir="$RAY_TMP" &
  RAY_STEP_PIDS+=($!)
  ray_wait_nodes 1
  for i in $(seq 1 $((${#nodes[@]} - 1))); do
    srun --overlap --nodes=1 --ntasks=1 -w "${nodes[$i]}" ${SRUN_CONTAINER[@]+"${SRUN_CONTAINER[@]}"} "${ray[@]}" \
      --address="$RAY_ADDRESS" --node-ip-address="$(node_addr "${nodes[$i]}")" \
      --dashboard-agent-listen-port=$((base + 3 + i)) &
    RAY_STEP_PIDS+=($!)
  done
  ray_wait_nodes "${#nodes[@]}"
  echo "[defend] Ray cluster up: ${#nodes[@]} node(s), head $RAY_ADDRESS, job API $RAY_JOB_API"
}

ray_wait_nodes() {  # until N nodes are alive, at most RAY_START_TIMEOUT seconds
  local want=$1 deadline=$((SECONDS + ${RAY_START_TIMEOUT:-180}))
  until "$PYTHON" - "$want" <<'PY' 2>/dev/null
import sys, ray
ray.init(address="auto", logging_level="ERROR", log_to_driver=False)
sys.exit(0 if sum(n["Alive"] for n in ray.nodes()) >= int(sys.argv[1]) else 1)
PY
  do
    if [ $SECONDS -ge $deadline ]; then
      echo "[defend] Ray: fewer than $want node(s) joined within ${RAY_START_TIMEOUT:-180}s; see the srun output above" >&2
      exit 1
    fi
    sleep 2
  done
}

ray_down() {  # SIGTERM to the Ray steps' tasks (`ray start --block` stops its node), then wait for them
  echo "[defend] stopping the Ray cluster"
  scancel --signal=TERM "$SLURM_JOB_ID" 2>/dev/null || true
  wait "${RAY_STEP_PIDS[@]}" 2>/dev/null || true
}
