//! `dsa`: Intel Data Streaming Accelerator channels through an idxd user work queue
//! (`/dev/dsa/wqX.Y`), built from the kernel's `linux/idxd.h` ABI.
//!
//! Each copy is one 64-byte MEMMOVE descriptor with its own 32-byte completion record, kept
//! in two rings owned by the channel. `submit` writes the descriptors enqueued since the last
//! submit to the work queue's portal: MOVDIR64B for a dedicated queue, ENQCMD (retried while
//! the queue is full) for a shared one. Completion is polled in ring order from the records'
//! status byte. A descriptor that could not be written to the portal never reaches the
//! device; it is reported as [`DmaFault::NotSubmitted`]. Page faults are not blocked on
//! (no BOF flag): the device reports them, and the engine redoes the copy on the CPU.
//!
//! Invariants, each tested with a mock portal (`dsa/tests.rs`):
//! - **Never more outstanding than the queue holds.** MOVDIR64B reports nothing: a descriptor
//!   written to a dedicated queue whose entries are all taken is dropped by the device, and
//!   its copy would never complete. The channel reads the queue's `size` from sysfs and never
//!   has more than `min(ring, size)` operations between enqueue and report (a shared queue
//!   pushes back through ENQCMD, so only the ring bounds it).
//! - **A bounded wake-up.** A user work queue raises no interrupt, so `completion_fd` is a
//!   one-shot timer: `arm_notification` with copies outstanding makes it readable
//!   [`POLL_INTERVAL`] later, and a worker that waits on it polls the completion records at
//!   least that often while copies are in flight (the vhost RX path re-arms after every pass
//!   that leaves copies in flight).
//! - **No write into freed memory.** Dropping the channel waits (bounded) for the device to
//!   finish every descriptor it was given, then closes the queue (the kernel drains it on
//!   release); completion records the device may still write are leaked, never freed.
//!
//! What has run where: the descriptor and completion-record encodings are tested against
//! `linux/idxd.h` on every machine (see the tests); the portal, the instructions and the
//! device's behaviour have not run on DSA hardware in this project (none was available).
//! The channel checks for the work queue and the CPU instructions and refuses to open when
//! either is missing.

use std::{
    os::fd::{AsFd, BorrowedFd},
    path::Path,
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, Instant},
};

use self::wq::{Closed, MmapPortal, Portal, Timer, WqAttrs, sysfs_dir};
use super::channel::{ChannelKind, Completed, DmaChannel, DmaError, DmaFault, OpStatus};

mod wq;

/// `DSA_OPCODE_MEMMOVE`.
pub const OPCODE_MEMMOVE: u8 = 3;
/// `IDXD_OP_FLAG_BOF`: block on fault.
pub const FLAG_BOF: u32 = 0x0002;
/// `IDXD_OP_FLAG_CRAV`: the completion record address is valid.
pub const FLAG_CRAV: u32 = 0x0004;
/// `IDXD_OP_FLAG_RCR`: request a completion record.
pub const FLAG_RCR: u32 = 0x0008;
/// `IDXD_OP_FLAG_CC`: write the destination into the cache (the consumer reads it soon).
pub const FLAG_CC: u32 = 0x0100;
/// `DSA_COMP_NONE`: not done yet.
pub const COMP_NONE: u8 = 0;
/// `DSA_COMP_SUCCESS`.
pub const COMP_SUCCESS: u8 = 1;
/// `DSA_COMP_PAGE_FAULT_NOBOF`.
pub const COMP_PAGE_FAULT_NOBOF: u8 = 3;
/// `DSA_COMP_PAGE_FAULT_IR`.
pub const COMP_PAGE_FAULT_IR: u8 = 4;
/// `DSA_COMP_BAD_OPCODE`: the first of the descriptor-check errors (0x10–0x1f).
pub const COMP_BAD_OPCODE: u8 = 0x10;
/// `DSA_COMP_STATUS_MASK`.
pub const COMP_STATUS_MASK: u8 = 0x7f;
/// The largest transfer a descriptor takes here (the device's limit is configurable and at
/// least 2 MiB; packets are far smaller).
pub const MAX_XFER: u32 = 1 << 21;
/// Our private marker in a completion record: never handed to the device.
const NOT_SUBMITTED: u8 = 0xff;
/// How long after `arm_notification` the completion timer fires while copies are outstanding.
/// DSA finishes a packet-sized copy in one to two microseconds; 10 µs bounds how long a
/// finished copy waits for a sleeping worker, at a cost of at most 100,000 wake-ups a second,
/// and only while copies are in flight.
pub const POLL_INTERVAL: Duration = Duration::from_micros(10);
/// How long dropping a channel waits for the device to finish the descriptors it was given.
const DROP_WAIT: Duration = Duration::from_millis(100);
/// Completion records leaked by channels dropped while the device still owed them a write.
static LEAKED_RECORDS: AtomicU64 = AtomicU64::new(0);

