#!/bin/sh
# Default testbed command (the demo): load rkvm, show what it found, run a
# real-mode guest on /dev/rkvm that prints through the emulated COM1, unload.
set -e
modprobe rkvm
dmesg | grep 'rkvm:'
ls -l /dev/rkvm
echo "--- rkvm run --dev /dev/rkvm /payloads/hello-real.bin"
rkvm run --dev /dev/rkvm /payloads/hello-real.bin
echo "--- guest halted, exit status $?"
rmmod rkvm
echo "smoke test passed"
