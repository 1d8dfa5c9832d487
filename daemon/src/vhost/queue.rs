//! Moving frames in and out of split virtqueues, trusting nothing the guest wrote.
//!
//! TX: one descriptor chain is one frame (the 12-byte virtio-net header, then the Ethernet
//! frame), read descriptor by descriptor through vm-memory's bounds-checked accesses; the
//! datapath's burst reads each chain's first descriptor and writes its used entry through
//! the rings' places in the mapping, found and checked once per burst ([`SplitRing`]), and
//! copies a chain that is one descriptor in one piece ([`Linear`]) with one `memcpy`.
//! RX: a frame is written behind a header into one chain, or, with MRG_RXBUF, into as many
//! chains as it needs (`num_buffers` in the first header); if the queue runs out midway, the
//! chains taken are given back to the avail ring untouched as far as the guest can see (the
//! used ring was not written) and the caller decides (the datapath drops the frame, counted).
//!
//! A chain is malformed when it points outside guest memory, loops or runs past the queue
//! (the descriptor iterator stops while the last descriptor still says NEXT), mixes the
//! wrong direction of descriptors, is shorter than a header and an Ethernet header, or its
//! frame spans more than [`MAX_DESCRIPTORS`] (indirect tables and, on RX, every chain the
//! frame takes included). Such chains are completed with length 0 and counted; nothing is
//! read or written outside guest memory, and nothing panics.

use std::ops::Deref;

use virtio_bindings::virtio_ring::VRING_AVAIL_F_NO_INTERRUPT;
use virtio_queue::{
    DescriptorChain, Queue, QueueOwnedT, QueueT, desc::split::Descriptor as SplitDescriptor,
};
use vm_memory::{
    Address, Bytes, GuestMemory, GuestMemoryBackend, GuestMemoryRegion, GuestRegionMmap,
    VolatileSlice, bitmap::BitmapSlice,
};

use super::{
    dirty::{DirtyPages, GuestMem},
    net::{HDR_LEN, HDR_NUM_BUFFERS, MAX_FRAME},
};

/// Room for the largest chain the backend reads: a header and the largest frame.
pub const TX_BUF: usize = HDR_LEN + MAX_FRAME;

/// Descriptors one frame may span, over all its chains and their indirect tables: a frame
/// that spans more is malformed. DPDK's vhost gives a packet at most 256 (`BUF_VECTOR_MAX`);
/// Linux's driver sends at most `MAX_SKB_FRAGS` + 2 (19 by default). Without a bound,
/// virtio-queue follows an indirect table of up to 65535 descriptors (and a chain as long as
/// the queue), so a guest offering many chains that share one such table would have the
/// worker read 65535 descriptors for each, for every frame, stalling every port it serves.
pub const MAX_DESCRIPTORS: usize = 256;

/// What one TX chain held.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TxChain {
    /// A frame of this many bytes, at `buf[HDR_LEN..HDR_LEN + len]`.
    Frame(usize),
    /// Longer than the backend moves.
    Oversize,
    /// See the module doc.
    Malformed,
}

/// The queue could not be read at all: the guest's avail index is inconsistent (it jumped by
/// more than the queue size) or the ring is outside guest memory. The queue must stop until
/// the device is reset.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Broken;

/// Whether the backend may touch `queue` at all: the frontend has set it up (its addresses
/// are valid) and started it. A queue that is not ready has ring addresses of 0 or of the
/// last guest, and anything read or written through it is some other part of guest memory.
pub fn serving(queue: &Queue, enabled: bool) -> bool {
    queue.ready() && enabled
}

/// Asks the guest to notify when it makes more buffers available (EVENT_IDX): `avail_event`
/// is set to the guest's *current* avail index, not to the backend's position (which the
/// guest may have passed already when it made fewer buffers available than a frame needs:
/// then it would never kick again). Returns whether the guest added buffers meanwhile, in
/// which case the caller looks once more; it must bound how often it does (a guest can make
/// this true forever).
pub fn notify_on_more<M: GuestMemory>(queue: &Queue, mem: &M) -> Result<bool, Broken> {
    use std::sync::atomic::{Ordering, fence};
    let seen = queue
        .avail_idx(mem, Ordering::Acquire)
        .map_err(|_| Broken)?
        .0;
    // `avail_event` follows the used ring's elements (virtio 1.x, 2.7.8).
    let avail_event = queue
        .used_ring()
        .checked_add(4 + 8 * u64::from(queue.size()))
        .ok_or(Broken)?;
    mem.store(
        u16::to_le(seen),
        vm_memory::GuestAddress(avail_event),
        Ordering::Relaxed,
    )
    .map_err(|_| Broken)?;
    // The store must be visible before the avail index is read again.
    fence(Ordering::SeqCst);
    let now = queue
        .avail_idx(mem, Ordering::Acquire)
        .map_err(|_| Broken)?
        .0;
    Ok(now != seen)
}

