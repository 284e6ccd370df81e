#!/bin/sh
# Default testbed command: load rkvm, show what it found, check /dev/rkvm, unload.
set -e
modprobe rkvm
dmesg | grep 'rkvm:'
test -c /dev/rkvm
ls -l /dev/rkvm
rmmod rkvm
echo "smoke test passed"
