//! A virtio-net driver in the test process: it connects to a vhost-user socket with the
//! `vhost` crate's frontend, shares memfd memory, lays out split virtqueues in it and
//! drives them (TX chains out, RX buffers in), as a guest kernel would.

use std::{fs::File, os::fd::AsRawFd, path::Path, time::Duration};

use vhost::{
    VhostBackend, VhostUserMemoryRegionInfo, VringConfigData,
    vhost_user::{
        Frontend, VhostUserFrontend, VhostUserProtocolFeatures, message::VhostUserConfigFlags,
    },
};
use vm_memory::{Address, Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

/// Bytes of guest memory.
pub const MEMORY: usize = 8 << 20;
/// Entries of each queue.
pub const QUEUE: u16 = 64;
/// Where buffers start in guest memory (the rings sit below).
pub const BUFFERS: u64 = 0x10_0000;
/// `VHOST_F_LOG_ALL`: the backend logs the guest pages it writes.
pub const LOG_ALL: u64 = 1 << 26;
/// Bytes of guest memory one bit of the dirty log covers.
pub const LOG_PAGE: u64 = 4096;
const NEXT: u16 = 1;
const WRITE: u16 = 2;

/// One split virtqueue as the driver sees it.
#[derive(Debug)]
pub struct DriverQueue {
    base: u64,
    next_desc: u16,
    avail_idx: u16,
    used_seen: u16,
}

impl DriverQueue {
    fn new(base: u64) -> DriverQueue {
        DriverQueue {
            base,
            next_desc: 0,
            avail_idx: 0,
            used_seen: 0,
        }
    }

    fn desc_addr(&self) -> u64 {
        self.base
    }

    fn avail_addr(&self) -> u64 {
        RingLayout::at(self.base, QUEUE).0.avail
    }

    fn used_addr(&self) -> u64 {
        RingLayout::at(self.base, QUEUE).0.used
    }
}

/// The dirty log a frontend shares with the backend during a migration.
#[derive(Debug)]
pub struct DirtyLogFile {
    file: File,
}

impl DirtyLogFile {
    /// Whether the page holding guest address `addr` is marked.
    pub fn is_dirty(&self, addr: u64) -> bool {
        use std::os::unix::fs::FileExt;
        let page = addr / LOG_PAGE;
        let mut byte = [0u8];
        self.file.read_exact_at(&mut byte, page / 8).unwrap();
        byte[0] & (1 << (page % 8)) != 0
    }
}

/// Sets up queue `i` at `q` (memory mapped at `host` in this process) and starts it.
fn start_vring(
    frontend: &mut Frontend,
    host: u64,
    q: &DriverQueue,
    i: usize,
    kick: &EventFd,
    call: &EventFd,
) -> Result<(), String> {
    start_ring(
        frontend,
        host,
        &RingLayout::at(q.base, QUEUE).0,
        i,
        kick,
        call,
    )
}

/// Where a split virtqueue of `size` entries lies in guest memory.
#[derive(Clone, Copy, Debug)]
pub(crate) struct RingLayout {
    pub(crate) size: u16,
    pub(crate) desc: u64,
    pub(crate) avail: u64,
    pub(crate) used: u64,
}

impl RingLayout {
    /// The rings of a queue of `size` entries laid out from `base` (descriptors, then the
    /// avail ring, then the used ring 4-byte aligned), and the first address past them.
    pub(crate) fn at(base: u64, size: u16) -> (RingLayout, u64) {
        let n = u64::from(size);
        let avail = base + 16 * n;
        let used = (avail + 6 + 2 * n).next_multiple_of(4);
        let layout = RingLayout {
            size,
            desc: base,
            avail,
            used,
        };
        (layout, used + 6 + 8 * n)
    }
}

/// Sets up queue `i` laid out as `layout` (memory mapped at `host` in this process) and
/// starts it: size, addresses, base 0, call and kick eventfds, enabled.
pub(crate) fn start_ring(
    frontend: &mut Frontend,
    host: u64,
    layout: &RingLayout,
    i: usize,
    kick: &EventFd,
    call: &EventFd,
) -> Result<(), String> {
    let e = |e: vhost::Error| e.to_string();
    frontend.set_vring_num(i, layout.size).map_err(e)?;
    frontend
        .set_vring_addr(
            i,
            &VringConfigData {
                queue_max_size: layout.size,
                queue_size: layout.size,
                flags: 0,
                desc_table_addr: host + layout.desc,
                used_ring_addr: host + layout.used,
                avail_ring_addr: host + layout.avail,
                log_addr: None,
            },
        )
        .map_err(e)?;
    frontend.set_vring_base(i, 0).map_err(e)?;
    frontend.set_vring_call(i, call).map_err(e)?;
    frontend.set_vring_kick(i, kick).map_err(e)?;
    frontend.set_vring_enable(i, true).map_err(e)
}

/// A fresh memfd of `len` bytes.
pub(crate) fn memfd(len: u64) -> File {
    let fd =
        nix::sys::memfd::memfd_create(c"xvio-test-guest", nix::sys::memfd::MFdFlags::MFD_CLOEXEC)
            .unwrap();
    let file = File::from(fd);
    file.set_len(len).unwrap();
    file
}

/// Guest memory on `file` ([`MEMORY`] bytes of it), and the `SET_MEM_TABLE` region
/// describing it.
fn map_memory(file: &File) -> (GuestMemoryMmap<()>, VhostUserMemoryRegionInfo) {
    map_memory_of(file, MEMORY)
}

/// Guest memory on the first `len` bytes of `file`, and the `SET_MEM_TABLE` region
/// describing it.
pub(crate) fn map_memory_of(
    file: &File,
    len: usize,
) -> (GuestMemoryMmap<()>, VhostUserMemoryRegionInfo) {
    let mem = GuestMemoryMmap::<()>::from_ranges_with_files([(
        GuestAddress(0),
        len,
        Some(FileOffset::new(file.try_clone().unwrap(), 0)),
    )])
    .unwrap();
    let host = mem.get_host_address(GuestAddress(0)).unwrap() as u64;
    let region = VhostUserMemoryRegionInfo {
        guest_phys_addr: 0,
        memory_size: len as u64,
        userspace_addr: host,
        mmap_offset: 0,
        mmap_handle: file.as_raw_fd(),
    };
    (mem, region)
}

/// A guest: its memory, its frontend connection, and its queues (0: RX, 1: TX).
pub struct TestGuest {
    /// The vhost-user frontend.
    pub frontend: Frontend,
    /// Its memory, as the guest sees it.
    pub mem: GuestMemoryMmap<()>,
    file: File,
    kicks: Vec<EventFd>,
    calls: Vec<EventFd>,
    queues: Vec<DriverQueue>,
    next_buffer: u64,
    /// The features acked.
    pub features: u64,
}

impl std::fmt::Debug for TestGuest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestGuest")
            .field("features", &self.features)
            .finish()
    }
}

