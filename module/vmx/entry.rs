//! The one place with the VM-entry/VM-exit assembly (SDM Vol. 3C, 27 "VM
//! Entries" and 28 "VM Exits"), and the trampoline that hands an NMI which
//! caused a VM exit to the host's NMI handler.
//!
//! `rkvm_vmx_run(regs, launched, mitigations, host_spec_ctrl)`:
//! 1. saves the host's callee-saved registers, the `regs` pointer, the
//!    launch state and the mitigation flags on the stack, and writes the
//!    stack pointer to HOST_RSP (the VM exit restores it: SDM 28.5.1);
//! 2. loads the guest's general-purpose registers from `regs` (RSP and RIP
//!    are in the VMCS), executes VERW if asked (clears CPU buffers after the
//!    last host load, as KVM's CLEAR_CPU_BUFFERS), then VMRESUME, or
//!    VMLAUNCH the first time after VMPTRLD;
//! 3. a VM exit lands at `rkvm_vmx_exit` (HOST_RIP), with the host's RSP
//!    and the guest's registers: they are stored back into `regs` and
//!    cleared (no guest value stays in a register for speculation to use),
//!    then, before the first RET, the return stack buffer is filled, the
//!    host's SPEC_CTRL rewritten and the branch history cleared where the
//!    kernel asks for it (glue_cpu.c; KVM's vmenter.S does the same), and
//!    0 is returned;
//! 4. if the entry instruction fails instead (VMfailInvalid: CF=1,
//!    VMfailValid: ZF=1), nothing ran: 1 or 2 is returned; 3 if HOST_RSP
//!    could not be written.
//!
//! Context: interrupts disabled, preemption disabled, the vCPU's VMCS current.

use core::arch::global_asm;

/// The guest's general-purpose registers, indexed as the exit
/// qualifications number them (0 = RAX, 1 = RCX, 2 = RDX, 3 = RBX, 4 = RSP
/// (unused: in the VMCS), 5 = RBP, 6 = RSI, 7 = RDI, 8-15 = R8-R15).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct GuestRegs(pub(crate) [u64; 16]);

use crate::glue::cpu::Mitigations;

/// HOST_RSP's field encoding (SDM Vol. 3D, Appendix B.4.4).
const HOST_RSP: u32 = x86::vmx::vmcs::host::RSP;

