//! Frames into one guest RX queue: placed in the guest's buffers (header by the CPU, payload
//! by the queue's copy engine: the CPU below the threshold, its DMA channel at or above), and
//! marked used only once their copies completed, in order, as DPDK's vhost async path does.
//! Without a channel every copy is done by the CPU at once.
//!
//! Invariants: a frame whose copy is in flight owns what the copy points into: its source
//! buffer (a UMEM frame or a bounce buffer, handed back to the worker only at completion) and
//! the guest memory snapshot its destinations lie in (an `Arc`, so a new memory table cannot
//! unmap it under a channel). A frame is marked used only in the queue it was placed in: a
//! queue stop or reset (or a drain that gave up on a channel) starts a new epoch, and frames
//! of an earlier epoch that complete later are dropped and counted, never written into the
//! next queue.

use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryBackend;

use crate::{
    copy::{BoundChannel, CopyEngine, CopyStats, DirtyLog, Segment},
    vhost::{
        dirty::{DirtyPages, GuestMem},
        queue::{self, RxChains, RxPlaced},
    },
};

use super::counters::GuestCounters;

/// Frames in flight per queue at most.
pub const MAX_INFLIGHT: usize = 256;

/// Where a frame's bytes are while it is being copied into a guest; handed back to the worker
/// when the copy is done.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// A bounce buffer of the worker's (frames from another guest).
    Bounce(u32),
    /// A frame of an uplink's UMEM (frames from the wire).
    Umem {
        /// The worker's uplink index.
        uplink: u16,
        /// The frame's address in that UMEM.
        addr: u64,
    },
}

/// What placing one frame did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Placed {
    /// Written and marked used; the source is free again.
    Done,
    /// Its copies are in flight; the source comes back from [`ToGuest::complete`].
    InFlight,
    /// The guest has no buffers for it now (nothing taken); the source is free again.
    NoBuffers,
    /// Dropped (too small a buffer, or a malformed chain, counted); the source is free again.
    Dropped,
    /// The queue is broken (see `queue::Broken`); the source is free again.
    Broken,
}

struct Inflight {
    chains: RxChains,
    len: u32,
    src: Source,
    /// The guest memory the copies write into, kept mapped until they complete.
    _mem: Arc<GuestMem>,
    epoch: u64,
}

/// The copy side of one guest RX queue.
pub struct ToGuest {
    engine: Option<CopyEngine<Inflight>>,
    segments: Vec<Segment>,
    dirty: Arc<DirtyPages>,
    epoch: u64,
}

impl std::fmt::Debug for ToGuest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ToGuest")
            .field("channel", &self.channel_name())
            .field("epoch", &self.epoch)
            .finish()
    }
}

impl ToGuest {
    /// A queue's copy side, on `channel` when one is bound (else the CPU copies everything).
    pub fn new(channel: Option<BoundChannel>, dirty: Arc<DirtyPages>) -> ToGuest {
        let engine = channel.map(|channel| {
            let log = Arc::clone(&dirty) as Arc<dyn DirtyLog>;
            let mut engine = CopyEngine::new(MAX_INFLIGHT, Some(log));
            // A fresh engine has no channel, so binding cannot be refused.
            let _ = engine.bind(channel);
            engine
        });
        ToGuest {
            engine,
            segments: Vec::with_capacity(2 * queue::MAX_MERGE),
            dirty,
            epoch: 0,
        }
    }

    /// The bound channel's name.
    pub fn channel_name(&self) -> Option<&str> {
        self.engine.as_ref().and_then(|e| e.channel_name())
    }

    /// The channel's completion fd (to wait on while copies are in flight).
    pub fn completion_fd(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        self.engine.as_ref().and_then(|e| e.completion_fd())
    }

    /// The engine's counters (zero without a channel).
    pub fn stats(&self) -> CopyStats {
        self.engine.as_ref().map(|e| e.stats()).unwrap_or_default()
    }

    /// Frames in flight.
    pub fn inflight(&self) -> usize {
        self.engine.as_ref().map_or(0, |e| e.inflight())
    }

    /// Room for this many more frames in flight.
    pub fn room(&self) -> usize {
        self.engine.as_ref().map_or(usize::MAX, |e| e.room())
    }

