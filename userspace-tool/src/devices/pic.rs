//! The PC/AT's two cascaded 8259A programmable interrupt controllers: the
//! master at ports 0x20-0x21 (IRQ 0-7), the slave at 0xa0-0xa1 (IRQ 8-15)
//! with its INT output on the master's IR2, and the PIIX edge/level control
//! registers (ELCR) at 0x4d0-0x4d1. One [`Pic`] owns both chips, because
//! delivering an interrupt (the INTA cycle) involves both; [`PicPorts`] puts
//! the shared pair on the port bus as three ranges.
//!
//! It follows the Intel 8259A datasheet (order number 231468):
//! - ICW1 (command port, bit 4 set) starts initialization: it resets the
//!   edge-sense circuit (an input must go low and high again to request),
//!   clears the mask register, gives IR0 the highest priority, leaves special
//!   mask mode, selects IRR for status reads and, without IC4, clears what
//!   ICW4 would have set. ICW2 (vector base, bits 7-3), ICW3 (when not
//!   single) and ICW4 (µPM, AEOI, SFNM) follow on the data port. ISR and IRR
//!   are cleared as QEMU and Bochs do, so a re-initialized chip starts idle.
//! - OCW1 (data port, after initialization) is the mask register.
//! - OCW2 (command port, bits 4-3 = 00): non-specific and specific EOI, the
//!   rotate-on-EOI variants, rotate in automatic-EOI mode, set priority.
//! - OCW3 (command port, bits 4-3 = 01): IRR or ISR on the next command-port
//!   read, poll mode (the next read is an acknowledge returning
//!   `0x80 | level`, or 0), special mask mode.
//! - The INTA cycle moves the highest-priority request from IRR to ISR (not
//!   to ISR in AEOI mode, which instead rotates if asked to) and gives
//!   `vector base | level`. For the cascade input the slave supplies the
//!   vector; if its request went away after the master latched IR2, the
//!   slave gives its IR7 vector without setting an ISR bit (the datasheet's
//!   "default IR7": the spurious IRQ 15 Linux checks for), while the
//!   master's IR2 is in service as for any acknowledge. The slave's INT
//!   drops during its INTA cycle, as Bochs models it, so a slave request
//!   still pending after it (auto-EOI) is a new edge on IR2.
//! - Priority: an in-service level blocks requests of its own and lower
//!   priority; in special fully nested mode the master's cascade input is
//!   not blocked by itself, so higher-priority slave requests get through;
//!   in special mask mode every unmasked level that is not in service may
//!   interrupt.
//!
//! Trigger modes: inputs are edge-triggered unless ICW1's LTIM bit or their
//! ELCR bit makes them level-triggered (Intel PIIX3 datasheet, ELCR1 and
//! ELCR2: IRQ 0-2, 8 and 13 are always edge, their bits read 0). An edge input latches a rising edge in IRR until the INTA cycle; a
//! level input's IRR bit follows the line, so a line still high after EOI
//! requests again. The datasheet wants an edge input held high until the
//! INTA (or it gives IR7 instead); like QEMU, this model keeps the latched
//! request, since emulated devices pulse their lines in an instant.
//!
//! Model choices:
//! - The cascade is the PC's: the slave on master IR2, whatever ICW3 says
//!   (stored, not used), as in QEMU. IRQ 2 on the ISA bus is the slave's IR1
//!   (IRQ 9) on a PC/AT, so `set_irq(2, ..)` drives IRQ 9.
//! - A chip that has not completed its initialization sequence never
//!   asserts INT: the datasheet leaves its power-on state undefined, and a
//!   vector base of 0 would deliver exceptions.
//! - No INTA happens without INT: [`Pic::acknowledge`] returns `None` when
//!   nothing is requested (the VMM asks in the same instant it injects, so
//!   there is no window for a request to vanish in between).
//! - A wider-than-byte access is split into byte accesses at consecutive
//!   ports, as the ISA bus splits 16-bit cycles to 8-bit devices.
//!
//! Linux drives it through arch/x86/kernel/i8259.c: `probe_8259A` writes and
//! reads back the mask before any ICW, `init_8259A` sends ICW1 0x11, vector
//! bases 0x20/0x28, cascade 0x04/0x02 and ICW4 0x01, and
//! `mask_and_ack_8259A` masks the line, then sends specific EOIs (slave,
//! then master IR2) and checks ISR through OCW3 for spurious IRQ 7 and 15.

use std::cell::RefCell;
use std::rc::Rc;

use crate::bus::PortDevice;

/// The master PIC's command port; its data port follows.
pub const PIC_MASTER_BASE: u16 = 0x20;
/// The slave PIC (cascaded on the master's IR2).
pub const PIC_SLAVE_BASE: u16 = 0xa0;
/// Command and data ports.
pub const PIC_LEN: u16 = 2;
/// ELCR1 (IRQ 0-7); ELCR2 (IRQ 8-15) follows.
pub const ELCR_BASE: u16 = 0x4d0;
/// Two ELCR registers.
pub const ELCR_LEN: u16 = 2;

/// The master input driven by the slave's INT output.
const CASCADE_IR: u8 = 2;
/// The level a chip gives when acknowledged without a request.
const DEFAULT_IR: u8 = 7;
/// ELCR bits that can be set (PIIX3): not IRQ 0, 1, 2 on the master.
const MASTER_ELCR_MASK: u8 = 0xf8;
/// Not IRQ 8 (RTC) or IRQ 13 (FPU error) on the slave.
const SLAVE_ELCR_MASK: u8 = 0xde;

