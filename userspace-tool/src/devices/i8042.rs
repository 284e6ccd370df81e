//! The PS/2 controller (an 8042 running keyboard-controller firmware, as in
//! the IBM PS/2 and every PC since) at ports 0x60 (data) and 0x64 (status
//! on read, command on write), with neither a keyboard nor a mouse plugged
//! in. It is there for the controller's other jobs: letting Linux's i8042
//! driver find a controller and, finding no devices, give up quickly and
//! quietly, and resetting the machine (command 0xfe, Linux's `reboot=k`).
//!
//! The controller (IBM PS/2 Hardware Interface Technical Reference,
//! "Keyboard/Auxiliary Device Controller"):
//! - Status: output buffer full (a byte waits at 0x60), input buffer full
//!   (always clear: a write is processed at once), system flag (bit 2 of
//!   the command byte, set by a passing self-test), command/data (the last
//!   write went to 0x64), keyboard not inhibited (no keylock), auxiliary
//!   data (the waiting byte is from the mouse port), timeout.
//! - Commands: 0x20-0x3f read and 0x60-0x7f write the controller's 32
//!   bytes of RAM, byte 0 being the command byte (interrupt enables, system
//!   flag, port disables, translation); 0xa7/0xa8 disable and enable the
//!   auxiliary port, 0xad/0xae the keyboard port; 0xa9 and 0xab test the
//!   two interfaces (0x00: no error); 0xaa self-test (0x55); 0xd0/0xd1 read
//!   and write the output port (bit 0 low resets the CPU; A20, bit 1, is not
//!   modelled: KVM guests have A20 on); 0xd2/0xd3 put a byte in the output
//!   buffer as if from the keyboard or the mouse (the loopback Linux uses
//!   to test the mouse port and its interrupt); 0xd4 sends the next byte to
//!   the mouse; 0xf0-0xff pulse output-port bits 0-3 low for the ones clear
//!   in the command (0xfe: reset; 0xff: nothing, which Linux sends as a null
//!   command). Unknown commands are ignored.
//! - A byte sent to an absent device (0x60 without a pending command goes
//!   to the keyboard; 0xd4's byte to the mouse) times out: the controller
//!   answers 0xfe with the timeout bit set, from that port. Sending to a
//!   port enables it, as QEMU does.
//! - IRQ 1 is high while a keyboard-side byte waits and the command byte
//!   enables keyboard interrupts; IRQ 12 likewise for the mouse side. Reading
//!   the byte lowers the line; a queued byte raises it again (a new edge).
//!
//! How Linux (drivers/input/serio/i8042.c, 6.12) meets this controller:
//! `i8042_controller_check` reads the status until the output buffer is
//! empty (all ones, from an unclaimed port, means "No controller found");
//! `i8042_controller_init` reads the command byte twice, checks the keylock
//! bit, and writes it back; `i8042_check_aux` loops a byte through 0xd3,
//! toggles the mouse port with 0xa7/0xa8 and reads the command byte back,
//! then waits up to 250 ms for the looped byte's IRQ 12 (with IRQ 12 not
//! delivered it decides there is no mouse port, quietly). The keyboard port
//! is registered without a test; atkbd then sends GET ID and SET LEDS, each
//! answered 0xfe (a NAK, retried once, then failure): with IRQ 1 delivered
//! that is a few round trips; without it, two 200 ms waits. With IRQ 12
//! delivered the mouse port is registered too and psmouse's first command
//! fails at once on the timeout bit. No command is left unanswered, so the
//! driver never waits out its 500 ms controller timeout.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::rc::Rc;

use crate::bus::PortDevice;

/// The data port.
pub const I8042_DATA_PORT: u16 = 0x60;
/// The status (read) and command (write) port.
pub const I8042_COMMAND_PORT: u16 = 0x64;
/// Each of the two is one port: 0x61-0x63 belong to other devices.
pub const I8042_PORT_LEN: u16 = 1;
/// The keyboard port's interrupt line.
pub const KEYBOARD_IRQ: u8 = 1;
/// The auxiliary (mouse) port's interrupt line.
pub const AUX_IRQ: u8 = 12;

