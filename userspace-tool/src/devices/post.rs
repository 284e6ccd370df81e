//! Port 0x80, the POST diagnostic port. Firmware writes progress codes
//! there, and kernels write to it as an I/O delay (Linux's `outb_p`), so it
//! sees many writes: it takes them without a log line each. Nothing reads
//! it back on a PC: reads return all ones, as in QEMU.

use crate::bus::PortDevice;

/// The POST code port.
pub const POST_PORT: u16 = 0x80;
/// One port.
pub const POST_LEN: u16 = 1;

/// Swallows POST codes.
pub struct PostCode;

impl PortDevice for PostCode {
    fn read(&mut self, _offset: u16, data: &mut [u8]) {
        data.fill(0xff);
    }

    fn write(&mut self, _offset: u16, data: &[u8]) {
        log::trace!("POST code {data:02x?}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_are_all_ones_and_writes_do_nothing() {
        let mut post = PostCode;
        post.write(0, &[0x12, 0x34, 0x56, 0x78]);
        let mut data = [0u8; 4];
        post.read(0, &mut data);
        assert_eq!(data, [0xff; 4]);
    }
}
