//! The virtio-mmio transport, version 2 ("modern", virtio 1.1 section
//! 4.2): one page of 32-bit registers through which a driver discovers a
//! virtio device, negotiates features, lays out its virtqueues in guest RAM
//! and kicks them; the device's configuration space follows at 0x100. The
//! device behind it is a [`VirtioDevice`], which sees only its queues.
//!
//! The model (section references are to virtio 1.1):
//! - Registers (4.2.2, table 4.1): 32-bit wide and aligned accesses only
//!   (4.2.2.2); any other access to them reads 0 and is ignored, as are
//!   writes to read-only registers. Write-only registers read 0.
//! - Device status (2.1, 3.1.1): the driver sets ACKNOWLEDGE, DRIVER,
//!   FEATURES_OK and DRIVER_OK in turn; writing 0 resets the device (queues
//!   unready, features and interrupts cleared; 4.2.2.1). FEATURES_OK sticks
//!   only if the driver accepted VIRTIO_F_VERSION_1 (6.2) and nothing the
//!   device did not offer (2.2.2); the driver reads it back to find out.
//!   Clearing bits without a reset is ignored.
//! - Queues (2.6, 4.2.3.2): configured while FEATURES_OK is set and
//!   DRIVER_OK is not. The size and ring addresses take effect when the
//!   driver writes 1 to QueueReady; a size that is not a power of two up to
//!   QueueNumMax, misaligned rings (2.6, table "Virtqueue Part Alignment")
//!   or rings outside guest RAM leave the queue unready and the device in
//!   DEVICE_NEEDS_RESET.
//! - Notifications (4.2.3.3): a write to QueueNotify runs the device on
//!   that queue there and then, on the vCPU thread, if DRIVER_OK is set and
//!   the device does not need a reset (2.1.2: nothing is consumed before
//!   DRIVER_OK). If the device used buffers, InterruptStatus bit 0 is set
//!   and the interrupt callback fires, unless the driver set
//!   VIRTQ_AVAIL_F_NO_INTERRUPT (2.6.7.2; VIRTIO_F_EVENT_IDX is not
//!   supported, so that flag is the only suppression there is).
//! - Interrupts (4.2.2.1, 4.2.3.4): InterruptStatus holds bit 0 (used
//!   buffers) and bit 1 (configuration change) until the driver writes them
//!   to InterruptACK. The callback is a pulse: a VMM wires it to an
//!   edge-triggered line, and it fires each time a bit is set, whether or
//!   not it already was, so a pulse the interrupt controller lost is made up
//!   for by the next one.
//! - Errors (2.1.2): when the device finds the queue unusable (a descriptor
//!   chain no driver would build, rings the device cannot write), the
//!   transport logs it, sets DEVICE_NEEDS_RESET, raises a configuration
//!   change interrupt if DRIVER_OK is set, and leaves the queues alone until
//!   the driver resets the device. A guest cannot make the VMM panic.
//! - The configuration space never changes, so ConfigGeneration is always 0
//!   (4.2.2.1).
//!
//! A Linux guest learns of the device from `virtio_mmio.device=4K@BASE:IRQ`
//! on its command line ([`cmdline_device`]).

use std::sync::atomic::Ordering;

use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_FAILED, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
    VIRTIO_F_VERSION_1,
};
use virtio_bindings::virtio_mmio::{
    VIRTIO_MMIO_CONFIG, VIRTIO_MMIO_CONFIG_GENERATION, VIRTIO_MMIO_DEVICE_FEATURES, VIRTIO_MMIO_DEVICE_FEATURES_SEL,
    VIRTIO_MMIO_DEVICE_ID, VIRTIO_MMIO_DRIVER_FEATURES, VIRTIO_MMIO_DRIVER_FEATURES_SEL, VIRTIO_MMIO_INTERRUPT_ACK,
    VIRTIO_MMIO_INTERRUPT_STATUS, VIRTIO_MMIO_INT_CONFIG, VIRTIO_MMIO_INT_VRING, VIRTIO_MMIO_MAGIC_VALUE,
    VIRTIO_MMIO_QUEUE_AVAIL_HIGH, VIRTIO_MMIO_QUEUE_AVAIL_LOW, VIRTIO_MMIO_QUEUE_DESC_HIGH, VIRTIO_MMIO_QUEUE_DESC_LOW,
    VIRTIO_MMIO_QUEUE_NOTIFY, VIRTIO_MMIO_QUEUE_NUM, VIRTIO_MMIO_QUEUE_NUM_MAX, VIRTIO_MMIO_QUEUE_READY,
    VIRTIO_MMIO_QUEUE_SEL, VIRTIO_MMIO_QUEUE_USED_HIGH, VIRTIO_MMIO_QUEUE_USED_LOW, VIRTIO_MMIO_STATUS,
    VIRTIO_MMIO_VENDOR_ID, VIRTIO_MMIO_VERSION,
};
use virtio_bindings::virtio_ring::VRING_AVAIL_F_NO_INTERRUPT;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::bus::MmioDevice;