/// Status: a byte waits in the output buffer.
const STATUS_OBF: u8 = 1 << 0;
/// Status: the system flag, a copy of the command byte's.
#[cfg(test)]
const STATUS_SYS: u8 = 1 << 2;
/// Status: the last write was to the command port.
const STATUS_CMD: u8 = 1 << 3;
/// Status: the keyboard is not inhibited by the keylock.
const STATUS_UNLOCKED: u8 = 1 << 4;
/// Status: the waiting byte is from the auxiliary port.
const STATUS_AUX: u8 = 1 << 5;
/// Status: the device did not answer.
const STATUS_TIMEOUT: u8 = 1 << 6;

/// Command byte: interrupt on keyboard data.
const CTR_KBDINT: u8 = 1 << 0;
/// Command byte: interrupt on auxiliary data.
const CTR_AUXINT: u8 = 1 << 1;
/// Command byte: the system flag.
const CTR_SYS: u8 = 1 << 2;
/// Command byte: keyboard port disabled.
const CTR_KBDDIS: u8 = 1 << 4;
/// Command byte: auxiliary port disabled.
const CTR_AUXDIS: u8 = 1 << 5;
/// After power-on: both interrupts enabled, as QEMU's controller.
const CTR_POWER_ON: u8 = CTR_KBDINT | CTR_AUXINT;

/// Output port: the CPU's reset line, active low.
const OUTPUT_NOT_RESET: u8 = 1 << 0;
/// Output port: the A20 gate.
const OUTPUT_A20: u8 = 1 << 1;
/// Output port: IRQ 1's level.
const OUTPUT_KBD_IRQ: u8 = 1 << 4;
/// Output port: IRQ 12's level.
const OUTPUT_AUX_IRQ: u8 = 1 << 5;
/// Output port: the keyboard clock and data lines (6, 7) and the mouse's
/// (3, 2), idle high.
const OUTPUT_LINES_IDLE: u8 = 0xcc;

const CMD_READ_RAM: u8 = 0x20;
const CMD_WRITE_RAM: u8 = 0x60;
const CMD_AUX_DISABLE: u8 = 0xa7;
const CMD_AUX_ENABLE: u8 = 0xa8;
const CMD_AUX_TEST: u8 = 0xa9;
const CMD_SELF_TEST: u8 = 0xaa;
const CMD_KBD_TEST: u8 = 0xab;
const CMD_KBD_DISABLE: u8 = 0xad;
const CMD_KBD_ENABLE: u8 = 0xae;
const CMD_READ_OUTPUT: u8 = 0xd0;
const CMD_WRITE_OUTPUT: u8 = 0xd1;
const CMD_WRITE_KBD_BUFFER: u8 = 0xd2;
const CMD_WRITE_AUX_BUFFER: u8 = 0xd3;
const CMD_WRITE_AUX: u8 = 0xd4;
const CMD_PULSE: u8 = 0xf0;

/// Self-test passed.
const SELF_TEST_OK: u8 = 0x55;
/// Interface test: no error.
const INTERFACE_OK: u8 = 0x00;
/// What the controller answers for a device that does not respond.
const NO_DEVICE: u8 = 0xfe;
/// Bytes the output buffer queues; Linux's flush reads at most 16.
const QUEUE_LEN: usize = 8;

/// What a write to the data port means next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum DataWrite {
    /// A byte for the keyboard.
    Keyboard,
    /// Controller RAM byte N (0: the command byte).
    Ram(u8),
    /// The output port.
    OutputPort,
    /// A byte to put in the output buffer, from the keyboard side.
    KeyboardBuffer,
    /// A byte to put in the output buffer, from the auxiliary side.
    AuxBuffer,
    /// A byte for the mouse.
    Aux,
}

/// A byte for the CPU and where it comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Output {
    byte: u8,
    aux: bool,
    timeout: bool,
}

/// Sets an interrupt line: `(irq, level)`.
type IrqLine = Box<dyn FnMut(u8, bool)>;

/// The controller, shared by its two [`I8042Port`]s.
pub struct I8042 {
    /// Controller RAM; byte 0 is the command byte.
    ram: [u8; 32],
    /// The output buffer (front) and the bytes queued behind it.
    output: VecDeque<Output>,
    /// What a data port read gives with the buffer empty: the last byte.
    last: u8,
    next: DataWrite,
    /// The last write went to the command port.
    command_last: bool,
    /// Output port bits 0-1 (reset, A20).
    output_port: u8,
    /// Levels last driven on IRQ 1 and IRQ 12.
    kbd_irq: bool,
    aux_irq: bool,
    irq: IrqLine,
    reset: Rc<Cell<bool>>,
}

