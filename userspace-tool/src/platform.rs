//! The PC the tool emulates around the vCPU: the devices at their usual
//! addresses, the interrupt wiring between them, and the clock they share.
//!
//! ```text
//! port 0x20, 0xa0, 0x4d0   8259A PIC pair and ELCR
//! port 0x40-0x43, 0x61     8254 PIT (IRQ 0), its gate/speaker port
//! port 0x60, 0x64          i8042 (reset line; IRQ 1/12, no devices)
//! port 0x70-0x71           CMOS RTC (host time)
//! port 0x80                POST codes
//! port 0x3f8-0x3ff         16550 COM1 (IRQ 4): stdout, console input
//! port 0xf4                isa-debug-exit
//! port 0x510-0x511         fw_cfg
//! port 0xcf8-0xcff         PCI configuration, no devices
//! mmio 0xd000_0000         virtio-blk over virtio-mmio (IRQ 5), with --disk
//! mmio 0xfee0_0000         local APIC (xAPIC), for Linux guests: its timer,
//!                          and the PIC's interrupts through LINT0 (ExtINT)
//! ```
//! Interrupts reach the vCPU as a PC's do: the APIC's own (timer, self-IPI)
//! by priority, and the 8259A's through LINT0 while it is unmasked in ExtINT
//! mode ("virtual wire"), which is how the tool's APIC starts, as firmware
//! would leave it. Guests that are not told of the APIC (its CPUID bit
//! clear) take the PIC's interrupts directly.
//! Everything here runs on the vCPU thread; devices share state through
//! `Rc<RefCell<..>>`, and a `RefCell` is never held across a bus access.

use std::cell::{Cell, RefCell};
use std::io::Stdout;
use std::rc::Rc;
use std::time::{Duration, Instant};

use anyhow::Result;
use vm_memory::GuestMemoryMmap;

use crate::bus::{MmioBus, PortBus};
use crate::devices::apic::{LocalApic, SharedApic, APIC_BASE, APIC_LEN};
use crate::devices::debug_exit::{DebugExit, DEBUG_EXIT_BASE, DEBUG_EXIT_LEN};
use crate::devices::fw_cfg::{FwCfg, FW_CFG_BASE, FW_CFG_LEN};
use crate::devices::i8042::{I8042Port, I8042, I8042_COMMAND_PORT, I8042_DATA_PORT, I8042_PORT_LEN};
use crate::devices::pci::{PciConfig, PCI_CONFIG_BASE, PCI_CONFIG_LEN};
use crate::devices::pic::{Pic, PicPorts, ELCR_BASE, ELCR_LEN, PIC_LEN, PIC_MASTER_BASE, PIC_SLAVE_BASE};
use crate::devices::pit::{Pit, PitPorts, PortB, SharedPit, PIT_BASE, PIT_LEN, PORT_B, PORT_B_LEN};
use crate::devices::post::{PostCode, POST_LEN, POST_PORT};
use crate::devices::rtc::{Rtc, RTC_BASE, RTC_LEN};
use crate::devices::serial::{SerialPort, SharedSerial, COM1_BASE, COM1_IRQ, COM1_LEN};
use crate::devices::virtio_blk::VirtioBlk;
use crate::devices::virtio_mmio::{self, VirtioMmio, VIRTIO_MMIO_LEN};
use crate::devices::IrqLine;

/// Where the virtio-blk device's registers are, and its interrupt.
pub const VIRTIO_BLK_BASE: u64 = 0xd000_0000;
/// See [`VIRTIO_BLK_BASE`].
pub const VIRTIO_BLK_IRQ: u8 = 5;

/// The PIT's input: IRQ 0.
const PIT_IRQ: u8 = 0;

/// The devices, their buses, and what the run loop needs to reach.
pub struct Platform {
    pub pio: PortBus,
    pub mmio: MmioBus,
    pic: Rc<RefCell<Pic>>,
    pit: SharedPit,
    apic: Rc<RefCell<LocalApic>>,
    /// Whether the guest was told of the APIC (and so takes interrupts
    /// through it).
    apic_enabled: bool,
    serial: Rc<RefCell<SerialPort<Stdout, IrqLine>>>,
    /// Set by the i8042's reset line: the guest rebooted.
    pub reset: Rc<Cell<bool>>,
    /// Set by isa-debug-exit: the guest's exit status.
    pub exit_status: Rc<Cell<Option<u32>>>,
    /// The moment the timers' clock (PIT, APIC) counts from.
    start: Instant,
}

