//! Per-vCPU exit statistics, read through KVM's binary statistics interface
//! (KVM_GET_STATS_FD on the vCPU fd, api.rst 4.134): the run loop counts
//! every exit by reason in atomics (no lock: a reader never waits for a
//! running vCPU), and the stats file renders them in KVM's format
//! (`rkvm_core::stats`) on each read.
//!
//! Context: counting runs in the run loop (preemption off); reading in the
//! reader's process context.

use core::sync::atomic::{AtomicU64, Ordering};

use kernel::alloc::{flags::GFP_KERNEL, KVec};
use kernel::c_str;
use kernel::error::{code::EINVAL, Result};
use kernel::prelude::*;
use kernel::sync::{Arc, ArcBorrow};
use kernel::uaccess::UserSlice;

use rkvm_core::stats::{self, index, VCPU_STATS};

use crate::file::{self, FileObject, FileOps};
use crate::vcpu::Vcpu;

/// The counters of one vCPU, in `VCPU_STATS` order.
pub(crate) struct ExitStats([AtomicU64; VCPU_STATS.len()]);

impl ExitStats {
    pub(crate) fn new() -> Self {
        Self(core::array::from_fn(|_| AtomicU64::new(0)))
    }

    fn bump(&self, i: usize) {
        self.0[i].fetch_add(1, Ordering::Relaxed);
    }

    /// An exit with basic reason `reason` (`entry_failed`: the entry never
    /// got to run the guest).
    pub(crate) fn exit(&self, reason: u16, entry_failed: bool) {
        use rkvm_core::exit::reason as r;
        self.bump(index::EXITS);
        self.bump(stats::reason_index(reason, entry_failed));
        let kvm_named = match reason {
            r::IO_INSTRUCTION => Some(index::IO_EXITS),
            r::EPT_VIOLATION => Some(index::MMIO_EXITS),
            r::HLT => Some(index::HALT_EXITS),
            r::EXTERNAL_INTERRUPT => Some(index::IRQ_EXITS),
            r::INTERRUPT_WINDOW => Some(index::IRQ_WINDOW_EXITS),
            r::NMI_WINDOW => Some(index::NMI_WINDOW_EXITS),
            _ => None,
        };
        if let (false, Some(i)) = (entry_failed, kvm_named) {
            self.bump(i);
        }
    }

    /// KVM_RUN returned because a signal was pending.
    pub(crate) fn signal_exit(&self) {
        self.bump(index::SIGNAL_EXITS);
    }

    fn values(&self) -> [u64; VCPU_STATS.len()] {
        core::array::from_fn(|i| self.0[i].load(Ordering::Relaxed))
    }
}

static STATS_FOPS: FileOps = FileOps::new::<StatsFile>(&crate::THIS_MODULE);

/// The file KVM_GET_STATS_FD returns; it keeps the vCPU alive.
pub(crate) struct StatsFile {
    vcpu: Arc<Vcpu>,
}

/// KVM_GET_STATS_FD on a vCPU fd: a new read-only statistics file.
pub(crate) fn open(vcpu: ArcBorrow<'_, Vcpu>) -> Result<isize> {
    let file = Arc::new(StatsFile { vcpu: vcpu.into() }, GFP_KERNEL)?;
    Ok(file::install(&STATS_FOPS, file)? as isize)
}

impl FileObject for StatsFile {
    const NAME: &'static CStr = c_str!("kvm-vcpu-stats");
    const STATS: bool = true;

    fn ioctl(_this: ArcBorrow<'_, Self>, _cmd: u32, _arg: usize) -> Result<isize> {
        Err(kernel::error::code::ENOTTY)
    }

    /// The image is rendered afresh on every read, so the values are as of
    /// that read (KVM's reads are racy the same way).
    fn read(this: ArcBorrow<'_, Self>, buf: usize, len: usize, offset: &mut i64) -> Result<usize> {
        let size = stats::encoded_len(VCPU_STATS.len());
        let start = usize::try_from(*offset).map_err(|_| EINVAL)?;
        if start >= size || len == 0 {
            return Ok(0);
        }
        let mut image = KVec::from_elem(0u8, size, GFP_KERNEL)?;
        let values = this.vcpu.exit_stats.values();
        stats::encode(&mut image, "rkvm-vcpu", &VCPU_STATS, &values);
        let n = len.min(size - start);
        UserSlice::new(buf, n).writer().write_slice(&image[start..start + n])?;
        *offset += n as i64;
        Ok(n)
    }
}