global_asm!(
    ".pushsection .rodata",
    // VERW's operand: any writable data selector will do (KVM uses
    // __KERNEL_DS, 0x18, as does this).
    "rkvm_verw_sel:",
    ".word 0x18",
    ".popsection",
    ".pushsection .text",
    ".global rkvm_vmx_run",
    "rkvm_vmx_run:",
    "push rbp",
    "mov rbp, rsp",
    "push rbx",
    "push r12",
    "push r13",
    "push r14",
    "push r15",
    // The frame the exit path finds at HOST_RSP: [rsp] mitigations,
    // [rsp + 8] launched, [rsp + 16] regs, [rsp + 24] host SPEC_CTRL.
    "push rcx",
    "push rdi",
    "push rsi",
    "push rdx",
    "mov rax, {host_rsp}",
    "vmwrite rax, rsp",
    "jbe 3f",
    "mov rax, [rdi + 0 * 8]",
    "mov rcx, [rdi + 1 * 8]",
    "mov rdx, [rdi + 2 * 8]",
    "mov rbx, [rdi + 3 * 8]",
    "mov rbp, [rdi + 5 * 8]",
    "mov rsi, [rdi + 6 * 8]",
    "mov r8, [rdi + 8 * 8]",
    "mov r9, [rdi + 9 * 8]",
    "mov r10, [rdi + 10 * 8]",
    "mov r11, [rdi + 11 * 8]",
    "mov r12, [rdi + 12 * 8]",
    "mov r13, [rdi + 13 * 8]",
    "mov r14, [rdi + 14 * 8]",
    "mov r15, [rdi + 15 * 8]",
    "mov rdi, [rdi + 7 * 8]",
    "test byte ptr [rsp], {verw}",
    "jz 6f",
    "verw word ptr [rip + rkvm_verw_sel]",
    "6:",
    // CF = launched (BT changes no other flag the entry needs).
    "bt qword ptr [rsp + 8], 0",
    "jc 7f",
    "vmlaunch",
    "jmp 2f",
    "7:",
    "vmresume",
    // Only reached if the entry failed; the guest never ran. LEA keeps
    // the flags the entry instruction set.
    "2:",
    "lea rsp, [rsp + 32]",
    "mov eax, 2",
    "jnc 5f",
    "mov eax, 1",
    "jmp 5f",
    "3:",
    "lea rsp, [rsp + 32]",
    "mov eax, 3",
    "jmp 5f",
    // HOST_RIP: the VM exit restored RSP to the frame above.
    ".global rkvm_vmx_exit",
    "rkvm_vmx_exit:",
    // Its address is in HOST_RIP, so objtool (IBT) wants an ENDBR here; a
    // VM exit is no indirect branch, and without CET this is a NOP.
    "endbr64",
    "push rdi",
    "mov rdi, [rsp + 24]",
    "mov [rdi + 0 * 8], rax",
    "mov [rdi + 1 * 8], rcx",
    "mov [rdi + 2 * 8], rdx",
    "mov [rdi + 3 * 8], rbx",
    "mov [rdi + 5 * 8], rbp",
    "mov [rdi + 6 * 8], rsi",
    "mov [rdi + 8 * 8], r8",
    "mov [rdi + 9 * 8], r9",
    "mov [rdi + 10 * 8], r10",
    "mov [rdi + 11 * 8], r11",
    "mov [rdi + 12 * 8], r12",
    "mov [rdi + 13 * 8], r13",
    "mov [rdi + 14 * 8], r14",
    "mov [rdi + 15 * 8], r15",
    "pop rax",
    "mov [rdi + 7 * 8], rax",
    // No guest value stays in a register (KVM clears them too): the
    // callee-saved ones are reloaded below, the rest cleared here.
    "xor eax, eax",
    "xor ecx, ecx",
    "xor edx, edx",
    "xor esi, esi",
    "xor edi, edi",
    "xor r8d, r8d",
    "xor r9d, r9d",
    "xor r10d, r10d",
    "xor r11d, r11d",
    // The return stack buffer may hold the guest's entries: overwrite all
    // 32 (two calls per round, each with a speculation trap), or, with
    // eIBRS, make one call retire before the first RET (PBRSB). As the
    // kernel's __FILL_RETURN_BUFFER / __FILL_ONE_RETURN; the calls are
    // annotated as intra-function calls for objtool, as there.
    "test byte ptr [rsp], {rsb_fill}",
    "jz 22f",
    "mov ecx, 16",
    "23:",
    "30:",
    "call 24f",
    ".pushsection .discard.intra_function_calls",
    ".long 30b",
    ".popsection",
    "int3",
    "24:",
    "31:",
    "call 25f",
    ".pushsection .discard.intra_function_calls",
    ".long 31b",
    ".popsection",
    "int3",
    "25:",
    "add rsp, 16",
    "dec ecx",
    "jnz 23b",
    "lfence",
    "jmp 26f",
    "22:",
    "test byte ptr [rsp], {rsb_fill_lite}",
    "jz 26f",
    "32:",
    "call 27f",
    ".pushsection .discard.intra_function_calls",
    ".long 32b",
    ".popsection",
    "int3",
    "27:",
    "add rsp, 8",
    "lfence",
    "26:",
    // Legacy IBRS must be written again after the guest ran.
    "test byte ptr [rsp], {spec_ctrl}",
    "jz 28f",
    "mov ecx, 0x48",
    "mov eax, [rsp + 24]",
    "mov edx, [rsp + 28]",
    "wrmsr",
    "lfence",
    "28:",
    "test byte ptr [rsp], {bhb_clear}",
    "jz 29f",
    "call clear_bhb_loop",
    "29:",
    "lea rsp, [rsp + 32]",
    "xor eax, eax",
    "5:",
    "pop r15",
    "pop r14",
    "pop r13",
    "pop r12",
    "pop rbx",
    "pop rbp",
    "ret",
    // An NMI caused the exit (NMI exiting): call the kernel's NMI entry with
    // the interrupt frame a real NMI would have pushed, as KVM's
    // vmx_do_nmi_irqoff does (arch/x86/kvm/vmx/vmenter.S). 0x18 and 0x10 are
    // __KERNEL_DS and __KERNEL_CS on x86_64.
    ".global rkvm_do_nmi_irqoff",
    "rkvm_do_nmi_irqoff:",
    "push rbp",
    "mov rbp, rsp",
    "and rsp, -16",
    "push 0x18",
    "push rbp",
    "pushfq",
    "push 0x10",
    "call asm_exc_nmi_kvm_vmx",
    "mov rsp, rbp",
    "pop rbp",
    "ret",
    ".popsection",
    host_rsp = const HOST_RSP,
    verw = const Mitigations::VERW,
    rsb_fill = const Mitigations::RSB_FILL,
    rsb_fill_lite = const Mitigations::RSB_FILL_LITE,
    spec_ctrl = const Mitigations::SPEC_CTRL_RESTORE,
    bhb_clear = const Mitigations::BHB_CLEAR,
);

