//! The test kernel's runtime: memory layout, entry, descriptor tables,
//! exception recovery, and the inline side of reporting (the subroutines
//! themselves are in `routines.rs`).
//!
//! Every subroutine preserves all registers unless it says otherwise, so a
//! check can be dropped between any two instructions. Output is one line
//! per check:
//!
//! ```text
//! ok NAME
//! FAIL NAME
//! FAIL NAME: got 0x... expected 0x...
//! FAIL NAME: got vector 0x0d error 0x0000 expected no exception
//! FAIL NAME: unexpected vector 0x06 error 0x0000
//! ```
//!
//! Nothing printed may depend on the host: CPUID leaves, TSC values and
//! addresses the VMM chooses are only ever compared. What a failure prints
//! is architectural (reset values, vectors, error codes) or fixed by the
//! kernel's own layout, so runs on two VMMs compare line for line.

use super::builder::{align_up, Sym, Symbols};
use iced_x86::code_asm::*;

/// `exc_vector` when no exception was recorded.
pub const NO_EXCEPTION: u32 = 0xffff_ffff;
/// The kernel's own flat segments (SDM Vol. 3A, 3.4.5 "Segment
/// Descriptors": base 0, limit 0xfffff in 4 KiB units, 32-bit).
pub const CODE_SELECTOR: u16 = 0x08;
pub const DATA_SELECTOR: u16 = 0x10;
const GDT: [u64; 3] = [
    0,
    0x00cf_9a00_0000_ffff, // present, DPL 0, execute/read code, G, D
    0x00cf_9200_0000_ffff, // present, DPL 0, read/write data, G, B
];
/// Exceptions with a handler: the architecturally defined ones (SDM Vol.
/// 3A, Table 6-1 "Protected-Mode Exceptions and Interrupts").
pub const EXCEPTION_VECTORS: u32 = 32;
/// Vectors for which the CPU pushes an error code (SDM Vol. 3A, Table 6-1
/// and 6.13 "Error Code"); the others' stubs push a 0 in its place.
pub const ERROR_CODE_VECTORS: [u32; 8] = [8, 10, 11, 12, 13, 14, 17, 21];
/// Byte 5 of a 32-bit interrupt gate: present, DPL 0, type 0b1110 (SDM
/// Vol. 3A, Figure 6-2 "IDT Gate Descriptors"). An interrupt gate clears
/// IF, which is clear anyway: the kernel never enables interrupts.
const INTERRUPT_GATE: u32 = 0x8e00;
/// The identity map built for the paging checks covers this much.
pub const MAPPED: u32 = 16 << 20;
const PAGE: u32 = 0x1000;
const STACK_SIZE: u32 = 0x4000;

/// Where everything after the loaded file lives: the bss, page-aligned
/// where the hardware wants it. A pure function of where the file ends,
/// so the ELF writer can recompute its size.
pub struct Layout {
    pub bss_start: u32,
    pub page_dir: u32,
    /// `MAPPED / 4 MiB` page tables, one after the other.
    pub page_tables: u32,
    /// The page the paging checks leave unmapped: part of the kernel's
    /// own bss, so nothing else can be there.
    pub hole: u32,
    pub fail_count: u32,
    pub mb_magic: u32,
    pub mb_info: u32,
    /// 1 if the bss was all zeros at entry.
    pub bss_ok: u32,
    /// The last exception: vector ([`NO_EXCEPTION`] if none), error code
    /// (0 for vectors without one) and EIP.
    pub exc_vector: u32,
    pub exc_error: u32,
    pub exc_eip: u32,
    /// Where the exception handler resumes (0: nowhere, the exception is
    /// fatal) and with which ESP.
    pub recover_eip: u32,
    pub recover_esp: u32,
    /// The RAM size parsed from the command line (0 if it did not parse).
    pub mem_expected: u32,
    /// Scratch: 16 bytes for saved and read-back MSR values, TSC samples.
    pub scratch: u32,
    pub x87_save: u32,
    pub fcw_save: u32,
    pub mxcsr_save: u32,
    pub xmm_save: u32,
    pub ymm_save: u32,
    pub stack_top: u32,
    pub bss_end: u32,
}