impl I8042 {
    /// A controller after power-on: no byte waiting, both interrupts
    /// enabled, the system flag clear. It sets `reset` when the guest pulses
    /// the CPU reset line, and drives IRQ 1 and 12 through `irq(irq, level)`.
    pub fn new(reset: Rc<Cell<bool>>, irq: impl FnMut(u8, bool) + 'static) -> Self {
        let mut ram = [0; 32];
        ram[0] = CTR_POWER_ON;
        Self {
            ram,
            output: VecDeque::with_capacity(QUEUE_LEN),
            last: 0,
            next: DataWrite::Keyboard,
            command_last: false,
            output_port: OUTPUT_NOT_RESET | OUTPUT_A20,
            kbd_irq: false,
            aux_irq: false,
            irq: Box::new(irq),
            reset,
        }
    }

    fn ctr(&self) -> u8 {
        self.ram[0]
    }

    fn status(&self) -> u8 {
        let mut status = STATUS_UNLOCKED | (self.ctr() & CTR_SYS);
        if self.command_last {
            status |= STATUS_CMD;
        }
        if let Some(out) = self.output.front() {
            status |= STATUS_OBF;
            if out.aux {
                status |= STATUS_AUX;
            }
            if out.timeout {
                status |= STATUS_TIMEOUT;
            }
        }
        status
    }

    fn read_data(&mut self) -> u8 {
        if let Some(out) = self.output.pop_front() {
            self.last = out.byte;
            // The buffer empties, so the line drops even if another byte
            // follows: the next one is a new edge.
            self.set_irqs(false, false);
            self.update_irqs();
        }
        self.last
    }

    fn write_data(&mut self, value: u8) {
        self.command_last = false;
        let next = std::mem::replace(&mut self.next, DataWrite::Keyboard);
        match next {
            DataWrite::Keyboard => {
                self.ram[0] &= !CTR_KBDDIS;
                log::debug!("i8042: {value:#04x} to the keyboard: none attached");
                self.push(Output { byte: NO_DEVICE, aux: false, timeout: true });
            }
            DataWrite::Aux => {
                self.ram[0] &= !CTR_AUXDIS;
                log::debug!("i8042: {value:#04x} to the mouse: none attached");
                self.push(Output { byte: NO_DEVICE, aux: true, timeout: true });
            }
            DataWrite::Ram(index) => {
                self.ram[usize::from(index)] = value;
                // The interrupt enables may have changed.
                self.update_irqs();
            }
            DataWrite::OutputPort => self.write_output_port(value),
            DataWrite::KeyboardBuffer => self.push(Output { byte: value, aux: false, timeout: false }),
            DataWrite::AuxBuffer => self.push(Output { byte: value, aux: true, timeout: false }),
        }
    }

    fn write_command(&mut self, command: u8) {
        self.command_last = true;
        self.next = DataWrite::Keyboard;
        match command {
            CMD_READ_RAM..=0x3f => self.reply(self.ram[usize::from(command & 0x1f)]),
            CMD_WRITE_RAM..=0x7f => self.next = DataWrite::Ram(command & 0x1f),
            CMD_AUX_DISABLE => self.ram[0] |= CTR_AUXDIS,
            CMD_AUX_ENABLE => self.ram[0] &= !CTR_AUXDIS,
            CMD_AUX_TEST | CMD_KBD_TEST => self.reply(INTERFACE_OK),
            CMD_SELF_TEST => {
                self.ram[0] |= CTR_SYS;
                self.reply(SELF_TEST_OK);
            }
            CMD_KBD_DISABLE => self.ram[0] |= CTR_KBDDIS,
            CMD_KBD_ENABLE => self.ram[0] &= !CTR_KBDDIS,
            CMD_READ_OUTPUT => {
                let mut port = self.output_port | OUTPUT_LINES_IDLE;
                if self.kbd_irq {
                    port |= OUTPUT_KBD_IRQ;
                }
                if self.aux_irq {
                    port |= OUTPUT_AUX_IRQ;
                }
                self.reply(port);
            }
            CMD_WRITE_OUTPUT => self.next = DataWrite::OutputPort,
            CMD_WRITE_KBD_BUFFER => self.next = DataWrite::KeyboardBuffer,
            CMD_WRITE_AUX_BUFFER => self.next = DataWrite::AuxBuffer,
            CMD_WRITE_AUX => self.next = DataWrite::Aux,
            // Bits 0-3 clear are pulsed low for 6 µs; bit 0 is reset.
            CMD_PULSE..=0xff => {
                if command & OUTPUT_NOT_RESET == 0 {
                    self.request_reset();
                }
            }
            _ => log::debug!("i8042: command {command:#04x} not implemented; ignored"),
        }
    }

