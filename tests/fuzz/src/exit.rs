//! KVM_RUN's answer as the fuzzer checks it: the exit reasons of the ABI
//! with their names, a plain decoded view of the `kvm_run` page (the union
//! read once, here), and the rules an exit must follow for a VMM to be able
//! to act on it safely (api.rst section 5, "The kvm_run structure").
//!
//! Context: pure logic, any thread.

use kvm_bindings::*;

/// `KVM_EXIT_ARM_SEA` (41), in Linux's uapi after kvm-bindings 0.14 was
/// generated, like `KVM_EXIT_TDX` (40).
pub const KVM_EXIT_ARM_SEA: u32 = 41;

/// Every exit reason the ABI defines, by number (the index).
const NAMES: [&str; 42] = [
    "KVM_EXIT_UNKNOWN",
    "KVM_EXIT_EXCEPTION",
    "KVM_EXIT_IO",
    "KVM_EXIT_HYPERCALL",
    "KVM_EXIT_DEBUG",
    "KVM_EXIT_HLT",
    "KVM_EXIT_MMIO",
    "KVM_EXIT_IRQ_WINDOW_OPEN",
    "KVM_EXIT_SHUTDOWN",
    "KVM_EXIT_FAIL_ENTRY",
    "KVM_EXIT_INTR",
    "KVM_EXIT_SET_TPR",
    "KVM_EXIT_TPR_ACCESS",
    "KVM_EXIT_S390_SIEIC",
    "KVM_EXIT_S390_RESET",
    "KVM_EXIT_DCR",
    "KVM_EXIT_NMI",
    "KVM_EXIT_INTERNAL_ERROR",
    "KVM_EXIT_OSI",
    "KVM_EXIT_PAPR_HCALL",
    "KVM_EXIT_S390_UCONTROL",
    "KVM_EXIT_WATCHDOG",
    "KVM_EXIT_S390_TSCH",
    "KVM_EXIT_EPR",
    "KVM_EXIT_SYSTEM_EVENT",
    "KVM_EXIT_S390_STSI",
    "KVM_EXIT_IOAPIC_EOI",
    "KVM_EXIT_HYPERV",
    "KVM_EXIT_ARM_NISV",
    "KVM_EXIT_X86_RDMSR",
    "KVM_EXIT_X86_WRMSR",
    "KVM_EXIT_DIRTY_RING_FULL",
    "KVM_EXIT_AP_RESET_HOLD",
    "KVM_EXIT_X86_BUS_LOCK",
    "KVM_EXIT_XEN",
    "KVM_EXIT_RISCV_SBI",
    "KVM_EXIT_RISCV_CSR",
    "KVM_EXIT_NOTIFY",
    "KVM_EXIT_LOONGARCH_IOCSR",
    "KVM_EXIT_MEMORY_FAULT",
    "KVM_EXIT_TDX",
    "KVM_EXIT_ARM_SEA",
];

/// Exit reasons of other architectures (s390, PowerPC, Arm, RISC-V,
/// LoongArch): an x86 device never has a reason to return them.
const FOREIGN: [u32; 15] = [
    KVM_EXIT_S390_SIEIC,
    KVM_EXIT_S390_RESET,
    KVM_EXIT_DCR,
    KVM_EXIT_OSI,
    KVM_EXIT_PAPR_HCALL,
    KVM_EXIT_S390_UCONTROL,
    KVM_EXIT_WATCHDOG,
    KVM_EXIT_S390_TSCH,
    KVM_EXIT_EPR,
    KVM_EXIT_S390_STSI,
    KVM_EXIT_ARM_NISV,
    KVM_EXIT_RISCV_SBI,
    KVM_EXIT_RISCV_CSR,
    KVM_EXIT_LOONGARCH_IOCSR,
    KVM_EXIT_ARM_SEA,
];