impl Layout {
    pub fn new(bss_start: u32) -> Layout {
        let mut at = align_up(bss_start, PAGE);
        let mut take = |size: u32, align: u32| {
            at = align_up(at, align);
            at += size;
            at - size
        };
        let page_dir = take(PAGE, PAGE);
        let page_tables = take(MAPPED / (4 << 20) * PAGE, PAGE);
        let hole = take(PAGE, PAGE);
        let mut var = || take(4, 4);
        let (fail_count, mb_magic, mb_info, bss_ok) = (var(), var(), var(), var());
        let (exc_vector, exc_error, exc_eip) = (var(), var(), var());
        let (recover_eip, recover_esp, mem_expected) = (var(), var(), var());
        let (fcw_save, mxcsr_save) = (var(), var());
        let scratch = take(16, 16);
        let x87_save = take(16, 16);
        let xmm_save = take(8 * 16, 32);
        let ymm_save = take(8 * 32, 32);
        let stack_top = take(STACK_SIZE, 16) + STACK_SIZE;
        Layout {
            bss_start,
            page_dir,
            page_tables,
            hole,
            fail_count,
            mb_magic,
            mb_info,
            bss_ok,
            exc_vector,
            exc_error,
            exc_eip,
            recover_eip,
            recover_esp,
            mem_expected,
            scratch,
            x87_save,
            fcw_save,
            mxcsr_save,
            xmm_save,
            ymm_save,
            stack_top,
            bss_end: stack_top,
        }
    }
}

/// Where the EIP an exception records must point (SDM Vol. 3A, 6.5
/// "Exception Classifications"): at the instruction for a fault, after it
/// for a trap.
pub enum Eip {
    Fault,
    Trap,
}

/// The subroutines, called by label.
pub struct Routines {
    pub putc: CodeLabel,
    pub print_str: CodeLabel,
    pub print_hex: CodeLabel,
    pub print_dec: CodeLabel,
    pub print_value: CodeLabel,
    pub print_exc: CodeLabel,
    pub print_ok: CodeLabel,
    pub print_fail: CodeLabel,
    pub check_bool: CodeLabel,
    pub check_value: CodeLabel,
    pub check_exc: CodeLabel,
    pub fail_msg: CodeLabel,
    pub finish: CodeLabel,
    pub exception_common: CodeLabel,
    pub stubs: Vec<Sym>,
}

/// One assembly pass of the kernel: the assembler, the symbols, the layout
/// and the runtime's entry points.
pub struct Kernel<'p> {
    pub a: &'p mut CodeAssembler,
    s: &'p mut Symbols,
    pub lay: Layout,
    pub rt: Routines,
}

/// What every emitting function returns.
pub type R = Result<(), IcedError>;

impl<'p> Kernel<'p> {
    pub fn new(a: &'p mut CodeAssembler, s: &'p mut Symbols) -> Self {
        let lay = Layout::new(s.image_end());
        let stubs = (0..EXCEPTION_VECTORS).map(|_| s.create(a)).collect();
        let rt = Routines {
            putc: a.create_label(),
            print_str: a.create_label(),
            print_hex: a.create_label(),
            print_dec: a.create_label(),
            print_value: a.create_label(),
            print_exc: a.create_label(),
            print_ok: a.create_label(),
            print_fail: a.create_label(),
            check_bool: a.create_label(),
            check_value: a.create_label(),
            check_exc: a.create_label(),
            fail_msg: a.create_label(),
            finish: a.create_label(),
            exception_common: a.create_label(),
            stubs,
        };
        Kernel { a, s, lay, rt }
    }

    // Symbols and data.

    pub fn sym(&mut self) -> Sym {
        self.s.create(self.a)
    }

    pub fn place(&mut self, sym: Sym) -> R {
        self.s.place(self.a, sym)
    }

    pub fn addr(&self, sym: Sym) -> u32 {
        self.s.addr(sym)
    }

    pub fn data(&mut self, align: u32, bytes: &[u8]) -> u32 {
        self.s.data(align, bytes)
    }

    pub fn string(&mut self, text: &str) -> u32 {
        self.s.string(text)
    }

    /// Marks the next instruction with a fresh label (for loops).
    pub fn here(&mut self) -> Result<CodeLabel, IcedError> {
        let mut l = self.a.create_label();
        self.a.set_label(&mut l)?;
        Ok(l)
    }

    // Output and checks, emitted inline.

    /// Prints `text`.
    pub fn print(&mut self, text: &str) -> R {
        let s = self.string(text);
        self.a.push(esi)?;
        self.a.mov(esi, s)?;
        self.a.call(self.rt.print_str)?;
        self.a.pop(esi)
    }

