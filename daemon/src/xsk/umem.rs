//! The UMEM of an AF_XDP port (a page-aligned anonymous mapping, split into frames), the
//! socket bound over it with its four rings, and the LIFO pool of frames the port's worker
//! owns. This is the one home of the `xsk` module's `unsafe`: the mapping the kernel reads
//! and writes, its registration, and the socket calls xdpilone does not wrap.
//!
//! Invariants: the mapping outlives everything that points into it (it is the last field of
//! [`XskSocket`] dropped); the pool holds frame base offsets only, each at most once, and
//! never more than the area has.

use std::{
    ffi::CString,
    io,
    num::NonZeroU32,
    os::fd::{BorrowedFd, RawFd},
    ptr::NonNull,
};

use nix::sys::resource::{Resource, getrlimit, setrlimit};
use xdpilone::{DeviceQueue, IfInfo, RingRx, RingTx, Socket, SocketConfig, Umem, UmemConfig, User};

const SOL_XDP: libc::c_int = 283;
const XDP_OPTIONS: libc::c_int = 8;
const XDP_OPTIONS_ZEROCOPY: u32 = 1;
/// Linux 6.17's per-socket limit of the frames one `sendto` sends in copy mode (else 32).
const XDP_MAX_TX_SKB_BUDGET: libc::c_int = 9;

/// An anonymous, page-aligned, pre-faulted mapping of `frames × frame_size` bytes.
#[derive(Debug)]
pub struct UmemArea {
    ptr: NonNull<u8>,
    len: usize,
    frame_size: u32,
}

// SAFETY: the area is plain memory owned by the port; access goes through &self/&mut self of
// the port that owns it (the kernel writes only frames the port handed it).
unsafe impl Send for UmemArea {}

impl UmemArea {
    /// Maps `frames` frames of `frame_size` bytes (2048 or 4096).
    pub fn new(frames: u32, frame_size: u32) -> io::Result<UmemArea> {
        let len = frames as usize * frame_size as usize;
        // SAFETY: an anonymous private mapping at an address the kernel chooses; it aliases
        // nothing. The result is checked.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr = NonNull::new(ptr.cast()).ok_or_else(|| io::Error::other("mmap returned NULL"))?;
        Ok(UmemArea {
            ptr,
            len,
            frame_size,
        })
    }

    /// The whole area, for registering it with the kernel.
    pub fn as_nonnull(&self) -> NonNull<[u8]> {
        NonNull::slice_from_raw_parts(self.ptr, self.len)
    }

    /// Bytes of one frame.
    pub fn frame_size(&self) -> u32 {
        self.frame_size
    }

    /// Frames in the area.
    pub fn frames(&self) -> u32 {
        (self.len / self.frame_size as usize) as u32
    }

    /// The base offset of the frame holding `addr`.
    pub fn frame_base(&self, addr: u64) -> u64 {
        addr - addr % u64::from(self.frame_size)
    }

    /// `len` bytes at `addr`, clamped to the frame that holds `addr`.
    pub fn bytes(&self, addr: u64, len: u32) -> &[u8] {
        let (start, end) = self.clamp(addr, len);
        // SAFETY: [start, end) lies inside the mapping (clamped to one frame), which lives as
        // long as &self. The kernel wrote the frame before it published the descriptor and
        // does not touch it until the port hands the frame back.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr().add(start), end - start) }
    }

    /// `len` bytes at `addr` (a received frame the port holds), clamped to the frame that
    /// holds `addr`, to change in place before they are copied on.
    pub fn bytes_mut(&mut self, addr: u64, len: u32) -> &mut [u8] {
        let (start, end) = self.clamp(addr, len);
        // SAFETY: [start, end) lies inside the mapping (clamped to one frame), exclusively
        // borrowed through &mut self. The frame is the port's: the kernel published it on the
        // rx ring and gets it back only when the port puts it on the fill ring.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr().add(start), end - start) }
    }

    /// The whole frame at base offset `base`, to fill for transmit.
    pub fn frame_mut(&mut self, base: u64) -> &mut [u8] {
        let (start, end) = self.clamp(base, self.frame_size);
        // SAFETY: inside the mapping (one frame), exclusively borrowed through &mut self; the
        // frame is owned by the port (taken from its pool), not by the kernel.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr().add(start), end - start) }
    }

    fn clamp(&self, addr: u64, len: u32) -> (usize, usize) {
        let base = self.frame_base(addr);
        let start = usize::try_from(addr).unwrap_or(usize::MAX).min(self.len);
        let frame_end = usize::try_from(base + u64::from(self.frame_size))
            .unwrap_or(usize::MAX)
            .min(self.len);
        (
            start,
            start.saturating_add(len as usize).min(frame_end).max(start),
        )
    }
}