/// `struct dsa_hw_desc` (64 bytes, packed in the header; every field is naturally aligned).
#[repr(C, align(64))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HwDesc {
    /// `pasid:20, rsvd:11, priv:1`.
    pub pasid_priv: u32,
    /// `flags:24, opcode:8`.
    pub flags_opcode: u32,
    /// `completion_addr`.
    pub completion_addr: u64,
    /// `src_addr`.
    pub src_addr: u64,
    /// `dst_addr`.
    pub dst_addr: u64,
    /// `xfer_size`.
    pub xfer_size: u32,
    /// `int_handle`.
    pub int_handle: u16,
    /// `rsvd1`.
    pub rsvd1: u16,
    /// The operation-specific union (unused by MEMMOVE, must be zero).
    pub op_specific: [u8; 24],
}

impl HwDesc {
    /// A MEMMOVE of `len` bytes from `src` to `dst` that writes its completion to `comp`.
    pub fn memmove(src: u64, dst: u64, len: u32, comp: u64) -> HwDesc {
        HwDesc {
            flags_opcode: (FLAG_CRAV | FLAG_RCR | FLAG_CC) | (u32::from(OPCODE_MEMMOVE) << 24),
            completion_addr: comp,
            src_addr: src,
            dst_addr: dst,
            xfer_size: len,
            ..HwDesc::default()
        }
    }

    /// The opcode field.
    pub fn opcode(&self) -> u8 {
        (self.flags_opcode >> 24) as u8
    }

    /// The flags field.
    pub fn flags(&self) -> u32 {
        self.flags_opcode & 0x00ff_ffff
    }
}

/// `struct dsa_completion_record` (32 bytes).
#[repr(C, align(32))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CompletionRecord {
    /// `status` (written by the device last).
    pub status: u8,
    /// `result`.
    pub result: u8,
    /// `rsvd`.
    pub rsvd: u16,
    /// `bytes_completed` (on a page fault: how far it got).
    pub bytes_completed: u32,
    /// `fault_addr`.
    pub fault_addr: u64,
    /// The operation-specific union.
    pub op_specific: [u8; 16],
}

/// The status of a completion record as the channel reports it; `None` while not done.
pub fn decode_status(status: u8) -> Option<OpStatus> {
    if status == NOT_SUBMITTED {
        return Some(OpStatus::Failed(DmaFault::NotSubmitted));
    }
    match status & COMP_STATUS_MASK {
        COMP_NONE => None,
        COMP_SUCCESS => Some(OpStatus::Success),
        COMP_PAGE_FAULT_NOBOF | COMP_PAGE_FAULT_IR => Some(OpStatus::Failed(DmaFault::PageFault)),
        s if (COMP_BAD_OPCODE..0x20).contains(&s) => {
            Some(OpStatus::Failed(DmaFault::InvalidDescriptor))
        }
        s => Some(OpStatus::Failed(DmaFault::Device(s))),
    }
}

/// Whether this CPU has MOVDIR64B and ENQCMD (CPUID leaf 7, ECX bits 28 and 29).
pub fn cpu_support() -> (bool, bool) {
    let leaf = std::arch::x86_64::__cpuid_count(7, 0);
    (leaf.ecx & (1 << 28) != 0, leaf.ecx & (1 << 29) != 0)
}

