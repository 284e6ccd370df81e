//! KVM's ioctl ABI as `/dev/rkvm` speaks it: the ioctl number encoding of
//! include/uapi/asm-generic/ioctl.h and the numbers of the KVM ioctls rkvm
//! implements, from include/uapi/linux/kvm.h.
//!
//! The numbers depend on the sizes of KVM's structs. [`kvm_ioctl_numbers!`]
//! takes the module that defines those structs, so the same list is
//! instantiated twice: in rkvm.ko with structs that bindgen generates from the
//! kernel's own uapi header, and in the host tests with the rust-vmm
//! `kvm-bindings` crate, where every number is compared with `kvm-ioctls`'s.

/// The ioctl type of every KVM ioctl (`KVMIO`).
pub const KVMIO: u32 = 0xae;

const NRBITS: u32 = 8;
const TYPEBITS: u32 = 8;
const SIZEBITS: u32 = 14;
const NRSHIFT: u32 = 0;
const TYPESHIFT: u32 = NRSHIFT + NRBITS;
const SIZESHIFT: u32 = TYPESHIFT + TYPEBITS;
const DIRSHIFT: u32 = SIZESHIFT + SIZEBITS;

/// No data moves.
pub const IOC_NONE: u32 = 0;
/// Userspace writes, the kernel reads (`_IOW`).
pub const IOC_WRITE: u32 = 1;
/// The kernel writes, userspace reads (`_IOR`).
pub const IOC_READ: u32 = 2;

/// `_IOC(dir, KVMIO, nr, size)`.
pub const fn ioc(dir: u32, nr: u32, size: usize) -> u32 {
    assert!(size < (1 << SIZEBITS), "ioctl argument too large to encode");
    (dir << DIRSHIFT) | (KVMIO << TYPESHIFT) | (nr << NRSHIFT) | ((size as u32) << SIZESHIFT)
}

/// `_IO(KVMIO, nr)`.
pub const fn io(nr: u32) -> u32 {
    ioc(IOC_NONE, nr, 0)
}

/// `_IOR(KVMIO, nr, T)`.
pub const fn ior<T>(nr: u32) -> u32 {
    ioc(IOC_READ, nr, core::mem::size_of::<T>())
}

/// `_IOW(KVMIO, nr, T)`.
pub const fn iow<T>(nr: u32) -> u32 {
    ioc(IOC_WRITE, nr, core::mem::size_of::<T>())
}

/// `_IOWR(KVMIO, nr, T)`.
pub const fn iowr<T>(nr: u32) -> u32 {
    ioc(IOC_READ | IOC_WRITE, nr, core::mem::size_of::<T>())
}

/// The direction bits of an ioctl number (`_IOC_DIR`).
pub const fn dir(cmd: u32) -> u32 {
    cmd >> DIRSHIFT
}

/// The argument size of an ioctl number (`_IOC_SIZE`).
pub const fn size(cmd: u32) -> usize {
    ((cmd >> SIZESHIFT) & ((1 << SIZEBITS) - 1)) as usize
}

/// Sizes of KVM ABI structs (x86_64), asserted against the bindgen structs
/// in rkvm.ko and against kvm-bindings in the host tests.
pub mod layout {
    /// `struct kvm_regs`
    pub const KVM_REGS: usize = 144;
    /// `struct kvm_sregs`
    pub const KVM_SREGS: usize = 312;
    /// `struct kvm_segment`
    pub const KVM_SEGMENT: usize = 24;
    /// `struct kvm_userspace_memory_region`
    pub const KVM_USERSPACE_MEMORY_REGION: usize = 32;
    /// `struct kvm_run`
    pub const KVM_RUN: usize = 2352;
}