/// Asks the driver not to kick `queue` while the worker polls it: `VRING_USED_F_NO_NOTIFY`
/// in the used ring's flags (a driver without EVENT_IDX, such as DPDK's virtio PMD, kicks
/// after every burst otherwise). With EVENT_IDX nothing is written: the driver kicks only
/// when its avail index passes `avail_event`, which stays behind while the worker polls.
pub fn quiet_kicks<M: GuestMemory>(queue: &mut Queue, mem: &M) -> Result<(), Broken> {
    queue.disable_notification(mem).map_err(|_| Broken)
}

/// Asks the driver to kick TX `queue` when it adds a chain (the worker is about to sleep),
/// and says whether there is one to take already, in which case the caller looks again
/// rather than sleeps: with EVENT_IDX `avail_event` is set to the backend's position, without
/// it the used ring's flags are cleared; then the avail index is compared with the backend's
/// position (a chain the guest added since the worker's last look, without kicking, is
/// found here). Not for an RX queue short of buffers: see [`notify_on_more`].
pub fn want_kicks<M: GuestMemory>(queue: &mut Queue, mem: &M) -> Result<bool, Broken> {
    queue.enable_notification(mem).map_err(|_| Broken)
}

/// Whether the driver wants to be told (its call eventfd written) of the used entries just
/// added. With EVENT_IDX its `used_event` says; without, `VRING_AVAIL_F_NO_INTERRUPT` in the
/// avail ring's flags, which a polling driver sets (virtio-queue 0.18 ignores that flag,
/// which would cost a write to an eventfd nobody reads after every burst).
pub fn needs_call<M: GuestMemory>(queue: &mut Queue, mem: &M) -> bool {
    use std::sync::atomic::{Ordering, fence};
    if queue.event_idx_enabled() {
        return queue.needs_notification(mem).unwrap_or(true);
    }
    // The used entries must be visible before the flags are read.
    fence(Ordering::SeqCst);
    interrupts_wanted(queue, mem).unwrap_or(true)
}

/// Whether a driver without EVENT_IDX left `VRING_AVAIL_F_NO_INTERRUPT` clear in the avail
/// ring's flags (a polling driver sets it); `Broken` when the ring is not in guest memory.
fn interrupts_wanted<M: GuestMemory>(queue: &Queue, mem: &M) -> Result<bool, Broken> {
    let flags = mem
        .load::<u16>(
            vm_memory::GuestAddress(queue.avail_ring()),
            std::sync::atomic::Ordering::Relaxed,
        )
        .map_err(|_| Broken)?;
    Ok(u16::from_le(flags) & VRING_AVAIL_F_NO_INTERRUPT as u16 == 0)
}

/// Used entries of one burst, written to the used ring one by one as their chains are done
/// and made visible to the driver together, by one store of the used index in
/// [`UsedBurst::publish`] (DPDK's vhost flushes its shadow used ring once per burst too). The
/// driver's core polls that index: a store of it per chain would take its cache line away
/// from that core, and back, once per frame.
///
/// For the queue's worker alone, under the vring's lock, from [`UsedBurst::new`] to
/// `publish`: nothing else adds used entries meanwhile.
#[derive(Debug)]
pub struct UsedBurst {
    start: u16,
    added: u16,
}

impl UsedBurst {
    /// A burst of used entries that starts at `queue`'s next used position.
    pub fn new(queue: &Queue) -> Self {
        Self {
            start: queue.next_used(),
            added: 0,
        }
    }

    /// How many entries the burst holds.
    pub fn len(&self) -> usize {
        usize::from(self.added)
    }

    /// Whether the burst holds no entry.
    pub fn is_empty(&self) -> bool {
        self.added == 0
    }

    /// Writes the used entry of chain `head` (`len` bytes written into it) after the burst's
    /// others, into `ring`'s used ring; the driver sees it only at [`UsedBurst::publish`].
    /// `Broken` when the head is not one of the queue's descriptors or the used ring is not in
    /// guest memory.
    pub fn push(&mut self, ring: &SplitRing<'_>, head: u16, len: u32) -> Result<(), Broken> {
        let size = ring.size;
        if head >= size {
            return Err(Broken);
        }
        let slot = self.start.wrapping_add(self.added) % size;
        ring.write_used(slot, head, len)?;
        self.added += 1;
        Ok(())
    }