/// ICW1: bit 4 distinguishes it from OCW2 and OCW3 on the command port.
const ICW1: u8 = 1 << 4;
/// ICW1: ICW4 will be sent.
const ICW1_IC4: u8 = 1 << 0;
/// ICW1: single chip, no ICW3.
const ICW1_SNGL: u8 = 1 << 1;
/// ICW1: level-triggered mode for all inputs.
const ICW1_LTIM: u8 = 1 << 3;
/// ICW4: 8086/8088 mode (vectors rather than CALL instructions).
const ICW4_UPM: u8 = 1 << 0;
/// ICW4: automatic end of interrupt.
const ICW4_AEOI: u8 = 1 << 1;
/// ICW4: buffered mode.
const ICW4_BUF: u8 = 1 << 3;
/// ICW4: special fully nested mode.
const ICW4_SFNM: u8 = 1 << 4;
/// OCW3 (rather than OCW2) when ICW1's bit is clear.
const OCW3: u8 = 1 << 3;
/// OCW3: read register command (with RIS: which register).
const OCW3_RR: u8 = 1 << 1;
/// OCW3: ISR rather than IRR.
const OCW3_RIS: u8 = 1 << 0;
/// OCW3: poll on the next read.
const OCW3_POLL: u8 = 1 << 2;
/// OCW3: special mask mode command (with SMM: set or reset).
const OCW3_ESMM: u8 = 1 << 6;
/// OCW3: set special mask mode.
const OCW3_SMM: u8 = 1 << 5;
/// Poll word: an interrupt is requested (the level is in bits 2-0).
const POLL_REQUEST: u8 = 1 << 7;

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

/// OCW2's R, SL and EOI bits (7-5), datasheet Figure 8.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Ocw2 {
    NonSpecificEoi,
    SpecificEoi,
    RotateOnNonSpecificEoi,
    RotateOnSpecificEoi,
    SetRotateInAeoi,
    ClearRotateInAeoi,
    SetPriority,
    Nop,
}

impl Ocw2 {
    fn decode(value: u8) -> Self {
        match value >> 5 {
            0b001 => Self::NonSpecificEoi,
            0b011 => Self::SpecificEoi,
            0b101 => Self::RotateOnNonSpecificEoi,
            0b111 => Self::RotateOnSpecificEoi,
            0b100 => Self::SetRotateInAeoi,
            0b000 => Self::ClearRotateInAeoi,
            0b110 => Self::SetPriority,
            _ => Self::Nop,
        }
    }
}

/// One 8259A. Bit N of each 8-bit register is input IR N.
#[derive(Clone, Debug)]
struct Chip {
    /// "master" or "slave", for logs.
    name: &'static str,
    /// Inputs with a slave on them (the PC's wiring, not ICW3).
    cascade: u8,
    /// ELCR bits the chipset lets software set.
    elcr_mask: u8,
    /// Input levels as last driven: edges are detected against them.
    lines: u8,
    /// Interrupt request register.
    irr: u8,
    /// In-service register.
    isr: u8,
    /// Interrupt mask register (OCW1).
    imr: u8,
    /// Edge/level control: bit set = level-triggered.
    elcr: u8,
    /// The level with the highest priority: 0 unless rotated; the one
    /// before it is the lowest.
    highest: u8,
    /// ICW2: `vector_base | level` is delivered.
    vector_base: u8,
    next: DataWrite,
    /// The ICW sequence has completed at least once since power-on, and is
    /// not under way.
    initialized: bool,
    /// ICW1: no ICW3.
    single: bool,
    /// ICW1: ICW4 follows.
    icw4_needed: bool,
    /// ICW1: every input level-triggered.
    level_mode: bool,
    /// ICW3, kept for reference.
    icw3: u8,
    /// ICW4: 8086 mode.
    x86_mode: bool,
    /// ICW4: automatic EOI at the end of INTA.
    auto_eoi: bool,
    /// OCW2: rotate priorities on automatic EOI.
    rotate_on_auto_eoi: bool,
    /// ICW4: special fully nested mode.
    special_fully_nested: bool,
    /// OCW3: the command port reads ISR (else IRR).
    read_isr: bool,
    /// OCW3: the next read is a poll.
    poll: bool,
    /// OCW3: special mask mode.
    special_mask: bool,
}

impl Chip {
    /// As after power-on: idle, edge-triggered, not initialized.
    fn new(name: &'static str, cascade: u8, elcr_mask: u8) -> Self {
        Self {
            name,
            cascade,
            elcr_mask,
            lines: 0,
            irr: 0,
            isr: 0,
            imr: 0,
            elcr: 0,
            highest: 0,
            vector_base: 0,
            next: DataWrite::Mask,
            initialized: false,
            single: false,
            icw4_needed: false,
            level_mode: false,
            icw3: 0,
            x86_mode: false,
            auto_eoi: false,
            rotate_on_auto_eoi: false,
            special_fully_nested: false,
            read_isr: false,
            poll: false,
            special_mask: false,
        }
    }

    /// Inputs that are level-triggered.
    fn level_triggered(&self) -> u8 {
        if self.level_mode {
            0xff
        } else {
            self.elcr
        }
    }

    /// Drives input `ir` to `level`.
    fn set_line(&mut self, ir: u8, level: bool) {
        let bit = 1 << ir;
        let rising = level && self.lines & bit == 0;
        if level {
            self.lines |= bit;
        } else {
            self.lines &= !bit;
        }
        if self.level_triggered() & bit != 0 {
            self.irr = (self.irr & !bit) | (self.lines & bit);
        } else if rising {
            self.irr |= bit;
        }
    }

    /// After a trigger-mode change, level inputs' IRR bits follow their lines.
    fn resync_levels(&mut self) {
        let level = self.level_triggered();
        self.irr = (self.irr & !level) | (self.lines & level);
    }

    /// Priority rank of `ir`: 0 is the highest.
    fn rank(&self, ir: u8) -> u8 {
        ir.wrapping_sub(self.highest) & 7
    }

