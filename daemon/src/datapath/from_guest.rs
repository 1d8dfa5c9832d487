//! Frames out of one guest TX queue to the wire through the queue's copy engine: each chain
//! is copied once, from guest memory into a UMEM frame of the uplink (the CPU below the
//! threshold, the queue's DMA channel at or above), and only once its copy completed is the
//! frame queued on the uplink's transmit ring and the chain marked used, as DPDK's vhost
//! async dequeue does. The engine gives frames back in the order they were taken, so a
//! queue's frames reach the wire in order whichever copied them. Without a channel the
//! worker copies on the CPU at once (see `Worker::send_to_wire`) and nothing is tracked here.
//!
//! Invariants: a frame whose copy is in flight owns its UMEM frame (handed to the transmit
//! ring, or freed, only when the token comes back) and the guest memory snapshot its source
//! lies in (an `Arc`). Its chain is marked used only in the queue it was taken from: a drain
//! that gave up on a channel starts a new epoch, and later completions of an earlier epoch
//! only free their frame (counted `from_guest_dropped_reset`).

use std::sync::Arc;

use vm_memory::GuestMemoryBackend;

use super::counters::GuestCounters;
use crate::{
    copy::{BoundChannel, CopyEngine, CopyStats, Segment},
    vhost::{
        dirty::GuestMem,
        queue::{self, TxChain},
    },
};

/// Frames in flight per TX queue at most.
pub const MAX_INFLIGHT: usize = 256;

/// A frame whose copy into a UMEM frame is in flight.
#[derive(Debug)]
pub struct Outgoing {
    /// The chain's head, to mark used once copied.
    pub head: u16,
    /// The worker's uplink index the frame belongs to.
    pub uplink: u16,
    /// The UMEM frame's address.
    pub addr: u64,
    /// The frame's length.
    pub len: u32,
    /// The guest memory the copy reads, kept mapped until it completes.
    _mem: Arc<GuestMem>,
    epoch: u64,
}

/// What [`FromGuest::send`] did with a chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Taken {
    /// Its copy is in flight; the chain is marked used when it comes back.
    InFlight,
    /// Not taken: the chain is done with (mark it used now) for this reason.
    Done(TxChain),
}

/// The copy side of one guest TX queue.
pub struct FromGuest {
    engine: CopyEngine<Outgoing>,
    segments: Vec<Segment>,
    epoch: u64,
}

impl std::fmt::Debug for FromGuest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FromGuest")
            .field("channel", &self.engine.channel_name())
            .field("epoch", &self.epoch)
            .finish()
    }
}

impl FromGuest {
    /// A TX queue's copy side on `channel`.
    pub fn new(channel: BoundChannel) -> FromGuest {
        // The copies write UMEM frames, not guest memory: nothing to log for migration.
        let mut engine = CopyEngine::new(MAX_INFLIGHT, None);
        // A fresh engine has no channel, so binding cannot be refused.
        let _ = engine.bind(channel);
        FromGuest {
            engine,
            segments: Vec::with_capacity(16),
            epoch: 0,
        }
    }

    /// The channel's completion fd (to wait on while copies are in flight).
    pub fn completion_fd(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        self.engine.completion_fd()
    }

    /// The engine's counters.
    pub fn stats(&self) -> CopyStats {
        self.engine.stats()
    }

    /// Frames in flight.
    pub fn inflight(&self) -> usize {
        self.engine.inflight()
    }

    /// Room for this many more frames in flight.
    pub fn room(&self) -> usize {
        self.engine.room()
    }