    fn write_output_port(&mut self, value: u8) {
        self.output_port = value & (OUTPUT_NOT_RESET | OUTPUT_A20);
        if value & OUTPUT_A20 == 0 {
            log::debug!("i8042: A20 gate closed; A20 stays enabled");
        }
        if value & OUTPUT_NOT_RESET == 0 {
            self.output_port |= OUTPUT_NOT_RESET;
            self.request_reset();
        }
    }

    fn request_reset(&mut self) {
        log::info!("i8042: the guest pulsed the CPU reset line");
        self.reset.set(true);
    }

    /// A controller response: keyboard side, like a keyboard byte.
    fn reply(&mut self, byte: u8) {
        self.push(Output { byte, aux: false, timeout: false });
    }

    fn push(&mut self, out: Output) {
        if self.output.len() == QUEUE_LEN {
            log::debug!("i8042: output queue full; {:#04x} dropped", out.byte);
            return;
        }
        self.output.push_back(out);
        self.update_irqs();
    }

    /// IRQ 1 and 12 from the byte waiting and the interrupt enables.
    fn update_irqs(&mut self) {
        let (kbd, aux) = match self.output.front() {
            Some(out) if out.aux => (false, self.ctr() & CTR_AUXINT != 0),
            Some(_) => (self.ctr() & CTR_KBDINT != 0, false),
            None => (false, false),
        };
        self.set_irqs(kbd, aux);
    }

    fn set_irqs(&mut self, kbd: bool, aux: bool) {
        if kbd != self.kbd_irq {
            self.kbd_irq = kbd;
            (self.irq)(KEYBOARD_IRQ, kbd);
        }
        if aux != self.aux_irq {
            self.aux_irq = aux;
            (self.irq)(AUX_IRQ, aux);
        }
    }
}

/// Which of the controller's two ports an [`I8042Port`] is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Register {
    Data,
    Command,
}

/// One of the controller's ports on the bus, sharing the [`I8042`] with
/// the other (0x60 and 0x64 are not one range: port 0x61 is the PIT's).
pub struct I8042Port {
    controller: Rc<RefCell<I8042>>,
    register: Register,
}

impl I8042Port {
    /// The data port, for [`I8042_DATA_PORT`].
    pub fn data(controller: Rc<RefCell<I8042>>) -> Self {
        Self { controller, register: Register::Data }
    }

    /// The status and command port, for [`I8042_COMMAND_PORT`].
    pub fn command(controller: Rc<RefCell<I8042>>) -> Self {
        Self { controller, register: Register::Command }
    }
}

impl PortDevice for I8042Port {
    fn read(&mut self, _offset: u16, data: &mut [u8]) {
        // 8-bit registers: a wider access reads the first one.
        data.fill(0);
        let mut controller = self.controller.borrow_mut();
        data[0] = match self.register {
            Register::Data => controller.read_data(),
            Register::Command => controller.status(),
        };
    }

