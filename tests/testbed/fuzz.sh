#!/bin/sh
# The fuzzer's short run (issue 10), on the devices named as arguments:
#
#   fuzz.sh rkvm     rkvm-fuzz as it comes, then with --interrupts-on
#   fuzz.sh kvm      rkvm-fuzz --interrupts-on on KVM, the oracle
#
# rkvm-fuzz: random and boundary-value ioctls, threads racing on the same
# fds, slot churn under running vCPUs, memory unmapped under a slot, fds
# closed during KVM_RUN, fork, random guests in every mode, VMs torn down,
# VMMs killed in KVM_RUN. It must find nothing, and rkvm must hold nothing
# afterwards. The launcher fails the run on any kernel report meanwhile.
# Under Bochs, KVM cannot take its vCPU back from a guest with IF clear
# (external interrupts do not exit then, and KVM has no other way): the
# fuzzer keeps IF set for KVM (--interrupts-on), and rkvm takes that same
# run besides its own.
. /tests/lib.sh

# The run's size; FUZZ_* override it (the long run: fuzz-long.sh).
FUZZ_SEED=${FUZZ_SEED:-1}
FUZZ_IOCTLS=${FUZZ_IOCTLS:-8000}
FUZZ_GUESTS=${FUZZ_GUESTS:-300}

# fuzz DEV TAG [OPTIONS]
fuzz() {
    dev=$1 tag=$2
    shift 2
    status=0
    rkvm-fuzz --dev "$dev" --seed "$FUZZ_SEED" --ioctls "$FUZZ_IOCTLS" --guests "$FUZZ_GUESTS" "$@" \
        > /tmp/fuzz-$tag.out 2>/tmp/fuzz-$tag.err || status=$?
    cat /tmp/fuzz-$tag.out
    tail -n 3 /tmp/fuzz-$tag.err
    return $status
}

fuzz_rkvm() {
    use rkvm
    fuzz /dev/rkvm rkvm
    rkvm_holds_nothing
}

fuzz_kvm() {
    use kvm_intel
    fuzz /dev/kvm kvm --interrupts-on
}

fuzz_rkvm_as_kvm() {
    use rkvm
    fuzz /dev/rkvm rkvm-if --interrupts-on
    rkvm_holds_nothing
}

for device in "$@"; do
    case $device in
    rkvm)
        check "the fuzzer finds nothing on rkvm, and rkvm then holds nothing" fuzz_rkvm
        check "the fuzzer finds nothing on rkvm with KVM's run (--interrupts-on)" fuzz_rkvm_as_kvm
        ;;
    kvm) check "the fuzzer finds nothing on KVM (the oracle), interrupts kept on" fuzz_kvm ;;
    *) echo "fuzz.sh: unknown device $device"; exit 2 ;;
    esac
done
unload_all
finish
