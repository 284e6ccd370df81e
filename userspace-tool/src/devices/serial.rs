//! COM1: vm-superio's 16550 UART, output to the VMM's stdout, input from
//! the console, and its interrupt (transmitter empty, data received) on
//! IRQ 4 through the PIC when the guest enables it in IER. Guests that poll
//! the line status register (boot loaders, payloads) work as well.

use std::io::Write;

use vm_superio::{Serial, Trigger};

use crate::bus::PortDevice;

/// I/O base of COM1.
pub const COM1_BASE: u16 = 0x3f8;
/// Registers of a 16550.
pub const COM1_LEN: u16 = 8;

/// COM1's ISA interrupt.
pub const COM1_IRQ: u8 = 4;

/// An interrupt line: what the UART raises (a PIC input, or nothing).
pub trait Line {
    /// One edge on the line.
    fn pulse(&self);
}

/// A line that goes nowhere.
pub struct NoInterrupt;

impl Line for NoInterrupt {
    fn pulse(&self) {}
}

impl Line for super::IrqLine {
    fn pulse(&self) {
        super::IrqLine::pulse(self);
    }
}

/// vm-superio's trigger, on a [`Line`].
pub struct LineTrigger<L: Line>(L);

impl<L: Line> Trigger for LineTrigger<L> {
    type E = std::convert::Infallible;
    fn trigger(&self) -> Result<(), Self::E> {
        self.0.pulse();
        Ok(())
    }
}

/// A 16550 whose transmitter writes to `W` and whose interrupt is `L`.
pub struct SerialPort<W: Write, L: Line = NoInterrupt> {
    uart: Serial<LineTrigger<L>, vm_superio::serial::NoEvents, W>,
}

impl<W: Write> SerialPort<W> {
    /// A UART writing the guest's output to `out`, without interrupts.
    #[cfg(test)]
    pub fn new(out: W) -> Self {
        Self { uart: Serial::new(LineTrigger(NoInterrupt), out) }
    }
}

impl<W: Write, L: Line> SerialPort<W, L> {
    /// A UART writing to `out` and raising `line`.
    pub fn with_line(out: W, line: L) -> Self {
        Self { uart: Serial::new(LineTrigger(line), out) }
    }

    /// Whether the guest listens for input: "received data available"
    /// interrupts enabled in IER. A driver turns that on when the port is
    /// opened; bytes sent before would be lost to its FIFO resets, so they
    /// wait until then. (LCR and IER reads have no side effects.)
    pub fn listening(&mut self) -> bool {
        const LCR: u8 = 3;
        const IER: u8 = 1;
        const DLAB: u8 = 1 << 7;
        const IER_RDA: u8 = 1 << 0;
        self.uart.read(LCR) & DLAB == 0 && self.uart.read(IER) & IER_RDA != 0
    }

    /// Puts as much of `input` as the receive FIFO takes (it holds 64
    /// bytes); returns how many bytes it took. The rest waits for the guest
    /// to read.
    pub fn receive(&mut self, input: &[u8]) -> usize {
        let room = self.uart.fifo_capacity();
        let n = input.len().min(room);
        if n == 0 {
            return 0;
        }
        match self.uart.enqueue_raw_bytes(&input[..n]) {
            Ok(taken) => taken,
            Err(e) => {
                log::warn!("serial: input dropped: {e:?}");
                0
            }
        }
    }
}

/// A UART shared between the bus and the VMM (which feeds it input).
pub struct SharedSerial<W: Write, L: Line>(pub std::rc::Rc<std::cell::RefCell<SerialPort<W, L>>>);

impl<W: Write, L: Line> PortDevice for SharedSerial<W, L> {
    fn read(&mut self, offset: u16, data: &mut [u8]) {
        self.0.borrow_mut().read(offset, data);
    }

    fn write(&mut self, offset: u16, data: &[u8]) {
        self.0.borrow_mut().write(offset, data);
    }
}

impl<W: Write, L: Line> PortDevice for SerialPort<W, L> {
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

    struct Counter(std::rc::Rc<std::cell::Cell<u32>>);
    impl Line for Counter {
        fn pulse(&self) {
            self.0.set(self.0.get() + 1);
        }
    }

    #[test]
    fn received_bytes_raise_the_line_when_enabled_and_are_read_in_order() {
        let pulses = std::rc::Rc::new(std::cell::Cell::new(0));
        let mut port = SerialPort::with_line(Vec::new(), Counter(pulses.clone()));
        assert!(!port.listening());
        port.write(1, &[0x01]); // IER: received data available
        assert!(port.listening());
        assert_eq!(port.receive(b"ok"), 2);
        assert!(pulses.get() >= 1, "IRQ raised");
        let mut b = [0u8];
        port.read(0, &mut b);
        assert_eq!(b[0], b'o');
        port.read(0, &mut b);
        assert_eq!(b[0], b'k');
        // The FIFO holds 64 bytes: the rest waits.
        assert_eq!(port.receive(&[b'x'; 100]), 64);
    }

    #[test]
    fn line_status_reports_transmitter_empty() {
        let mut port = SerialPort::new(Vec::new());
        let mut lsr = [0u8];
        port.read(5, &mut lsr);
        assert_ne!(lsr[0] & 0x20, 0, "THR empty");
    }
}
