//! COM1: vm-superio's 16550 UART, output to the VMM's stdout.
//!
//! Interrupts are not wired yet (no interrupt controller in the VMM), so the
//! trigger does nothing; guests poll the line status register.

use std::io::Write;

use vm_superio::{Serial, Trigger};

use crate::bus::PortDevice;

/// I/O base of COM1.
pub const COM1_BASE: u16 = 0x3f8;
/// Registers of a 16550.
pub const COM1_LEN: u16 = 8;

/// An interrupt line that goes nowhere.
pub struct NoInterrupt;

impl Trigger for NoInterrupt {
    type E = std::convert::Infallible;
    fn trigger(&self) -> Result<(), Self::E> {
        Ok(())
    }
}

/// A 16550 whose transmitter writes to `W`.
pub struct SerialPort<W: Write> {
    uart: Serial<NoInterrupt, vm_superio::serial::NoEvents, W>,
}

impl<W: Write> SerialPort<W> {
    /// A UART writing the guest's output to `out`.
    pub fn new(out: W) -> Self {
        Self { uart: Serial::new(NoInterrupt, out) }
    }
}

impl<W: Write> PortDevice for SerialPort<W> {
    fn read(&mut self, offset: u16, data: &mut [u8]) {
        // Registers are 8 bits wide; a wider access reads the first one.
        data.fill(0);
        data[0] = self.uart.read(offset as u8);
    }

    fn write(&mut self, offset: u16, data: &[u8]) {
        if let Err(e) = self.uart.write(offset as u8, data[0]) {
            log::warn!("serial: write to register {offset} failed: {e}");
        }
        // Keep the console live: flush after each character.
        let _ = self.uart.writer_mut().flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_written_to_thr_reach_the_output() {
        let mut port = SerialPort::new(Vec::new());
        for b in b"hi\n" {
            port.write(0, &[*b]);
        }
        assert_eq!(port.uart.writer(), b"hi\n");
    }

    #[test]
    fn line_status_reports_transmitter_empty() {
        let mut port = SerialPort::new(Vec::new());
        let mut lsr = [0u8];
        port.read(5, &mut lsr);
        assert_ne!(lsr[0] & 0x20, 0, "THR empty");
    }
}
