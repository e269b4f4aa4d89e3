#!/usr/bin/env bash
# Stand up a real single-node SLURM cluster (munge + slurmctld + slurmd) on this machine, for the
# tests marked `slurm` (tests/test_slurm.py).  CI only: run as root on Debian 12 (bookworm), no
# systemd needed.  Idempotent: daemons already running are reused; a healthy cluster is left alone.
# Exits non-zero, printing the tail of the daemon logs, if the node does not become idle.
#
#   bash .ci/slurm-up.sh; trap 'bash .ci/slurm-down.sh' EXIT
#
# State, logs and pid files go under $SLURM_CI_BASE (default /tmp/slurm-ci).  The config itself
# MUST be at the compiled-in default /etc/slurm/slurm.conf: the slurm-jobstep plugin strips SLURM_*
# variables (SLURM_CONF too) before the `srun` inside each job, so a config elsewhere breaks jobs.
# Accounting is off (no slurmdbd), so `sacct` does not work: the CI profile (profiles/slurm-ci)
# polls with squeue, which needs finished jobs kept visible: MinJobAge=300.
set -euo pipefail
BASE=${SLURM_CI_BASE:-/tmp/slurm-ci}
CONF=/etc/slurm/slurm.conf

node_state() { timeout 10 sinfo -h -o %t 2>/dev/null | head -1 || true; }
alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
fail() {
  echo "slurm-up: $*" >&2
  sinfo >&2 2>&1 || true
  for log in "$BASE"/log/slurmctld.log "$BASE"/log/slurmd.log; do
    [ -f "$log" ] && { echo "--- tail $log" >&2; tail -25 "$log" >&2; }
  done
  # munged logs every credential it rejects at Info level (benign here): show only real problems
  [ -f /var/log/munge/munged.log ] && { echo "--- munged.log (errors)" >&2; \
    grep -Ev 'Info:' /var/log/munge/munged.log | tail -10 >&2 || true; }
  exit 1
}

if [ "$(id -u)" -ne 0 ]; then echo "slurm-up: run as root" >&2; exit 1; fi

# 1) packages (their postinst try to start services; without systemd invoke-rc.d refuses: harmless)
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null \
   || ! command -v sbatch >/dev/null || ! command -v munged >/dev/null; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
fi

# 2) munge (key made by the package postinst; make one if missing), run as the munge user
if [ ! -s /etc/munge/munge.key ]; then
  mungekey --create --force
  chown munge:munge /etc/munge/munge.key
  chmod 400 /etc/munge/munge.key
fi
mkdir -p /run/munge /var/log/munge /var/lib/munge
chown munge:munge /run/munge /var/log/munge /var/lib/munge
chmod 0755 /run/munge
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
  runuser -u munge -- /usr/sbin/munged
  for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
fi
munge -n 2>/dev/null | unmunge >/dev/null 2>&1 || fail "munged is not working"

# 3) slurm.conf for this host (NodeName must equal `hostname -s`; addresses pinned to 127.0.0.1
#    so no DNS is needed; RealMemory 512 MB below what slurmd sees, else the node drains)
H=$(hostname -s)
MEM=$(slurmd -C | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p')
CPUS=$(nproc)
mkdir -p "$BASE"/state/ctld "$BASE"/state/d "$BASE"/run "$BASE"/log /etc/slurm
NEW=$(mktemp)
cat > "$NEW" <<CONFEOF
# Written by .ci/slurm-up.sh (single-node CI cluster, no accounting)
ClusterName=ci
SlurmctldHost=${H}(127.0.0.1)
AuthType=auth/munge
CryptoType=crypto/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$BASE/state/ctld
SlurmdSpoolDir=$BASE/state/d
SlurmctldPidFile=$BASE/run/slurmctld.pid
SlurmdPidFile=$BASE/run/slurmd.pid
SlurmctldLogFile=$BASE/log/slurmctld.log
SlurmdLogFile=$BASE/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
MailProg=/bin/true
ReturnToService=2
# keep finished jobs visible to squeue for 5 min (snakemake polls with squeue; >= 3 x init seconds)
MinJobAge=300
SchedulerType=sched/backfill
NodeName=${H} NodeAddr=127.0.0.1 CPUs=${CPUS} RealMemory=$((MEM - 512)) State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONFEOF
changed=0
if ! cmp -s "$NEW" "$CONF"; then
  [ -f "$CONF" ] && ! grep -q '^# Written by .ci/slurm-up.sh' "$CONF" \
    && cp "$CONF" "$CONF.before-slurm-ci"
  cp "$NEW" "$CONF"
  chmod 644 "$CONF"
  changed=1
fi
rm -f "$NEW"

# 4) daemons (they daemonize and write pid files); restart them by PID if the config changed
if [ "$changed" = 1 ]; then
  for pf in "$BASE"/run/slurmd.pid "$BASE"/run/slurmctld.pid; do
    alive "$pf" || continue
    pid=$(cat "$pf"); kill "$pid"
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  done
fi
alive "$BASE"/run/slurmctld.pid || /usr/sbin/slurmctld -i || fail "slurmctld did not start"
alive "$BASE"/run/slurmd.pid || /usr/sbin/slurmd || fail "slurmd did not start"

for _ in $(seq 60); do
  [ "$(node_state)" = idle ] && break
  sleep 0.5
done
st=$(node_state)
if [ "$st" != idle ]; then
  # a node left down/drained by an earlier run: try to resume it once
  timeout 10 scontrol update NodeName="$H" State=RESUME >/dev/null 2>&1 || true
  for _ in $(seq 20); do [ "$(node_state)" = idle ] && break; sleep 0.5; done
  st=$(node_state)
fi
[ "$st" = idle ] || fail "node $H is '${st:-unreachable}', not idle"
sinfo
out=$(timeout 60 srun -N1 -n1 hostname 2>&1) || fail "srun failed: $out"
echo "slurm-up: cluster ready (srun ran on $out)"
