#!/usr/bin/env bash
# A real single-node SLURM cluster from the distribution's packages (Debian: slurmctld, slurmd,
# slurm-client, munge), run as root without systemd; then configs/tiny.yaml through profiles/slurm.
#
# What it checks (tests/slurm/check_slurm_run.py; no sacct, there is no accounting database):
# - every remote job's sbatch call (Snakemake --verbose log) carries the partition, account, time, memory
#   and GPUs the profile declares, GPUs one way only, and download rules never reach sbatch;
# - slurmctld's own record of each job (scontrol show job, kept for MinJobAge) says the same and COMPLETED;
# - one transfer job is suspended and requeued (scontrol requeue) after its first epoch: it restarts and
#   resumes from last.pt in its output folder;
# - the report tables and every test MAE equal those of a local run (--cores 2) of the same config.
#
# Usage: tests/slurm/run_slurm_test.sh [WORK_DIR]     (root on Debian; takes about 4 minutes on 2 cores)
# Environment: SNAKEMAKE (default: snakemake), PYTHON (default: python3, with PyYAML), SLURM_TEST_PORT
# (default 16817; slurmd uses the next port), SLURM_TEST_LOCAL_RESULTS (a finished local run of
# configs/tiny.yaml to compare with; default: run one here).
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
snakemake=${SNAKEMAKE:-snakemake}
python=${PYTHON:-python3}
port=${SLURM_TEST_PORT:-16817}
work=${1:-$(mktemp -d /tmp/slurm-test.XXXXXX)}
work=$(mkdir -p "$work" && cd "$work" && pwd)
node=$(hostname -s)
started=$SECONDS

log() { printf '[slurm-test %4ds] %s\n' "$((SECONDS - started))" "$*"; }
fail() {
    log "FAIL: $*"
    exit 1
}

[[ $(id -u) -eq 0 ]] || fail "must run as root (it installs packages and starts the SLURM daemons)"
command -v apt-get >/dev/null || fail "needs apt-get (a Debian-like system)"