/// The name of exit reason `reason`, or "exit reason N".
pub fn name(reason: u32) -> String {
    NAMES
        .get(reason as usize)
        .map_or_else(|| format!("exit reason {reason}"), |s| (*s).to_string())
}

/// The fields of `kvm_run` that the checks and the exit handlers use.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExitView {
    /// `exit_reason`
    pub reason: u32,
    /// `ready_for_interrupt_injection`
    pub ready_for_interrupt: bool,
    /// `if_flag`
    pub if_flag: bool,
    /// `io.direction`, `io.size`, `io.port`, `io.count`, `io.data_offset`
    pub io: IoView,
    /// `mmio.phys_addr`, `mmio.len`, `mmio.is_write`
    pub mmio: MmioView,
    /// `internal.suberror` and `internal.ndata`
    pub internal: (u32, u32),
    /// `fail_entry.hardware_entry_failure_reason`
    pub fail_entry_reason: u64,
}

/// The `io` member of the exit union.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IoView {
    /// `KVM_EXIT_IO_IN` (0) or `KVM_EXIT_IO_OUT` (1).
    pub direction: u8,
    /// Bytes per element: 1, 2 or 4.
    pub size: u8,
    /// The port.
    pub port: u16,
    /// Elements (more than 1 for REP INS/OUTS).
    pub count: u32,
    /// Where the data is, from the start of the kvm_run mapping.
    pub data_offset: u64,
}

/// The `mmio` member of the exit union.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MmioView {
    /// The guest-physical address.
    pub phys_addr: u64,
    /// Bytes: 1 to 8.
    pub len: u32,
    /// 1 for a write, 0 for a read.
    pub is_write: u8,
}

impl ExitView {
    /// Decodes the exit that `run` describes.
    pub fn decode(run: &kvm_run) -> ExitView {
        // SAFETY: every member of the exit union is plain integers, so
        // whatever bytes the device left there are a valid value of each;
        // which member is meaningful is decided by `exit_reason` later.
        let (io, mmio, internal, fail_entry) = unsafe {
            (
                run.__bindgen_anon_1.io,
                run.__bindgen_anon_1.mmio,
                run.__bindgen_anon_1.internal,
                run.__bindgen_anon_1.fail_entry,
            )
        };
        ExitView {
            reason: run.exit_reason,
            ready_for_interrupt: run.ready_for_interrupt_injection != 0,
            if_flag: run.if_flag != 0,
            io: IoView {
                direction: io.direction,
                size: io.size,
                port: io.port,
                count: io.count,
                data_offset: io.data_offset,
            },
            mmio: MmioView {
                phys_addr: mmio.phys_addr,
                len: mmio.len,
                is_write: mmio.is_write,
            },
            internal: (internal.suberror, internal.ndata),
            fail_entry_reason: fail_entry.hardware_entry_failure_reason,
        }
    }

    /// The data of an IO exit as a range of the kvm_run mapping, if it
    /// lies inside the `mmap_size` bytes of it.
    pub fn io_data(&self, mmap_size: usize) -> Option<std::ops::Range<usize>> {
        let len = u64::from(self.io.size).checked_mul(u64::from(self.io.count))?;
        let end = self.io.data_offset.checked_add(len)?;
        (end <= mmap_size as u64).then_some(self.io.data_offset as usize..end as usize)
    }
}

