# Sourced by the sbatch templates. `run_requeueable CMD...` runs CMD; when the scheduler's warning
# signal (SIGUSR1, asked for by `#SBATCH --signal=B:USR1@SECONDS`) reaches this script before the
# time limit, CMD gets SIGTERM (defend's runs save a checkpoint at the next step and stop), and the
# job requeues itself: its next start resumes from that checkpoint (train.resume=auto). At most
# MAX_REQUEUES times. SIGTERM from scancel is not trapped: a cancelled job stays cancelled.
# STOP_STEPS=1: CMD is an srun; the SIGTERM goes to its tasks through Slurm (srun itself would end
# them at once on a SIGTERM, with no time to save).
stop_run() {
  if [ "${STOP_STEPS:-0}" = 1 ]; then
    scancel --signal=TERM "$SLURM_JOB_ID"  # every step's tasks, not this script
  else
    kill -TERM "$1" 2>/dev/null || true
  fi
}

run_requeueable() {
  local stop_requested=0 status=0 pid
  "$@" &
  pid=$!
  trap 'stop_requested=1; echo "[defend] warning signal: the run checkpoints and stops"; stop_run '"$pid"'' USR1
  while :; do
    wait "$pid" && status=0 || status=$?
    kill -0 "$pid" 2>/dev/null || break  # a trapped signal interrupts `wait`; the run goes on
  done
  if [ "$status" -gt 128 ]; then  # the run ended while `wait` was interrupted: ask for its own status
    local again=0
    wait "$pid" 2>/dev/null || again=$?
    [ "$again" != 127 ] && status=$again
  fi
  trap - USR1
  if [ "$stop_requested" = 1 ] && [ "$status" != 0 ]; then
    if [ "${SLURM_RESTART_COUNT:-0}" -ge "${MAX_REQUEUES:-3}" ]; then
      echo "[defend] stopped by the warning signal and already requeued ${MAX_REQUEUES:-3} times (slurm.max_requeues): not again"
    else
      echo "[defend] requeueing job $SLURM_JOB_ID (restart $(( ${SLURM_RESTART_COUNT:-0} + 1 ))): it resumes from the checkpoint"
      scontrol requeue "$SLURM_JOB_ID" && sleep 300  # the requeue ends this job
      echo "[defend] scontrol requeue failed (does the cluster allow requeueing? JobRequeue in slurm.conf):" \
        "submit the same script again to resume"
    fi
  fi
  return "$status"
}
