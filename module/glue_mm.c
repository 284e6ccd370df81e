// SPDX-License-Identifier: GPL-2.0
/*
 * glue_mm.c - the VMM's memory, as guest RAM: what 6.12's Rust bindings
 * cannot reach (inline helpers, a notifier ops table), each wrapped once.
 * module/glue/mm.rs declares these and is the only Rust code calling them.
 *
 * Guest RAM is the VMM's own anonymous or file memory. rkvm maps its pages
 * into the EPT on first use and holds a page reference for as long as an
 * EPT entry points at a page (module/memory.rs). An MMU notifier on the
 * VMM's mm tells rkvm before any of those pages leaves the VMM's page
 * tables (munmap, madvise, reclaim, migration, fork's copy-on-write,
 * exit), so the EPT entry goes first: the guest never keeps using a page
 * the VMM no longer maps, as with KVM (virt/kvm/kvm_main.c,
 * kvm_mmu_notifier_invalidate_range_start).
 *
 * It also keeps the module's page counts, readable in
 * /sys/kernel/debug/rkvm/pages, so that tests can see every page come back.
 *
 * Context: process context; the notifier callbacks may be called where
 * they must not sleep (mmu_notifier_range_blockable() false).
 */
#include <linux/atomic.h>
#include <linux/debugfs.h>
#include <linux/mm.h>
#include <linux/mmu_notifier.h>
#include <linux/sched.h>
#include <linux/sched/mm.h>
#include <linux/seq_file.h>
#include <linux/slab.h>

/* The callbacks module/memory.rs implements; @owner is its GuestMemory. */
struct rkvm_mmu_callbacks {
	/* Returns 0, or -EAGAIN if it would have to block and may not. */
	int (*invalidate_start)(const void *owner, u64 start, u64 end, bool blockable);
	void (*invalidate_end)(const void *owner, u64 start, u64 end);
	void (*release)(const void *owner);
};

struct rkvm_mmu_notifier {
	struct mmu_notifier mn;
	const struct rkvm_mmu_callbacks *cb;
	const void *owner;
};

/* Called from Rust only (module/glue/mm.rs), hence declared here. */
struct rkvm_mmu_notifier *rkvm_mmu_notifier_register(const struct rkvm_mmu_callbacks *cb,
						     const void *owner, int *err);
void rkvm_mmu_notifier_unregister(struct rkvm_mmu_notifier *n);
const void *rkvm_mmu_notifier_mm(const struct rkvm_mmu_notifier *n);
const void *rkvm_current_mm(void);
int rkvm_get_user_page_fast_only(unsigned long hva, struct page **page);
long rkvm_get_user_pages(unsigned long hva, unsigned long n, struct page **pages);
void rkvm_put_page(struct page *page);
struct page *rkvm_phys_to_page(u64 phys);
void rkvm_count(unsigned int counter, long delta);
long rkvm_counter(unsigned int counter);
void rkvm_debugfs_init(void);
void rkvm_debugfs_exit(void);

static struct rkvm_mmu_notifier *to_rkvm(struct mmu_notifier *mn)
{
	return container_of(mn, struct rkvm_mmu_notifier, mn);
}

static int rkvm_invalidate_range_start(struct mmu_notifier *mn,
				       const struct mmu_notifier_range *range)
{
	struct rkvm_mmu_notifier *n = to_rkvm(mn);

	return n->cb->invalidate_start(n->owner, range->start, range->end,
				       mmu_notifier_range_blockable(range));
}

static void rkvm_invalidate_range_end(struct mmu_notifier *mn,
				      const struct mmu_notifier_range *range)
{
	struct rkvm_mmu_notifier *n = to_rkvm(mn);

	n->cb->invalidate_end(n->owner, range->start, range->end);
}

/* The mm is going away (exit_mmap) or the notifier is unregistered. */
static void rkvm_release(struct mmu_notifier *mn, struct mm_struct *mm)
{
	struct rkvm_mmu_notifier *n = to_rkvm(mn);

	n->cb->release(n->owner);
}

static const struct mmu_notifier_ops rkvm_mmu_notifier_ops = {
	.invalidate_range_start = rkvm_invalidate_range_start,
	.invalidate_range_end = rkvm_invalidate_range_end,
	.release = rkvm_release,
};

/*
 * Registers @cb with @owner on the calling process's mm. The notifier
 * holds a reference on the mm_struct (mmgrab, not the address space) until
 * it is unregistered, so its address identifies the VM's mm for as long as
 * the VM lives. May sleep (takes the mmap lock for writing).
 */
