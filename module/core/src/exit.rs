//! VM-exit information decoded into types: the basic exit reasons rkvm
//! handles (SDM Vol. 3D, Appendix C "VMX Basic Exit Reasons") and the exit
//! qualifications it reads (SDM Vol. 3C, 28.2.1 "Basic VM-Exit Information").

/// Basic exit reasons (bits 15:0 of the exit-reason field), Appendix C.
pub mod reason {
    #![allow(missing_docs)]
    pub const EXCEPTION_NMI: u16 = 0;
    pub const EXTERNAL_INTERRUPT: u16 = 1;
    pub const TRIPLE_FAULT: u16 = 2;
    pub const INIT_SIGNAL: u16 = 3;
    pub const INTERRUPT_WINDOW: u16 = 7;
    pub const NMI_WINDOW: u16 = 8;
    pub const TASK_SWITCH: u16 = 9;
    pub const CPUID: u16 = 10;
    pub const HLT: u16 = 12;
    pub const INVD: u16 = 13;
    pub const INVLPG: u16 = 14;
    pub const RDPMC: u16 = 15;
    pub const RDTSC: u16 = 16;
    pub const VMCALL: u16 = 18;
    pub const VMCLEAR: u16 = 19;
    pub const VMLAUNCH: u16 = 20;
    pub const VMPTRLD: u16 = 21;
    pub const VMPTRST: u16 = 22;
    pub const VMREAD: u16 = 23;
    pub const VMRESUME: u16 = 24;
    pub const VMWRITE: u16 = 25;
    pub const VMXOFF: u16 = 26;
    pub const VMXON: u16 = 27;
    pub const CR_ACCESS: u16 = 28;
    pub const DR_ACCESS: u16 = 29;
    pub const IO_INSTRUCTION: u16 = 30;
    pub const RDMSR: u16 = 31;
    pub const WRMSR: u16 = 32;
    pub const INVALID_GUEST_STATE: u16 = 33;
    pub const MSR_LOADING: u16 = 34;
    pub const MWAIT: u16 = 36;
    pub const MONITOR_TRAP_FLAG: u16 = 37;
    pub const MONITOR: u16 = 39;
    pub const PAUSE: u16 = 40;
    pub const MACHINE_CHECK: u16 = 41;
    pub const EPT_VIOLATION: u16 = 48;
    pub const EPT_MISCONFIG: u16 = 49;
    pub const INVEPT: u16 = 50;
    pub const RDTSCP: u16 = 51;
    pub const PREEMPTION_TIMER: u16 = 52;
    pub const INVVPID: u16 = 53;
    pub const WBINVD: u16 = 54;
    pub const XSETBV: u16 = 55;
}

/// The exit-reason field (Table 28-? "Format of Exit Reason").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExitReason(pub u32);

impl ExitReason {
    /// Bits 15:0.
    pub fn basic(self) -> u16 {
        self.0 as u16
    }

    /// Bit 31: the exit happened during VM entry (invalid guest state, MSR
    /// loading, machine check): the guest never ran.
    pub fn entry_failed(self) -> bool {
        self.0 & (1 << 31) != 0
    }
}

/// Exit qualification of I/O instructions (Table 28-5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IoQualification {
    /// 1, 2 or 4 bytes.
    pub size: u8,
    /// IN (true) or OUT.
    pub is_in: bool,
    /// INS/OUTS.
    pub string: bool,
    /// REP prefix.
    pub rep: bool,
    /// The port.
    pub port: u16,
}

impl IoQualification {
    /// Decodes the qualification; `None` for a reserved size encoding.
    pub fn decode(q: u64) -> Option<Self> {
        let size = match q & 7 {
            0 => 1,
            1 => 2,
            3 => 4,
            _ => return None,
        };
        Some(Self {
            size,
            is_in: q & (1 << 3) != 0,
            string: q & (1 << 4) != 0,
            rep: q & (1 << 5) != 0,
            port: (q >> 16) as u16,
        })
    }
}

