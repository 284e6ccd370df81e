//! PCI configuration mechanism #1 with no devices behind it: the host
//! bridge's address register at 0xcf8 and data window at 0xcfc-0xcff.
//!
//! A guest probing PCI writes an address (enable bit, bus, device,
//! function, register) to 0xcf8 and reads 0xcfc; a vendor ID of 0xffff
//! means "no device", so every data read returning all ones makes an empty
//! bus. The address register reads back what was written, which is how
//! guests detect that mechanism #1 exists at all.

use crate::bus::PortDevice;

/// CONFIG_ADDRESS; CONFIG_DATA is 4 ports above it.
pub const PCI_CONFIG_BASE: u16 = 0xcf8;
/// CONFIG_ADDRESS (0xcf8-0xcfb) and CONFIG_DATA (0xcfc-0xcff).
pub const PCI_CONFIG_LEN: u16 = 8;

const DATA_OFFSET: u16 = 4;

/// The latched configuration address.
#[derive(Default)]
pub struct PciConfig {
    address: u32,
}

impl PortDevice for PciConfig {
    fn read(&mut self, offset: u16, data: &mut [u8]) {
        // Only a dword access at 0xcf8 is CONFIG_ADDRESS (as on the i440FX
        // and in QEMU); narrower accesses there are other ISA ports.
        if offset == 0 && data.len() == 4 {
            data.copy_from_slice(&self.address.to_le_bytes());
        } else {
            if offset < DATA_OFFSET {
                log::debug!("PCI: {}-byte read at port {:#x} reads as all ones", data.len(), PCI_CONFIG_BASE + offset);
            }
            data.fill(0xff);
        }
    }

    fn write(&mut self, offset: u16, data: &[u8]) {
        match (offset, data) {
            (0, &[a, b, c, d]) => self.address = u32::from_le_bytes([a, b, c, d]),
            (DATA_OFFSET.., _) => {} // no device to write to
            _ => log::debug!("PCI: write {data:02x?} at port {:#x} ignored", PCI_CONFIG_BASE + offset),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_address_register_reads_back() {
        let mut dev = PciConfig::default();
        dev.write(0, &0x8000_f800u32.to_le_bytes());
        let mut data = [0u8; 4];
        dev.read(0, &mut data);
        assert_eq!(u32::from_le_bytes(data), 0x8000_f800);
    }

    #[test]
    fn no_device_answers_on_the_data_port() {
        let mut dev = PciConfig::default();
        dev.write(0, &0x8000_0000u32.to_le_bytes());
        dev.write(4, &[0x12, 0x34, 0x56, 0x78]);
        for (offset, width) in [(4, 4), (4, 2), (6, 2), (7, 1)] {
            let mut data = vec![0u8; width];
            dev.read(offset, &mut data);
            assert!(data.iter().all(|&b| b == 0xff), "{offset}+{width}");
        }
    }

    #[test]
    fn narrow_accesses_to_the_address_port_do_not_latch() {
        let mut dev = PciConfig::default();
        dev.write(0, &[0x12, 0x34]);
        dev.write(1, &[0x06]);
        let mut byte = [0u8];
        dev.read(0, &mut byte);
        assert_eq!(byte, [0xff]);
        let mut data = [0u8; 4];
        dev.read(0, &mut data);
        assert_eq!(data, [0; 4]);
    }
}
