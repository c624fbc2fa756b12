#!/bin/bash
# A single-node SLURM cluster on this machine, from Debian's SLURM (slurm-wlm) and munge packages: for trying
# examples/slurm/train.sbatch and for the tests that submit real jobs (tests/test_slurm.py).
#
#   scripts/local_slurm.sh start    # install the packages if missing (as root), start munged, slurmctld, slurmd
#   scripts/local_slurm.sh status   # is it running? (exit 0 yes, 1 no) and the node's state
#   scripts/local_slurm.sh stop     # cancel its jobs, stop the daemons it started
#   scripts/local_slurm.sh env      # the line to paste into a shell: export SLURM_CONF=...
#
# Everything it writes lives in one folder, $CONTRASTLAB_SLURM_DIR (default /tmp/contrastlab-slurm): the generated
# slurm.conf, the controller's state, spool, logs and pid files. The cluster is one node, this host (`hostname -s`,
# reached at 127.0.0.1) with nproc CPUs and its memory, in one partition `local`; no accounting (sacct does not
# work; `scontrol show job` keeps a finished job for MinJobAge = 300 s). Pending jobs are scheduled every second
# (a job whose begin time passes starts then, not at the next 30 s backfill pass); KillWait is 10 s. Clients find
# it through SLURM_CONF=<folder>/etc/slurm.conf; as root, /etc/slurm/slurm.conf is also linked to it when that file
# does not exist, so that a plain `sbatch` works (stop removes the link). Ports: $CONTRASTLAB_SLURM_PORT (default
# 6817) for slurmctld, the next one for slurmd.
#
# `start` is idempotent and safe to run concurrently (a lock file serialises start and stop): on a running cluster
# it says so and succeeds. Exit status: 0 done; 1 failed (the daemons' logs are printed); 3 SLURM cannot be
# provided here (not root, no apt-get, or the packages did not install): the caller may skip what needed it.
set -euo pipefail

DIR=${CONTRASTLAB_SLURM_DIR:-/tmp/contrastlab-slurm}
PORT=${CONTRASTLAB_SLURM_PORT:-6817}
CONF=$DIR/etc/slurm.conf
PACKAGES=(slurmctld slurmd slurm-client munge)  # slurm-wlm's daemons and clients, without its optional plugins
NEEDED=(slurmctld slurmd munged mungekey munge sbatch srun squeue sinfo scontrol scancel)
START_TIMEOUT=${CONTRASTLAB_SLURM_START_TIMEOUT:-60}
export SLURM_CONF=$CONF

say() { echo "local_slurm: $*"; }
die() { echo "local_slurm: error: $1" >&2; exit "${2:-1}"; }

alive() {  # alive DIR/run/NAME.pid: that daemon runs (any user may ask; a reused pid of another program is not it)
  local pid
  pid=$(cat "$1" 2>/dev/null) || return 1
  [ -n "$pid" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$(basename "$1" .pid)" ]
}
running() { alive "$DIR/run/slurmctld.pid" && alive "$DIR/run/slurmd.pid"; }
munge_works() { command -v munge >/dev/null && munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }

missing_commands() {
  local c out=()
  for c in "${NEEDED[@]}"; do
    command -v "$c" >/dev/null || [ -x "/usr/sbin/$c" ] || out+=("$c")
  done
  echo "${out[@]}"
}

install_packages() {
  local missing
  missing=$(missing_commands)
  [ -z "$missing" ] && return 0
  command -v apt-get >/dev/null ||
    die "missing $missing and there is no apt-get; install SLURM (slurmctld, slurmd, its clients) and munge" 3
  say "installing ${PACKAGES[*]} (missing: $missing)"
  local t0=$SECONDS apt=(apt-get -o DPkg::Lock::Timeout=300 -qq)
  if ! { DEBIAN_FRONTEND=noninteractive "${apt[@]}" update &&
         DEBIAN_FRONTEND=noninteractive "${apt[@]}" install -y --no-install-recommends "${PACKAGES[@]}"; } \
         > "$DIR/log/apt.log" 2>&1; then
    tail -n 20 "$DIR/log/apt.log" >&2
    die "apt-get install ${PACKAGES[*]} failed (log: $DIR/log/apt.log)" 3
  fi
  missing=$(missing_commands)
  [ -z "$missing" ] || die "installed ${PACKAGES[*]} but still missing: $missing" 3
  say "installed ${PACKAGES[*]} in $((SECONDS - t0)) s"
}

start_munge() {
  if munge_works; then
    return 0  # a munged already runs (ours from an earlier start, or the system's): use it
  fi
  local key=/etc/munge/munge.key
  if [ ! -s "$key" ]; then
    say "creating the munge key $key"
    mkdir -p /etc/munge
    mungekey --create --keyfile "$key"
  fi
  chown munge:munge "$key"
  chmod 0400 "$key"
  mkdir -p /run/munge /var/lib/munge /var/log/munge
  chown munge:munge /run/munge /var/lib/munge /var/log/munge
  chmod 0755 /run/munge
  runuser -u munge -- /usr/sbin/munged 9>&-  # the daemons must not inherit the lock
  touch "$DIR/run/munged.ours"
  local i
  for i in $(seq 50); do munge_works && return 0; sleep 0.1; done
  die "munged started but munge -n | unmunge fails; see /var/log/munge/munged.log"
}

write_conf() {
  local host cpus mem
  host=$(hostname -s)
  cpus=$(nproc)
  mem=$(awk '/^MemTotal:/ {print int($2 / 1024)}' /proc/meminfo)
  mkdir -p "$DIR/etc"
  cat > "$CONF.new" <<EOF
# Written by scripts/local_slurm.sh: a single-node cluster on $host for contrastlab's examples and tests.
ClusterName=contrastlab
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$PORT
SlurmdPort=$((PORT + 1))
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1,bf_interval=1
JobRequeue=1
EnforcePartLimits=ALL
ReturnToService=2
MpiDefault=none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MailProg=/bin/true
MinJobAge=300
KillWait=10
InactiveLimit=0
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=local Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
  mv "$CONF.new" "$CONF"
}

wait_idle() {
  local host state t0=$SECONDS
  host=$(hostname -s)
  while [ $((SECONDS - t0)) -lt "$START_TIMEOUT" ]; do
    state=$(sinfo -h -n "$host" -o %T 2>/dev/null || true)
    case $state in
      idle|mixed|allocated|completing) return 0 ;;
      drain*|down*|fail*|inval*) scontrol update NodeName="$host" State=RESUME 2>/dev/null || true ;;
    esac
    sleep 0.2
  done
  say "node $host not idle after $START_TIMEOUT s (sinfo: ${state:-no answer})" >&2
  tail -n 15 "$DIR/log/slurmctld.log" "$DIR/log/slurmd.log" >&2 || true
  return 1
}

