//! The KVM ioctls rkvm implements, as the fuzzer sees them: for each, its
//! name, number (from `rkvm_core::kvm_ioctl_numbers!`, the list rkvm.ko
//! itself is built from), the kind of fd it is issued on, the shape of its
//! argument and what a successful call returns. Also the ways the fuzzer
//! bends ioctl numbers: flipped direction or size bits, random numbers of
//! KVM's type, random 32-bit numbers.
//!
//! Context: pure logic, any thread.

use rkvm_core::abi::{dir, size, IOC_READ, KVMIO};

/// The ioctl numbers, named as in include/uapi/linux/kvm.h.
pub mod nr {
    #![allow(missing_docs)]
    rkvm_core::kvm_ioctl_numbers!(kvm_bindings);
}

/// KVM ioctls rkvm does not implement but KVM does, whose effect on
/// /dev/kvm would hurt the fuzzer or fake a finding rather than test the
/// device. A bent or random number that equals one of them is not issued;
/// on /dev/rkvm they are unknown numbers like any other.
pub mod deny {
    /// KVM_SET_USER_MEMORY_REGION2, `_IOW(KVMIO, 0x49, struct
    /// kvm_userspace_memory_region2)` (64 bytes): a slot whose userspace
    /// address the fuzzer did not vet, so a guest could write into the
    /// fuzzer's heap.
    pub const KVM_SET_USER_MEMORY_REGION2: u32 =
        rkvm_core::abi::ioc(rkvm_core::abi::IOC_WRITE, 0x49, 64);
    /// KVM_SET_SIGNAL_MASK, `_IOW(KVMIO, 0x8b, struct kvm_signal_mask)`:
    /// a mask that blocks the watchdog's signal during KVM_RUN.
    pub const KVM_SET_SIGNAL_MASK: u32 = rkvm_core::abi::ioc(rkvm_core::abi::IOC_WRITE, 0x8b, 4);
    /// KVM_CREATE_GUEST_MEMFD, `_IOWR(KVMIO, 0xd4, struct
    /// kvm_create_guest_memfd)` (64 bytes): memory the fuzzer cannot vet.
    pub const KVM_CREATE_GUEST_MEMFD: u32 = rkvm_core::abi::ioc(
        rkvm_core::abi::IOC_READ | rkvm_core::abi::IOC_WRITE,
        0xd4,
        64,
    );
    /// KVM_SET_TSC_KHZ, `_IO(KVMIO, 0xa2)`: KVM takes any frequency, and
    /// its KVM_GET_TSC_KHZ then returns one of 2^31 kHz or more through an
    /// `int`, as a negative result other than -1 (seen on the host's KVM
    /// after a random number hit this one).
    pub const KVM_SET_TSC_KHZ: u32 = rkvm_core::abi::io(0xa2);
    /// All of them.
    pub const ALL: [u32; 4] = [
        KVM_SET_USER_MEMORY_REGION2,
        KVM_SET_SIGNAL_MASK,
        KVM_CREATE_GUEST_MEMFD,
        KVM_SET_TSC_KHZ,
    ];
}

/// The kind of file an ioctl is issued on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum FdKind {
    /// The device itself (/dev/kvm, /dev/rkvm).
    System,
    /// A VM (KVM_CREATE_VM).
    Vm,
    /// A vCPU (KVM_CREATE_VCPU).
    Vcpu,
    /// A statistics file (KVM_GET_STATS_FD).
    Stats,
}

impl FdKind {
    /// Every kind, in report order.
    pub const ALL: [FdKind; 4] = [FdKind::System, FdKind::Vm, FdKind::Vcpu, FdKind::Stats];

    /// How the report names it.
    pub fn name(self) -> &'static str {
        match self {
            FdKind::System => "system",
            FdKind::Vm => "vm",
            FdKind::Vcpu => "vcpu",
            FdKind::Stats => "stats",
        }
    }
}