impl Platform {
    /// Every device on its bus; with `disk`, virtio-blk too (it reaches guest
    /// RAM through `mem`). With `apic_timer_hz` the guest was told of the
    /// local APIC, whose timer counts at that rate (before its divider).
    pub fn new(mem: &GuestMemoryMmap, mem_size: u64, disk: Option<VirtioBlk>, apic_timer_hz: Option<u64>) -> Result<Self> {
        let start = Instant::now();
        let pic = Rc::new(RefCell::new(Pic::new()));
        let pit = Rc::new(RefCell::new(Pit::new(move || start.elapsed())));
        let apic = Rc::new(RefCell::new(match apic_timer_hz {
            Some(hz) => LocalApic::new(move || start.elapsed(), hz).with_virtual_wire(),
            None => LocalApic::default(),
        }));
        let reset = Rc::new(Cell::new(false));
        let exit_status = Rc::new(Cell::new(None));
        let serial =
            Rc::new(RefCell::new(SerialPort::with_line(std::io::stdout(), IrqLine::new(pic.clone(), COM1_IRQ))));
        let kbc_pic = pic.clone();
        let kbc = Rc::new(RefCell::new(I8042::new(reset.clone(), move |irq, level| {
            kbc_pic.borrow_mut().set_irq(irq, level);
        })));

        let mut pio = PortBus::default();
        pio.insert(PIC_MASTER_BASE, PIC_LEN, "pic", Box::new(PicPorts::master(pic.clone())));
        pio.insert(PIC_SLAVE_BASE, PIC_LEN, "pic", Box::new(PicPorts::slave(pic.clone())));
        pio.insert(ELCR_BASE, ELCR_LEN, "pic", Box::new(PicPorts::elcr(pic.clone())));
        pio.insert(PIT_BASE, PIT_LEN, "pit", Box::new(PitPorts::new(pit.clone())));
        pio.insert(PORT_B, PORT_B_LEN, "pit", Box::new(PortB::new(pit.clone())));
        pio.insert(I8042_DATA_PORT, I8042_PORT_LEN, "i8042", Box::new(I8042Port::data(kbc.clone())));
        pio.insert(I8042_COMMAND_PORT, I8042_PORT_LEN, "i8042", Box::new(I8042Port::command(kbc)));
        pio.insert(RTC_BASE, RTC_LEN, "rtc", Box::new(Rtc::host()));
        pio.insert(POST_PORT, POST_LEN, "post", Box::new(PostCode));
        pio.insert(DEBUG_EXIT_BASE, DEBUG_EXIT_LEN, "debug-exit", Box::new(DebugExit::new(exit_status.clone())));
        pio.insert(COM1_BASE, COM1_LEN, "serial", Box::new(SharedSerial(serial.clone())));
        pio.insert(FW_CFG_BASE, FW_CFG_LEN, "fw_cfg", Box::new(FwCfg::new(mem_size)));
        pio.insert(PCI_CONFIG_BASE, PCI_CONFIG_LEN, "pci", Box::new(PciConfig::default()));

        let mut mmio = MmioBus::default();
        mmio.insert(APIC_BASE, APIC_LEN, "apic", Box::new(SharedApic(apic.clone())));
        if let Some(disk) = disk {
            let line = IrqLine::new(pic.clone(), VIRTIO_BLK_IRQ);
            let device = VirtioMmio::new(disk, mem.clone(), Box::new(move || line.pulse()));
            mmio.insert(VIRTIO_BLK_BASE, VIRTIO_MMIO_LEN, "virtio-blk", Box::new(device));
        }
        let apic_enabled = apic_timer_hz.is_some();
        Ok(Self { pio, mmio, pic, pit, apic, apic_enabled, serial, reset, exit_status, start })
    }

    /// What the kernel command line must say for Linux to find the disk.
    pub fn disk_cmdline() -> String {
        virtio_mmio::cmdline_device(VIRTIO_BLK_BASE, VIRTIO_BLK_IRQ.into())
    }

    /// Latches the timers that fired since the last call: the PIT's counter 0
    /// raises IRQ 0, the APIC timer its vector.
    pub fn poll_timers(&self) {
        if self.pit.borrow_mut().poll() > 0 {
            self.pic.borrow_mut().pulse_irq(PIT_IRQ);
        }
        if self.apic_enabled {
            self.apic.borrow_mut().poll();
        }
    }

    /// When the next timer interrupt falls due, if one will.
    pub fn next_deadline(&self) -> Option<Instant> {
        let pit = self.pit.borrow().next_irq_deadline();
        let apic = if self.apic_enabled { self.apic.borrow().next_deadline() } else { None };
        let next: Option<Duration> = match (pit, apic) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        next.map(|d| self.start + d)
    }

    /// Whether the PIC's output reaches the CPU: always without an APIC,
    /// else through LINT0 in ExtINT mode.
    fn pic_connected(&self) -> bool {
        !self.apic_enabled || self.apic.borrow().accepts_pic_interrupts()
    }

    /// Whether an interrupt is waiting for the CPU to take it.
    pub fn interrupt_pending(&self) -> bool {
        (self.apic_enabled && self.apic.borrow().pending_vector().is_some())
            || (self.pic_connected() && self.pic.borrow().has_pending())
    }

    /// The CPU takes an interrupt (INTA) and gets its vector: the PIC's
    /// (ExtINT) first, as KVM's kvm_cpu_get_interrupt, since it is outside
    /// the APIC's priority scheme, then the APIC's by priority.
    pub fn acknowledge_interrupt(&self) -> Option<u8> {
        if self.pic_connected() {
            if let Some(vector) = self.pic.borrow_mut().acknowledge() {
                return Some(vector);
            }
        }
        if self.apic_enabled {
            return self.apic.borrow_mut().acknowledge();
        }
        None
    }

    /// Feeds console input into COM1's receive FIFO once the guest listens;
    /// what does not fit stays in `pending` for later.
    pub fn feed_serial(&self, pending: &mut Vec<u8>) {
        if pending.is_empty() {
            return;
        }
        let mut serial = self.serial.borrow_mut();
        if !serial.listening() {
            return;
        }
        let taken = serial.receive(pending);
        pending.drain(..taken);
    }
}
