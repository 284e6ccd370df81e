#!/bin/sh
# On a CPU without VMX (qemu-testbed/run --backend qemu-tcg), rkvm must refuse
# to load with ENODEV and a log line naming the cause.
. /tests/lib.sh

refuses_without_vmx() {
    ! grep -qw vmx /proc/cpuinfo
    expect_fail modprobe rkvm
    grep -q 'No such device' /tmp/expect.out
    dmesg | grep -q 'rkvm: this CPU does not support VMX (CPUID.1:ECX.VMX is 0)'
    test ! -e /dev/rkvm
}

check "modprobe rkvm fails with ENODEV on a CPU without VMX" refuses_without_vmx
finish