struct rkvm_mmu_notifier *rkvm_mmu_notifier_register(const struct rkvm_mmu_callbacks *cb,
						     const void *owner, int *err)
{
	struct rkvm_mmu_notifier *n;

	if (!current->mm) {
		*err = -EINVAL;
		return NULL;
	}
	n = kzalloc(sizeof(*n), GFP_KERNEL_ACCOUNT);
	if (!n) {
		*err = -ENOMEM;
		return NULL;
	}
	n->mn.ops = &rkvm_mmu_notifier_ops;
	n->cb = cb;
	n->owner = owner;
	*err = mmu_notifier_register(&n->mn, current->mm);
	if (*err) {
		kfree(n);
		return NULL;
	}
	return n;
}

/*
 * Unregisters (calling ->release if the mm still lives), waits until no
 * callback runs any more (SRCU), drops the mm reference and frees @n.
 * May sleep.
 */
void rkvm_mmu_notifier_unregister(struct rkvm_mmu_notifier *n)
{
	mmu_notifier_unregister(&n->mn, n->mn.mm);
	kfree(n);
}

/* The mm @n watches; only ever compared, never dereferenced by Rust. */
const void *rkvm_mmu_notifier_mm(const struct rkvm_mmu_notifier *n)
{
	return n->mn.mm;
}

const void *rkvm_current_mm(void)
{
	return current->mm;
}

/*
 * The page behind the calling process's writable address @hva, with a
 * reference, without sleeping (GUP-fast: the page must be present and
 * writable already). 0 or -EFAULT.
 */
int rkvm_get_user_page_fast_only(unsigned long hva, struct page **page)
{
	return get_user_page_fast_only(hva, FOLL_WRITE, page) ? 0 : -EFAULT;
}

/*
 * Up to @n pages from @hva, faulting them in writable, each with a
 * reference: how many (the first ones), or a negative errno if not even
 * the first. May sleep.
 */
long rkvm_get_user_pages(unsigned long hva, unsigned long n, struct page **pages)
{
	return get_user_pages_fast(hva, n, FOLL_WRITE, pages);
}

void rkvm_put_page(struct page *page)
{
	put_page(page);
}

/* The page at physical address @phys (RAM the kernel manages). */
struct page *rkvm_phys_to_page(u64 phys)
{
	return pfn_to_page(phys >> PAGE_SHIFT);
}

/*
 * What the module holds, for leak checks: counter 0 guest pages referenced
 * by EPT entries, 1 EPT table pages, 2 VMs, 3 vCPUs; and since load, for
 * the curious: 4 guest pages mapped without sleeping, 5 mapped after
 * faulting them into the VMM, 6 MMU-notifier invalidations, 7 pages they
 * unmapped (the order of `Counter` in module/glue/mm.rs).
 */
#define RKVM_COUNTERS 8
static atomic_long_t rkvm_counters[RKVM_COUNTERS];
static const char *const rkvm_counter_names[RKVM_COUNTERS] = {
	"guest_pages_held", "ept_table_pages", "vms", "vcpus",
	"pages_mapped_fast", "pages_mapped_slow", "invalidations", "pages_unmapped",
};

void rkvm_count(unsigned int counter, long delta)
{
	if (counter < RKVM_COUNTERS)
		atomic_long_add(delta, &rkvm_counters[counter]);
}

long rkvm_counter(unsigned int counter)
{
	return counter < RKVM_COUNTERS ? atomic_long_read(&rkvm_counters[counter]) : 0;
}

static int rkvm_pages_show(struct seq_file *m, void *unused)
{
	int i;

	for (i = 0; i < RKVM_COUNTERS; i++)
		seq_printf(m, "%s %ld\n", rkvm_counter_names[i], atomic_long_read(&rkvm_counters[i]));
	return 0;
}
DEFINE_SHOW_ATTRIBUTE(rkvm_pages);

static struct dentry *rkvm_debugfs_dir;

/* /sys/kernel/debug/rkvm/pages (nothing if debugfs is absent). */
void rkvm_debugfs_init(void)
{
	rkvm_debugfs_dir = debugfs_create_dir("rkvm", NULL);
	debugfs_create_file("pages", 0444, rkvm_debugfs_dir, NULL, &rkvm_pages_fops);
}

void rkvm_debugfs_exit(void)
{
	debugfs_remove_recursive(rkvm_debugfs_dir);
}
