//! The two buses the run loop dispatches exits to: port I/O (KVM_EXIT_IO)
//! and MMIO (KVM_EXIT_MMIO). Devices claim address ranges; an access nobody
//! claims reads as all ones and drops writes, as on a PC where nothing
//! decodes the address.

/// A device on the port-I/O bus, addressed by offset from its base port.
pub trait PortDevice {
    /// Reads `data.len()` bytes (1, 2 or 4) at `offset`.
    fn read(&mut self, offset: u16, data: &mut [u8]);
    /// Writes `data` at `offset`.
    fn write(&mut self, offset: u16, data: &[u8]);
}

/// A device on the MMIO bus, addressed by offset from its base address.
pub trait MmioDevice {
    /// Reads `data.len()` bytes (1 to 8) at `offset`.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// Writes `data` at `offset`.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// One claimed range: where, which device, its name, and how many
/// accesses it has handled (for `rkvm run --stats`).
struct Claim<D: ?Sized> {
    base: u64,
    len: u64,
    name: &'static str,
    accesses: u64,
    device: Box<D>,
}

/// Non-overlapping `[base, base + len)` ranges, each owned by a device.
/// Both buses are this map; only the address width and the device trait
/// differ. A handful of devices: a linear search is the fastest lookup.
struct RangeMap<D: ?Sized> {
    ranges: Vec<Claim<D>>,
    /// Accesses nobody claimed.
    unclaimed: u64,
}

impl<D: ?Sized> Default for RangeMap<D> {
    fn default() -> Self {
        Self { ranges: Vec::new(), unclaimed: 0 }
    }
}

impl<D: ?Sized> RangeMap<D> {
    /// # Panics
    /// If the range is empty or overlaps one already claimed: a wiring bug
    /// in the VMM, not something a guest can cause.
    fn insert(&mut self, base: u64, len: u64, name: &'static str, device: Box<D>) {
        let end = base.checked_add(len).filter(|&end| end > base);
        let end = end.unwrap_or_else(|| panic!("range {base:#x}+{len:#x} is empty or wraps"));
        assert!(
            self.ranges.iter().all(|c| end <= c.base || c.base + c.len <= base),
            "range {base:#x}+{len:#x} overlaps another device"
        );
        self.ranges.push(Claim { base, len, name, accesses: 0, device });
    }

    /// The device claiming `addr`, and the offset of `addr` in its range;
    /// counts the access.
    fn find(&mut self, addr: u64) -> Option<(&mut D, u64)> {
        let found = self.ranges.iter_mut().find(|c| addr >= c.base && addr - c.base < c.len);
        match found {
            Some(c) => {
                c.accesses += 1;
                Some((&mut *c.device, addr - c.base))
            }
            None => {
                self.unclaimed += 1;
                None
            }
        }
    }

    /// Accesses per device name (ranges of one device summed), then
    /// "unclaimed", leaving out zeros.
    fn accesses(&self) -> Vec<(&'static str, u64)> {
        let mut out: Vec<(&'static str, u64)> = Vec::new();
        for c in &self.ranges {
            match out.iter_mut().find(|(n, _)| *n == c.name) {
                Some((_, count)) => *count += c.accesses,
                None => out.push((c.name, c.accesses)),
            }
        }
        out.push(("unclaimed", self.unclaimed));
        out.retain(|&(_, count)| count > 0);
        out
    }
}

/// Port-I/O address space.
#[derive(Default)]
pub struct PortBus {
    map: RangeMap<dyn PortDevice>,
}

impl PortBus {
    /// Claims `[base, base + len)` for `device`.
    ///
    /// # Panics
    /// If the range overlaps one already claimed: a wiring bug in the VMM.
    pub fn insert(&mut self, base: u16, len: u16, name: &'static str, device: Box<dyn PortDevice>) {
        self.map.insert(base.into(), len.into(), name, device);
    }

    /// Accesses per device, for `--stats`.
    pub fn accesses(&self) -> Vec<(&'static str, u64)> {
        self.map.accesses()
    }

    /// Handles an IN from `port`.
    pub fn read(&mut self, port: u16, data: &mut [u8]) {
        match self.map.find(port.into()) {
            // Offsets are below the range length, itself a u16.
            Some((device, offset)) => device.read(offset as u16, data),
            None => {
                log::debug!("IN from unclaimed port {port:#x} reads as all ones");
                data.fill(0xff);
            }
        }
    }

