//! The local APIC's register page (xAPIC mode, SDM Vol. 3A 11.4.1), without
//! interrupt delivery yet: a kernel probing the APIC finds one (ID 0,
//! version 0x14 with six LVT entries, as QEMU's), can program it and read
//! its settings back, and can write EOI. Timer, IPIs and interrupt
//! acceptance come with the interrupt work; the register file is already
//! laid out for them.
//!
//! Registers sit at 16-byte-aligned offsets and are accessed with aligned
//! 32-bit loads and stores only (SDM 11.4.1); other accesses are undefined
//! on hardware, and here read all ones and drop writes, with a debug log.

use crate::bus::MmioDevice;

/// Default guest-physical base of the local APIC (IA32_APIC_BASE at reset).
pub const APIC_BASE: u64 = 0xfee0_0000;
/// One 4 KiB page of registers.
pub const APIC_LEN: u64 = 0x1000;

/// Local APIC version register: version 0x14 (an integrated xAPIC), max
/// LVT entry 5 (timer, thermal, performance, LINT0, LINT1, error).
const VERSION: u32 = 0x0005_0014;
/// The first LVT (timer) and the last (error): six contiguous registers.
const LVT_FIRST: u64 = 0x320;
const LVT_LAST: u64 = 0x370;
/// An LVT's mask bit, set at reset.
const LVT_MASKED: u32 = 1 << 16;
/// Register slots: offsets 0x000-0x3f0; the rest of the page is reserved.
const SLOTS: usize = 0x40;

/// What an offset (16-byte aligned, below 0x400) holds. SDM Table 11-1.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Reg {
    /// APIC ID: 0, the only CPU.
    Id,
    Version,
    /// Written to signal end of interrupt; reads 0.
    Eoi,
    /// Error status: a write latches errors (there are none), reads 0.
    Esr,
    /// Read-only state of interrupts and the timer (APR, PPR, RRD, ISR,
    /// TMR, IRR, current count): all 0 while no interrupt is delivered.
    Status,
    /// Programmable: TPR, LDR, DFR, SVR, ICR, LVTs, timer settings.
    Settings,
    Reserved,
}

fn register(offset: u64) -> Reg {
    match offset {
        0x020 => Reg::Id,
        0x030 => Reg::Version,
        0x0b0 => Reg::Eoi,
        0x280 => Reg::Esr,
        0x090 | 0x0a0 | 0x0c0 | 0x100..=0x270 | 0x390 => Reg::Status,
        0x080 | 0x0d0 | 0x0e0 | 0x0f0 | 0x300 | 0x310 | LVT_FIRST..=LVT_LAST | 0x380 | 0x3e0 => Reg::Settings,
        _ => Reg::Reserved,
    }
}

/// The register page of the vCPU's local APIC.
pub struct LocalApic {
    /// Values of the `Reg::Settings` registers, indexed by offset / 16.
    regs: [u32; SLOTS],
}

impl Default for LocalApic {
    /// Reset state (SDM 11.4.7.1): LVTs masked, DFR all ones (flat model),
    /// spurious vector 0xff with the APIC software-disabled, the rest 0.
    fn default() -> Self {
        let mut regs = [0; SLOTS];
        for offset in (LVT_FIRST..=LVT_LAST).step_by(16) {
            regs[slot(offset)] = LVT_MASKED;
        }
        regs[slot(0x0e0)] = 0xffff_ffff;
        regs[slot(0x0f0)] = 0xff;
        Self { regs }
    }
}

fn slot(offset: u64) -> usize {
    (offset >> 4) as usize
}

/// The register an access addresses, if it is an aligned 32-bit one.
fn aligned(offset: u64, len: usize) -> Option<Reg> {
    (len == 4 && offset.is_multiple_of(16)).then(|| register(offset))
}

