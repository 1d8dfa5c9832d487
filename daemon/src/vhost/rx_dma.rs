//! Writing frames into a guest's RX queue through a DMA channel: the copy engine takes each
//! frame's pieces (the header is written by the CPU when the chains are taken), and the
//! chains are marked used only when the frame's copies are complete, in order, as DPDK's
//! vhost async path does.
//!
//! Invariants: every frame in flight owns what its copies point into: its buffer (out of the
//! mailbox with `take`, back with `recycle` only once the copies completed) and the guest
//! memory snapshot its destinations lie in (an `Arc`, so a new memory table or a disconnect
//! cannot unmap it under the channel). A frame is marked used only in the queue it was placed
//! in: a reset, or a drain that gave up on a channel, starts a new epoch, and frames of an
//! earlier epoch that complete later are dropped (counted), never written into the next
//! connection's queue.

use std::sync::Arc;
use virtio_queue::Queue;

use vm_memory::GuestMemoryBackend;

use super::{
    dirty::{DirtyPages, GuestMem},
    mailbox::Mailbox,
    queue::{self, RxChains, RxPlaced},
    switch::GuestCounters,
};
use crate::copy::{BoundChannel, CopyEngine, CopyStats, Segment};

/// Frames in flight at most (the mailbox's size).
const MAX_INFLIGHT: usize = super::mailbox::MAILBOX_FRAMES;

/// A frame whose copies are in flight.
struct Inflight {
    chains: RxChains,
    frame: Vec<u8>,
    /// The guest memory the copies write into, kept mapped until they complete.
    _mem: Arc<GuestMem>,
    /// The queue epoch the chains belong to.
    epoch: u64,
}

/// What one pass over the mailbox did.
#[derive(Debug, Default, Clone, Copy)]
pub struct RxPass {
    /// Used entries were added (the guest should be notified).
    pub used: bool,
    /// The guest had no RX buffers for the next frame.
    pub out_of_buffers: bool,
    /// Malformed chains met.
    pub malformed: u32,
    /// The queue is broken.
    pub broken: bool,
}

/// The RX copy engine of one guest.
pub struct RxDma {
    engine: CopyEngine<Inflight>,
    segments: Vec<Segment>,
    dirty: Arc<DirtyPages>,
    /// Bumped when the queue the in-flight frames were placed in is gone (see the module doc).
    epoch: u64,
}

impl std::fmt::Debug for RxDma {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RxDma")
            .field("engine", &self.engine)
            .finish()
    }
}

impl RxDma {
    /// An engine on `channel`, reporting the guest pages its copies write to `dirty`.
    pub fn new(channel: BoundChannel, dirty: Arc<DirtyPages>) -> RxDma {
        let mut engine = CopyEngine::new(
            MAX_INFLIGHT,
            Some(Arc::clone(&dirty) as Arc<dyn crate::copy::DirtyLog>),
        );
        // A fresh engine has no channel, so binding cannot be refused.
        let _ = engine.bind(channel);
        RxDma {
            engine,
            segments: Vec::with_capacity(2 * queue::MAX_MERGE),
            dirty,
            epoch: 0,
        }
    }

    /// The channel's completion fd.
    pub fn completion_fd(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        self.engine.completion_fd()
    }

    /// Consumes a pending completion wake-up.
    pub fn clear_notification(&mut self) {
        self.engine.clear_notification();
    }

    /// The engine's counters.
    pub fn stats(&self) -> CopyStats {
        self.engine.stats()
    }

