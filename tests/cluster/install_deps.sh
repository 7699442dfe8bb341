#!/usr/bin/env bash
# The system packages the cluster tests need: Debian's Slurm daemons and client, and munge.
#   tests/cluster/install_deps.sh           install what is missing (root: apt-get)
#   tests/cluster/install_deps.sh --check   only say what is missing (exit 1)
set -euo pipefail
PACKAGES="slurmctld slurmd slurm-client munge"
missing=""
for tool in slurmctld slurmd sbatch munged; do command -v "$tool" > /dev/null || missing+=" $tool"; done
[ -z "$missing" ] && exit 0
if [ "${1:-}" = "--check" ] || [ "$(id -u)" != 0 ]; then
  echo "missing:$missing. Install them with: sudo apt-get update && sudo apt-get install -y $PACKAGES" >&2
  exit 1
fi
echo "installing $PACKAGES (missing:$missing)" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -q > /dev/null
apt-get install -y -q $PACKAGES > /dev/null
