# Guest-side test harness, sourced by the suites in this directory.
# Each check runs a shell function; its output is shown only when it fails.
# The suite ends with "N passed, M failed" and fails if any check did.

PASSED=0
FAILED=0

# check NAME FUNCTION [ARGS...]: FUNCTION runs in a subshell with `set -e`,
# so any failing command fails the check. (The subshell must not be an `if`
# condition: there the shell ignores `set -e` and only the last command
# would count.)
check() {
    name=$1
    shift
    ( set -e; "$@" ) >/tmp/check.out 2>&1
    status=$?
    if [ $status -eq 0 ]; then
        PASSED=$((PASSED + 1))
        echo "ok - $name"
    else
        FAILED=$((FAILED + 1))
        echo "not ok - $name"
        sed 's/^/    # /' /tmp/check.out
    fi
}

# expect_fail CMD...: succeeds if CMD fails; its output is kept in /tmp/expect.out.
expect_fail() {
    if "$@" >/tmp/expect.out 2>&1; then
        echo "expected failure, but succeeded: $*"
        cat /tmp/expect.out
        return 1
    fi
    cat /tmp/expect.out
}

# expect_status N CMD...: succeeds if CMD exits with status N; its output is
# kept in /tmp/expect.out.
expect_status() {
    want=$1
    shift
    # (A plain "$@" would end a check's `set -e` subshell on failure.)
    got=0
    "$@" >/tmp/expect.out 2>&1 || got=$?
    cat /tmp/expect.out
    if [ "$got" != "$want" ]; then
        echo "expected exit status $want, got $got: $*"
        return 1
    fi
}

# wait_gone PID TENTHS: succeeds once process PID is gone (reaped too),
# within TENTHS tenths of a second.
wait_gone() {
    i=0
    while kill -0 "$1" 2>/dev/null; do
        i=$((i + 1))
        [ $i -le "$2" ] || { echo "process $1 still there after $2 tenths of a second"; return 1; }
        sleep 0.1
    done
    wait "$1" 2>/dev/null || true
}

# rkvm_holds_nothing: what rkvm holds (/sys/kernel/debug/rkvm/pages: the
# first four counts; the rest count events since load) is nothing, as
# with no VM left.
rkvm_holds_nothing() {
    cat /sys/kernel/debug/rkvm/pages
    awk '/^(guest_pages_held|ept_table_pages|vms|vcpus) / && $2 != 0 { bad = 1 } END { exit bad }' \
        /sys/kernel/debug/rkvm/pages
}

# dmesg_count PATTERN: how many kernel log lines match (fixed string).
dmesg_count() {
    dmesg | grep -cF "$1" || true
}

finish() {
    echo "$PASSED passed, $FAILED failed"
    [ "$FAILED" -eq 0 ]
}

# unload_all: neither rkvm nor KVM loaded (they cannot share VMX).
unload_all() {
    rmmod rkvm 2>/dev/null || true
    rmmod kvm_intel 2>/dev/null || true
    rmmod kvm 2>/dev/null || true
}

# use MODULE: MODULE (rkvm or kvm_intel) is the one loaded.
use() {
    unload_all
    modprobe "$1"
}

# The test payloads (first-light, hostile), as name:mode[:mem] (default 2M
# of RAM). The tool logs unclaimed port and MMIO accesses (RKVM_LOG=debug):
# that log is compared too.
PAYLOADS="hello-real:real exit-status-real:real io-real:real triple-fault-real:real
hello-protected:protected hello-long:long cpuid-real:real msr-real:real string-io-real:real mmio-real:real:64K syscall-long:long dr-real:real"

# run_all DEV TAG: every payload on DEV, output and status kept in /tmp.
run_all() {
    for pm in $PAYLOADS; do
        p=${pm%%:*}
        rest=${pm#*:}
        mode=${rest%%:*}
        mem=2M
        [ "$rest" = "$mode" ] || mem=${rest#*:}
        status=0
        RKVM_LOG=debug rkvm run --dev "$1" --mode "$mode" --mem "$mem" "/payloads/$p.bin" \
            > "/tmp/$2-$p.out" 2> "/tmp/$2-$p.err" || status=$?
        echo "exit status $status" >> "/tmp/$2-$p.out"
        sed 's/^/    /' "/tmp/$2-$p.out" "/tmp/$2-$p.err"
    done
}