/// The struct an ioctl's pointer argument points at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shape {
    /// `struct kvm_regs`
    Regs,
    /// `struct kvm_sregs`
    Sregs,
    /// `struct kvm_fpu`
    Fpu,
    /// `struct kvm_interrupt`
    Interrupt,
    /// `struct kvm_msrs` and its entries
    Msrs,
    /// `struct kvm_msr_list` and its indices
    MsrList,
    /// `struct kvm_cpuid2` and its entries
    Cpuid2,
    /// `struct kvm_guest_debug`
    GuestDebug,
    /// `struct kvm_vcpu_events`
    VcpuEvents,
    /// `struct kvm_xsave`
    Xsave,
    /// `struct kvm_xcrs`
    Xcrs,
    /// `struct kvm_userspace_memory_region`
    Region,
    /// A `u64` (KVM_SET_IDENTITY_MAP_ADDR)
    U64,
}

impl Shape {
    /// Bytes of the fixed part (the header of a counted array).
    pub fn fixed_size(self) -> usize {
        use std::mem::size_of;
        match self {
            Shape::Regs => size_of::<kvm_bindings::kvm_regs>(),
            Shape::Sregs => size_of::<kvm_bindings::kvm_sregs>(),
            Shape::Fpu => size_of::<kvm_bindings::kvm_fpu>(),
            Shape::Interrupt => size_of::<kvm_bindings::kvm_interrupt>(),
            Shape::Msrs => size_of::<kvm_bindings::kvm_msrs>(),
            Shape::MsrList => size_of::<kvm_bindings::kvm_msr_list>(),
            Shape::Cpuid2 => size_of::<kvm_bindings::kvm_cpuid2>(),
            Shape::GuestDebug => size_of::<kvm_bindings::kvm_guest_debug>(),
            Shape::VcpuEvents => size_of::<kvm_bindings::kvm_vcpu_events>(),
            Shape::Xsave => size_of::<kvm_bindings::kvm_xsave>(),
            Shape::Xcrs => size_of::<kvm_bindings::kvm_xcrs>(),
            Shape::Region => size_of::<kvm_bindings::kvm_userspace_memory_region>(),
            Shape::U64 => size_of::<u64>(),
        }
    }

    /// Bytes of one array entry after the header, for counted shapes.
    pub fn entry_size(self) -> Option<usize> {
        use std::mem::size_of;
        match self {
            Shape::Msrs => Some(size_of::<kvm_bindings::kvm_msr_entry>()),
            Shape::MsrList => Some(size_of::<u32>()),
            Shape::Cpuid2 => Some(size_of::<kvm_bindings::kvm_cpuid_entry2>()),
            _ => None,
        }
    }
}

/// What an ioctl's argument is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ArgKind {
    /// Nothing: KVM wants 0 (KVM_RUN, KVM_GET_API_VERSION, ...).
    None,
    /// An integer: a vCPU id, a capability, an address, a VM type.
    Int,
    /// A pointer to a struct of this shape.
    Ptr(Shape),
}

/// What a successful call returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Returns {
    /// 0.
    Zero,
    /// A new file descriptor.
    Fd,
    /// Any non-negative value (a capability's answer, a size, a frequency).
    Value,
    /// The number of array entries processed: at most the count given.
    Count,
    /// The API version, 12 (api.rst 4.1).
    ApiVersion,
}

/// One known ioctl.
#[derive(Clone, Copy, Debug)]
pub struct IoctlDef {
    /// The name in include/uapi/linux/kvm.h.
    pub name: &'static str,
    /// The ioctl number.
    pub nr: u32,
    /// Where it is issued.
    pub fd: FdKind,
    /// Its argument.
    pub arg: ArgKind,
    /// Its result on success.
    pub returns: Returns,
}

impl IoctlDef {
    /// Whether the kernel writes through the argument (`_IOR`, `_IOWR`).
    pub fn writes_arg(&self) -> bool {
        dir(self.nr) & IOC_READ != 0
    }
}

const fn def(name: &'static str, nr: u32, fd: FdKind, arg: ArgKind, returns: Returns) -> IoctlDef {
    IoctlDef {
        name,
        nr,
        fd,
        arg,
        returns,
    }
}

use ArgKind::{Int, None as NoArg, Ptr};
use FdKind::{System, Vcpu, Vm};

