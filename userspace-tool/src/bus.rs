//! The port-I/O bus: devices claim port ranges; the run loop dispatches
//! KVM_EXIT_IO to them. Unclaimed ports read as all ones and ignore writes,
//! as on a PC with nothing decoding the address.

/// A device on the port-I/O bus, addressed by offset from its base port.
pub trait PortDevice {
    /// Reads `data.len()` bytes (1, 2 or 4) at `offset`.
    fn read(&mut self, offset: u16, data: &mut [u8]);
    /// Writes `data` at `offset`.
    fn write(&mut self, offset: u16, data: &[u8]);
}

struct Range {
    base: u16,
    len: u16,
    device: Box<dyn PortDevice>,
}

/// Port-I/O address space.
#[derive(Default)]
pub struct PortBus {
    ranges: Vec<Range>,
}

impl PortBus {
    /// Claims `[base, base + len)` for `device`.
    ///
    /// # Panics
    /// If the range overlaps one already claimed: a wiring bug in the VMM.
    pub fn insert(&mut self, base: u16, len: u16, device: Box<dyn PortDevice>) {
        let end = u32::from(base) + u32::from(len);
        assert!(
            self.ranges.iter().all(|r| end <= u32::from(r.base) || u32::from(r.base) + u32::from(r.len) <= u32::from(base)),
            "port range {base:#x}+{len} overlaps another device"
        );
        self.ranges.push(Range { base, len, device });
    }

    fn find(&mut self, port: u16) -> Option<(&mut Range, u16)> {
        self.ranges
            .iter_mut()
            .find(|r| port >= r.base && u32::from(port) < u32::from(r.base) + u32::from(r.len))
            .map(|r| {
                let offset = port - r.base;
                (r, offset)
            })
    }

    /// Handles an IN from `port`.
    pub fn read(&mut self, port: u16, data: &mut [u8]) {
        match self.find(port) {
            Some((r, offset)) => r.device.read(offset, data),
            None => {
                log::debug!("IN from unclaimed port {port:#x} reads as all ones");
                data.fill(0xff);
            }
        }
    }

    /// Handles an OUT to `port`.
    pub fn write(&mut self, port: u16, data: &[u8]) {
        match self.find(port) {
            Some((r, offset)) => r.device.write(offset, data),
            None => log::debug!("OUT {data:02x?} to unclaimed port {port:#x} ignored"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::{cell::RefCell, rc::Rc};

    /// Writes seen by a device: (offset, data).
    type WriteLog = Rc<RefCell<Vec<(u16, Vec<u8>)>>>;

    struct Recorder(WriteLog);
    impl PortDevice for Recorder {
        fn read(&mut self, offset: u16, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u16, data: &[u8]) {
            self.0.borrow_mut().push((offset, data.to_vec()));
        }
    }

    #[test]
    fn accesses_reach_the_device_at_their_offset() {
        let log = Rc::new(RefCell::new(Vec::new()));
        let mut bus = PortBus::default();
        bus.insert(0x3f8, 8, Box::new(Recorder(log.clone())));
        bus.write(0x3fa, &[7]);
        let mut data = [0u8; 2];
        bus.read(0x3fd, &mut data);
        assert_eq!(*log.borrow(), vec![(2, vec![7])]);
        assert_eq!(data, [5, 5]);
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
    #[should_panic(expected = "overlaps")]
    fn overlapping_ranges_are_a_wiring_bug() {
        let mut bus = PortBus::default();
        bus.insert(0x3f8, 8, Box::new(Recorder(Default::default())));
        bus.insert(0x3ff, 1, Box::new(Recorder(Default::default())));
    }
}