impl TestGuest {
    /// Connects to `socket` (retrying while it is not there yet), negotiates every offered
    /// feature but those in `refuse`, shares memory and sets up one queue pair.
    pub fn connect(socket: &Path, refuse: u64) -> TestGuest {
        TestGuest::try_connect(socket, refuse, MEMORY as u64)
            .unwrap_or_else(|e| panic!("setting up the device on {}: {e}", socket.display()))
    }

    /// Connects to `guest`'s socket as [`Self::connect`] does, and waits until the datapath
    /// delivers frames to it (frames for a guest whose driver is not up are dropped).
    pub fn attach(guest: &xvio::vhost::guest::Guest, refuse: u64) -> TestGuest {
        let driver = TestGuest::connect(guest.socket(), refuse);
        assert!(
            guest.wait_ready(Duration::from_secs(10)),
            "the datapath took up {} within 10 s",
            guest.socket().display()
        );
        driver
    }

    /// As [`Self::connect`], with the memory's file `file_len` bytes long (the table still
    /// announces [`MEMORY`] bytes: a shorter file is a broken frontend); errors of the
    /// messages after feature negotiation are returned.
    pub fn try_connect(socket: &Path, refuse: u64, file_len: u64) -> Result<TestGuest, String> {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let mut frontend = loop {
            match Frontend::connect(socket, 2) {
                Ok(f) => break f,
                Err(e) if std::time::Instant::now() < deadline => {
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => panic!("connecting to {}: {e}", socket.display()),
            }
        };
        frontend.set_owner().unwrap();
        // A frontend asks for dirty logging only while it migrates ([`Self::start_dirty_log`]).
        let features = frontend.get_features().unwrap() & !refuse & !LOG_ALL;
        frontend.set_features(features).unwrap();
        let protocol = frontend.get_protocol_features().unwrap();
        frontend
            .set_protocol_features(
                protocol
                    & (VhostUserProtocolFeatures::MQ
                        | VhostUserProtocolFeatures::REPLY_ACK
                        | VhostUserProtocolFeatures::CONFIG
                        | VhostUserProtocolFeatures::LOG_SHMFD),
            )
            .unwrap();
        let file = memfd(file_len);
        let (mem, region) = map_memory(&file);
        let host = region.userspace_addr;
        frontend
            .set_mem_table(&[region])
            .map_err(|e| e.to_string())?;
        let queues = vec![DriverQueue::new(0), DriverQueue::new(0x8000)];
        let mut kicks = Vec::new();
        let mut calls = Vec::new();
        for (i, q) in queues.iter().enumerate() {
            let (kick, call) = (
                EventFd::new(EFD_NONBLOCK).unwrap(),
                EventFd::new(EFD_NONBLOCK).unwrap(),
            );
            start_vring(&mut frontend, host, q, i, &kick, &call)?;
            kicks.push(kick);
            calls.push(call);
        }
        Ok(TestGuest {
            frontend,
            mem,
            file,
            kicks,
            calls,
            queues,
            next_buffer: BUFFERS,
            features,
        })
    }

    /// Where the next buffer [`Self::send`] or [`Self::post_rx`] allocates starts.
    pub fn next_buffer(&self) -> u64 {
        self.next_buffer
    }

    /// The guest address of queue `q`'s used ring.
    pub fn used_ring(&self, q: usize) -> u64 {
        self.queues[q].used_addr()
    }

    /// Starts a migration's dirty logging as QEMU does: shares a log (`SET_LOG_BASE` with a
    /// memfd, one bit per [`LOG_PAGE`] of guest memory) and acks `VHOST_F_LOG_ALL`.
    pub fn start_dirty_log(&mut self) -> DirtyLogFile {
        let size = (MEMORY as u64 / LOG_PAGE / 8).next_multiple_of(4096);
        let log = self.share_log(size, size).expect("SET_LOG_BASE");
        self.features |= LOG_ALL;
        self.frontend.set_features(self.features).unwrap();
        // SET_FEATURES has no reply; as QEMU does when it turns logging on, a request that
        // has one makes sure the backend has taken it.
        self.frontend.get_features().unwrap();
        log
    }

    /// Sends `SET_LOG_BASE` with a memfd of `file_len` bytes announced as `mmap_size` bytes.
    pub fn share_log(&mut self, file_len: u64, mmap_size: u64) -> Result<DirtyLogFile, String> {
        let fd =
            nix::sys::memfd::memfd_create(c"xvio-test-log", nix::sys::memfd::MFdFlags::MFD_CLOEXEC)
                .unwrap();
        let file = File::from(fd);
        file.set_len(file_len).unwrap();
        self.frontend
            .set_log_base(
                0,
                Some(vhost::VhostUserDirtyLogRegion {
                    mmap_size,
                    mmap_offset: 0,
                    mmap_handle: file.as_raw_fd(),
                }),
            )
            .map_err(|e| e.to_string())?;
        Ok(DirtyLogFile { file })
    }

    /// The device config space (MAC, status, max queue pairs).
    pub fn config(&mut self) -> Vec<u8> {
        let (_, payload) = self
            .frontend
            .get_config(0, 10, VhostUserConfigFlags::WRITABLE, &[0u8; 10])
            .unwrap();
        payload.to_vec()
    }

    fn alloc(&mut self, len: u64) -> u64 {
        let addr = self.next_buffer;
        self.next_buffer = (self.next_buffer + len).next_multiple_of(64);
        assert!(self.next_buffer < MEMORY as u64, "test guest out of memory");
        addr
    }

    /// Adds a chain of raw descriptors (address, length, device-writable) to queue `q`,
    /// linked in order, and kicks; `next_of_last` links the last one (for loops).
    pub fn add_raw_chain(
        &mut self,
        q: usize,
        descs: &[(u64, u32, bool)],
        next_of_last: Option<u16>,
    ) {
        let queue = &mut self.queues[q];
        let first = queue.next_desc;
        for (i, &(addr, len, write)) in descs.iter().enumerate() {
            let index = (first + i as u16) % QUEUE;
            let last = i == descs.len() - 1;
            let mut flags = if write { WRITE } else { 0 };
            let next = match (last, next_of_last) {
                (false, _) => {
                    flags |= NEXT;
                    (index + 1) % QUEUE
                }
                (true, Some(n)) => {
                    flags |= NEXT;
                    n
                }
                (true, None) => 0,
            };
            let at = GuestAddress(queue.desc_addr() + 16 * u64::from(index));
            self.mem.write_obj(addr, at).unwrap();
            self.mem.write_obj(len, at.unchecked_add(8)).unwrap();
            self.mem.write_obj(flags, at.unchecked_add(12)).unwrap();
            self.mem.write_obj(next, at.unchecked_add(14)).unwrap();
        }
        let slot = queue.avail_addr() + 4 + 2 * u64::from(queue.avail_idx % QUEUE);
        self.mem
            .write_obj(first % QUEUE, GuestAddress(slot))
            .unwrap();
        queue.avail_idx = queue.avail_idx.wrapping_add(1);
        queue.next_desc = (first + descs.len() as u16) % QUEUE;
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        self.mem
            .write_obj(queue.avail_idx, GuestAddress(queue.avail_addr() + 2))
            .unwrap();
        self.kicks[q].write(1).unwrap();
    }

    /// The index the next descriptor added to queue `q` gets.
    pub fn next_desc(&self, q: usize) -> u16 {
        self.queues[q].next_desc
    }

    /// Kicks queue `q` again.
    pub fn kick(&self, q: usize) {
        self.kicks[q].write(1).unwrap();
    }

    /// Overwrites the avail index of queue `q` (a hostile guest).
    pub fn set_avail_idx(&self, q: usize, idx: u16) {
        self.mem
            .write_obj(idx, GuestAddress(self.queues[q].avail_addr() + 2))
            .unwrap();
    }

    /// Sends one frame (a zero header and `frame`) on the TX queue.
    pub fn send(&mut self, frame: &[u8]) {
        let addr = self.alloc(12 + frame.len() as u64);
        self.mem
            .write_slice(&[0u8; 12], GuestAddress(addr))
            .unwrap();
        self.mem
            .write_slice(frame, GuestAddress(addr + 12))
            .unwrap();
        self.add_raw_chain(1, &[(addr, 12 + frame.len() as u32, false)], None);
    }

    /// Sends each of `frames` in order, one chain each (see [`TestGuest::send`]).
    pub fn send_all<F: AsRef<[u8]>>(&mut self, frames: &[F]) {
        for frame in frames {
            self.send(frame.as_ref());
        }
    }

    /// Posts `n` receive buffers of `len` bytes.
    pub fn post_rx(&mut self, n: usize, len: u32) {
        for _ in 0..n {
            let addr = self.alloc(u64::from(len));
            self.add_raw_chain(0, &[(addr, len, true)], None);
        }
    }

    /// Used entries of queue `q` not seen yet: (descriptor head, length).
    pub fn take_used(&mut self, q: usize) -> Vec<(u32, u32)> {
        let queue = &mut self.queues[q];
        let idx: u16 = self
            .mem
            .read_obj(GuestAddress(queue.used_addr() + 2))
            .unwrap();
        let mut out = Vec::new();
        while queue.used_seen != idx {
            let at = queue.used_addr() + 4 + 8 * u64::from(queue.used_seen % QUEUE);
            let id: u32 = self.mem.read_obj(GuestAddress(at)).unwrap();
            let len: u32 = self.mem.read_obj(GuestAddress(at + 4)).unwrap();
            out.push((id, len));
            queue.used_seen = queue.used_seen.wrapping_add(1);
        }
        out
    }

    /// Waits until queue `q`'s call eventfd fires or `timeout` passes.
    pub fn wait_call(&self, q: usize, timeout: Duration) -> bool {
        let deadline = std::time::Instant::now() + timeout;
        while std::time::Instant::now() < deadline {
            if self.calls[q].read().is_ok() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        false
    }

    /// Receives up to `n` frames that may span several buffers (MRG_RXBUF): each frame's
    /// first buffer's header says how many used entries (`num_buffers`) it takes.
    pub fn receive_merged(&mut self, n: usize, timeout: Duration) -> Vec<Vec<u8>> {
        let mut frames = Vec::new();
        let mut pending: Vec<(u32, u32)> = Vec::new();
        let deadline = std::time::Instant::now() + timeout;
        while frames.len() < n && std::time::Instant::now() < deadline {
            pending.extend(self.take_used(0));
            while let Some(&(head, len)) = pending.first() {
                let read = |mem: &GuestMemoryMmap<()>, head: u32, len: u32| -> Vec<u8> {
                    let at = self.queues[0].desc_addr() + 16 * u64::from(head);
                    let addr: u64 = mem.read_obj(GuestAddress(at)).unwrap();
                    let mut buf = vec![0u8; len as usize];
                    mem.read_slice(&mut buf, GuestAddress(addr)).unwrap();
                    buf
                };
                let first = read(&self.mem, head, len);
                let count = usize::from(u16::from_le_bytes([first[10], first[11]])).max(1);
                if pending.len() < count {
                    break;
                }
                let mut frame = first[12..].to_vec();
                for &(h, l) in &pending[1..count] {
                    frame.extend(read(&self.mem, h, l));
                }
                pending.drain(..count);
                frames.push(frame);
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        frames
    }

    /// Receives up to `n` frames (waiting at most `timeout` for each): the frames, without
    /// their virtio-net header, read from the RX buffers the backend used.
    pub fn receive(&mut self, n: usize, timeout: Duration) -> Vec<Vec<u8>> {
        let mut frames = Vec::new();
        let deadline = std::time::Instant::now() + timeout;
        while frames.len() < n && std::time::Instant::now() < deadline {
            for (head, len) in self.take_used(0) {
                let at = self.queues[0].desc_addr() + 16 * u64::from(head);
                let addr: u64 = self.mem.read_obj(GuestAddress(at)).unwrap();
                let mut buf = vec![0u8; len as usize];
                self.mem.read_slice(&mut buf, GuestAddress(addr)).unwrap();
                frames.push(buf.split_off(12.min(buf.len())));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        frames
    }

    /// Stops queue `q` (`GET_VRING_BASE`) and starts it again from scratch on the same
    /// connection, as a guest driver that reloads does: empty rings, index 0.
    pub fn restart_vring(&mut self, q: usize) {
        self.frontend.get_vring_base(q).unwrap();
        let base = self.queues[q].base;
        let fresh = DriverQueue::new(base);
        let end = fresh.used_addr() + 6 + 8 * u64::from(QUEUE);
        self.mem
            .write_slice(&vec![0u8; (end - base) as usize], GuestAddress(base))
            .unwrap();
        let host = self.mem.get_host_address(GuestAddress(0)).unwrap() as u64;
        start_vring(
            &mut self.frontend,
            host,
            &fresh,
            q,
            &self.kicks[q],
            &self.calls[q],
        )
        .unwrap();
        self.queues[q] = fresh;
    }

    /// Sends `SET_MEM_TABLE` again for the same memory, mapped anew (as a VMM does when its
    /// memory layout changes): the backend maps the new table and drops its old mapping.
    pub fn remap_memory(&mut self) {
        let (mem, region) = map_memory(&self.file);
        self.frontend.set_mem_table(&[region]).unwrap();
        self.mem = mem;
    }
}
