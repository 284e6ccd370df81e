#!/bin/sh
# CPU-virtualization suite (issue 4): the Multiboot test kernel (mbtest.elf,
# tests/payloads/src/multiboot) checks MSRs, CPUID, exceptions through its
# own IDT, and x87/SSE/AVX state from inside the guest, and must report the
# same on /dev/rkvm and on /dev/kvm (the oracle). Two such guests and a host
# task computing with the same registers run at once; single-step traces
# (KVM_SET_GUEST_DEBUG) must be identical on both devices.
. /tests/lib.sh

printf 'rkvm-module\n' > /tmp/module.txt

# mbtest DEV OUT [EXTRA ARGS...]: the test kernel with a module and a
# command line; stdout, stderr and the exit status kept.
mbtest() {
    dev=$1
    out=$2
    shift 2
    status=0
    rkvm run --dev "$dev" --mem 16M "$@" --kernel /payloads/mbtest.elf --initrd /tmp/module.txt \
        --append "mem=16M" > "$out.out" 2> "$out.err" || status=$?
    echo "exit status $status" >> "$out.out"
}

# Everything that needs one device loaded, run once per device.
runs_on() {
    dev=$1
    tag=$2
    mbtest "$dev" "/tmp/$tag-mbtest"
    # Isolation: two guests and a host task using the SSE/AVX registers
    # at once (one CPU: they preempt each other).
    rkvm-abi-check --host-fpu-stress 10 > "/tmp/$tag-host-fpu.out" 2>&1 &
    host=$!
    mbtest "$dev" "/tmp/$tag-mbtest-a" &
    a=$!
    mbtest "$dev" "/tmp/$tag-mbtest-b"
    wait $a
    wait $host && echo ok >> "/tmp/$tag-host-fpu.out" || echo "host task failed" >> "/tmp/$tag-host-fpu.out"
    # Single-step traces.
    rkvm run --dev "$dev" --debug-step 200 /payloads/hello-real.bin > /dev/null 2> "/tmp/$tag-step-hello.err" || true
    rkvm run --dev "$dev" --mode protected --debug-step 200 /payloads/hello-protected.bin > /dev/null \
        2> "/tmp/$tag-step-protected.err" || true
    mbtest "$dev" "/tmp/$tag-step-mbtest" --debug-step 400
}

on_rkvm() {
    use rkvm
    runs_on /dev/rkvm rkvm
    cat /tmp/rkvm-mbtest.out
}

on_kvm() {
    use kvm_intel
    runs_on /dev/kvm kvm
    cat /tmp/kvm-mbtest.out
    use rkvm
}

mbtest_passes_on_rkvm() {
    grep -qx 'mbtest: 0 failures' /tmp/rkvm-mbtest.out
    grep -qx 'exit status 1' /tmp/rkvm-mbtest.out
}

same_report_on_both() {
    diff /tmp/kvm-mbtest.out /tmp/rkvm-mbtest.out
}

# Every check the kernel makes is there, by name.
covers_the_issue() {
    for name in multiboot-magic multiboot-cmdline-mem multiboot-module-content multiboot-bss-zeroed \
        exception-de exception-ud exception-bp exception-gp-selector exception-pf-read exception-pf-write \
        msr-apic-base-write msr-pat-reserved-type-gp msr-mtrr-def-type msr-tsc-write rdtscp-tsc-aux \
        msr-unknown-read-gp msr-unknown-write-gp cpuid-vmx-hidden cpuid-hypervisor-leaf \
        fpu-xmm-preserved avx-ymm-preserved xsetbv-avx-without-sse-gp; do
        grep -qx "ok $name" /tmp/rkvm-mbtest.out || { echo "no 'ok $name'"; return 1; }
    done
}

isolation_holds() {
    for tag in rkvm kvm; do
        for run in a b; do
            diff /tmp/$tag-mbtest.out /tmp/$tag-mbtest-$run.out
        done
        tail -1 /tmp/$tag-host-fpu.out | grep -qx ok || { cat /tmp/$tag-host-fpu.out; return 1; }
    done
}

# The path a trace shows: RIPs with consecutive repeats folded. Under
# Bochs a VM exit while RFLAGS.TF is set leaves a single-step trap pending,
# so a step after an instruction the hypervisor or VMM completed is
# reported twice, on both devices, and KVM's first entry (an EPT violation:
# it maps memory on first touch) repeats the first step; the paths are what
# must be identical. A trace that hit its step limit may end a step earlier
# on one device, so the common length is compared, and must be at least
# MIN lines.
path() {
    sed 's/^step [0-9]*: //' "$1" | uniq > "$2"
}

same_single_step_traces() {
    for t in hello:40 protected:40 mbtest:6; do
        name=${t%%:*}
        min=${t#*:}
        path "/tmp/kvm-step-$name.err" /tmp/kvm-path
        path "/tmp/rkvm-step-$name.err" /tmp/rkvm-path
        a=$(wc -l < /tmp/kvm-path)
        b=$(wc -l < /tmp/rkvm-path)
        n=$((a < b ? a : b))
        [ "$n" -ge "$min" ] || { echo "$name: $n steps, expected at least $min"; cat /tmp/rkvm-path; return 1; }
        head -n "$n" /tmp/kvm-path > /tmp/kvm-common
        head -n "$n" /tmp/rkvm-path | diff /tmp/kvm-common -
        echo "$name: $n steps identical"
    done
    diff /tmp/kvm-step-mbtest.out /tmp/rkvm-step-mbtest.out
}

check "mbtest runs on /dev/rkvm" on_rkvm
check "mbtest runs on /dev/kvm (the oracle)" on_kvm
check "mbtest passes every check on rkvm (exit status 1 = 0 failures)" mbtest_passes_on_rkvm
check "mbtest reports the same on rkvm and KVM" same_report_on_both
check "mbtest covers MSRs, CPUID, exceptions, FPU/SSE/AVX and XSETBV" covers_the_issue
check "two guests and a host task keep their own SSE/AVX registers" isolation_holds
check "single-step traces are identical on rkvm and KVM" same_single_step_traces
unload_all
finish
