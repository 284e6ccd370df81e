//! The two 8259A interrupt controllers' programming interface, without
//! interrupts yet: a guest can run its initialization sequence (ICW1-4)
//! and program and read back the interrupt masks (OCW1), which is what a
//! kernel does at boot before it switches to the APIC or leaves the PIC
//! masked. Interrupt requests, priorities and EOI processing come with the
//! full 8259A; its state grows here, behind the same port interface.
//!
//! Register access (Intel 8259A datasheet, "Programming the 8259A"):
//! - command port (A0 = 0): bit 4 set is ICW1, which starts initialization;
//!   otherwise bit 3 selects OCW3 (set) or OCW2 (clear).
//! - data port (A0 = 1): ICW2, ICW3 (cascade mode only) and ICW4 (if ICW1
//!   asked for it) while initializing; the mask register (OCW1) after.
//! - reads: the data port gives the mask; the command port gives IRR or ISR
//!   (OCW3 picks which), both empty while no interrupt is ever raised.

use crate::bus::PortDevice;

/// The master PIC's command port; its data port follows.
pub const PIC_MASTER_BASE: u16 = 0x20;
/// The slave PIC (cascaded on the master's IR2).
pub const PIC_SLAVE_BASE: u16 = 0xa0;
/// Command and data ports.
pub const PIC_LEN: u16 = 2;

const ICW1: u8 = 1 << 4;
const ICW1_IC4: u8 = 1 << 0;
const ICW1_SINGLE: u8 = 1 << 1;

/// What a write to the data port means next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum DataWrite {
    /// OCW1: the interrupt mask.
    Mask,
    /// ICW2: the vector base (bits 7-3).
    Icw2,
    /// ICW3: cascade wiring.
    Icw3,
    /// ICW4: 8086 mode, auto-EOI, buffering, nesting.
    Icw4,
}

/// One 8259A.
pub struct Pic {
    /// Its command port, to name it in logs.
    base: u16,
    /// Interrupt mask register: bit N set masks IR N.
    imr: u8,
    /// Vectors the chip delivers: `vector_base + N` for IR N.
    vector_base: u8,
    next: DataWrite,
    /// ICW1: no ICW3 (single chip).
    single: bool,
    /// ICW1: ICW4 follows.
    icw4_needed: bool,
}

impl Pic {
    /// A chip at `base` as after power-on: nothing masked, not initialized.
    pub fn new(base: u16) -> Self {
        Self { base, imr: 0, vector_base: 0, next: DataWrite::Mask, single: false, icw4_needed: false }
    }

    fn command(&mut self, value: u8) {
        if value & ICW1 == 0 {
            // OCW2 (EOI, priority rotation) or OCW3 (IRR or ISR for reads,
            // polling, special mask): with no interrupt ever requested or in
            // service, none of them changes what the guest can observe.
            return;
        }
        // ICW1 clears the mask and restarts the sequence, whatever state
        // the chip was in.
        self.imr = 0;
        self.single = value & ICW1_SINGLE != 0;
        self.icw4_needed = value & ICW1_IC4 != 0;
        self.next = DataWrite::Icw2;
    }

    fn data(&mut self, value: u8) {
        self.next = match self.next {
            DataWrite::Mask => {
                self.imr = value;
                DataWrite::Mask
            }
            DataWrite::Icw2 => {
                self.vector_base = value & 0xf8;
                match (self.single, self.icw4_needed) {
                    (false, _) => DataWrite::Icw3,
                    (true, true) => DataWrite::Icw4,
                    (true, false) => self.initialized(),
                }
            }
            DataWrite::Icw3 if self.icw4_needed => DataWrite::Icw4,
            DataWrite::Icw3 | DataWrite::Icw4 => self.initialized(),
        };
    }

    fn initialized(&self) -> DataWrite {
        log::debug!("PIC {:#x}: initialized, vectors {:#x}-{:#x}", self.base, self.vector_base, self.vector_base + 7);
        DataWrite::Mask
    }
}

impl PortDevice for Pic {
    fn read(&mut self, offset: u16, data: &mut [u8]) {
        // 8-bit registers: a wider access reads the first one.
        data.fill(0);
        if offset == 1 {
            data[0] = self.imr;
        }
    }

    fn write(&mut self, offset: u16, data: &[u8]) {
        match offset {
            0 => self.command(data[0]),
            _ => self.data(data[0]),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn imr(pic: &mut Pic) -> u8 {
        let mut data = [0u8];
        pic.read(1, &mut data);
        data[0]
    }

    /// The sequence Linux and most kernels use: ICW1 (cascade, ICW4), ICW2,
    /// ICW3, ICW4 (8086 mode), then masks.
    #[test]
    fn a_full_initialization_then_masks_read_back() {
        let mut pic = Pic::new(PIC_MASTER_BASE);
        pic.write(1, &[0x12]);
        assert_eq!(imr(&mut pic), 0x12);
        pic.write(0, &[0x11]);
        assert_eq!(imr(&mut pic), 0, "ICW1 clears the mask");
        pic.write(1, &[0x20]);
        pic.write(1, &[0x04]);
        pic.write(1, &[0x01]);
        assert_eq!(pic.vector_base, 0x20);
        assert_eq!(pic.next, DataWrite::Mask);
        pic.write(1, &[0xfb]);
        assert_eq!(imr(&mut pic), 0xfb);
    }

    #[test]
    fn single_mode_skips_icw3_and_icw4_is_optional() {
        let mut pic = Pic::new(PIC_SLAVE_BASE);
        pic.write(0, &[0x13]); // single, ICW4
        pic.write(1, &[0x70]);
        assert_eq!(pic.next, DataWrite::Icw4);
        pic.write(1, &[0x01]);
        pic.write(1, &[0xff]);
        assert_eq!(imr(&mut pic), 0xff);

        pic.write(0, &[0x12]); // single, no ICW4
        pic.write(1, &[0x28]);
        pic.write(1, &[0x3c]);
        assert_eq!((pic.vector_base, imr(&mut pic)), (0x28, 0x3c));
    }

    #[test]
    fn ocw2_and_ocw3_leave_the_mask_and_the_command_port_reads_zero() {
        let mut pic = Pic::new(PIC_MASTER_BASE);
        pic.write(1, &[0xfe]);
        pic.write(0, &[0x20]); // non-specific EOI
        pic.write(0, &[0x0b]); // read ISR
        let mut data = [0xaau8];
        pic.read(0, &mut data);
        assert_eq!(data, [0]);
        assert_eq!(imr(&mut pic), 0xfe);
    }
}
