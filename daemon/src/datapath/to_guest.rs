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
