//! The per-virtqueue copy engine: the DPDK vhost async data path's in-flight tracking on top
//! of one bound DMA channel, with a CPU copy below a size threshold and on every DMA fault.
//!
//! Invariants:
//! - packets come back (through `poll_completed` or `drain`) exactly once and strictly in
//!   the order they were enqueued, whether their copies went to the CPU, the channel, or both;
//! - a packet comes back only when every one of its copies is complete and correct: DMA
//!   operations that failed (or were never submitted) are redone on the CPU first, and no
//!   DMA operation of the packet is still outstanding, so nothing writes its destination later;
//! - the guest memory each copy wrote is marked dirty (for live migration) before the packet
//!   comes back: at once for CPU copies, after completion for DMA copies;
//! - no allocation after construction: the tracker and the DMA segment queue are sized once.

use std::{collections::VecDeque, sync::Arc, time::Duration};

use thiserror::Error;

use super::{
    channel::{DmaFault, OpStatus},
    pool::BoundChannel,
};

/// One copy of a packet: `len` bytes from `src` to `dst`, optionally into guest memory at
/// `guest_addr` (for dirty logging).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    src: *const u8,
    dst: *mut u8,
    len: u32,
    guest_addr: Option<u64>,
}

// SAFETY: a Segment is only an address pair and a length; whoever builds one promises (in
// `CopyEngine::enqueue`'s contract) that the memory stays valid until the packet completes,
// whichever thread performs the copy.
unsafe impl Send for Segment {}

impl Segment {
    /// A copy of `len` bytes from `src` to `dst`.
    pub const fn new(src: *const u8, dst: *mut u8, len: u32) -> Segment {
        Segment {
            src,
            dst,
            len,
            guest_addr: None,
        }
    }

    /// The same copy, whose destination is guest memory at `guest_addr`.
    pub const fn into_guest(self, guest_addr: u64) -> Segment {
        Segment {
            guest_addr: Some(guest_addr),
            ..self
        }
    }

    /// Its length in bytes.
    pub const fn len(&self) -> u32 {
        self.len
    }

    /// Whether it copies nothing.
    pub const fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Copies it on this core.
    ///
    /// # Safety
    ///
    /// `src` must be readable and `dst` writable for `len` bytes, not overlapping.
    pub(super) unsafe fn copy_on_cpu(&self) {
        // SAFETY: guaranteed by the caller.
        unsafe { std::ptr::copy_nonoverlapping(self.src, self.dst, self.len as usize) };
    }
}

/// Marks guest memory written by a copy, for live migration (vm-memory does not do it for
/// writes through raw pointers).
pub trait DirtyLog: Send + Sync {
    /// `len` bytes at guest physical address `guest_addr` were written.
    fn mark_dirty(&self, guest_addr: u64, len: usize);
}

/// Counters of one engine. `fallback_*` count copies that were meant for the channel and were
/// done on the CPU instead; they are included in `cpu_copies`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CopyStats {
    /// Packets enqueued.
    pub packets: u64,
    /// Copies done on the CPU (below the threshold, no channel, or fallback).
    pub cpu_copies: u64,
    /// Their bytes.
    pub cpu_bytes: u64,
    /// Copies completed successfully by the channel.
    pub dma_copies: u64,
    /// Their bytes.
    pub dma_bytes: u64,
    /// Copies the channel had no room for (the whole packet went to the CPU).
    pub fallback_full: u64,
    /// Copies the channel refused to enqueue.
    pub fallback_enqueue: u64,
    /// Copies the channel reported failed (redone on the CPU).
    pub fallback_error: u64,
    /// Copies a failed submit never handed to the engine (redone on the CPU).
    pub fallback_submit: u64,
    /// Packets in flight now.
    pub inflight: u64,
    /// The most packets ever in flight at once.
    pub inflight_max: u64,
}