    /// Reports `name`: ok if EAX is not zero.
    pub fn check_bool(&mut self, name: &str) -> R {
        let s = self.string(name);
        self.a.mov(esi, s)?;
        self.a.call(self.rt.check_bool)
    }

    /// Reports `name`: ok if EAX is `expected`.
    pub fn check32(&mut self, name: &str, expected: u32) -> R {
        self.a.xor(edx, edx)?;
        self.a.mov(ebx, expected)?;
        self.a.xor(ecx, ecx)?;
        self.check_value(name, 8)
    }

    /// Reports `name`: ok if EDX:EAX is `expected`.
    pub fn check64(&mut self, name: &str, expected: u64) -> R {
        self.a.mov(ebx, expected as u32)?;
        self.a.mov(ecx, (expected >> 32) as u32)?;
        self.check_value(name, 16)
    }

    /// Reports `name`: ok if EDX:EAX equals ECX:EBX; values print with
    /// `digits` hex digits (8 or 16).
    pub fn check_value(&mut self, name: &str, digits: u32) -> R {
        let s = self.string(name);
        self.a.mov(esi, s)?;
        self.a.mov(edi, digits)?;
        self.a.call(self.rt.check_value)
    }

    /// Reports `name` as failed because of `reason`.
    pub fn fail(&mut self, name: &str, reason: &str) -> R {
        let (s, r) = (self.string(name), self.string(reason));
        self.a.mov(esi, s)?;
        self.a.mov(edi, r)?;
        self.a.call(self.rt.fail_msg)
    }

    /// EAX = 1 if the `len` bytes at `x` and `y` are equal, else 0.
    pub fn memeq(&mut self, x: u32, y: u32, len: u32) -> R {
        self.a.mov(esi, x)?;
        self.a.mov(edi, y)?;
        self.a.mov(ecx, len)?;
        self.a.repe().cmpsb()?;
        self.a.setz(al)?;
        self.a.movzx(eax, al)
    }

    // Exceptions.

    /// Runs `body` with recovery armed: an exception in it is recorded
    /// (for the next check to report) and execution resumes after `body`
    /// with the ESP it started with. Returns the resume point.
    pub fn guarded(&mut self, body: impl FnOnce(&mut Self) -> R) -> Result<Sym, IcedError> {
        let resume = self.sym();
        self.a.mov(dword_ptr(self.lay.exc_vector), NO_EXCEPTION)?;
        self.a.mov(dword_ptr(self.lay.recover_esp), esp)?;
        self.a.mov(dword_ptr(self.lay.recover_eip), self.addr(resume))?;
        body(self)?;
        self.place(resume)?;
        self.a.mov(dword_ptr(self.lay.recover_eip), 0u32)?;
        Ok(resume)
    }

    /// Runs `body` guarded and forgets any exception: for putting state
    /// back after a check, where a failure has been reported already.
    pub fn guarded_quiet(&mut self, body: impl FnOnce(&mut Self) -> R) -> R {
        self.guarded(body)?;
        self.a.mov(dword_ptr(self.lay.exc_vector), NO_EXCEPTION)
    }

    /// Runs `setup` then `insn` guarded, and reports `name`: ok if `insn`
    /// raised `vector` with `error` and the EIP `eip` says.
    pub fn expect_exception(
        &mut self,
        name: &str,
        (vector, error): (u32, u32),
        eip: Eip,
        setup: impl FnOnce(&mut Self) -> R,
        insn: impl FnOnce(&mut Self) -> R,
    ) -> R {
        let site = self.sym();
        let resume = self.guarded(|k| {
            setup(k)?;
            k.place(site)?;
            insn(k)
        })?;
        let expected_eip = match eip {
            Eip::Fault => self.addr(site),
            Eip::Trap => self.addr(resume),
        };
        let s = self.string(name);
        self.a.mov(esi, s)?;
        self.a.mov(eax, vector)?;
        self.a.mov(edx, error)?;
        self.a.mov(ecx, expected_eip)?;
        self.a.call(self.rt.check_exc)
    }

    /// `#GP(0)` from `insn`, a fault.
    pub fn expect_gp0(
        &mut self,
        name: &str,
        setup: impl FnOnce(&mut Self) -> R,
        insn: impl FnOnce(&mut Self) -> R,
    ) -> R {
        self.expect_exception(name, (13, 0), Eip::Fault, setup, insn)
    }