    /// Completes finished frames, then starts the copies of waiting ones.
    pub fn run(
        &mut self,
        rxq: &mut Queue,
        owner: &Arc<GuestMem>,
        mailbox: &Mailbox,
        counters: &GuestCounters,
        mrg_rxbuf: bool,
    ) -> RxPass {
        let mem: &GuestMem = owner;
        self.engine.clear_notification();
        let mut pass = RxPass {
            used: self.complete(rxq, mem, mailbox, counters),
            ..RxPass::default()
        };
        mailbox.clear_wakeup();
        while self.engine.room() > 0 {
            let Some(frame) = mailbox.take() else { break };
            let segments = &mut self.segments;
            segments.clear();
            let dirty = Some(&*self.dirty);
            let placed =
                queue::place_rx(rxq, mem, frame.len(), mrg_rxbuf, dirty, |addr, off, n| {
                    let mut done = 0usize;
                    for slice in GuestMemoryBackend::get_slices(mem, addr, n) {
                        let Ok(slice) = slice else { return false };
                        let len = slice.len();
                        // `off + done + len <= frame.len()`: place_rx hands out pieces of the frame.
                        let src = frame[off + done..off + done + len].as_ptr();
                        let dst = slice.ptr_guard_mut().as_ptr();
                        segments.push(
                            Segment::new(src, dst, len as u32).into_guest(addr.0 + done as u64),
                        );
                        done += len;
                    }
                    done == n
                });
            match placed {
                Ok(RxPlaced::Placed(chains)) => {
                    let segments = std::mem::take(&mut self.segments);
                    let token = Inflight {
                        chains,
                        frame,
                        _mem: Arc::clone(owner),
                        epoch: self.epoch,
                    };
                    // SAFETY: each segment's source lies in `frame`, whose buffer moves into
                    // the token; each destination is guest memory checked by place_rx and
                    // get_slices, in the mapping `owner` holds, whose Arc also moves into the
                    // token; the engine gives the token back only when the copies completed
                    // (it never drops a token with copies in flight), so both outlive them.
                    // Sources and destinations cannot overlap (a frame buffer is not guest
                    // memory).
                    let queued = unsafe { self.engine.enqueue(token, &segments) };
                    self.segments = segments;
                    if let Err(back) = queued {
                        // No room (checked above, so not expected): complete on the spot.
                        pass.used |= self.finish(back, rxq, mem, mailbox, counters);
                    }
                }
                Ok(RxPlaced::NoBuffers) => {
                    mailbox.put_back(frame);
                    pass.out_of_buffers = true;
                    break;
                }
                Ok(RxPlaced::TooSmall) => {
                    GuestCounters::add(&counters.rx_dropped_small, 1);
                    mailbox.recycle(frame);
                    pass.used = true;
                }
                Ok(RxPlaced::Malformed) => {
                    pass.malformed += 1;
                    mailbox.recycle(frame);
                    pass.used = true;
                }
                Err(queue::Broken) => {
                    mailbox.put_back(frame);
                    pass.broken = true;
                    break;
                }
            }
        }
        self.engine.flush();
        pass.used |= self.complete(rxq, mem, mailbox, counters);
        if self.engine.inflight() > 0 {
            self.engine.arm_notification();
        }
        pass
    }

    /// Marks used the frames whose copies finished; returns whether any were.
    pub fn complete(
        &mut self,
        rxq: &mut Queue,
        mem: &GuestMem,
        mailbox: &Mailbox,
        counters: &GuestCounters,
    ) -> bool {
        let mut done = Vec::new();
        // Collected first: `finish` needs `self`, the engine releases through a closure.
        self.engine
            .poll_completed(usize::MAX, |token| done.push(token));
        let any = !done.is_empty();
        for token in done {
            self.finish(token, rxq, mem, mailbox, counters);
        }
        any
    }

    fn finish(
        &self,
        token: Inflight,
        rxq: &mut Queue,
        mem: &GuestMem,
        mailbox: &Mailbox,
        counters: &GuestCounters,
    ) -> bool {
        if token.epoch != self.epoch {
            // Placed in a queue that is gone: the frame is dropped, nothing is written.
            GuestCounters::add(&counters.rx_dropped_reset, 1);
            mailbox.recycle(token.frame);
            return false;
        }
        let ok = token.chains.complete(rxq, mem).is_ok();
        if ok {
            GuestCounters::add(&counters.rx_packets, 1);
            GuestCounters::add(&counters.rx_bytes, token.frame.len() as u64);
        }
        mailbox.recycle(token.frame);
        ok
    }