    /// Makes the burst's entries visible to the driver (the used index moves past them, with
    /// release ordering) and says whether the driver wants to be told of them, as
    /// [`needs_call`] does: with EVENT_IDX, whether its `used_event` lies among exactly this
    /// burst's entries; without, whether it left `VRING_AVAIL_F_NO_INTERRUPT` clear. `Broken`
    /// when the index or the driver's wishes cannot be reached: if the entries were made
    /// visible, the caller had better call the driver anyway before it stops the queue.
    pub fn publish<M: GuestMemory>(self, queue: &mut Queue, mem: &M) -> Result<bool, Broken> {
        use std::sync::atomic::{Ordering, fence};
        if self.added == 0 {
            return Ok(false);
        }
        let new = self.start.wrapping_add(self.added);
        let index = queue.used_ring().checked_add(2).ok_or(Broken)?;
        mem.store(
            u16::to_le(new),
            vm_memory::GuestAddress(index),
            Ordering::Release,
        )
        .map_err(|_| Broken)?;
        queue.set_next_used(new);
        // The index must be visible before the driver's wishes are read.
        fence(Ordering::SeqCst);
        if queue.event_idx_enabled() {
            // `used_event` follows the avail ring's entries.
            let used_event = queue
                .avail_ring()
                .checked_add(4 + 2 * u64::from(queue.size()))
                .ok_or(Broken)?;
            let event = u16::from_le(
                mem.load::<u16>(vm_memory::GuestAddress(used_event), Ordering::Relaxed)
                    .map_err(|_| Broken)?,
            );
            // The driver asked to be told when the index passes `event`: told if `event` is
            // in [start, new), as the Linux driver's vring_need_event() reckons.
            return Ok(new.wrapping_sub(event).wrapping_sub(1) < self.added);
        }
        interrupts_wanted(queue, mem)
    }
}

/// A TX chain that is one device-readable descriptor, as DPDK's virtio PMD and Linux's driver
/// send a linear frame, lying in one piece of the backend's mapping of guest memory: found
/// once per burst by [`look_ahead`], so that the destination lookup and the copy read no
/// descriptor and translate no address again. Other chains take the general path
/// ([`peek_dst`], [`read_tx_into`]), with the same verdicts.
#[derive(Debug)]
pub struct Linear<'a, B: BitmapSlice> {
    /// The whole chain: the virtio-net header, then the frame (at least an Ethernet header).
    bytes: VolatileSlice<'a, B>,
}

impl<B: BitmapSlice> Linear<'_, B> {
    /// The frame's destination MAC.
    pub fn dst(&self) -> [u8; 6] {
        let mut dst = [0u8; 6];
        self.copy_out(HDR_LEN, &mut dst);
        dst
    }

    /// The frame's length (the chain without its header).
    pub fn frame_len(&self) -> usize {
        self.bytes.len() - HDR_LEN
    }

    /// Copies the frame (without the header) to the start of `to`, with one `memcpy`: the
    /// verdict [`read_tx_into`] gives the chain (`Oversize` when `to` is too short).
    pub fn read_into(&self, to: &mut [u8]) -> TxChain {
        let len = self.frame_len();
        match to.get_mut(..len) {
            Some(to) => {
                self.copy_out(HDR_LEN, to);
                TxChain::Frame(len)
            }
            None => TxChain::Oversize,
        }
    }

    /// Starts loading the rest of the chain, past what [`look_ahead`] loaded, into the cache:
    /// the frame a CPU copy will read a few chains from now.
    pub fn prefetch_rest(&self) {
        let rest = self.rest_to_load();
        prefetch_bytes(self.bytes.ptr_guard().as_ptr(), rest.start, rest.end);
    }

    /// The bytes [`Self::prefetch_rest`] loads: past the headers, up to the end of the
    /// largest frame a copy reads. A descriptor's length is the guest's to choose, up to a
    /// whole memory region: loading all of it would take the worker as long as reading
    /// gigabytes, for a chain that is then dropped as oversize.
    fn rest_to_load(&self) -> std::ops::Range<usize> {
        HEAD_PREFETCH..self.bytes.len().min(TX_BUF)
    }

    /// Copies the chain's bytes from `offset` into all of `to`; the caller keeps them within
    /// the chain (`offset + to.len() <= self.bytes.len()`).
    fn copy_out(&self, offset: usize, to: &mut [u8]) {
        debug_assert!(offset + to.len() <= self.bytes.len());
        let n = to.len().min(self.bytes.len().saturating_sub(offset));
        // SAFETY: `bytes` is mapped guest memory that vm-memory checked and that stays mapped
        // while the memory it came from is borrowed ('a); `offset + n` is within it, `to` has
        // `n` bytes of ours, and guest memory is never one of our buffers (no overlap).
        unsafe {
            std::ptr::copy_nonoverlapping(
                self.bytes.ptr_guard().as_ptr().add(offset),
                to.as_mut_ptr(),
                n,
            )
        };
    }
}

/// The descriptor table and the used ring of one split queue, found in the backend's mapping
/// of guest memory once per burst, so that reading a chain's first descriptor and writing its
/// used entry translate no guest address (DPDK's vhost translates a ring's addresses once,
/// when the driver sets them). A ring that does not lie in one piece of the mapping, or is
/// not aligned as virtio requires, is reached through vm-memory's checked accesses instead.
/// It also remembers the memory region the last buffer lay in: a burst's buffers mostly
/// share one.
#[derive(Debug)]
pub struct SplitRing<'a> {
    mem: &'a GuestMem,
    size: u16,
    desc_table: u64,
    used_ring: u64,
    /// The descriptor table in the mapping (16-byte aligned, `16 * size` bytes).
    desc: Option<std::ptr::NonNull<u8>>,
    /// The used ring in the mapping (4-byte aligned, its flags, index and `size` entries).
    used: Option<std::ptr::NonNull<u8>>,
    region: std::cell::Cell<Option<&'a GuestRegionMmap<()>>>,
}

