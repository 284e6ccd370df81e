//! Emulated devices: each a small state machine on the port or MMIO bus.

use std::cell::RefCell;
use std::rc::Rc;

pub mod apic;
pub mod debug_exit;
pub mod fw_cfg;
pub mod i8042;
pub mod pci;
pub mod pic;
pub mod pit;
pub mod post;
pub mod rtc;
pub mod serial;
pub mod virtio_blk;
pub mod virtio_mmio;

/// An ISA interrupt line into the PIC pair, for devices that raise one
/// (edge-triggered, as ISA lines are).
#[derive(Clone)]
pub struct IrqLine {
    pic: Rc<RefCell<pic::Pic>>,
    irq: u8,
}

impl IrqLine {
    /// Line `irq` (0-15) of `pic`.
    pub fn new(pic: Rc<RefCell<pic::Pic>>, irq: u8) -> Self {
        Self { pic, irq }
    }

    /// One rising and falling edge: one request.
    pub fn pulse(&self) {
        self.pic.borrow_mut().pulse_irq(self.irq);
    }
}
