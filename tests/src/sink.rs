//! A receive-only guest for benchmarks: a virtio-net driver in the bench process that keeps
//! [`QUEUE`] receive buffers posted on one RX queue and counts the frames a vhost-user
//! backend puts in them, costing its own CPU a few nanoseconds per frame.
//!
//! It drives the split ring as DPDK's virtio PMD does in testpmd's rxonly mode: interrupts
//! off (`VRING_AVAIL_F_NO_INTERRUPT`), each used buffer posted again at once, a kick only
//! when the backend has not set `VRING_USED_F_NO_NOTIFY`, each frame's header read for its
//! buffer count (MRG_RXBUF). Unlike testpmd it does not busy-poll: it looks at the used ring
//! every `period` and sleeps in between, as a real-time thread that preempts whatever else
//! runs on its CPU when it wakes. On a machine where the generator and the guest share one
//! core, a polling guest takes half of that core away from the generator and bounds what any
//! datapath can deliver; this one leaves it to the generator.

use std::{
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU16, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use vhost::{
    VhostBackend,
    vhost_user::{
        Frontend, VhostUserFrontend, VhostUserProtocolFeatures,
        message::{VhostUserHeaderFlag, VhostUserVirtioFeatures},
    },
};
use virtio_bindings::{
    virtio_config::VIRTIO_F_VERSION_1,
    virtio_net::VIRTIO_NET_F_MRG_RXBUF,
    virtio_ring::{VRING_AVAIL_F_NO_INTERRUPT, VRING_DESC_F_WRITE, VRING_USED_F_NO_NOTIFY},
};
use vm_memory::{GuestAddress, GuestMemoryBackend};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use crate::{
    bench::{make_current_thread_fifo, pin_current_thread},
    guest::{RingLayout, map_memory_of, memfd, start_ring},
};

/// Entries of the RX queue (QEMU's largest `rx_queue_size`, and testpmd's ring in the bench).
pub const QUEUE: u16 = 1024;
/// Bytes of each receive buffer: a 1500-byte frame and its 12-byte header fit in one.
pub const BUFFER: u32 = 2048;
/// Where the buffers start in guest memory (the rings of both queues sit below).
const BUFFERS: u64 = 0x2_0000;
/// Bytes of guest memory: the rings and [`QUEUE`] buffers.
const MEMORY: usize = 4 << 20;
// Feature bits and ring flags as masks of the widths the rings and messages use.
const VERSION_1: u64 = 1 << VIRTIO_F_VERSION_1;
const MRG_RXBUF: u64 = 1 << VIRTIO_NET_F_MRG_RXBUF;
const PROTOCOL_FEATURES: u64 = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
const DESC_F_WRITE: u16 = VRING_DESC_F_WRITE as u16;
const AVAIL_F_NO_INTERRUPT: u16 = VRING_AVAIL_F_NO_INTERRUPT as u16;
const USED_F_NO_NOTIFY: u16 = VRING_USED_F_NO_NOTIFY as u16;

/// What the sink saw over its life.
#[derive(Clone, Copy, Debug, Default)]
pub struct SinkTotals {
    /// Frames received.
    pub frames: u64,
    /// Their bytes, without the virtio-net header.
    pub bytes: u64,
    /// Looks at the used ring.
    pub polls: u64,
    /// Kicks of the RX queue (the backend asked for them).
    pub kicks: u64,
    /// Whether MRG_RXBUF was negotiated.
    pub mergeable: bool,
    /// Whether its thread ran real-time (SCHED_FIFO), as meant.
    pub realtime: bool,
}

/// A receive-only guest on a thread of its own; stopped (and disconnected) by
/// [`RxSink::stop`] or on drop.
pub struct RxSink {
    stop: Arc<AtomicBool>,
    frames: Arc<AtomicU64>,
    thread: Option<JoinHandle<Result<SinkTotals, String>>>,
}

impl std::fmt::Debug for RxSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RxSink")
            .field("frames", &self.frames())
            .finish()
    }
}

/// The rings of one queue in this process's mapping of guest memory.
struct Ring {
    host: usize,
    layout: RingLayout,
}

impl Ring {
    fn at<T>(&self, offset: u64) -> *mut T {
        (self.host + offset as usize) as *mut T
    }

    fn avail_idx(&self) -> &AtomicU16 {
        // SAFETY: the avail index lies inside the mapped guest memory, which outlives the
        // ring (both live in the sink's thread), and is 2-byte aligned; the backend only
        // reads it.
        unsafe { AtomicU16::from_ptr(self.at(self.layout.avail + 2)) }
    }

    fn used_idx(&self) -> &AtomicU16 {
        // SAFETY: as for `avail_idx`; the backend writes it, atomically.
        unsafe { AtomicU16::from_ptr(self.at(self.layout.used + 2)) }
    }

