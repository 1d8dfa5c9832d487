//! One AF_XDP socket on one (interface, rx queue), with its UMEM, its four rings, its
//! registration in the XDP program's `xsks` map, and a batch API that neither allocates nor
//! makes a syscall per frame.
//!
//! Frame ownership (every frame is in exactly one place, so none is ever lost):
//! `fill` frames are the kernel's, waiting for received packets; `pool` frames are free for
//! transmit; `staged` frames are filled and waiting for `tx_flush`; `tx_in_flight` frames are
//! in the tx ring or not yet reaped from the completion ring; frames the caller took with
//! `tx_alloc` and has not pushed or freed are `held`. A received frame goes straight back to
//! the fill ring once its bytes were seen.

use std::{ffi::CString, num::NonZeroU32, os::fd::BorrowedFd, path::Path};

use aya::maps::{Map, MapData, XskMap};
use thiserror::Error;
use xdpilone::{
    DeviceQueue, IfInfo, RingRx, RingTx, Socket, SocketConfig, Umem, UmemConfig, User, xdp::XdpDesc,
};

use xvio_common::PortStats;

use super::umem::{FramePool, UmemArea, raise_memlock};

/// Frames handled per call of `rx_burst` at most.
pub const BURST: usize = 64;
const SOL_XDP: libc::c_int = 283;
const XDP_OPTIONS: libc::c_int = 8;
const XDP_OPTIONS_ZEROCOPY: u32 = 1;

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
    /// Pushed, waiting for `tx_flush`.
    pub staged: u32,
    /// In the tx ring or awaiting completion.
    pub tx_in_flight: u32,
    /// Taken with `tx_alloc`, not pushed or freed yet.
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
    #[error(
        "AF_XDP {step} on {iface} queue {queue} failed: {errno}{hint}",
        hint = if *errno == nix::errno::Errno::ENOBUFS || *errno == nix::errno::Errno::EPERM {
            format!(" (RLIMIT_MEMLOCK is {memlock} bytes: raise it with `ulimit -l unlimited`, or run as root)")
        } else if *errno == nix::errno::Errno::EBUSY {
            " (another AF_XDP socket is bound to that queue)".to_owned()
        } else if *errno == nix::errno::Errno::EINVAL && *step == "bind" {
            " (does the interface have that many rx queues?)".to_owned()
        } else {
            String::new()
        }
    )]
    Socket {
        /// Which call.
        step: &'static str,
        /// The interface.
        iface: String,
        /// The queue.
        queue: u32,
        /// The error number.
        errno: nix::errno::Errno,
        /// RLIMIT_MEMLOCK in force.
        memlock: u64,
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
    rx: RingRx,
    tx: RingTx,
    device: DeviceQueue,
    user: User,
    _socket: Socket,
    _umem: Umem,
    pool: FramePool,
    staged: Vec<XdpDesc>,
    /// Scratch for the frames of one rx burst (a field, so no burst pays to zero it).
    rx_bases: [u64; BURST],
    stats: PortStats,
    counts: FrameCounts,
    // Last: the memory the kernel and the rings point into.
    area: UmemArea,
}

