#!/bin/sh
# Runs the guest suites named as arguments (e.g. /tests/abi.sh) one after
# the other in this boot, and fails if any failed.
status=0
for suite in "$@"; do
    echo "--- $suite"
    "$suite" || { echo "--- $suite FAILED"; status=1; }
done
exit $status