impl<'a> SplitRing<'a> {
    /// `queue`'s rings in `mem`, for one burst (the queue's addresses and `mem` must not
    /// change while it is used: the worker holds the vring's lock and the memory's `Arc`).
    pub fn new(queue: &Queue, mem: &'a GuestMem) -> SplitRing<'a> {
        let size = queue.size();
        let in_mapping = |gpa: u64, len: usize, align: usize| {
            let slice =
                GuestMemoryBackend::get_slice(mem, vm_memory::GuestAddress(gpa), len).ok()?;
            let at = slice.ptr_guard_mut().as_ptr();
            (at as usize).is_multiple_of(align).then_some(())?;
            std::ptr::NonNull::new(at)
        };
        SplitRing {
            mem,
            size,
            desc_table: queue.desc_table(),
            used_ring: queue.used_ring(),
            desc: in_mapping(queue.desc_table(), 16 * usize::from(size), 16),
            used: in_mapping(queue.used_ring(), 4 + 8 * usize::from(size), 4),
            region: std::cell::Cell::new(None),
        }
    }

    /// Descriptor `index` of the table (not following an indirect one); `None` when `index`
    /// is outside the table or the table outside memory.
    fn descriptor(&self, index: u16) -> Option<SplitDescriptor> {
        if index >= self.size {
            return None;
        }
        match self.desc {
            // SAFETY: `index < size`, so the 16 bytes at `16 * index` lie in the table that
            // `new` found in one piece of the mapping of `mem` (borrowed for 'a, and a plain
            // mmap: the pointer stays valid after its guard is dropped, vm-memory being built
            // without `xen`), 16-byte aligned (a descriptor is 16 bytes, `repr(C)`, aligned
            // to 8). The guest may write it meanwhile: the value read is checked like any
            // other it gives.
            Some(table) => Some(unsafe {
                table
                    .as_ptr()
                    .add(16 * usize::from(index))
                    .cast::<SplitDescriptor>()
                    .read_volatile()
            }),
            None => {
                let at = self.desc_table.checked_add(16 * u64::from(index))?;
                self.mem.read_obj(vm_memory::GuestAddress(at)).ok()
            }
        }
    }

    /// The `len` bytes at guest address `addr` when they lie in one memory region.
    fn slice(&self, addr: u64, len: usize) -> Option<VolatileSlice<'a, ()>> {
        let region = match self.region.get() {
            Some(r) if addr >= r.start_addr().0 && addr <= r.last_addr().0 => r,
            _ => {
                let r = GuestMemoryBackend::find_region(self.mem, vm_memory::GuestAddress(addr))?;
                self.region.set(Some(r));
                r
            }
        };
        let offset = vm_memory::MemoryRegionAddress(addr - region.start_addr().0);
        GuestMemoryRegion::get_slice(region, offset, len).ok()
    }

    /// Writes used entry `slot` (below the queue's size): chain `head`, `len` bytes written.
    fn write_used(&self, slot: u16, head: u16, len: u32) -> Result<(), Broken> {
        match self.used {
            // SAFETY: `slot < size`, so the 8 bytes at `4 + 8 * slot` lie in the used ring
            // that `new` found in one piece of the mapping of `mem` (borrowed for 'a, a plain
            // mmap), 4-byte aligned, so both 32-bit halves are aligned. The used ring is the
            // device's to write; the guest only reads it.
            Some(ring) => unsafe {
                let entry = ring.as_ptr().add(4 + 8 * usize::from(slot)).cast::<u32>();
                entry.write_volatile(u32::from(head).to_le());
                entry.add(1).write_volatile(len.to_le());
                Ok(())
            },
            None => {
                // The used ring: flags (2 bytes), index (2 bytes), then entries of a 32-bit
                // chain head and a 32-bit length, little-endian (virtio 1.x, 2.7.8).
                let addr = self
                    .used_ring
                    .checked_add(4 + 8 * u64::from(slot))
                    .ok_or(Broken)?;
                let mut entry = [0u8; 8];
                entry[..4].copy_from_slice(&u32::from(head).to_le_bytes());
                entry[4..].copy_from_slice(&len.to_le_bytes());
                self.mem
                    .write_obj(entry, vm_memory::GuestAddress(addr))
                    .map_err(|_| Broken)
            }
        }
    }
}

/// Bytes of each chain of a TX burst [`look_ahead`] loads into the cache: the virtio-net
/// header and the Ethernet header, which the destination lookup reads first.
pub const HEAD_PREFETCH: usize = 128;

