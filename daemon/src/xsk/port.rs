//! One AF_XDP socket on one (interface, rx queue), with its UMEM, its four rings, its
//! registration in the XDP program's `xsks` map, and a batch API that neither allocates nor
//! makes a syscall per frame. Directions are the datapath's: frames the NIC received go
//! `to_guest`; frames `from_guest` go out through the tx ring.
//!
//! Frame ownership (every frame is in exactly one place, so none is ever lost):
//! `fill` frames are the kernel's, waiting for received packets; `pool` frames are free for
//! transmit; `staged` frames were accepted for transmit and wait for room in the tx ring;
//! `tx_in_flight` frames are in the tx ring or not yet reaped from the completion ring; frames
//! the caller took with `from_guest_alloc` and has not pushed or freed are `held`. A received
//! frame goes straight back to the fill ring once its bytes were seen.
//!
//! Back-pressure: a frame the port accepted (`from_guest_push` or `send_from_guest` said so)
//! is sent, never dropped; when the tx ring and the stage are full the port refuses the
//! frame, says so, and counts the refusal (`tx_ring_full`, or `tx_no_frame` when no frame is
//! free), so the caller can keep the frame (a guest's chain stays in its virtqueue) or drop it.

use std::{collections::VecDeque, os::fd::BorrowedFd, path::Path};

use aya::maps::{Map, MapData, XskMap};
use thiserror::Error;
use tracing::info;
use xdpilone::xdp::XdpDesc;
use xvio_common::PortStats;

use super::{
    queues,
    umem::{FramePool, OpenFailure, SocketSizes, XskSocket, raise_memlock},
};

/// Frames handled per call of `to_guest_burst` at most.
pub const BURST: usize = 64;

/// Sizes of a port.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct XskConfig {
    /// Bytes per frame: 2048 or 4096.
    pub frame_size: u32,
    /// Frames in the UMEM; half feed the fill ring, half are for transmit.
    pub frames: u32,
    /// Entries of each ring (a power of two).
    pub ring: u32,
}

impl Default for XskConfig {
    fn default() -> XskConfig {
        // 8192 fill/rx entries: 2048 lost frames under load when another process took the
        // consumer's core (see the design's measurements).
        XskConfig {
            frame_size: 2048,
            frames: 16384,
            ring: 8192,
        }
    }
}

impl XskConfig {
    /// Refuses sizes the kernel or the port cannot use, naming the option.
    pub fn check(&self) -> Result<(), XskError> {
        let bad = |what: String| Err(XskError::Config(what));
        if self.frame_size != 2048 && self.frame_size != 4096 {
            return bad(format!(
                "--xsk-frame-size {} must be 2048 or 4096",
                self.frame_size
            ));
        }
        if !self.ring.is_power_of_two() || !(64..=65536).contains(&self.ring) {
            return bad(format!(
                "ring size {} must be a power of two from 64 to 65536",
                self.ring
            ));
        }
        if self.frames < 2 * 64 || self.frames > 1 << 20 {
            return bad(format!(
                "--xsk-frames {} must be between 128 and 1048576",
                self.frames
            ));
        }
        Ok(())
    }
}

/// What the kernel gave when the socket was bound.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BindMode {
    /// Zero-copy (the driver maps the UMEM) rather than copy mode.
    pub zero_copy: bool,
    /// The rings say when they need a syscall to make progress.
    pub need_wakeup: bool,
}

/// How the frames of a port are spread (see the module doc).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameCounts {
    /// All frames of the UMEM.
    pub total: u32,
    /// In the fill ring or being received (the kernel's).
    pub fill: u32,
    /// Free for transmit.
    pub pool: u32,
    /// Accepted for transmit, waiting for room in the tx ring (`flush`).
    pub staged: u32,
    /// In the tx ring or awaiting completion.
    pub tx_in_flight: u32,
    /// Taken with `from_guest_alloc`, not pushed or freed yet.
    pub held: u32,
    /// Received and kept with `rx_take`, not released yet.
    pub rx_held: u32,
}

impl FrameCounts {
    /// Whether every frame is accounted for.
    pub fn balanced(&self) -> bool {
        self.fill + self.pool + self.staged + self.tx_in_flight + self.held + self.rx_held
            == self.total
    }

    /// Whether every frame is back home, in the fill ring or the pool (nothing staged, in
    /// flight or held): the state after the worker has reaped everything.
    pub fn all_home(&self) -> bool {
        self.fill + self.pool == self.total
    }
}