/// Size of the register window: one page, as `virtio_mmio.device=4K@...`
/// announces it.
pub const VIRTIO_MMIO_LEN: u64 = 0x1000;

/// MagicValue: "virt" in little-endian (4.2.2).
const MAGIC: u32 = u32::from_le_bytes(*b"virt");
/// Version 2: the virtio 1.x register layout (4.2.2); 1 is legacy.
const VERSION: u32 = 2;
/// VendorID: "rkvm". Linux's virtio drivers match any vendor.
const VENDOR: u32 = u32::from_le_bytes(*b"rkvm");
/// Where the device's configuration space starts in the window.
const CONFIG_START: u64 = VIRTIO_MMIO_CONFIG as u64;

/// The kernel command-line parameter that makes Linux probe a virtio-mmio
/// device at `base` with interrupt `irq` (drivers/virtio/virtio_mmio.c,
/// "virtio_mmio.device=<size>@<baseaddr>:<irq>").
pub fn cmdline_device(base: u64, irq: u32) -> String {
    format!("virtio_mmio.device=4K@{base:#x}:{irq}")
}

/// A virtio device as its transport sees it: an identity, features, a
/// configuration space and queues to serve (virtio 1.1 sections 2 and 5).
pub trait VirtioDevice {
    /// The device ID (5, "Device Types"): 2 for a block device.
    fn device_id(&self) -> u32;
    /// The feature bits the device offers (2.2, 6), including
    /// VIRTIO_F_VERSION_1.
    fn features(&self) -> u64;
    /// The driver accepted `features` (a subset of [`Self::features`] with
    /// VIRTIO_F_VERSION_1) and set FEATURES_OK.
    fn set_acked_features(&mut self, features: u64);
    /// The largest size of each queue, a power of two up to 32768; as many
    /// entries as the device has queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Reads the configuration space at `offset`; bytes past its end read 0.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes the configuration space at `offset`.
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// Serves the buffers the driver made available on queue `index`.
    ///
    /// Returns whether any buffer was put in the used ring.
    ///
    /// # Errors
    /// The queue cannot be served any more (a malformed descriptor chain, a
    /// ring the device cannot write): the device needs a reset.
    fn process_queue(&mut self, index: usize, queue: &mut Queue, mem: &GuestMemoryMmap) -> anyhow::Result<bool>;
}

/// The queue registers the driver writes before it sets QueueReady.
#[derive(Clone, Copy, Debug, Default)]
struct QueueRegs {
    /// QueueNum.
    size: u32,
    /// QueueDesc{Low,High}: the descriptor table.
    desc: u64,
    /// QueueDriver{Low,High}: the available ring.
    driver: u64,
    /// QueueDevice{Low,High}: the used ring.
    device: u64,
}

/// Replaces the low (`high == false`) or high half of `reg` with `value`.
fn set_half(reg: &mut u64, high: bool, value: u32) {
    let value = u64::from(value);
    *reg = if high { (*reg & 0xffff_ffff) | (value << 32) } else { (*reg & !0xffff_ffff) | value };
}

/// A [`VirtioDevice`] behind a virtio-mmio register window.
pub struct VirtioMmio<D> {
    device: D,
    mem: GuestMemoryMmap,
    /// Pulses the device's interrupt line.
    interrupt: Box<dyn FnMut()>,
    queues: Vec<Queue>,
    queue_regs: Vec<QueueRegs>,
    queue_sel: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    status: u32,
    interrupt_status: u32,
}