    /// Runs `body` guarded and reports `name`: ok if nothing was raised.
    pub fn expect_no_exception(&mut self, name: &str, body: impl FnOnce(&mut Self) -> R) -> R {
        self.guarded(body)?;
        let s = self.string(name);
        self.a.mov(esi, s)?;
        self.a.mov(eax, NO_EXCEPTION)?;
        self.a.xor(edx, edx)?;
        self.a.xor(ecx, ecx)?;
        self.a.call(self.rt.check_exc)
    }

    /// Ends the run: prints the summary and exits with the failure count.
    pub fn finish(&mut self) -> R {
        self.a.jmp(self.rt.finish)
    }

    // Entry.

    /// The entry point, as Multiboot leaves the machine (Multiboot 0.6.96,
    /// 3.2 "Machine state"): EAX = 0x2BADB002, EBX = the info structure,
    /// flat 32-bit CS/DS/ES/SS, paging off, IF clear; ESP, GDTR and IDTR
    /// undefined. Checks the bss before anything writes to it, then
    /// installs a stack, the kernel's own GDT and IDT, and a known CR4.
    pub fn entry(&mut self) -> R {
        let lay = &self.lay;
        let (bss_start, bss_words) = (lay.bss_start, (lay.bss_end - lay.bss_start) / 4);
        let (bss_ok, mb_magic, mb_info, stack_top) = (lay.bss_ok, lay.mb_magic, lay.mb_info, lay.stack_top);
        let a = &mut *self.a;
        a.cld()?; // EFLAGS.DF is not specified at entry
        a.mov(esi, eax)?;
        a.mov(ebp, ebx)?;
        a.mov(edi, bss_start)?;
        a.mov(ecx, bss_words)?;
        a.xor(eax, eax)?;
        a.repe().scasd()?;
        a.setz(al)?;
        a.movzx(eax, al)?;
        a.mov(dword_ptr(bss_ok), eax)?;
        a.mov(dword_ptr(mb_magic), esi)?;
        a.mov(dword_ptr(mb_info), ebp)?;
        a.mov(esp, stack_top)?;

        let gdt: Vec<u8> = GDT.iter().flat_map(|d| d.to_le_bytes()).collect();
        let gdt = self.data(8, &gdt);
        let gdtr = self.pseudo_descriptor(GDT.len() as u32 * 8, gdt);
        let idt: Vec<u8> = self
            .rt
            .stubs
            .iter()
            .flat_map(|&stub| {
                let offset = self.s.addr(stub);
                let low = (offset & 0xffff) | u32::from(CODE_SELECTOR) << 16;
                let high = (offset & 0xffff_0000) | INTERRUPT_GATE;
                [low.to_le_bytes(), high.to_le_bytes()].concat()
            })
            .collect();
        let idt = self.data(8, &idt);
        let idtr = self.pseudo_descriptor(EXCEPTION_VECTORS * 8, idt);

        // A far jump loads CS from the new GDT (SDM Vol. 3A, 3.4.3: a
        // segment register caches its descriptor until reloaded).
        let reload = self.sym();
        self.a.lgdt(ptr(gdtr))?;
        self.a.jmp_far(CODE_SELECTOR, self.addr(reload))?;
        self.place(reload)?;
        self.a.mov(eax, u32::from(DATA_SELECTOR))?;
        for seg in [ds, es, fs, gs, ss] {
            self.a.mov(seg, ax)?;
        }
        self.a.lidt(ptr(idtr))?;
        // No PAE, PSE, SMEP or OSFXSR until a check asks for it.
        self.a.xor(eax, eax)?;
        self.a.mov(cr4, eax)?;
        self.a.mov(dword_ptr(self.lay.fail_count), 0u32)?;
        self.a.mov(dword_ptr(self.lay.exc_vector), NO_EXCEPTION)?;
        self.a.mov(dword_ptr(self.lay.recover_eip), 0u32)?;
        self.print("mbtest: start\n")
    }

    /// A 6-byte GDTR/IDTR image: limit (size - 1), then the base.
    fn pseudo_descriptor(&mut self, size: u32, base: u32) -> u32 {
        let mut bytes = ((size - 1) as u16).to_le_bytes().to_vec();
        bytes.extend_from_slice(&base.to_le_bytes());
        self.data(2, &bytes)
    }
}