/// Errors of opening a port; each names the interface and queue.
#[derive(Debug, Error)]
pub enum XskError {
    /// A size the port cannot use.
    #[error("{0}")]
    Config(String),
    /// The interface does not exist.
    #[error("interface '{iface}' does not exist")]
    UnknownInterface {
        /// The interface.
        iface: String,
    },
    /// The UMEM could not be mapped.
    #[error("mapping {bytes} bytes of UMEM for {iface} queue {queue}")]
    Map {
        /// The interface.
        iface: String,
        /// The queue.
        queue: u32,
        /// Bytes asked for.
        bytes: u64,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A socket call failed.
    #[error("AF_XDP {step} on {iface} queue {queue} failed: {errno}{hint}")]
    Socket {
        /// Which call.
        step: &'static str,
        /// The interface.
        iface: String,
        /// The queue.
        queue: u32,
        /// The error number.
        errno: nix::errno::Errno,
        /// What to do about it (empty, or starting with a separator).
        hint: String,
    },
    /// Asking the kernel which queues the interface has enabled failed.
    #[error("asking the kernel for the queues of '{iface}'")]
    Queues {
        /// The interface.
        iface: String,
        /// The cause.
        #[source]
        source: crate::netlink::NetlinkError,
    },
    /// Registering the socket in `xsks` failed.
    #[error("registering {iface} queue {queue} in {map}")]
    Register {
        /// The interface.
        iface: String,
        /// The queue.
        queue: u32,
        /// The pinned map.
        map: String,
        /// The cause.
        #[source]
        source: Box<aya::maps::MapError>,
    },
}

/// An AF_XDP socket bound to one rx queue.
pub struct XskPort {
    iface: String,
    queue: u32,
    mode: BindMode,
    registration: Option<XskMap<MapData>>,
    pool: FramePool,
    /// Accepted frames waiting for room in the tx ring, oldest first; at most `stage_limit`.
    staged: VecDeque<XdpDesc>,
    stage_limit: usize,
    /// Scratch for the frames of one burst (a field, so no burst pays to zero it).
    burst_bases: [u64; BURST],
    stats: PortStats,
    counts: FrameCounts,
    // Last: the socket, its rings and the memory they point into.
    socket: XskSocket,
}

impl std::fmt::Debug for XskPort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("XskPort")
            .field("iface", &self.iface)
            .field("queue", &self.queue)
            .field("mode", &self.mode)
            .field("counts", &self.counts)
            .finish()
    }
}

impl XskPort {
    /// Opens a socket on `queue` of `iface` (in this thread's network namespace), binds it
    /// (zero-copy if the driver can, else copy; need_wakeup if the kernel can), and fills the
    /// fill ring with half the frames.
    pub fn open(iface: &str, queue: u32, config: &XskConfig) -> Result<XskPort, XskError> {
        config.check()?;
        let bytes = u64::from(config.frames) * u64::from(config.frame_size);
        let memlock = raise_memlock(bytes);
        let sizes = SocketSizes {
            frames: config.frames,
            frame_size: config.frame_size,
            ring: config.ring,
        };
        let error = |failure| open_error(failure, iface, queue, bytes, memlock);
        let (mut socket, need_wakeup) = match XskSocket::open(iface, queue, sizes, true) {
            Ok(socket) => (socket, true),
            // Kernels before 5.4 refuse the need_wakeup flag with EINVAL, which is also what
            // a queue that is not enabled gets: fall back only when the queue is not known to
            // be disabled, on a fresh socket (the old one's rings are set up for good).
            Err(OpenFailure::Socket("bind", nix::errno::Errno::EINVAL))
                if not_enabled_hint(iface, queue).is_none() =>
            {
                let socket = XskSocket::open(iface, queue, sizes, false).map_err(error)?;
                info!(
                    iface,
                    queue, "the kernel refused need_wakeup; the socket is bound without it"
                );
                (socket, false)
            }
            Err(failure) => return Err(error(failure)),
        };
        let zero_copy = socket.zero_copy();

        let frame = u64::from(config.frame_size);
        let fill_frames = (config.frames / 2).min(config.ring);
        let mut writer = socket.device.fill(fill_frames);
        let filled = writer.insert((0..u64::from(fill_frames)).map(|i| i * frame));
        writer.commit();
        drop(writer);
        let pool_frames = config.frames - filled;
        let pool = FramePool::new(
            (u64::from(filled)..u64::from(config.frames)).map(|i| i * frame),
            pool_frames as usize,
        );
        let counts = FrameCounts {
            total: config.frames,
            fill: filled,
            pool: pool_frames,
            staged: 0,
            tx_in_flight: 0,
            held: 0,
            rx_held: 0,
        };
        Ok(XskPort {
            iface: iface.to_owned(),
            queue,
            mode: BindMode {
                zero_copy,
                need_wakeup,
            },
            registration: None,
            pool,
            staged: VecDeque::with_capacity(config.ring as usize),
            stage_limit: config.ring as usize,
            burst_bases: [0; BURST],
            stats: PortStats::default(),
            counts,
            socket,
        })
    }