impl<D: VirtioDevice> VirtioMmio<D> {
    /// `device` behind a register window, reaching guest RAM through `mem`
    /// (a clone shares the mapping) and signalling through `interrupt`.
    ///
    /// # Panics
    /// If the device reports a queue size that is not a power of two up to
    /// 32768: a bug in the device, not something a guest can cause.
    pub fn new(device: D, mem: GuestMemoryMmap, interrupt: Box<dyn FnMut()>) -> Self {
        let queues: Vec<Queue> = device
            .queue_max_sizes()
            .iter()
            .map(|&max| Queue::new(max).unwrap_or_else(|e| panic!("virtio queue of {max} entries: {e}")))
            .collect();
        let queue_regs = vec![QueueRegs::default(); queues.len()];
        Self {
            device,
            mem,
            interrupt,
            queues,
            queue_regs,
            queue_sel: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            status: 0,
            interrupt_status: 0,
        }
    }

    /// The device, for tests to look into.
    #[cfg(test)]
    pub fn device(&self) -> &D {
        &self.device
    }

    /// Device reset (2.1.2, 4.2.2.1): back to the state after power-on.
    fn reset(&mut self) {
        for queue in &mut self.queues {
            queue.reset();
        }
        self.queue_regs.fill(QueueRegs::default());
        self.queue_sel = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.status = 0;
        self.interrupt_status = 0;
    }

    /// Sets `bits` in InterruptStatus and pulses the line.
    fn raise(&mut self, bits: u32) {
        self.interrupt_status |= bits;
        (self.interrupt)();
    }

    /// The device cannot go on until the driver resets it (2.1.2).
    fn needs_reset(&mut self) {
        self.status |= VIRTIO_CONFIG_S_NEEDS_RESET;
        if self.status & VIRTIO_CONFIG_S_DRIVER_OK != 0 {
            self.raise(VIRTIO_MMIO_INT_CONFIG);
        }
    }

    fn selected_queue(&self) -> Option<usize> {
        let index = usize::try_from(self.queue_sel).ok()?;
        (index < self.queues.len()).then_some(index)
    }

    /// Queue registers may change while the driver sets the device up:
    /// after FEATURES_OK, before DRIVER_OK (3.1.1), and only for a queue
    /// that is not live.
    fn queue_to_configure(&self) -> Option<usize> {
        let setting_up = self.status
            & (VIRTIO_CONFIG_S_FEATURES_OK | VIRTIO_CONFIG_S_DRIVER_OK | VIRTIO_CONFIG_S_FAILED)
            == VIRTIO_CONFIG_S_FEATURES_OK;
        match self.selected_queue() {
            Some(index) if setting_up && !self.queues[index].ready() => Some(index),
            _ => {
                log::warn!(
                    "virtio-mmio: queue {} cannot be configured now (status {:#x}); write ignored",
                    self.queue_sel,
                    self.status
                );
                None
            }
        }
    }