    /// The highest-priority level set in `bits`.
    fn highest_in(&self, bits: u8) -> Option<u8> {
        (0..8).map(|rank| (self.highest + rank) & 7).find(|ir| bits & (1 << ir) != 0)
    }

    /// The level this chip's INT output is requesting service for.
    fn requested(&self) -> Option<u8> {
        if !self.initialized {
            return None;
        }
        let unmasked = self.irr & !self.imr;
        if self.special_mask {
            // Datasheet, "Special Mask Mode": every level not masked may
            // interrupt, lower as well as higher.
            return self.highest_in(unmasked & !self.isr);
        }
        let ir = self.highest_in(unmasked)?;
        match self.highest_in(self.isr) {
            Some(busy) if self.rank(busy) < self.rank(ir) => None,
            // In special fully nested mode a slave's higher-priority request
            // reaches the CPU while the slave's input is in service.
            Some(busy) if busy == ir && !(self.special_fully_nested && self.cascade & (1 << ir) != 0) => None,
            _ => Some(ir),
        }
    }

    fn vector(&self, ir: u8) -> u8 {
        self.vector_base | ir
    }

    /// The INTA cycle for level `ir`, which is requested.
    fn acknowledge(&mut self, ir: u8) {
        let bit = 1 << ir;
        // A level input's IRR bit keeps following its line.
        self.irr &= !bit | self.level_triggered();
        if !self.auto_eoi {
            self.isr |= bit;
        } else if self.rotate_on_auto_eoi {
            self.highest = (ir + 1) & 7;
        }
    }

    /// A poll-mode read: an acknowledge without INTA.
    fn poll_read(&mut self) -> u8 {
        self.poll = false;
        match self.requested() {
            Some(ir) => {
                self.acknowledge(ir);
                POLL_REQUEST | ir
            }
            None => 0,
        }
    }

    fn read(&mut self, offset: u16) -> u8 {
        if self.poll {
            self.poll_read()
        } else if offset == 1 {
            self.imr
        } else if self.read_isr {
            self.isr
        } else {
            self.irr
        }
    }

    fn write(&mut self, offset: u16, value: u8) {
        match offset {
            0 if value & ICW1 != 0 => self.icw1(value),
            0 if value & OCW3 != 0 => self.ocw3(value),
            0 => self.ocw2(value),
            _ => self.data(value),
        }
    }

    fn icw1(&mut self, value: u8) {
        self.level_mode = value & ICW1_LTIM != 0;
        self.single = value & ICW1_SNGL != 0;
        self.icw4_needed = value & ICW1_IC4 != 0;
        // What ICW1 resets (datasheet, "Initialization Command Words");
        // IRR and ISR as QEMU and Bochs do.
        self.irr = 0;
        self.resync_levels();
        self.isr = 0;
        self.imr = 0;
        self.highest = 0;
        self.special_mask = false;
        self.read_isr = false;
        self.poll = false;
        self.rotate_on_auto_eoi = false;
        if !self.icw4_needed {
            self.x86_mode = false;
            self.auto_eoi = false;
            self.special_fully_nested = false;
        }
        self.initialized = false;
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
                    (true, false) => self.initialization_done(),
                }
            }
            DataWrite::Icw3 => {
                self.icw3 = value;
                if self.icw4_needed {
                    DataWrite::Icw4
                } else {
                    self.initialization_done()
                }
            }
            DataWrite::Icw4 => {
                self.x86_mode = value & ICW4_UPM != 0;
                self.auto_eoi = value & ICW4_AEOI != 0;
                self.special_fully_nested = value & ICW4_SFNM != 0;
                if value & ICW4_BUF != 0 {
                    log::debug!("PIC {}: buffered mode (ICW4 {value:#04x}) changes nothing here", self.name);
                }
                self.initialization_done()
            }
        };
    }

    fn initialization_done(&mut self) -> DataWrite {
        if !self.x86_mode {
            log::warn!("PIC {}: MCS-80/85 mode; delivering vectors as in 8086 mode", self.name);
        }
        log::debug!(
            "PIC {}: initialized, vectors {:#04x}-{:#04x}{}{}",
            self.name,
            self.vector_base,
            self.vector_base | 7,
            if self.auto_eoi { ", auto EOI" } else { "" },
            if self.level_mode { ", level-triggered" } else { "" },
        );
        self.initialized = true;
        DataWrite::Mask
    }

    fn ocw2(&mut self, value: u8) {
        let level = value & 7;
        match Ocw2::decode(value) {
            Ocw2::NonSpecificEoi => {
                self.eoi(self.highest_in(self.isr));
            }
            Ocw2::SpecificEoi => {
                self.eoi(Some(level));
            }
            Ocw2::RotateOnNonSpecificEoi => {
                if let Some(ir) = self.eoi(self.highest_in(self.isr)) {
                    self.highest = (ir + 1) & 7;
                }
            }
            Ocw2::RotateOnSpecificEoi => {
                self.eoi(Some(level));
                self.highest = (level + 1) & 7;
            }
            Ocw2::SetPriority => self.highest = (level + 1) & 7,
            Ocw2::SetRotateInAeoi => self.rotate_on_auto_eoi = true,
            Ocw2::ClearRotateInAeoi => self.rotate_on_auto_eoi = false,
            Ocw2::Nop => {}
        }
    }

    /// Ends the service of `ir`, if any; returns it.
    fn eoi(&mut self, ir: Option<u8>) -> Option<u8> {
        let ir = ir?;
        self.isr &= !(1 << ir);
        Some(ir)
    }

    fn ocw3(&mut self, value: u8) {
        if value & OCW3_ESMM != 0 {
            self.special_mask = value & OCW3_SMM != 0;
        }
        if value & OCW3_RR != 0 {
            self.read_isr = value & OCW3_RIS != 0;
        }
        self.poll = value & OCW3_POLL != 0;
    }

    fn write_elcr(&mut self, value: u8) {
        self.elcr = value & self.elcr_mask;
        self.resync_levels();
    }
}

