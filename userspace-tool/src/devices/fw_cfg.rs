//! QEMU's firmware configuration device (fw_cfg), traditional I/O
//! interface only: enough for a guest to detect QEMU-compatible firmware
//! configuration and read the RAM size and CPU count from it.
//!
//! Interface (QEMU docs/specs/fw_cfg.rst): a 16-bit write to the selector
//! port picks an item and rewinds it; each 8-bit read of the data port
//! returns the item's next byte, 0 past its end. Items the VMM does not
//! provide read as 0 (for the file directory that is "no files"). Data
//! writes have been ignored by QEMU since 2.4, and are here. There is no
//! DMA interface: the ID item says so.

use crate::bus::PortDevice;

/// The selector port; the data port follows it.
pub const FW_CFG_BASE: u16 = 0x510;
/// Selector (16-bit) and data (8-bit) ports.
pub const FW_CFG_LEN: u16 = 2;

/// Item keys (fw_cfg.rst, "Selector Register").
mod key {
    pub const SIGNATURE: u16 = 0x0000;
    pub const ID: u16 = 0x0001;
    pub const RAM_SIZE: u16 = 0x0003;
    pub const NB_CPUS: u16 = 0x0005;
}

/// Selector bit 14 asks for the (long removed) write channel; it does not
/// name a different item.
const SELECTOR_WRITE: u16 = 0x4000;

/// ID feature bit 0: the traditional interface. Bit 1 (DMA) stays clear.
const ID_TRADITIONAL: u32 = 1;

/// The items and the current read position.
pub struct FwCfg {
    ram_size: u64,
    selected: u16,
    offset: usize,
}

impl FwCfg {
    /// fw_cfg for a single-vCPU guest with `ram_size` bytes of RAM.
    pub fn new(ram_size: u64) -> Self {
        Self { ram_size, selected: key::SIGNATURE, offset: 0 }
    }

    /// The selected item's contents (all integers little-endian).
    fn item(&self) -> Vec<u8> {
        match self.selected & !SELECTOR_WRITE {
            key::SIGNATURE => b"QEMU".to_vec(),
            key::ID => ID_TRADITIONAL.to_le_bytes().to_vec(),
            key::RAM_SIZE => self.ram_size.to_le_bytes().to_vec(),
            key::NB_CPUS => 1u16.to_le_bytes().to_vec(),
            _ => Vec::new(),
        }
    }
}

impl PortDevice for FwCfg {
    fn read(&mut self, offset: u16, data: &mut [u8]) {
        // QEMU's I/O region reads the data register with a 1-byte access
        // at either port; wider reads are not decoded.
        if data.len() != 1 {
            log::debug!("fw_cfg: {}-byte read at port {:#x} reads as all ones", data.len(), FW_CFG_BASE + offset);
            data.fill(0xff);
            return;
        }
        data[0] = self.item().get(self.offset).copied().unwrap_or(0);
        self.offset = self.offset.saturating_add(1);
    }

    fn write(&mut self, offset: u16, data: &[u8]) {
        match (offset, data) {
            (0, &[lo, hi]) => {
                self.selected = u16::from_le_bytes([lo, hi]);
                self.offset = 0;
            }
            _ => log::debug!("fw_cfg: write {data:02x?} at port {:#x} ignored", FW_CFG_BASE + offset),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn select(dev: &mut FwCfg, key: u16) {
        dev.write(0, &key.to_le_bytes());
    }

    fn read_bytes(dev: &mut FwCfg, n: usize) -> Vec<u8> {
        (0..n)
            .map(|_| {
                let mut b = [0u8];
                dev.read(1, &mut b);
                b[0]
            })
            .collect()
    }

    #[test]
    fn the_signature_reads_qemu_then_zeros() {
        let mut dev = FwCfg::new(2 << 20);
        select(&mut dev, key::SIGNATURE);
        assert_eq!(read_bytes(&mut dev, 6), b"QEMU\0\0");
    }

    #[test]
    fn id_ram_size_and_cpu_count_are_little_endian() {
        let mut dev = FwCfg::new(0x1234_5000);
        select(&mut dev, key::ID);
        assert_eq!(read_bytes(&mut dev, 4), [1, 0, 0, 0]);
        select(&mut dev, key::RAM_SIZE);
        assert_eq!(read_bytes(&mut dev, 8), 0x1234_5000u64.to_le_bytes());
        select(&mut dev, key::NB_CPUS);
        assert_eq!(read_bytes(&mut dev, 2), [1, 0]);
    }

    #[test]
    fn selecting_rewinds_and_unknown_items_read_zero() {
        let mut dev = FwCfg::new(2 << 20);
        select(&mut dev, key::SIGNATURE);
        assert_eq!(read_bytes(&mut dev, 2), b"QE");
        select(&mut dev, key::SIGNATURE);
        assert_eq!(read_bytes(&mut dev, 4), b"QEMU");
        select(&mut dev, 0x0019); // the file directory: no files
        assert_eq!(read_bytes(&mut dev, 4), [0; 4]);
        select(&mut dev, SELECTOR_WRITE | key::SIGNATURE);
        assert_eq!(read_bytes(&mut dev, 4), b"QEMU");
    }

    #[test]
    fn data_writes_and_wide_reads_change_nothing() {
        let mut dev = FwCfg::new(2 << 20);
        select(&mut dev, key::SIGNATURE);
        dev.write(1, &[0x55]);
        dev.write(0, &[0x01]); // a byte write to the selector is a data write
        let mut wide = [0u8; 2];
        dev.read(1, &mut wide);
        assert_eq!(wide, [0xff; 2]);
        assert_eq!(read_bytes(&mut dev, 4), b"QEMU");
    }
}
