// SPDX-License-Identifier: GPL-2.0
/*
 * glue_cpu.c - what the host CPU needs around a guest's run so that the
 * host does not notice it ran: its debug registers back, its machine checks
 * handled, and the speculative-execution barriers the kernel chose for this
 * CPU. All of it is inline or alternatives-patched in C headers; each piece
 * is wrapped once here and declared in module/glue/cpu.rs.
 *
 * The mitigations follow KVM's (arch/x86/kvm/vmx/vmenter.S and vmx.c in
 * Linux 6.12), keyed on the same kernel decisions (X86_FEATURE_* set by
 * arch/x86/kernel/cpu/bugs.c), so rkvm protects exactly where this kernel
 * protects KVM guests:
 *  - RSB filling after VM exit (X86_FEATURE_RSB_VMEXIT, or the one-call
 *    PBRSB form with eIBRS, X86_FEATURE_RSB_VMEXIT_LITE): done in the
 *    entry routine before its first RET (module/vmx/entry.rs);
 *  - VERW before VM entry to clear CPU buffers (MDS, TAA, MMIO stale data:
 *    X86_FEATURE_CLEAR_CPU_BUF): in the entry routine, after the last load;
 *  - the branch-history clearing loop after VM exit (BHI:
 *    X86_FEATURE_CLEAR_BHB_LOOP_ON_VMEXIT): in the entry routine;
 *  - IA32_SPEC_CTRL rewritten with the host's value after VM exit when the
 *    kernel uses legacy IBRS (X86_FEATURE_KERNEL_IBRS). A guest never
 *    writes SPEC_CTRL here (its RDMSR/WRMSR raise #GP: CPUID offers none);
 *  - IBPB when a CPU switches from one vCPU's VMCS to another's
 *    (X86_FEATURE_USE_IBPB), so one guest cannot train the branch
 *    predictor against another;
 *  - an L1D flush before every VM entry on CPUs with L1TF unless the CPU
 *    says the flush is unneeded (ARCH_CAPABILITIES.SKIP_L1DFL_VMENTRY) or
 *    mitigations are off: rkvm takes KVM's "always" policy rather than its
 *    "cond" heuristics, trading speed for a simpler argument.
 * The module parameter force_mitigations=1 (testing only) turns every one
 * of them on, on CPUs that can execute them, so the paths run in the
 * testbed, whose kernel has CONFIG_CPU_MITIGATIONS off.
 *
 * Context: called on the vCPU thread with preemption disabled, most with
 * interrupts disabled (right before entry or right after exit).
 */
#include <linux/cpu.h>
#include <linux/moduleparam.h>
#include <linux/slab.h>
#include <asm/cpufeature.h>
#include <asm/debugreg.h>
#include <asm/hw_breakpoint.h>
#include <asm/mce.h>
#include <asm/msr.h>
#include <asm/nospec-branch.h>
#include <asm/processor.h>

/* Bits of the entry routine's `flags` and of rkvm_mitigations(): the
 * same values as `Mitigations` in module/glue/cpu.rs. */
#define RKVM_RSB_FILL		(1u << 0)
#define RKVM_RSB_FILL_LITE	(1u << 1)
#define RKVM_VERW		(1u << 2)
#define RKVM_BHB_CLEAR		(1u << 3)
#define RKVM_SPEC_CTRL_RESTORE	(1u << 4)
#define RKVM_IBPB_ON_SWITCH	(1u << 5)
#define RKVM_L1D_FLUSH		(1u << 6)

static bool force_mitigations;
module_param(force_mitigations, bool, 0444);
MODULE_PARM_DESC(force_mitigations,
		 "Testing only: use every VM entry/exit mitigation the CPU can execute, needed or not");

/* Called from Rust only (module/glue/cpu.rs), hence declared here. */
unsigned long rkvm_host_debugctl(void);
void rkvm_restore_host_debug(unsigned long debugctl);
void rkvm_machine_check(void);
unsigned int rkvm_mitigations(void);
int rkvm_mitigations_init(void);
void rkvm_mitigations_exit(void);
void rkvm_ibpb(void);
u64 rkvm_host_spec_ctrl(void);
void rkvm_l1d_flush(void);
void rkvm_load_guest_debug(const u64 *dr, u64 dr6, bool breakpoints);
u64 rkvm_take_guest_dr6(void);

