// SPDX-License-Identifier: GPL-2.0
/*
 * glue.c - the few kernel facilities that Linux 6.12's Rust bindings cannot
 * reach, each wrapped once in a small function with a plain C signature.
 * module/glue.rs declares them and is the only Rust code that calls them.
 *
 * Why C here:
 *  - struct miscdevice and misc_register() are not in 6.12's bindings;
 *  - __pa(), cr4_set_bits() and cr4_clear_bits() are inline functions (the
 *    latter keep the kernel's per-CPU CR4 shadow in sync, which a raw
 *    MOV to CR4 from Rust would not);
 *  - VMXON and VMXOFF need exception-table fixups (asm goto + _ASM_EXTABLE,
 *    as KVM's vmx.c does), so that a fault becomes an errno instead of an
 *    oops; stable Rust has no asm goto.
 *
 * Context: every function here may be called with preemption or interrupts
 * disabled; none sleeps except rkvm_misc_register() and rkvm_misc_deregister().
 */
#include <linux/anon_inodes.h>
#include <linux/file.h>
#include <linux/miscdevice.h>
#include <linux/mm.h>
#include <linux/fs.h>
#include <linux/moduleparam.h>
#include <linux/notifier.h>
#include <linux/reboot.h>
#include <linux/smp.h>
#include <linux/preempt.h>
#include <linux/sched.h>
#include <linux/sched/signal.h>
#include <linux/irqflags.h>
#include <linux/io.h>
#include <linux/mutex.h>
#include <linux/ratelimit.h>
#include <asm/desc.h>
#include <asm/special_insns.h>
#include <asm/gsseg.h>
#include <asm/tsc.h>
#include <asm/fsgsbase.h>
#include <asm/msr.h>
#include <asm/segment.h>
#include <asm/cpu_entry_area.h>
#include <asm/tlbflush.h>
#include <asm/asm.h>
#include <asm/page.h>
#include <asm/special_insns.h>

/* Called from Rust only (module/glue.rs), hence declared here. */
int rkvm_misc_register(const struct file_operations *fops);
void rkvm_misc_deregister(void);
u64 rkvm_virt_to_phys(const void *addr);
unsigned int rkvm_this_cpu(void);
unsigned long rkvm_read_cr4(void);
void rkvm_cr4_set_vmxe(void);
void rkvm_cr4_clear_vmxe(void);
int rkvm_vmxon(u64 phys);
int rkvm_vmxoff(void);
int rkvm_vmclear(u64 phys);
int rkvm_vmptrld(u64 phys);
int rkvm_vmread(unsigned long field, u64 *value);
int rkvm_vmwrite(unsigned long field, u64 value);
int rkvm_invept(unsigned long type, const u64 *descriptor);
int rkvm_fail_vmxon_on_cpu(void);
int rkvm_anon_inode_getfd(const char *name, const void *fops, void *priv, bool stats);
int rkvm_vma_insert_pages(struct vm_area_struct *vma, void *const *pages, unsigned long n);
int rkvm_register_reboot(void (*leave_vmx)(void));

/* Host state for the VMCS host-state area (SDM Vol. 3C, 25.5), filled in by
 * rkvm_read_host_state() on the CPU about to enter the guest. The layout is
 * mirrored by `HostState` in module/glue.rs. */
struct rkvm_host_state {
	u64 cr0, cr3, cr4;
	u64 fs_base, gs_base, tr_base, gdtr_base, idtr_base;
	u64 sysenter_cs, sysenter_esp, sysenter_eip;
	u64 efer, pat;
	u16 cs_sel, ss_sel, tr_sel, fs_sel, gs_sel;
	/* What the exit clobbers and rkvm_restore_host_segments() reloads. */
	u16 ds_sel, es_sel, ldt_sel, real_fs_sel, real_gs_sel;
};
void rkvm_read_host_state(struct rkvm_host_state *h);
void rkvm_restore_host_segments(const struct rkvm_host_state *h);
void rkvm_preempt_disable(void);
void rkvm_preempt_enable(void);
void rkvm_local_irq_disable(void);
void rkvm_local_irq_enable(void);
bool rkvm_need_resched(void);
bool rkvm_signal_pending(void);
void rkvm_cond_resched(void);
u64 rkvm_page_to_phys(struct page *page);
void *rkvm_phys_to_virt(u64 phys);
unsigned long rkvm_task_size_max(void);
unsigned int rkvm_tsc_khz(void);
void rkvm_on_each_cpu(void (*fn)(void *), void *info);
void rkvm_unregister_reboot(void);
int rkvm_mutex_lock_killable(struct mutex *m);
bool rkvm_ratelimit(void);