/// Every ioctl rkvm implements, by the fd it belongs to (api.rst section 4).
pub const TABLE: [IoctlDef; 33] = [
    def(
        "KVM_GET_API_VERSION",
        nr::KVM_GET_API_VERSION,
        System,
        NoArg,
        Returns::ApiVersion,
    ),
    def("KVM_CREATE_VM", nr::KVM_CREATE_VM, System, Int, Returns::Fd),
    def(
        "KVM_GET_MSR_INDEX_LIST",
        nr::KVM_GET_MSR_INDEX_LIST,
        System,
        Ptr(Shape::MsrList),
        Returns::Zero,
    ),
    def(
        "KVM_CHECK_EXTENSION",
        nr::KVM_CHECK_EXTENSION,
        System,
        Int,
        Returns::Value,
    ),
    def(
        "KVM_GET_VCPU_MMAP_SIZE",
        nr::KVM_GET_VCPU_MMAP_SIZE,
        System,
        NoArg,
        Returns::Value,
    ),
    def(
        "KVM_GET_SUPPORTED_CPUID",
        nr::KVM_GET_SUPPORTED_CPUID,
        System,
        Ptr(Shape::Cpuid2),
        Returns::Zero,
    ),
    def(
        "KVM_CHECK_EXTENSION",
        nr::KVM_CHECK_EXTENSION,
        Vm,
        Int,
        Returns::Value,
    ),
    def("KVM_CREATE_VCPU", nr::KVM_CREATE_VCPU, Vm, Int, Returns::Fd),
    def(
        "KVM_SET_USER_MEMORY_REGION",
        nr::KVM_SET_USER_MEMORY_REGION,
        Vm,
        Ptr(Shape::Region),
        Returns::Zero,
    ),
    def(
        "KVM_SET_TSS_ADDR",
        nr::KVM_SET_TSS_ADDR,
        Vm,
        Int,
        Returns::Zero,
    ),
    def(
        "KVM_SET_IDENTITY_MAP_ADDR",
        nr::KVM_SET_IDENTITY_MAP_ADDR,
        Vm,
        Ptr(Shape::U64),
        Returns::Zero,
    ),
    def(
        "KVM_GET_STATS_FD",
        nr::KVM_GET_STATS_FD,
        Vm,
        NoArg,
        Returns::Fd,
    ),
    def("KVM_RUN", nr::KVM_RUN, Vcpu, NoArg, Returns::Zero),
    def(
        "KVM_GET_REGS",
        nr::KVM_GET_REGS,
        Vcpu,
        Ptr(Shape::Regs),
        Returns::Zero,
    ),
    def(
        "KVM_SET_REGS",
        nr::KVM_SET_REGS,
        Vcpu,
        Ptr(Shape::Regs),
        Returns::Zero,
    ),
    def(
        "KVM_GET_SREGS",
        nr::KVM_GET_SREGS,
        Vcpu,
        Ptr(Shape::Sregs),
        Returns::Zero,
    ),
    def(
        "KVM_SET_SREGS",
        nr::KVM_SET_SREGS,
        Vcpu,
        Ptr(Shape::Sregs),
        Returns::Zero,
    ),
    def(
        "KVM_INTERRUPT",
        nr::KVM_INTERRUPT,
        Vcpu,
        Ptr(Shape::Interrupt),
        Returns::Zero,
    ),
    def(
        "KVM_GET_MSRS",
        nr::KVM_GET_MSRS,
        Vcpu,
        Ptr(Shape::Msrs),
        Returns::Count,
    ),
    def(
        "KVM_SET_MSRS",
        nr::KVM_SET_MSRS,
        Vcpu,
        Ptr(Shape::Msrs),
        Returns::Count,
    ),
    def(
        "KVM_GET_FPU",
        nr::KVM_GET_FPU,
        Vcpu,
        Ptr(Shape::Fpu),
        Returns::Zero,
    ),
    def(
        "KVM_SET_FPU",
        nr::KVM_SET_FPU,
        Vcpu,
        Ptr(Shape::Fpu),
        Returns::Zero,
    ),
    def(
        "KVM_SET_CPUID2",
        nr::KVM_SET_CPUID2,
        Vcpu,
        Ptr(Shape::Cpuid2),
        Returns::Zero,
    ),
    def("KVM_NMI", nr::KVM_NMI, Vcpu, NoArg, Returns::Zero),
    def(
        "KVM_SET_GUEST_DEBUG",
        nr::KVM_SET_GUEST_DEBUG,
        Vcpu,
        Ptr(Shape::GuestDebug),
        Returns::Zero,
    ),
    def(
        "KVM_GET_VCPU_EVENTS",
        nr::KVM_GET_VCPU_EVENTS,
        Vcpu,
        Ptr(Shape::VcpuEvents),
        Returns::Zero,
    ),
    def(
        "KVM_SET_VCPU_EVENTS",
        nr::KVM_SET_VCPU_EVENTS,
        Vcpu,
        Ptr(Shape::VcpuEvents),
        Returns::Zero,
    ),
    def(
        "KVM_GET_XSAVE",
        nr::KVM_GET_XSAVE,
        Vcpu,
        Ptr(Shape::Xsave),
        Returns::Zero,
    ),
    def(
        "KVM_SET_XSAVE",
        nr::KVM_SET_XSAVE,
        Vcpu,
        Ptr(Shape::Xsave),
        Returns::Zero,
    ),
    def(
        "KVM_GET_XCRS",
        nr::KVM_GET_XCRS,
        Vcpu,
        Ptr(Shape::Xcrs),
        Returns::Zero,
    ),
    def(
        "KVM_SET_XCRS",
        nr::KVM_SET_XCRS,
        Vcpu,
        Ptr(Shape::Xcrs),
        Returns::Zero,
    ),
    def(
        "KVM_GET_TSC_KHZ",
        nr::KVM_GET_TSC_KHZ,
        Vcpu,
        NoArg,
        Returns::Value,
    ),
    def(
        "KVM_GET_STATS_FD",
        nr::KVM_GET_STATS_FD,
        Vcpu,
        NoArg,
        Returns::Fd,
    ),
];

