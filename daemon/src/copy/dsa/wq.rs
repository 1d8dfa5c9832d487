//! The kernel's side of a DSA work queue: its sysfs attributes, its portal (the one place
//! descriptors leave the process), and the timer that stands in for the completion
//! interrupt a user work queue does not have.

use std::{
    arch::asm,
    fs::OpenOptions,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::{Path, PathBuf},
    ptr::NonNull,
    time::Duration,
};

use super::HwDesc;
use crate::copy::channel::DmaError;

/// Size of the portal mapping.
const PORTAL_SIZE: usize = 0x1000;
/// ENQCMD attempts before a descriptor is given up as not submitted.
const ENQCMD_RETRIES: u32 = 1000;

/// What the kernel reports of a work queue in `/sys/bus/dsa/devices/wqX.Y/`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct WqAttrs {
    /// `mode` is `dedicated` (MOVDIR64B, no back-pressure), not `shared` (ENQCMD).
    pub(super) dedicated: bool,
    /// `size`: the queue's entries.
    pub(super) size: u32,
    /// `max_transfer_size`: the longest copy one descriptor may ask for.
    pub(super) max_transfer: u64,
}

impl WqAttrs {
    /// Reads the attributes from the queue's sysfs directory `dir`.
    pub(super) fn read(dir: &Path) -> Result<WqAttrs, DmaError> {
        let attr = |name: &str| {
            let path = dir.join(name);
            std::fs::read_to_string(&path)
                .map(|s| s.trim().to_owned())
                .map_err(|e| DmaError::Unavailable(format!("reading {}: {e}", path.display())))
        };
        let number = |name: &str| {
            let text = attr(name)?;
            text.parse::<u64>().map_err(|_| {
                DmaError::Unavailable(format!(
                    "{} holds {text:?}, not a number",
                    dir.join(name).display()
                ))
            })
        };
        let dedicated = match attr("mode")?.as_str() {
            "dedicated" => true,
            "shared" => false,
            other => {
                return Err(DmaError::Unavailable(format!(
                    "{} says {other:?}; expected dedicated or shared",
                    dir.join("mode").display()
                )));
            }
        };
        let size = u32::try_from(number("size")?).unwrap_or(u32::MAX);
        let max_transfer = number("max_transfer_size")?;
        if size == 0 || max_transfer == 0 {
            return Err(DmaError::Unavailable(format!(
                "work queue {} is not configured (size {size}, max_transfer_size \
                 {max_transfer}); configure and enable it with accel-config",
                dir.display()
            )));
        }
        Ok(WqAttrs {
            dedicated,
            size,
            max_transfer,
        })
    }
}

pub(super) fn sysfs_dir(path: &Path) -> PathBuf {
    let wq = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    PathBuf::from("/sys/bus/dsa/devices").join(wq)
}

/// Where descriptors go: the work queue's portal, or a test's device.
pub(super) trait Portal: Send {
    /// Hands one descriptor to the device; false when a shared queue stayed full. A
    /// dedicated queue gives no answer: what it cannot hold, it drops.
    fn write(&mut self, desc: &HwDesc) -> bool;
}

/// The mapped portal page of an opened work queue.
pub(super) struct MmapPortal {
    page: NonNull<u8>,
    dedicated: bool,
    /// Closed after the page is unmapped; the kernel drains the queue when the last
    /// reference goes (idxd's release).
    _file: OwnedFd,
}

// SAFETY: the mapping is owned by this value and written only through &mut self; nothing
// in it is tied to the thread that made it.
unsafe impl Send for MmapPortal {}

impl MmapPortal {
    pub(super) fn map(path: &Path, dedicated: bool) -> Result<MmapPortal, DmaError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|e| DmaError::Unavailable(format!("opening {}: {e}", path.display())))?;
        let file = OwnedFd::from(file);
        // SAFETY: a fresh shared mapping of the work queue's portal page; the kernel checks
        // the request. The result is checked below and unmapped in Drop.
        let page = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                PORTAL_SIZE,
                libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_POPULATE,
                file.as_raw_fd(),
                0,
            )
        };
        if page == libc::MAP_FAILED {
            return Err(DmaError::Unavailable(format!(
                "mapping the portal of {}: {}",
                path.display(),
                std::io::Error::last_os_error()
            )));
        }
        let page = NonNull::new(page.cast())
            .ok_or_else(|| DmaError::Unavailable("portal at NULL".into()))?;
        Ok(MmapPortal {
            page,
            dedicated,
            _file: file,
        })
    }
}

