#!/usr/bin/env bash
# Stop the single-node SLURM cluster started by .ci/slurm-up.sh: cancel what is still queued,
# then stop slurmd, slurmctld and munged by PID (pid files; never by process name).  Idempotent.
# Leaves the packages and /etc/slurm/slurm.conf in place, so slurm-up.sh restarts quickly.
BASE=${SLURM_CI_BASE:-/tmp/slurm-ci}
if [ -s "$BASE/run/slurmctld.pid" ] && kill -0 "$(cat "$BASE/run/slurmctld.pid")" 2>/dev/null; then
  timeout 10 scancel --full --user="$(id -un)" 2>/dev/null || true
fi
for pf in "$BASE/run/slurmd.pid" "$BASE/run/slurmctld.pid" /run/munge/munged.pid; do
  [ -s "$pf" ] || continue
  pid=$(cat "$pf")
  kill "$pid" 2>/dev/null || { rm -f "$pf"; continue; }
  for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
  rm -f "$pf"
  echo "slurm-down: stopped $(basename "$pf" .pid) ($pid)"
done
exit 0
