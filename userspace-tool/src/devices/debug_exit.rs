//! QEMU's isa-debug-exit at port 0xf4: a guest writes a status, the VMM
//! exits with `(status << 1) | 1` (so a guest can never fake exit status 0).

use std::cell::Cell;
use std::rc::Rc;

use crate::bus::PortDevice;

/// The port QEMU tests use (`-device isa-debug-exit,iobase=0xf4,iosize=4`).
pub const DEBUG_EXIT_BASE: u16 = 0xf4;
/// 1-, 2- and 4-byte writes are accepted.
pub const DEBUG_EXIT_LEN: u16 = 4;

/// Records the status the guest wrote; the run loop polls it.
pub struct DebugExit {
    status: Rc<Cell<Option<u32>>>,
}

impl DebugExit {
    /// A device that stores the written status in `status`.
    pub fn new(status: Rc<Cell<Option<u32>>>) -> Self {
        Self { status }
    }

    /// The process exit status for a written value, as QEMU computes it
    /// (truncated to 8 bits, as any process exit status is).
    pub fn exit_code(value: u32) -> u8 {
        ((value << 1) | 1) as u8
    }
}

impl PortDevice for DebugExit {
    fn read(&mut self, _offset: u16, data: &mut [u8]) {
        data.fill(0xff);
    }

    fn write(&mut self, _offset: u16, data: &[u8]) {
        let mut value = [0u8; 4];
        value[..data.len().min(4)].copy_from_slice(&data[..data.len().min(4)]);
        self.status.set(Some(u32::from_le_bytes(value)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_of_each_width_record_the_status() {
        let status = Rc::new(Cell::new(None));
        let mut dev = DebugExit::new(status.clone());
        dev.write(0, &[0x21]);
        assert_eq!(status.get(), Some(0x21));
        dev.write(0, &[0x34, 0x12]);
        assert_eq!(status.get(), Some(0x1234));
        dev.write(0, &[1, 0, 0, 0]);
        assert_eq!(status.get(), Some(1));
    }

    #[test]
    fn exit_code_is_qemus() {
        assert_eq!(DebugExit::exit_code(0), 1);
        assert_eq!(DebugExit::exit_code(0x21), 0x43);
    }
}
