#!/bin/sh
# Foundation suite (issue 2): rkvm.ko enters VMX operation on every CPU,
# follows CPU hotplug, loads and unloads cleanly, and refuses to share VMX
# with kvm_intel in either order. Needs 2 CPUs:
#   qemu-testbed/run --cpus 2 -- /tests/foundation.sh
. /tests/lib.sh

ncpus=$(grep -c ^processor /proc/cpuinfo)
cpu1=/sys/devices/system/cpu/cpu1/online

two_cpus() {
    [ "$ncpus" -eq 2 ] || { echo "this suite needs 2 CPUs, the guest has $ncpus"; return 1; }
}

load_creates_root_only_device() {
    modprobe rkvm
    test -c /dev/rkvm
    stat -c '%A %u %g' /dev/rkvm
    [ "$(stat -c '%A %u %g' /dev/rkvm)" = "crw------- 0 0" ]
}

vmxon_on_every_cpu() {
    dmesg | grep 'rkvm: VMX root operation on'
    dmesg | grep -q "rkvm: VMX root operation on $ncpus CPUs; VMCS revision .*EPT.*VPID, unrestricted guest"
}

speaks_the_kvm_api() {
    rkvm info --dev /dev/rkvm | tee /tmp/info.out
    grep -qx '/dev/rkvm: KVM API version 12' /tmp/info.out
}

open_file_pins_module() {
    exec 3</dev/rkvm
    expect_fail rmmod rkvm
    exec 3<&-
    rmmod rkvm
    test ! -e /dev/rkvm
    modprobe rkvm
}

twenty_load_unload_cycles() {
    before=$(dmesg_count "VMX root operation on $ncpus CPUs")
    offs=$(dmesg_count "VMXOFF done on every CPU")
    i=0
    while [ $i -lt 20 ]; do
        rmmod rkvm
        modprobe rkvm
        test -c /dev/rkvm
        i=$((i + 1))
    done
    after=$(dmesg_count "VMX root operation on $ncpus CPUs")
    echo "VMXON on all CPUs: $before -> $after; VMXOFF everywhere: $offs -> $(dmesg_count 'VMXOFF done on every CPU')"
    [ $((after - before)) -eq 20 ]
    [ $(( $(dmesg_count 'VMXOFF done on every CPU') - offs )) -eq 20 ]
    [ "$(dmesg_count 'VMXON failed')" -eq 0 ]
}

cpu_hotplug_while_loaded() {
    echo 0 > $cpu1
    dmesg | grep -q 'rkvm: CPU 1 going offline: VMXOFF done'
    echo 1 > $cpu1
    dmesg | grep -q 'rkvm: CPU 1 came online: VMXON done'
    rmmod rkvm
    modprobe rkvm
    dmesg | tail -n 3 | grep -q "VMX root operation on 2 CPUs"
}

load_with_cpu_offline_then_online() {
    rmmod rkvm
    echo 0 > $cpu1
    modprobe rkvm
    dmesg | tail -n 3 | grep -q "VMX root operation on 1 CPUs"
    online_before=$(dmesg_count 'CPU 1 came online: VMXON done')
    echo 1 > $cpu1
    [ "$(dmesg_count 'CPU 1 came online: VMXON done')" -eq $((online_before + 1)) ]
    rmmod rkvm
}

# kvm_intel holds VMX on every CPU (enable_virt_at_load=1): rkvm must refuse
# with EBUSY and leave KVM working.
refuses_when_kvm_holds_vmx() {
    unload_all
    modprobe kvm enable_virt_at_load=1
    grep -qx Y /sys/module/kvm/parameters/enable_virt_at_load
    modprobe kvm_intel
    expect_fail modprobe rkvm
    grep -q 'Device or resource busy' /tmp/expect.out
    dmesg | tail -n 5 | grep -q 'rkvm: CPU [0-9]*: VMX is already in use'
    test ! -e /dev/rkvm
    rkvm run --dev /dev/kvm /payloads/hello-real.bin >/tmp/hello.out
    grep -qx 'Hello from real mode!' /tmp/hello.out
    unload_all
}