/// The known ioctl `nr` on an fd of `kind`, if it is one.
pub fn lookup(kind: FdKind, nr: u32) -> Option<&'static IoctlDef> {
    TABLE.iter().find(|d| d.fd == kind && d.nr == nr)
}

/// The known ioctl of `kind` with the same function number (low byte)
/// and KVM's type as `nr`, whatever its direction and size bits: whose
/// argument a bent number gets, so that a device that decodes only part
/// of the number still sees the struct it would expect.
pub fn same_function(kind: FdKind, nr: u32) -> Option<&'static IoctlDef> {
    if (nr >> 8) & 0xff != KVMIO {
        return TABLE
            .iter()
            .find(|d| d.fd == kind && d.nr & 0xff == nr & 0xff);
    }
    TABLE
        .iter()
        .find(|d| d.fd == kind && d.nr & 0xffff == nr & 0xffff)
}

/// The known ioctls of `kind`.
pub fn for_kind(kind: FdKind) -> impl Iterator<Item = &'static IoctlDef> {
    TABLE.iter().filter(move |d| d.fd == kind)
}

/// The name of `nr` on an fd of `kind`, or "unknown".
pub fn name_of(kind: FdKind, nr: u32) -> &'static str {
    lookup(kind, nr).map_or("unknown", |d| d.name)
}

/// Whether `nr` must not be issued at all (see [`deny`]).
pub fn denied(nr: u32) -> bool {
    deny::ALL.contains(&nr)
}

/// `nr` with its direction bits, its size bits or both changed, never
/// equal to `nr` itself. `r` supplies the randomness.
pub fn bend(nr: u32, r: u64) -> u32 {
    let dir_bits = (r & 3) as u32;
    let size_bits = ((r >> 2) & 0x3fff) as u32;
    let bent = match (r >> 16) % 4 {
        // Another direction.
        0 => (nr & 0x3fff_ffff) | (dir_bits << 30),
        // Another size.
        1 => (nr & !(0x3fff << 16)) | (size_bits << 16),
        // One size bit flipped: off by a power of two.
        2 => nr ^ (1 << (16 + (r >> 20) % 14)),
        // Both.
        _ => (dir_bits << 30) | (size_bits << 16) | (nr & 0xffff),
    };
    if bent == nr {
        nr ^ (1 << 16)
    } else {
        bent
    }
}