/// Reads each chain's first descriptor once for a burst, from `ring`: starts loading its
/// first [`HEAD_PREFETCH`] bytes (the headers) into the cache, so that the burst's misses on
/// memory the guest's core has just written overlap rather than follow one another (DPDK's
/// vhost prefetches a burst's buffers too; the rest of a frame the CPU copies is loaded a
/// few chains ahead, [`Linear::prefetch_rest`]), and puts in `linear[i]` chain `i` as a
/// [`Linear`] when it is one. A chain that is not (an indirect one included), or is broken,
/// is left for the general path to judge.
pub fn look_ahead<'a>(
    ring: &SplitRing<'a>,
    chains: &[Option<DescriptorChain<&'a GuestMem>>],
    linear: &mut [Option<Linear<'a, ()>>],
) {
    for (chain, linear) in chains.iter().zip(linear.iter_mut()) {
        *linear = None;
        let Some(head) = chain.as_ref().map(DescriptorChain::head_index) else {
            continue;
        };
        let Some(desc) = ring.descriptor(head) else {
            continue;
        };
        if desc.is_write_only() || desc.refers_to_indirect_table() {
            continue;
        }
        let len = desc.len() as usize;
        let Some(bytes) = ring.slice(desc.addr().0, len) else {
            continue;
        };
        prefetch_bytes(
            bytes.ptr_guard().as_ptr(),
            0,
            bytes.len().min(HEAD_PREFETCH),
        );
        // One descriptor, in one piece, a header and an Ethernet header at least.
        if !desc.has_next() && len >= HDR_LEN + 14 {
            *linear = Some(Linear { bytes });
        }
    }
}

/// Hints to load each cache line holding a byte of `start[from..to]`; never faults.
fn prefetch_bytes(start: *const u8, from: usize, to: usize) {
    let skew = start as usize % 64;
    let line = start.wrapping_sub(skew);
    for at in line_offsets(skew, from, to) {
        prefetch(line.wrapping_add(at));
    }
}

/// The offsets, from the cache line a buffer starts in (`skew` bytes into that line), of the
/// lines that hold its bytes `from..to`.
fn line_offsets(skew: usize, from: usize, to: usize) -> impl Iterator<Item = usize> {
    let first = from.saturating_add(skew) & !63;
    let end = if from < to {
        to.saturating_add(skew)
    } else {
        first
    };
    (first..end).step_by(64)
}

/// A hint to load the cache line at `at`; never faults, whatever `at` is.
#[inline(always)]
fn prefetch(at: *const u8) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch only hints the cache; it does not access memory architecturally and
    // cannot fault, whatever the address.
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(at.cast());
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = at;
}

/// Takes the next available chain, or `Ok(None)` when there is none.
pub fn pop<M>(queue: &mut Queue, mem: M) -> Result<Option<DescriptorChain<M>>, Broken>
where
    M: Deref + Clone,
    M::Target: GuestMemory,
{
    match queue.iter(mem) {
        Ok(mut iter) => Ok(iter.next()),
        // Not set up yet (or reset): nothing to take, nothing wrong.
        Err(virtio_queue::Error::QueueNotReady) => Ok(None),
        Err(_) => Err(Broken),
    }
}

/// Gives back the last `n` chains taken (they are taken again next time).
pub fn untake(queue: &mut Queue, n: usize) {
    for _ in 0..n {
        queue.go_to_previous_position();
    }
}

/// Takes up to `out.len()` available chains into `out` with one read of the avail index;
/// returns how many (`Ok(0)` for a queue not set up).
pub fn pop_burst<M>(
    queue: &mut Queue,
    mem: M,
    out: &mut [Option<DescriptorChain<M>>],
) -> Result<usize, Broken>
where
    M: Deref + Clone,
    M::Target: GuestMemory,
{
    let mut iter = match queue.iter(mem) {
        Ok(iter) => iter,
        Err(virtio_queue::Error::QueueNotReady) => return Ok(0),
        Err(_) => return Err(Broken),
    };
    let mut n = 0;
    for slot in out.iter_mut() {
        let Some(chain) = iter.next() else { break };
        *slot = Some(chain);
        n += 1;
    }
    Ok(n)
}

/// Reads a TX chain into `buf`: the header, then the frame at `buf[HDR_LEN..]`.
pub fn read_tx<M>(chain: DescriptorChain<M>, mem: &M::Target, buf: &mut [u8; TX_BUF]) -> TxChain
where
    M: Deref,
    M::Target: GuestMemory,
{
    let (header, frame) = buf.split_at_mut(HDR_LEN);
    read_tx_split(chain, mem, header, frame)
}

/// Reads the frame of a TX chain into `frame` (from its first byte), dropping the virtio-net
/// header: the one copy a frame takes from a guest into a UMEM frame or bounce buffer.
/// `Oversize` when the frame is longer than `frame`.
pub fn read_tx_into<M>(chain: DescriptorChain<M>, mem: &M::Target, frame: &mut [u8]) -> TxChain
where
    M: Deref,
    M::Target: GuestMemory,
{
    let mut header = [0u8; HDR_LEN];
    read_tx_split(chain, mem, &mut header, frame)
}

