#!/bin/sh
# Benchmarks (reported, never asserted): TSC ticks per CPUID exit (handled
# in the kernel) and per port-I/O exit to the VMM and back, on rkvm and on
# KVM, three runs each. Under Bochs with clock: sync=none the TSC counts
# emulated instructions, so these are path lengths, comparable side by side.
#   qemu-testbed/run -- /tests/bench.sh
bench() {
    for i in 1 2 3; do
        v=$(rkvm run --dev "$1" "/payloads/$2.bin") || { echo "$1 $2: failed"; return 1; }
        printf '%-10s %-18s run %d: %6d TSC ticks per exit\n' "$1" "$2" "$i" "0x$v"
    done
}
unload() { rmmod rkvm 2>/dev/null; rmmod kvm_intel 2>/dev/null; rmmod kvm 2>/dev/null; true; }
unload
modprobe rkvm
bench /dev/rkvm bench-cpuid-real
bench /dev/rkvm bench-pio-real
unload
modprobe kvm_intel
bench /dev/kvm bench-cpuid-real
bench /dev/kvm bench-pio-real
unload