impl std::iter::Sum for CopyStats {
    /// The counters of several engines together (`inflight_max`: the largest).
    fn sum<I: Iterator<Item = CopyStats>>(all: I) -> CopyStats {
        all.fold(CopyStats::default(), |mut sum, s| {
            sum.packets += s.packets;
            sum.cpu_copies += s.cpu_copies;
            sum.cpu_bytes += s.cpu_bytes;
            sum.dma_copies += s.dma_copies;
            sum.dma_bytes += s.dma_bytes;
            sum.fallback_full += s.fallback_full;
            sum.fallback_enqueue += s.fallback_enqueue;
            sum.fallback_error += s.fallback_error;
            sum.fallback_submit += s.fallback_submit;
            sum.inflight += s.inflight;
            sum.inflight_max = sum.inflight_max.max(s.inflight_max);
            sum
        })
    }
}

/// `drain` gave up.
#[derive(Debug, Error, PartialEq, Eq)]
#[error(
    "DMA channel '{channel}' completed nothing for {waited:?}; {inflight} packets are still in flight"
)]
pub struct DrainError {
    /// The channel.
    pub channel: String,
    /// How long it waited without progress.
    pub waited: Duration,
    /// Packets still in flight.
    pub inflight: usize,
}

/// Binding a channel to an engine failed.
#[derive(Debug, Error)]
#[error("this queue's copy engine already has DMA channel '{current}' bound; unbind it first")]
pub struct EngineBusy {
    /// The channel already bound.
    pub current: String,
    /// The channel that was offered, handed back.
    pub offered: BoundChannel,
}

struct Inflight<T> {
    token: T,
    /// This packet's DMA operations are numbers `ops_start..ops_end` of the engine's sequence.
    ops_start: u64,
    ops_end: u64,
    /// One of them failed: redo all of them on the CPU before release.
    failed: bool,
}

/// The copy engine of one virtqueue; `T` is what the caller gets back per packet (a
/// descriptor head, a buffer id …).
pub struct CopyEngine<T> {
    channel: Option<BoundChannel>,
    threshold: u32,
    inflight: VecDeque<Inflight<T>>,
    max_inflight: usize,
    /// Segments of outstanding DMA operations, in operation order.
    dma_segs: VecDeque<Segment>,
    ops_enqueued: u64,
    ops_reported: u64,
    unsubmitted: bool,
    dirty: Option<Arc<dyn DirtyLog>>,
    stats: CopyStats,
}

impl<T> std::fmt::Debug for CopyEngine<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CopyEngine")
            .field("channel", &self.channel.as_ref().map(BoundChannel::name))
            .field("threshold", &self.threshold)
            .field("inflight", &self.inflight.len())
            .field("stats", &self.stats)
            .finish()
    }
}

/// DMA segments the engine keeps room for: one full ring of the largest channel.
const MAX_DMA_SEGS: usize = 1 << 16;

impl<T> CopyEngine<T> {
    /// An engine with no channel (every copy on the CPU) that tracks at most `max_inflight`
    /// packets, marking guest writes in `dirty` when given.
    pub fn new(max_inflight: usize, dirty: Option<Arc<dyn DirtyLog>>) -> CopyEngine<T> {
        CopyEngine {
            channel: None,
            threshold: u32::MAX,
            inflight: VecDeque::with_capacity(max_inflight),
            max_inflight,
            dma_segs: VecDeque::new(),
            ops_enqueued: 0,
            ops_reported: 0,
            unsubmitted: false,
            dirty,
            stats: CopyStats::default(),
        }
    }

    /// Binds `channel`: copies of at least its threshold go to it from now on.
    pub fn bind(&mut self, channel: BoundChannel) -> Result<(), Box<EngineBusy>> {
        if let Some(current) = &self.channel {
            return Err(Box::new(EngineBusy {
                current: current.name().to_owned(),
                offered: channel,
            }));
        }
        let capacity = usize::from(channel.channel().burst_capacity()).clamp(1, MAX_DMA_SEGS);
        if self.dma_segs.capacity() < capacity {
            self.dma_segs.reserve_exact(capacity);
        }
        self.threshold = channel.threshold();
        self.channel = Some(channel);
        Ok(())
    }

    /// Completes everything in flight (releasing packets to `release`), then hands the
    /// channel back. Copies go to the CPU afterwards.
    pub fn unbind(
        &mut self,
        timeout: Duration,
        release: impl FnMut(T),
    ) -> Result<Option<BoundChannel>, DrainError> {
        self.drain(timeout, release)?;
        self.threshold = u32::MAX;
        Ok(self.channel.take())
    }

