//! A virtio block device (virtio 1.1 section 5.2) backed by a raw disk
//! image: a regular file or a host block device. It sits behind the
//! virtio-mmio transport ([`super::virtio_mmio`]), which runs it on the
//! vCPU thread when the driver notifies its one request queue.
//!
//! The model (section references are to virtio 1.1):
//! - Capacity (5.2.4): the image's size in 512-byte sectors. An image whose
//!   size is not a multiple of 512 is refused when the VMM starts, rather
//!   than having its tail hidden from the guest or padded.
//! - Features (5.2.3): VIRTIO_F_VERSION_1; VIRTIO_BLK_F_FLUSH; SEG_MAX, so
//!   that Linux sends requests of up to `seg_max` data buffers (the queue
//!   size less the header and status, as QEMU); VIRTIO_BLK_F_RO for a
//!   read-only image, which is then opened read-only. Not offered: EVENT_IDX
//!   and INDIRECT_DESC (virtio-queue follows an indirect table a driver
//!   uses anyway), BLK_SIZE (512 is the default), DISCARD, WRITE_ZEROES,
//!   CONFIG_WCE, MQ.
//! - Requests (5.2.6): a 16-byte header (type, reserved, sector) in the
//!   device-readable part of the chain, data, and a status byte, the last
//!   device-writable byte. Buffers may be laid out in any way (2.6.4): the
//!   header may span descriptors and share one with the data. IN reads
//!   sectors into the device-writable data, OUT writes the device-readable
//!   data, FLUSH syncs the image (fdatasync), GET_ID returns the serial
//!   (up to 20 bytes, NUL-padded). Any other type completes with
//!   VIRTIO_BLK_S_UNSUPP.
//! - Errors that are the request's, reported with VIRTIO_BLK_S_IOERR and a
//!   log line: a header shorter than 16 bytes, data that is not whole
//!   sectors (5.2.6.1), sectors past the capacity, OUT to a read-only disk
//!   (the image is not touched, 5.2.6.2), GET_ID without room for the
//!   serial, a failed host read, write or sync.
//! - Errors that are the queue's, which need a device reset (see the
//!   transport): a chain without a device-writable byte for the status, a
//!   device-readable buffer after a device-writable one (2.6.4.2), a buffer
//!   outside guest RAM, a chain cut short (next index past the queue, a
//!   loop, a bad indirect table; 2.6.5), an available index more than a
//!   queue ahead (2.6.6), a used ring that cannot be written.
//! - Caching (5.2.5): with FLUSH negotiated the image is written back,
//!   and durable after a FLUSH; without it the device is write-through:
//!   each OUT is synced before it completes.
//! - Used length (2.6.8): every device-writable byte of the chain, the
//!   status byte being the last (as QEMU). Linux does not read it.
//! - Serial: the image's device and inode numbers in hex, stable for as
//!   long as the file exists (as Firecracker derives its disk IDs).

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use virtio_bindings::virtio_blk::{
    virtio_blk_config, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_ID_BYTES,
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::{
    Address, Bytes, GuestAddress, GuestMemory, GuestMemoryError, GuestMemoryMmap, Permissions, ReadVolatile,
    WriteVolatile,
};

use super::virtio_mmio::VirtioDevice;

/// The virtio-blk sector: capacity and request offsets count these.
const SECTOR_SIZE: u64 = 512;
/// Entries in the request queue (QueueNumMax).
const QUEUE_SIZE: u16 = 256;
/// Data buffers in one request: the rest of a full queue after the header
/// and the status.
const SEG_MAX: u32 = QUEUE_SIZE as u32 - 2;
/// struct virtio_blk_outhdr: type, reserved (ioprio), sector.
const HEADER_LEN: usize = 16;
/// Bytes of the GET_ID answer.
const ID_LEN: usize = VIRTIO_BLK_ID_BYTES as usize;
/// The configuration space: struct virtio_blk_config, all of it, zero
/// where a feature is not offered.
const CONFIG_LEN: usize = std::mem::size_of::<virtio_blk_config>();

/// Guest buffers of one direction, in chain order: (address, length), each
/// inside guest RAM and not empty.
#[derive(Clone, Debug, Default)]
struct Buffers(Vec<(GuestAddress, usize)>);

impl Buffers {
    /// Total bytes. A chain holds at most 4 GiB (virtio-queue stops at
    /// that), so the sum cannot overflow.
    fn len(&self) -> usize {
        self.0.iter().map(|&(_, len)| len).sum()
    }

    /// Takes the first `n` bytes off, or `None` if there are fewer.
    fn split_front(&mut self, n: usize) -> Option<Buffers> {
        if self.len() < n {
            return None;
        }
        let (mut front, mut left, mut whole) = (Vec::new(), n, 0);
        for &(addr, len) in &self.0 {
            if left == 0 {
                break;
            }
            if len > left {
                front.push((addr, left));
                break;
            }
            front.push((addr, len));
            left -= len;
            whole += 1;
        }
        self.0.drain(..whole);
        if left > 0 {
            let (addr, len) = &mut self.0[0];
            // Inside the buffer, which is inside guest RAM: no overflow.
            *addr = addr.unchecked_add(left as u64);
            *len -= left;
        }
        Some(Buffers(front))
    }

    /// Takes the last `n` bytes off, or `None` if there are fewer.
    fn split_back(&mut self, n: usize) -> Option<Buffers> {
        let keep = self.len().checked_sub(n)?;
        let back = self.split_front(keep)?;
        Some(std::mem::replace(self, back))
    }

    /// Copies the first `out.len()` bytes into `out`.
    fn read_into(&self, mem: &GuestMemoryMmap, out: &mut [u8]) -> Result<(), GuestMemoryError> {
        let mut out = out;
        for &(addr, len) in &self.0 {
            let n = len.min(out.len());
            let (now, rest) = out.split_at_mut(n);
            mem.read_slice(now, addr)?;
            out = rest;
        }
        Ok(())
    }

    /// Copies `src` to the first `src.len()` bytes.
    fn write_from(&self, mem: &GuestMemoryMmap, src: &[u8]) -> Result<(), GuestMemoryError> {
        let mut src = src;
        for &(addr, len) in &self.0 {
            let (now, rest) = src.split_at(len.min(src.len()));
            mem.write_slice(now, addr)?;
            src = rest;
        }
        Ok(())
    }
}

/// Splits a chain into its device-readable and device-writable buffers,
/// checking that it is well formed.
fn gather(chain: DescriptorChain<&GuestMemoryMmap>, mem: &GuestMemoryMmap) -> Result<(Buffers, Buffers)> {
    let (mut readable, mut writable) = (Buffers::default(), Buffers::default());
    let mut seen_writable = false;
    // virtio-queue ends a chain early, without an error, at a next index
    // past the table, after as many descriptors as the table has (a loop),
    // at a bad indirect table or past 4 GiB; the last descriptor it gave
    // then still has NEXT set. A chain that gives none was cut at its head.
    let mut cut_short = true;
    for desc in chain {
        cut_short = desc.has_next();
        let (addr, len) = (desc.addr(), desc.len() as usize);
        let access = if desc.is_write_only() { Permissions::Write } else { Permissions::Read };
        ensure!(mem.check_range(addr, len, access), "buffer {:#x}+{len:#x} is not in guest RAM", addr.raw_value());
        if desc.is_write_only() {
            seen_writable = true;
            if len > 0 {
                writable.0.push((addr, len));
            }
        } else {
            ensure!(!seen_writable, "a device-readable buffer follows a device-writable one (virtio 1.1, 2.6.4.2)");
            if len > 0 {
                readable.0.push((addr, len));
            }
        }
    }
    ensure!(!cut_short, "the chain is cut short: a head or next index past the queue, a loop, or a bad indirect table");
    Ok((readable, writable))
}

/// A virtio-blk device serving a disk image.
pub struct VirtioBlk {
    file: File,
    /// The image, to name it in logs.
    path: PathBuf,
    read_only: bool,
    /// In sectors.
    capacity: u64,
    /// GET_ID's answer.
    serial: [u8; ID_LEN],
    config: [u8; CONFIG_LEN],
    /// VIRTIO_BLK_F_FLUSH negotiated: writes need not be durable before a
    /// FLUSH.
    writeback: bool,
}

impl VirtioBlk {
    /// Opens the disk image at `path`, read-only if `read_only` (the file
    /// is then opened read-only too).
    ///
    /// # Errors
    /// The image cannot be opened, is neither a regular file nor a block
    /// device, or its size is not a multiple of 512 bytes; the message
    /// names the path.
    pub fn open(path: &Path, read_only: bool) -> Result<Self> {
        let what = if read_only { "read-only" } else { "read-write" };
        let mut file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .with_context(|| format!("cannot open disk image {} {what}", path.display()))?;
        let meta = file.metadata().with_context(|| format!("cannot stat disk image {}", path.display()))?;
        if !meta.file_type().is_file() && !meta.file_type().is_block_device() {
            bail!("disk image {} is neither a regular file nor a block device", path.display());
        }
        // Seeking to the end sizes block devices too, whose metadata says 0.
        let size = file.seek(SeekFrom::End(0)).with_context(|| format!("cannot size disk image {}", path.display()))?;
        if !size.is_multiple_of(SECTOR_SIZE) {
            bail!(
                "disk image {} is {size} bytes, not a whole number of 512-byte sectors \
                 (pad it: truncate -s %512 FILE)",
                path.display()
            );
        }
        let capacity = size / SECTOR_SIZE;

        let mut serial = [0u8; ID_LEN];
        let id = format!("{:x}-{:x}", meta.dev(), meta.ino());
        let n = id.len().min(ID_LEN);
        serial[..n].copy_from_slice(&id.as_bytes()[..n]);

        let mut config = [0u8; CONFIG_LEN];
        config[std::mem::offset_of!(virtio_blk_config, capacity)..][..8].copy_from_slice(&capacity.to_le_bytes());
        config[std::mem::offset_of!(virtio_blk_config, seg_max)..][..4].copy_from_slice(&SEG_MAX.to_le_bytes());

        log::info!("virtio-blk: {} ({what}), {capacity} sectors", path.display());
        Ok(Self { file, path: path.to_path_buf(), read_only, capacity, serial, config, writeback: false })
    }

    /// The byte offset of `sector` if `len` bytes from there are whole
    /// sectors inside the disk.
    fn offset(&self, sector: u64, len: usize) -> Result<u64> {
        ensure!((len as u64).is_multiple_of(SECTOR_SIZE), "{len} bytes of data is not a whole number of sectors");
        let count = len as u64 / SECTOR_SIZE;
        match sector.checked_add(count) {
            // capacity * 512 is the image size: no overflow.
            Some(end) if end <= self.capacity => Ok(sector * SECTOR_SIZE),
            _ => bail!("sectors {sector}+{count} are past the end of the disk ({} sectors)", self.capacity),
        }
    }

    /// IN: the sectors from `sector` into `data`.
    fn read(&mut self, mem: &GuestMemoryMmap, sector: u64, data: &Buffers) -> Result<()> {
        let offset = self.offset(sector, data.len())?;
        self.file.seek(SeekFrom::Start(offset))?;
        for &(addr, len) in &data.0 {
            for slice in mem.get_slices(addr, len, Permissions::Write)? {
                self.file.read_exact_volatile(&mut slice?)?;
            }
        }
        Ok(())
    }

    /// OUT: `data` onto the sectors from `sector`.
    fn write(&mut self, mem: &GuestMemoryMmap, sector: u64, data: &Buffers) -> Result<()> {
        ensure!(!self.read_only, "write to a read-only disk");
        let offset = self.offset(sector, data.len())?;
        self.file.seek(SeekFrom::Start(offset))?;
        for &(addr, len) in &data.0 {
            for slice in mem.get_slices(addr, len, Permissions::Read)? {
                self.file.write_all_volatile(&slice?)?;
            }
        }
        if !self.writeback {
            self.file.sync_data().context("fdatasync")?;
        }
        Ok(())
    }

    /// FLUSH: everything written so far onto stable storage.
    fn flush(&mut self) -> Result<()> {
        if !self.read_only {
            self.file.sync_data().context("fdatasync")?;
        }
        Ok(())
    }

    /// GET_ID: the serial, as much of it as `data` holds.
    fn get_id(&self, mem: &GuestMemoryMmap, data: &Buffers) -> Result<()> {
        ensure!(data.len() > 0, "no room for the serial");
        data.write_from(mem, &self.serial[..data.len().min(ID_LEN)])?;
        Ok(())
    }

    /// Carries out one request; returns its status (VIRTIO_BLK_S_*).
    fn serve(&mut self, mem: &GuestMemoryMmap, mut readable: Buffers, writable: Buffers) -> u8 {
        let Some(header) = readable.split_front(HEADER_LEN) else {
            log::warn!("virtio-blk {}: request shorter than its {HEADER_LEN}-byte header", self.path.display());
            return VIRTIO_BLK_S_IOERR as u8;
        };
        let mut bytes = [0u8; HEADER_LEN];
        if let Err(e) = header.read_into(mem, &mut bytes) {
            log::warn!("virtio-blk {}: cannot read the request header: {e}", self.path.display());
            return VIRTIO_BLK_S_IOERR as u8;
        }
        let [t0, t1, t2, t3, _, _, _, _, sector @ ..] = bytes;
        let (request_type, sector) = (u32::from_le_bytes([t0, t1, t2, t3]), u64::from_le_bytes(sector));
        // The data of IN and GET_ID is the device-writable part before the
        // status; of OUT, the device-readable part after the header. What
        // the other direction holds besides is ignored, as QEMU does.
        let (name, result) = match request_type {
            VIRTIO_BLK_T_IN => ("read", self.read(mem, sector, &writable)),
            VIRTIO_BLK_T_OUT => ("write", self.write(mem, sector, &readable)),
            VIRTIO_BLK_T_FLUSH => ("flush", self.flush()),
            VIRTIO_BLK_T_GET_ID => ("get-id", self.get_id(mem, &writable)),
            _ => {
                log::debug!("virtio-blk {}: request type {request_type} unsupported", self.path.display());
                return VIRTIO_BLK_S_UNSUPP as u8;
            }
        };
        match result {
            Ok(()) => VIRTIO_BLK_S_OK as u8,
            Err(e) => {
                log::warn!("virtio-blk {}: {name} at sector {sector} failed: {e:#}", self.path.display());
                VIRTIO_BLK_S_IOERR as u8
            }
        }
    }

    /// Serves one chain; returns its used length.
    fn execute(&mut self, chain: DescriptorChain<&GuestMemoryMmap>, mem: &GuestMemoryMmap) -> Result<u32> {
        let (readable, mut writable) = gather(chain, mem)?;
        let used_len = u32::try_from(writable.len()).context("chain longer than 4 GiB")?;
        let status = writable.split_back(1).context("no device-writable byte for the status")?;
        let result = self.serve(mem, readable, writable);
        status.write_from(mem, &[result]).context("cannot write the status")?;
        Ok(used_len)
    }
}

impl VirtioDevice for VirtioBlk {
    fn device_id(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn features(&self) -> u64 {
        let ro = if self.read_only { 1 << VIRTIO_BLK_F_RO } else { 0 };
        (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_BLK_F_FLUSH) | (1 << VIRTIO_BLK_F_SEG_MAX) | ro
    }

    fn set_acked_features(&mut self, features: u64) {
        self.writeback = features & (1 << VIRTIO_BLK_F_FLUSH) != 0;
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let start = usize::try_from(offset).unwrap_or(usize::MAX).min(CONFIG_LEN);
        let n = data.len().min(CONFIG_LEN - start);
        data[..n].copy_from_slice(&self.config[start..start + n]);
        data[n..].fill(0);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // Only `writeback` is writable, with CONFIG_WCE, not offered.
        log::debug!("virtio-blk {}: config write {data:02x?} at {offset:#x} ignored", self.path.display());
    }

    fn process_queue(&mut self, _index: usize, queue: &mut Queue, mem: &GuestMemoryMmap) -> Result<bool> {
        let mut used = false;
        loop {
            // A fresh iterator for each chain re-reads the available index
            // and checks it against the queue size.
            let Some(chain) = queue.iter(mem).context("available ring")?.next() else { break };
            let head = chain.head_index();
            let len = self.execute(chain, mem).with_context(|| format!("descriptor chain at {head}"))?;
            queue.add_used(mem, head, len).context("used ring")?;
            used = true;
        }
        Ok(used)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;
    use std::rc::Rc;
    use std::sync::atomic::{AtomicU32, Ordering};

    use virtio_bindings::virtio_config::{
        VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_FEATURES_OK,
        VIRTIO_CONFIG_S_NEEDS_RESET,
    };
    use virtio_bindings::virtio_mmio::{
        VIRTIO_MMIO_CONFIG, VIRTIO_MMIO_CONFIG_GENERATION, VIRTIO_MMIO_DEVICE_FEATURES,
        VIRTIO_MMIO_DEVICE_FEATURES_SEL, VIRTIO_MMIO_DEVICE_ID, VIRTIO_MMIO_DRIVER_FEATURES,
        VIRTIO_MMIO_DRIVER_FEATURES_SEL, VIRTIO_MMIO_INTERRUPT_ACK, VIRTIO_MMIO_INTERRUPT_STATUS,
        VIRTIO_MMIO_INT_CONFIG, VIRTIO_MMIO_INT_VRING, VIRTIO_MMIO_MAGIC_VALUE, VIRTIO_MMIO_QUEUE_AVAIL_HIGH,
        VIRTIO_MMIO_QUEUE_AVAIL_LOW, VIRTIO_MMIO_QUEUE_DESC_HIGH, VIRTIO_MMIO_QUEUE_DESC_LOW, VIRTIO_MMIO_QUEUE_NOTIFY,
        VIRTIO_MMIO_QUEUE_NUM, VIRTIO_MMIO_QUEUE_NUM_MAX, VIRTIO_MMIO_QUEUE_READY, VIRTIO_MMIO_QUEUE_SEL,
        VIRTIO_MMIO_QUEUE_USED_HIGH, VIRTIO_MMIO_QUEUE_USED_LOW, VIRTIO_MMIO_STATUS, VIRTIO_MMIO_VERSION,
    };
    use virtio_bindings::virtio_ring::{VRING_AVAIL_F_NO_INTERRUPT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};

    use crate::bus::MmioDevice;
    use crate::devices::virtio_mmio::VirtioMmio;

    /// A disk image in the temporary directory, removed when dropped.
    struct TempDisk(PathBuf);

    impl TempDisk {
        fn new(contents: &[u8]) -> Self {
            static NEXT: AtomicU32 = AtomicU32::new(0);
            let name = format!("rkvm-virtio-blk-{}-{}.img", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed));
            let path = std::env::temp_dir().join(name);
            std::fs::write(&path, contents).unwrap();
            Self(path)
        }

        /// 8 sectors, sector N filled with N.
        fn numbered() -> Self {
            Self::new(&(0..8u8).flat_map(|n| [n; 512]).collect::<Vec<_>>())
        }

        fn contents(&self) -> Vec<u8> {
            std::fs::read(&self.0).unwrap()
        }
    }

    impl Drop for TempDisk {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    // Guest-physical layout of the driver's side: the queue's parts, then
    // one request's header, data and status.
    const RAM: usize = 1 << 20;
    const QUEUE_NUM: u16 = 16;
    const DESC: u64 = 0x1000;
    const AVAIL: u64 = 0x2000;
    const USED: u64 = 0x3000;
    const HEADER: u64 = 0x1_0000;
    const DATA: u64 = 0x2_0000;
    const STATUS: u64 = 0x3_0000;

    /// A buffer of a chain: address, length, device-writable.
    type Buf = (u64, u32, bool);

    /// The driver's side, as Linux's virtio_mmio and virtio_blk drive the
    /// device: registers through the MMIO interface, rings in guest RAM.
    struct Driver {
        dev: VirtioMmio<VirtioBlk>,
        mem: GuestMemoryMmap,
        pulses: Rc<Cell<u32>>,
        avail_idx: u16,
        used_idx: u16,
    }

    impl Driver {
        /// A device on `disk`, not yet probed.
        fn new(disk: &TempDisk, read_only: bool) -> Self {
            let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), RAM)]).unwrap();
            let pulses = Rc::new(Cell::new(0));
            let counter = pulses.clone();
            let blk = VirtioBlk::open(&disk.0, read_only).unwrap();
            let dev = VirtioMmio::new(blk, mem.clone(), Box::new(move || counter.set(counter.get() + 1)));
            Self { dev, mem, pulses, avail_idx: 0, used_idx: 0 }
        }

        /// A device on `disk`, probed and live, every offered feature accepted.
        fn live(disk: &TempDisk, read_only: bool) -> Self {
            let mut d = Self::new(disk, read_only);
            let features = d.device_features();
            assert_ne!(d.negotiate(features) & VIRTIO_CONFIG_S_FEATURES_OK, 0);
            d.setup_queue();
            d.driver_ok();
            d
        }

        fn read32(&mut self, offset: u32) -> u32 {
            let mut data = [0u8; 4];
            self.dev.read(offset.into(), &mut data);
            u32::from_le_bytes(data)
        }

        fn write32(&mut self, offset: u32, value: u32) {
            self.dev.write(offset.into(), &value.to_le_bytes());
        }

        fn status(&mut self) -> u32 {
            self.read32(VIRTIO_MMIO_STATUS)
        }

        fn add_status(&mut self, bits: u32) {
            let status = self.status();
            self.write32(VIRTIO_MMIO_STATUS, status | bits);
        }

        /// virtio_mmio_probe and the start of virtio_dev_probe: identify,
        /// reset, ACKNOWLEDGE, DRIVER, read the device's features.
        fn device_features(&mut self) -> u64 {
            assert_eq!(self.read32(VIRTIO_MMIO_MAGIC_VALUE), u32::from_le_bytes(*b"virt"));
            assert_eq!(self.read32(VIRTIO_MMIO_VERSION), 2);
            assert_eq!(self.read32(VIRTIO_MMIO_DEVICE_ID), VIRTIO_ID_BLOCK);
            self.write32(VIRTIO_MMIO_STATUS, 0);
            assert_eq!(self.status(), 0, "reset completes at once");
            self.add_status(VIRTIO_CONFIG_S_ACKNOWLEDGE);
            self.add_status(VIRTIO_CONFIG_S_DRIVER);
            self.write32(VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1);
            let high = self.read32(VIRTIO_MMIO_DEVICE_FEATURES);
            self.write32(VIRTIO_MMIO_DEVICE_FEATURES_SEL, 0);
            let low = self.read32(VIRTIO_MMIO_DEVICE_FEATURES);
            u64::from(high) << 32 | u64::from(low)
        }

        /// vm_finalize_features, then FEATURES_OK; returns the status read back.
        fn negotiate(&mut self, features: u64) -> u32 {
            self.write32(VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
            self.write32(VIRTIO_MMIO_DRIVER_FEATURES, (features >> 32) as u32);
            self.write32(VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
            self.write32(VIRTIO_MMIO_DRIVER_FEATURES, features as u32);
            self.add_status(VIRTIO_CONFIG_S_FEATURES_OK);
            self.status()
        }

        /// A 64-bit configuration field: two 32-bit reads inside a
        /// generation check (virtio_cread64 via vm_get).
        fn config64(&mut self, offset: usize) -> u64 {
            let generation = self.read32(VIRTIO_MMIO_CONFIG_GENERATION);
            let at = VIRTIO_MMIO_CONFIG + offset as u32;
            let value = u64::from(self.read32(at)) | u64::from(self.read32(at + 4)) << 32;
            assert_eq!(self.read32(VIRTIO_MMIO_CONFIG_GENERATION), generation);
            value
        }

        /// vm_setup_vq for queue 0.
        fn setup_queue(&mut self) {
            self.write32(VIRTIO_MMIO_QUEUE_SEL, 0);
            assert_eq!(self.read32(VIRTIO_MMIO_QUEUE_READY), 0);
            assert_eq!(self.read32(VIRTIO_MMIO_QUEUE_NUM_MAX), 256);
            self.mem.write_slice(&[0; 0x3000], GuestAddress(DESC)).unwrap();
            self.write32(VIRTIO_MMIO_QUEUE_NUM, QUEUE_NUM.into());
            for (low, high, addr) in [
                (VIRTIO_MMIO_QUEUE_DESC_LOW, VIRTIO_MMIO_QUEUE_DESC_HIGH, DESC),
                (VIRTIO_MMIO_QUEUE_AVAIL_LOW, VIRTIO_MMIO_QUEUE_AVAIL_HIGH, AVAIL),
                (VIRTIO_MMIO_QUEUE_USED_LOW, VIRTIO_MMIO_QUEUE_USED_HIGH, USED),
            ] {
                self.write32(low, addr as u32);
                self.write32(high, (addr >> 32) as u32);
            }
            self.write32(VIRTIO_MMIO_QUEUE_READY, 1);
            assert_eq!(self.read32(VIRTIO_MMIO_QUEUE_READY), 1);
            (self.avail_idx, self.used_idx) = (0, 0);
        }

        fn driver_ok(&mut self) {
            self.add_status(VIRTIO_CONFIG_S_DRIVER_OK);
            assert_ne!(self.status() & VIRTIO_CONFIG_S_DRIVER_OK, 0);
        }

        fn write_desc(&self, index: u16, addr: u64, len: u32, flags: u32, next: u16) {
            let mut raw = [0u8; 16];
            raw[..8].copy_from_slice(&addr.to_le_bytes());
            raw[8..12].copy_from_slice(&len.to_le_bytes());
            raw[12..14].copy_from_slice(&(flags as u16).to_le_bytes());
            raw[14..].copy_from_slice(&next.to_le_bytes());
            self.mem.write_slice(&raw, GuestAddress(DESC + 16 * u64::from(index))).unwrap();
        }

        /// Makes the chain starting at descriptor `head` available and
        /// notifies the device.
        fn kick(&mut self, head: u16) {
            let slot = AVAIL + 4 + 2 * u64::from(self.avail_idx % QUEUE_NUM);
            self.mem.write_obj(head.to_le(), GuestAddress(slot)).unwrap();
            self.avail_idx = self.avail_idx.wrapping_add(1);
            self.mem.write_obj(self.avail_idx.to_le(), GuestAddress(AVAIL + 2)).unwrap();
            self.write32(VIRTIO_MMIO_QUEUE_NOTIFY, 0);
        }

        /// `bufs` as a chain in descriptors 0.., made available.
        fn submit(&mut self, bufs: &[Buf]) {
            for (i, &(addr, len, writable)) in bufs.iter().enumerate() {
                let i = i as u16;
                let last = usize::from(i) + 1 == bufs.len();
                let flags = if writable { VRING_DESC_F_WRITE } else { 0 } | if last { 0 } else { VRING_DESC_F_NEXT };
                self.write_desc(i, addr, len, flags, i + 1);
            }
            self.kick(0);
        }

        /// The next used element, (id, len), if the device put one there.
        fn take_used(&mut self) -> Option<(u32, u32)> {
            let idx: u16 = self.mem.read_obj(GuestAddress(USED + 2)).unwrap();
            if idx == self.used_idx {
                return None;
            }
            let elem = USED + 4 + 8 * u64::from(self.used_idx % QUEUE_NUM);
            self.used_idx = self.used_idx.wrapping_add(1);
            Some((self.mem.read_obj(GuestAddress(elem)).unwrap(), self.mem.read_obj(GuestAddress(elem + 4)).unwrap()))
        }

        /// vm_interrupt: read the cause, acknowledge it.
        fn interrupt(&mut self) -> u32 {
            let cause = self.read32(VIRTIO_MMIO_INTERRUPT_STATUS);
            self.write32(VIRTIO_MMIO_INTERRUPT_ACK, cause);
            cause
        }

        /// A request as virtio_blk builds it: header, data (`out` to write,
        /// or `in_len` bytes to read back), status. Returns the status and
        /// the data read back; checks the completion and its interrupt.
        fn request(&mut self, request_type: u32, sector: u64, out: &[u8], in_len: u32) -> (u8, Vec<u8>) {
            let mut header = [0u8; 16];
            header[..4].copy_from_slice(&request_type.to_le_bytes());
            header[8..].copy_from_slice(&sector.to_le_bytes());
            self.mem.write_slice(&header, GuestAddress(HEADER)).unwrap();
            self.mem.write_slice(out, GuestAddress(DATA)).unwrap();
            self.mem.write_slice(&vec![0xa5; in_len as usize], GuestAddress(DATA)).unwrap();
            self.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
            let mut bufs = vec![(HEADER, 16, false)];
            if !out.is_empty() {
                bufs.push((DATA, out.len() as u32, false));
            }
            if in_len > 0 {
                bufs.push((DATA, in_len, true));
            }
            bufs.push((STATUS, 1, true));
            let pulses = self.pulses.get();
            self.submit(&bufs);
            assert_eq!(self.take_used(), Some((0, in_len + 1)), "completed, with its device-writable length");
            assert_eq!(self.take_used(), None);
            assert_eq!(self.pulses.get(), pulses + 1, "one interrupt");
            assert_eq!(self.interrupt(), VIRTIO_MMIO_INT_VRING);
            assert_eq!(self.read32(VIRTIO_MMIO_INTERRUPT_STATUS), 0, "acknowledged");
            let mut data = vec![0u8; in_len as usize];
            self.mem.read_slice(&mut data, GuestAddress(DATA)).unwrap();
            (self.mem.read_obj(GuestAddress(STATUS)).unwrap(), data)
        }

        fn needs_reset(&mut self) -> bool {
            self.status() & VIRTIO_CONFIG_S_NEEDS_RESET != 0
        }
    }

    const OK: u8 = VIRTIO_BLK_S_OK as u8;
    const IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
    const UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;

    #[test]
    fn linux_probe_sees_a_block_device_with_its_capacity() {
        let disk = TempDisk::numbered();
        let mut d = Driver::new(&disk, false);
        let features = d.device_features();
        assert_eq!(
            features,
            (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_BLK_F_FLUSH) | (1 << VIRTIO_BLK_F_SEG_MAX),
            "no RO on a writable disk"
        );
        assert_ne!(d.negotiate(features) & VIRTIO_CONFIG_S_FEATURES_OK, 0);
        assert_eq!(d.config64(std::mem::offset_of!(virtio_blk_config, capacity)), 8);
        let seg_max = VIRTIO_MMIO_CONFIG + std::mem::offset_of!(virtio_blk_config, seg_max) as u32;
        assert_eq!(d.read32(seg_max), 254);
        d.setup_queue();
        d.driver_ok();
        assert_eq!(d.pulses.get(), 0, "no interrupt before any request");
    }

    #[test]
    fn written_sectors_read_back_and_reach_the_file() {
        let disk = TempDisk::numbered();
        let mut d = Driver::live(&disk, false);
        let data: Vec<u8> = (0..1024u32).map(|i| (i * 7) as u8).collect();
        assert_eq!(d.request(VIRTIO_BLK_T_OUT, 3, &data, 0).0, OK);
        let (status, read) = d.request(VIRTIO_BLK_T_IN, 3, &[], 1024);
        assert_eq!(status, OK);
        assert_eq!(read, data);
        let file = disk.contents();
        assert_eq!(&file[3 * 512..5 * 512], &data[..]);
        assert!(file[..3 * 512].iter().enumerate().all(|(i, &b)| b == (i / 512) as u8), "sectors before untouched");
        assert!(file[5 * 512..].iter().enumerate().all(|(i, &b)| b == (5 + i / 512) as u8), "sectors after untouched");
        assert_eq!(d.request(VIRTIO_BLK_T_IN, 7, &[], 512), (OK, vec![7; 512]), "the last sector");
    }

    #[test]
    fn buffers_may_be_laid_out_in_any_way() {
        // virtio 1.1, 2.6.4: header split across two descriptors, the
        // header's tail and the data in one, data in several pieces, the
        // status sharing the last data descriptor.
        let disk = TempDisk::numbered();
        let mut d = Driver::live(&disk, false);
        let mut header = [0u8; 16];
        header[..4].copy_from_slice(&VIRTIO_BLK_T_OUT.to_le_bytes());
        header[8..].copy_from_slice(&2u64.to_le_bytes());
        d.mem.write_slice(&header[..10], GuestAddress(HEADER)).unwrap();
        d.mem.write_slice(&header[10..], GuestAddress(DATA)).unwrap();
        d.mem.write_slice(&[0x11; 300], GuestAddress(DATA + 6)).unwrap();
        d.mem.write_slice(&[0x22; 724], GuestAddress(DATA + 0x1000)).unwrap();
        d.submit(&[(HEADER, 10, false), (DATA, 6 + 300, false), (DATA + 0x1000, 724, false), (STATUS, 1, true)]);
        assert_eq!(d.take_used(), Some((0, 1)));
        assert_eq!(d.mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(), OK);
        let file = disk.contents();
        assert!(file[1024..1324].iter().all(|&b| b == 0x11) && file[1324..2048].iter().all(|&b| b == 0x22));

        header[..4].copy_from_slice(&VIRTIO_BLK_T_IN.to_le_bytes());
        d.mem.write_slice(&header, GuestAddress(HEADER)).unwrap();
        d.submit(&[(HEADER, 16, false), (DATA, 1000, true), (DATA + 0x1000, 25, true)]);
        assert_eq!(d.take_used(), Some((0, 1025)));
        let mut back = vec![0u8; 1000];
        d.mem.read_slice(&mut back, GuestAddress(DATA)).unwrap();
        assert_eq!(&back[..300], &[0x11; 300][..]);
        assert_eq!(&back[300..], &[0x22; 700][..]);
        let tail: [u8; 25] = d.mem.read_obj(GuestAddress(DATA + 0x1000)).unwrap();
        assert_eq!(&tail[..24], &[0x22; 24][..]);
        assert_eq!(tail[24], OK, "the status is the last device-writable byte");
    }

    #[test]
    fn flush_succeeds_in_writeback_and_writethrough_modes() {
        let disk = TempDisk::numbered();
        let mut d = Driver::live(&disk, false);
        assert!(d.dev_writeback());
        assert_eq!(d.request(VIRTIO_BLK_T_OUT, 0, &[9; 512], 0).0, OK);
        assert_eq!(d.request(VIRTIO_BLK_T_FLUSH, 0, &[], 0).0, OK);
        assert_eq!(&disk.contents()[..512], &[9; 512][..]);

        // A driver that does not know FLUSH gets a write-through disk.
        let mut d = Driver::new(&disk, false);
        let features = d.device_features() & !(1 << VIRTIO_BLK_F_FLUSH);
        assert_ne!(d.negotiate(features) & VIRTIO_CONFIG_S_FEATURES_OK, 0);
        d.setup_queue();
        d.driver_ok();
        assert!(!d.dev_writeback());
        assert_eq!(d.request(VIRTIO_BLK_T_OUT, 1, &[8; 512], 0).0, OK);
        assert_eq!(&disk.contents()[512..1024], &[8; 512][..]);
    }

    #[test]
    fn a_read_only_disk_refuses_writes_and_leaves_the_file_alone() {
        let disk = TempDisk::numbered();
        let before = disk.contents();
        let mut d = Driver::new(&disk, true);
        let features = d.device_features();
        assert_ne!(features & (1 << VIRTIO_BLK_F_RO), 0);
        assert_ne!(d.negotiate(features) & VIRTIO_CONFIG_S_FEATURES_OK, 0);
        d.setup_queue();
        d.driver_ok();
        assert_eq!(d.request(VIRTIO_BLK_T_OUT, 0, &[0xee; 512], 0).0, IOERR);
        assert_eq!(d.request(VIRTIO_BLK_T_IN, 1, &[], 512), (OK, vec![1; 512]));
        assert_eq!(d.request(VIRTIO_BLK_T_FLUSH, 0, &[], 0).0, OK);
        assert_eq!(disk.contents(), before);
    }

    #[test]
    fn requests_past_the_end_or_of_partial_sectors_fail() {
        let disk = TempDisk::numbered();
        let before = disk.contents();
        let mut d = Driver::live(&disk, false);
        assert_eq!(d.request(VIRTIO_BLK_T_IN, 8, &[], 512).0, IOERR, "one past the end");
        assert_eq!(d.request(VIRTIO_BLK_T_IN, 7, &[], 1024).0, IOERR, "straddles the end");
        assert_eq!(d.request(VIRTIO_BLK_T_OUT, 7, &[0; 1024], 0).0, IOERR, "straddles the end");
        assert_eq!(d.request(VIRTIO_BLK_T_IN, u64::MAX, &[], 512).0, IOERR, "sector overflow");
        assert_eq!(d.request(VIRTIO_BLK_T_IN, 0, &[], 100).0, IOERR, "partial sector");
        assert_eq!(d.request(VIRTIO_BLK_T_OUT, 0, &[0; 513], 0).0, IOERR, "partial sector");
        assert_eq!(d.request(VIRTIO_BLK_T_IN, 8, &[], 0).0, OK, "nothing at the end");
        assert_eq!(disk.contents(), before);
        assert!(!d.needs_reset());
    }

    #[test]
    fn get_id_returns_the_serial() {
        let disk = TempDisk::numbered();
        let meta = std::fs::metadata(&disk.0).unwrap();
        let serial = format!("{:x}-{:x}", meta.dev(), meta.ino());
        let mut d = Driver::live(&disk, false);
        let (status, id) = d.request(VIRTIO_BLK_T_GET_ID, 0, &[], 20);
        assert_eq!(status, OK);
        let mut expected = serial.into_bytes();
        expected.resize(20, 0);
        assert_eq!(id, expected);
        let (status, id) = d.request(VIRTIO_BLK_T_GET_ID, 0, &[], 2);
        assert_eq!((status, &id[..]), (OK, &expected[..2]), "as much as fits");
        assert_eq!(d.request(VIRTIO_BLK_T_GET_ID, 0, &[], 0).0, IOERR, "no room");
    }

    #[test]
    fn other_request_types_are_unsupported() {
        let disk = TempDisk::numbered();
        let mut d = Driver::live(&disk, false);
        for request_type in [2, 11, 13, 0x8000_0001] {
            assert_eq!(d.request(request_type, 0, &[], 0).0, UNSUPP, "type {request_type}");
        }
    }

    #[test]
    fn a_short_header_fails_the_request_only() {
        let disk = TempDisk::numbered();
        let mut d = Driver::live(&disk, false);
        d.submit(&[(HEADER, 8, false), (STATUS, 1, true)]);
        assert_eq!(d.take_used(), Some((0, 1)));
        assert_eq!(d.mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(), IOERR);
        assert!(!d.needs_reset());
        assert_eq!(d.request(VIRTIO_BLK_T_IN, 0, &[], 512).0, OK);
    }

    #[test]
    fn malformed_chains_need_a_reset_and_never_panic() {
        let disk = TempDisk::numbered();
        let before = disk.contents();
        let outside = RAM as u64 - 8;
        /// What is wrong, and how the driver gets it wrong.
        type Case<'a> = (&'a str, &'a dyn Fn(&mut Driver));
        let cases: [Case; 9] = [
            ("no device-writable status", &|d| d.submit(&[(HEADER, 16, false), (DATA, 512, false)])),
            ("readable after writable", &|d| d.submit(&[(HEADER, 16, false), (STATUS, 1, true), (DATA, 512, false)])),
            ("data past the end of RAM", &|d| {
                d.submit(&[(HEADER, 16, false), (outside, 512, true), (STATUS, 1, true)])
            }),
            ("status past the end of RAM", &|d| d.submit(&[(HEADER, 16, false), (RAM as u64, 1, true)])),
            ("next index past the queue", &|d| {
                d.write_desc(0, HEADER, 16, VRING_DESC_F_NEXT, QUEUE_NUM);
                d.kick(0);
            }),
            ("a loop", &|d| {
                d.write_desc(0, HEADER, 16, VRING_DESC_F_NEXT, 1);
                d.write_desc(1, DATA, 512, VRING_DESC_F_NEXT | VRING_DESC_F_WRITE, 2);
                d.write_desc(2, STATUS, 1, VRING_DESC_F_NEXT | VRING_DESC_F_WRITE, 1);
                d.kick(0);
            }),
            ("head index past the queue", &|d| d.kick(QUEUE_NUM + 3)),
            ("available index a queue ahead", &|d| {
                d.submit(&[(HEADER, 16, false), (STATUS, 1, true)]);
                // Claim QUEUE_NUM + 1 new entries at once.
                d.avail_idx = d.avail_idx.wrapping_add(QUEUE_NUM);
                d.kick(0);
            }),
            ("indirect table of a bad length", &|d| {
                d.write_desc(0, DATA, 17, 4 /* VRING_DESC_F_INDIRECT */, 0);
                d.kick(0);
            }),
        ];
        for (what, submit) in cases {
            let mut d = Driver::live(&disk, false);
            let pulses = d.pulses.get();
            submit(&mut d);
            assert!(d.needs_reset(), "{what}: DEVICE_NEEDS_RESET");
            assert!(d.pulses.get() > pulses, "{what}: interrupt");
            assert_ne!(d.interrupt() & VIRTIO_MMIO_INT_CONFIG, 0, "{what}: configuration change");
            // The queue is left alone until a reset, after which all is well.
            d.used_idx = d.mem.read_obj(GuestAddress(USED + 2)).unwrap();
            d.submit(&[(HEADER, 16, false), (STATUS, 1, true)]);
            assert_eq!(d.take_used(), None, "{what}: nothing served before the reset");
            let features = d.device_features();
            d.negotiate(features);
            d.setup_queue();
            d.driver_ok();
            assert_eq!(d.request(VIRTIO_BLK_T_IN, 2, &[], 512), (OK, vec![2; 512]), "{what}: after the reset");
        }
        assert_eq!(disk.contents(), before);
    }

    #[test]
    fn the_driver_can_suppress_interrupts() {
        let disk = TempDisk::numbered();
        let mut d = Driver::live(&disk, false);
        d.mem.write_obj((VRING_AVAIL_F_NO_INTERRUPT as u16).to_le(), GuestAddress(AVAIL)).unwrap();
        d.mem.write_slice(&[0; 16], GuestAddress(HEADER)).unwrap();
        d.submit(&[(HEADER, 16, false), (DATA, 512, true), (STATUS, 1, true)]);
        assert_eq!(d.take_used(), Some((0, 513)), "served");
        assert_eq!(d.pulses.get(), 0, "without an interrupt");
        assert_eq!(d.read32(VIRTIO_MMIO_INTERRUPT_STATUS), 0);
    }

    #[test]
    fn several_chains_complete_in_one_notification() {
        let disk = TempDisk::numbered();
        let mut d = Driver::live(&disk, false);
        for (i, sector) in [5u64, 6].into_iter().enumerate() {
            let hdr = HEADER + 16 * i as u64;
            let mut header = [0u8; 16];
            header[8..].copy_from_slice(&sector.to_le_bytes());
            d.mem.write_slice(&header, GuestAddress(hdr)).unwrap();
            let base = 3 * i as u16;
            d.write_desc(base, hdr, 16, VRING_DESC_F_NEXT, base + 1);
            d.write_desc(base + 1, DATA + 512 * i as u64, 512, VRING_DESC_F_NEXT | VRING_DESC_F_WRITE, base + 2);
            d.write_desc(base + 2, STATUS + i as u64, 1, VRING_DESC_F_WRITE, 0);
            let slot = AVAIL + 4 + 2 * u64::from(d.avail_idx);
            d.mem.write_obj(base.to_le(), GuestAddress(slot)).unwrap();
            d.avail_idx += 1;
        }
        d.mem.write_obj(d.avail_idx.to_le(), GuestAddress(AVAIL + 2)).unwrap();
        d.write32(VIRTIO_MMIO_QUEUE_NOTIFY, 0);
        assert_eq!((d.take_used(), d.take_used(), d.take_used()), (Some((0, 513)), Some((3, 513)), None));
        assert_eq!(d.pulses.get(), 1);
        let mut data = [0u8; 1024];
        d.mem.read_slice(&mut data, GuestAddress(DATA)).unwrap();
        assert!(data[..512].iter().all(|&b| b == 5) && data[512..].iter().all(|&b| b == 6));
    }

    #[test]
    fn images_that_cannot_serve_are_refused_with_their_path() {
        let missing = std::env::temp_dir().join("rkvm-virtio-blk-no-such-image");
        let err = VirtioBlk::open(&missing, false).err().unwrap();
        assert!(format!("{err:#}").contains("rkvm-virtio-blk-no-such-image"), "{err:#}");
        let odd = TempDisk::new(&[0; 1000]);
        let err = VirtioBlk::open(&odd.0, true).err().unwrap();
        assert!(format!("{err:#}").contains("512"), "{err:#}");
        assert!(format!("{err:#}").contains(&*odd.0.to_string_lossy()), "{err:#}");
        let err = VirtioBlk::open(&std::env::temp_dir(), true).err().unwrap();
        assert!(format!("{err:#}").contains("regular file"), "{err:#}");
        let empty = TempDisk::new(&[]);
        assert_eq!(VirtioBlk::open(&empty.0, false).unwrap().capacity, 0, "an empty disk is a disk");
    }

    #[test]
    fn buffers_split_at_any_byte() {
        let mut bufs = Buffers(vec![(GuestAddress(0x100), 10), (GuestAddress(0x200), 6)]);
        let front = bufs.split_front(12).unwrap();
        assert_eq!(front.0, [(GuestAddress(0x100), 10), (GuestAddress(0x200), 2)]);
        assert_eq!(bufs.0, [(GuestAddress(0x202), 4)]);
        let back = bufs.split_back(1).unwrap();
        assert_eq!((bufs.0, back.0), (vec![(GuestAddress(0x202), 3)], vec![(GuestAddress(0x205), 1)]));
        let mut bufs = Buffers(vec![(GuestAddress(0x100), 4)]);
        assert!(bufs.split_front(5).is_none() && bufs.split_back(5).is_none());
        assert_eq!(bufs.split_front(4).unwrap().0, [(GuestAddress(0x100), 4)]);
        assert!(bufs.0.is_empty());
    }

    impl Driver {
        fn dev_writeback(&self) -> bool {
            self.dev.device().writeback
        }
    }
}