/// A DSA work queue as a DMA channel.
pub struct DsaChannel {
    name: String,
    portal: Box<dyn Portal>,
    timer: Timer,
    descs: Box<[HwDesc]>,
    comps: Box<[CompletionRecord]>,
    /// Operations between enqueue and report at most: the ring, and for a dedicated queue
    /// no more than its size.
    capacity: u64,
    max_xfer: u32,
    drop_wait: Duration,
    enqueued: u64,
    submitted: u64,
    reported: u64,
}

impl std::fmt::Debug for DsaChannel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DsaChannel")
            .field("name", &self.name)
            .field("capacity", &self.capacity)
            .field("outstanding", &(self.enqueued - self.reported))
            .finish()
    }
}

impl DsaChannel {
    /// Opens work queue `path` (`/dev/dsa/wq0.0`) with `ring` descriptors (rounded up to a
    /// power of two); a dedicated queue holds no more than its sysfs `size` of them.
    pub fn open(path: &Path, ring: u16) -> Result<DsaChannel, DmaError> {
        if !path.exists() {
            return Err(DmaError::Unavailable(format!(
                "no Intel DSA work queue at {} (this machine has {}); use the sw channel instead",
                path.display(),
                if Path::new("/dev/dsa").exists() {
                    "other work queues under /dev/dsa"
                } else {
                    "no /dev/dsa"
                }
            )));
        }
        let wq = WqAttrs::read(&sysfs_dir(path))?;
        let (movdir64b, enqcmd) = cpu_support();
        if wq.dedicated && !movdir64b || !wq.dedicated && !enqcmd {
            return Err(DmaError::Unavailable(format!(
                "{} is a {} work queue but this CPU lacks {}",
                path.display(),
                if wq.dedicated { "dedicated" } else { "shared" },
                if wq.dedicated { "MOVDIR64B" } else { "ENQCMD" }
            )));
        }
        let portal = MmapPortal::map(path, wq.dedicated)?;
        let name = format!(
            "dsa/{}",
            path.file_name()
                .map(|n| n.to_string_lossy())
                .unwrap_or_default()
        );
        DsaChannel::with_portal(name, wq, ring, Box::new(portal), POLL_INTERVAL, DROP_WAIT)
    }

    /// The channel around any portal (tests give a mock device).
    fn with_portal(
        name: String,
        wq: WqAttrs,
        ring: u16,
        portal: Box<dyn Portal>,
        poll: Duration,
        drop_wait: Duration,
    ) -> Result<DsaChannel, DmaError> {
        let slots = usize::from(ring.max(2)).next_power_of_two();
        let capacity = if wq.dedicated {
            (slots as u64).min(u64::from(wq.size))
        } else {
            slots as u64
        };
        Ok(DsaChannel {
            name,
            portal,
            timer: Timer::new(poll)?,
            descs: vec![HwDesc::default(); slots].into_boxed_slice(),
            comps: vec![CompletionRecord::default(); slots].into_boxed_slice(),
            capacity,
            max_xfer: u32::try_from(wq.max_transfer.min(u64::from(MAX_XFER))).unwrap_or(MAX_XFER),
            drop_wait,
            enqueued: 0,
            submitted: 0,
            reported: 0,
        })
    }

    fn slot(&self, seq: u64) -> usize {
        (seq % self.descs.len() as u64) as usize
    }

    fn status(&self, seq: u64) -> u8 {
        let rec = &self.comps[self.slot(seq)];
        // SAFETY: `rec.status` is a valid, aligned u8 in our ring; the device writes it
        // asynchronously, hence the volatile read.
        unsafe { std::ptr::read_volatile(&raw const rec.status) }
    }

    /// Descriptors handed to the device that it has not finished.
    fn device_outstanding(&self) -> u64 {
        (self.reported..self.submitted)
            .filter(|&seq| decode_status(self.status(seq)).is_none())
            .count() as u64
    }

    /// Polls until the device has finished everything it was given or `limit` passed;
    /// returns how many it still owes.
    fn wait_for_device(&self, limit: Duration) -> u64 {
        let start = Instant::now();
        loop {
            let left = self.device_outstanding();
            if left == 0 || start.elapsed() >= limit {
                return left;
            }
            std::thread::sleep(Duration::from_micros(20));
        }
    }
}