/// Reads a TX chain: its first `header.len()` bytes into `header`, the rest into `frame`.
fn read_tx_split<M>(
    chain: DescriptorChain<M>,
    mem: &M::Target,
    header: &mut [u8],
    frame: &mut [u8],
) -> TxChain
where
    M: Deref,
    M::Target: GuestMemory,
{
    let hdr_len = header.len();
    walk_tx(chain, hdr_len, frame.len(), |addr, at, n| {
        let dst = if at < hdr_len {
            &mut header[at..at + n]
        } else {
            &mut frame[at - hdr_len..at - hdr_len + n]
        };
        read_guest(mem, addr, dst)
    })
}

/// Copies `src` into guest memory at `addr`, one `memcpy` per piece of a memory region (see
/// [`read_guest`]); false if any of it is not guest memory (then partly written).
fn write_guest<M: GuestMemory + ?Sized>(
    mem: &M,
    addr: vm_memory::GuestAddress,
    src: &[u8],
) -> bool {
    let Ok(slices) = mem.get_slices(addr, src.len(), vm_memory::Permissions::Write) else {
        return false;
    };
    let mut done = 0usize;
    for slice in slices {
        let Ok(slice) = slice else { return false };
        let n = slice.len();
        let Some(from) = src.get(done..done + n) else {
            return false;
        };
        // SAFETY: as in `read_guest`, the other way round.
        unsafe { std::ptr::copy_nonoverlapping(from.as_ptr(), slice.ptr_guard_mut().as_ptr(), n) };
        done += n;
    }
    done == src.len()
}

/// Copies guest memory at `addr` into `dst`, one `memcpy` per piece of a memory region
/// (vm-memory's `read_slice` copies through volatile loops, several times slower for the
/// short pieces of a frame); false if any of it is not guest memory (`dst` then partly
/// written). The guest may be writing the bytes meanwhile: the copy then holds whatever it
/// wrote, as with `read_slice`.
fn read_guest<M: GuestMemory + ?Sized>(
    mem: &M,
    addr: vm_memory::GuestAddress,
    dst: &mut [u8],
) -> bool {
    let Ok(slices) = mem.get_slices(addr, dst.len(), vm_memory::Permissions::Read) else {
        return false;
    };
    let mut done = 0usize;
    for slice in slices {
        let Ok(slice) = slice else { return false };
        let n = slice.len();
        let Some(to) = dst.get_mut(done..done + n) else {
            return false;
        };
        // SAFETY: `slice` is `n` bytes of mapped guest memory (vm-memory checked the range
        // and the mapping lives as long as `mem`), `to` is `n` bytes of ours, and guest
        // memory is never one of our buffers, so they do not overlap.
        unsafe { std::ptr::copy_nonoverlapping(slice.ptr_guard().as_ptr(), to.as_mut_ptr(), n) };
        done += n;
    }
    done == dst.len()
}

/// Walks the frame of a TX chain without reading it: hands `piece(guest address, offset in
/// the frame, length)` each piece of it (the virtio-net header is checked, not handed out),
/// for a copy the caller makes later (through a DMA channel). The same verdict as
/// [`read_tx_into`] into a frame of `room` bytes.
pub fn tx_pieces<M>(
    chain: DescriptorChain<M>,
    mem: &M::Target,
    room: usize,
    mut piece: impl FnMut(vm_memory::GuestAddress, usize, usize) -> bool,
) -> TxChain
where
    M: Deref,
    M::Target: GuestMemory,
{
    walk_tx(chain, HDR_LEN, room, |addr, at, n| {
        if at < HDR_LEN {
            mem.check_range(addr, n, vm_memory::Permissions::Read)
        } else {
            piece(addr, at - HDR_LEN, n)
        }
    })
}

/// Walks a TX chain of at most `hdr_len + room` bytes, handing `piece(guest address, offset
/// in the chain, length)` each piece of each descriptor (a piece never straddles `hdr_len`);
/// a piece refused makes the chain malformed.
fn walk_tx<M>(
    chain: DescriptorChain<M>,
    hdr_len: usize,
    room: usize,
    mut piece: impl FnMut(vm_memory::GuestAddress, usize, usize) -> bool,
) -> TxChain
where
    M: Deref,
    M::Target: GuestMemory,
{
    let room = hdr_len + room;
    let mut total = 0usize;
    let mut descriptors = 0usize;
    let mut last_has_next = false;
    let mut oversize = false;
    for desc in chain {
        descriptors += 1;
        last_has_next = desc.has_next();
        if desc.is_write_only() || descriptors > MAX_DESCRIPTORS {
            return TxChain::Malformed;
        }
        let len = desc.len() as usize;
        if oversize || total + len > room {
            oversize = true;
            continue;
        }
        // The descriptor's bytes land in the header, the frame, or both.
        let mut done = 0usize;
        while done < len {
            let at = total + done;
            let n = if at < hdr_len {
                (hdr_len - at).min(len - done)
            } else {
                len - done
            };
            let Some(addr) = desc.addr().checked_add(done as u64) else {
                return TxChain::Malformed;
            };
            if !piece(addr, at, n) {
                return TxChain::Malformed;
            }
            done += n;
        }
        total += len;
    }
    classify_tx(descriptors, last_has_next, oversize, total)
}