    /// Places `frame` (whose bytes stay at `src` until handed back) in `rxq`.
    pub fn place(
        &mut self,
        rxq: &mut Queue,
        mem: &Arc<GuestMem>,
        frame: &[u8],
        src: Source,
        mrg_rxbuf: bool,
        counters: &GuestCounters,
    ) -> Placed {
        let Some(engine) = self.engine.as_mut() else {
            return self.place_on_cpu(rxq, mem, frame, mrg_rxbuf, counters);
        };
        if engine.room() == 0 {
            return Placed::NoBuffers;
        }
        let segments = &mut self.segments;
        segments.clear();
        let target: &GuestMem = mem;
        let placed = queue::place_rx(
            rxq,
            target,
            frame.len(),
            mrg_rxbuf,
            Some(&*self.dirty),
            |addr, off, n| {
                let mut done = 0usize;
                for slice in GuestMemoryBackend::get_slices(target, addr, n) {
                    let Ok(slice) = slice else { return false };
                    let len = slice.len();
                    // `off + done + len <= frame.len()`: place_rx hands out pieces of the frame.
                    let from = frame[off + done..off + done + len].as_ptr();
                    let to = slice.ptr_guard_mut().as_ptr();
                    segments
                        .push(Segment::new(from, to, len as u32).into_guest(addr.0 + done as u64));
                    done += len;
                }
                done == n
            },
        );
        match placed {
            Ok(RxPlaced::Placed(chains)) => {
                let token = Inflight {
                    chains,
                    len: frame.len() as u32,
                    src,
                    _mem: Arc::clone(mem),
                    epoch: self.epoch,
                };
                // SAFETY: each segment's source lies in `frame`, which stays at `src` (a UMEM
                // frame or bounce buffer the worker hands out again only when this token
                // comes back); each destination is guest memory checked by place_rx and
                // get_slices, inside the mapping `mem` holds, whose Arc moves into the token.
                // The engine gives a token back only once its copies completed, so both
                // outlive them. A source is never guest memory, so they do not overlap.
                match unsafe { engine.enqueue(token, &self.segments) } {
                    Ok(()) => Placed::InFlight,
                    // room() was checked: not expected; the chains stay taken and are
                    // completed with length 0 (the guest loses nothing but the frame).
                    Err(back) => {
                        for &(head, _) in back.chains.heads() {
                            let _ = rxq.add_used(target, head, 0);
                        }
                        Placed::Dropped
                    }
                }
            }
            Ok(RxPlaced::NoBuffers) => Placed::NoBuffers,
            Ok(RxPlaced::TooSmall) => {
                GuestCounters::add(&counters.to_guest_dropped_small, 1);
                Placed::Dropped
            }
            Ok(RxPlaced::Malformed) => {
                GuestCounters::add(&counters.malformed_chains, 1);
                GuestCounters::add(&counters.to_guest_dropped_malformed, 1);
                Placed::Dropped
            }
            Err(queue::Broken) => Placed::Broken,
        }
    }

    fn place_on_cpu(
        &mut self,
        rxq: &mut Queue,
        mem: &GuestMem,
        frame: &[u8],
        mrg_rxbuf: bool,
        counters: &GuestCounters,
    ) -> Placed {
        match queue::write_rx(rxq, mem, frame, mrg_rxbuf, Some(&self.dirty)) {
            Ok(queue::RxWrite::Written(_)) => {
                GuestCounters::add(&counters.to_guest_packets, 1);
                GuestCounters::add(&counters.to_guest_bytes, frame.len() as u64);
                Placed::Done
            }
            Ok(queue::RxWrite::NoBuffers) => Placed::NoBuffers,
            Ok(queue::RxWrite::TooSmall) => {
                GuestCounters::add(&counters.to_guest_dropped_small, 1);
                Placed::Dropped
            }
            Ok(queue::RxWrite::Malformed) => {
                GuestCounters::add(&counters.malformed_chains, 1);
                GuestCounters::add(&counters.to_guest_dropped_malformed, 1);
                Placed::Dropped
            }
            Err(queue::Broken) => Placed::Broken,
        }
    }

    /// Rings the channel for the frames placed since the last flush.
    pub fn flush(&mut self) {
        if let Some(engine) = self.engine.as_mut() {
            engine.flush();
            if engine.inflight() > 0 {
                engine.arm_notification();
            }
        }
    }

    /// Consumes a pending completion wake-up.
    pub fn clear_notification(&mut self) {
        if let Some(engine) = self.engine.as_mut() {
            engine.clear_notification();
        }
    }

    /// Marks used the frames whose copies finished, in order, handing their sources to
    /// `release`; returns whether any used entry was written.
    pub fn complete(
        &mut self,
        rxq: &mut Queue,
        mem: &GuestMem,
        counters: &GuestCounters,
        release: &mut impl FnMut(Source),
    ) -> bool {
        let epoch = self.epoch;
        let Some(engine) = self.engine.as_mut() else {
            return false;
        };
        let mut used = false;
        engine.poll_completed(usize::MAX, |token| {
            let src = token.src;
            used |= finish(token, epoch, Some((&mut *rxq, mem)), counters);
            release(src);
        });
        used
    }