impl DmaChannel for DsaChannel {
    fn kind(&self) -> ChannelKind {
        ChannelKind::Dsa
    }

    fn name(&self) -> &str {
        &self.name
    }

    unsafe fn copy(&mut self, src: *const u8, dst: *mut u8, len: u32) -> Result<u16, DmaError> {
        if len > self.max_xfer {
            return Err(DmaError::TooLong {
                len: u64::from(len),
                max: u64::from(self.max_xfer),
            });
        }
        if self.enqueued - self.reported >= self.capacity {
            return Err(DmaError::Full);
        }
        let slot = self.slot(self.enqueued);
        self.comps[slot] = CompletionRecord::default();
        let comp = std::ptr::from_ref(&self.comps[slot]) as u64;
        self.descs[slot] = HwDesc::memmove(src as u64, dst as u64, len, comp);
        let idx = self.enqueued as u16;
        self.enqueued += 1;
        Ok(idx)
    }

    fn submit(&mut self) -> Result<(), DmaError> {
        // The zeroed completion records and the descriptors must be in memory before the
        // device can see a descriptor.
        std::sync::atomic::fence(Ordering::SeqCst);
        let mut lost = 0;
        while self.submitted < self.enqueued {
            let slot = self.slot(self.submitted);
            if !self.portal.write(&self.descs[slot]) {
                self.comps[slot].status = NOT_SUBMITTED;
                lost += 1;
            }
            self.submitted += 1;
        }
        if lost > 0 {
            return Err(DmaError::Submit(format!(
                "{}: shared work queue stayed full for {lost} descriptors",
                self.name
            )));
        }
        Ok(())
    }

    fn completed(&mut self, max: u16) -> Completed {
        let mut done = Completed::default();
        while done.count < max && self.reported < self.submitted {
            match decode_status(self.status(self.reported)) {
                None => break,
                Some(OpStatus::Success) => {
                    done.last_idx = self.reported as u16;
                    done.count += 1;
                    self.reported += 1;
                }
                Some(OpStatus::Failed(_)) => {
                    done.has_error = true;
                    break;
                }
            }
        }
        // The device wrote each destination before its record: read them after the records.
        std::sync::atomic::fence(Ordering::Acquire);
        done
    }

    fn completed_status(&mut self, status: &mut [OpStatus]) -> u16 {
        let mut n = 0;
        while n < status.len() && self.reported < self.submitted {
            let Some(s) = decode_status(self.status(self.reported)) else {
                break;
            };
            status[n] = s;
            n += 1;
            self.reported += 1;
        }
        std::sync::atomic::fence(Ordering::Acquire);
        n as u16
    }

    fn burst_capacity(&self) -> u16 {
        u16::try_from(self.capacity - (self.enqueued - self.reported)).unwrap_or(u16::MAX)
    }

    /// A timer, not an interrupt: after `arm_notification` with copies outstanding it
    /// becomes readable [`POLL_INTERVAL`] later, whether or not anything completed.
    fn completion_fd(&self) -> Option<BorrowedFd<'_>> {
        Some(self.timer.fd.as_fd())
    }

    fn arm_notification(&mut self) {
        if self.submitted > self.reported {
            self.timer.arm();
        }
    }

    fn clear_notification(&mut self) {
        self.timer.clear();
    }
}

impl Drop for DsaChannel {
    fn drop(&mut self) {
        let mut owed = self.wait_for_device(self.drop_wait);
        // Unmaps the portal and closes the queue; on release the kernel drains it.
        self.portal = Box::new(Closed);
        if owed > 0 {
            owed = self.device_outstanding();
        }
        if owed > 0 {
            let records = std::mem::take(&mut self.comps);
            let leaked = records.len() as u64;
            Box::leak(records);
            let total = LEAKED_RECORDS.fetch_add(leaked, Ordering::Relaxed) + leaked;
            tracing::warn!(
                channel = %self.name,
                owed,
                leaked_bytes = leaked * size_of::<CompletionRecord>() as u64,
                total_leaked_records = total,
                "DMA channel closed while the device still owed completions; its completion \
                 records are leaked rather than freed, so a late device write cannot land in \
                 reused memory"
            );
        }
    }
}

#[cfg(test)]
mod tests;