extern "C" {
    fn rkvm_vmx_run(regs: *mut GuestRegs, launched: u64, mitigations: u64, host_spec_ctrl: u64) -> u64;
    fn rkvm_vmx_exit();
    fn rkvm_do_nmi_irqoff();
}

/// How an entry attempt ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum EntryResult {
    /// The guest ran and exited: read the exit reason.
    Exited,
    /// VMfailInvalid: no current VMCS.
    FailInvalid,
    /// VMfailValid: read the VM-instruction error.
    FailValid,
}

/// The address the VMCS's HOST_RIP must hold.
pub(crate) fn host_rip() -> u64 {
    rkvm_vmx_exit as *const () as usize as u64
}

/// Enters the guest with `regs`, until the next VM exit, with the
/// `mitigations` the kernel chose for this CPU (VERW before entry; RSB
/// filling, SPEC_CTRL back to `host_spec_ctrl` and branch-history clearing
/// after exit).
///
/// # Safety
/// Interrupts and preemption are disabled; the vCPU's VMCS is current on
/// this CPU with complete, checked host state (HOST_RIP = [`host_rip`]) and
/// guest state; `launched` says whether VMLAUNCH succeeded since VMPTRLD;
/// `mitigations` only names what this CPU can execute.
pub(crate) unsafe fn enter(regs: &mut GuestRegs, launched: bool, mitigations: Mitigations, host_spec_ctrl: u64) -> EntryResult {
    // SAFETY: the caller's guarantees; the routine saves and restores every
    // callee-saved register and returns on the same stack.
    match unsafe { rkvm_vmx_run(regs, u64::from(launched), u64::from(mitigations.bits()), host_spec_ctrl) } {
        0 => EntryResult::Exited,
        1 => EntryResult::FailInvalid,
        _ => EntryResult::FailValid,
    }
}

/// Hands the NMI that caused the last VM exit to the host.
///
/// # Safety
/// Interrupts are disabled and the last exit was an NMI (exit reason 0 with
/// an NMI in the interruption information).
pub(crate) unsafe fn handle_host_nmi() {
    // SAFETY: the caller's guarantees; the kernel's handler returns by IRET
    // to the frame the trampoline built.
    unsafe { rkvm_do_nmi_irqoff() }
}