    /// Starts the copy of `chain`'s frame into `frame` (the UMEM frame at `addr` of uplink
    /// `uplink`, which the caller took and gets back through [`Self::complete`] when this
    /// returns `InFlight`; otherwise it is the caller's again). The caller checked `room()`.
    pub fn send<M>(
        &mut self,
        chain: virtio_queue::DescriptorChain<M>,
        mem: &Arc<GuestMem>,
        (uplink, addr, frame): (u16, u64, &mut [u8]),
    ) -> Taken
    where
        M: std::ops::Deref<Target = GuestMem>,
    {
        let head = chain.head_index();
        let segments = &mut self.segments;
        segments.clear();
        let target: &GuestMem = mem;
        let dst = frame.as_mut_ptr();
        let room = frame.len();
        let outcome = queue::tx_pieces(chain, target, room, |guest, off, n| {
            let mut done = 0usize;
            for slice in GuestMemoryBackend::get_slices(target, guest, n) {
                let Ok(slice) = slice else { return false };
                let len = slice.len();
                let from = slice.ptr_guard().as_ptr();
                // `off + done + len <= room`: tx_pieces hands out pieces of the frame only.
                let to = dst.wrapping_add(off + done);
                segments.push(Segment::new(from, to, len as u32));
                done += len;
            }
            done == n
        });
        let TxChain::Frame(len) = outcome else {
            return Taken::Done(outcome);
        };
        let token = Outgoing {
            head,
            uplink,
            addr,
            len: len as u32,
            _mem: Arc::clone(mem),
            epoch: self.epoch,
        };
        // SAFETY: each source is guest memory checked by tx_pieces and get_slices, inside the
        // mapping `mem` holds, whose Arc moves into the token (a plain mmap: the pointer
        // stays valid after its `ptr_guard` is dropped, vm-memory being built without `xen`); each destination lies in
        // `frame`, the UMEM frame at `addr` that the worker neither sends nor hands out again
        // until this token comes back. The engine gives a token back only once its copies
        // completed, so both outlive them. A UMEM frame is never guest memory, so they do
        // not overlap.
        match unsafe { self.engine.enqueue(token, &self.segments) } {
            Ok(()) => Taken::InFlight,
            // room() was checked: not expected. The frame is the caller's again.
            Err(_) => Taken::Done(TxChain::Frame(0)),
        }
    }

    /// Rings the channel for the copies of this burst, and asks for a wake-up if any are in
    /// flight.
    pub fn flush(&mut self) {
        self.engine.flush();
        if self.engine.inflight() > 0 {
            self.engine.arm_notification();
        }
    }

    /// Consumes the channel's wake-up.
    pub fn clear_notification(&mut self) {
        self.engine.clear_notification();
    }

    /// Hands each frame whose copy completed, in order, to `sent` (which queues it on its
    /// uplink and says whether it could, or frees it), counts it, then hands it to `used`
    /// (which marks its chain used). A frame of an earlier epoch goes to `sent` with `stale`
    /// true (to be freed) and is counted dropped, its chain left alone. Returns how many
    /// came back.
    pub fn complete(
        &mut self,
        counters: &GuestCounters,
        sent: &mut impl FnMut(&Outgoing, bool) -> bool,
        used: &mut impl FnMut(&Outgoing),
    ) -> usize {
        let epoch = self.epoch;
        self.engine.poll_completed(usize::MAX, |token| {
            finish(&token, epoch, counters, sent, used);
        })
    }

    /// Waits for every copy in flight (the queue stops or the device resets), handing each
    /// frame on as [`Self::complete`] does; if the channel does not finish them, a new epoch
    /// starts and they are dropped when it does.
    pub fn drain(
        &mut self,
        counters: &GuestCounters,
        sent: &mut impl FnMut(&Outgoing, bool) -> bool,
        used: &mut impl FnMut(&Outgoing),
    ) {
        let epoch = self.epoch;
        let drained = self
            .engine
            .drain(std::time::Duration::from_secs(2), |token| {
                finish(&token, epoch, counters, sent, used);
            });
        if let Err(e) = &drained {
            tracing::warn!(error = %e, "copies out of a guest did not finish; their frames are dropped when they do");
            self.epoch += 1;
        }
    }
}