    /// Registers the socket in the pinned `xsks` map at its queue; it is removed on drop.
    pub fn register(&mut self, xsks_pin: &Path) -> Result<(), XskError> {
        let err = |e: aya::maps::MapError| XskError::Register {
            iface: self.iface.clone(),
            queue: self.queue,
            map: xsks_pin.display().to_string(),
            source: Box::new(e),
        };
        let data = MapData::from_pin(xsks_pin).map_err(err)?;
        let mut map: XskMap<MapData> = XskMap::try_from(Map::XskMap(data)).map_err(err)?;
        map.set(self.queue, self.socket.raw_fd(), 0).map_err(err)?;
        self.registration = Some(map);
        Ok(())
    }

    /// The interface.
    pub fn iface(&self) -> &str {
        &self.iface
    }

    /// The rx queue.
    pub fn queue(&self) -> u32 {
        self.queue
    }

    /// The bind mode obtained.
    pub fn mode(&self) -> BindMode {
        self.mode
    }

    /// The socket's fd (to wait on with poll/epoll).
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.socket.fd()
    }

    /// Counters, with the bind mode and the kernel's drop statistics folded in
    /// (`rx_no_guest` is the caller's to fill).
    pub fn stats(&self) -> PortStats {
        let mut stats = self.stats;
        stats.active = 1;
        stats.zero_copy = u32::from(self.mode.zero_copy);
        stats.need_wakeup = u32::from(self.mode.need_wakeup);
        if let Ok(k) = self.socket.user.statistics_v2() {
            stats.fill_ring_empty = k.rx_fill_ring_empty_descs;
            // The kernel counts a frame it drops for an empty fill ring both in
            // `rx_dropped` and in the fill ring's empty count: only its other drops are added.
            stats.rx_ring_full =
                k.rx_ring_full + k.rx_dropped.saturating_sub(k.rx_fill_ring_empty_descs);
        }
        stats.tx_in_flight = u64::from(self.counts.tx_in_flight);
        stats
    }

    /// Frames one `sendto` hands the kernel in copy mode, when the kernel took xvio's budget
    /// ([`crate::xsk::umem::TX_BUDGET`], Linux 6.17 and later); `None`: the kernel's own (32
    /// on recent kernels).
    pub fn tx_budget(&self) -> Option<u32> {
        self.socket.tx_budget
    }

    /// Frames in the tx ring that the kernel has not taken yet.
    pub fn tx_unsent(&self) -> u32 {
        self.socket.tx.pending()
    }

    /// Where the frames are.
    pub fn frame_counts(&self) -> FrameCounts {
        self.counts
    }

    /// Takes up to `max` (at most [`BURST`]) frames the NIC received, for guests: shows each
    /// one's bytes to `each` and gives the frames back to the fill ring. Returns how many.
    pub fn to_guest_burst(&mut self, max: usize, mut each: impl FnMut(&[u8])) -> usize {
        let mut descs = [(0u64, 0u32); BURST];
        let n = self.to_guest_take(&mut descs[..max.min(BURST)]);
        for (i, &(addr, len)) in descs[..n].iter().enumerate() {
            each(self.frame(addr, len));
            self.burst_bases[i] = addr;
        }
        let bases = self.burst_bases;
        self.to_guest_release(&bases[..n]);
        n
    }

    /// Takes up to `out.len()` (at most [`BURST`]) received frames out of the rx ring as
    /// (address, length), and keeps them: they are the packet buffers until handed back with
    /// [`Self::to_guest_release`] (after their copy completed). Returns how many.
    pub fn to_guest_take(&mut self, out: &mut [(u64, u32)]) -> usize {
        let mut n = 0;
        {
            let XskSocket { rx, area, .. } = &mut self.socket;
            let mut reader = rx.receive(out.len().min(BURST) as u32);
            while let Some(desc) = reader.read() {
                out[n] = (desc.addr, desc.len.min(area.frame_size()));
                self.stats.rx_bytes += u64::from(desc.len);
                n += 1;
            }
            reader.release();
        }
        if n == 0 {
            self.stats.rx_empty_polls += 1;
            if self.mode.need_wakeup && self.socket.device.needs_wakeup() {
                self.socket.device.wake();
            }
            return 0;
        }
        self.stats.rx_packets += n as u64;
        self.counts.fill -= n as u32;
        self.counts.rx_held += n as u32;
        n
    }

    /// The bytes of a received frame (from [`Self::to_guest_take`]).
    pub fn frame(&self, addr: u64, len: u32) -> &[u8] {
        self.socket.area.bytes(addr, len)
    }

    /// The bytes of a received frame (from [`Self::to_guest_take`]), to change in place
    /// before its copy (a VLAN tag taken out).
    pub fn frame_received_mut(&mut self, addr: u64, len: u32) -> &mut [u8] {
        self.socket.area.bytes_mut(addr, len)
    }

    /// Hands frames taken with [`Self::to_guest_take`] back to the fill ring.
    pub fn to_guest_release(&mut self, addrs: &[u64]) {
        let XskSocket { device, area, .. } = &mut self.socket;
        let bases = addrs.iter().map(|&a| area.frame_base(a));
        let mut writer = device.fill(addrs.len() as u32);
        let refilled = writer.insert(bases) as usize;
        writer.commit();
        drop(writer);
        self.counts.rx_held -= addrs.len() as u32;
        self.counts.fill += refilled as u32;
        // The fill ring holds every receive frame, so this cannot happen; if it did, the
        // frames go to the pool rather than being lost.
        for &a in &addrs[refilled..] {
            self.pool.give(self.socket.area.frame_base(a));
            self.counts.pool += 1;
        }
    }

    /// Takes a free frame for a frame from a guest (reaping completions first if none is
    /// free); `None` when every frame is busy, which is counted (`tx_no_frame`).
    pub fn from_guest_alloc(&mut self) -> Option<u64> {
        let base = self.take_frame();
        if base.is_none() {
            self.stats.tx_no_frame += 1;
        }
        base
    }

    /// Bytes a frame for transmit holds (what [`Self::frame_mut`] gives).
    pub fn frame_room(&self) -> usize {
        self.socket.area.frame_size() as usize
    }

    /// The bytes of frame `base` (from `from_guest_alloc`), to fill.
    pub fn frame_mut(&mut self, base: u64) -> &mut [u8] {
        self.socket.area.frame_mut(base)
    }

    /// Counts a frame not sent because it is longer than a UMEM frame (`tx_oversize`).
    pub fn count_oversize(&mut self) {
        self.stats.tx_oversize += 1;
    }

    /// Gives back a frame from `from_guest_alloc` unsent.
    pub fn from_guest_free(&mut self, base: u64) {
        if self.pool.give(base) {
            self.counts.held -= 1;
            self.counts.pool += 1;
        }
    }

    /// Accepts frame `base` (from `from_guest_alloc`) holding `len` bytes for transmit; it
    /// goes into the tx ring now or at a later `flush`, and is never dropped. False when the
    /// tx ring and the stage are full even after a flush: the frame was not taken and is
    /// still the caller's (to push again later, or to free), and the refusal is counted
    /// (`tx_ring_full`).
    pub fn from_guest_push(&mut self, base: u64, len: u32) -> bool {
        if !self.make_room() {
            self.stats.tx_ring_full += 1;
            return false;
        }
        self.stage(base, len);
        true
    }

    /// Copies `frames`, in order, into free frames and accepts them for transmit, until the
    /// first one the port cannot take (no free frame, or the tx ring and the stage are full).
    /// Returns how many it took; every frame it took is sent, and each one it did not take is
    /// counted (`tx_no_frame` or `tx_ring_full`) and is the caller's to offer again or drop.
    pub fn send_from_guest<F: AsRef<[u8]>>(&mut self, frames: &[F]) -> usize {
        for (taken, data) in frames.iter().enumerate() {
            let refused = (frames.len() - taken) as u64;
            if !self.make_room() {
                self.stats.tx_ring_full += refused;
                return taken;
            }
            let Some(base) = self.take_frame() else {
                self.stats.tx_no_frame += refused;
                return taken;
            };
            let frame = self.socket.area.frame_mut(base);
            let data = data.as_ref();
            let len = data.len().min(frame.len());
            frame[..len].copy_from_slice(&data[..len]);
            self.stage(base, len as u32);
        }
        frames.len()
    }

    /// Hands the accepted frames to the tx ring in one batch, oldest first, and wakes the
    /// kernel if it says it needs it. Frames the ring has no room for stay staged, in order,
    /// for the next call. Returns how many went into the ring.
    pub fn flush(&mut self) -> usize {
        self.reap();
        if self.staged.is_empty() {
            return 0;
        }
        let mut writer = self.socket.tx.transmit(self.staged.len() as u32);
        let sent = writer.insert(self.staged.iter().copied()) as usize;
        writer.commit();
        drop(writer);
        for desc in self.staged.drain(..sent) {
            self.stats.tx_bytes += u64::from(desc.len);
        }
        self.stats.tx_packets += sent as u64;
        self.counts.staged -= sent as u32;
        self.counts.tx_in_flight += sent as u32;
        self.tx_kick();
        sent
    }

    /// Moves transmitted frames from the completion ring back to the pool, and wakes the
    /// kernel if the tx ring still holds frames; returns how many came back.
    pub fn reap(&mut self) -> usize {
        self.tx_kick();
        let XskSocket { device, area, .. } = &mut self.socket;
        let mut reader = device.complete(self.counts.tx_in_flight);
        let mut n = 0;
        while let Some(addr) = reader.read() {
            if self.pool.give(area.frame_base(addr)) {
                n += 1;
            }
        }
        reader.release();
        drop(reader);
        self.counts.tx_in_flight -= n as u32;
        self.counts.pool += n as u32;
        n
    }

    /// A free frame, reaping completions first if none is free; uncounted.
    fn take_frame(&mut self) -> Option<u64> {
        if self.pool.is_empty() {
            self.reap();
        }
        let base = self.pool.take()?;
        self.counts.pool -= 1;
        self.counts.held += 1;
        Some(base)
    }

    /// Whether the stage has room for one more frame, flushing it into the tx ring first if
    /// it is full.
    fn make_room(&mut self) -> bool {
        if self.staged.len() >= self.stage_limit {
            self.flush();
        }
        self.staged.len() < self.stage_limit
    }

    /// Stages a held frame (room was made).
    fn stage(&mut self, base: u64, len: u32) {
        self.staged.push_back(XdpDesc {
            addr: base,
            len: len.min(self.socket.area.frame_size()),
            options: 0,
        });
        self.counts.held -= 1;
        self.counts.staged += 1;
    }

    /// Wakes the kernel to send what is in the tx ring, when it needs it. (In copy mode the
    /// kernel sends only from that syscall, a limited batch each time.)
    fn tx_kick(&mut self) {
        let tx = &self.socket.tx;
        if tx.pending() > 0 && (!self.mode.need_wakeup || tx.needs_wakeup()) {
            tx.wake();
        }
    }
}

