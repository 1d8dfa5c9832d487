//! Dirty-page logging for live migration (`VHOST_F_LOG_ALL` with
//! `VHOST_USER_PROTOCOL_F_LOG_SHMFD`).
//!
//! Writes through vm-memory's `Bytes` API (the CPU RX path, virtio headers, used rings) mark
//! the log by themselves: the guest memory carries vhost-user-backend's `BitmapMmapRegion`,
//! into which `SET_LOG_BASE` installs the frontend's log. Copies a DMA channel makes go
//! through raw pointers, which vm-memory never sees; the copy engine reports each of them here
//! when it completes, and [`DirtyPages`] marks the pages in the region's bitmap.
//!
//! Pages are marked only while the frontend has acked `VHOST_F_LOG_ALL`: outside a migration
//! the cost is one relaxed load per copy.

use std::sync::{
    RwLock,
    atomic::{AtomicBool, Ordering},
};

use vhost::vhost_user::message::VhostUserVirtioFeatures;
use vhost_user_backend::bitmap::BitmapMmapRegion;
use vm_memory::{
    GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryBackend, GuestMemoryMmap,
    GuestMemoryRegion, bitmap::Bitmap,
};

use crate::copy::DirtyLog;

/// Guest memory as the backend maps it: every region carries a replaceable dirty bitmap.
pub type GuestMem = GuestMemoryMmap<BitmapMmapRegion>;
/// The guest memory handle vhost-user-backend shares with the backend.
pub type Memory = GuestMemoryAtomic<GuestMem>;

/// Whether `features` (as acked by the frontend) ask for dirty logging.
pub fn log_all(features: u64) -> bool {
    features & VhostUserVirtioFeatures::LOG_ALL.bits() != 0
}

/// Marks the pages a DMA channel wrote in the frontend's dirty log.
#[derive(Debug, Default)]
pub struct DirtyPages {
    logging: AtomicBool,
    mem: RwLock<Option<Memory>>,
}

impl DirtyPages {
    /// Turns marking on or off (on while `VHOST_F_LOG_ALL` is acked).
    pub fn set_logging(&self, on: bool) {
        self.logging.store(on, Ordering::Relaxed);
    }

    /// The guest memory marks go to (after each `SET_MEM_TABLE`).
    pub fn set_memory(&self, mem: Option<Memory>) {
        *self.mem.write().unwrap_or_else(|e| e.into_inner()) = mem;
    }
}

impl DirtyLog for DirtyPages {
    fn mark_dirty(&self, guest_addr: u64, len: usize) {
        if !self.logging.load(Ordering::Relaxed) || len == 0 {
            return;
        }
        let guard = self.mem.read().unwrap_or_else(|e| e.into_inner());
        let Some(mem) = guard.as_ref() else { return };
        let mem = mem.memory();
        // A copy never spans regions: the RX path splits its pieces with `get_slices`.
        if let Some((region, offset)) = mem.to_region_addr(GuestAddress(guest_addr)) {
            region.bitmap().mark_dirty(offset.0 as usize, len);
        }
    }
}