/// The master and slave 8259A of a PC, and the ELCR.
///
/// The VMM drives device lines with [`set_irq`](Self::set_irq), asks for
/// the vector to inject with [`pending_vector`](Self::pending_vector) and
/// takes it with [`acknowledge`](Self::acknowledge) when it injects it; the
/// guest programs the chips through [`PicPorts`].
#[derive(Clone, Debug)]
pub struct Pic {
    master: Chip,
    slave: Chip,
}

impl Default for Pic {
    fn default() -> Self {
        Self::new()
    }
}

impl Pic {
    /// Both chips as after power-on: not initialized (neither asserts INT
    /// until the guest's ICW sequence), nothing masked, all inputs
    /// edge-triggered.
    pub fn new() -> Self {
        Self {
            master: Chip::new("master", 1 << CASCADE_IR, MASTER_ELCR_MASK),
            slave: Chip::new("slave", 0, SLAVE_ELCR_MASK),
        }
    }

    /// Drives ISA interrupt line `irq` (0-15) to `level`. An edge-triggered
    /// input requests on a rising edge (a pulse, `true` then `false`, is one
    /// request); a level-triggered one (ELCR) requests while high.
    pub fn set_irq(&mut self, irq: u8, level: bool) {
        match irq {
            // The ISA bus's IRQ 2 pin is wired to the slave's IR1 on the AT.
            CASCADE_IR => self.slave.set_line(1, level),
            0..=7 => self.master.set_line(irq, level),
            8..=15 => self.slave.set_line(irq - 8, level),
            _ => {
                log::warn!("PIC: no interrupt line {irq}; ignored");
                return;
            }
        }
        self.update_cascade();
    }

    /// A rising then a falling edge on `irq`: one edge-triggered request.
    pub fn pulse_irq(&mut self, irq: u8) {
        self.set_irq(irq, true);
        self.set_irq(irq, false);
    }

    /// The vector an INTA cycle would give now, if the master asserts INT;
    /// nothing changes.
    #[cfg(test)]
    pub fn pending_vector(&self) -> Option<u8> {
        let ir = self.master.requested()?;
        Some(if ir == CASCADE_IR {
            self.slave.vector(self.slave.requested().unwrap_or(DEFAULT_IR))
        } else {
            self.master.vector(ir)
        })
    }

    /// Whether the master asserts INT (an interrupt waits for the CPU).
    pub fn has_pending(&self) -> bool {
        self.master.requested().is_some()
    }

    /// The INTA cycle: the highest-priority request goes in service (unless
    /// in AEOI mode) and its vector, to inject, is returned; `None` if INT
    /// is not asserted. A slave whose request went away after the master
    /// latched IR2 gives its IR7 vector (spurious IRQ 15), setting no ISR
    /// bit of its own.
    pub fn acknowledge(&mut self) -> Option<u8> {
        let ir = self.master.requested()?;
        self.master.acknowledge(ir);
        let vector = if ir == CASCADE_IR {
            let vector = match self.slave.requested() {
                Some(slave_ir) => {
                    self.slave.acknowledge(slave_ir);
                    self.slave.vector(slave_ir)
                }
                None => {
                    log::debug!("PIC: spurious interrupt on the slave (IRQ 15)");
                    self.slave.vector(DEFAULT_IR)
                }
            };
            // The slave's INT goes low in its INTA cycle; a request it still
            // has raises it again below.
            self.master.set_line(CASCADE_IR, false);
            vector
        } else {
            self.master.vector(ir)
        };
        self.update_cascade();
        Some(vector)
    }

    /// The slave's INT output drives the master's cascade input.
    fn update_cascade(&mut self) {
        let int = self.slave.requested().is_some();
        self.master.set_line(CASCADE_IR, int);
    }

    fn read(&mut self, window: Window, offset: u16) -> u8 {
        let value = match window {
            Window::Master => self.master.read(offset),
            Window::Slave => self.slave.read(offset),
            Window::Elcr if offset == 0 => self.master.elcr,
            Window::Elcr => self.slave.elcr,
        };
        // A poll read may have acknowledged on the slave.
        self.update_cascade();
        value
    }

    fn write(&mut self, window: Window, offset: u16, value: u8) {
        match window {
            Window::Master => self.master.write(offset, value),
            Window::Slave => self.slave.write(offset, value),
            Window::Elcr if offset == 0 => self.master.write_elcr(value),
            Window::Elcr => self.slave.write_elcr(value),
        }
        self.update_cascade();
    }
}

/// Which registers a [`PicPorts`] range holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Window {
    Master,
    Slave,
    Elcr,
}

/// One of the pair's three port ranges, sharing the [`Pic`] with the others
/// and with the VMM (device models run on one thread).
pub struct PicPorts {
    pic: Rc<RefCell<Pic>>,
    window: Window,
}

impl PicPorts {
    /// The master's command and data ports, for [`PIC_MASTER_BASE`].
    pub fn master(pic: Rc<RefCell<Pic>>) -> Self {
        Self { pic, window: Window::Master }
    }

    /// The slave's command and data ports, for [`PIC_SLAVE_BASE`].
    pub fn slave(pic: Rc<RefCell<Pic>>) -> Self {
        Self { pic, window: Window::Slave }
    }

    /// ELCR1 and ELCR2, for [`ELCR_BASE`].
    pub fn elcr(pic: Rc<RefCell<Pic>>) -> Self {
        Self { pic, window: Window::Elcr }
    }
}

