#!/bin/bash
# Pre-emption and time limits for the sbatch templates: get SLURM's warning signal to the trainer ranks, and
# requeue the job when the trainer stopped after a complete checkpoint (exit status 75, exit_codes.REQUEUE).
#
# Sourced by the templates (they set `#SBATCH --signal=B:USR1@300 --requeue`):
#   md_run CMD ARGS...     run CMD (the launcher) and wait for it; sets MD_STATUS. While it runs, USR1 or TERM
#                          sent to this shell is passed on as USR1 to every descendant process that handles USR1
#                          (the trainer ranks, and srun, which forwards it to its tasks on every node); launchers,
#                          pdsh/ssh and helper processes never see it (CMD starts with USR1 ignored, and only
#                          processes that catch USR1 are signalled). The deepspeed launcher started with
#                          --save_pid is followed into the ranks it started over ssh on this node. One rank is
#                          enough: the trainer's ranks agree through an all-reduce and all stop at the same step.
#   md_finish              exit with MD_STATUS; first `scontrol requeue $SLURM_JOB_ID` when it is 75, or when the
#                          launcher failed and the trainer's own status file says 75 (torchrun exits 1 whatever
#                          its workers returned: the trainer writes $MEGATRON_DOREMI_EXIT_STATUS_FILE).
# Executed instead of sourced, `requeue.sh CMD ARGS...` is md_run + exit with the status: the wrapper the torchrun
# template runs on every node under srun, so each node's torchrun ignores USR1 and its ranks receive it.
MD_REQUEUE_STATUS=75

md_descendants() {  # every descendant pid of $1, from one ps snapshot
    ps -e -o pid= -o ppid= | awk -v root="$1" '
        { kids[$2] = kids[$2] " " $1 }
        END {
            todo = root
            while (todo != "") {
                n = split(todo, level, " "); todo = ""
                for (i = 1; i <= n; i++) {
                    m = split(kids[level[i]], k, " ")
                    for (j = 1; j <= m; j++) { print k[j]; todo = todo " " k[j] }
                }
            }
        }'
}

md_catches_usr1() {  # true when process $1 has a handler for SIGUSR1 (bit 10 of SigCgt in /proc/PID/status)
    local mask
    mask=$(awk '/^SigCgt:/ {print $2}' "/proc/$1/status" 2>/dev/null) || return 1
    [ -n "$mask" ] && (( (0x$mask >> 9) & 1 ))
}

md_forward() {  # $1: the signal this shell received
    MD_SIGNALLED=$1
    local roots pid targets=""
    roots="$MD_PID"
    # the deepspeed launcher's ranks on this node when it went through pdsh/ssh (deepspeed --save_pid)
    [ -f "/tmp/$MD_PID.deepspeed" ] && roots="$roots $(cat "/tmp/$MD_PID.deepspeed")"
    for pid in $(for root in $roots; do md_descendants "$root"; done | sort -un); do
        md_catches_usr1 "$pid" && targets="$targets $pid"
    done
    echo "requeue.sh: got SIG$1, passing USR1 to pid(s)${targets:- (none handle it yet)}" >&2
    # shellcheck disable=SC2086
    [ -n "$targets" ] && kill -USR1 $targets 2>/dev/null
    return 0
}

md_run() {
    MD_SIGNALLED=""
    if [ -z "${MD_WRAPPER:-}" ]; then  # the batch shell owns the trainer's status file (on the shared cwd)
        export MEGATRON_DOREMI_EXIT_STATUS_FILE=$PWD/.mdoremi_status.${SLURM_JOB_ID:-$$}
        rm -f "$MEGATRON_DOREMI_EXIT_STATUS_FILE"
    fi
    ( trap '' USR1; exec "$@" ) &
    MD_PID=$!
    trap 'md_forward USR1' USR1
    trap 'md_forward TERM' TERM
    while :; do
        MD_STATUS=0
        wait "$MD_PID" || MD_STATUS=$?
        kill -0 "$MD_PID" 2>/dev/null || break  # wait returned because a signal arrived: keep waiting
    done
    trap - USR1 TERM
    [ -z "${MD_WRAPPER:-}" ] || return 0
    if [ "$MD_STATUS" -ne 0 ] && [ "$MD_STATUS" -ne "$MD_REQUEUE_STATUS" ] \
        && [ "$(cat "$MEGATRON_DOREMI_EXIT_STATUS_FILE" 2>/dev/null)" = "$MD_REQUEUE_STATUS" ]; then
        MD_STATUS=$MD_REQUEUE_STATUS  # the launcher replaced the trainer's 75 by its own status
    fi
    rm -f "$MEGATRON_DOREMI_EXIT_STATUS_FILE"
    return 0
}

md_finish() {
    if [ "$MD_STATUS" -eq "$MD_REQUEUE_STATUS" ] && [ -n "${SLURM_JOB_ID:-}" ]; then
        echo "requeue.sh: the trainer stopped after a checkpoint${MD_SIGNALLED:+ (SIG$MD_SIGNALLED)}; requeueing job $SLURM_JOB_ID" >&2
        scontrol requeue "$SLURM_JOB_ID" || echo "requeue.sh: scontrol requeue failed: resubmit the same command" >&2
    fi
    exit "$MD_STATUS"
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then  # executed: the per-node wrapper
    [ $# -gt 0 ] || { echo "usage: requeue.sh CMD [ARGS...]" >&2; exit 2; }
    MD_WRAPPER=1 md_run "$@"
    exit "$MD_STATUS"
fi