/* The host's IA32_DEBUGCTL, read once per KVM_RUN (as KVM's vcpu_load):
 * VM exit clears it (SDM Vol. 3C, 28.5.1). */
unsigned long rkvm_host_debugctl(void)
{
	return get_debugctlmsr();
}

/*
 * After a VM exit: DR7 is 0x400 and IA32_DEBUGCTL 0 (SDM 28.5.1), so the
 * host's hardware breakpoints and watchpoints (perf, ptrace, kgdb) and its
 * branch tracing would stay off until the next context switch. Put back
 * what the host had, as KVM does (x86.c, vcpu_enter_guest). The guest's
 * DR0-DR3 and DR6 never reach the CPU (module/exit/dr.rs), but a guest's
 * own #DB can change DR6, which hw_breakpoint_restore() resets too.
 */
void rkvm_restore_host_debug(unsigned long debugctl)
{
#ifdef CONFIG_HAVE_HW_BREAKPOINT
	if (hw_breakpoint_active())
		hw_breakpoint_restore();
#endif
	if (debugctl)
		update_debugctlmsr(debugctl);
}

/*
 * Right before VM entry (interrupts off): the debug registers VM entry does
 * not load. A guest whose DR7 enables breakpoints gets its own DR0-DR3 in
 * the CPU (else its DR7 would arm whatever the host left there: the host's
 * watchpoint addresses, matched against guest addresses), as KVM does when
 * the guest uses breakpoints; a guest DR6 other than its reset value goes
 * in too, so that a #DB in the guest adds to it as on hardware.
 */
void rkvm_load_guest_debug(const u64 *dr, u64 dr6, bool breakpoints)
{
	if (breakpoints) {
		set_debugreg(dr[0], 0);
		set_debugreg(dr[1], 1);
		set_debugreg(dr[2], 2);
		set_debugreg(dr[3], 3);
	}
	if (dr6 != DR6_RESERVED)
		set_debugreg(dr6, 6);
}

/*
 * Right after VM exit: DR6 as the guest left it. VM exit does not switch
 * DR6, and a #DB the guest took itself (its TF, its breakpoints, INT1)
 * sets bits there; left in the CPU, they would add to the host's next #DB
 * and the kernel would send a stray SIGTRAP (exc_debug_user). So the CPU's
 * DR6 goes back to its reset value (what the kernel keeps between #DBs)
 * whenever the guest changed it.
 */
u64 rkvm_take_guest_dr6(void)
{
	unsigned long dr6;

	get_debugreg(dr6, 6);
	if (dr6 != DR6_RESERVED)
		set_debugreg(DR6_RESERVED, 6);
	return dr6;
}

/*
 * A machine check that caused a VM exit (#MC intercepted, exit reason 0
 * with vector 18) or aborted a VM entry (exit reason 41) belongs to the
 * host: hand it to the kernel's handler as KVM's kvm_machine_check() does.
 * Interrupts are disabled.
 */
void rkvm_machine_check(void)
{
#ifdef CONFIG_X86_MCE
	struct pt_regs regs = {
		.cs = 3, /* Fake CPL 3, as KVM: the #MC did not hit the kernel. */
		.flags = X86_EFLAGS_IF,
	};

	do_machine_check(&regs);
#endif
}

static unsigned int mitigations;
/* 64 KiB read to displace L1D where the CPU has no IA32_FLUSH_CMD. */
#define L1D_FLUSH_SIZE (64 * 1024)
static void *l1d_flush_pages;

static bool l1d_flush_needed(void)
{
	u64 caps = 0;

	if (!boot_cpu_has_bug(X86_BUG_L1TF) || cpu_mitigations_off())
		return false;
	if (boot_cpu_has(X86_FEATURE_ARCH_CAPABILITIES))
		rdmsrl_safe(MSR_IA32_ARCH_CAPABILITIES, &caps);
	return !(caps & ARCH_CAP_SKIP_VMENTRY_L1DFLUSH);
}