impl Drop for UmemArea {
    fn drop(&mut self) {
        // SAFETY: exactly the mapping made in `new`, unmapped once, after the sockets that
        // used it (the port drops it last).
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// Sizes of one socket's UMEM and rings.
#[derive(Clone, Copy, Debug)]
pub struct SocketSizes {
    /// Frames in the UMEM.
    pub frames: u32,
    /// Bytes per frame.
    pub frame_size: u32,
    /// Entries of each of the four rings.
    pub ring: u32,
}

/// Why a socket could not be opened: the mapping, or one call and its errno.
#[derive(Debug)]
pub enum OpenFailure {
    /// The interface name has a NUL byte or names no interface.
    UnknownInterface,
    /// Mapping the UMEM failed.
    Map(io::Error),
    /// A socket call failed: which one, and the errno.
    Socket(&'static str, nix::errno::Errno),
}

/// One AF_XDP socket bound to one (interface, queue) over its own UMEM: xdpilone's handles
/// and the memory they point into. Fields drop in order: the rings and the socket first, the
/// UMEM registration next, the mapping last.
pub struct XskSocket {
    /// The rx ring: frames the NIC received, for guests.
    pub(super) rx: RingRx,
    /// The tx ring: frames from guests, for the NIC.
    pub(super) tx: RingTx,
    /// The fill and completion rings.
    pub(super) device: DeviceQueue,
    /// The bound socket (statistics, fd).
    pub(super) user: User,
    /// Frames one `sendto` sends in copy mode, when the kernel took xvio's budget; `None`:
    /// the kernel's own (32 on recent kernels).
    pub(super) tx_budget: Option<u32>,
    _socket: Socket,
    _umem: Umem,
    /// The frames (read-only outside this module: the mapping is this socket's for good).
    pub(super) area: UmemArea,
}

// SAFETY: the socket owns its UMEM mapping and its ring mappings (xdpilone's handles hold raw
// pointers into them, which is why they are not Send); nothing else points into them, and the
// port that owns the socket uses them only through &mut self, on one thread at a time.
unsafe impl Send for XskSocket {}

impl std::fmt::Debug for XskSocket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("XskSocket")
            .field("fd", &self.user.as_raw_fd())
            .field("area", &self.area)
            .finish()
    }
}

impl XskSocket {
    /// Maps a UMEM of `sizes`, registers it, and binds a fresh socket with rx and tx rings to
    /// `queue` of `iface` (in this thread's network namespace), asking for need_wakeup when
    /// `need_wakeup`. Nothing of a failed attempt is kept: a retry starts from a new socket,
    /// since the kernel refuses to set up the rings of a socket twice.
    pub fn open(
        iface: &str,
        queue: u32,
        sizes: SocketSizes,
        need_wakeup: bool,
    ) -> Result<XskSocket, OpenFailure> {
        let fail = |step: &'static str| {
            move |e: xdpilone::Errno| {
                OpenFailure::Socket(step, nix::errno::Errno::from_raw(e.get_raw()))
            }
        };
        let area = UmemArea::new(sizes.frames, sizes.frame_size).map_err(OpenFailure::Map)?;
        let config = UmemConfig {
            fill_size: sizes.ring,
            complete_size: sizes.ring,
            frame_size: sizes.frame_size,
            headroom: 0,
            flags: 0,
        };
        // SAFETY: `area` is a page-aligned mapping of `frames` frames of `frame_size` bytes;
        // the returned socket owns it and drops it after the registration (field order).
        let umem =
            unsafe { Umem::new(config, area.as_nonnull()) }.map_err(fail("UMEM registration"))?;
        let name = CString::new(iface).map_err(|_| OpenFailure::UnknownInterface)?;
        let mut info = IfInfo::invalid();
        info.from_name(&name)
            .map_err(|_| OpenFailure::UnknownInterface)?;
        info.set_queue(queue);
        let socket = Socket::with_shared(&info, &umem).map_err(fail("socket"))?;
        let device = umem.fq_cq(&socket).map_err(fail("fill/completion rings"))?;
        let rings = NonZeroU32::new(sizes.ring);
        let user = umem
            .rx_tx(
                &socket,
                &SocketConfig {
                    rx_size: rings,
                    tx_size: rings,
                    bind_flags: if need_wakeup {
                        SocketConfig::XDP_BIND_NEED_WAKEUP
                    } else {
                        0
                    },
                },
            )
            .map_err(fail("rx/tx rings"))?;
        umem.bind(&user).map_err(fail("bind"))?;
        let rx = user.map_rx().map_err(fail("rx ring mapping"))?;
        let tx = user.map_tx().map_err(fail("tx ring mapping"))?;
        let tx_budget = set_tx_budget(user.as_raw_fd(), sizes.ring.min(TX_BUDGET));
        Ok(XskSocket {
            tx_budget,
            rx,
            tx,
            device,
            user,
            _socket: socket,
            _umem: umem,
            area,
        })
    }

