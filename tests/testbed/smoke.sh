#!/bin/sh
# Default testbed command (the demo): load rkvm, show what it found, run a
# real-mode guest on /dev/rkvm that prints through the emulated COM1, boot
# the Multiboot test kernel that checks the virtual CPU from inside, unload.
set -e
modprobe rkvm
dmesg | grep 'rkvm:'
ls -l /dev/rkvm
echo "--- rkvm run --dev /dev/rkvm /payloads/hello-real.bin"
rkvm run --dev /dev/rkvm /payloads/hello-real.bin
echo "--- guest halted, exit status $?"
printf 'rkvm-module\n' > /tmp/module.txt
echo "--- rkvm run --dev /dev/rkvm --mem 16M --kernel /payloads/mbtest.elf --initrd /tmp/module.txt --append mem=16M"
status=0
rkvm run --dev /dev/rkvm --mem 16M --kernel /payloads/mbtest.elf --initrd /tmp/module.txt --append mem=16M || status=$?
echo "--- guest exited through port 0xf4, exit status $status (1 = no failures)"
[ $status -eq 1 ]
rmmod rkvm
echo "smoke test passed"