fn finish(
    token: &Outgoing,
    epoch: u64,
    counters: &GuestCounters,
    sent: &mut impl FnMut(&Outgoing, bool) -> bool,
    used: &mut impl FnMut(&Outgoing),
) {
    if token.epoch != epoch {
        sent(token, true);
        GuestCounters::add(&counters.from_guest_dropped_reset, 1);
        return;
    }
    if sent(token, false) {
        GuestCounters::add(&counters.from_guest_packets, 1);
        GuestCounters::add(&counters.from_guest_bytes, u64::from(token.len));
    } else {
        GuestCounters::add(&counters.from_guest_dropped_full, 1);
    }
    used(token);
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};

    use virtio_queue::{
        Queue,
        desc::{RawDescriptor, split::Descriptor as SplitDescriptor},
        mock::MockSplitQueue,
    };
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

    use super::*;
    use crate::{
        copy::{ChannelKind, ChannelPool, Completed, DmaChannel, DmaError, OpStatus, QueueRef},
        vhost::net::HDR_LEN,
    };

    /// A channel that performs its copies only once `open`.
    #[derive(Debug)]
    struct Gate {
        open: Arc<AtomicBool>,
        ops: Vec<(usize, usize, u32)>,
        done: usize,
    }

    impl DmaChannel for Gate {
        fn kind(&self) -> ChannelKind {
            ChannelKind::Mock
        }
        fn name(&self) -> &str {
            "gate"
        }
        unsafe fn copy(&mut self, src: *const u8, dst: *mut u8, len: u32) -> Result<u16, DmaError> {
            self.ops.push((src as usize, dst as usize, len));
            Ok((self.ops.len() - 1) as u16)
        }
        fn submit(&mut self) -> Result<(), DmaError> {
            Ok(())
        }
        fn completed(&mut self, max: u16) -> Completed {
            if !self.open.load(Ordering::Relaxed) || self.done == self.ops.len() {
                return Completed::default();
            }
            let n = (self.ops.len() - self.done).min(usize::from(max));
            for &(src, dst, len) in &self.ops[self.done..self.done + n] {
                // SAFETY: the engine's contract keeps both valid until reported (now).
                unsafe {
                    std::ptr::copy_nonoverlapping(src as *const u8, dst as *mut u8, len as usize)
                };
            }
            self.done += n;
            Completed {
                count: n as u16,
                last_idx: (self.done - 1) as u16,
                has_error: false,
            }
        }
        fn completed_status(&mut self, _: &mut [OpStatus]) -> u16 {
            0
        }
        fn burst_capacity(&self) -> u16 {
            1024
        }
        fn completion_fd(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
            None
        }
    }

    fn gated() -> (FromGuest, Arc<AtomicBool>) {
        let open = Arc::new(AtomicBool::new(false));
        let mut pool = ChannelPool::new();
        let gate = Gate {
            open: Arc::clone(&open),
            ops: Vec::new(),
            done: 0,
        };
        pool.add(Box::new(gate), 0);
        let queue = QueueRef {
            device: "t".to_owned(),
            queue: 1,
        };
        (FromGuest::new(pool.bind("gate", queue).unwrap()), open)
    }

    /// A TX queue with `frames` chains, each a header then a frame of `len` bytes whose bytes
    /// are the chain's number; the frames' expected bytes.
    fn tx_queue(mem: &GuestMem, frames: u8, len: usize) -> (Queue, Vec<Vec<u8>>) {
        let vq = MockSplitQueue::create(mem, GuestAddress(0x8_0000), 16);
        let mut expected = Vec::new();
        let descs: Vec<RawDescriptor> = (0..frames)
            .map(|i| {
                let addr = 0x1_0000 + u64::from(i) * 0x1000;
                let frame = vec![i + 1; len];
                mem.write_slice(&frame, GuestAddress(addr + HDR_LEN as u64))
                    .unwrap();
                expected.push(frame);
                RawDescriptor::from(SplitDescriptor::new(addr, (HDR_LEN + len) as u32, 0, 0))
            })
            .collect();
        for (i, d) in descs.iter().enumerate() {
            vq.add_desc_chains(std::slice::from_ref(d), i as u16)
                .unwrap();
        }
        (vq.create_queue().unwrap(), expected)
    }

    #[test]
    fn a_frame_goes_out_and_its_chain_is_used_only_once_its_copy_completed_in_order() {
        let mem = Arc::new(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap());
        let (mut q, expected) = tx_queue(&mem, 2, 1000);
        let (mut tx, open) = gated();
        let mut frames = vec![vec![0u8; 2048]; 2];
        for (i, frame) in frames.iter_mut().enumerate() {
            let chain = queue::pop(&mut q, &*mem).unwrap().unwrap();
            assert_eq!(
                tx.send(chain, &mem, (0, i as u64, &mut frame[..])),
                Taken::InFlight
            );
        }
        tx.flush();
        let counters = GuestCounters::default();
        let (mut sent, mut used) = (Vec::new(), Vec::new());
        assert_eq!(
            tx.complete(
                &counters,
                &mut |o, stale| {
                    sent.push((o.addr, o.len, stale));
                    true
                },
                &mut |o| used.push(o.head)
            ),
            0
        );
        assert!(
            sent.is_empty() && used.is_empty(),
            "nothing before the copies completed"
        );
        open.store(true, Ordering::Relaxed);
        let n = tx.complete(
            &counters,
            &mut |o, stale| {
                sent.push((o.addr, o.len, stale));
                true
            },
            &mut |o| used.push(o.head),
        );
        assert_eq!(n, 2);
        assert_eq!(sent, vec![(0, 1000, false), (1, 1000, false)], "in order");
        assert_eq!(used, vec![0, 1]);
        for (frame, want) in frames.iter().zip(&expected) {
            assert_eq!(
                &frame[..1000],
                &want[..],
                "the frame, without the virtio-net header"
            );
        }
        assert_eq!(GuestCounters::get(&counters.from_guest_packets), 2);
        assert_eq!(GuestCounters::get(&counters.from_guest_bytes), 2000);
        assert_eq!(tx.stats().dma_copies, 2);
    }

    #[test]
    fn a_chain_that_is_not_a_frame_is_not_taken() {
        let mem = Arc::new(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap());
        // 3000 bytes do not fit a 2048-byte UMEM frame.
        let (mut q, _) = tx_queue(&mem, 1, 3000);
        let (mut tx, _open) = gated();
        let mut frame = vec![0u8; 2048];
        let chain = queue::pop(&mut q, &*mem).unwrap().unwrap();
        assert_eq!(
            tx.send(chain, &mem, (0, 0, &mut frame[..])),
            Taken::Done(TxChain::Oversize)
        );
        assert_eq!(tx.inflight(), 0);
    }

    #[test]
    fn frames_of_a_drain_that_gave_up_are_dropped_later_and_their_chains_left_alone() {
        let mem = Arc::new(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap());
        let (mut q, _) = tx_queue(&mem, 1, 100);
        let (mut tx, open) = gated();
        let mut frame = vec![0u8; 2048];
        let chain = queue::pop(&mut q, &*mem).unwrap().unwrap();
        assert_eq!(
            tx.send(chain, &mem, (0, 7, &mut frame[..])),
            Taken::InFlight
        );
        let counters = GuestCounters::default();
        // The channel never finishes while the queue stops: the drain gives up (2 s).
        tx.drain(
            &counters,
            &mut |_, _| panic!("nothing completed"),
            &mut |_| panic!("nothing used"),
        );
        open.store(true, Ordering::Relaxed);
        let mut freed = Vec::new();
        tx.complete(
            &counters,
            &mut |o, stale| {
                freed.push((o.addr, stale));
                true
            },
            &mut |_| panic!("a chain of the old queue marked used"),
        );
        assert_eq!(freed, vec![(7, true)], "the frame is freed, not sent");
        assert_eq!(GuestCounters::get(&counters.from_guest_dropped_reset), 1);
        assert_eq!(GuestCounters::get(&counters.from_guest_packets), 0);
    }
}