    fn used_flags(&self) -> &AtomicU16 {
        // SAFETY: as for `used_idx`.
        unsafe { AtomicU16::from_ptr(self.at(self.layout.used)) }
    }

    /// Writes 16 bytes of descriptor `i`.
    fn set_desc(&self, i: u16, addr: u64, len: u32, flags: u16) {
        let at = self.layout.desc + 16 * u64::from(i);
        // SAFETY: descriptor `i` < size lies inside the mapped descriptor table; the backend
        // reads descriptors only once they are made available.
        unsafe {
            self.at::<u64>(at).write_volatile(addr.to_le());
            self.at::<u32>(at + 8).write_volatile(len.to_le());
            self.at::<u16>(at + 12).write_volatile(flags.to_le());
            self.at::<u16>(at + 14).write_volatile(0);
        }
    }

    fn set_avail_flags(&self, flags: u16) {
        // SAFETY: as for `avail_idx`.
        unsafe {
            self.at::<u16>(self.layout.avail)
                .write_volatile(flags.to_le())
        }
    }

    /// Puts descriptor `head` in avail slot `idx` (not yet published).
    fn set_avail(&self, idx: u16, head: u16) {
        let slot = self.layout.avail + 4 + 2 * u64::from(idx % self.layout.size);
        // SAFETY: the slot lies inside the avail ring; the backend reads it only once the
        // avail index covers it.
        unsafe { self.at::<u16>(slot).write_volatile(head.to_le()) }
    }

    /// The used element in slot `idx`: (descriptor head, bytes written).
    fn used(&self, idx: u16) -> (u32, u32) {
        let slot = self.layout.used + 4 + 8 * u64::from(idx % self.layout.size);
        // SAFETY: the slot lies inside the used ring, and the backend wrote it before it
        // published the used index read (Acquire) before this.
        unsafe {
            (
                u32::from_le(self.at::<u32>(slot).read_volatile()),
                u32::from_le(self.at::<u32>(slot + 4).read_volatile()),
            )
        }
    }

    /// `num_buffers` of the virtio-net header at the start of the buffer at `addr`.
    fn num_buffers(&self, addr: u64) -> u16 {
        // SAFETY: `addr` is one of the sink's buffers, inside the mapped memory; the backend
        // wrote it before it published the used entry.
        unsafe { u16::from_le(self.at::<u16>(addr + 10).read_volatile()) }
    }
}