# --- 1. packages --------------------------------------------------------------------------------------
missing=()
for package in slurmctld slurmd slurm-client munge; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
done
if ((${#missing[@]})); then
    log "installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >"$work/apt.log"
fi

# --- 2. configuration: one node, a CPU and a GPU partition, two fake GPUs -----------------------------
# The files go to /etc/slurm, where every SLURM command looks, also srun inside a job (the executor
# plugin clears SLURM_* variables there, SLURM_CONF included); files already there are restored on exit.
etc=/etc/slurm
munged_pid=""
stop_daemons() {
    local pid file pids=()
    squeue -h -o %i 2>/dev/null | xargs -r scancel 2>/dev/null || true
    for pid in "$(cat "$work/slurmd.pid" 2>/dev/null)" "$(cat "$work/slurmctld.pid" 2>/dev/null)" "$munged_pid"; do
        if [[ -n $pid ]] && kill "$pid" 2>/dev/null; then
            pids+=("$pid")
        fi
    done
    for pid in "${pids[@]}"; do
        for _ in $(seq 50); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.2
        done
    done
    rm -f "$etc/slurm.conf" "$etc/gres.conf"
    for file in slurm.conf gres.conf; do
        if [[ -e $work/etc-before/$file ]]; then
            mv "$work/etc-before/$file" "$etc/$file"
        fi
    done
    log "daemons stopped, /etc/slurm restored"
}
trap stop_daemons EXIT
unset SLURM_CONF
mkdir -p "$etc" "$work/state" "$work/spool" "$work/etc-before"
for file in slurm.conf gres.conf; do
    if [[ -e $etc/$file ]]; then
        mv "$etc/$file" "$work/etc-before/$file"
    fi
done
cpus=$(nproc)
((cpus >= 2)) || cpus=2
# config_overrides: slurmd takes CPUs, memory and GPUs from this file, not from the hardware, so the
# profile's memory requests (up to 8000 MB) schedule on a small CI machine; the jobs use far less.
cat >"$etc/slurm.conf" <<EOF
ClusterName=snakemake-test
SlurmctldHost=$node
SlurmctldPort=$port
SlurmdPort=$((port + 1))
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$work/state
SlurmdSpoolDir=$work/spool
SlurmctldPidFile=$work/slurmctld.pid
SlurmdPidFile=$work/slurmd.pid
SlurmctldLogFile=$work/slurmctld.log
SlurmdLogFile=$work/slurmd.log
SlurmdParameters=config_overrides
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
ReturnToService=2
MinJobAge=3600
GresTypes=gpu
NodeName=$node CPUs=$cpus RealMemory=32000 Gres=gpu:fake:2 State=UNKNOWN
PartitionName=cpu Nodes=$node Default=YES MaxTime=INFINITE State=UP
PartitionName=gpu Nodes=$node MaxTime=INFINITE State=UP
EOF
# No GPU hardware: AutoDetect off and two device files that exist everywhere; jobs run on the CPU.
cat >"$etc/gres.conf" <<EOF
AutoDetect=off
NodeName=$node Name=gpu Type=fake File=/dev/null
NodeName=$node Name=gpu Type=fake File=/dev/zero
EOF

# --- 3. daemons, without systemd -----------------------------------------------------------------------
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    install -d -o munge -g munge -m 0755 /run/munge
    [[ -s /etc/munge/munge.key ]] || runuser -u munge -- mungekey --create
    runuser -u munge -- /usr/sbin/munged
    munged_pid=$(cat /run/munge/munged.pid)
    log "munged started (pid $munged_pid)"
fi
slurmctld
slurmd
for _ in $(seq 60); do
    if [[ -s $work/slurmctld.pid ]] && ! kill -0 "$(cat "$work/slurmctld.pid")" 2>/dev/null; then
        fail "slurmctld exited: $work/slurmctld.log"
    fi
    state=$(sinfo -h -n "$node" -o %t 2>/dev/null | head -1) || true
    [[ $state == idle ]] && break
    sleep 0.5
done
[[ $state == idle ]] || fail "node $node is '$state', not idle: see $work/slurmd.log and $work/slurmctld.log"
log "cluster up: $(sinfo -h -o '%P %t %G' | tr '\n' ' ')"

cd "$repo"

# --- 4. the local reference run, alongside the SLURM run (which mostly waits on status checks) -------
local_results=${SLURM_TEST_LOCAL_RESULTS:-$work/local}
local_pid=""
if [[ ! -s $local_results/report/summary.json ]]; then
    log "local run of configs/tiny.yaml -> $local_results (in the background)"
    "$snakemake" --cores 2 all --configfile configs/tiny.yaml --config "results_dir=$local_results" \
        >"$work/local.log" 2>&1 &
    local_pid=$!
fi

# --- 5. the SLURM run, with one transfer job requeued mid-training -------------------------------------
results=$work/results
# Waits for a running transfer job whose first epoch's checkpoint exists, suspends it (so it cannot
# finish meanwhile), requeues it and lets it start again at once (SLURM holds a requeued job for two
# minutes, and a suspended one until released).
requeue_one_transfer() {
    local deadline=$((SECONDS + 600)) id comment folder split source depth seed
    while ((SECONDS < deadline)); do
        while IFS='|' read -r id comment; do
            [[ $comment == rule_transfer_wildcards_* ]] || continue
            for folder in "$results"/transfer/*/*/depth*/seed*; do
                [[ -f $folder/last.pt ]] || continue
                IFS=/ read -r split source depth seed <<<"${folder#"$results"/transfer/}"
                depth=${depth#depth} seed=${seed#seed}
                [[ $comment == "rule_transfer_wildcards_${split}_${source}_${depth}_${seed}" ]] || continue
                scontrol suspend "$id" || continue
                scontrol requeue "$id"
                # The requeue completes once the job's processes are gone; then lift hold and delay.
                for _ in $(seq 300); do
                    [[ $(squeue -h -j "$id" -o %T 2>/dev/null) == PENDING ]] && break
                    sleep 0.2
                done
                scontrol release "$id" 2>/dev/null || true
                scontrol update "JobId=$id" StartTime=now
                echo "$id transfer $folder $results/logs/transfer-$split-$source-$depth-$seed.log" >"$work/requeued"
                return 0
            done
        done < <(squeue -h -t RUNNING -o '%i|%k' 2>/dev/null)
        sleep 0.1
    done
}
# What failed, for a reader who sees only the end of the output (CI keeps the last few kB): each failed
# job's error block, the end of its rule log and of its SLURM log, and slurmctld's record of the job.
show_failures() {
    local file id errors
    tail -n 8 "$work/snakemake.log" | cut -c1-300
    errors=$(grep -A16 '^Error in rule' "$work/snakemake.log" || true)
    printf '%s\n' "$errors" | cut -c1-400 | head -n 80
    for file in $(printf '%s\n' "$errors" | sed -n 's/^ *log: //p' | sed 's/ (check.*//' | tr ',' '\n' | sort -u); do
        [[ -f $file ]] || continue
        echo "--- $file (end)"
        tail -n 25 "$file" | cut -c1-400
    done
    for id in $(printf '%s\n' "$errors" | grep -oE "SLURM-job '[0-9]+'" | grep -oE '[0-9]+' | sort -u); do
        echo "--- scontrol show job $id"
        scontrol show job "$id" 2>&1 | head -n 30
    done
}
requeue_one_transfer &
watcher=$!
log "SLURM run of configs/tiny.yaml through profiles/slurm -> $results"
slurm_started=$SECONDS
# Status checks every 2 s instead of the plugin's 40 s+ (a real cluster keeps the defaults).
if ! "$snakemake" --workflow-profile profiles/slurm all --configfile configs/tiny.yaml \
    --config "results_dir=$results" --slurm-logdir "$work/slurm_logs" \
    --slurm-init-seconds-before-status-checks 2 --seconds-between-status-checks 2 --verbose \
    >"$work/snakemake.log" 2>&1; then
    kill "$watcher" 2>/dev/null || true
    [[ -z $local_pid ]] || wait "$local_pid" || true
    show_failures
    fail "the SLURM run failed: $work/snakemake.log"
fi
log "SLURM run finished in $((SECONDS - slurm_started)) s"
kill "$watcher" 2>/dev/null || true
[[ -s $work/requeued ]] || fail "no transfer job could be requeued mid-training"
if [[ -n $local_pid ]]; then
    wait "$local_pid" || fail "the local run failed: $work/local.log"
    log "local run finished"
fi

# --- 6. evidence ---------------------------------------------------------------------------------------
scontrol show job -o >"$work/scontrol-jobs.txt"
"$python" "$repo/tests/slurm/check_slurm_run.py" profiles/slurm/config.yaml "$work/snakemake.log" \
    "$work/scontrol-jobs.txt" "$results" "$local_results" "$work/requeued" || fail "checks failed (work dir $work)"
log "PASS (work dir $work)"
