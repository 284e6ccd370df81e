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
#include <linux/miscdevice.h>
#include <linux/mm.h>
#include <linux/fs.h>
#include <linux/moduleparam.h>
#include <linux/notifier.h>
#include <linux/reboot.h>
#include <linux/smp.h>
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
int rkvm_fail_vmxon_on_cpu(void);
int rkvm_anon_inode_getfd(const char *name, const void *fops, void *priv);
int rkvm_vma_insert_pages(struct vm_area_struct *vma, void *const *pages, unsigned long n);
int rkvm_register_reboot(void (*leave_vmx)(void));
void rkvm_unregister_reboot(void);

/*
 * Fault injection for the testbed: VMXON "fails" on this CPU, so that the
 * rollback of a partial load can be tested. Module parameters are declared
 * here because 6.12's Rust module! macro has no parameter support.
 */
static int fail_vmxon_on_cpu = -1;
module_param(fail_vmxon_on_cpu, int, 0444);
MODULE_PARM_DESC(fail_vmxon_on_cpu,
		 "Testing only: make VMXON fail on this CPU (default -1: never)");

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
 * for as long as the file lives.
 */
int rkvm_anon_inode_getfd(const char *name, const void *fops, void *priv)
{
	return anon_inode_getfd(name, fops, priv, O_RDWR | O_CLOEXEC);
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
 * VMXON with the VMXON region at physical address @phys (SDM Vol. 3C, 31.3,
 * "VMXON"). Returns 0 on success, -EIO on VMfail (CF or ZF set), -EFAULT if
 * the instruction faulted (#GP or #UD: CR4.VMXE clear, fixed bits violated,
 * IA32_FEATURE_CONTROL not enabling VMX).
 */
int rkvm_vmxon(u64 phys)
{
	asm goto("1: vmxon %[pa]\n\t"
		 "jbe %l[vmfail]\n\t"
		 _ASM_EXTABLE(1b, %l[fault])
		 : : [pa] "m"(phys) : "cc", "memory" : vmfail, fault);
	return 0;
vmfail:
	return -EIO;
fault:
	return -EFAULT;
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
		 "jbe %l[vmfail]\n\t"
		 _ASM_EXTABLE(1b, %l[fault])
		 : : : "cc", "memory" : vmfail, fault);
	return 0;
vmfail:
	return -EIO;
fault:
	return -EFAULT;
}