impl PortDevice for PicPorts {
    fn read(&mut self, offset: u16, data: &mut [u8]) {
        let mut pic = self.pic.borrow_mut();
        for (port, byte) in (offset..).zip(data.iter_mut()) {
            // Both windows are two ports; past them nothing answers.
            *byte = if port < 2 { pic.read(self.window, port) } else { 0xff };
        }
    }

    fn write(&mut self, offset: u16, data: &[u8]) {
        let mut pic = self.pic.borrow_mut();
        for (port, &byte) in (offset..).zip(data).take_while(|&(port, _)| port < 2) {
            pic.write(self.window, port, byte);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A guest's view: the three port ranges at their PC addresses.
    struct Guest {
        pic: Rc<RefCell<Pic>>,
        ports: [(u16, PicPorts); 3],
    }

    impl Guest {
        fn new() -> Self {
            let pic = Rc::new(RefCell::new(Pic::new()));
            let ports = [
                (PIC_MASTER_BASE, PicPorts::master(pic.clone())),
                (PIC_SLAVE_BASE, PicPorts::slave(pic.clone())),
                (ELCR_BASE, PicPorts::elcr(pic.clone())),
            ];
            Self { pic, ports }
        }

        /// After Linux's init_8259A (arch/x86/kernel/i8259.c), with the
        /// given masks.
        fn linux(master_mask: u8, slave_mask: u8) -> Self {
            let mut guest = Self::new();
            guest.linux_init(0x01);
            guest.outb(0x21, master_mask);
            guest.outb(0xa1, slave_mask);
            guest
        }

        fn linux_init(&mut self, master_icw4: u8) {
            self.outb(0x21, 0xff);
            self.outb(0x20, 0x11);
            self.outb(0x21, 0x20);
            self.outb(0x21, 1 << 2);
            self.outb(0x21, master_icw4);
            self.outb(0xa0, 0x11);
            self.outb(0xa1, 0x28);
            self.outb(0xa1, 2);
            self.outb(0xa1, 0x01);
        }

        fn range(&mut self, port: u16) -> (&mut PicPorts, u16) {
            let (base, ports) = self.ports.iter_mut().find(|(base, _)| (*base..*base + 2).contains(&port)).unwrap();
            (ports, port - *base)
        }

        fn outb(&mut self, port: u16, value: u8) {
            let (ports, offset) = self.range(port);
            ports.write(offset, &[value]);
        }

        fn inb(&mut self, port: u16) -> u8 {
            let (ports, offset) = self.range(port);
            let mut data = [0];
            ports.read(offset, &mut data);
            data[0]
        }

        fn irr(&mut self, command: u16) -> u8 {
            self.outb(command, 0x0a);
            self.inb(command)
        }

        fn isr(&mut self, command: u16) -> u8 {
            self.outb(command, 0x0b);
            let isr = self.inb(command);
            self.outb(command, 0x0a);
            isr
        }

        fn set_irq(&self, irq: u8, level: bool) {
            self.pic.borrow_mut().set_irq(irq, level);
        }

        fn pulse(&self, irq: u8) {
            self.pic.borrow_mut().pulse_irq(irq);
        }

        fn pending(&self) -> Option<u8> {
            self.pic.borrow().pending_vector()
        }

        fn ack(&self) -> Option<u8> {
            self.pic.borrow_mut().acknowledge()
        }

        /// Linux's `mask_and_ack_8259A` EOIs, without the masking.
        fn specific_eoi(&mut self, irq: u8) {
            if irq >= 8 {
                self.outb(0xa0, 0x60 | (irq & 7));
                self.outb(0x20, 0x60 | CASCADE_IR);
            } else {
                self.outb(0x20, 0x60 | irq);
            }
        }
    }

    #[test]
    fn linux_probe_reads_back_the_mask_before_initialization() {
        let mut guest = Guest::new();
        guest.outb(0xa1, 0xff);
        guest.outb(0x21, 0xfb);
        assert_eq!(guest.inb(0x21), 0xfb);
        assert_eq!(guest.inb(0xa1), 0xff);
    }

    #[test]
    fn linux_init_sequence_programs_both_chips() {
        let mut guest = Guest::new();
        guest.outb(0x21, 0x12);
        guest.outb(0x20, 0x11);
        assert_eq!(guest.inb(0x21), 0, "ICW1 clears the mask");
        guest.outb(0x21, 0x20);
        guest.outb(0x21, 0x04);
        guest.outb(0x21, 0x01);
        guest.outb(0xa0, 0x11);
        guest.outb(0xa1, 0x28);
        guest.outb(0xa1, 0x02);
        guest.outb(0xa1, 0x01);
        guest.outb(0x21, 0xfb);
        guest.outb(0xa1, 0xff);
        assert_eq!((guest.inb(0x21), guest.inb(0xa1)), (0xfb, 0xff));
        let pic = guest.pic.borrow();
        assert_eq!((pic.master.vector_base, pic.slave.vector_base), (0x20, 0x28));
        assert_eq!((pic.master.icw3, pic.slave.icw3), (0x04, 0x02));
        assert!(pic.master.initialized && pic.slave.initialized);
        assert!(pic.master.x86_mode && !pic.master.auto_eoi);
    }

    #[test]
    fn single_mode_skips_icw3_and_icw4_is_optional() {
        let mut guest = Guest::new();
        guest.outb(0xa0, 0x13); // single, ICW4
        guest.outb(0xa1, 0x70);
        assert_eq!(guest.pic.borrow().slave.next, DataWrite::Icw4);
        guest.outb(0xa1, 0x01);
        guest.outb(0xa1, 0xff);
        assert_eq!(guest.inb(0xa1), 0xff);

        guest.outb(0xa0, 0x12); // single, no ICW4
        guest.outb(0xa1, 0x28);
        guest.outb(0xa1, 0x3c);
        assert_eq!(guest.inb(0xa1), 0x3c);
        assert_eq!(guest.pic.borrow().slave.vector_base, 0x28);
    }

    #[test]
    fn an_uninitialized_pic_asserts_nothing() {
        let guest = Guest::new();
        guest.pulse(0);
        assert_eq!(guest.pending(), None);
        assert_eq!(guest.ack(), None);
    }

    #[test]
    fn an_edge_on_irq0_is_delivered_once_until_eoi() {
        let mut guest = Guest::linux(0xfa, 0xff);
        guest.pulse(0);
        assert_eq!(guest.pending(), Some(0x20));
        assert_eq!(guest.pending(), Some(0x20), "asking changes nothing");
        assert_eq!(guest.ack(), Some(0x20));
        assert_eq!(guest.isr(0x20), 0x01);
        assert_eq!(guest.irr(0x20), 0x00);
        assert_eq!(guest.pending(), None);
        assert_eq!(guest.ack(), None);

        // A new edge while in service waits for the EOI.
        guest.pulse(0);
        assert_eq!(guest.pending(), None);
        guest.outb(0x20, 0x20); // non-specific EOI
        assert_eq!(guest.ack(), Some(0x20));
        guest.outb(0x20, 0x20);
        assert_eq!(guest.pending(), None);
        assert_eq!(guest.isr(0x20), 0);
    }

    #[test]
    fn a_line_held_high_requests_once_when_edge_triggered() {
        let mut guest = Guest::linux(0xfa, 0xff);
        guest.set_irq(0, true);
        assert_eq!(guest.ack(), Some(0x20));
        guest.specific_eoi(0);
        guest.set_irq(0, true);
        assert_eq!(guest.pending(), None, "no new rising edge");
        guest.set_irq(0, false);
        guest.set_irq(0, true);
        assert_eq!(guest.ack(), Some(0x20));
    }

    #[test]
    fn an_in_service_irq_blocks_lower_priorities_but_not_higher() {
        let mut guest = Guest::linux(0xf0, 0xff);
        guest.pulse(0);
        assert_eq!(guest.ack(), Some(0x20));
        guest.pulse(1);
        assert_eq!(guest.pending(), None, "IRQ 1 waits while IRQ 0 is in service");
        guest.specific_eoi(0);
        assert_eq!(guest.ack(), Some(0x21));
        guest.specific_eoi(1);

        guest.pulse(3);
        assert_eq!(guest.ack(), Some(0x23));
        guest.pulse(0);
        assert_eq!(guest.ack(), Some(0x20), "IRQ 0 preempts IRQ 3");
        assert_eq!(guest.isr(0x20), 0x09);
        guest.outb(0x20, 0x20);
        assert_eq!(guest.isr(0x20), 0x08, "a non-specific EOI ends the highest");
        guest.outb(0x20, 0x20);
        assert_eq!(guest.isr(0x20), 0);
    }

    #[test]
    fn simultaneous_requests_come_out_by_priority() {
        let mut guest = Guest::linux(0x00, 0x00);
        guest.pulse(12);
        guest.pulse(4);
        guest.pulse(1);
        assert_eq!(guest.ack(), Some(0x21));
        guest.specific_eoi(1);
        assert_eq!(guest.ack(), Some(0x2c), "the cascade (IR2) ranks above IR4");
        guest.specific_eoi(12);
        assert_eq!(guest.ack(), Some(0x24));
        guest.specific_eoi(4);
        assert_eq!(guest.ack(), None);
    }

    #[test]
    fn slave_irq12_arrives_through_the_cascade_and_needs_both_eois() {
        let mut guest = Guest::linux(0xfb, 0xef);
        guest.pulse(12);
        assert_eq!(guest.irr(0xa0), 0x10);
        assert_eq!(guest.irr(0x20), 0x04, "the slave's INT latched the master's IR2");
        assert_eq!(guest.pending(), Some(0x2c));
        assert_eq!(guest.ack(), Some(0x2c));
        assert_eq!((guest.isr(0x20), guest.isr(0xa0)), (0x04, 0x10));

        guest.pulse(12);
        assert_eq!(guest.pending(), None);
        guest.outb(0xa0, 0x64); // specific EOI, IR4
        assert_eq!(guest.pending(), None, "the master's IR2 is still in service");
        guest.outb(0x20, 0x62);
        assert_eq!(guest.ack(), Some(0x2c));
        guest.specific_eoi(12);
        assert_eq!((guest.isr(0x20), guest.isr(0xa0)), (0, 0));
    }

    #[test]
    fn a_slave_in_auto_eoi_mode_delivers_requests_queued_behind_another() {
        let mut guest = Guest::new();
        guest.linux_init(0x01);
        guest.outb(0xa0, 0x11);
        guest.outb(0xa1, 0x28);
        guest.outb(0xa1, 0x02);
        guest.outb(0xa1, 0x03); // slave: auto EOI
        guest.outb(0x21, 0xfb);
        guest.outb(0xa1, 0x00);
        guest.pulse(9);
        guest.pulse(12);
        assert_eq!(guest.ack(), Some(0x29));
        assert_eq!(guest.isr(0xa0), 0);
        assert_eq!(guest.irr(0x20), 0x04, "the slave's INT rose again for IRQ 12");
        assert_eq!(guest.pending(), None, "the master's IR2 is in service");
        guest.outb(0x20, 0x20);
        assert_eq!(guest.ack(), Some(0x2c));
    }

    #[test]
    fn masked_requests_stay_in_irr_until_unmasked() {
        let mut guest = Guest::linux(0xfb, 0xff);
        guest.pulse(1);
        guest.pulse(9);
        assert_eq!(guest.pending(), None);
        assert_eq!((guest.irr(0x20), guest.irr(0xa0)), (0x02, 0x02));
        guest.outb(0xa1, 0xfd);
        assert_eq!(guest.ack(), Some(0x29));
        guest.specific_eoi(9);
        guest.outb(0x21, 0xf9);
        assert_eq!(guest.ack(), Some(0x21));
    }

    /// Linux's spurious check (i8259A_irq_real) reads ISR: a spurious IRQ 15
    /// leaves the slave's ISR clear, and the master's IR2 needs the EOI that
    /// Linux sends anyway.
    #[test]
    fn a_slave_request_gone_before_inta_is_a_spurious_irq15() {
        let mut guest = Guest::linux(0xfb, 0xef);
        guest.pulse(12);
        // Linux masks the line; the master has already latched IR2.
        guest.outb(0xa1, 0xff);
        assert_eq!(guest.pending(), Some(0x2f));
        assert_eq!(guest.ack(), Some(0x2f));
        assert_eq!(guest.isr(0xa0), 0, "no slave ISR bit for the default IR7");
        assert_eq!(guest.isr(0x20), 0x04);
        guest.specific_eoi(15);
        assert_eq!((guest.isr(0x20), guest.isr(0xa0)), (0, 0));
        guest.outb(0xa1, 0xef);
        assert_eq!(guest.ack(), Some(0x2c), "the masked request was kept in IRR");
    }

    /// Linux tells a real IRQ 7 from a spurious one by its ISR bit, then
    /// sends a specific EOI for IRQ 7 either way: it must end nothing else.
    /// A masked request makes no INT, so no INTA and no spurious vector.
    #[test]
    fn a_real_irq7_is_in_service_and_an_irq7_eoi_ends_only_irq7() {
        let mut guest = Guest::linux(0x78, 0xff);
        guest.pulse(7);
        assert_eq!(guest.ack(), Some(0x27));
        assert_eq!(guest.isr(0x20), 0x80, "a real IRQ 7 is in service");
        guest.pulse(3);
        assert_eq!(guest.ack(), None, "masked: no INT, no INTA, no spurious vector");

        guest.outb(0x21, 0x70);
        assert_eq!(guest.ack(), Some(0x23));
        assert_eq!(guest.isr(0x20), 0x88);
        // The EOI for a spurious IRQ 7 is specific: it must not end IRQ 3.
        guest.outb(0x20, 0x60 | 7);
        assert_eq!(guest.isr(0x20), 0x08);
        guest.outb(0x20, 0x60 | 7);
        assert_eq!(guest.isr(0x20), 0x08);
    }

    #[test]
    fn a_level_triggered_line_requests_again_after_eoi_while_high() {
        let mut guest = Guest::linux(0xf3, 0xf7);
        guest.outb(0x4d0, 0xff);
        guest.outb(0x4d1, 0xff);
        assert_eq!((guest.inb(0x4d0), guest.inb(0x4d1)), (0xf8, 0xde), "IRQ 0-2, 8, 13 stay edge");

        guest.set_irq(11, true);
        assert_eq!(guest.ack(), Some(0x2b));
        assert_eq!(guest.irr(0xa0), 0x08, "IRR follows the line");
        assert_eq!(guest.pending(), None, "in service");
        guest.specific_eoi(11);
        assert_eq!(guest.ack(), Some(0x2b), "still high: requests again");
        guest.set_irq(11, false);
        guest.specific_eoi(11);
        assert_eq!(guest.pending(), None);
        assert_eq!(guest.irr(0xa0), 0);

        // A level line that drops before INTA withdraws its request.
        guest.set_irq(3, true);
        assert_eq!(guest.pending(), Some(0x23));
        guest.set_irq(3, false);
        assert_eq!(guest.pending(), None);
        assert_eq!(guest.ack(), None);
    }

    #[test]
    fn elcr_made_level_picks_up_a_line_already_high() {
        let mut guest = Guest::linux(0xf7, 0xff);
        guest.set_irq(3, true);
        assert_eq!(guest.ack(), Some(0x23));
        guest.specific_eoi(3);
        assert_eq!(guest.pending(), None, "edge-triggered: one request");
        guest.outb(0x4d0, 0x08);
        assert_eq!(guest.ack(), Some(0x23));
    }

    #[test]
    fn ltim_makes_every_input_level_triggered() {
        let mut guest = Guest::new();
        guest.outb(0x20, 0x1b); // LTIM, single, ICW4
        guest.outb(0x21, 0x20);
        guest.outb(0x21, 0x01);
        guest.set_irq(0, true);
        assert_eq!(guest.ack(), Some(0x20));
        guest.outb(0x20, 0x20);
        assert_eq!(guest.ack(), Some(0x20));
        guest.set_irq(0, false);
        guest.outb(0x20, 0x20);
        assert_eq!(guest.ack(), None);
    }

    #[test]
    fn ocw3_selects_irr_or_isr_and_the_data_port_reads_the_mask() {
        let mut guest = Guest::linux(0xfa, 0xff);
        guest.pulse(0);
        assert_eq!(guest.inb(0x20), 0x01, "IRR is selected after ICW1");
        guest.pulse(5);
        assert_eq!(guest.inb(0x20), 0x21, "IRQ 5 is masked but latched");
        assert_eq!(guest.ack(), Some(0x20));
        guest.outb(0x20, 0x0b);
        assert_eq!(guest.inb(0x20), 0x01);
        assert_eq!(guest.inb(0x20), 0x01, "the selection stays");
        assert_eq!(guest.inb(0x21), 0xfa);
        guest.outb(0x20, 0x08); // OCW3 without RR: selection unchanged
        assert_eq!(guest.inb(0x20), 0x01);
        guest.outb(0x20, 0x0a);
        assert_eq!(guest.inb(0x20), 0x20);
    }

    #[test]
    fn auto_eoi_leaves_nothing_in_service() {
        let mut guest = Guest::new();
        guest.linux_init(0x03);
        guest.outb(0x21, 0xfa);
        guest.pulse(0);
        assert_eq!(guest.ack(), Some(0x20));
        assert_eq!(guest.isr(0x20), 0);
        guest.pulse(0);
        assert_eq!(guest.ack(), Some(0x20), "no EOI needed");
    }

    #[test]
    fn rotation_makes_the_serviced_level_lowest() {
        let mut guest = Guest::linux(0x00, 0xff);
        guest.pulse(0);
        assert_eq!(guest.ack(), Some(0x20));
        guest.outb(0x20, 0xa0); // rotate on non-specific EOI: IR0 lowest
        guest.pulse(0);
        guest.pulse(5);
        assert_eq!(guest.ack(), Some(0x25), "IR1 highest now, so IR5 before IR0");
        guest.outb(0x20, 0xa0);
        assert_eq!(guest.ack(), Some(0x20), "IR5 became the lowest");
        assert_eq!(guest.isr(0x20), 0x01);
        guest.outb(0x20, 0xe0); // rotate on specific EOI, IR0
        assert_eq!(guest.isr(0x20), 0);

        guest.outb(0x20, 0xc3); // set priority: IR3 lowest, IR4 highest
        guest.pulse(3);
        guest.pulse(4);
        assert_eq!(guest.ack(), Some(0x24));
        assert_eq!(guest.pending(), None, "IR3 ranks below IR4, in service");
        guest.outb(0x20, 0x20);
        assert_eq!(guest.ack(), Some(0x23));
    }

    #[test]
    fn rotate_in_auto_eoi_mode() {
        let mut guest = Guest::new();
        guest.linux_init(0x03);
        guest.outb(0x21, 0x00);
        guest.outb(0x20, 0x80); // set rotate in AEOI mode
        guest.pulse(0);
        guest.pulse(1);
        assert_eq!(guest.ack(), Some(0x20));
        guest.pulse(0);
        assert_eq!(guest.ack(), Some(0x21), "IR0 became the lowest");
        assert_eq!(guest.ack(), Some(0x20));
        guest.outb(0x20, 0x00); // clear rotate in AEOI mode
        guest.pulse(1);
        guest.pulse(3);
        assert_eq!(guest.ack(), Some(0x21));
        guest.pulse(1);
        assert_eq!(guest.ack(), Some(0x21), "priority unchanged: IR1 before IR3");
    }

    #[test]
    fn poll_mode_acknowledges_on_read() {
        let mut guest = Guest::linux(0xf0, 0xff);
        guest.outb(0x20, 0x0c);
        assert_eq!(guest.inb(0x20), 0, "no request");
        guest.pulse(3);
        guest.outb(0x20, 0x0c);
        assert_eq!(guest.inb(0x20), 0x83);
        assert_eq!(guest.isr(0x20), 0x08);
        assert_eq!(guest.irr(0x20), 0);
    }

    #[test]
    fn special_mask_mode_lets_lower_priorities_in() {
        let mut guest = Guest::linux(0x00, 0xff);
        guest.pulse(1);
        assert_eq!(guest.ack(), Some(0x21));
        guest.pulse(5);
        assert_eq!(guest.pending(), None);
        // The handler masks its own level and enters special mask mode.
        guest.outb(0x21, 0x02);
        guest.outb(0x20, 0x68);
        assert_eq!(guest.ack(), Some(0x25));
        guest.outb(0x20, 0x65);
        guest.outb(0x20, 0x48); // reset special mask mode
        guest.outb(0x21, 0x00);
        guest.pulse(5);
        assert_eq!(guest.pending(), None, "IR1 in service blocks IR5 again");
    }

    #[test]
    fn special_fully_nested_mode_lets_higher_slave_requests_through() {
        let mut guest = Guest::new();
        guest.linux_init(0x11); // master: SFNM
        guest.outb(0x21, 0x00);
        guest.outb(0xa1, 0x00);
        guest.pulse(12);
        assert_eq!(guest.ack(), Some(0x2c));
        guest.pulse(9);
        assert_eq!(guest.ack(), Some(0x29), "IRQ 9 outranks IRQ 12 on the slave");
        guest.pulse(10);
        assert_eq!(guest.ack(), None, "IRQ 10 is below IRQ 9 in service");
        guest.pulse(3);
        assert_eq!(guest.ack(), None, "IR3 is below the master's IR2 in service");
    }

    #[test]
    fn icw1_forgets_pending_and_in_service_interrupts() {
        let mut guest = Guest::linux(0x00, 0x00);
        guest.pulse(0);
        guest.ack();
        guest.pulse(4);
        guest.set_irq(6, true);
        guest.linux_init(0x01);
        assert_eq!((guest.irr(0x20), guest.isr(0x20)), (0, 0));
        assert_eq!(guest.pending(), None, "a line already high must rise again");
        guest.set_irq(6, false);
        guest.set_irq(6, true);
        assert_eq!(guest.ack(), Some(0x26));
    }

    #[test]
    fn isa_irq2_is_irq9_and_other_lines_are_ignored() {
        let guest = Guest::linux(0xfb, 0x00);
        guest.pulse(2);
        guest.pulse(16);
        assert_eq!(guest.ack(), Some(0x29));
        assert_eq!(guest.ack(), None);
    }

    #[test]
    fn wide_accesses_are_split_into_bytes() {
        let mut guest = Guest::linux(0xfb, 0xff);
        let (ports, _) = guest.range(0x4d0);
        ports.write(0, &[0x08, 0x80]);
        let mut data = [0u8; 2];
        ports.read(0, &mut data);
        assert_eq!(data, [0x08, 0x80]);
        let mut data = [0u8; 2];
        ports.read(1, &mut data);
        assert_eq!(data, [0x80, 0xff], "nothing past the window");
    }
}