    /// Waits for every copy in flight; their frames are marked used in `rxq` when given (the
    /// queue is still valid), else dropped (the device is being reset).
    pub fn drain(
        &mut self,
        rxq: Option<(&mut Queue, &GuestMem)>,
        mailbox: &Mailbox,
        counters: &GuestCounters,
    ) {
        let rxq_gone = rxq.is_none();
        let mut done = Vec::new();
        let drained = self
            .engine
            .drain(std::time::Duration::from_secs(2), |token| done.push(token));
        match rxq {
            Some((q, mem)) => {
                for token in done {
                    self.finish(token, q, mem, mailbox, counters);
                }
            }
            None => done.into_iter().for_each(|t| {
                GuestCounters::add(&counters.rx_dropped_reset, 1);
                mailbox.recycle(t.frame);
            }),
        }
        if let Err(e) = &drained {
            // The copies still in flight keep their frames and guest memory alive (the
            // tokens own them) until the channel completes them, if ever; they will not be
            // written into whatever queue comes next.
            tracing::warn!(error = %e, "RX copies did not finish; their frames will be dropped when they do");
        }
        if rxq_gone || drained.is_err() {
            self.epoch += 1;
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

    /// An engine on a gate channel (every copy to the channel: threshold 0), and its gate.
    fn gated() -> (RxDma, Arc<AtomicBool>) {
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
        (RxDma::new(bound, Arc::default()), open)
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

    fn mailbox_with(frames: usize) -> Mailbox {
        let mailbox = Mailbox::new().unwrap();
        for i in 0..frames {
            assert!(mailbox.push(&[i as u8; 1000]));
        }
        mailbox
    }

    #[test]
    fn in_flight_frames_keep_their_guest_memory_mapped() {
        let (mut dma, open) = gated();
        let counters = GuestCounters::default();
        let mailbox = mailbox_with(2);
        let mem = memory();
        let (mut q, used) = rx_queue(&mem, 0, 4);
        let weak: Weak<GuestMem> = Arc::downgrade(&mem);
        let handle = Arc::clone(&mem);
        dma.run(&mut q, &handle, &mailbox, &counters, false);
        assert_eq!(dma.stats().inflight, 2);
        // What SET_MEM_TABLE does to the backend's references to the old table.
        drop(handle);
        let gone = Arc::try_unwrap(mem).is_ok();
        assert!(
            !gone,
            "the frames in flight hold the memory their copies write"
        );
        let mem = weak.upgrade().expect("still mapped");
        open.store(true, Ordering::Relaxed);
        assert!(dma.complete(&mut q, &mem, &mailbox, &counters));
        assert_eq!(used_idx(&mem, used), 2);
        assert_eq!(counters.rx_packets.load(Ordering::Relaxed), 2);
        drop(mem);
        assert!(weak.upgrade().is_none(), "released with the last copy");
    }

    #[test]
    fn frames_of_a_queue_that_is_gone_are_never_marked_used_in_the_next() {
        let (mut dma, open) = gated();
        let counters = GuestCounters::default();
        let mailbox = mailbox_with(1);
        let mem = memory();
        let (mut old, old_used) = rx_queue(&mem, 0, 4);
        dma.run(&mut old, &mem, &mailbox, &counters, false);
        // A reset while the channel is stuck: the drain gives up (after its timeout).
        dma.drain(None, &mailbox, &counters);
        assert_eq!(dma.stats().inflight, 1, "still the channel's");
        // The next connection's queue, elsewhere; then the channel finishes the old copy.
        let (mut new, new_used) = rx_queue(&mem, 0x8_0000, 4);
        open.store(true, Ordering::Relaxed);
        assert!(mailbox.push(&[9; 1000]));
        dma.run(&mut new, &mem, &mailbox, &counters, false);
        dma.drain(Some((&mut new, &mem)), &mailbox, &counters);
        assert_eq!(used_idx(&mem, old_used), 0);
        assert_eq!(used_idx(&mem, new_used), 1, "only the new frame");
        assert_eq!(counters.rx_packets.load(Ordering::Relaxed), 1);
        assert_eq!(counters.rx_dropped_reset.load(Ordering::Relaxed), 1);
        assert_eq!(mailbox.pending(), 0);
    }
}
