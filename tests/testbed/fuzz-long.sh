#!/bin/sh
# The fuzzer's long run on one device (the README's figures):
#
#   qemu-testbed/run --cpus 2 --timeout 40000 -- /tests/fuzz-long.sh rkvm|kvm [FUZZER OPTIONS]
#
# FUZZ_SEED (1), FUZZ_IOCTLS (1000000) and FUZZ_GUESTS (100000) set the run;
# the same options on both devices run the same program from the same seed
# (--interrupts-on is always given: KVM under Bochs needs it, and rkvm then
# takes the very same run). Afterwards the module unloads cleanly, rkvm
# holds no page, table, VM or vCPU, and kmemleak finds nothing; the
# launcher adds any kernel BUG, WARNING, Oops, lockup, RCU stall or hung
# task to the verdict.
. /tests/lib.sh

which=$1
shift
case $which in
rkvm) module=rkvm dev=/dev/rkvm ;;
kvm) module=kvm_intel dev=/dev/kvm ;;
*) echo "usage: fuzz-long.sh rkvm|kvm [rkvm-fuzz options]"; exit 2 ;;
esac
FUZZ_SEED=${FUZZ_SEED:-1}
FUZZ_IOCTLS=${FUZZ_IOCTLS:-1000000}
FUZZ_GUESTS=${FUZZ_GUESTS:-100000}

long_run() {
    use $module
    start=$(date +%s)
    status=0
    rkvm-fuzz --dev $dev --seed "$FUZZ_SEED" --ioctls "$FUZZ_IOCTLS" --guests "$FUZZ_GUESTS" \
        --interrupts-on "$@" > /tmp/fuzz-long.out || status=$?
    echo "emulated time: $(( $(date +%s) - start )) s" >> /tmp/fuzz-long.out
    cat /tmp/fuzz-long.out
    return $status
}

unloads_clean() {
    if [ $module = rkvm ]; then
        rkvm_holds_nothing
        rmmod rkvm
        ! dmesg | grep "rkvm: unloading with"
    else
        rmmod kvm_intel
        rmmod kvm
    fi
    if [ -w /sys/kernel/debug/kmemleak ]; then
        echo scan > /sys/kernel/debug/kmemleak
        echo scan > /sys/kernel/debug/kmemleak
        leaks=$(cat /sys/kernel/debug/kmemleak)
        [ -z "$leaks" ] || { echo "$leaks" | head -n 40; return 1; }
    fi
}

check "rkvm-fuzz: $FUZZ_IOCTLS ioctls and $FUZZ_GUESTS guest runs on $dev (seed $FUZZ_SEED)" long_run "$@"
check "$module unloads afterwards, nothing held, kmemleak finds nothing" unloads_clean
# The report, whatever the checks said.
echo "--- report"
cat /tmp/fuzz-long.out
finish
