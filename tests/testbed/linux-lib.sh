# Shared by the Linux guest suites (linux.sh, linux-disk.sh): the guest
# the testbed carries, its command line, and how one boot is run and kept.
KERNEL=/guest/bzImage
INITRD=/guest/initrd.cpio
# io_delay=none: no port 0x80 write after each PIT/PIC access (two exits
# per timer reprogramming); Linux does the same by itself under KVM's
# paravirt ops, which an rkvm guest does not get.
ARGS="console=ttyS0 quiet io_delay=none"

# guest DEV OUT CMD [EXTRA...]: boots the guest with rkvm_cmd=CMD; its
# console in OUT.out, the tool's stderr in OUT.err, the status appended.
guest() {
    dev=$1
    out=$2
    cmd=$3
    shift 3
    status=0
    timeout 600 rkvm run --dev "$dev" --mem 128M --kernel $KERNEL --initrd $INITRD \
        --append "$ARGS rkvm_cmd=\"$cmd\"" "$@" < /dev/null > "$out.out" 2> "$out.err" || status=$?
    echo "exit status $status" >> "$out.out"
}
