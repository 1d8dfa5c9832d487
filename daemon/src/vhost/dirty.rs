//! Dirty-page logging for live migration (`VHOST_F_LOG_ALL` with
//! `VHOST_USER_PROTOCOL_F_LOG_SHMFD`).
//!
//! The frontend shares a log with `SET_LOG_BASE`: one bit per 4 KiB page of guest-physical
//! memory. xvio maps it itself ([`LogMap`], installed by the control-socket shim) instead of
//! letting vhost-user-backend wrap every guest region in a replaceable bitmap: with that
//! bitmap, vm-memory can no longer compile its bitmap calls away and every guest memory access
//! on the datapath pays for them (measured: guest-to-guest 64 B frames fell from 0.31 to about
//! 0.1 Mpps). The backend marks what it writes itself, after writing it: RX headers and CPU
//! copies as they are written, DMA copies when the copy engine completes them, and the used
//! rings at the end of each pass over a queue. Marks are made only while the frontend has
//! acked `VHOST_F_LOG_ALL` and a log is installed: otherwise a mark costs one relaxed load.

use std::{
    io,
    os::fd::{AsRawFd, BorrowedFd},
    ptr::NonNull,
    sync::{
        RwLock,
        atomic::{AtomicBool, AtomicU8, Ordering},
    },
};

use vhost::vhost_user::message::VhostUserVirtioFeatures;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

use crate::copy::DirtyLog;

/// Guest memory as the backend maps it.
pub type GuestMem = GuestMemoryMmap<()>;
/// The guest memory handle vhost-user-backend shares with the backend.
pub type Memory = GuestMemoryAtomic<GuestMem>;

/// Bytes of guest memory one bit of the log covers (`VHOST_LOG_PAGE`).
pub const LOG_PAGE: u64 = 4096;

/// Whether `features` (as acked by the frontend) ask for dirty logging.
pub fn log_all(features: u64) -> bool {
    features & VhostUserVirtioFeatures::LOG_ALL.bits() != 0
}

/// The frontend's dirty log, mapped shared.
#[derive(Debug)]
pub struct LogMap {
    ptr: NonNull<AtomicU8>,
    len: usize,
}

// SAFETY: the mapping is only accessed through atomic bytes and unmapped once, on drop.
unsafe impl Send for LogMap {}
// SAFETY: as above.
unsafe impl Sync for LogMap {}

impl LogMap {
    /// Maps `size` bytes of `fd` at `offset`. The caller has checked that they lie inside the
    /// file (a page past its end would raise SIGBUS when marked).
    pub fn map(fd: BorrowedFd<'_>, offset: u64, size: u64) -> io::Result<LogMap> {
        let len = usize::try_from(size)
            .ok()
            .filter(|&l| l > 0 && l <= isize::MAX as usize)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "dirty log size"))?;
        let offset = libc::off_t::try_from(offset)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "dirty log offset"))?;
        // SAFETY: a fresh shared mapping (no MAP_FIXED) of a descriptor we borrow; the result
        // is checked before use.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                offset,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr = NonNull::new(addr.cast::<AtomicU8>())
            .ok_or_else(|| io::Error::other("mmap returned null"))?;
        Ok(LogMap { ptr, len })
    }

    /// Sets the bits of the pages `[addr, addr + len)` touches; pages beyond the log are
    /// ignored (the frontend sized it for all of guest memory).
    fn mark(&self, addr: u64, len: usize) {
        let Some(last) = addr.checked_add(len as u64 - 1) else {
            return;
        };
        for page in addr / LOG_PAGE..=last / LOG_PAGE {
            let Ok(byte) = usize::try_from(page / 8) else {
                return;
            };
            if byte >= self.len {
                return;
            }
            // SAFETY: `byte < len`, inside the mapping, which lives as long as `self`.
            let cell = unsafe { &*self.ptr.as_ptr().add(byte) };
            cell.fetch_or(1 << (page % 8), Ordering::Relaxed);
        }
    }
}

impl Drop for LogMap {
    fn drop(&mut self) {
        // SAFETY: mapped in `map` with this length, unmapped only here.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// Marks the guest pages the backend writes in the frontend's log, while it logs.
#[derive(Debug, Default)]
pub struct DirtyPages {
    logging: AtomicBool,
    log: RwLock<Option<LogMap>>,
}

impl DirtyPages {
    /// Turns marking on or off (on while `VHOST_F_LOG_ALL` is acked).
    pub fn set_logging(&self, on: bool) {
        self.logging.store(on, Ordering::Relaxed);
    }

    /// Installs the log `SET_LOG_BASE` shared (or removes it).
    pub fn set_log(&self, log: Option<LogMap>) {
        *self.log.write().unwrap_or_else(|e| e.into_inner()) = log;
    }

    /// Whether marks are being made now.
    pub fn active(&self) -> bool {
        self.logging.load(Ordering::Relaxed)
    }

    /// Marks `[guest_addr, guest_addr + len)`, written by the backend.
    pub fn mark(&self, guest_addr: u64, len: usize) {
        if !self.active() || len == 0 {
            return;
        }
        if let Some(log) = self.log.read().unwrap_or_else(|e| e.into_inner()).as_ref() {
            log.mark(guest_addr, len);
        }
    }

    /// Marks queue `queue`'s used ring (flags, idx, the ring, avail_event).
    pub fn mark_used_ring(&self, queue: &virtio_queue::Queue) {
        if !self.active() {
            return;
        }
        use virtio_queue::QueueT;
        self.mark(queue.used_ring(), 6 + 8 * usize::from(queue.size()));
    }
}

impl DirtyLog for DirtyPages {
    fn mark_dirty(&self, guest_addr: u64, len: usize) {
        self.mark(guest_addr, len);
    }
}

#[cfg(test)]
mod tests {
    use std::{fs::File, os::fd::AsFd};

    use super::*;

    fn log_file(len: u64) -> File {
        let fd =
            nix::sys::memfd::memfd_create(c"xvio-log", nix::sys::memfd::MFdFlags::empty()).unwrap();
        let f = File::from(fd);
        f.set_len(len).unwrap();
        f
    }

    fn bits(f: &File) -> Vec<u8> {
        use std::os::unix::fs::FileExt;
        let mut b = vec![0u8; 16];
        f.read_exact_at(&mut b, 0).unwrap();
        b
    }

    #[test]
    fn marks_the_pages_touched_only_while_logging_with_a_log() {
        let f = log_file(4096);
        let pages = DirtyPages::default();
        pages.set_logging(true);
        pages.mark(0, 10); // no log yet: nothing
        pages.set_log(Some(LogMap::map(f.as_fd(), 0, 4096).unwrap()));
        pages.set_logging(false);
        pages.mark(0, 10); // not logging: nothing
        assert_eq!(bits(&f), vec![0; 16]);
        pages.set_logging(true);
        pages.mark(3 * 4096 + 4095, 2); // pages 3 and 4
        pages.mark(9 * 4096, 1); // page 9
        pages.mark(u64::MAX - 1, 5); // wraps: ignored
        pages.mark(1 << 40, 4096); // past the log: ignored
        let b = bits(&f);
        assert_eq!(b[0], 0b0001_1000);
        assert_eq!(b[1], 0b0000_0010);
        assert!(b[2..].iter().all(|&x| x == 0));
    }

    #[test]
    fn a_zero_sized_log_is_refused() {
        let f = log_file(4096);
        assert!(LogMap::map(f.as_fd(), 0, 0).is_err());
    }
}