/// What a TX chain holds, without reading it: the verdict of [`read_tx_into`] into a frame
/// of `room` bytes (every descriptor device-readable and inside guest memory as far as the
/// frame fits, no loop, a header and an Ethernet header at least), for a chain that goes
/// nowhere. The same walk, so the same verdict whatever the guest wrote.
pub fn check_tx<M>(chain: DescriptorChain<M>, mem: &M::Target, room: usize) -> TxChain
where
    M: Deref,
    M::Target: GuestMemory,
{
    walk_tx(chain, HDR_LEN, room, |addr, _, n| {
        mem.check_range(addr, n, vm_memory::Permissions::Read)
    })
}

fn classify_tx(descriptors: usize, last_has_next: bool, oversize: bool, total: usize) -> TxChain {
    if descriptors == 0 || last_has_next {
        return TxChain::Malformed;
    }
    if oversize {
        return TxChain::Oversize;
    }
    if total < HDR_LEN + 14 {
        return TxChain::Malformed;
    }
    TxChain::Frame(total - HDR_LEN)
}

/// The destination MAC of the frame in a TX chain (the 6 bytes after the virtio-net header),
/// read without taking the chain; `None` when the chain is too short, outside memory, or
/// reaches them only past [`MAX_DESCRIPTORS`] descriptors.
pub fn peek_dst<M>(chain: &DescriptorChain<M>, mem: &M::Target) -> Option<[u8; 6]>
where
    M: Deref + Clone,
    M::Target: GuestMemory,
{
    let mut dst = [0u8; 6];
    let mut skip = HDR_LEN;
    let mut got = 0usize;
    for desc in chain.clone().take(MAX_DESCRIPTORS) {
        if desc.is_write_only() {
            return None;
        }
        let len = desc.len() as usize;
        if skip >= len {
            skip -= len;
            continue;
        }
        let n = (len - skip).min(6 - got);
        let addr = desc.addr().checked_add(skip as u64)?;
        if !read_guest(mem, addr, &mut dst[got..got + n]) {
            return None;
        }
        got += n;
        skip = 0;
        if got == 6 {
            return Some(dst);
        }
    }
    None
}

/// Chains one frame may take at most with MRG_RXBUF (a 9 KiB frame in 1 KiB buffers needs 10).
pub const MAX_MERGE: usize = 64;

/// The chains a frame was placed in: (head, bytes) each, in the order they must be used.
#[derive(Clone, Copy, Debug)]
pub struct RxChains {
    heads: [(u16, u32); MAX_MERGE],
    count: usize,
}

impl RxChains {
    /// The chains.
    pub fn heads(&self) -> &[(u16, u32)] {
        &self.heads[..self.count]
    }

    /// Marks them used, consecutively (as MRG_RXBUF requires).
    pub fn complete<G: GuestMemory>(&self, queue: &mut Queue, mem: &G) -> Result<(), Broken> {
        for &(head, len) in self.heads() {
            queue.add_used(mem, head, len).map_err(|_| Broken)?;
        }
        Ok(())
    }
}

/// What placing one frame in the RX queue did.
#[derive(Clone, Copy, Debug)]
#[expect(
    clippy::large_enum_variant,
    reason = "returned by value per frame on the hot path: a 520-byte copy beats an allocation"
)]
pub enum RxPlaced {
    /// Placed in these chains, not yet marked used.
    Placed(RxChains),
    /// Not enough buffers now; nothing taken, the frame should wait.
    NoBuffers,
    /// A single chain (no MRG_RXBUF) too small for the frame: completed with length 0.
    TooSmall,
    /// A chain that is malformed: every chain taken was completed with length 0.
    Malformed,
}