/* Decides the mitigations once, at load; logs them. */
int rkvm_mitigations_init(void)
{
	unsigned int m = 0;

	if (boot_cpu_has(X86_FEATURE_RSB_VMEXIT) || force_mitigations)
		m |= RKVM_RSB_FILL;
	else if (boot_cpu_has(X86_FEATURE_RSB_VMEXIT_LITE))
		m |= RKVM_RSB_FILL_LITE;
	if (boot_cpu_has(X86_FEATURE_CLEAR_CPU_BUF) || force_mitigations)
		m |= RKVM_VERW;
#ifdef CONFIG_X86_64
	if (boot_cpu_has(X86_FEATURE_CLEAR_BHB_LOOP_ON_VMEXIT) || force_mitigations)
		m |= RKVM_BHB_CLEAR;
#endif
	if (boot_cpu_has(X86_FEATURE_KERNEL_IBRS) ||
	    (force_mitigations && boot_cpu_has(X86_FEATURE_MSR_SPEC_CTRL)))
		m |= RKVM_SPEC_CTRL_RESTORE;
	if (boot_cpu_has(X86_FEATURE_USE_IBPB) ||
	    (force_mitigations && boot_cpu_has(X86_FEATURE_IBPB)))
		m |= RKVM_IBPB_ON_SWITCH;
	if (l1d_flush_needed() || force_mitigations) {
		if (!boot_cpu_has(X86_FEATURE_FLUSH_L1D)) {
			l1d_flush_pages = kzalloc(L1D_FLUSH_SIZE, GFP_KERNEL);
			if (!l1d_flush_pages)
				return -ENOMEM;
		}
		m |= RKVM_L1D_FLUSH;
	}
	mitigations = m;
	pr_info("rkvm: VM entry/exit mitigations:%s%s%s%s%s%s%s%s%s\n",
		m & RKVM_RSB_FILL ? " RSB-fill" : "",
		m & RKVM_RSB_FILL_LITE ? " RSB-fill-lite" : "",
		m & RKVM_VERW ? " VERW" : "",
		m & RKVM_BHB_CLEAR ? " BHB-clear" : "",
		m & RKVM_SPEC_CTRL_RESTORE ? " SPEC_CTRL-restore" : "",
		m & RKVM_IBPB_ON_SWITCH ? " IBPB-on-vCPU-switch" : "",
		m & RKVM_L1D_FLUSH ? (l1d_flush_pages ? " L1D-flush(software)" : " L1D-flush") : "",
		m ? "" : " none (this CPU and kernel need none)",
		force_mitigations ? " [forced for testing]" : "");
	return 0;
}

void rkvm_mitigations_exit(void)
{
	kfree(l1d_flush_pages);
	l1d_flush_pages = NULL;
}

unsigned int rkvm_mitigations(void)
{
	return mitigations;
}

/* Indirect Branch Prediction Barrier (IA32_PRED_CMD.IBPB). */
void rkvm_ibpb(void)
{
	if (boot_cpu_has(X86_FEATURE_IBPB))
		wrmsrl(MSR_IA32_PRED_CMD, PRED_CMD_IBPB);
}

/* The SPEC_CTRL value the kernel runs with on this CPU. */
u64 rkvm_host_spec_ctrl(void)
{
	return spec_ctrl_current();
}

/*
 * Flush L1D before VM entry (L1TF): the MSR where the CPU has it, else
 * KVM's software sequence (vmx_l1d_flush): touch every page of a 64 KiB
 * buffer to fill the TLB, then read every cache line of it.
 */
void rkvm_l1d_flush(void)
{
	int size = L1D_FLUSH_SIZE;

	if (!l1d_flush_pages) {
		wrmsrl(MSR_IA32_FLUSH_CMD, L1D_FLUSH);
		return;
	}
	asm volatile(
		/* First ensure the pages are in the TLB */
		"xorl	%%eax, %%eax\n"
		"1:\n\t"
		"movzbl	(%[flush_pages], %%" _ASM_AX "), %%ecx\n\t"
		"addl	$4096, %%eax\n\t"
		"cmpl	%%eax, %[size]\n\t"
		"jne	1b\n\t"
		"xorl	%%eax, %%eax\n\t"
		"cpuid\n\t"
		/* Now fill the cache */
		"xorl	%%eax, %%eax\n"
		"2:\n\t"
		"movzbl	(%[flush_pages], %%" _ASM_AX "), %%ecx\n\t"
		"addl	$64, %%eax\n\t"
		"cmpl	%%eax, %[size]\n\t"
		"jne	2b\n\t"
		"lfence\n"
		:: [flush_pages] "r" (l1d_flush_pages),
		    [size] "r" (size)
		: "eax", "ebx", "ecx", "edx");
}