    /// The bound channel's name, if any.
    pub fn channel_name(&self) -> Option<&str> {
        self.channel.as_ref().map(BoundChannel::name)
    }

    /// Copies shorter than this go to the CPU.
    pub fn threshold(&self) -> u32 {
        self.threshold
    }

    /// Changes the threshold (bytes; `u32::MAX`: never use the channel).
    pub fn set_threshold(&mut self, threshold: u32) {
        self.threshold = threshold;
    }

    /// The bound channel's completion fd, for an epoll worker to wait on.
    pub fn completion_fd(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        self.channel
            .as_ref()
            .and_then(|c| c.channel().completion_fd())
    }

    /// Consumes a wake-up the channel's completion fd signalled.
    pub fn clear_notification(&mut self) {
        if let Some(channel) = self.channel.as_mut() {
            channel.channel_mut().clear_notification();
        }
    }

    /// Asks the channel for a wake-up on its completion fd at the next completion.
    pub fn arm_notification(&mut self) {
        if let Some(channel) = self.channel.as_mut() {
            channel.channel_mut().arm_notification();
        }
    }

    /// The counters.
    pub fn stats(&self) -> CopyStats {
        self.stats
    }

    /// Packets in flight.
    pub fn inflight(&self) -> usize {
        self.inflight.len()
    }

    /// How many more packets `enqueue` takes now.
    pub fn room(&self) -> usize {
        self.max_inflight - self.inflight.len()
    }

    /// Starts the copies of one packet. Copies below the threshold, and all of them when the
    /// channel cannot take the packet's DMA copies at once, are done now on the CPU. The
    /// channel is not rung until [`CopyEngine::flush`]: enqueue a burst, then flush once.
    /// Returns the token back when `room()` is 0.
    ///
    /// # Safety
    ///
    /// For every segment, `src` must be readable and `dst` writable for `len` bytes, the
    /// ranges must not overlap, and both must stay valid and unchanged by anyone else until
    /// this packet's token comes back from `poll_completed`, `drain` or `unbind`.
    pub unsafe fn enqueue(&mut self, token: T, segments: &[Segment]) -> Result<(), T> {
        if self.inflight.len() >= self.max_inflight {
            return Err(token);
        }
        let threshold = self.threshold;
        let wants_dma = |s: &Segment| s.len >= threshold && s.len > 0;
        let mut dma_wanted = match &self.channel {
            Some(_) => segments.iter().filter(|s| wants_dma(s)).count(),
            None => 0,
        };
        if dma_wanted > 0 {
            let capacity = self
                .channel
                .as_ref()
                .map_or(0, |c| usize::from(c.channel().burst_capacity()));
            if capacity < dma_wanted || self.dma_segs.len() + dma_wanted > self.dma_segs.capacity()
            {
                // Not all of them fit: the whole packet goes to the CPU, nothing half-queued.
                self.stats.fallback_full += dma_wanted as u64;
                dma_wanted = 0;
            }
        }
        let ops_start = self.ops_enqueued;
        for seg in segments {
            if dma_wanted > 0 && wants_dma(seg) {
                let channel = self.channel.as_mut().map(BoundChannel::channel_mut);
                // SAFETY: the caller's contract covers this segment until the packet comes
                // back, and the packet comes back only after this operation is reported.
                let queued = channel.map(|c| unsafe { c.copy(seg.src, seg.dst, seg.len) });
                if let Some(Ok(_)) = queued {
                    self.ops_enqueued += 1;
                    self.dma_segs.push_back(*seg);
                    self.unsubmitted = true;
                    continue;
                }
                // Refused: this and the packet's remaining copies go to the CPU; the ones
                // already queued complete normally.
                self.stats.fallback_enqueue += 1;
                dma_wanted = 0;
            }
            // SAFETY: the caller's contract covers this segment.
            unsafe { self.cpu_copy(seg) };
        }
        self.stats.packets += 1;
        self.inflight.push_back(Inflight {
            token,
            ops_start,
            ops_end: self.ops_enqueued,
            failed: false,
        });
        self.stats.inflight = self.inflight.len() as u64;
        self.stats.inflight_max = self.stats.inflight_max.max(self.stats.inflight);
        Ok(())
    }