/*
 * Fault injection for the testbed: VMXON "fails" on this CPU, so that the
 * rollback of a partial load can be tested. Module parameters are declared
 * here because 6.12's Rust module! macro has no parameter support.
 */
static int fail_vmxon_on_cpu = -1;
module_param(fail_vmxon_on_cpu, int, 0444);
MODULE_PARM_DESC(fail_vmxon_on_cpu,
		 "Testing only: make VMXON fail on this CPU (default -1: never)");

/* For capturing a CPU model's capability MSRs (rkvm-core's test data). */
static bool dump_caps;
module_param(dump_caps, bool, 0444);
MODULE_PARM_DESC(dump_caps, "Log the raw VMX capability MSRs at load (default off)");

bool rkvm_dump_caps(void);
bool rkvm_dump_caps(void)
{
	return READ_ONCE(dump_caps);
}

int rkvm_fail_vmxon_on_cpu(void)
{
	return READ_ONCE(fail_vmxon_on_cpu);
}

/*
 * Reboot, halt, power-off and kexec: leave VMX operation on every CPU first.
 * A CPU in VMX root operation blocks INIT (SDM Vol. 3C, 25.2), which firmware
 * and a kexec'd kernel use to take over the other CPUs; some BIOSes hang on
 * reboot otherwise. KVM does the same from its syscore shutdown hook.
 */
static void (*rkvm_leave_vmx)(void);

static void rkvm_leave_vmx_ipi(void *unused)
{
	rkvm_leave_vmx();
}

static int rkvm_reboot_notify(struct notifier_block *nb, unsigned long action, void *data)
{
	on_each_cpu(rkvm_leave_vmx_ipi, NULL, 1);
	return NOTIFY_DONE;
}

static struct notifier_block rkvm_reboot_nb = {
	.notifier_call = rkvm_reboot_notify,
};

int rkvm_register_reboot(void (*leave_vmx)(void))
{
	rkvm_leave_vmx = leave_vmx;
	return register_reboot_notifier(&rkvm_reboot_nb);
}

void rkvm_unregister_reboot(void)
{
	unregister_reboot_notifier(&rkvm_reboot_nb);
}

/*
 * Host state as KVM's vmx_set_constant_host_state(), vmx_vcpu_load_vmcs()
 * and vmx_prepare_switch_to_guest() compute it. Called with preemption
 * disabled: the TSS, GDT and GS base are this CPU's.
 */
void rkvm_read_host_state(struct rkvm_host_state *h)
{
	int cpu = raw_smp_processor_id();
	struct desc_ptr idt;

	h->cr0 = read_cr0();
	h->cr3 = __read_cr3();
	h->cr4 = cr4_read_shadow();
	h->cs_sel = __KERNEL_CS;
	h->ss_sel = __KERNEL_DS;
	h->tr_sel = GDT_ENTRY_TSS * 8;
	h->tr_base = (unsigned long)&get_cpu_entry_area(cpu)->tss.x86_tss;
	h->gdtr_base = (unsigned long)get_current_gdt_ro();
	store_idt(&idt);
	h->idtr_base = idt.address;
	rdmsrl(MSR_IA32_SYSENTER_CS, h->sysenter_cs);
	rdmsrl(MSR_IA32_SYSENTER_ESP, h->sysenter_esp);
	rdmsrl(MSR_IA32_SYSENTER_EIP, h->sysenter_eip);
	rdmsrl(MSR_EFER, h->efer);
	rdmsrl(MSR_IA32_CR_PAT, h->pat);

	savesegment(ds, h->ds_sel);
	savesegment(es, h->es_sel);
	asm volatile("sldt %0" : "=g"(h->ldt_sel));
	current_save_fsgs();
	h->real_fs_sel = current->thread.fsindex;
	h->real_gs_sel = current->thread.gsindex;
	h->fs_base = current->thread.fsbase;
	h->gs_base = cpu_kernelmode_gs_base(cpu);
	/* The VMCS host selectors must have RPL 0 and TI 0 (SDM 27.2.3). */
	h->fs_sel = (h->real_fs_sel & 7) ? 0 : h->real_fs_sel;
	h->gs_sel = (h->real_gs_sel & 7) ? 0 : h->real_gs_sel;
}

/*
 * After the last VM exit of a KVM_RUN: reload what the exit left different
 * from the task's state (as KVM's vmx_prepare_switch_to_host()): the exit
 * loaded null DS/ES and LDTR, selectors with RPL 0, a GDT limit of 0xffff
 * and a TSS limit of 0x67 (which would cut off the I/O bitmap of tasks that
 * use ioperm).
 */