    fn write(&mut self, _offset: u16, data: &[u8]) {
        let mut controller = self.controller.borrow_mut();
        match self.register {
            Register::Data => controller.write_data(data[0]),
            Register::Command => controller.write_command(data[0]),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The I8042_STR_* and I8042_CMD_* values of Linux's i8042.h, to drive
    /// the model the way the driver does.
    const OBF: u8 = 0x01;
    const IBF: u8 = 0x02;
    const KEYLOCK: u8 = 0x10;
    const AUXDATA: u8 = 0x20;
    const TIMEOUT: u8 = 0x40;

    struct Guest {
        data_port: I8042Port,
        command_port: I8042Port,
        reset: Rc<Cell<bool>>,
        /// Every level change: (irq, level).
        irqs: Rc<RefCell<Vec<(u8, bool)>>>,
    }

    impl Guest {
        fn new() -> Self {
            let reset = Rc::new(Cell::new(false));
            let irqs = Rc::new(RefCell::new(Vec::new()));
            let log = irqs.clone();
            let controller = I8042::new(reset.clone(), move |irq, level| log.borrow_mut().push((irq, level)));
            let controller = Rc::new(RefCell::new(controller));
            Self {
                data_port: I8042Port::data(controller.clone()),
                command_port: I8042Port::command(controller),
                reset,
                irqs,
            }
        }

        fn status(&mut self) -> u8 {
            let mut data = [0];
            self.command_port.read(0, &mut data);
            data[0]
        }

        fn read_data(&mut self) -> u8 {
            let mut data = [0];
            self.data_port.read(0, &mut data);
            data[0]
        }

        fn write_data(&mut self, value: u8) {
            assert_eq!(self.status() & IBF, 0, "the input buffer is never full");
            self.data_port.write(0, &[value]);
        }

        /// Linux's `__i8042_command`: the command, its parameter, then
        /// its results, each waited for through the status register (here
        /// it must already be there: no waiting).
        fn command(&mut self, command: u8, param: Option<u8>, results: usize) -> Vec<u8> {
            assert_eq!(self.status() & IBF, 0);
            self.command_port.write(0, &[command]);
            if let Some(param) = param {
                self.write_data(param);
            }
            (0..results)
                .map(|_| {
                    assert_ne!(self.status() & OBF, 0, "command {command:#x}: a result is waiting");
                    self.read_data()
                })
                .collect()
        }

        /// Linux's `i8042_flush`: bytes read until the buffer is empty.
        fn flush(&mut self) -> usize {
            let mut count = 0;
            while self.status() & OBF != 0 {
                self.read_data();
                count += 1;
                assert!(count <= 16, "i8042_flush gives up after 16 bytes");
            }
            count
        }

        fn ctr(&mut self) -> u8 {
            self.command(0x20, None, 1)[0]
        }

        fn irqs(&self) -> Vec<(u8, bool)> {
            self.irqs.borrow_mut().drain(..).collect()
        }
    }

    #[test]
    fn after_power_on_the_controller_is_empty_unlocked_and_not_self_tested() {
        let mut guest = Guest::new();
        let status = guest.status();
        assert_eq!(status & OBF, 0, "i8042_controller_check: no stale byte");
        assert_ne!(status & KEYLOCK, 0, "no 'Keylock active' warning");
        assert_eq!(status & STATUS_SYS, 0);
        assert_eq!(guest.flush(), 0);
    }

    #[test]
    fn self_test_answers_0x55_and_sets_the_system_flag() {
        let mut guest = Guest::new();
        assert_eq!(guest.command(0xaa, None, 1), [0x55]);
        assert_ne!(guest.status() & STATUS_SYS, 0);
        assert_ne!(guest.ctr() & CTR_SYS, 0, "the flag is the command byte's");
        assert_eq!(guest.command(0xab, None, 1), [0x00]);
        assert_eq!(guest.command(0xa9, None, 1), [0x00]);
        assert_eq!(guest.status() & OBF, 0);
    }

    #[test]
    fn the_command_byte_reads_back_stably_and_takes_writes() {
        let mut guest = Guest::new();
        let ctr = guest.ctr();
        assert_eq!(guest.ctr(), ctr, "i8042_controller_init wants two equal reads");
        assert_eq!(ctr, CTR_KBDINT | CTR_AUXINT);
        let ctr = (ctr | CTR_KBDDIS) & !CTR_KBDINT;
        guest.command(0x60, Some(ctr), 0);
        assert_eq!(guest.ctr(), ctr);
        assert_eq!(guest.status() & STATUS_CMD, STATUS_CMD);
        // Another RAM byte.
        guest.command(0x65, Some(0x42), 0);
        assert_eq!(guest.command(0x25, None, 1), [0x42]);
    }

    #[test]
    fn ports_are_disabled_and_enabled_in_the_command_byte() {
        let mut guest = Guest::new();
        guest.command(0xa7, None, 0);
        guest.command(0xad, None, 0);
        assert_eq!(guest.ctr() & (CTR_AUXDIS | CTR_KBDDIS), CTR_AUXDIS | CTR_KBDDIS);
        guest.command(0xa8, None, 0);
        assert_eq!(guest.ctr() & (CTR_AUXDIS | CTR_KBDDIS), CTR_KBDDIS);
        guest.command(0xae, None, 0);
        assert_eq!(guest.ctr() & (CTR_AUXDIS | CTR_KBDDIS), 0);
    }

    /// i8042_check_aux up to its IRQ test: loopback, then the bit test.
    #[test]
    fn the_aux_loopback_and_toggle_tests_pass() {
        let mut guest = Guest::new();
        assert_eq!(guest.command(0xd3, Some(0x5a), 0), []);
        assert_eq!(guest.status() & (OBF | AUXDATA), OBF | AUXDATA);
        assert_eq!(guest.read_data(), 0x5a);
        guest.command(0xa7, None, 0);
        assert_ne!(guest.ctr() & CTR_AUXDIS, 0);
        guest.command(0xa8, None, 0);
        assert_eq!(guest.ctr() & CTR_AUXDIS, 0);
    }

    /// The looped byte raises IRQ 12 when the command byte enables it (the
    /// delivery test of i8042_check_aux), and IRQ 12 drops when it is read.
    #[test]
    fn looped_aux_bytes_raise_irq12_and_controller_replies_irq1() {
        let mut guest = Guest::new();
        guest.command(0x60, Some(CTR_AUXINT), 0);
        guest.irqs();
        guest.command(0xd3, Some(0xa5), 0);
        assert_eq!(guest.irqs(), [(AUX_IRQ, true)]);
        assert_eq!(guest.read_data(), 0xa5);
        assert_eq!(guest.irqs(), [(AUX_IRQ, false)]);

        // With keyboard interrupts disabled, a reply raises nothing.
        assert_eq!(guest.ctr(), CTR_AUXINT);
        assert_eq!(guest.irqs(), []);
        guest.command(0x60, Some(CTR_KBDINT), 0);
        guest.command(0xd2, Some(0x12), 0);
        assert_eq!(guest.irqs(), [(KEYBOARD_IRQ, true)]);
        assert_eq!(guest.read_data(), 0x12);
        assert_eq!(guest.irqs(), [(KEYBOARD_IRQ, false)]);
    }

    #[test]
    fn enabling_the_interrupt_with_a_byte_waiting_raises_the_line() {
        let mut guest = Guest::new();
        guest.command(0x60, Some(0), 0);
        guest.command(0xd3, Some(0x01), 0);
        assert_eq!(guest.irqs(), []);
        guest.command(0x60, Some(CTR_AUXINT), 0);
        assert_eq!(guest.status() & OBF, OBF);
        assert_eq!(guest.irqs(), [(AUX_IRQ, true)]);
    }

    #[test]
    fn each_queued_byte_is_a_new_edge() {
        let mut guest = Guest::new();
        guest.command(0xd2, Some(0x01), 0);
        guest.command(0xd2, Some(0x02), 0);
        assert_eq!(guest.irqs(), [(KEYBOARD_IRQ, true)]);
        assert_eq!(guest.read_data(), 0x01);
        assert_eq!(guest.irqs(), [(KEYBOARD_IRQ, false), (KEYBOARD_IRQ, true)]);
        assert_eq!(guest.read_data(), 0x02);
        assert_eq!(guest.irqs(), [(KEYBOARD_IRQ, false)]);
        assert_eq!(guest.read_data(), 0x02, "an empty buffer reads the last byte");
        assert_eq!(guest.irqs(), []);
    }

    /// atkbd's GET ID gets a NAK with the timeout bit, at once.
    #[test]
    fn bytes_for_the_absent_keyboard_time_out_with_0xfe() {
        let mut guest = Guest::new();
        guest.command(0xad, None, 0);
        guest.write_data(0xf2);
        assert_eq!(guest.status() & (OBF | AUXDATA | TIMEOUT), OBF | TIMEOUT);
        assert_eq!(guest.read_data(), 0xfe);
        assert_eq!(guest.status() & (OBF | TIMEOUT), 0);
        assert_eq!(guest.ctr() & CTR_KBDDIS, 0, "sending to the keyboard enables its port");
    }

    #[test]
    fn bytes_for_the_absent_mouse_time_out_with_0xfe() {
        let mut guest = Guest::new();
        guest.command(0xa7, None, 0);
        guest.command(0xd4, Some(0xff), 0);
        assert_eq!(guest.status() & (OBF | AUXDATA | TIMEOUT), OBF | AUXDATA | TIMEOUT);
        assert_eq!(guest.read_data(), 0xfe);
        assert_eq!(guest.ctr() & CTR_AUXDIS, 0);
    }

    /// Linux's probe, i8042_check_aux without the IRQ wait, and atkbd's
    /// first commands: every step answered, nothing left to time out.
    #[test]
    fn linux_probe_sequence() {
        let mut guest = Guest::new();
        assert_eq!(guest.flush(), 0);
        // i8042_platform_init: A20 on, the SMM null command.
        guest.command(0xd1, Some(0xdf), 0);
        guest.command(0xff, None, 0);
        assert!(!guest.reset.get());
        // i8042_controller_init.
        let ctr = guest.ctr();
        assert_eq!(guest.ctr(), ctr);
        assert_ne!(guest.status() & KEYLOCK, 0);
        let mut ctr = (ctr | CTR_KBDDIS) & !CTR_KBDINT;
        guest.command(0x60, Some(ctr), 0);
        assert_eq!(guest.flush(), 0);
        // i8042_check_aux.
        assert_eq!(guest.command(0xd3, Some(0x5a), 1), [0x5a]);
        guest.command(0xa7, None, 0);
        assert_ne!(guest.ctr() & CTR_AUXDIS, 0);
        guest.command(0xa8, None, 0);
        assert_eq!(guest.ctr() & CTR_AUXDIS, 0);
        ctr = (ctr & !CTR_AUXDIS) | CTR_AUXINT;
        guest.command(0x60, Some(ctr), 0);
        guest.irqs();
        guest.command(0xd3, Some(0xa5), 0);
        assert_eq!(guest.irqs(), [(AUX_IRQ, true)], "the IRQ 12 delivery test");
        assert_eq!(guest.status() & (OBF | AUXDATA), OBF | AUXDATA);
        assert_eq!(guest.read_data(), 0xa5);
        // i8042_setup_kbd then atkbd: GET ID is NAKed, as is its retry.
        ctr = (ctr & !CTR_KBDDIS) | CTR_KBDINT;
        guest.command(0x60, Some(ctr), 0);
        for _ in 0..2 {
            guest.write_data(0xf2);
            assert_eq!(guest.irqs().last(), Some(&(KEYBOARD_IRQ, true)));
            assert_eq!(guest.status() & TIMEOUT, TIMEOUT);
            assert_eq!(guest.read_data(), 0xfe);
        }
        assert_eq!(guest.flush(), 0);
    }

    #[test]
    fn command_0xfe_pulses_reset() {
        let mut guest = Guest::new();
        guest.command(0xfe, None, 0);
        assert!(guest.reset.get());
    }

    #[test]
    fn other_pulses_leave_reset_alone() {
        let mut guest = Guest::new();
        guest.command(0xff, None, 0);
        guest.command(0xf1, None, 0);
        assert!(!guest.reset.get());
        guest.command(0xf0, None, 0);
        assert!(guest.reset.get(), "bit 0 clear pulses reset");
    }

    #[test]
    fn writing_the_output_port_reset_bit_low_resets() {
        let mut guest = Guest::new();
        guest.command(0xd1, Some(0xdf), 0);
        assert!(!guest.reset.get());
        assert_eq!(guest.command(0xd0, None, 1)[0] & 0x03, 0x03);
        guest.command(0xd1, Some(0xde), 0);
        assert!(guest.reset.get());
    }

    #[test]
    fn a_command_cancels_a_pending_parameter() {
        let mut guest = Guest::new();
        guest.command_port.write(0, &[0x60]);
        assert_eq!(guest.command(0x20, None, 1), [CTR_POWER_ON]);
        guest.write_data(0x00);
        assert_eq!(guest.status() & TIMEOUT, TIMEOUT, "the byte went to the keyboard");
        assert_eq!(guest.flush(), 1);
        assert_eq!(guest.ctr(), CTR_POWER_ON);
    }

    #[test]
    fn unknown_commands_are_ignored() {
        let mut guest = Guest::new();
        guest.command(0xc0, None, 0);
        guest.command(0x00, None, 0);
        assert_eq!(guest.status() & OBF, 0);
    }

    #[test]
    fn the_queue_is_bounded_below_linuxs_flush_limit() {
        let mut guest = Guest::new();
        for i in 0..20 {
            guest.command(0xd2, Some(i), 0);
        }
        assert_eq!(guest.flush(), QUEUE_LEN);
    }
}