    /// Rings the channel's doorbell for everything enqueued since the last flush. A failed
    /// submit loses nothing: the channel reports those copies as not submitted and they are
    /// redone on the CPU.
    pub fn flush(&mut self) {
        if !self.unsubmitted {
            return;
        }
        self.unsubmitted = false;
        if let Some(channel) = self.channel.as_mut() {
            // Errors come back per operation as DmaFault::NotSubmitted.
            let _ = channel.channel_mut().submit();
        }
    }

    /// Releases up to `max` finished packets, in order, to `release`; returns how many.
    pub fn poll_completed(&mut self, max: usize, mut release: impl FnMut(T)) -> usize {
        self.reap();
        let mut released = 0;
        while released < max {
            match self.inflight.front() {
                Some(front) if front.ops_end <= self.ops_reported => {}
                _ => break,
            }
            let Some(packet) = self.inflight.pop_front() else {
                break;
            };
            for _ in packet.ops_start..packet.ops_end {
                let Some(seg) = self.dma_segs.pop_front() else {
                    break;
                };
                if packet.failed {
                    // SAFETY: the caller's contract still covers the segment (its packet has
                    // not come back yet), and the channel is done with it.
                    unsafe { self.cpu_copy(&seg) };
                } else {
                    self.stats.dma_copies += 1;
                    self.stats.dma_bytes += u64::from(seg.len);
                    self.mark_dirty(&seg);
                }
            }
            release(packet.token);
            released += 1;
        }
        self.stats.inflight = self.inflight.len() as u64;
        released
    }

    /// Flushes, then waits until every packet in flight is released to `release`. Run it
    /// before guest memory changes, a queue is disabled, a device resets or the daemon stops.
    /// Gives up if the channel completes nothing for `timeout`.
    pub fn drain(
        &mut self,
        timeout: Duration,
        mut release: impl FnMut(T),
    ) -> Result<usize, DrainError> {
        self.flush();
        let mut total = 0;
        let mut last_progress = std::time::Instant::now();
        while !self.inflight.is_empty() {
            let n = self.poll_completed(usize::MAX, &mut release);
            if n > 0 {
                total += n;
                last_progress = std::time::Instant::now();
            } else if last_progress.elapsed() > timeout {
                return Err(DrainError {
                    channel: self.channel_name().unwrap_or("cpu").to_owned(),
                    waited: timeout,
                    inflight: self.inflight.len(),
                });
            } else {
                std::hint::spin_loop();
            }
        }
        Ok(total)
    }

    /// Collects the channel's completions: successes advance `ops_reported`; a failure marks
    /// the packet that owns the operation.
    fn reap(&mut self) {
        let Some(channel) = self.channel.as_mut() else {
            return;
        };
        let channel = channel.channel_mut();
        loop {
            let done = channel.completed(u16::MAX);
            self.ops_reported += u64::from(done.count);
            if !done.has_error {
                break;
            }
            let mut status = [OpStatus::Success];
            if channel.completed_status(&mut status) == 0 {
                break;
            }
            let seq = self.ops_reported;
            self.ops_reported += 1;
            if let OpStatus::Failed(fault) = status[0] {
                match fault {
                    DmaFault::NotSubmitted => self.stats.fallback_submit += 1,
                    _ => self.stats.fallback_error += 1,
                }
                if let Some(p) = self
                    .inflight
                    .iter_mut()
                    .find(|p| (p.ops_start..p.ops_end).contains(&seq))
                {
                    p.failed = true;
                }
            }
        }
        debug_assert!(
            self.ops_reported <= self.ops_enqueued,
            "the channel reported more than was enqueued"
        );
    }

    /// # Safety
    ///
    /// As [`Segment::copy_on_cpu`].
    unsafe fn cpu_copy(&mut self, seg: &Segment) {
        // SAFETY: guaranteed by the caller.
        unsafe { seg.copy_on_cpu() };
        self.stats.cpu_copies += 1;
        self.stats.cpu_bytes += u64::from(seg.len);
        self.mark_dirty(seg);
    }

    fn mark_dirty(&self, seg: &Segment) {
        if let (Some(log), Some(addr)) = (&self.dirty, seg.guest_addr) {
            log.mark_dirty(addr, seg.len as usize);
        }
    }
}
