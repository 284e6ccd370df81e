//! The runtime's subroutines, emitted once after the checks: serial
//! output, the check reports, the end of the run, and the exception
//! handlers. Each preserves every register unless it says otherwise.

use super::runtime::{Kernel, Routines, ERROR_CODE_VECTORS, EXCEPTION_VECTORS, NO_EXCEPTION, R};
use crate::{DEBUG_EXIT_PORT, SERIAL_PORT};
use iced_x86::code_asm::*;

/// How many times `putc` polls LSR.THRE before writing anyway: a UART
/// model that never reports an empty transmitter must not hang the test.
const LSR_POLL_LIMIT: u32 = 100_000;
/// 16550 line status register and its "transmitter holding register
/// empty" bit.
const LSR: u32 = SERIAL_PORT as u32 + 5;
const LSR_THRE: u32 = 1 << 5;

impl Kernel<'_> {
    /// Emits every subroutine; called once, after the code that calls them.
    pub fn routines(&mut self) -> R {
        self.emit_print_routines()?;
        self.emit_check_routines()?;
        self.emit_finish()?;
        self.emit_exception_handlers()
    }

    /// Places `label` (a copy of a routine's label: calls to it find it
    /// by id) on the next instruction.
    fn start(&mut self, label: CodeLabel) -> R {
        let mut l = label;
        self.a.set_label(&mut l)
    }

    fn emit_print_routines(&mut self) -> R {
        let Routines { putc, print_str, print_hex, print_dec, print_value, print_exc, print_ok, print_fail, .. } =
            self.rt;

        // putc: writes AL to COM1's THR once the transmitter is empty.
        self.start(putc)?;
        let mut ready = self.a.create_label();
        self.a.push(ecx)?;
        self.a.push(edx)?;
        self.a.push(eax)?;
        self.a.mov(ecx, LSR_POLL_LIMIT)?;
        self.a.mov(edx, LSR)?;
        let poll = self.here()?;
        self.a.in_(al, dx)?;
        self.a.test(al, LSR_THRE)?;
        self.a.jnz(ready)?;
        self.a.dec(ecx)?;
        self.a.jnz(poll)?;
        self.a.set_label(&mut ready)?;
        self.a.pop(eax)?;
        self.a.mov(edx, u32::from(SERIAL_PORT))?;
        self.a.out(dx, al)?;
        self.a.pop(edx)?;
        self.a.pop(ecx)?;
        self.a.ret()?;

        // print_str: prints the NUL-terminated string at ESI.
        self.start(print_str)?;
        let mut done = self.a.create_label();
        self.a.push(esi)?;
        self.a.push(eax)?;
        let next = self.here()?;
        self.a.lodsb()?;
        self.a.test(al, al)?;
        self.a.jz(done)?;
        self.a.call(putc)?;
        self.a.jmp(next)?;
        self.a.set_label(&mut done)?;
        self.a.pop(eax)?;
        self.a.pop(esi)?;
        self.a.ret()?;

        // print_hex: prints the low ECX (1-8) hex digits of EAX, no prefix.
        self.start(print_hex)?;
        let mut put = self.a.create_label();
        self.a.pushad()?;
        self.a.mov(ebx, eax)?;
        self.a.mov(edx, ecx)?;
        // Rotate the first digit wanted into the top nibble.
        self.a.mov(ecx, 8u32)?;
        self.a.sub(ecx, edx)?;
        self.a.shl(ecx, 2u32)?;
        self.a.rol(ebx, cl)?;
        self.a.mov(ecx, edx)?;
        let digit = self.here()?;
        self.a.rol(ebx, 4u32)?;
        self.a.mov(eax, ebx)?;
        self.a.and(eax, 0xfu32)?;
        self.a.add(al, u32::from(b'0'))?;
        self.a.cmp(al, u32::from(b'9'))?;
        self.a.jbe(put)?;
        self.a.add(al, u32::from(b'a' - b'9' - 1))?;
        self.a.set_label(&mut put)?;
        self.a.call(putc)?;
        self.a.dec(ecx)?;
        self.a.jnz(digit)?;
        self.a.popad()?;
        self.a.ret()?;

        // print_dec: prints EAX in decimal.
        self.start(print_dec)?;
        self.a.pushad()?;
        self.a.mov(ebx, 10u32)?;
        self.a.xor(ecx, ecx)?;
        let divide = self.here()?;
        self.a.xor(edx, edx)?;
        self.a.div(ebx)?;
        self.a.push(edx)?;
        self.a.inc(ecx)?;
        self.a.test(eax, eax)?;
        self.a.jnz(divide)?;
        let emit = self.here()?;
        self.a.pop(eax)?;
        self.a.add(al, u32::from(b'0'))?;
        self.a.call(putc)?;
        self.a.dec(ecx)?;
        self.a.jnz(emit)?;
        self.a.popad()?;
        self.a.ret()?;

        // print_value: prints EDX:EAX as "0x" and EDI (8 or 16) digits.
        self.start(print_value)?;
        let mut low = self.a.create_label();
        self.a.pushad()?;
        self.print("0x")?;
        self.a.mov(ecx, 8u32)?;
        self.a.cmp(edi, 16u32)?;
        self.a.jne(low)?;
        self.a.push(eax)?;
        self.a.mov(eax, edx)?;
        self.a.call(print_hex)?;
        self.a.pop(eax)?;
        self.a.set_label(&mut low)?;
        self.a.call(print_hex)?;
        self.a.popad()?;
        self.a.ret()?;

        // print_exc: prints EAX (vector) and EDX (error code) as
        // "vector 0xVV error 0xEEEE" (8 digits if the code needs them), or
        // "no exception".
        self.start(print_exc)?;
        let mut some = self.a.create_label();
        let mut narrow = self.a.create_label();
        let mut done = self.a.create_label();
        self.a.pushad()?;
        self.a.cmp(eax, NO_EXCEPTION)?;
        self.a.jne(some)?;
        self.print("no exception")?;
        self.a.jmp(done)?;
        self.a.set_label(&mut some)?;
        self.print("vector 0x")?;
        self.a.mov(ecx, 2u32)?;
        self.a.call(print_hex)?;
        self.print(" error 0x")?;
        self.a.mov(eax, edx)?;
        self.a.mov(ecx, 4u32)?;
        self.a.cmp(eax, 0xffffu32)?;
        self.a.jbe(narrow)?;
        self.a.mov(ecx, 8u32)?;
        self.a.set_label(&mut narrow)?;
        self.a.call(print_hex)?;
        self.a.set_label(&mut done)?;
        self.a.popad()?;
        self.a.ret()?;

        // print_ok: "ok NAME\n" for the name at ESI.
        self.start(print_ok)?;
        self.print("ok ")?;
        self.a.call(print_str)?;
        self.print("\n")?;
        self.a.ret()?;

        // print_fail: counts a failure and prints "FAIL NAME"; the caller
        // ends the line.
        self.start(print_fail)?;
        self.a.inc(dword_ptr(self.lay.fail_count))?;
        self.print("FAIL ")?;
        self.a.call(print_str)?;
        self.a.ret()
    }

    /// The head of `check_bool` and `check_value`: an exception recorded
    /// since the last guard fails the check, whatever the values say.
    fn emit_report_pending(&mut self, done: CodeLabel) -> R {
        let mut none = self.a.create_label();
        self.a.cmp(dword_ptr(self.lay.exc_vector), NO_EXCEPTION)?;
        self.a.je(none)?;
        self.a.call(self.rt.print_fail)?;
        self.print(": unexpected ")?;
        self.a.mov(eax, dword_ptr(self.lay.exc_vector))?;
        self.a.mov(edx, dword_ptr(self.lay.exc_error))?;
        self.a.call(self.rt.print_exc)?;
        self.print("\n")?;
        self.a.jmp(done)?;
        self.a.set_label(&mut none)
    }

    /// The tail of every check: the recorded exception is consumed.
    fn emit_check_done(&mut self, mut done: CodeLabel) -> R {
        self.a.set_label(&mut done)?;
        self.a.mov(dword_ptr(self.lay.exc_vector), NO_EXCEPTION)?;
        self.a.popad()?;
        self.a.ret()
    }

    fn emit_check_routines(&mut self) -> R {
        let rt_print_ok = self.rt.print_ok;
        let rt_print_fail = self.rt.print_fail;
        let rt_print_value = self.rt.print_value;
        let rt_print_exc = self.rt.print_exc;

        // check_bool: ESI = name, EAX = 0 for a failure.
        let done = self.a.create_label();
        let mut failed = self.a.create_label();
        self.start(self.rt.check_bool)?;
        self.a.pushad()?;
        self.emit_report_pending(done)?;
        self.a.test(eax, eax)?;
        self.a.jz(failed)?;
        self.a.call(rt_print_ok)?;
        self.a.jmp(done)?;
        self.a.set_label(&mut failed)?;
        self.a.call(rt_print_fail)?;
        self.print("\n")?;
        self.emit_check_done(done)?;

        // check_value: ESI = name, EDX:EAX = got, ECX:EBX = expected,
        // EDI = digits to print.
        let done = self.a.create_label();
        let mut failed = self.a.create_label();
        self.start(self.rt.check_value)?;
        self.a.pushad()?;
        self.emit_report_pending(done)?;
        self.a.cmp(eax, ebx)?;
        self.a.jne(failed)?;
        self.a.cmp(edx, ecx)?;
        self.a.jne(failed)?;
        self.a.call(rt_print_ok)?;
        self.a.jmp(done)?;
        self.a.set_label(&mut failed)?;
        self.a.call(rt_print_fail)?;
        self.print(": got ")?;
        self.a.call(rt_print_value)?;
        self.print(" expected ")?;
        self.a.mov(eax, ebx)?;
        self.a.mov(edx, ecx)?;
        self.a.call(rt_print_value)?;
        self.print("\n")?;
        self.emit_check_done(done)?;

        // check_exc: ESI = name, EAX = expected vector (or NO_EXCEPTION),
        // EDX = expected error code, ECX = expected EIP (0: any).
        let done = self.a.create_label();
        let mut ok = self.a.create_label();
        let mut mismatch = self.a.create_label();
        let mut wrong_eip = self.a.create_label();
        let lay = &self.lay;
        let (exc_vector, exc_error, exc_eip) = (lay.exc_vector, lay.exc_error, lay.exc_eip);
        self.start(self.rt.check_exc)?;
        self.a.pushad()?;
        self.a.cmp(eax, dword_ptr(exc_vector))?;
        self.a.jne(mismatch)?;
        self.a.cmp(eax, NO_EXCEPTION)?;
        self.a.je(ok)?;
        self.a.cmp(edx, dword_ptr(exc_error))?;
        self.a.jne(mismatch)?;
        self.a.test(ecx, ecx)?;
        self.a.jz(ok)?;
        self.a.cmp(ecx, dword_ptr(exc_eip))?;
        self.a.jne(wrong_eip)?;
        self.a.set_label(&mut ok)?;
        self.a.call(rt_print_ok)?;
        self.a.jmp(done)?;
        self.a.set_label(&mut mismatch)?;
        self.a.call(rt_print_fail)?;
        self.print(": got ")?;
        self.a.push(eax)?;
        self.a.push(edx)?;
        self.a.mov(eax, dword_ptr(exc_vector))?;
        self.a.mov(edx, dword_ptr(exc_error))?;
        self.a.call(rt_print_exc)?;
        self.a.pop(edx)?;
        self.a.pop(eax)?;
        self.print(" expected ")?;
        self.a.call(rt_print_exc)?;
        self.print("\n")?;
        self.a.jmp(done)?;
        self.a.set_label(&mut wrong_eip)?;
        self.a.call(rt_print_fail)?;
        self.print(": eip ")?;
        self.a.mov(eax, dword_ptr(exc_eip))?;
        self.a.xor(edx, edx)?;
        self.a.mov(edi, 8u32)?;
        self.a.call(rt_print_value)?;
        self.print(" expected ")?;
        self.a.mov(eax, ecx)?;
        self.a.call(rt_print_value)?;
        self.print("\n")?;
        self.emit_check_done(done)?;

        // fail_msg: ESI = name, EDI = reason: "FAIL NAME: REASON".
        self.start(self.rt.fail_msg)?;
        self.a.pushad()?;
        self.a.call(rt_print_fail)?;
        self.print(": ")?;
        self.a.mov(esi, edi)?;
        self.a.call(self.rt.print_str)?;
        self.print("\n")?;
        self.a.popad()?;
        self.a.ret()
    }

    /// finish: the summary line, then the failure count to isa-debug-exit
    /// (the VMM exits with (count << 1) | 1). HLT with IF clear stops a VMM
    /// without that device.
    fn emit_finish(&mut self) -> R {
        self.start(self.rt.finish)?;
        self.print("mbtest: ")?;
        self.a.mov(eax, dword_ptr(self.lay.fail_count))?;
        self.a.call(self.rt.print_dec)?;
        self.print(" failures\n")?;
        self.a.mov(eax, dword_ptr(self.lay.fail_count))?;
        self.a.mov(edx, u32::from(DEBUG_EXIT_PORT))?;
        self.a.out(dx, eax)?;
        self.a.cli()?;
        let halt = self.here()?;
        self.a.hlt()?;
        self.a.jmp(halt)
    }

    /// One stub per vector makes the frame uniform (vector, error code,
    /// EIP, CS, EFLAGS) for the common handler, which records the first
    /// three and resumes at the armed recovery point, or, with none armed,
    /// reports the exception and ends the run.
    fn emit_exception_handlers(&mut self) -> R {
        for vector in 0..EXCEPTION_VECTORS {
            let stub = self.rt.stubs[vector as usize];
            self.place(stub)?;
            if !ERROR_CODE_VECTORS.contains(&vector) {
                self.a.push(0u32)?;
            }
            self.a.push(vector)?;
            self.a.jmp(self.rt.exception_common)?;
        }

        let lay = &self.lay;
        let (exc_vector, exc_error, exc_eip) = (lay.exc_vector, lay.exc_error, lay.exc_eip);
        let (recover_eip, recover_esp, stack_top) = (lay.recover_eip, lay.recover_esp, lay.stack_top);
        let mut fatal = self.a.create_label();
        self.start(self.rt.exception_common)?;
        self.a.pop(dword_ptr(exc_vector))?;
        self.a.pop(dword_ptr(exc_error))?;
        self.a.pop(dword_ptr(exc_eip))?;
        self.a.cmp(dword_ptr(recover_eip), 0u32)?;
        self.a.je(fatal)?;
        self.a.mov(esp, dword_ptr(recover_esp))?;
        self.a.jmp(dword_ptr(recover_eip))?;

        self.a.set_label(&mut fatal)?;
        self.a.mov(esp, stack_top)?; // the old stack may be what faulted
        let name = self.string("unexpected-exception");
        self.a.mov(esi, name)?;
        self.a.call(self.rt.print_fail)?;
        self.print(": ")?;
        self.a.mov(eax, dword_ptr(exc_vector))?;
        self.a.mov(edx, dword_ptr(exc_error))?;
        self.a.call(self.rt.print_exc)?;
        self.print(" eip ")?;
        self.a.mov(eax, dword_ptr(exc_eip))?;
        self.a.xor(edx, edx)?;
        self.a.mov(edi, 8u32)?;
        self.a.call(self.rt.print_value)?;
        self.print("\n")?;
        self.a.jmp(self.rt.finish)
    }
}