/// What is wrong with a KVM_RUN that returned 0 with `exit`, if anything,
/// for a vCPU whose kvm_run mapping has `mmap_size` bytes
/// (KVM_GET_VCPU_MMAP_SIZE). The text names the rule, without the values
/// (those go into the example), so that one broken rule is one finding.
pub fn violation(exit: &ExitView, mmap_size: usize) -> Option<&'static str> {
    if let Some(v) = reason_violation(exit.reason) {
        return Some(v);
    }
    match exit.reason {
        KVM_EXIT_IO => {
            let io = &exit.io;
            if !matches!(io.size, 1 | 2 | 4) {
                return Some("KVM_EXIT_IO with a size other than 1, 2 or 4");
            }
            if u32::from(io.direction) > KVM_EXIT_IO_OUT {
                return Some("KVM_EXIT_IO with a direction other than in (0) or out (1)");
            }
            if io.count == 0 {
                return Some("KVM_EXIT_IO with a count of 0");
            }
            if exit.io_data(mmap_size).is_none() {
                return Some("KVM_EXIT_IO whose data (data_offset + size * count) ends beyond the vCPU mapping");
            }
        }
        KVM_EXIT_MMIO => {
            if exit.mmio.len == 0 || exit.mmio.len > 8 {
                return Some("KVM_EXIT_MMIO with a length of 0 or more than 8");
            }
            if exit.mmio.is_write > 1 {
                return Some("KVM_EXIT_MMIO with is_write other than 0 or 1");
            }
        }
        // `internal.data` has 16 entries; a VMM reads `ndata` of them.
        KVM_EXIT_INTERNAL_ERROR if exit.internal.1 > 16 => {
            return Some(
                "KVM_EXIT_INTERNAL_ERROR with ndata beyond the 16 entries of internal.data",
            );
        }
        _ => {}
    }
    None
}

/// What is wrong with exit reason `reason` alone, if anything: a number
/// the ABI does not define, or one of another architecture.
pub fn reason_violation(reason: u32) -> Option<&'static str> {
    if reason as usize >= NAMES.len() {
        return Some("KVM_RUN returned an exit reason the ABI does not define");
    }
    if FOREIGN.contains(&reason) {
        return Some("KVM_RUN returned an exit reason of another architecture");
    }
    None
}