    fn write_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        // DEVICE_NEEDS_RESET is the device's to set: a driver writing back
        // what it read neither sets nor clears it.
        let mut value = (value & !VIRTIO_CONFIG_S_NEEDS_RESET) | (self.status & VIRTIO_CONFIG_S_NEEDS_RESET);
        if value & self.status != self.status {
            log::warn!("virtio-mmio: status {:#x} -> {value:#x} clears bits without a reset; ignored", self.status);
            return;
        }
        let added = value & !self.status;
        if added & VIRTIO_CONFIG_S_FEATURES_OK != 0 {
            let unknown = self.driver_features & !self.device.features();
            if unknown != 0 || self.driver_features & (1 << VIRTIO_F_VERSION_1) == 0 {
                log::warn!(
                    "virtio-mmio: driver features {:#x} lack VIRTIO_F_VERSION_1 or include unoffered bits {unknown:#x}; \
                     FEATURES_OK refused",
                    self.driver_features
                );
                value &= !VIRTIO_CONFIG_S_FEATURES_OK;
            } else {
                self.device.set_acked_features(self.driver_features);
            }
        }
        if added & VIRTIO_CONFIG_S_DRIVER_OK != 0 && value & VIRTIO_CONFIG_S_FEATURES_OK == 0 {
            log::warn!("virtio-mmio: DRIVER_OK before FEATURES_OK; ignored");
            value &= !VIRTIO_CONFIG_S_DRIVER_OK;
        }
        self.status = value;
    }

    fn write_queue_ready(&mut self, ready: bool) {
        if !ready {
            // Linux writes 0 to queues it tears down after a reset, which
            // already unreadied them. Taking a live queue down is a queue
            // reset (VIRTIO_F_RING_RESET, virtio 1.2), not offered.
            if self.selected_queue().is_some_and(|i| self.queues[i].ready()) {
                log::warn!(
                    "virtio-mmio: queue {} is live and stays so; write of 0 to QueueReady ignored",
                    self.queue_sel
                );
            }
            return;
        }
        let Some(index) = self.queue_to_configure() else { return };
        let regs = self.queue_regs[index];
        let queue = &mut self.queues[index];
        let configured = u16::try_from(regs.size)
            .map_err(|_| virtio_queue::Error::InvalidSize)
            .and_then(|size| queue.try_set_size(size))
            .and_then(|()| queue.try_set_desc_table_address(GuestAddress(regs.desc)))
            .and_then(|()| queue.try_set_avail_ring_address(GuestAddress(regs.driver)))
            .and_then(|()| queue.try_set_used_ring_address(GuestAddress(regs.device)));
        queue.set_ready(true);
        // is_valid checks that the rings lie in guest RAM (and logs why not).
        let valid = configured.is_ok() && queue.is_valid(&self.mem);
        if !valid {
            queue.set_ready(false);
            log::warn!(
                "virtio-mmio: queue {index} refused ({}): size {}, descriptors {:#x}, available ring {:#x}, \
                 used ring {:#x}; the device needs a reset",
                configured.err().map_or_else(|| "rings outside guest RAM".to_string(), |e| e.to_string()),
                regs.size,
                regs.desc,
                regs.driver,
                regs.device
            );
            self.needs_reset();
        }
    }

    /// QueueNotify: serve queue `index` now.
    fn notify(&mut self, index: u32) {
        if self.status & (VIRTIO_CONFIG_S_DRIVER_OK | VIRTIO_CONFIG_S_NEEDS_RESET | VIRTIO_CONFIG_S_FAILED)
            != VIRTIO_CONFIG_S_DRIVER_OK
        {
            log::debug!("virtio-mmio: notify of queue {index} with status {:#x} ignored", self.status);
            return;
        }
        let Some(i) = usize::try_from(index).ok().filter(|&i| i < self.queues.len() && self.queues[i].ready()) else {
            log::warn!("virtio-mmio: notify of queue {index}, which is not live; ignored");
            return;
        };
        match self.device.process_queue(i, &mut self.queues[i], &self.mem) {
            Ok(false) => {}
            Ok(true) => {
                if !self.interrupt_suppressed(i) {
                    self.raise(VIRTIO_MMIO_INT_VRING);
                }
            }
            Err(e) => {
                log::error!("virtio-mmio: queue {index}: {e:#}; the device needs a reset");
                // Buffers used before the failure still need their interrupt.
                self.interrupt_status |= VIRTIO_MMIO_INT_VRING;
                self.needs_reset();
            }
        }
    }

    /// VIRTQ_AVAIL_F_NO_INTERRUPT in the available ring's flags (2.6.7.2).
    fn interrupt_suppressed(&self, index: usize) -> bool {
        let flags = GuestAddress(self.queues[index].avail_ring());
        match self.mem.load::<u16>(flags, Ordering::Acquire) {
            Ok(flags) => u32::from(u16::from_le(flags)) & VRING_AVAIL_F_NO_INTERRUPT != 0,
            Err(_) => false, // checked at QueueReady; interrupt to be safe
        }
    }

    fn read_register(&self, offset: u32) -> u32 {
        match offset {
            VIRTIO_MMIO_MAGIC_VALUE => MAGIC,
            VIRTIO_MMIO_VERSION => VERSION,
            VIRTIO_MMIO_DEVICE_ID => self.device.device_id(),
            VIRTIO_MMIO_VENDOR_ID => VENDOR,
            VIRTIO_MMIO_DEVICE_FEATURES => match self.device_features_sel {
                0 => self.device.features() as u32,
                1 => (self.device.features() >> 32) as u32,
                _ => 0,
            },
            VIRTIO_MMIO_QUEUE_NUM_MAX => self.selected_queue().map_or(0, |i| self.queues[i].max_size().into()),
            VIRTIO_MMIO_QUEUE_READY => self.selected_queue().map_or(0, |i| self.queues[i].ready().into()),
            VIRTIO_MMIO_INTERRUPT_STATUS => self.interrupt_status,
            VIRTIO_MMIO_STATUS => self.status,
            VIRTIO_MMIO_CONFIG_GENERATION => 0,
            _ => {
                log::debug!("virtio-mmio: read of register {offset:#x} reads 0");
                0
            }
        }
    }

    fn write_register(&mut self, offset: u32, value: u32) {
        match offset {
            VIRTIO_MMIO_DEVICE_FEATURES_SEL => self.device_features_sel = value,
            VIRTIO_MMIO_DRIVER_FEATURES_SEL => self.driver_features_sel = value,
            VIRTIO_MMIO_DRIVER_FEATURES => {
                if self.status & VIRTIO_CONFIG_S_FEATURES_OK != 0 {
                    log::warn!("virtio-mmio: driver features written after FEATURES_OK; ignored");
                } else if self.driver_features_sel < 2 {
                    set_half(&mut self.driver_features, self.driver_features_sel == 1, value);
                }
            }
            VIRTIO_MMIO_QUEUE_SEL => self.queue_sel = value,
            VIRTIO_MMIO_QUEUE_NUM => {
                if let Some(i) = self.queue_to_configure() {
                    self.queue_regs[i].size = value;
                }
            }
            VIRTIO_MMIO_QUEUE_DESC_LOW | VIRTIO_MMIO_QUEUE_DESC_HIGH => {
                if let Some(i) = self.queue_to_configure() {
                    set_half(&mut self.queue_regs[i].desc, offset == VIRTIO_MMIO_QUEUE_DESC_HIGH, value);
                }
            }
            VIRTIO_MMIO_QUEUE_AVAIL_LOW | VIRTIO_MMIO_QUEUE_AVAIL_HIGH => {
                if let Some(i) = self.queue_to_configure() {
                    set_half(&mut self.queue_regs[i].driver, offset == VIRTIO_MMIO_QUEUE_AVAIL_HIGH, value);
                }
            }
            VIRTIO_MMIO_QUEUE_USED_LOW | VIRTIO_MMIO_QUEUE_USED_HIGH => {
                if let Some(i) = self.queue_to_configure() {
                    set_half(&mut self.queue_regs[i].device, offset == VIRTIO_MMIO_QUEUE_USED_HIGH, value);
                }
            }
            VIRTIO_MMIO_QUEUE_READY => self.write_queue_ready(value & 1 != 0),
            VIRTIO_MMIO_QUEUE_NOTIFY => self.notify(value),
            VIRTIO_MMIO_INTERRUPT_ACK => self.interrupt_status &= !value,
            VIRTIO_MMIO_STATUS => self.write_status(value),
            _ => log::debug!("virtio-mmio: write {value:#x} to register {offset:#x} ignored"),
        }
    }
}

