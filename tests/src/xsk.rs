//! A minimal AF_XDP receiver for tests (xdpilone): one socket on one queue, a UMEM of
//! 4096 frames, every received frame copied out and its buffer refilled at once. The
//! daemon's real AF_XDP port is a separate, fuller piece; this one only checks what the
//! XDP program delivers.

use std::{
    ffi::CString,
    io,
    num::NonZeroU32,
    ptr::NonNull,
    time::{Duration, Instant},
};

use xdpilone::{DeviceQueue, IfInfo, RingRx, Socket, SocketConfig, Umem, UmemConfig, User};

const FRAME_SIZE: u32 = 2048;
const FRAMES: u32 = 4096;
const RING: u32 = 2048;

/// One AF_XDP socket bound to (interface, queue), receiving.
pub struct TestXsk {
    // Field order is drop order: rings and sockets before the UMEM they map, the memory last.
    rx: RingRx,
    device: DeviceQueue,
    user: User,
    _socket: Socket,
    _umem: Umem,
    area: Mmap,
}

impl std::fmt::Debug for TestXsk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestXsk").field("fd", &self.fd()).finish()
    }
}

impl TestXsk {
    /// Binds a socket to `queue` of `ifname` (calling thread's namespace), in whatever mode
    /// the kernel gives, with every fill slot filled.
    pub fn bind(ifname: &str, queue: u32) -> io::Result<TestXsk> {
        let area = Mmap::new((FRAME_SIZE * FRAMES) as usize)?;
        let config = UmemConfig {
            fill_size: RING,
            complete_size: RING,
            frame_size: FRAME_SIZE,
            headroom: 0,
            flags: 0,
        };
        // SAFETY: `area` is a page-aligned anonymous mapping of FRAMES frames that lives in
        // the same struct as the UMEM and is unmapped only after it (field order).
        let umem = unsafe { Umem::new(config, area.as_nonnull()) }.map_err(errno)?;
        let mut info = IfInfo::invalid();
        let name = CString::new(ifname).map_err(io::Error::other)?;
        info.from_name(&name).map_err(errno)?;
        info.set_queue(queue);
        let socket = Socket::with_shared(&info, &umem).map_err(errno)?;
        let mut device = umem.fq_cq(&socket).map_err(errno)?;
        let user = umem
            .rx_tx(
                &socket,
                &SocketConfig {
                    rx_size: NonZeroU32::new(RING),
                    tx_size: None,
                    bind_flags: 0,
                },
            )
            .map_err(errno)?;
        let rx = user.map_rx().map_err(errno)?;
        umem.bind(&user).map_err(errno)?;
        let mut fill = device.fill(RING);
        fill.insert((0..RING).map(|i| u64::from(i * FRAME_SIZE)));
        fill.commit();
        drop(fill);
        Ok(TestXsk {
            rx,
            device,
            user,
            _socket: socket,
            _umem: umem,
            area,
        })
    }

    /// The socket's fd, for the `xsks` map.
    pub fn fd(&self) -> i32 {
        self.user.as_raw_fd()
    }

    /// Receives until `want` frames arrived or nothing arrived for `idle`; returns copies.
    pub fn receive(&mut self, want: usize, idle: Duration) -> Vec<Vec<u8>> {
        let mut frames = Vec::with_capacity(want);
        let mut last = Instant::now();
        while frames.len() < want && last.elapsed() < idle {
            let mut addrs = [0u64; 64];
            let mut n = 0;
            {
                let mut reader = self.rx.receive(64);
                while let Some(desc) = reader.read() {
                    frames.push(self.area.copy(desc.addr, desc.len));
                    addrs[n] = desc.addr & !u64::from(FRAME_SIZE - 1);
                    n += 1;
                }
                reader.release();
            }
            if n == 0 {
                std::thread::sleep(Duration::from_micros(200));
                continue;
            }
            last = Instant::now();
            let mut fill = self.device.fill(n as u32);
            let filled = fill.insert(addrs[..n].iter().copied());
            fill.commit();
            assert_eq!(
                filled as usize, n,
                "the fill ring has room for every frame taken out"
            );
        }
        frames
    }

    /// Frames the kernel dropped for want of room in the rx or fill ring.
    pub fn dropped(&self) -> u64 {
        self.user
            .statistics_v2()
            .map(|s| s.rx_dropped + s.rx_ring_full + s.rx_fill_ring_empty_descs)
            .unwrap_or(0)
    }
}

fn errno(e: xdpilone::Errno) -> io::Error {
    io::Error::other(format!("AF_XDP: {e}"))
}

/// An anonymous, page-aligned mapping.
struct Mmap {
    ptr: NonNull<u8>,
    len: usize,
}

impl Mmap {
    fn new(len: usize) -> io::Result<Mmap> {
        // SAFETY: an anonymous private mapping at an address the kernel picks; no existing
        // memory is affected. The result is checked.
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
        let ptr = NonNull::new(ptr.cast()).ok_or_else(|| io::Error::other("mmap returned null"))?;
        Ok(Mmap { ptr, len })
    }

    fn as_nonnull(&self) -> NonNull<[u8]> {
        NonNull::slice_from_raw_parts(self.ptr, self.len)
    }

    /// Copies `len` bytes at `offset`, clamped to the mapping.
    fn copy(&self, offset: u64, len: u32) -> Vec<u8> {
        let start = usize::try_from(offset).unwrap_or(usize::MAX).min(self.len);
        let end = start.saturating_add(len as usize).min(self.len);
        // SAFETY: [start, end) lies inside the mapping, which is alive; the kernel wrote this
        // frame before publishing its descriptor on the rx ring and will not touch it until
        // the frame is returned through the fill ring.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr().add(start), end - start) }.to_vec()
    }
}

impl Drop for Mmap {
    fn drop(&mut self) {
        // SAFETY: ptr/len are exactly the mapping made in `new`, unmapped once.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}
