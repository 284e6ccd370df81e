#!/bin/sh
# The fuzzer's long run on one device (the README's figures):
#
#   qemu-testbed/run --cpus 2 --timeout 40000 -- /tests/fuzz-long.sh rkvm|kvm [FUZZER OPTIONS]
#
# The run is a series of chunks, one rkvm-fuzz process per seed:
# FUZZ_SEEDS ("1 2 ... 10") names them, FUZZ_IOCTLS (50000) and
# FUZZ_GUESTS (10000) size each, so the default is about 1,600,000 ioctls
# (the guest runs make ioctls of their own) and 100,000 guest runs. Chunks
# keep a long run's results: each chunk's report is on the console as soon
# as it ends, and a series cut short can be taken up with the seeds it did
# not reach. The same seeds on both
# devices run the same program (--interrupts-on is always given: KVM under
# Bochs needs it, and rkvm then takes the very same run; each chunk's notes
# count the guest runs that still reached their time bound with IF clear). After each chunk
# rkvm holds nothing; afterwards the module unloads cleanly and kmemleak
# finds nothing; the launcher adds any kernel BUG, WARNING, Oops, lockup,
# RCU stall or hung task to the verdict. The last lines add the chunks up.
. /tests/lib.sh

which=$1
shift
case $which in
rkvm) module=rkvm dev=/dev/rkvm ;;
kvm) module=kvm_intel dev=/dev/kvm ;;
*) echo "usage: fuzz-long.sh rkvm|kvm [rkvm-fuzz options]"; exit 2 ;;
esac
FUZZ_SEEDS=${FUZZ_SEEDS:-1 2 3 4 5 6 7 8 9 10}
FUZZ_IOCTLS=${FUZZ_IOCTLS:-50000}
FUZZ_GUESTS=${FUZZ_GUESTS:-10000}

# chunk SEED [OPTIONS]: one rkvm-fuzz run; its report goes to
# /tmp/fuzz-long-SEED.out and, whatever the verdict, to the console.
chunk() {
    seed=$1
    shift
    start=$(date +%s)
    status=0
    rkvm-fuzz --dev $dev --seed "$seed" --ioctls "$FUZZ_IOCTLS" --guests "$FUZZ_GUESTS" \
        --interrupts-on "$@" > /tmp/fuzz-long-$seed.out 2>/tmp/fuzz-long-$seed.err || status=$?
    echo "emulated time: $(( $(date +%s) - start )) s" >> /tmp/fuzz-long-$seed.out
    if [ $module = rkvm ]; then
        rkvm_holds_nothing >> /tmp/fuzz-long-$seed.out || status=1
    fi
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

use $module
for seed in $FUZZ_SEEDS; do
    check "rkvm-fuzz seed $seed: $FUZZ_IOCTLS ioctls and $FUZZ_GUESTS guest runs on $dev, nothing found" \
        chunk "$seed" "$@"
    echo "--- report, seed $seed"
    cat /tmp/fuzz-long-$seed.out
    tail -n 3 /tmp/fuzz-long-$seed.err
done
check "$module unloads afterwards, nothing held, kmemleak finds nothing" unloads_clean

# The sum over the chunks, from their reports (fuzz-sum.awk also adds up
# long runs spread over several boots, on the host).
echo "--- all seeds ($FUZZ_SEEDS) on $dev"
for seed in $FUZZ_SEEDS; do cat /tmp/fuzz-long-$seed.out; done | awk -f /tests/fuzz-sum.awk
finish
