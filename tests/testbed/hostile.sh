#!/bin/sh
# Hostile guests and VMMs (issue 10): neither can hurt the host. Guests
# that never exit by themselves, VMMs killed mid-run, failed entries in a
# loop, every mitigation path forced on; after all of it rkvm holds no
# page, no table, no VM and no vCPU, unloads, and kmemleak finds nothing.
# fuzz.sh runs the fuzzer, and the abi suite the regression checks of the
# issue's findings (rkvm-abi-check's hostile.rs), on both devices.
#
# The launcher fails the run on any kernel BUG, WARNING, Oops, soft lockup,
# RCU stall or hung task meanwhile.
. /tests/lib.sh

# A command that must finish while guests spin on every CPU.
host_is_responsive() {
    start=$(date +%s)
    i=0
    while [ $i -lt 2000 ]; do i=$((i + 1)); done
    ls /proc > /dev/null
    elapsed=$(( $(date +%s) - start ))
    echo "a 2000-step shell loop took ${elapsed} s with guests spinning"
    [ $elapsed -lt 20 ]
}

# spin DEV FLAGS: a VM of 2 vCPUs in jmp $ (FLAGS: --sti for interrupts
# on) for 5 s beside a responsive host, then SIGKILL; its process must go.
spin() {
    rkvm-abi-check --dev "$1" --spin 2 $2 > /tmp/spin.out 2>&1 &
    pid=$!
    sleep 5
    kill -0 $pid
    grep -q "spinning 2 vCPUs" /tmp/spin.out
    host_is_responsive
    kill -KILL $pid
    wait_gone $pid 50
}

spinning_guests_on_rkvm() {
    use rkvm
    spin /dev/rkvm ""
    spin /dev/rkvm --sti
    # Two spinning VMMs at once, and a third one's guest runs.
    rkvm-abi-check --dev /dev/rkvm --spin 1 > /dev/null 2>&1 &
    a=$!
    rkvm-abi-check --dev /dev/rkvm --spin 1 --sti > /dev/null 2>&1 &
    b=$!
    sleep 2
    rkvm run --dev /dev/rkvm /payloads/hello-real.bin | grep -q "Hello from real mode"
    host_is_responsive
    kill -KILL $a $b
    wait $a $b 2>/dev/null || true
    rkvm_holds_nothing
    rmmod rkvm
}

# Under Bochs, external interrupts do not exit while the guest's IF is 0,
# and stock KVM has no other way back (its preemption timer is off here):
# KVM is checked with interrupts on only.
spinning_guests_on_kvm() {
    use kvm_intel
    spin /dev/kvm --sti
}

# SIGKILL in the middle of KVM_RUN, with one vCPU (the rkvm tool) and with
# two vCPU threads (the spinner): nothing stays held.
killed_mid_run() {
    use rkvm
    rkvm run --dev /dev/rkvm --mem 16M /payloads/loop-real.bin &
    pid=$!
    sleep 1
    kill -KILL $pid
    wait $pid 2>/dev/null || true
    rkvm-abi-check --dev /dev/rkvm --spin 2 > /dev/null 2>&1 &
    pid=$!
    sleep 2
    kill -KILL $pid
    wait $pid 2>/dev/null || true
    rkvm_holds_nothing
}

# A VMM that makes every VM entry fail, 200 times: the kernel log grows by
# at most printk's rate limit (10 lines, then "callbacks suppressed").
failed_entries_do_not_flood_the_log() {
    use rkvm
    before=$(dmesg_count "VM entry failed")
    rkvm-abi-check --dev /dev/rkvm --unrestricted-guest --hostile failed-entries
    after=$(dmesg_count "VM entry failed")
    echo "VM entry failure lines: $((after - before)) for 200 failed entries"
    [ $((after - before)) -le 10 ]
}

# Every mitigation path (RSB fill, VERW, BHB clearing, SPEC_CTRL restore
# and IBPB where this CPU has them, the software L1D flush) on: guests
# still behave exactly as without.
forced_mitigations() {
    unload_all
    modprobe rkvm force_mitigations=1
    dmesg | grep "rkvm: VM entry/exit mitigations:" | tail -n 1 | tee /tmp/mitigations
    grep -q "forced for testing" /tmp/mitigations
    grep -q "RSB-fill" /tmp/mitigations
    grep -q "VERW" /tmp/mitigations
    grep -q "L1D-flush" /tmp/mitigations
    # Every payload (port and string I/O, MMIO, CPUID, MSRs, SYSCALL in
    # long mode, debug registers...) gives what it gave without them (the
    # first-light suite's outputs, or a run now), and the host's watchpoint
    # and the guest's page permissions hold.
    if [ ! -s /tmp/rkvm-hello-real.out ]; then
        rmmod rkvm
        modprobe rkvm
        run_all /dev/rkvm rkvm > /dev/null
        rmmod rkvm
        modprobe rkvm force_mitigations=1
    fi
    run_all /dev/rkvm forced > /dev/null
    for pm in $PAYLOADS; do
        diff /tmp/rkvm-${pm%%:*}.out /tmp/forced-${pm%%:*}.out
    done
    rkvm-abi-check --dev /dev/rkvm --unrestricted-guest --rkvm --hostile host-watchpoint
    rkvm-abi-check --dev /dev/rkvm --unrestricted-guest --rkvm --hostile string-io-page-permissions
    rkvm_holds_nothing
    rmmod rkvm
}

rmmod_and_kmemleak() {
    use rkvm
    rkvm_holds_nothing
    rmmod rkvm
    ! dmesg | grep "rkvm: unloading with"
    if [ -w /sys/kernel/debug/kmemleak ]; then
        echo scan > /sys/kernel/debug/kmemleak
        echo scan > /sys/kernel/debug/kmemleak
        leaks=$(cat /sys/kernel/debug/kmemleak)
        [ -z "$leaks" ] || { echo "$leaks" | head -n 40; return 1; }
    fi
}

check "guests in jmp \$ (IF off and on, 2 vCPUs, 2 VMs): host responsive, SIGKILL ends them, rmmod works" spinning_guests_on_rkvm
check "guests in jmp \$ on KVM (IF on): host responsive, SIGKILL ends them" spinning_guests_on_kvm
check "VMMs killed mid-run (1 and 2 vCPUs) leave nothing held" killed_mid_run
check "200 failed VM entries log at most 10 lines" failed_entries_do_not_flood_the_log
check "force_mitigations=1: every mitigation path runs and guests behave the same" forced_mitigations
check "rmmod after all of it; kmemleak finds nothing" rmmod_and_kmemleak
unload_all
finish
