# Guest-side test harness, sourced by the suites in this directory.
# Each check runs a shell function; its output is shown only when it fails.
# The suite ends with "N passed, M failed" and fails if any check did.

PASSED=0
FAILED=0

# check NAME FUNCTION [ARGS...]
check() {
    name=$1
    shift
    if ( set -e; "$@" ) >/tmp/check.out 2>&1; then
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

# dmesg_count PATTERN: how many kernel log lines match (fixed string).
dmesg_count() {
    dmesg | grep -cF "$1" || true
}

finish() {
    echo "$PASSED passed, $FAILED failed"
    [ "$FAILED" -eq 0 ]
}
