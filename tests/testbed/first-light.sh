#!/bin/sh
# First-light suite (issue 3): the same guests run on /dev/rkvm and on
# /dev/kvm (the oracle) with identical output and exit status; guests that
# loop forever stop on a signal; killed VMMs leak nothing; many VMs come and
# go.
. /tests/lib.sh

payloads_on_rkvm() {
    unload_all
    modprobe rkvm
    run_all /dev/rkvm rkvm
}

payloads_on_kvm() {
    unload_all
    modprobe kvm_intel
    run_all /dev/kvm kvm
    unload_all
    modprobe rkvm
}

# same PAYLOAD: identical stdout, exit status and device log on both.
same() {
    diff "/tmp/kvm-$1.out" "/tmp/rkvm-$1.out"
    diff "/tmp/kvm-$1.err" "/tmp/rkvm-$1.err"
}

hello_prints() {
    grep -qx 'Hello from real mode!' /tmp/rkvm-hello-real.out
    grep -qx 'exit status 0' /tmp/rkvm-hello-real.out
}

protected_and_long() {
    grep -qx 'Hello from protected mode!' /tmp/rkvm-hello-protected.out
    grep -qx 'Hello from long mode!' /tmp/rkvm-hello-long.out
    grep -qx 'exit status 0' /tmp/rkvm-hello-long.out
}

debug_registers() {
    printf '00001234\n00000400\nFFFF0FF0\n00000500\nexit status 0\n' | diff - /tmp/rkvm-dr-real.out
}

syscall_msrs() {
    printf 'SWAPGS ok\nSYSCALL ok\nexit status 0\n' | diff - /tmp/rkvm-syscall-long.out
}

mmio() {
    printf '000000FF\n0000FFFF\nFFFFFFFF\nexit status 0\n' | diff - /tmp/rkvm-mmio-real.out
    grep -q 'MMIO write \[5a\] at 0x20010' /tmp/rkvm-mmio-real.err
    grep -q 'MMIO read of 4 bytes at 0x20030' /tmp/rkvm-mmio-real.err
    grep -q 'MMIO write \[78, 56, 34, 12\] at 0x20040' /tmp/rkvm-mmio-real.err
    grep -q 'MMIO write \[56\] at 0x20044' /tmp/rkvm-mmio-real.err
}

string_io() {
    printf 'String I/O works\nFFFFFFFF\nFFFF0060\nit!\nexit status 0\n' | diff - /tmp/rkvm-string-io-real.out
}

msrs_in_the_guest() {
    printf '9ABCDEF0\n12345678\n00000000\nexit status 0\n' | diff - /tmp/rkvm-msr-real.out
}

cpuid_table() {
    printf 'GenuineIntel\nvmx=0 hypervisor=1\nexit status 0\n' | diff - /tmp/rkvm-cpuid-real.out
}

debug_exit_status() {
    grep -qx 'exit status 67' /tmp/rkvm-exit-status-real.out
}

io_of_every_size() {
    printf '000000FF\n0000FFFF\nFFFFFFFF\n00000060\nexit status 0\n' | diff - /tmp/rkvm-io-real.out
}

triple_fault_is_a_shutdown() {
    grep -qx 'exit status 6' /tmp/rkvm-triple-fault-real.out
    grep -q 'guest shut down (triple fault)' /tmp/rkvm-triple-fault-real.err
}

# A guest in `jmp $` forever: SIGTERM ends the VMM within a second.
sigterm_stops_a_looping_guest() {
    rkvm run --dev /dev/rkvm /payloads/loop-real.bin &
    pid=$!
    sleep 1
    kill -0 $pid
    kill -TERM $pid
    wait_gone $pid 10
}

# SIGKILL mid-run: the fds close, the VM goes, the module can unload (and
# could not while the VM existed).
killed_vmm_leaves_nothing() {
    rkvm run --dev /dev/rkvm /payloads/loop-real.bin &
    pid=$!
    sleep 1
    status=0
    rmmod rkvm 2>/dev/null || status=$?
    kill -KILL $pid
    [ $status -ne 0 ] || { echo "rmmod succeeded under a running VM"; return 1; }
    wait $pid || true
    rmmod rkvm
    modprobe rkvm
}

two_vms_at_once() {
    rkvm run --dev /dev/rkvm /payloads/loop-real.bin &
    looping=$!
    rkvm run --dev /dev/rkvm /payloads/io-real.bin > /tmp/two.out
    kill -TERM $looping
    wait $looping || true
    diff /tmp/rkvm-io-real.out /tmp/two.out 2>/dev/null || grep -qx 00000060 /tmp/two.out
}

hundred_vms_created_and_destroyed() {
    i=0
    while [ $i -lt 100 ]; do
        status=0
        rkvm run --dev /dev/rkvm /payloads/exit-status-real.bin > /dev/null || status=$?
        [ $status -eq 67 ] || { echo "run $i exited $status"; return 1; }
        i=$((i + 1))
    done
}

check "payloads run on /dev/rkvm" payloads_on_rkvm
check "payloads run on /dev/kvm (the oracle)" payloads_on_kvm
for pm in $PAYLOADS; do
    check "${pm%%:*}: same output, exit status and device log on rkvm and KVM" same "${pm%%:*}"
done
check "real-mode hello prints through COM1 and halts (exit 0)" hello_prints
check "protected mode (GDT, flat segments) and long mode (paging, EFER.LMA) guests run" protected_and_long
check "isa-debug-exit status 0x21 exits with 67" debug_exit_status
check "WRMSR and RDMSR of STAR, RDMSR of EFER" msrs_in_the_guest
check "REP OUTSB, REP INSB, INSW, and REP OUTSB backwards (DF=1)" string_io
check "MMIO: MOV stores and loads of 1, 2 and 4 bytes beyond RAM" mmio
check "SWAPGS and SYSCALL use the guest's KERNEL_GS_BASE, LSTAR and STAR" syscall_msrs
check "MOV to and from DR0, DR6 and DR7" debug_registers
check "CPUID comes from KVM_SET_CPUID2's table: vendor passed through, VMX hidden, hypervisor bit set" cpuid_table
check "IN and OUT of 1, 2 and 4 bytes" io_of_every_size
check "a triple fault is a shutdown exit" triple_fault_is_a_shutdown
check "SIGTERM stops a guest looping forever within a second" sigterm_stops_a_looping_guest
check "the module cannot unload while a VM runs; a VMM killed mid-run leaves it unloadable" killed_vmm_leaves_nothing
check "two VMs at once" two_vms_at_once
check "100 VMs created and destroyed" hundred_vms_created_and_destroyed
unload_all
finish
