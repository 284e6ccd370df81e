#!/bin/sh
# Default testbed command (the demo): load rkvm, show what it found, run a
# real-mode guest on /dev/rkvm that prints through the emulated COM1, boot
# the Multiboot test kernel that checks the virtual CPU from inside, then
# boot Linux (this very test kernel) under rkvm to its shell, run a command
# there and power it off; unload.
set -e
# The Linux guest's output goes through a pipe: its status must count.
set -o pipefail
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
# The guest's console is indented: its last line ("reboot: ...") must not
# look like this kernel halting to the testbed launcher.
echo "--- rkvm run --dev /dev/rkvm --mem 128M --stats --kernel /guest/bzImage --initrd /guest/initrd.cpio --append 'console=ttyS0 quiet rkvm_cmd=...'"
rkvm run --dev /dev/rkvm --mem 128M --stats --kernel /guest/bzImage --initrd /guest/initrd.cpio \
    --append "console=ttyS0 quiet rkvm_cmd=\"uname -sr; grep -m1 'model name' /proc/cpuinfo; echo hello from Linux under rkvm\"" \
    < /dev/null 2>&1 | tr -d '\r' | sed 's/^/    /'
echo "--- Linux guest powered off"
rmmod rkvm
echo "smoke test passed"