link_system_conf() {
  [ "$(id -u)" -eq 0 ] && [ -d /etc/slurm ] || return 0
  if [ ! -e /etc/slurm/slurm.conf ] && [ ! -L /etc/slurm/slurm.conf ]; then
    ln -s "$CONF" /etc/slurm/slurm.conf
  fi
}

cmd_start() {
  if running; then
    say "already running (SLURM_CONF=$CONF)"
    return 0
  fi
  local t0=$SECONDS
  install_packages
  mkdir -p "$DIR/state" "$DIR/spool" "$DIR/run" "$DIR/log"
  start_munge
  write_conf
  alive "$DIR/run/slurmctld.pid" || slurmctld 9>&-
  alive "$DIR/run/slurmd.pid" || slurmd 9>&-
  if ! wait_idle; then
    die "the cluster did not come up; logs: $DIR/log"
  fi
  link_system_conf
  say "running: node $(hostname -s), $(nproc) CPUs, partition local; started in $((SECONDS - t0)) s"
  say "clients: export SLURM_CONF=$CONF"
}

stop_pid() {  # stop_pid NAME: SIGTERM the daemon of pid file NAME.pid, wait up to 20 s, then SIGKILL
  local file=$DIR/run/$1.pid i
  alive "$file" || { rm -f "$file"; return 0; }
  kill "$(cat "$file")" 2>/dev/null || true
  for i in $(seq 100); do alive "$file" || { rm -f "$file"; return 0; }; sleep 0.2; done
  say "$1 did not stop on SIGTERM; killing it" >&2
  kill -9 "$(cat "$file")" 2>/dev/null || true
  rm -f "$file"
}

cmd_stop() {
  if alive "$DIR/run/slurmctld.pid"; then
    local jobs i
    jobs=$(squeue -h -t pending,running,suspended,configuring -o %i 2>/dev/null || true)
    if [ -n "$jobs" ]; then
      say "cancelling jobs: $(echo $jobs)"
      # shellcheck disable=SC2086
      scancel $jobs 2>/dev/null || true
    fi
    for i in $(seq 150); do  # cancelled and completing jobs: their processes end before slurmd stops
      [ -z "$(squeue -h -o %i 2>/dev/null)" ] && break
      sleep 0.2
    done
  fi
  stop_pid slurmd
  stop_pid slurmctld
  if [ -f "$DIR/run/munged.ours" ]; then
    local pid
    pid=$(cat /run/munge/munged.pid 2>/dev/null || true)
    if [ -n "$pid" ] && kill "$pid" 2>/dev/null; then
      for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    fi
    rm -f "$DIR/run/munged.ours"
  fi
  if [ "$(readlink /etc/slurm/slurm.conf 2>/dev/null)" = "$CONF" ]; then
    rm -f /etc/slurm/slurm.conf
  fi
  say "stopped"
}

cmd_status() {
  if running; then
    say "running (SLURM_CONF=$CONF)"
    sinfo
    return 0
  fi
  say "not running"
  return 1
}

case ${1:-} in
  start|stop)
    if [ "$(id -u)" -ne 0 ]; then  # a cluster that root started serves everyone
      if [ "$1" = start ] && running; then say "already running (SLURM_CONF=$CONF)"; exit 0; fi
      missing=$(missing_commands)
      [ -z "$missing" ] || die "missing $missing; as root, install: apt-get install -y ${PACKAGES[*]}" 3
      die "$1 needs root (munged runs as the munge user, slurmctld and slurmd as root)" 3
    fi
    mkdir -p "$DIR/log" "$DIR/run"
    exec 9>"$DIR/lock"
    flock -w 600 9 || die "another local_slurm.sh held $DIR/lock for 10 minutes"
    "cmd_$1"
    ;;
  status) cmd_status ;;
  env) echo "export SLURM_CONF=$CONF" ;;
  *) echo "usage: $0 start|stop|status|env" >&2; exit 2 ;;
esac
