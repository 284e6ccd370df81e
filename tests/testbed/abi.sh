#!/bin/sh
# KVM ABI suite (issue 3, first steps): /dev/rkvm answers the system, VM and
# vCPU ioctls it implements as KVM does, hostile input included, and a new
# vCPU starts in exactly KVM's reset state. rkvm-abi-check makes the same
# checks on both devices; the reset states are compared line by line.
. /tests/lib.sh

abi_checks_pass_on() {
    status=0
    rkvm-abi-check --dev "$1" --unrestricted-guest $3 > /tmp/abi-$2.out || status=$?
    cat /tmp/abi-$2.out
    return $status
}

on_rkvm() {
    unload_all
    modprobe rkvm
    abi_checks_pass_on /dev/rkvm rkvm --rkvm
    rkvm-abi-check --dev /dev/rkvm --dump-reset-state > /tmp/reset-rkvm.out
    rmmod rkvm
}

on_kvm() {
    unload_all
    modprobe kvm_intel
    abi_checks_pass_on /dev/kvm kvm
    rkvm-abi-check --dev /dev/kvm --dump-reset-state > /tmp/reset-kvm.out
    unload_all
}

same_reset_state() {
    test -s /tmp/reset-kvm.out
    diff /tmp/reset-kvm.out /tmp/reset-rkvm.out
}

fds_pin_the_module() {
    modprobe rkvm
    # A VM fd (and a vCPU fd) outlive the /dev/rkvm fd that made them.
    rkvm-abi-check --dev /dev/rkvm > /dev/null
    rmmod rkvm
}

check "rkvm-abi-check passes on /dev/rkvm" on_rkvm
check "rkvm-abi-check passes on /dev/kvm (the oracle)" on_kvm
check "a new vCPU's state is KVM's, register for register" same_reset_state
check "the module unloads once every VM and vCPU fd is closed" fds_pin_the_module
unload_all
finish