# rkvm holds VMX: kvm_intel with enable_virt_at_load=1 must fail to load and
# rkvm must keep working.
kvm_refused_while_rkvm_holds_vmx() {
    unload_all
    modprobe rkvm
    modprobe kvm enable_virt_at_load=1
    expect_fail modprobe kvm_intel
    # KVM turns the EBUSY of its CPU callback into EIO.
    grep -q 'Input/output error' /tmp/expect.out
    dmesg | tail -n 5 | grep -q 'kvm: enabling virtualization on CPU[0-9]* failed'
    test -c /dev/rkvm
    rkvm info --dev /dev/rkvm | grep -qx '/dev/rkvm: KVM API version 12'
    rmmod rkvm
    modprobe rkvm
    dmesg | tail -n 3 | grep -q "VMX root operation on $ncpus CPUs"
    # Once rkvm is gone, KVM takes VMX and runs guests again.
    rmmod rkvm
    modprobe kvm_intel
    rkvm run --dev /dev/kvm /payloads/hello-real.bin | grep -qx 'Hello from real mode!'
    unload_all
}

# kvm loaded the default way (enable_virt_at_load=0) coexists with rkvm until
# it needs VMX for a VM; then VM creation fails cleanly.
kvm_vm_creation_refused_while_rkvm_holds_vmx() {
    unload_all
    modprobe rkvm
    modprobe kvm_intel
    grep -qx N /sys/module/kvm/parameters/enable_virt_at_load
    expect_fail rkvm run --dev /dev/kvm /payloads/hello-real.bin
    grep -q 'KVM_CREATE_VM failed' /tmp/expect.out
    test -c /dev/rkvm
    unload_all
    modprobe kvm_intel
    rkvm run --dev /dev/kvm /payloads/hello-real.bin | grep -qx 'Hello from real mode!'
    unload_all
}

# fail_vmxon_on_cpu=1 makes VMXON fail on CPU 1 after it succeeded on CPU 0.
# The hotplug core rolls CPU 0 back; afterwards no CPU may have CR4.VMXE set,
# which KVM proves by taking VMX on every CPU.
vmxon_failure_on_one_cpu_rolls_back() {
    unload_all
    expect_fail modprobe rkvm fail_vmxon_on_cpu=1
    grep -q 'Input/output error' /tmp/expect.out
    dmesg | tail -n 5 | grep -q 'rkvm: CPU 1: VMXON failed (injected by fail_vmxon_on_cpu=1); CR4.VMXE restored'
    dmesg | tail -n 5 | grep -q 'rkvm: CPU 0: VMXOFF done, rolling back the failed load'
    test ! -e /dev/rkvm
    modprobe kvm enable_virt_at_load=1
    modprobe kvm_intel
    rkvm run --dev /dev/kvm /payloads/hello-real.bin | grep -qx 'Hello from real mode!'
    unload_all
    modprobe rkvm
    dmesg | tail -n 3 | grep -q "VMX root operation on $ncpus CPUs"
    rmmod rkvm
}

check "the guest has 2 CPUs" two_cpus
check "modprobe rkvm creates /dev/rkvm, root only (0600)" load_creates_root_only_device
check "VMXON happened on every CPU" vmxon_on_every_cpu
check "/dev/rkvm answers KVM_GET_API_VERSION with 12" speaks_the_kvm_api
check "an open /dev/rkvm keeps the module loaded" open_file_pins_module
check "20 load/unload cycles" twenty_load_unload_cycles
check "CPU 1 offline and online again while loaded" cpu_hotplug_while_loaded
check "load with CPU 1 offline, then bring it online" load_with_cpu_offline_then_online
check "kvm_intel holding VMX makes modprobe rkvm fail with EBUSY; KVM still runs a guest" refuses_when_kvm_holds_vmx
check "with rkvm loaded, kvm_intel (enable_virt_at_load=1) fails to load; rkvm still works" kvm_refused_while_rkvm_holds_vmx
check "with rkvm loaded, KVM refuses to create a VM; works again after rmmod rkvm" kvm_vm_creation_refused_while_rkvm_holds_vmx
check "VMXON failing on CPU 1 rolls back CPU 0 and restores CR4 everywhere" vmxon_failure_on_one_cpu_rolls_back
# Leave rkvm loaded, with a guest running: the launcher powers off through
# the kernel, rkvm's reboot hook takes every CPU out of VMX operation under
# the running vCPU (which must stop without an oops), and tests/run checks
# that the hook ran.
modprobe rkvm
rkvm run --dev /dev/rkvm /payloads/loop-real.bin > /dev/null 2>&1 &
finish