    /// Handles an OUT to `port`.
    pub fn write(&mut self, port: u16, data: &[u8]) {
        match self.map.find(port.into()) {
            Some((device, offset)) => device.write(offset as u16, data),
            None => log::debug!("OUT {data:02x?} to unclaimed port {port:#x} ignored"),
        }
    }
}

/// Guest-physical addresses outside RAM.
#[derive(Default)]
pub struct MmioBus {
    map: RangeMap<dyn MmioDevice>,
}

impl MmioBus {
    /// Claims `[base, base + len)` for `device`.
    ///
    /// # Panics
    /// If the range overlaps one already claimed: a wiring bug in the VMM.
    pub fn insert(&mut self, base: u64, len: u64, name: &'static str, device: Box<dyn MmioDevice>) {
        self.map.insert(base, len, name, device);
    }

    /// Accesses per device, for `--stats`.
    pub fn accesses(&self) -> Vec<(&'static str, u64)> {
        self.map.accesses()
    }

    /// Handles a load from `addr`.
    pub fn read(&mut self, addr: u64, data: &mut [u8]) {
        match self.map.find(addr) {
            Some((device, offset)) => device.read(offset, data),
            None => {
                log::debug!("MMIO read of {} bytes at {addr:#x}: nothing there, all ones", data.len());
                data.fill(0xff);
            }
        }
    }

    /// Handles a store to `addr`.
    pub fn write(&mut self, addr: u64, data: &[u8]) {
        match self.map.find(addr) {
            Some((device, offset)) => device.write(offset, data),
            None => log::debug!("MMIO write {data:02x?} at {addr:#x}: nothing there, ignored"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::{cell::RefCell, rc::Rc};

    /// Writes seen by a device: (offset, data).
    type WriteLog = Rc<RefCell<Vec<(u64, Vec<u8>)>>>;

    /// Reads return the offset in every byte; writes are logged.
    struct Recorder(WriteLog);
    impl PortDevice for Recorder {
        fn read(&mut self, offset: u16, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u16, data: &[u8]) {
            self.0.borrow_mut().push((offset.into(), data.to_vec()));
        }
    }
    impl MmioDevice for Recorder {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.0.borrow_mut().push((offset, data.to_vec()));
        }
    }

    #[test]
    fn accesses_reach_the_device_at_their_offset() {
        let log = Rc::new(RefCell::new(Vec::new()));
        let mut bus = PortBus::default();
        bus.insert(0x3f8, 8, "test", Box::new(Recorder(log.clone())));
        bus.write(0x3fa, &[7]);
        let mut data = [0u8; 2];
        bus.read(0x3fd, &mut data);
        assert_eq!(*log.borrow(), vec![(2, vec![7])]);
        assert_eq!(data, [5, 5]);
        bus.read(0x80, &mut data);
        assert_eq!(bus.accesses(), vec![("test", 2), ("unclaimed", 1)]);
    }

    #[test]
    fn unclaimed_ports_read_all_ones() {
        let mut bus = PortBus::default();
        let mut data = [0u8; 4];
        bus.read(0x80, &mut data);
        assert_eq!(data, [0xff; 4]);
        bus.write(0x80, &[1]);
    }

    #[test]
    fn the_last_port_of_the_space_can_be_claimed() {
        let mut bus = PortBus::default();
        bus.insert(0xffff, 1, "test", Box::new(Recorder(Default::default())));
        let mut data = [0u8];
        bus.read(0xffff, &mut data);
        assert_eq!(data, [0]);
    }

    #[test]
    #[should_panic(expected = "overlaps")]
    fn overlapping_ranges_are_a_wiring_bug() {
        let mut bus = PortBus::default();
        bus.insert(0x3f8, 8, "test", Box::new(Recorder(Default::default())));
        bus.insert(0x3ff, 1, "test", Box::new(Recorder(Default::default())));
    }

    #[test]
    fn mmio_reaches_the_device_and_unclaimed_addresses_read_all_ones() {
        let log = Rc::new(RefCell::new(Vec::new()));
        let mut bus = MmioBus::default();
        bus.insert(0xfee0_0000, 0x1000, "test", Box::new(Recorder(log.clone())));
        bus.write(0xfee0_00b0, &[0, 0, 0, 0]);
        let mut data = [0u8; 4];
        bus.read(0xfee0_0030, &mut data);
        assert_eq!(data, [0x30; 4]);
        bus.read(0xfee0_1000, &mut data);
        assert_eq!(data, [0xff; 4], "one past the device");
        bus.write(0xfedf_ffff, &[1]);
        assert_eq!(*log.borrow(), vec![(0xb0, vec![0; 4])]);
    }

    #[test]
    #[should_panic(expected = "overlaps")]
    fn overlapping_mmio_ranges_are_a_wiring_bug() {
        let mut bus = MmioBus::default();
        bus.insert(0xfee0_0000, 0x1000, "test", Box::new(Recorder(Default::default())));
        bus.insert(0xfedf_f000, 0x1001, "test", Box::new(Recorder(Default::default())));
    }
}