    /// The socket's fd, to register in an XSKMAP.
    pub fn raw_fd(&self) -> RawFd {
        self.user.as_raw_fd()
    }

    /// The socket's fd, to wait on with poll/epoll.
    pub fn fd(&self) -> BorrowedFd<'_> {
        // SAFETY: the fd is owned by the socket's handles and stays open while &self lives.
        unsafe { BorrowedFd::borrow_raw(self.user.as_raw_fd()) }
    }

    /// Whether the kernel bound the socket in zero-copy mode (`XDP_OPTIONS`).
    pub fn zero_copy(&self) -> bool {
        let mut flags: u32 = 0;
        let mut len = size_of::<u32>() as libc::socklen_t;
        // SAFETY: getsockopt writes at most `len` bytes into `flags`, a live u32, and updates
        // len; the fd is the socket's own.
        let rc = unsafe {
            libc::getsockopt(
                self.user.as_raw_fd(),
                SOL_XDP,
                XDP_OPTIONS,
                (&raw mut flags).cast(),
                &raw mut len,
            )
        };
        rc == 0 && flags & XDP_OPTIONS_ZEROCOPY != 0
    }
}

/// Frames one `sendto` may send in copy mode, where the kernel allows it.
pub const TX_BUDGET: u32 = 64;

/// Asks the kernel to send up to `budget` frames per `sendto` in copy mode; `Some(budget)`
/// when it took it. Kernels before 6.17 do not know the option (`ENOPROTOOPT`): they keep
/// their own (32 on recent kernels), which costs only syscalls.
fn set_tx_budget(fd: RawFd, budget: u32) -> Option<u32> {
    // SAFETY: setsockopt reads size_of::<u32>() bytes from `budget`, a live u32; the fd is
    // the socket's own.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            SOL_XDP,
            XDP_MAX_TX_SKB_BUDGET,
            (&raw const budget).cast(),
            size_of::<u32>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        return Some(budget);
    }
    tracing::debug!(
        budget,
        error = %io::Error::last_os_error(),
        "XDP_MAX_TX_SKB_BUDGET refused: the kernel keeps its own tx budget"
    );
    None
}

/// Frames the worker owns and may hand out for transmit: a stack (the most recently used
/// frame, likely still in cache, goes out first). Never allocates after `new`.
#[derive(Debug)]
pub struct FramePool {
    free: Vec<u64>,
}

impl FramePool {
    /// A pool holding `frames`.
    pub fn new(frames: impl Iterator<Item = u64>, capacity: usize) -> FramePool {
        let mut free = Vec::with_capacity(capacity);
        free.extend(frames.take(capacity));
        FramePool { free }
    }

    /// Takes a frame.
    pub fn take(&mut self) -> Option<u64> {
        self.free.pop()
    }

    /// Gives a frame back. Returns false (and drops nothing it holds) if the pool is full,
    /// which would mean a frame was given back twice.
    pub fn give(&mut self, base: u64) -> bool {
        if self.free.len() == self.free.capacity() {
            return false;
        }
        self.free.push(base);
        true
    }

    /// Frames in the pool.
    pub fn len(&self) -> usize {
        self.free.len()
    }

    /// Whether the pool is empty.
    pub fn is_empty(&self) -> bool {
        self.free.is_empty()
    }
}

/// Raises RLIMIT_MEMLOCK so that `bytes` of UMEM can be pinned; returns the limit in force.
/// (Root with CAP_IPC_LOCK is not limited; kernels since 5.11 charge UMEM to the memory
/// cgroup instead, but older ones still check this limit.)
pub fn raise_memlock(bytes: u64) -> u64 {
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_MEMLOCK) else {
        return 0;
    };
    let want = soft.saturating_add(bytes).min(hard);
    if want > soft && setrlimit(Resource::RLIMIT_MEMLOCK, want, hard).is_ok() {
        return want;
    }
    soft
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pool_is_lifo_and_refuses_extra_frames() {
        let mut pool = FramePool::new((0..4).map(|i| i * 2048), 4);
        assert_eq!(pool.take(), Some(3 * 2048));
        assert!(pool.give(3 * 2048));
        assert!(!pool.give(3 * 2048), "a full pool refuses a fifth frame");
        assert_eq!(pool.len(), 4);
        while pool.take().is_some() {}
        assert!(pool.is_empty());
    }

    #[test]
    fn frame_access_is_clamped_to_one_frame() {
        let mut area = UmemArea::new(4, 2048).unwrap();
        assert_eq!(area.frames(), 4);
        area.frame_mut(2048).fill(7);
        assert_eq!(
            area.bytes(2048 + 100, 4000).len(),
            2048 - 100,
            "clamped at the frame's end"
        );
        assert!(area.bytes(2048, 10).iter().all(|b| *b == 7));
        assert_eq!(area.bytes(1 << 40, 10).len(), 0, "outside the area: empty");
        assert_eq!(area.frame_base(4097), 4096);
    }
}