impl RxSink {
    /// Connects to the backend on `socket` (retrying for up to 10 s while it is not there),
    /// sets up one queue pair with every RX buffer posted, and starts counting on a thread
    /// pinned to `cpu` that looks at the used ring every `period`.
    pub fn start(socket: &Path, cpu: usize, period: Duration) -> Result<RxSink, String> {
        if period.is_zero() {
            return Err(
                "the sink's period must not be 0: a real-time thread would spin".to_owned(),
            );
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut frontend = loop {
            match Frontend::connect(socket, 2) {
                Ok(f) => break f,
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                Err(e) => return Err(format!("connecting to {}: {e}", socket.display())),
            }
        };
        let e = |what: &'static str| move |e: vhost::Error| format!("{what}: {e}");
        frontend.set_owner().map_err(e("SET_OWNER"))?;
        let offered = frontend.get_features().map_err(e("GET_FEATURES"))?;
        let features = offered & (VERSION_1 | MRG_RXBUF | PROTOCOL_FEATURES);
        if features & VERSION_1 == 0 {
            return Err(format!(
                "the backend does not offer VIRTIO_F_VERSION_1 ({offered:#x})"
            ));
        }
        frontend.set_features(features).map_err(e("SET_FEATURES"))?;
        if features & PROTOCOL_FEATURES != 0 {
            let protocol = frontend
                .get_protocol_features()
                .map_err(e("GET_PROTOCOL_FEATURES"))?;
            let acked =
                protocol & (VhostUserProtocolFeatures::MQ | VhostUserProtocolFeatures::REPLY_ACK);
            frontend
                .set_protocol_features(acked)
                .map_err(e("SET_PROTOCOL_FEATURES"))?;
            // Each message from here on answered: a refused one fails here, named.
            if acked.contains(VhostUserProtocolFeatures::REPLY_ACK) {
                frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
            }
        }
        let file = memfd(MEMORY as u64);
        // Every page written once, as the memory of a guest that has run a while is (the
        // backend maps ahead only the pages a guest's memory has: `--lazy-guest-memory`).
        std::os::unix::fs::FileExt::write_all_at(&file, &vec![0u8; MEMORY], 0)
            .map_err(|e| format!("writing the guest's memory: {e}"))?;
        let (mem, region) = map_memory_of(&file, MEMORY);
        frontend
            .set_mem_table(&[region])
            .map_err(e("SET_MEM_TABLE"))?;
        let host = mem
            .get_host_address(GuestAddress(0))
            .map_err(|e| format!("guest memory: {e}"))? as usize;
        let (rx_layout, end) = RingLayout::at(0, QUEUE);
        let (tx_layout, end) = RingLayout::at(end.next_multiple_of(4096), QUEUE);
        assert!(end <= BUFFERS, "the rings overlap the buffers");
        let rx = Ring {
            host,
            layout: rx_layout,
        };
        let tx = Ring {
            host,
            layout: tx_layout,
        };
        for i in 0..QUEUE {
            rx.set_desc(
                i,
                BUFFERS + u64::from(i) * u64::from(BUFFER),
                BUFFER,
                DESC_F_WRITE,
            );
            rx.set_avail(i, i);
        }
        rx.set_avail_flags(AVAIL_F_NO_INTERRUPT);
        tx.set_avail_flags(AVAIL_F_NO_INTERRUPT);
        rx.avail_idx().store(QUEUE, Ordering::Release);
        let mut kicks = Vec::new();
        for (i, ring) in [&rx, &tx].into_iter().enumerate() {
            let new = || EventFd::new(EFD_NONBLOCK).map_err(|e| format!("eventfd: {e}"));
            let (kick, call) = (new()?, new()?);
            start_ring(&mut frontend, host as u64, &ring.layout, i, &kick, &call)?;
            kicks.push((kick, call));
        }
        let stop = Arc::new(AtomicBool::new(false));
        let frames = Arc::new(AtomicU64::new(0));
        let mergeable = features & MRG_RXBUF != 0;
        let (thread_stop, thread_frames) = (stop.clone(), frames.clone());
        let thread = std::thread::Builder::new()
            .name("xvio-rx-sink".to_owned())
            .spawn(move || {
                pin_current_thread(cpu);
                let realtime = make_current_thread_fifo();
                // The connection, the memory and the eventfds live as long as the loop.
                let _keep = (&frontend, &file, &mem, &tx);
                let (kick, _) = &kicks[0];
                let _ = kick.write(1);
                let mut totals = SinkTotals {
                    mergeable,
                    realtime,
                    ..SinkTotals::default()
                };
                let (mut seen, mut avail) = (0u16, QUEUE);
                // Buffers still to come of the frame being received (MRG_RXBUF).
                let mut rest = 0u16;
                while !thread_stop.load(Ordering::Relaxed) {
                    let used = rx.used_idx().load(Ordering::Acquire);
                    let n = used.wrapping_sub(seen);
                    if n > QUEUE {
                        return Err(format!(
                            "the backend published {n} used entries at once, more than the \
                             {QUEUE} buffers the ring holds (used index {used}, seen {seen})"
                        ));
                    }
                    for k in 0..n {
                        let (head, len) = rx.used(seen.wrapping_add(k));
                        let head = (head % u32::from(QUEUE)) as u16;
                        if rest == 0 {
                            totals.frames += 1;
                            totals.bytes += u64::from(len.saturating_sub(12));
                            if mergeable {
                                let addr = BUFFERS + u64::from(head) * u64::from(BUFFER);
                                rest = rx.num_buffers(addr).max(1) - 1;
                            }
                        } else {
                            totals.bytes += u64::from(len);
                            rest -= 1;
                        }
                        rx.set_avail(avail.wrapping_add(k), head);
                    }
                    totals.polls += 1;
                    if n > 0 {
                        seen = used;
                        avail = avail.wrapping_add(n);
                        rx.avail_idx().store(avail, Ordering::Release);
                        thread_frames.store(totals.frames, Ordering::Relaxed);
                        std::sync::atomic::fence(Ordering::SeqCst);
                        if rx.used_flags().load(Ordering::Relaxed) & USED_F_NO_NOTIFY == 0 {
                            let _ = kick.write(1);
                            totals.kicks += 1;
                        }
                    }
                    std::thread::sleep(period);
                }
                Ok(totals)
            })
            .map_err(|e| format!("starting the sink's thread: {e}"))?;
        Ok(RxSink {
            stop,
            frames,
            thread: Some(thread),
        })
    }

    /// Frames received so far.
    pub fn frames(&self) -> u64 {
        self.frames.load(Ordering::Relaxed)
    }

    /// Stops counting, disconnects, and returns the totals, or what went wrong.
    pub fn stop(mut self) -> Result<SinkTotals, String> {
        self.finish()
            .unwrap_or_else(|| Err("the sink was stopped already".to_owned()))
    }

    fn finish(&mut self) -> Option<Result<SinkTotals, String>> {
        self.stop.store(true, Ordering::Relaxed);
        let thread = self.thread.take()?;
        Some(
            thread
                .join()
                .unwrap_or_else(|_| Err("the sink's thread panicked".to_owned())),
        )
    }
}

impl Drop for RxSink {
    fn drop(&mut self) {
        let _ = self.finish();
    }
}
