#!/bin/sh
# A file written to a virtio-blk disk by one Linux guest is read by the
# next, under rkvm and under KVM. (It once hung under rkvm: a KVM_RUN cut
# short by the timer kick reported a stale ready_for_interrupt_injection, and
# the tool's second KVM_INTERRUPT replaced the disk's, which then stayed in
# service at the PIC forever.)
. /tests/lib.sh

. /tests/linux-lib.sh

write_then_read() {
    use "$1"
    dd if=/dev/zero of="/tmp/$3-disk.img" bs=1M count=8 2>/dev/null
    guest "$2" "/tmp/$3-disk-write" \
        "mke2fs -q /dev/vda && mount /dev/vda /mnt && echo rkvm-disk-test-4711 > /mnt/file && umount /mnt && echo written" \
        --disk "/tmp/$3-disk.img"
    guest "$2" "/tmp/$3-disk-read" "mount -o ro /dev/vda /mnt && cat /mnt/file" --disk "/tmp/$3-disk.img,ro"
    tr -d '\r' < "/tmp/$3-disk-write.out" | tail -5
    grep -q '^written' "/tmp/$3-disk-write.out"
    tr -d '\r' < "/tmp/$3-disk-read.out" | tail -5
    grep -q '^rkvm-disk-test-4711' "/tmp/$3-disk-read.out"
}

check "rkvm: a file written to a virtio-blk disk by one VM is read by the next" write_then_read rkvm /dev/rkvm rkvm
check "KVM: the same" write_then_read kvm_intel /dev/kvm kvm
finish