impl<D: VirtioDevice> MmioDevice for VirtioMmio<D> {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_START {
            data.fill(0);
            self.device.read_config(offset - CONFIG_START, data);
            return;
        }
        match u32::try_from(offset).ok().filter(|o| o % 4 == 0 && data.len() == 4) {
            Some(offset) => data.copy_from_slice(&self.read_register(offset).to_le_bytes()),
            None => {
                log::warn!("virtio-mmio: {}-byte read at {offset:#x}: registers are 32-bit; reads 0", data.len());
                data.fill(0);
            }
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_START {
            self.device.write_config(offset - CONFIG_START, data);
            return;
        }
        match (u32::try_from(offset).ok().filter(|o| o % 4 == 0), <[u8; 4]>::try_from(data)) {
            (Some(offset), Ok(value)) => self.write_register(offset, u32::from_le_bytes(value)),
            _ => log::warn!("virtio-mmio: {}-byte write at {offset:#x}: registers are 32-bit; ignored", data.len()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;
    use std::rc::Rc;
    use virtio_bindings::virtio_config::{VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER};

    const FEATURE_X: u64 = 1 << 3;

    /// A device with one queue of 8, a 4-byte configuration space, and no
    /// work to do: enough to exercise the transport alone.
    #[derive(Default)]
    struct Dummy {
        acked: Option<u64>,
        config: [u8; 4],
    }

    impl VirtioDevice for Dummy {
        fn device_id(&self) -> u32 {
            42
        }
        fn features(&self) -> u64 {
            (1 << VIRTIO_F_VERSION_1) | FEATURE_X
        }
        fn set_acked_features(&mut self, features: u64) {
            self.acked = Some(features);
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[8]
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            for (i, b) in data.iter_mut().enumerate() {
                *b = usize::try_from(offset).ok().and_then(|o| self.config.get(o + i)).copied().unwrap_or(0);
            }
        }
        fn write_config(&mut self, offset: u64, data: &[u8]) {
            self.config[offset as usize..][..data.len()].copy_from_slice(data);
        }
        fn process_queue(&mut self, _: usize, _: &mut Queue, _: &GuestMemoryMmap) -> anyhow::Result<bool> {
            Ok(true)
        }
    }

    fn transport() -> (VirtioMmio<Dummy>, Rc<Cell<u32>>) {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let pulses = Rc::new(Cell::new(0));
        let counter = pulses.clone();
        let dev = VirtioMmio::new(Dummy::default(), mem, Box::new(move || counter.set(counter.get() + 1)));
        (dev, pulses)
    }

    fn rd(dev: &mut VirtioMmio<Dummy>, offset: u32) -> u32 {
        let mut data = [0u8; 4];
        dev.read(offset.into(), &mut data);
        u32::from_le_bytes(data)
    }

    fn wr(dev: &mut VirtioMmio<Dummy>, offset: u32, value: u32) {
        dev.write(offset.into(), &value.to_le_bytes());
    }

    /// Reset, ACKNOWLEDGE, DRIVER, then the driver's features, as Linux.
    fn negotiate(dev: &mut VirtioMmio<Dummy>, features: u64) -> u32 {
        wr(dev, VIRTIO_MMIO_STATUS, 0);
        wr(dev, VIRTIO_MMIO_STATUS, VIRTIO_CONFIG_S_ACKNOWLEDGE);
        wr(dev, VIRTIO_MMIO_STATUS, VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER);
        wr(dev, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
        wr(dev, VIRTIO_MMIO_DRIVER_FEATURES, (features >> 32) as u32);
        wr(dev, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
        wr(dev, VIRTIO_MMIO_DRIVER_FEATURES, features as u32);
        let status = rd(dev, VIRTIO_MMIO_STATUS) | VIRTIO_CONFIG_S_FEATURES_OK;
        wr(dev, VIRTIO_MMIO_STATUS, status);
        rd(dev, VIRTIO_MMIO_STATUS)
    }

    /// Queue 0 of 8 entries at 0x1000 (descriptors), 0x1080 (available
    /// ring) and 0x1100 (used ring).
    fn setup_queue(dev: &mut VirtioMmio<Dummy>) {
        wr(dev, VIRTIO_MMIO_QUEUE_SEL, 0);
        wr(dev, VIRTIO_MMIO_QUEUE_NUM, 8);
        wr(dev, VIRTIO_MMIO_QUEUE_DESC_LOW, 0x1000);
        wr(dev, VIRTIO_MMIO_QUEUE_DESC_HIGH, 0);
        wr(dev, VIRTIO_MMIO_QUEUE_AVAIL_LOW, 0x1080);
        wr(dev, VIRTIO_MMIO_QUEUE_AVAIL_HIGH, 0);
        wr(dev, VIRTIO_MMIO_QUEUE_USED_LOW, 0x1100);
        wr(dev, VIRTIO_MMIO_QUEUE_USED_HIGH, 0);
        wr(dev, VIRTIO_MMIO_QUEUE_READY, 1);
    }

    #[test]
    fn identification_registers() {
        let (mut dev, _) = transport();
        assert_eq!(rd(&mut dev, VIRTIO_MMIO_MAGIC_VALUE), 0x7472_6976);
        assert_eq!(rd(&mut dev, VIRTIO_MMIO_VERSION), 2);
        assert_eq!(rd(&mut dev, VIRTIO_MMIO_DEVICE_ID), 42);
        assert_eq!(rd(&mut dev, VIRTIO_MMIO_QUEUE_NUM_MAX), 8);
        wr(&mut dev, VIRTIO_MMIO_QUEUE_SEL, 1);
        assert_eq!(rd(&mut dev, VIRTIO_MMIO_QUEUE_NUM_MAX), 0, "no queue 1");
        wr(&mut dev, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1);
        assert_eq!(rd(&mut dev, VIRTIO_MMIO_DEVICE_FEATURES), 1, "VIRTIO_F_VERSION_1 is bit 32");
        wr(&mut dev, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 0);
        assert_eq!(rd(&mut dev, VIRTIO_MMIO_DEVICE_FEATURES), FEATURE_X as u32);
        wr(&mut dev, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 2);
        assert_eq!(rd(&mut dev, VIRTIO_MMIO_DEVICE_FEATURES), 0);
        assert_eq!(rd(&mut dev, VIRTIO_MMIO_CONFIG_GENERATION), 0);
    }

    #[test]
    fn features_ok_needs_version_1_and_only_offered_bits() {
        let (mut dev, _) = transport();
        assert_eq!(negotiate(&mut dev, FEATURE_X) & VIRTIO_CONFIG_S_FEATURES_OK, 0, "no VERSION_1");
        assert_eq!(negotiate(&mut dev, (1 << VIRTIO_F_VERSION_1) | (1 << 7)) & VIRTIO_CONFIG_S_FEATURES_OK, 0);
        assert_eq!(dev.device.acked, None);
        let status = negotiate(&mut dev, 1 << VIRTIO_F_VERSION_1);
        assert_ne!(status & VIRTIO_CONFIG_S_FEATURES_OK, 0);
        assert_eq!(dev.device.acked, Some(1 << VIRTIO_F_VERSION_1));
        // Features are fixed from FEATURES_OK on.
        wr(&mut dev, VIRTIO_MMIO_DRIVER_FEATURES, FEATURE_X as u32);
        assert_eq!(dev.driver_features, 1 << VIRTIO_F_VERSION_1);
    }

    #[test]
    fn status_bits_are_cleared_only_by_reset() {
        let (mut dev, _) = transport();
        let status = negotiate(&mut dev, 1 << VIRTIO_F_VERSION_1);
        wr(&mut dev, VIRTIO_MMIO_STATUS, VIRTIO_CONFIG_S_ACKNOWLEDGE);
        assert_eq!(rd(&mut dev, VIRTIO_MMIO_STATUS), status);
        wr(&mut dev, VIRTIO_MMIO_STATUS, 0);
        assert_eq!(rd(&mut dev, VIRTIO_MMIO_STATUS), 0);
    }

    #[test]
    fn driver_ok_needs_features_ok() {
        let (mut dev, _) = transport();
        negotiate(&mut dev, 0);
        wr(
            &mut dev,
            VIRTIO_MMIO_STATUS,
            VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_DRIVER_OK,
        );
        assert_eq!(rd(&mut dev, VIRTIO_MMIO_STATUS) & VIRTIO_CONFIG_S_DRIVER_OK, 0);
    }

    #[test]
    fn reset_unreadies_queues_and_clears_interrupts() {
        let (mut dev, pulses) = transport();
        let status = negotiate(&mut dev, 1 << VIRTIO_F_VERSION_1);
        setup_queue(&mut dev);
        assert_eq!(rd(&mut dev, VIRTIO_MMIO_QUEUE_READY), 1);
        wr(&mut dev, VIRTIO_MMIO_STATUS, status | VIRTIO_CONFIG_S_DRIVER_OK);
        wr(&mut dev, VIRTIO_MMIO_QUEUE_NOTIFY, 0);
        assert_eq!((rd(&mut dev, VIRTIO_MMIO_INTERRUPT_STATUS), pulses.get()), (1, 1));
        wr(&mut dev, VIRTIO_MMIO_STATUS, 0);
        assert_eq!(rd(&mut dev, VIRTIO_MMIO_QUEUE_READY), 0);
        assert_eq!(rd(&mut dev, VIRTIO_MMIO_INTERRUPT_STATUS), 0);
    }

    #[test]
    fn notifications_before_driver_ok_are_ignored() {
        let (mut dev, pulses) = transport();
        negotiate(&mut dev, 1 << VIRTIO_F_VERSION_1);
        setup_queue(&mut dev);
        wr(&mut dev, VIRTIO_MMIO_QUEUE_NOTIFY, 0);
        assert_eq!(pulses.get(), 0);
    }

    #[test]
    fn queues_are_configured_only_during_setup() {
        let (mut dev, _) = transport();
        // Before FEATURES_OK.
        wr(&mut dev, VIRTIO_MMIO_STATUS, VIRTIO_CONFIG_S_ACKNOWLEDGE);
        setup_queue(&mut dev);
        assert_eq!(rd(&mut dev, VIRTIO_MMIO_QUEUE_READY), 0);
        // A live queue keeps its rings.
        negotiate(&mut dev, 1 << VIRTIO_F_VERSION_1);
        setup_queue(&mut dev);
        wr(&mut dev, VIRTIO_MMIO_QUEUE_DESC_LOW, 0x2000);
        assert_eq!(dev.queues[0].desc_table(), 0x1000);
    }

    #[test]
    fn bad_queue_layouts_need_a_reset() {
        for (reg, value) in [
            (VIRTIO_MMIO_QUEUE_NUM, 6),            // not a power of two
            (VIRTIO_MMIO_QUEUE_NUM, 16),           // above QueueNumMax
            (VIRTIO_MMIO_QUEUE_DESC_LOW, 0x1008),  // descriptors need 16-byte alignment
            (VIRTIO_MMIO_QUEUE_USED_LOW, 0x1102),  // the used ring needs 4-byte alignment
            (VIRTIO_MMIO_QUEUE_USED_HIGH, 1),      // outside guest RAM
            (VIRTIO_MMIO_QUEUE_AVAIL_LOW, 0xfffe), // runs off the end of RAM
        ] {
            let (mut dev, _) = transport();
            negotiate(&mut dev, 1 << VIRTIO_F_VERSION_1);
            setup_queue(&mut dev);
            // Start again with the one bad register.
            wr(&mut dev, VIRTIO_MMIO_STATUS, 0);
            negotiate(&mut dev, 1 << VIRTIO_F_VERSION_1);
            wr(&mut dev, VIRTIO_MMIO_QUEUE_NUM, 8);
            wr(&mut dev, VIRTIO_MMIO_QUEUE_DESC_LOW, 0x1000);
            wr(&mut dev, VIRTIO_MMIO_QUEUE_AVAIL_LOW, 0x1080);
            wr(&mut dev, VIRTIO_MMIO_QUEUE_USED_LOW, 0x1100);
            wr(&mut dev, reg, value);
            wr(&mut dev, VIRTIO_MMIO_QUEUE_READY, 1);
            assert_eq!(rd(&mut dev, VIRTIO_MMIO_QUEUE_READY), 0, "register {reg:#x} = {value:#x}");
            assert_ne!(rd(&mut dev, VIRTIO_MMIO_STATUS) & VIRTIO_CONFIG_S_NEEDS_RESET, 0);
        }
    }

    #[test]
    fn interrupt_ack_clears_only_the_written_bits() {
        let (mut dev, _) = transport();
        dev.interrupt_status = VIRTIO_MMIO_INT_VRING | VIRTIO_MMIO_INT_CONFIG;
        wr(&mut dev, VIRTIO_MMIO_INTERRUPT_ACK, VIRTIO_MMIO_INT_VRING);
        assert_eq!(rd(&mut dev, VIRTIO_MMIO_INTERRUPT_STATUS), VIRTIO_MMIO_INT_CONFIG);
    }

    #[test]
    fn narrow_register_accesses_read_zero_and_are_ignored() {
        let (mut dev, _) = transport();
        let mut byte = [0xffu8];
        dev.read(VIRTIO_MMIO_MAGIC_VALUE.into(), &mut byte);
        assert_eq!(byte, [0]);
        let mut word = [0xffu8; 4];
        dev.read(2, &mut word);
        assert_eq!(word, [0; 4], "unaligned");
        dev.write(VIRTIO_MMIO_STATUS.into(), &[1]);
        assert_eq!(rd(&mut dev, VIRTIO_MMIO_STATUS), 0);
    }

    #[test]
    fn configuration_space_follows_the_registers_at_any_width() {
        let (mut dev, _) = transport();
        dev.write(0x101, &[0xab, 0xcd]);
        let mut data = [0xffu8; 8];
        dev.read(0x100, &mut data);
        assert_eq!(data, [0, 0xab, 0xcd, 0, 0, 0, 0, 0]);
        let mut byte = [0u8];
        dev.read(0x102, &mut byte);
        assert_eq!(byte, [0xcd]);
    }

    #[test]
    fn the_command_line_names_window_and_interrupt() {
        assert_eq!(cmdline_device(0xd000_0000, 5), "virtio_mmio.device=4K@0xd0000000:5");
    }
}