impl Drop for XskPort {
    fn drop(&mut self) {
        if let Some(map) = self.registration.as_mut() {
            // The kernel also drops a closed socket from the map; this makes it immediate.
            let _ = map.unset(self.queue);
        }
    }
}

/// Why `queue` of `iface` cannot take a socket, when its channels say it is not enabled.
fn not_enabled_hint(iface: &str, queue: u32) -> Option<String> {
    let ifindex = nix::net::if_::if_nametoindex(iface).ok()?;
    queues::not_enabled(iface, ifindex, queue)
}

/// The error for a socket that could not be opened, with what to do about it.
fn open_error(failure: OpenFailure, iface: &str, queue: u32, bytes: u64, memlock: u64) -> XskError {
    use nix::errno::Errno;
    let (step, errno) = match failure {
        OpenFailure::UnknownInterface => {
            return XskError::UnknownInterface {
                iface: iface.to_owned(),
            };
        }
        OpenFailure::Map(source) => {
            return XskError::Map {
                iface: iface.to_owned(),
                queue,
                bytes,
                source,
            };
        }
        OpenFailure::Socket(step, errno) => (step, errno),
    };
    let hint = match errno {
        Errno::ENOBUFS | Errno::EPERM => format!(
            " (RLIMIT_MEMLOCK is {memlock} bytes: raise it with `ulimit -l unlimited`, give xvio CAP_IPC_LOCK, or run as root)"
        ),
        Errno::EBUSY => " (another AF_XDP socket is bound to that queue)".to_owned(),
        Errno::EINVAL if step == "bind" => match not_enabled_hint(iface, queue) {
            Some(why) => format!(" ({why})"),
            None => format!(" (is queue {queue} enabled? see `ethtool -l {iface}`)"),
        },
        _ => String::new(),
    };
    XskError::Socket {
        step,
        iface: iface.to_owned(),
        queue,
        errno,
        hint,
    }
}