void rkvm_restore_host_segments(const struct rkvm_host_state *h)
{
	if (h->ldt_sel || (h->real_gs_sel & 7)) {
		asm volatile("lldt %0" : : "rm"(h->ldt_sel));
		load_gs_index(h->real_gs_sel);
	}
	if (h->real_fs_sel & 7)
		loadsegment(fs, h->real_fs_sel);
	if (h->ds_sel | h->es_sel) {
		loadsegment(ds, h->ds_sel);
		loadsegment(es, h->es_sel);
	}
	invalidate_tss_limit();
	load_fixmap_gdt(raw_smp_processor_id());
}

void rkvm_preempt_disable(void)
{
	preempt_disable();
}

void rkvm_preempt_enable(void)
{
	preempt_enable();
}

void rkvm_local_irq_disable(void)
{
	local_irq_disable();
}

void rkvm_local_irq_enable(void)
{
	local_irq_enable();
}

bool rkvm_need_resched(void)
{
	return need_resched();
}

bool rkvm_signal_pending(void)
{
	return signal_pending(current);
}

void rkvm_cond_resched(void)
{
	cond_resched();
}

u64 rkvm_page_to_phys(struct page *page)
{
	return page_to_phys(page);
}

void *rkvm_phys_to_virt(u64 phys)
{
	return phys_to_virt(phys);
}

unsigned long rkvm_task_size_max(void)
{
	return TASK_SIZE_MAX;
}

unsigned int rkvm_tsc_khz(void)
{
	return tsc_khz;
}

/* Runs @fn(@info) on every online CPU, this one included, and waits. */
void rkvm_on_each_cpu(void (*fn)(void *), void *info)
{
	on_each_cpu(fn, info, 1);
}

/* A function, so that it works with and without lockdep (where
 * mutex_lock_killable is a macro). */
int rkvm_mutex_lock_killable(struct mutex *m)
{
	return mutex_lock_killable(m);
}

/*
 * Messages a VMM or a guest can cause (a failed VM entry, ...) go through
 * this limit, so that no process can flood the kernel log: 10 per 5 s, as
 * printk_ratelimited's default.
 */
bool rkvm_ratelimit(void)
{
	static DEFINE_RATELIMIT_STATE(rs, DEFAULT_RATELIMIT_INTERVAL, DEFAULT_RATELIMIT_BURST);

	return __ratelimit(&rs);
}

/* The /dev/rkvm device: root only (0600), like /dev/kvm's default. */
static struct miscdevice rkvm_misc = {
	.minor = MISC_DYNAMIC_MINOR,
	.name = "rkvm",
	.mode = 0600,
};

int rkvm_misc_register(const struct file_operations *fops)
{
	rkvm_misc.fops = fops;
	return misc_register(&rkvm_misc);
}

void rkvm_misc_deregister(void)
{
	misc_deregister(&rkvm_misc);
}

/*
 * A new file descriptor (O_RDWR | O_CLOEXEC, as KVM's VM and vCPU fds) whose
 * file has @fops and private_data @priv. Takes a reference on fops->owner
 * for as long as the file lives. With @stats, the file is read-only and
 * supports pread(2), as KVM's statistics fds (kvm_vcpu_ioctl_get_stats_fd).
 */
int rkvm_anon_inode_getfd(const char *name, const void *fops, void *priv, bool stats)
{
	struct file *file;
	int fd;

	if (!stats)
		return anon_inode_getfd(name, fops, priv, O_RDWR | O_CLOEXEC);
	fd = get_unused_fd_flags(O_CLOEXEC);
	if (fd < 0)
		return fd;
	file = anon_inode_getfile(name, fops, priv, O_RDONLY);
	if (IS_ERR(file)) {
		put_unused_fd(fd);
		return PTR_ERR(file);
	}
	file->f_mode |= FMODE_PREAD;
	fd_install(fd, file);
	return fd;
}

/*
 * mmap of an object made of @n kernel pages (directly mapped addresses in
 * @pages): maps the ones the VMA covers, starting at page vma->vm_pgoff.
 * Called from an mmap file operation (mmap lock held for writing).
 * vm_insert_page() takes a reference on each page, so a page stays valid
 * while mapped even if its owner frees it.
 */
int rkvm_vma_insert_pages(struct vm_area_struct *vma, void *const *pages, unsigned long n)
{
	unsigned long count = vma_pages(vma);
	unsigned long i;
	int r;

	if (vma->vm_pgoff >= n || count > n - vma->vm_pgoff)
		return -EINVAL;
	for (i = 0; i < count; i++) {
		r = vm_insert_page(vma, vma->vm_start + i * PAGE_SIZE,
				   virt_to_page(pages[vma->vm_pgoff + i]));
		if (r)
			return r;
	}
	return 0;
}