/// The values behind a violation, for its example.
pub fn describe(exit: &ExitView) -> String {
    match exit.reason {
        KVM_EXIT_IO => format!("{} {:x?}", name(exit.reason), exit.io),
        KVM_EXIT_MMIO => format!("{} {:x?}", name(exit.reason), exit.mmio),
        KVM_EXIT_INTERNAL_ERROR => {
            format!(
                "{} suberror {} ndata {}",
                name(exit.reason),
                exit.internal.0,
                exit.internal.1
            )
        }
        KVM_EXIT_FAIL_ENTRY => {
            format!("{} reason {:#x}", name(exit.reason), exit.fail_entry_reason)
        }
        _ => name(exit.reason),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MMAP: usize = 3 * 4096;

    fn io(direction: u8, size: u8, count: u32, data_offset: u64) -> ExitView {
        ExitView {
            reason: KVM_EXIT_IO,
            io: IoView {
                direction,
                size,
                port: 0x80,
                count,
                data_offset,
            },
            ..Default::default()
        }
    }

    #[test]
    fn names_match_kvm_bindings() {
        assert_eq!(name(KVM_EXIT_IO), "KVM_EXIT_IO");
        assert_eq!(name(KVM_EXIT_MEMORY_FAULT), "KVM_EXIT_MEMORY_FAULT");
        assert_eq!(name(KVM_EXIT_X86_BUS_LOCK), "KVM_EXIT_X86_BUS_LOCK");
        assert_eq!(name(KVM_EXIT_FAIL_ENTRY), "KVM_EXIT_FAIL_ENTRY");
        assert_eq!(name(KVM_EXIT_INTERNAL_ERROR), "KVM_EXIT_INTERNAL_ERROR");
        assert_eq!(name(42), "exit reason 42");
        assert_eq!(NAMES.len() as u32, KVM_EXIT_MEMORY_FAULT + 3);
    }

    #[test]
    fn well_formed_exits_pass() {
        assert_eq!(violation(&io(KVM_EXIT_IO_IN as u8, 1, 1, 4096), MMAP), None);
        assert_eq!(
            violation(&io(KVM_EXIT_IO_OUT as u8, 4, 1024, 4096), MMAP),
            None
        );
        let hlt = ExitView {
            reason: KVM_EXIT_HLT,
            ..Default::default()
        };
        assert_eq!(violation(&hlt, MMAP), None);
        let mmio = ExitView {
            reason: KVM_EXIT_MMIO,
            mmio: MmioView {
                len: 8,
                is_write: 1,
                phys_addr: 1,
            },
            ..Default::default()
        };
        assert_eq!(violation(&mmio, MMAP), None);
    }

    #[test]
    fn undefined_and_foreign_reasons_are_violations() {
        for reason in [42, 100, u32::MAX] {
            let e = ExitView {
                reason,
                ..Default::default()
            };
            assert!(
                violation(&e, MMAP).is_some_and(|v| v.contains("does not define")),
                "{reason}"
            );
        }
        let e = ExitView {
            reason: KVM_EXIT_S390_SIEIC,
            ..Default::default()
        };
        assert!(violation(&e, MMAP).is_some_and(|v| v.contains("another architecture")));
        let tdx = ExitView {
            reason: 40,
            ..Default::default()
        };
        assert_eq!(name(40), "KVM_EXIT_TDX");
        let e = tdx;
        assert_eq!(violation(&e, MMAP), None);
    }

    #[test]
    fn io_exits_must_be_usable() {
        assert!(violation(&io(0, 3, 1, 4096), MMAP).is_some());
        assert!(violation(&io(0, 8, 1, 4096), MMAP).is_some());
        assert!(violation(&io(2, 1, 1, 4096), MMAP).is_some());
        assert!(violation(&io(0, 1, 0, 4096), MMAP).is_some());
        // Data that runs past the mapping, or wraps around.
        assert!(violation(&io(0, 4, 2049, 4096), MMAP).is_some());
        assert_eq!(violation(&io(0, 4, 2048, 4096), MMAP), None);
        assert!(violation(&io(0, 1, 1, MMAP as u64), MMAP).is_some());
        assert!(violation(&io(0, 4, u32::MAX, u64::MAX - 2), MMAP).is_some());
        assert_eq!(violation(&io(0, 1, 1, MMAP as u64 - 1), MMAP), None);
    }

    #[test]
    fn io_data_is_the_range_inside_the_mapping() {
        assert_eq!(io(0, 2, 3, 4096).io_data(MMAP), Some(4096..4102));
        assert_eq!(io(0, 2, 3, MMAP as u64).io_data(MMAP), None);
    }

    #[test]
    fn mmio_and_internal_error_exits_must_be_usable() {
        for (len, is_write) in [(0, 0), (9, 0), (u32::MAX, 1), (4, 2)] {
            let e = ExitView {
                reason: KVM_EXIT_MMIO,
                mmio: MmioView {
                    len,
                    is_write,
                    phys_addr: 0,
                },
                ..Default::default()
            };
            assert!(
                violation(&e, MMAP).is_some(),
                "len {len} is_write {is_write}"
            );
        }
        let e = ExitView {
            reason: KVM_EXIT_INTERNAL_ERROR,
            internal: (1, 17),
            ..Default::default()
        };
        assert!(violation(&e, MMAP).is_some());
        let e = ExitView {
            reason: KVM_EXIT_INTERNAL_ERROR,
            internal: (1, 16),
            ..Default::default()
        };
        assert_eq!(violation(&e, MMAP), None);
    }

    #[test]
    fn decode_reads_the_union_member_of_the_reason() {
        let mut run = kvm_run {
            exit_reason: KVM_EXIT_IO,
            ..Default::default()
        };
        run.__bindgen_anon_1.io = kvm_run__bindgen_ty_1__bindgen_ty_4 {
            direction: 1,
            size: 2,
            port: 0x3f8,
            count: 5,
            data_offset: 4096,
        };
        let view = ExitView::decode(&run);
        assert_eq!(
            view.io,
            IoView {
                direction: 1,
                size: 2,
                port: 0x3f8,
                count: 5,
                data_offset: 4096
            }
        );
        assert_eq!(violation(&view, MMAP), None);
    }
}