/// Exit qualification of control-register accesses (Table 28-3). `cr` is
/// the control register's number, `gpr` the general-purpose register's
/// (0 = RAX ... 15 = R15), `source` the 16-bit operand of LMSW.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(missing_docs)]
pub enum CrAccess {
    /// MOV to CRn from general-purpose register `gpr` (0 = RAX ... 15 = R15).
    MovTo { cr: u8, gpr: u8 },
    /// MOV from CRn to register `gpr`.
    MovFrom { cr: u8, gpr: u8 },
    /// CLTS.
    Clts,
    /// LMSW with this 16-bit source.
    Lmsw { source: u16 },
}

impl CrAccess {
    /// Decodes the qualification.
    pub fn decode(q: u64) -> Self {
        let cr = (q & 0xf) as u8;
        let gpr = ((q >> 8) & 0xf) as u8;
        match (q >> 4) & 3 {
            0 => Self::MovTo { cr, gpr },
            1 => Self::MovFrom { cr, gpr },
            2 => Self::Clts,
            _ => Self::Lmsw { source: (q >> 16) as u16 },
        }
    }
}

/// Exit qualification of MOV DR (Table 28-4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DrAccess {
    /// The debug register, 0-7.
    pub dr: u8,
    /// MOV from DR (true) or to DR.
    pub read: bool,
    /// The general-purpose register (0 = RAX ... 15 = R15).
    pub gpr: u8,
}

impl DrAccess {
    /// Decodes the qualification.
    pub fn decode(q: u64) -> Self {
        Self { dr: (q & 7) as u8, read: q & (1 << 4) != 0, gpr: ((q >> 8) & 0xf) as u8 }
    }
}

/// Exit qualification of EPT violations (Table 28-7), the bits rkvm uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EptViolation {
    /// The access was a data read.
    pub read: bool,
    /// The access was a data write.
    pub write: bool,
    /// The access was an instruction fetch.
    pub fetch: bool,
    /// The guest-physical address came from a guest-linear address (an
    /// ordinary access, not a guest page-table walk).
    pub linear_address_valid: bool,
}

impl EptViolation {
    /// Decodes the qualification.
    pub fn decode(q: u64) -> Self {
        Self {
            read: q & 1 != 0,
            write: q & 2 != 0,
            fetch: q & 4 != 0,
            linear_address_valid: q & (1 << 7) != 0,
        }
    }
}

/// VM-entry/exit interruption information (Table 26-17/28-?): bits 7:0
/// vector, 10:8 type, 11 error code valid, 31 valid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InterruptionInfo(pub u32);

impl InterruptionInfo {
    /// Event type: external interrupt.
    pub const EXTERNAL: u32 = 0;
    /// Event type: NMI.
    pub const NMI: u32 = 2;
    /// Event type: hardware exception.
    pub const HARDWARE_EXCEPTION: u32 = 3;

    /// An event to inject, or as reported: `vector` of `kind`.
    pub fn new(vector: u8, kind: u32, error_code: bool) -> Self {
        Self(u32::from(vector) | (kind << 8) | u32::from(error_code) << 11 | 1 << 31)
    }

    /// Bit 31.
    pub fn valid(self) -> bool {
        self.0 & (1 << 31) != 0
    }

    /// Bits 10:8.
    pub fn kind(self) -> u32 {
        (self.0 >> 8) & 7
    }

    /// Bits 7:0.
    pub fn vector(self) -> u8 {
        self.0 as u8
    }

    /// Whether this reports an NMI (vector 2, type NMI).
    pub fn is_nmi(self) -> bool {
        self.valid() && self.kind() == Self::NMI && self.vector() == 2
    }

    /// Whether this reports a machine check (#MC, vector 18, a hardware
    /// exception).
    pub fn is_machine_check(self) -> bool {
        self.valid() && self.kind() == Self::HARDWARE_EXCEPTION && self.vector() == 18
    }
}