// SAFETY: the port owns its socket, rings and memory; xdpilone's ring handles are raw
// pointers into mappings owned by the port, used only through &mut self.
unsafe impl Send for XskPort {}

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
        let area =
            UmemArea::new(config.frames, config.frame_size).map_err(|source| XskError::Map {
                iface: iface.to_owned(),
                queue,
                bytes,
                source,
            })?;
        let fail = |step: &'static str| {
            move |errno: xdpilone::Errno| XskError::Socket {
                step,
                iface: iface.to_owned(),
                queue,
                errno: nix::errno::Errno::from_raw(errno.get_raw()),
                memlock,
            }
        };
        let umem_config = UmemConfig {
            fill_size: config.ring,
            complete_size: config.ring,
            frame_size: config.frame_size,
            headroom: 0,
            flags: 0,
        };
        // SAFETY: `area` is a page-aligned mapping of `frames` frames that the port keeps
        // alive, and drops after the UMEM and its sockets (field order).
        let umem = unsafe { Umem::new(umem_config, area.as_nonnull()) }
            .map_err(fail("UMEM registration"))?;
        let mut info = IfInfo::invalid();
        let name = CString::new(iface).map_err(|_| XskError::UnknownInterface {
            iface: iface.to_owned(),
        })?;
        info.from_name(&name)
            .map_err(|_| XskError::UnknownInterface {
                iface: iface.to_owned(),
            })?;
        info.set_queue(queue);
        let socket = Socket::with_shared(&info, &umem).map_err(fail("socket"))?;
        let mut device = umem.fq_cq(&socket).map_err(fail("fill/completion rings"))?;
        let rings = NonZeroU32::new(config.ring);
        let mut need_wakeup = true;
        let mut user = umem
            .rx_tx(
                &socket,
                &SocketConfig {
                    rx_size: rings,
                    tx_size: rings,
                    bind_flags: SocketConfig::XDP_BIND_NEED_WAKEUP,
                },
            )
            .map_err(fail("rx/tx rings"))?;
        if umem.bind(&user).is_err() {
            // Kernels before 5.4 refuse need_wakeup; bind without it.
            need_wakeup = false;
            user = umem
                .rx_tx(
                    &socket,
                    &SocketConfig {
                        rx_size: rings,
                        tx_size: rings,
                        bind_flags: 0,
                    },
                )
                .map_err(fail("rx/tx rings"))?;
            umem.bind(&user).map_err(fail("bind"))?;
        }
        let rx = user.map_rx().map_err(fail("rx ring mapping"))?;
        let tx = user.map_tx().map_err(fail("tx ring mapping"))?;
        let zero_copy = bound_zero_copy(user.as_raw_fd());

        let frame = u64::from(config.frame_size);
        let fill_frames = (config.frames / 2).min(config.ring);
        let mut writer = device.fill(fill_frames);
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
            rx,
            tx,
            device,
            user,
            _socket: socket,
            _umem: umem,
            pool,
            staged: Vec::with_capacity(config.ring as usize),
            rx_bases: [0; BURST],
            stats: PortStats::default(),
            counts,
            area,
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
        map.set(self.queue, self.user.as_raw_fd(), 0).map_err(err)?;
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
        // SAFETY: the fd is owned by the port's socket and stays open while &self lives.
        unsafe { BorrowedFd::borrow_raw(self.user.as_raw_fd()) }
    }

    /// Counters, with the bind mode and the kernel's drop statistics folded in
    /// (`rx_no_guest` is the caller's to fill).
    pub fn stats(&self) -> PortStats {
        let mut stats = self.stats;
        stats.active = 1;
        stats.zero_copy = u32::from(self.mode.zero_copy);
        stats.need_wakeup = u32::from(self.mode.need_wakeup);
        if let Ok(k) = self.user.statistics_v2() {
            stats.fill_ring_empty = k.rx_fill_ring_empty_descs;
            stats.rx_ring_full = k.rx_ring_full + k.rx_dropped;
        }
        stats.tx_in_flight = u64::from(self.counts.tx_in_flight);
        stats
    }

    /// Where the frames are.
    pub fn frame_counts(&self) -> FrameCounts {
        self.counts
    }

    /// Receives up to `max` (at most [`BURST`]) frames, shows each one's bytes to `each`,
    /// and gives the frames back to the fill ring. Returns how many.
    pub fn rx_burst(&mut self, max: usize, mut each: impl FnMut(&[u8])) -> usize {
        let mut n = 0;
        {
            let mut reader = self.rx.receive(max.min(BURST) as u32);
            while let Some(desc) = reader.read() {
                each(self.area.bytes(desc.addr, desc.len));
                self.stats.rx_bytes += u64::from(desc.len);
                self.rx_bases[n] = self.area.frame_base(desc.addr);
                n += 1;
            }
            reader.release();
        }
        if n == 0 {
            self.stats.rx_empty_polls += 1;
            if self.mode.need_wakeup && self.device.needs_wakeup() {
                self.device.wake();
            }
            return 0;
        }
        self.stats.rx_packets += n as u64;
        let mut writer = self.device.fill(n as u32);
        let refilled = writer.insert(self.rx_bases[..n].iter().copied()) as usize;
        writer.commit();
        drop(writer);
        // The fill ring holds every receive frame, so this cannot happen; if it did, the
        // frames go to the pool rather than being lost.
        for i in refilled..n {
            self.pool.give(self.rx_bases[i]);
            self.counts.fill -= 1;
            self.counts.pool += 1;
        }
        n
    }

    /// Takes up to `out.len()` (at most [`BURST`]) received frames out of the rx ring as
    /// (address, length), and keeps them: they are the packet buffers until handed back with
    /// [`Self::rx_release`] (after their copy completed). Returns how many.
    pub fn rx_take(&mut self, out: &mut [(u64, u32)]) -> usize {
        let mut n = 0;
        {
            let mut reader = self.rx.receive(out.len().min(BURST) as u32);
            while let Some(desc) = reader.read() {
                out[n] = (desc.addr, desc.len.min(self.area.frame_size()));
                self.stats.rx_bytes += u64::from(desc.len);
                n += 1;
            }
            reader.release();
        }
        if n == 0 {
            self.stats.rx_empty_polls += 1;
            if self.mode.need_wakeup && self.device.needs_wakeup() {
                self.device.wake();
            }
            return 0;
        }
        self.stats.rx_packets += n as u64;
        self.counts.fill -= n as u32;
        self.counts.rx_held += n as u32;
        n
    }

    /// The bytes of a received frame (from [`Self::rx_take`]).
    pub fn frame(&self, addr: u64, len: u32) -> &[u8] {
        self.area.bytes(addr, len)
    }

    /// Hands frames taken with [`Self::rx_take`] back to the fill ring.
    pub fn rx_release(&mut self, addrs: &[u64]) {
        let bases = addrs.iter().map(|&a| self.area.frame_base(a));
        let mut writer = self.device.fill(addrs.len() as u32);
        let refilled = writer.insert(bases) as usize;
        writer.commit();
        drop(writer);
        self.counts.rx_held -= addrs.len() as u32;
        self.counts.fill += refilled as u32;
        // The fill ring holds every receive frame, so this cannot happen; if it did, the
        // frames go to the pool rather than being lost.
        for &a in &addrs[refilled..] {
            self.pool.give(self.area.frame_base(a));
            self.counts.pool += 1;
        }
    }

    /// Takes a free frame for transmit (reaping completions first if none is free); `None`
    /// when every frame is busy, which is counted.
    pub fn tx_alloc(&mut self) -> Option<u64> {
        if self.pool.is_empty() {
            self.reap();
        }
        match self.pool.take() {
            Some(base) => {
                self.counts.pool -= 1;
                self.counts.held += 1;
                Some(base)
            }
            None => {
                self.stats.tx_no_frame += 1;
                None
            }
        }
    }

    /// The bytes of frame `base` (from `tx_alloc`), to fill.
    pub fn frame_mut(&mut self, base: u64) -> &mut [u8] {
        self.area.frame_mut(base)
    }

    /// Gives back a frame from `tx_alloc` unsent.
    pub fn tx_free(&mut self, base: u64) {
        if self.pool.give(base) {
            self.counts.held -= 1;
            self.counts.pool += 1;
        }
    }

    /// Queues frame `base` (from `tx_alloc`) holding `len` bytes for the next `tx_flush`.
    pub fn tx_push(&mut self, base: u64, len: u32) -> bool {
        if self.staged.len() == self.staged.capacity() {
            self.tx_flush();
        }
        if self.staged.len() == self.staged.capacity() {
            // The tx ring is full and stays full: drop it, counted.
            self.stats.tx_ring_full += 1;
            self.tx_free(base);
            return false;
        }
        self.staged.push(XdpDesc {
            addr: base,
            len: len.min(self.area.frame_size()),
            options: 0,
        });
        self.counts.held -= 1;
        self.counts.staged += 1;
        true
    }

    /// Copies `data` into a free frame and queues it; false (counted) when no frame is free.
    pub fn send(&mut self, data: &[u8]) -> bool {
        let Some(base) = self.tx_alloc() else {
            return false;
        };
        let frame = self.area.frame_mut(base);
        let len = data.len().min(frame.len());
        frame[..len].copy_from_slice(&data[..len]);
        self.tx_push(base, len as u32)
    }

    /// Hands the queued frames to the tx ring in one batch and wakes the kernel if it says
    /// it needs it. Frames the ring has no room for are dropped (back to the pool) and
    /// counted. Returns how many went into the ring.
    pub fn tx_flush(&mut self) -> usize {
        self.reap();
        if self.staged.is_empty() {
            return 0;
        }
        let mut writer = self.tx.transmit(self.staged.len() as u32);
        let sent = writer.insert(self.staged.iter().copied()) as usize;
        writer.commit();
        drop(writer);
        for desc in &self.staged[..sent] {
            self.stats.tx_bytes += u64::from(desc.len);
        }
        self.stats.tx_packets += sent as u64;
        self.counts.staged -= sent as u32;
        self.counts.tx_in_flight += sent as u32;
        for i in sent..self.staged.len() {
            let base = self.staged[i].addr;
            if self.pool.give(base) {
                self.counts.staged -= 1;
                self.counts.pool += 1;
            }
            self.stats.tx_ring_full += 1;
        }
        self.staged.clear();
        self.tx_kick();
        sent
    }

    /// Wakes the kernel to send what is in the tx ring, when it needs it. (In copy mode the
    /// kernel sends only from that syscall, a limited batch each time.)
    fn tx_kick(&mut self) {
        if self.tx.pending() > 0 && (!self.mode.need_wakeup || self.tx.needs_wakeup()) {
            self.tx.wake();
        }
    }

    /// Moves transmitted frames from the completion ring back to the pool, and wakes the
    /// kernel if the tx ring still holds frames; returns how many came back.
    pub fn reap(&mut self) -> usize {
        self.tx_kick();
        let mut reader = self.device.complete(self.counts.tx_in_flight);
        let mut n = 0;
        while let Some(addr) = reader.read() {
            if self.pool.give(self.area.frame_base(addr)) {
                n += 1;
            }
        }
        reader.release();
        drop(reader);
        self.counts.tx_in_flight -= n as u32;
        self.counts.pool += n as u32;
        n
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

/// Whether the socket `fd` was bound in zero-copy mode (`XDP_OPTIONS`).
fn bound_zero_copy(fd: libc::c_int) -> bool {
    let mut flags: u32 = 0;
    let mut len = size_of::<u32>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `flags`, a live u32, and updates len.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            SOL_XDP,
            XDP_OPTIONS,
            (&raw mut flags).cast(),
            &raw mut len,
        )
    };
    rc == 0 && flags & XDP_OPTIONS_ZEROCOPY != 0
}