/// Defines the KVM ioctl numbers rkvm implements, as `u32` constants named
/// as in KVM, in the current module, computed from the structs of module
/// `$kvm` (which must define `kvm_cpuid2`, `kvm_userspace_memory_region`,
/// `kvm_regs`, `kvm_sregs`, `kvm_msrs`, `kvm_msr_list`, `kvm_fpu`,
/// `kvm_interrupt`, `kvm_guest_debug`, `kvm_vcpu_events`, `kvm_xsave`,
/// `kvm_xcrs`).
#[macro_export]
macro_rules! kvm_ioctl_numbers {
    ($kvm:path) => {
        use $kvm as kvm_abi_structs;
        use $crate::abi::{io, ior, iow, iowr};

        // System ioctls (on /dev/rkvm), api.rst section 4.
        /// KVM_GET_API_VERSION
        pub const KVM_GET_API_VERSION: u32 = io(0x00);
        /// KVM_CREATE_VM
        pub const KVM_CREATE_VM: u32 = io(0x01);
        /// KVM_GET_MSR_INDEX_LIST
        pub const KVM_GET_MSR_INDEX_LIST: u32 = iowr::<kvm_abi_structs::kvm_msr_list>(0x02);
        /// KVM_CHECK_EXTENSION (also a VM ioctl)
        pub const KVM_CHECK_EXTENSION: u32 = io(0x03);
        /// KVM_GET_VCPU_MMAP_SIZE
        pub const KVM_GET_VCPU_MMAP_SIZE: u32 = io(0x04);
        /// KVM_GET_SUPPORTED_CPUID
        pub const KVM_GET_SUPPORTED_CPUID: u32 = iowr::<kvm_abi_structs::kvm_cpuid2>(0x05);

        // VM ioctls.
        /// KVM_CREATE_VCPU
        pub const KVM_CREATE_VCPU: u32 = io(0x41);
        /// KVM_SET_USER_MEMORY_REGION
        pub const KVM_SET_USER_MEMORY_REGION: u32 =
            iow::<kvm_abi_structs::kvm_userspace_memory_region>(0x46);
        /// KVM_SET_TSS_ADDR
        pub const KVM_SET_TSS_ADDR: u32 = io(0x47);
        /// KVM_SET_IDENTITY_MAP_ADDR
        pub const KVM_SET_IDENTITY_MAP_ADDR: u32 = iow::<u64>(0x48);

        // vCPU ioctls.
        /// KVM_RUN
        pub const KVM_RUN: u32 = io(0x80);
        /// KVM_GET_REGS
        pub const KVM_GET_REGS: u32 = ior::<kvm_abi_structs::kvm_regs>(0x81);
        /// KVM_SET_REGS
        pub const KVM_SET_REGS: u32 = iow::<kvm_abi_structs::kvm_regs>(0x82);
        /// KVM_GET_SREGS
        pub const KVM_GET_SREGS: u32 = ior::<kvm_abi_structs::kvm_sregs>(0x83);
        /// KVM_SET_SREGS
        pub const KVM_SET_SREGS: u32 = iow::<kvm_abi_structs::kvm_sregs>(0x84);
        /// KVM_INTERRUPT
        pub const KVM_INTERRUPT: u32 = iow::<kvm_abi_structs::kvm_interrupt>(0x86);
        /// KVM_GET_MSRS
        pub const KVM_GET_MSRS: u32 = iowr::<kvm_abi_structs::kvm_msrs>(0x88);
        /// KVM_SET_MSRS
        pub const KVM_SET_MSRS: u32 = iow::<kvm_abi_structs::kvm_msrs>(0x89);
        /// KVM_GET_FPU
        pub const KVM_GET_FPU: u32 = ior::<kvm_abi_structs::kvm_fpu>(0x8c);
        /// KVM_SET_FPU
        pub const KVM_SET_FPU: u32 = iow::<kvm_abi_structs::kvm_fpu>(0x8d);
        /// KVM_SET_CPUID2
        pub const KVM_SET_CPUID2: u32 = iow::<kvm_abi_structs::kvm_cpuid2>(0x90);
        /// KVM_NMI
        pub const KVM_NMI: u32 = io(0x9a);
        /// KVM_SET_GUEST_DEBUG
        pub const KVM_SET_GUEST_DEBUG: u32 = iow::<kvm_abi_structs::kvm_guest_debug>(0x9b);
        /// KVM_GET_VCPU_EVENTS
        pub const KVM_GET_VCPU_EVENTS: u32 = ior::<kvm_abi_structs::kvm_vcpu_events>(0x9f);
        /// KVM_SET_VCPU_EVENTS
        pub const KVM_SET_VCPU_EVENTS: u32 = iow::<kvm_abi_structs::kvm_vcpu_events>(0xa0);
        /// KVM_GET_XSAVE
        pub const KVM_GET_XSAVE: u32 = ior::<kvm_abi_structs::kvm_xsave>(0xa4);
        /// KVM_SET_XSAVE
        pub const KVM_SET_XSAVE: u32 = iow::<kvm_abi_structs::kvm_xsave>(0xa5);
        /// KVM_GET_XCRS
        pub const KVM_GET_XCRS: u32 = ior::<kvm_abi_structs::kvm_xcrs>(0xa6);
        /// KVM_SET_XCRS
        pub const KVM_SET_XCRS: u32 = iow::<kvm_abi_structs::kvm_xcrs>(0xa7);
        /// KVM_GET_TSC_KHZ
        pub const KVM_GET_TSC_KHZ: u32 = io(0xa3);
        /// KVM_GET_STATS_FD (VM and vCPU fds)
        pub const KVM_GET_STATS_FD: u32 = io(0xce);
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The numbers instantiated with kvm-bindings' structs.
    mod host {
        crate::kvm_ioctl_numbers!(kvm_bindings);
    }

    /// The same ioctls as kvm-ioctls (through vmm-sys-util) encodes them.
    mod reference {
        #![allow(missing_docs, non_snake_case)]
        use kvm_bindings::*;
        use vmm_sys_util::{ioctl_io_nr, ioctl_ior_nr, ioctl_iow_nr, ioctl_iowr_nr};
        ioctl_io_nr!(KVM_GET_API_VERSION, KVMIO, 0x00);
        ioctl_io_nr!(KVM_CREATE_VM, KVMIO, 0x01);
        ioctl_io_nr!(KVM_CHECK_EXTENSION, KVMIO, 0x03);
        ioctl_io_nr!(KVM_GET_VCPU_MMAP_SIZE, KVMIO, 0x04);
        ioctl_iowr_nr!(KVM_GET_SUPPORTED_CPUID, KVMIO, 0x05, kvm_cpuid2);
        ioctl_io_nr!(KVM_CREATE_VCPU, KVMIO, 0x41);
        ioctl_iow_nr!(KVM_SET_USER_MEMORY_REGION, KVMIO, 0x46, kvm_userspace_memory_region);
        ioctl_io_nr!(KVM_SET_TSS_ADDR, KVMIO, 0x47);
        ioctl_iow_nr!(KVM_SET_IDENTITY_MAP_ADDR, KVMIO, 0x48, u64);
        ioctl_io_nr!(KVM_RUN, KVMIO, 0x80);
        ioctl_ior_nr!(KVM_GET_REGS, KVMIO, 0x81, kvm_regs);
        ioctl_iow_nr!(KVM_SET_REGS, KVMIO, 0x82, kvm_regs);
        ioctl_ior_nr!(KVM_GET_SREGS, KVMIO, 0x83, kvm_sregs);
        ioctl_iow_nr!(KVM_SET_SREGS, KVMIO, 0x84, kvm_sregs);
        ioctl_iow_nr!(KVM_INTERRUPT, KVMIO, 0x86, kvm_interrupt);
        ioctl_iowr_nr!(KVM_GET_MSRS, KVMIO, 0x88, kvm_msrs);
        ioctl_iow_nr!(KVM_SET_MSRS, KVMIO, 0x89, kvm_msrs);
        ioctl_ior_nr!(KVM_GET_FPU, KVMIO, 0x8c, kvm_fpu);
        ioctl_iow_nr!(KVM_SET_FPU, KVMIO, 0x8d, kvm_fpu);
        ioctl_iow_nr!(KVM_SET_CPUID2, KVMIO, 0x90, kvm_cpuid2);
        ioctl_iowr_nr!(KVM_GET_MSR_INDEX_LIST, KVMIO, 0x02, kvm_msr_list);
        ioctl_io_nr!(KVM_NMI, KVMIO, 0x9a);
        ioctl_iow_nr!(KVM_SET_GUEST_DEBUG, KVMIO, 0x9b, kvm_guest_debug);
        ioctl_ior_nr!(KVM_GET_VCPU_EVENTS, KVMIO, 0x9f, kvm_vcpu_events);
        ioctl_iow_nr!(KVM_SET_VCPU_EVENTS, KVMIO, 0xa0, kvm_vcpu_events);
        ioctl_ior_nr!(KVM_GET_XSAVE, KVMIO, 0xa4, kvm_xsave);
        ioctl_iow_nr!(KVM_SET_XSAVE, KVMIO, 0xa5, kvm_xsave);
        ioctl_ior_nr!(KVM_GET_XCRS, KVMIO, 0xa6, kvm_xcrs);
        ioctl_iow_nr!(KVM_SET_XCRS, KVMIO, 0xa7, kvm_xcrs);
        ioctl_io_nr!(KVM_GET_STATS_FD, KVMIO, 0xce);
        ioctl_io_nr!(KVM_GET_TSC_KHZ, KVMIO, 0xa3);
    }

    #[test]
    fn every_ioctl_number_matches_kvm_ioctls() {
        let pairs: &[(&str, u32, u64)] = &[
            ("KVM_GET_API_VERSION", host::KVM_GET_API_VERSION, reference::KVM_GET_API_VERSION()),
            ("KVM_CREATE_VM", host::KVM_CREATE_VM, reference::KVM_CREATE_VM()),
            ("KVM_CHECK_EXTENSION", host::KVM_CHECK_EXTENSION, reference::KVM_CHECK_EXTENSION()),
            ("KVM_GET_VCPU_MMAP_SIZE", host::KVM_GET_VCPU_MMAP_SIZE, reference::KVM_GET_VCPU_MMAP_SIZE()),
            ("KVM_GET_SUPPORTED_CPUID", host::KVM_GET_SUPPORTED_CPUID, reference::KVM_GET_SUPPORTED_CPUID()),
            ("KVM_CREATE_VCPU", host::KVM_CREATE_VCPU, reference::KVM_CREATE_VCPU()),
            ("KVM_SET_USER_MEMORY_REGION", host::KVM_SET_USER_MEMORY_REGION, reference::KVM_SET_USER_MEMORY_REGION()),
            ("KVM_SET_TSS_ADDR", host::KVM_SET_TSS_ADDR, reference::KVM_SET_TSS_ADDR()),
            ("KVM_SET_IDENTITY_MAP_ADDR", host::KVM_SET_IDENTITY_MAP_ADDR, reference::KVM_SET_IDENTITY_MAP_ADDR()),
            ("KVM_RUN", host::KVM_RUN, reference::KVM_RUN()),
            ("KVM_GET_REGS", host::KVM_GET_REGS, reference::KVM_GET_REGS()),
            ("KVM_SET_REGS", host::KVM_SET_REGS, reference::KVM_SET_REGS()),
            ("KVM_GET_SREGS", host::KVM_GET_SREGS, reference::KVM_GET_SREGS()),
            ("KVM_SET_SREGS", host::KVM_SET_SREGS, reference::KVM_SET_SREGS()),
            ("KVM_INTERRUPT", host::KVM_INTERRUPT, reference::KVM_INTERRUPT()),
            ("KVM_GET_MSRS", host::KVM_GET_MSRS, reference::KVM_GET_MSRS()),
            ("KVM_SET_MSRS", host::KVM_SET_MSRS, reference::KVM_SET_MSRS()),
            ("KVM_GET_FPU", host::KVM_GET_FPU, reference::KVM_GET_FPU()),
            ("KVM_SET_FPU", host::KVM_SET_FPU, reference::KVM_SET_FPU()),
            ("KVM_SET_CPUID2", host::KVM_SET_CPUID2, reference::KVM_SET_CPUID2()),
            ("KVM_GET_MSR_INDEX_LIST", host::KVM_GET_MSR_INDEX_LIST, reference::KVM_GET_MSR_INDEX_LIST()),
            ("KVM_NMI", host::KVM_NMI, reference::KVM_NMI()),
            ("KVM_SET_GUEST_DEBUG", host::KVM_SET_GUEST_DEBUG, reference::KVM_SET_GUEST_DEBUG()),
            ("KVM_GET_VCPU_EVENTS", host::KVM_GET_VCPU_EVENTS, reference::KVM_GET_VCPU_EVENTS()),
            ("KVM_SET_VCPU_EVENTS", host::KVM_SET_VCPU_EVENTS, reference::KVM_SET_VCPU_EVENTS()),
            ("KVM_GET_XSAVE", host::KVM_GET_XSAVE, reference::KVM_GET_XSAVE()),
            ("KVM_SET_XSAVE", host::KVM_SET_XSAVE, reference::KVM_SET_XSAVE()),
            ("KVM_GET_XCRS", host::KVM_GET_XCRS, reference::KVM_GET_XCRS()),
            ("KVM_SET_XCRS", host::KVM_SET_XCRS, reference::KVM_SET_XCRS()),
            ("KVM_GET_STATS_FD", host::KVM_GET_STATS_FD, reference::KVM_GET_STATS_FD()),
            ("KVM_GET_TSC_KHZ", host::KVM_GET_TSC_KHZ, reference::KVM_GET_TSC_KHZ()),
        ];
        for (name, ours, theirs) in pairs {
            assert_eq!(u64::from(*ours), *theirs, "{name}");
        }
    }

    #[test]
    fn layout_sizes_match_kvm_bindings() {
        use core::mem::size_of;
        assert_eq!(size_of::<kvm_bindings::kvm_regs>(), layout::KVM_REGS);
        assert_eq!(size_of::<kvm_bindings::kvm_sregs>(), layout::KVM_SREGS);
        assert_eq!(size_of::<kvm_bindings::kvm_segment>(), layout::KVM_SEGMENT);
        assert_eq!(
            size_of::<kvm_bindings::kvm_userspace_memory_region>(),
            layout::KVM_USERSPACE_MEMORY_REGION
        );
        assert_eq!(size_of::<kvm_bindings::kvm_run>(), layout::KVM_RUN);
    }

    #[test]
    fn direction_and_size_decode_back() {
        assert_eq!(dir(host::KVM_GET_REGS), IOC_READ);
        assert_eq!(dir(host::KVM_SET_REGS), IOC_WRITE);
        assert_eq!(dir(host::KVM_GET_MSRS), IOC_READ | IOC_WRITE);
        assert_eq!(dir(host::KVM_RUN), IOC_NONE);
        assert_eq!(size(host::KVM_GET_REGS), core::mem::size_of::<kvm_bindings::kvm_regs>());
        assert_eq!(size(host::KVM_RUN), 0);
    }
}