/// Whether an exit with `reason` and exit interruption information `info`
/// was caused by a machine check, which belongs to the host: an #MC while
/// the guest ran (intercepted through the exception bitmap) or during VM
/// entry (basic reason 41, SDM Vol. 3C 27.8 "VM-Entry Failures During or
/// After Loading Guest State").
pub fn host_machine_check(reason: ExitReason, info: InterruptionInfo) -> bool {
    match reason.basic() {
        reason::MACHINE_CHECK => true,
        reason::EXCEPTION_NMI => info.is_machine_check(),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn machine_checks_during_entry_or_in_the_guest_are_the_hosts() {
        let mc = InterruptionInfo::new(18, InterruptionInfo::HARDWARE_EXCEPTION, false);
        let entry_failure = ExitReason((1 << 31) | u32::from(reason::MACHINE_CHECK));
        assert!(host_machine_check(entry_failure, InterruptionInfo(0)));
        assert!(host_machine_check(ExitReason(0), mc));
        // An NMI, a guest's own #DB, or vector 18 as a software interrupt
        // (INT 18: type 4) are not.
        assert!(!host_machine_check(ExitReason(0), InterruptionInfo::new(2, InterruptionInfo::NMI, false)));
        assert!(!host_machine_check(ExitReason(0), InterruptionInfo::new(1, InterruptionInfo::HARDWARE_EXCEPTION, false)));
        assert!(!host_machine_check(ExitReason(0), InterruptionInfo::new(18, 4, false)));
        assert!(!host_machine_check(ExitReason(u32::from(reason::EPT_VIOLATION)), mc));
    }

    #[test]
    fn io_qualification_fields() {
        // OUT DX, AL to 0x3f8: size 0 (1 byte), direction 0, port in 31:16.
        assert_eq!(
            IoQualification::decode(0x03f8_0000),
            Some(IoQualification { size: 1, is_in: false, string: false, rep: false, port: 0x3f8 })
        );
        // REP INSD from 0x60: size 3, IN, string, REP.
        assert_eq!(
            IoQualification::decode(0x0060_0000 | 3 | 8 | 16 | 32),
            Some(IoQualification { size: 4, is_in: true, string: true, rep: true, port: 0x60 })
        );
        assert_eq!(IoQualification::decode(2), None);
    }

    #[test]
    fn cr_access_qualification_fields() {
        assert_eq!(CrAccess::decode(0x0000), CrAccess::MovTo { cr: 0, gpr: 0 });
        assert_eq!(CrAccess::decode(0x0b14), CrAccess::MovFrom { cr: 4, gpr: 11 });
        assert_eq!(CrAccess::decode(0x0020), CrAccess::Clts);
        assert_eq!(CrAccess::decode(0x0011_0030), CrAccess::Lmsw { source: 0x11 });
    }

    #[test]
    fn exit_reason_and_interruption_info() {
        let r = ExitReason(0x8000_0021);
        assert_eq!(r.basic(), reason::INVALID_GUEST_STATE);
        assert!(r.entry_failed());
        assert!(InterruptionInfo(0x8000_0202).is_nmi());
        let gp = InterruptionInfo::new(13, InterruptionInfo::HARDWARE_EXCEPTION, true);
        assert_eq!(gp.0, 0x8000_0b0d);
    }

    #[test]
    fn dr_access_fields() {
        assert_eq!(DrAccess::decode(0x0307), DrAccess { dr: 7, read: false, gpr: 3 });
        assert_eq!(DrAccess::decode(0x0010), DrAccess { dr: 0, read: true, gpr: 0 });
    }

    #[test]
    fn ept_violation_access_bits() {
        let v = EptViolation::decode(0x182);
        assert!(v.write && !v.read && !v.fetch && v.linear_address_valid);
    }
}