impl MmioDevice for LocalApic {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let value = match aligned(offset, data.len()) {
            Some(Reg::Id | Reg::Eoi | Reg::Esr | Reg::Status) => 0,
            Some(Reg::Version) => VERSION,
            Some(Reg::Settings) => self.regs[slot(offset)],
            Some(Reg::Reserved) => {
                log::debug!("APIC: read of reserved register {offset:#x} reads 0");
                0
            }
            None => {
                log::debug!("APIC: {}-byte read at offset {offset:#x} reads as all ones", data.len());
                data.fill(0xff);
                return;
            }
        };
        data.copy_from_slice(&value.to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let reg = aligned(offset, data.len());
        match (reg, data) {
            (Some(Reg::Settings), &[a, b, c, d]) => self.regs[slot(offset)] = u32::from_le_bytes([a, b, c, d]),
            // No interrupt is ever in service or in error.
            (Some(Reg::Eoi | Reg::Esr), _) => {}
            (Some(reg), _) => log::debug!("APIC: write {data:02x?} to {reg:?} register {offset:#x} ignored"),
            (None, _) => log::debug!("APIC: {}-byte write at offset {offset:#x} ignored", data.len()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(apic: &mut LocalApic, offset: u64) -> u32 {
        let mut data = [0u8; 4];
        apic.read(offset, &mut data);
        u32::from_le_bytes(data)
    }

    fn write(apic: &mut LocalApic, offset: u64, value: u32) {
        apic.write(offset, &value.to_le_bytes());
    }

    #[test]
    fn id_and_version_are_qemus_for_cpu_0() {
        let mut apic = LocalApic::default();
        assert_eq!(read(&mut apic, 0x20), 0);
        assert_eq!(read(&mut apic, 0x30), 0x0005_0014);
        write(&mut apic, 0x20, 0x0500_0000);
        write(&mut apic, 0x30, 0);
        assert_eq!((read(&mut apic, 0x20), read(&mut apic, 0x30)), (0, 0x0005_0014));
    }

    #[test]
    fn reset_values_follow_the_sdm() {
        let mut apic = LocalApic::default();
        for lvt in (0x320..=0x370).step_by(16) {
            assert_eq!(read(&mut apic, lvt), 0x0001_0000, "LVT {lvt:#x} masked");
        }
        assert_eq!(read(&mut apic, 0xe0), 0xffff_ffff, "DFR");
        assert_eq!(read(&mut apic, 0xf0), 0xff, "SVR");
        assert_eq!(read(&mut apic, 0x80), 0, "TPR");
    }

    #[test]
    fn settings_read_back_and_eoi_is_accepted() {
        let mut apic = LocalApic::default();
        write(&mut apic, 0xf0, 0x1ff); // SVR: software enable, vector 0xff
        write(&mut apic, 0x350, 0x700); // LINT0: ExtINT, unmasked
        write(&mut apic, 0x3e0, 0xb);
        write(&mut apic, 0xb0, 0);
        assert_eq!(read(&mut apic, 0xf0), 0x1ff);
        assert_eq!(read(&mut apic, 0x350), 0x700);
        assert_eq!(read(&mut apic, 0x3e0), 0xb);
        assert_eq!(read(&mut apic, 0xb0), 0);
    }

    #[test]
    fn status_and_reserved_registers_read_zero_whatever_is_written() {
        let mut apic = LocalApic::default();
        for offset in [0xa0, 0x100, 0x200, 0x280, 0x390, 0x40, 0x2f0, 0x3f0, 0x800] {
            write(&mut apic, offset, 0xdead_beef);
            assert_eq!(read(&mut apic, offset), 0, "{offset:#x}");
        }
    }

    #[test]
    fn unaligned_or_narrow_accesses_read_all_ones_and_change_nothing() {
        let mut apic = LocalApic::default();
        apic.write(0xf0, &[0x00]);
        apic.write(0xf4, &0u32.to_le_bytes());
        apic.write(0xf0, &0u64.to_le_bytes());
        assert_eq!(read(&mut apic, 0xf0), 0xff);
        let mut byte = [0u8];
        apic.read(0x30, &mut byte);
        assert_eq!(byte, [0xff]);
        assert_eq!(read(&mut apic, 0x34), 0xffff_ffff);
    }
}