impl Portal for MmapPortal {
    fn write(&mut self, desc: &HwDesc) -> bool {
        let portal = self.page.as_ptr();
        let desc = std::ptr::from_ref(desc).cast::<u8>();
        if self.dedicated {
            // SAFETY: `portal` is the mapped portal page; `desc` is a 64-byte aligned
            // descriptor; the CPU supports MOVDIR64B (checked in `open`).
            unsafe {
                asm!("movdir64b {0}, zmmword ptr [{1}]", in(reg) portal, in(reg) desc, options(nostack))
            };
            return true;
        }
        for _ in 0..ENQCMD_RETRIES {
            let retry: u8;
            // SAFETY: as above, with ENQCMD (checked in `open`); ZF=1 means the shared
            // queue was full and nothing was accepted.
            unsafe {
                asm!(
                    "enqcmd {0}, zmmword ptr [{1}]",
                    "setz {2}",
                    in(reg) portal,
                    in(reg) desc,
                    out(reg_byte) retry,
                    options(nostack)
                )
            };
            if retry == 0 {
                return true;
            }
            std::hint::spin_loop();
        }
        false
    }
}

impl Drop for MmapPortal {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `map`, unmapped once.
        unsafe { libc::munmap(self.page.as_ptr().cast(), PORTAL_SIZE) };
    }
}

/// What a dropped channel's portal becomes: nothing reaches a device.
pub(super) struct Closed;

impl Portal for Closed {
    fn write(&mut self, _desc: &HwDesc) -> bool {
        false
    }
}

/// The completion fd: a one-shot `CLOCK_MONOTONIC` timerfd.
#[derive(Debug)]
pub(super) struct Timer {
    pub(super) fd: OwnedFd,
    after: libc::timespec,
    /// Started and not yet read back.
    armed: bool,
}

impl Timer {
    pub(super) fn new(after: Duration) -> Result<Timer, DmaError> {
        // SAFETY: plain syscall; the result is checked before use.
        let raw = unsafe {
            libc::timerfd_create(
                libc::CLOCK_MONOTONIC,
                libc::TFD_NONBLOCK | libc::TFD_CLOEXEC,
            )
        };
        if raw < 0 {
            return Err(DmaError::Unavailable(format!(
                "creating the completion timer: {}",
                std::io::Error::last_os_error()
            )));
        }
        // SAFETY: `raw` is a fresh fd that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let after = after.max(Duration::from_micros(1));
        Ok(Timer {
            fd,
            after: libc::timespec {
                tv_sec: after.as_secs() as libc::time_t,
                tv_nsec: after.subsec_nanos() as libc::c_long,
            },
            armed: false,
        })
    }

    /// Starts the timer unless it is running: it fires at most `after` from now.
    pub(super) fn arm(&mut self) {
        if self.armed {
            return;
        }
        let spec = libc::itimerspec {
            it_interval: libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            it_value: self.after,
        };
        // SAFETY: a timerfd we own and a valid itimerspec; the old value is not asked for.
        let rc =
            unsafe { libc::timerfd_settime(self.fd.as_raw_fd(), 0, &spec, std::ptr::null_mut()) };
        // It cannot fail with these arguments; if it did, the next arm tries again.
        self.armed = rc == 0;
    }

    /// Reads back an expiry, so that a level-triggered epoll stops reporting it.
    pub(super) fn clear(&mut self) {
        if !self.armed {
            return;
        }
        let mut expirations = [0u8; 8];
        // Non-blocking: EAGAIN while it has not fired (it stays armed and will).
        if nix::unistd::read(&self.fd, &mut expirations) == Ok(expirations.len()) {
            self.armed = false;
        }
    }
}
