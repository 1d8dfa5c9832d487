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
