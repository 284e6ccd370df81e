//! Guests with a fixed purpose: a VM with 2 MiB of RAM at 0 holding the
//! mode's tables and some code, and vCPUs with the supported CPUID, set to
//! start that code. The race and teardown phases use them with tiny
//! programs below; the guests phase resets one per run.
//!
//! Context: process context, the `Ctx`'s thread.

use kvm_bindings::kvm_sregs;

use crate::ctx::{Arg, Call, Ctx};
use crate::ioctl_table::{nr, FdKind};
use crate::memory::{self, Chunk};
use crate::modes::{self, layout, Mode};
use crate::objects::Vm;
use crate::scratch::{bytes_of, from_bytes};

/// `jmp $`: a guest that never exits by itself.
pub const SPIN: [u8; 2] = [0xeb, 0xfe];

/// `1: in al, 0x80; out 0x80, al; jmp 1b` (real mode): an exit every
/// instruction.
pub const IO_LOOP: [u8; 6] = [0xe4, 0x80, 0xe6, 0x80, 0xeb, 0xfa];

/// Protected mode: touches every page of 0x200000..0x300000 (read,
/// increment, write back), reports with `out 0x80, al`, and starts over:
///
/// ```text
/// 0:  mov esi, 0x200000
/// 5:  mov eax, [esi]; inc eax; mov [esi], eax
/// 10: add esi, 0x1000
/// 16: cmp esi, 0x300000
/// 22: jb 5
/// 24: out 0x80, al
/// 26: jmp 0
/// ```
pub const MEMORY_LOOP: [u8; 28] = [
    0xbe, 0x00, 0x00, 0x20, 0x00, 0x8b, 0x06, 0x40, 0x89, 0x06, 0x81, 0xc6, 0x00, 0x10, 0x00, 0x00,
    0x81, 0xfe, 0x00, 0x00, 0x30, 0x00, 0x72, 0xed, 0xe6, 0x80, 0xeb, 0xe4,
];

/// Where MEMORY_LOOP works.
pub const MEMORY_LOOP_GPA: u64 = 0x20_0000;

/// A VM set up as the module doc says.
pub struct Fixture {
    /// The VM and its vCPUs.
    pub vm: Vm,
    /// Its RAM (slot 0).
    pub ram: Chunk,
    /// A vCPU's state right after creation, for resets.
    pub reset_sregs: kvm_sregs,
}

impl Fixture {
    /// A VM running `code` in `mode` on `vcpus` vCPUs, or None if the
    /// device refused a step (counted in the tally as usual).
    pub fn new(ctx: &mut Ctx<'_>, mode: Mode, code: &[u8], vcpus: usize) -> Option<Fixture> {
        let ram = ctx.shared.arena.chunk(layout::RAM as usize).ok()?;
        let mut vm = Vm::create(ctx, ctx.shared.dev.fd())?;
        let region = kvm_bindings::kvm_userspace_memory_region {
            slot: 0,
            flags: 0,
            guest_phys_addr: 0,
            memory_size: layout::RAM,
            userspace_addr: ram.addr(),
        };
        vm.set_region(ctx, region).ok()?;
        let mut f = Fixture {
            vm,
            ram,
            reset_sregs: kvm_sregs::default(),
        };
        for i in 0..vcpus {
            let v = f.vm.add_vcpu(ctx, i as u64)?;
            let fd = f.vm.vcpus[v].raw();
            let table = ctx.shared.dev.cpuid2_bytes();
            let set = ctx.ioctl(Call::new(
                fd,
                FdKind::Vcpu,
                nr::KVM_SET_CPUID2,
                Arg::Data(&table),
            ));
            if let Err(e) = set {
                // What a VMM does first with every vCPU (api.rst 4.73).
                ctx.finding(
                    "KVM_SET_CPUID2 refused the device's own supported CPUID table",
                    || {
                        format!(
                            "{} entries, {}",
                            ctx.shared.dev.cpuid.len(),
                            crate::errno::name(e)
                        )
                    },
                );
                return None;
            }
            if i == 0 {
                ctx.ioctl(Call::new(
                    fd,
                    FdKind::Vcpu,
                    nr::KVM_GET_SREGS,
                    Arg::Data(&[]),
                ))
                .ok()?;
                f.reset_sregs = from_bytes(ctx.scratch.bytes());
            }
        }
        f.load(ctx, mode, code)?;
        for v in 0..vcpus {
            f.start(ctx, v, mode, 0, None)?;
        }
        Some(f)
    }

    /// Clears RAM and writes the tables of `mode` and `code`. With
    /// `--interrupts-on`, RAM around the tables is HLT and every handler
    /// halts (see cli.rs).
    pub fn load(&mut self, ctx: &mut Ctx<'_>, mode: Mode, code: &[u8]) -> Option<()> {
        let halting = ctx.shared.opts.interrupts_on;
        let mem = self.ram.bytes_mut()?;
        // With `--interrupts-on` all of RAM but the tables and the code is
        // HLT, below the code too: a vector read from the wrong table (the
        // IDT taken as an IVT after a switch to real mode) lands on HLT.
        // HLT bytes are also safe as table entries: 0xf4 has bit 0, the
        // present bit of a page-table entry, clear.
        let fill = if halting { crate::cli::HLT } else { 0 };
        memory::fill(mem, fill);
        modes::write_tables(mem, mode, code.len() as u64, &mut ctx.rng, halting);
        let at = layout::CODE as usize;
        let n = code.len().min(layout::CODE_MAX as usize);
        mem[at..at + n].copy_from_slice(&code[..n]);
        Some(())
    }

    /// Points vCPU `v` at offset `entry` of the code in `mode` (with
    /// `regs`, or the mode's plain registers).
    pub fn start(
        &mut self,
        ctx: &mut Ctx<'_>,
        v: usize,
        mode: Mode,
        entry: u64,
        regs: Option<kvm_bindings::kvm_regs>,
    ) -> Option<()> {
        let fd = self.vm.vcpus.get(v)?.raw();
        let s = modes::sregs(mode, &self.reset_sregs);
        ctx.ioctl(Call::new(
            fd,
            FdKind::Vcpu,
            nr::KVM_SET_SREGS,
            Arg::Data(bytes_of(&s)),
        ))
        .ok()?;
        let r = regs.unwrap_or(kvm_bindings::kvm_regs {
            rip: if mode == Mode::Real {
                entry
            } else {
                layout::CODE + entry
            },
            rsp: layout::STACK_TOP,
            rflags: crate::arch::RFLAGS_FIXED,
            ..Default::default()
        });
        ctx.ioctl(Call::new(
            fd,
            FdKind::Vcpu,
            nr::KVM_SET_REGS,
            Arg::Data(bytes_of(&r)),
        ))
        .ok()?;
        Some(())
    }
}