/// Takes the chains `frame_len` bytes (behind a header) need from the RX `queue`, checks
/// every descriptor, writes the header, and hands each piece of the frame's place to
/// `place(guest address, offset in the frame, length)`, which copies it (now, or later
/// through a DMA channel) and returns false if it cannot. The chains are not marked used.
pub fn place_rx<M>(
    queue: &mut Queue,
    mem: M,
    frame_len: usize,
    mrg_rxbuf: bool,
    dirty: Option<&DirtyPages>,
    mut place: impl FnMut(vm_memory::GuestAddress, usize, usize) -> bool,
) -> Result<RxPlaced, Broken>
where
    M: Deref + Clone,
    M::Target: GuestMemory + Sized,
{
    let mut chains = RxChains {
        heads: [(0u16, 0u32); MAX_MERGE],
        count: 0,
    };
    let mut written = 0usize; // bytes of header + frame placed so far
    let total = HDR_LEN + frame_len;
    // Where the header's bytes go (it may be split across descriptors); written last, once
    // num_buffers is known: (guest address, header offset, length).
    let mut header_spots = [(vm_memory::GuestAddress(0), 0usize, 0usize); HDR_LEN];
    let mut spots = 0usize;
    // Descriptors of the frame's chains so far (at most MAX_DESCRIPTORS).
    let mut frame_descriptors = 0usize;
    while written < total {
        let taken = chains.count;
        if taken == MAX_MERGE || (!mrg_rxbuf && taken == 1) {
            let why = if mrg_rxbuf {
                RxPlaced::Malformed
            } else {
                RxPlaced::TooSmall
            };
            return Ok(give_up(queue, &*mem, chains.heads(), why));
        }
        let Some(chain) = pop(queue, mem.clone())? else {
            // Out of buffers midway: put the chains back, as if never taken.
            for _ in 0..taken {
                queue.go_to_previous_position();
            }
            return Ok(RxPlaced::NoBuffers);
        };
        let head = chain.head_index();
        let mut chain_len = 0u32;
        let mut last_has_next = false;
        let mut descriptors = 0;
        let mut bad = false;
        for desc in chain {
            descriptors += 1;
            frame_descriptors += 1;
            last_has_next = desc.has_next();
            if !desc.is_write_only() || frame_descriptors > MAX_DESCRIPTORS {
                bad = true;
                break;
            }
            if written == total {
                continue;
            }
            let room = desc.len() as usize;
            let mut off = 0usize;
            // The header's place first, then the frame.
            while off < room && written < total {
                let Some(addr) = desc.addr().checked_add(off as u64) else {
                    bad = true;
                    break;
                };
                let n = if written < HDR_LEN {
                    (HDR_LEN - written).min(room - off)
                } else {
                    (total - written).min(room - off)
                };
                // Every piece must be guest memory before anything is written to it.
                if !mem.check_range(addr, n, vm_memory::Permissions::Write) {
                    bad = true;
                    break;
                }
                if written < HDR_LEN {
                    header_spots[spots] = (addr, written, n);
                    spots += 1;
                } else if !place(addr, written - HDR_LEN, n) {
                    bad = true;
                    break;
                }
                off += n;
                written += n;
                chain_len += n as u32;
            }
            if bad {
                break;
            }
        }
        chains.heads[taken] = (head, chain_len);
        chains.count += 1;
        if bad || descriptors == 0 || last_has_next {
            return Ok(give_up(queue, &*mem, chains.heads(), RxPlaced::Malformed));
        }
    }
    // The header: no offloads, num_buffers = the chains the frame took (1 without MRG_RXBUF).
    let mut header = [0u8; HDR_LEN];
    header[HDR_NUM_BUFFERS..HDR_NUM_BUFFERS + 2]
        .copy_from_slice(&(chains.count as u16).to_le_bytes());
    for &(addr, hoff, n) in &header_spots[..spots] {
        if mem.write_slice(&header[hoff..hoff + n], addr).is_err() {
            return Ok(give_up(queue, &*mem, chains.heads(), RxPlaced::Malformed));
        }
        if let Some(d) = dirty {
            d.mark(addr.0, n);
        }
    }
    Ok(RxPlaced::Placed(chains))
}

/// What writing one frame into the RX queue did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RxWrite {
    /// Written into this many chains (used entries added; the caller signals).
    Written(u16),
    /// Not enough buffers now; nothing used, the frame should wait.
    NoBuffers,
    /// A single chain (no MRG_RXBUF) too small for the frame: completed with length 0, the
    /// frame dropped.
    TooSmall,
    /// A chain that is malformed: every chain taken was completed with length 0, the frame
    /// dropped.
    Malformed,
}

/// Writes `frame` behind a header into the RX `queue` with the CPU, and marks it used.
pub fn write_rx<M>(
    queue: &mut Queue,
    mem: M,
    frame: &[u8],
    mrg_rxbuf: bool,
    dirty: Option<&DirtyPages>,
) -> Result<RxWrite, Broken>
where
    M: Deref + Clone,
    M::Target: GuestMemory + Sized,
{
    let target = mem.clone();
    let placed = place_rx(
        queue,
        mem.clone(),
        frame.len(),
        mrg_rxbuf,
        dirty,
        |addr, off, n| {
            let ok = write_guest(&*target, addr, &frame[off..off + n]);
            if ok && let Some(d) = dirty {
                d.mark(addr.0, n);
            }
            ok
        },
    )?;
    Ok(match placed {
        RxPlaced::Placed(chains) => {
            chains.complete(queue, &*mem)?;
            RxWrite::Written(chains.count as u16)
        }
        RxPlaced::NoBuffers => RxWrite::NoBuffers,
        RxPlaced::TooSmall => RxWrite::TooSmall,
        RxPlaced::Malformed => RxWrite::Malformed,
    })
}

/// Completes every chain taken with length 0, and says why.
fn give_up<G: GuestMemory>(
    queue: &mut Queue,
    mem: &G,
    heads: &[(u16, u32)],
    why: RxPlaced,
) -> RxPlaced {
    for &(head, _) in heads {
        let _ = queue.add_used(mem, head, 0);
    }
    why
}

#[cfg(test)]
#[path = "queue_tests.rs"]
mod tests;