u64 rkvm_virt_to_phys(const void *addr)
{
	return __pa(addr);
}

unsigned int rkvm_this_cpu(void)
{
	return raw_smp_processor_id();
}

unsigned long rkvm_read_cr4(void)
{
	return __read_cr4();
}

void rkvm_cr4_set_vmxe(void)
{
	cr4_set_bits(X86_CR4_VMXE);
}

void rkvm_cr4_clear_vmxe(void)
{
	cr4_clear_bits(X86_CR4_VMXE);
}

/*
 * Every VMX instruction below is followed by VMX_CHECK (VMfail sets CF or
 * ZF: jump to vmfail; a fault jumps to fault through the exception table)
 * and ends with VMX_OUTCOME: 0, -EIO on VMfail, -EFAULT on a fault.
 */
#define VMX_CHECK "jbe %l[vmfail]\n\t" _ASM_EXTABLE(1b, %l[fault])
#define VMX_OUTCOME	\
	return 0;	\
vmfail:			\
	return -EIO;	\
fault:			\
	return -EFAULT

/*
 * VMXON with the VMXON region at physical address @phys (SDM Vol. 3C, 31.3,
 * "VMXON"). Returns 0 on success, -EIO on VMfail (CF or ZF set), -EFAULT if
 * the instruction faulted (#GP or #UD: CR4.VMXE clear, fixed bits violated,
 * IA32_FEATURE_CONTROL not enabling VMX).
 */
int rkvm_vmxon(u64 phys)
{
	asm goto("1: vmxon %[pa]\n\t"
		 VMX_CHECK
		 : : [pa] "m"(phys) : "cc", "memory" : vmfail, fault);
	VMX_OUTCOME;
}

/*
 * VMXOFF (SDM Vol. 3C, 31.3, "VMXOFF"). Returns 0 on success, -EIO on VMfail
 * (dual-monitor treatment active), -EFAULT on a fault (#UD when the CPU is
 * not in VMX operation), so the emergency path can call it blindly from NMI
 * context, as KVM's kvm_cpu_vmxoff() does.
 */
int rkvm_vmxoff(void)
{
	asm goto("1: vmxoff\n\t"
		 VMX_CHECK
		 : : : "cc", "memory" : vmfail, fault);
	VMX_OUTCOME;
}

/*
 * The VMCS instructions, fault-tolerant like VMXON/VMXOFF above and like
 * KVM's vmx_ops.h: a reboot or kexec takes every CPU out of VMX operation by
 * IPI (rkvm's reboot hook), possibly while a vCPU thread has interrupts
 * enabled between two exits; its next VMX instruction then raises #UD, which
 * the exception table turns into -EFAULT, and the run loop, seeing the
 * reboot, stops. Each returns 0, -EIO on VMfail (CF or ZF), -EFAULT on a
 * fault.
 */
int rkvm_vmclear(u64 phys)
{
	asm goto("1: vmclear %[pa]\n\t"
		 VMX_CHECK
		 : : [pa] "m"(phys) : "cc", "memory" : vmfail, fault);
	VMX_OUTCOME;
}

int rkvm_vmptrld(u64 phys)
{
	asm goto("1: vmptrld %[pa]\n\t"
		 VMX_CHECK
		 : : [pa] "m"(phys) : "cc", "memory" : vmfail, fault);
	VMX_OUTCOME;
}

/* VMREAD into memory: this compiler has no asm goto with outputs. */
int rkvm_vmread(unsigned long field, u64 *value)
{
	asm goto("1: vmread %[field], (%[out])\n\t"
		 VMX_CHECK
		 : : [field] "r"(field), [out] "r"(value) : "cc", "memory" : vmfail, fault);
	VMX_OUTCOME;
}

int rkvm_vmwrite(unsigned long field, u64 value)
{
	asm goto("1: vmwrite %[value], %[field]\n\t"
		 VMX_CHECK
		 : : [field] "r"(field), [value] "rm"(value) : "cc", "memory" : vmfail, fault);
	VMX_OUTCOME;
}

int rkvm_invept(unsigned long type, const u64 *descriptor)
{
	asm goto("1: invept (%[desc]), %[type]\n\t"
		 VMX_CHECK
		 : : [type] "r"(type), [desc] "r"(descriptor) : "cc", "memory" : vmfail, fault);
	VMX_OUTCOME;
}
