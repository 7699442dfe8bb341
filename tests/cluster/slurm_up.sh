#!/usr/bin/env bash
# A real single-host Slurm for tests: munged, slurmctld and NODES slurmd (n1, n2, ...) started by hand
# (no systemd), every daemon on 127.0.0.1 with ports picked free, all state under STATE_DIR.
#
#   tests/cluster/slurm_up.sh STATE_DIR [NODES]     # then: export SLURM_CONF=STATE_DIR/slurm.conf
#   tests/cluster/slurm_down.sh STATE_DIR           # stops every daemon it started, by PID
#
# Needs Debian's slurmctld slurmd slurm-client munge (tests/cluster/install_deps.sh) and root (slurmd
# runs jobs as their submitter).
set -euo pipefail
STATE=$(realpath -m "${1:?usage: slurm_up.sh STATE_DIR [NODES]}")
NODES=${2:-1}
CPUS=${SLURM_UP_CPUS:-2}
here=$(dirname "$0")
"$here/install_deps.sh" --check

mkdir -p "$STATE"/{munge,ctld,log}
chmod 700 "$STATE/munge"
: > "$STATE/pids"

free_ports() {  # N free TCP ports on loopback
  python3 - "$1" <<'PY'
import socket, sys
socks = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))
PY
}
read -r -a PORTS <<< "$(free_ports $((NODES + 1)))"

# munge: a private key and socket, so this cluster never talks to a system munged
dd if=/dev/urandom of="$STATE/munge/munge.key" bs=1024 count=1 status=none
chmod 400 "$STATE/munge/munge.key"
munged --force --key-file="$STATE/munge/munge.key" --socket="$STATE/munge/munge.sock" \
  --pid-file="$STATE/munge/munged.pid" --log-file="$STATE/log/munged.log" --seed-file="$STATE/munge/seed"
for _ in $(seq 50); do [ -s "$STATE/munge/munged.pid" ] && break; sleep 0.1; done
echo "munged $(cat "$STATE/munge/munged.pid")" >> "$STATE/pids"

node_lines=""
for i in $(seq 1 "$NODES"); do
  node_lines+="NodeName=n$i NodeAddr=127.0.0.1 NodeHostName=$(hostname) Port=${PORTS[$i]} CPUs=$CPUS State=UNKNOWN"$'\n'
done
cat > "$STATE/slurm.conf" <<CONF
ClusterName=defendtest
SlurmctldHost=$(hostname)(127.0.0.1)
SlurmctldPort=${PORTS[0]}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire: also how long a requeued job waits before it may start again (default 120 s)
AuthInfo=socket=$STATE/munge/munge.sock,cred_expire=10
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool-%n
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd-%n.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
MpiDefault=none
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/filetxt
JobCompLoc=$STATE/log/jobcomp.txt
ReturnToService=2
SlurmdTimeout=60
KillWait=20
MinJobAge=600
$node_lines
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF
export SLURM_CONF="$STATE/slurm.conf"

start() {  # name, command...: a daemon in its own session, its PID recorded
  local name=$1; shift
  setsid "$@" > "$STATE/log/$name.out" 2>&1 < /dev/null &
  echo "$name $!" >> "$STATE/pids"
}
start slurmctld slurmctld -D -i -f "$SLURM_CONF"
for i in $(seq 1 "$NODES"); do
  mkdir -p "$STATE/spool-n$i"
  start "slurmd-n$i" slurmd -D -N "n$i" -f "$SLURM_CONF"
done

for _ in $(seq 300); do  # up to 30 s for every node to be idle
  idle=$(sinfo -h -N -t idle -o '%N' 2>/dev/null | sort -u | wc -l)
  [ "$idle" -ge "$NODES" ] && { echo "slurm up: $NODES node(s), SLURM_CONF=$SLURM_CONF"; exit 0; }
  sleep 0.1
done
echo "slurm_up.sh: nodes did not come up; see $STATE/log" >&2
sinfo -N >&2 || true
tail -n 20 "$STATE"/log/*.log >&2 || true
"$here/slurm_down.sh" "$STATE"
exit 1