    /// Waits for every copy in flight (bounded): the frames are marked used in `rxq` when
    /// given (the queue is still valid), else dropped; their sources go to `release`. Those
    /// still in flight when the wait gives up stay the channel's (with their memory) and are
    /// dropped when they complete. Either way a new epoch starts when `rxq` is gone.
    pub fn drain(
        &mut self,
        mut rxq: Option<(&mut Queue, &GuestMem)>,
        counters: &GuestCounters,
        release: &mut impl FnMut(Source),
    ) {
        let epoch = self.epoch;
        let gone = rxq.is_none();
        let Some(engine) = self.engine.as_mut() else {
            return;
        };
        let drained = engine.drain(std::time::Duration::from_secs(2), |token| {
            let src = token.src;
            let q = rxq.as_mut().map(|(q, m)| (&mut **q, *m));
            finish(token, epoch, q, counters);
            release(src);
        });
        if let Err(e) = &drained {
            tracing::warn!(error = %e, "copies into a guest did not finish; their frames are dropped when they do");
        }
        if gone || drained.is_err() {
            self.epoch += 1;
        }
    }
}

/// Marks a finished frame used (when it belongs to `epoch` and the queue is given); returns
/// whether it was.
fn finish(
    token: Inflight,
    epoch: u64,
    rxq: Option<(&mut Queue, &GuestMem)>,
    counters: &GuestCounters,
) -> bool {
    match rxq {
        Some((q, mem)) if token.epoch == epoch => {
            if token.chains.complete(q, mem).is_ok() {
                GuestCounters::add(&counters.to_guest_packets, 1);
                GuestCounters::add(&counters.to_guest_bytes, u64::from(token.len));
                return true;
            }
            GuestCounters::add(&counters.to_guest_dropped_reset, 1);
            false
        }
        _ => {
            GuestCounters::add(&counters.to_guest_dropped_reset, 1);
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{
        Weak,
        atomic::{AtomicBool, Ordering},
    };

    use virtio_queue::{
        desc::{RawDescriptor, split::Descriptor as SplitDescriptor},
        mock::MockSplitQueue,
    };
    use vm_memory::{GuestAddress, GuestMemoryMmap};

    use super::*;
    use crate::copy::{
        ChannelKind, ChannelPool, Completed, DmaChannel, DmaError, OpStatus, QueueRef,
    };

    const WRITE: u16 = virtio_bindings::virtio_ring::VRING_DESC_F_WRITE as u16;

    /// A channel whose copies complete only once its gate opens (it moves no bytes: these
    /// tests are about who owns what while copies are in flight, not about the bytes).
    #[derive(Debug)]
    struct Gate {
        open: Arc<AtomicBool>,
        enqueued: u64,
        submitted: u64,
        reported: u64,
    }

    impl DmaChannel for Gate {
        fn kind(&self) -> ChannelKind {
            ChannelKind::Mock
        }
        fn name(&self) -> &str {
            "gate"
        }
        unsafe fn copy(&mut self, _: *const u8, _: *mut u8, _: u32) -> Result<u16, DmaError> {
            if self.burst_capacity() == 0 {
                return Err(DmaError::Full);
            }
            self.enqueued += 1;
            Ok((self.enqueued - 1) as u16)
        }
        fn submit(&mut self) -> Result<(), DmaError> {
            self.submitted = self.enqueued;
            Ok(())
        }
        fn completed(&mut self, max: u16) -> Completed {
            if !self.open.load(Ordering::Relaxed) || self.submitted == self.reported {
                return Completed::default();
            }
            let n = (self.submitted - self.reported).min(u64::from(max));
            self.reported += n;
            Completed {
                count: n as u16,
                last_idx: (self.reported - 1) as u16,
                has_error: false,
            }
        }
        fn completed_status(&mut self, _: &mut [OpStatus]) -> u16 {
            0
        }
        fn burst_capacity(&self) -> u16 {
            (256 - (self.enqueued - self.reported)) as u16
        }
        fn completion_fd(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
            None
        }
    }

    /// A queue's copy side on a gate channel (every copy to the channel: threshold 0), and
    /// its gate.
    fn gated() -> (ToGuest, Arc<AtomicBool>) {
        let open = Arc::new(AtomicBool::new(false));
        let mut pool = ChannelPool::new();
        let gate = Gate {
            open: Arc::clone(&open),
            enqueued: 0,
            submitted: 0,
            reported: 0,
        };
        pool.add(Box::new(gate), 0);
        let queue = QueueRef {
            device: "t".to_owned(),
            queue: 0,
        };
        let bound = pool.bind("gate", queue).unwrap();
        (ToGuest::new(Some(bound), Arc::default()), open)
    }

    fn memory() -> Arc<GuestMem> {
        Arc::new(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap())
    }

    /// A queue at `at` with `buffers` RX buffers of 2 KiB.
    fn rx_queue(mem: &GuestMem, at: u64, buffers: u16) -> (Queue, u64) {
        let vq = MockSplitQueue::create(mem, GuestAddress(at), 16);
        let descs: Vec<RawDescriptor> = (0..buffers)
            .map(|i| {
                let addr = at + 0x1_0000 + u64::from(i) * 0x800;
                RawDescriptor::from(SplitDescriptor::new(addr, 2048, WRITE, 0))
            })
            .collect();
        vq.add_desc_chains(&descs, 0).unwrap();
        (vq.create_queue().unwrap(), vq.used_addr().0)
    }

    fn used_idx(mem: &GuestMem, used: u64) -> u16 {
        vm_memory::Bytes::read_obj(mem, GuestAddress(used + 2)).unwrap()
    }

    const FRAME: [u8; 1000] = [7; 1000];

    /// Places `n` frames from bounce buffers 0.. into `q`.
    fn place(
        dma: &mut ToGuest,
        q: &mut Queue,
        mem: &Arc<GuestMem>,
        n: u32,
        counters: &GuestCounters,
    ) {
        for i in 0..n {
            let placed = dma.place(q, mem, &FRAME, Source::Bounce(i), false, counters);
            assert_eq!(placed, Placed::InFlight);
        }
        dma.flush();
    }

    #[test]
    fn in_flight_frames_keep_their_guest_memory_mapped() {
        let (mut dma, open) = gated();
        let counters = GuestCounters::default();
        let mem = memory();
        let (mut q, used) = rx_queue(&mem, 0, 4);
        let weak: Weak<GuestMem> = Arc::downgrade(&mem);
        let handle = Arc::clone(&mem);
        place(&mut dma, &mut q, &handle, 2, &counters);
        assert_eq!(dma.inflight(), 2);
        // What SET_MEM_TABLE does to the worker's references to the old table.
        drop(handle);
        let gone = Arc::try_unwrap(mem).is_ok();
        assert!(
            !gone,
            "the frames in flight hold the memory their copies write"
        );
        let mem = weak.upgrade().expect("still mapped");
        open.store(true, Ordering::Relaxed);
        let mut released = Vec::new();
        assert!(dma.complete(&mut q, &mem, &counters, &mut |s| released.push(s)));
        assert_eq!(
            released,
            vec![Source::Bounce(0), Source::Bounce(1)],
            "in order"
        );
        assert_eq!(used_idx(&mem, used), 2);
        assert_eq!(counters.to_guest_packets.load(Ordering::Relaxed), 2);
        drop(mem);
        assert!(weak.upgrade().is_none(), "released with the last copy");
    }

    #[test]
    fn frames_of_a_queue_that_is_gone_are_never_marked_used_in_the_next() {
        let (mut dma, open) = gated();
        let counters = GuestCounters::default();
        let mem = memory();
        let (mut old, old_used) = rx_queue(&mem, 0, 4);
        place(&mut dma, &mut old, &mem, 1, &counters);
        // A reset while the channel is stuck: the drain gives up (after its timeout).
        let mut released = Vec::new();
        dma.drain(None, &counters, &mut |s| released.push(s));
        assert!(released.is_empty(), "still the channel's");
        assert_eq!(dma.inflight(), 1);
        // The next connection's queue, elsewhere; then the channel finishes the old copy.
        let (mut new, new_used) = rx_queue(&mem, 0x8_0000, 4);
        open.store(true, Ordering::Relaxed);
        let placed = dma.place(&mut new, &mem, &FRAME, Source::Bounce(9), false, &counters);
        assert_eq!(placed, Placed::InFlight);
        dma.flush();
        dma.drain(Some((&mut new, &mem)), &counters, &mut |s| released.push(s));
        assert_eq!(released, vec![Source::Bounce(0), Source::Bounce(9)]);
        assert_eq!(used_idx(&mem, old_used), 0);
        assert_eq!(used_idx(&mem, new_used), 1, "only the new frame");
        assert_eq!(counters.to_guest_packets.load(Ordering::Relaxed), 1);
        assert_eq!(counters.to_guest_dropped_reset.load(Ordering::Relaxed), 1);
    }
}