/// A random number of KVM's ioctl type: any direction, size and function.
pub fn random_kvmio(r: u64) -> u32 {
    let d = (r & 3) as u32;
    // Half the time a size of 0, as `_IO` numbers have.
    let s = if r & 4 == 0 {
        0
    } else {
        ((r >> 3) & 0x3fff) as u32
    };
    let f = ((r >> 17) & 0xff) as u32;
    (d << 30) | (s << 16) | (KVMIO << 8) | f
}

/// The direction and size of `nr`, for a report line.
pub fn describe(nr: u32) -> String {
    let d = match dir(nr) {
        0 => "_IO",
        1 => "_IOW",
        2 => "_IOR",
        _ => "_IOWR",
    };
    format!(
        "{nr:#010x} ({d}, type {:#x}, nr {:#x}, size {})",
        (nr >> 8) & 0xff,
        nr & 0xff,
        size(nr)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_known_number_is_one_of_kvms() {
        for d in &TABLE {
            assert_eq!((d.nr >> 8) & 0xff, KVMIO, "{}", d.name);
            match d.arg {
                ArgKind::Ptr(shape) => assert_eq!(size(d.nr), shape.fixed_size(), "{}", d.name),
                _ => assert_eq!(size(d.nr), 0, "{}", d.name),
            }
        }
    }

    #[test]
    fn a_number_names_one_ioctl_per_fd_kind() {
        for (i, a) in TABLE.iter().enumerate() {
            for b in &TABLE[i + 1..] {
                assert!(a.fd != b.fd || a.nr != b.nr, "{} and {}", a.name, b.name);
            }
        }
        assert_eq!(name_of(FdKind::Vcpu, nr::KVM_GET_REGS), "KVM_GET_REGS");
        assert_eq!(name_of(FdKind::Vm, nr::KVM_GET_REGS), "unknown");
        assert_eq!(
            lookup(FdKind::Vm, nr::KVM_CHECK_EXTENSION).map(|d| d.fd),
            Some(FdKind::Vm)
        );
    }

    #[test]
    fn denied_numbers_are_none_of_rkvms() {
        for d in &TABLE {
            assert!(!denied(d.nr), "{}", d.name);
        }
        assert!(denied(deny::KVM_SET_USER_MEMORY_REGION2));
    }

    #[test]
    fn a_bent_number_is_never_the_original_and_keeps_its_function() {
        let mut r = crate::rng::Rng::new(1);
        for d in &TABLE {
            for _ in 0..500 {
                let b = bend(d.nr, r.next_u64());
                assert_ne!(b, d.nr, "{}", d.name);
                assert_eq!(b & 0xffff, d.nr & 0xffff, "{}", d.name);
                assert_eq!(
                    same_function(d.fd, b).map(|x| x.nr & 0xffff),
                    Some(d.nr & 0xffff)
                );
            }
        }
    }

    #[test]
    fn random_kvmio_numbers_have_kvms_type() {
        let mut r = crate::rng::Rng::new(2);
        let mut zero_size = 0;
        for _ in 0..1000 {
            let n = random_kvmio(r.next_u64());
            assert_eq!((n >> 8) & 0xff, KVMIO);
            zero_size += usize::from(size(n) == 0);
        }
        assert!(zero_size > 300, "sizes of 0 are common: {zero_size}");
    }

    #[test]
    fn writes_and_reads_follow_the_direction_bits() {
        let get = lookup(FdKind::Vcpu, nr::KVM_GET_REGS).expect("known");
        let set = lookup(FdKind::Vcpu, nr::KVM_SET_REGS).expect("known");
        let msrs = lookup(FdKind::Vcpu, nr::KVM_GET_MSRS).expect("known");
        let reads = |d: &IoctlDef| dir(d.nr) & rkvm_core::abi::IOC_WRITE != 0;
        assert!(get.writes_arg() && !reads(get));
        assert!(reads(set) && !set.writes_arg());
        assert!(reads(msrs) && msrs.writes_arg());
    }
}
