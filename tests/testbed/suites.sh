#!/bin/sh
# Runs the guest suites named as arguments (e.g. /tests/abi.sh, or with its
# own arguments, '/tests/fuzz.sh rkvm') one after the other in this boot,
# and fails if any failed.
# Each suite's emulated time is reported (date follows the emulated clock).
status=0
for suite in "$@"; do
    echo "--- $suite"
    start=$(date +%s)
    sh -c "$suite" || { echo "--- $suite FAILED"; status=1; }
    echo "--- $suite took $(( $(date +%s) - start )) s (emulated)"
done
exit $status
