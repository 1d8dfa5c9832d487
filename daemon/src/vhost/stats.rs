//! The guests' counters in a pinned BPF map (`guest_stats`, one entry per guest id), so that
//! `bpftool map dump pinned PIN_ROOT/guests/guest_stats` shows them with field names, with or
//! without an attached interface. The map comes from the XDP object (for its BTF); no program
//! is loaded or attached for it.

use std::{
    path::{Path, PathBuf},
    sync::atomic::Ordering::Relaxed,
};

use aya::{
    Ebpf,
    maps::{Array, MapData, MapError},
    pin::PinError,
};
use thiserror::Error;
use xvio_common::{GUESTS_MAX, GuestStats, maps};

use super::guest::Guest;
use crate::bpffs;

/// Errors of the guest counters' map.
#[derive(Debug, Error)]
pub enum GuestStatsError {
    /// The object's maps could not be created.
    #[error("creating the guest_stats map")]
    Load(#[source] Box<aya::EbpfError>),
    /// The map is missing or of another type.
    #[error("the guest_stats map")]
    Map(#[source] Box<MapError>),
    /// Pinning failed.
    #[error("pinning guest_stats at {path}")]
    Pin {
        /// The pin.
        path: PathBuf,
        /// The cause.
        #[source]
        source: Box<PinError>,
    },
    /// The guests' pins belong to another daemon that still runs.
    #[error(
        "the guests' counters at {dir} belong to xvio pid {pid}, which is running and wrote them \
         {ago} s ago; stop it, or give this daemon its own --pin-root"
    )]
    InUse {
        /// The pin folder.
        dir: PathBuf,
        /// The other daemon.
        pid: u32,
        /// Seconds since it wrote its counters.
        ago: u64,
    },
    /// The pin folder could not be made.
    #[error(transparent)]
    Bpffs(#[from] bpffs::BpffsError),
}

/// The pinned `guest_stats` map.
pub struct GuestStatsMap {
    ebpf: Ebpf,
    dir: PathBuf,
    /// The pins this daemon made, to remove at the end.
    pinned: Vec<&'static str>,
}

impl std::fmt::Debug for GuestStatsMap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuestStatsMap")
            .field("dir", &self.dir)
            .finish()
    }
}

/// The pins of the guests' folder: their counters, and the daemon that writes them.
const GUEST_PINS: [&str; 2] = [maps::GUEST_STATS, maps::DAEMON_STATS];

/// Refuses when `pin_root/guests` holds the pins of another daemon that still runs (two
/// daemons with guests under one pin root would write each other's `guest_stats`). The
/// daemon asks before it attaches or binds anything, and [`GuestStatsMap::open`] again.
pub fn check_pins_free(pin_root: &Path) -> Result<(), GuestStatsError> {
    let dir = pin_root.join(maps::GUESTS_DIR);
    match crate::stats::running_owner(&dir) {
        Some((pid, ago)) => Err(GuestStatsError::InUse { dir, pid, ago }),
        None => Ok(()),
    }
}

fn missing(name: &'static str) -> GuestStatsError {
    GuestStatsError::Map(Box::new(MapError::InvalidName { name: name.into() }))
}

impl GuestStatsMap {
    /// Creates the map and pins it at `pin_root/guests/guest_stats`, beside a `daemon_stats`
    /// naming this daemon (replacing the pins of a daemon that died; refusing those of one
    /// that runs).
    pub fn open(pin_root: &Path) -> Result<GuestStatsMap, GuestStatsError> {
        // The object first (it takes a while): the check, the removal and the pins follow it
        // closely.
        let ebpf = Ebpf::load(crate::XDP_OBJECT).map_err(|e| GuestStatsError::Load(Box::new(e)))?;
        check_pins_free(pin_root)?;
        let dir = pin_root.join(maps::GUESTS_DIR);
        // What is there is a dead daemon's (checked above): removed. Then `daemon_stats` first,
        // naming this daemon: a daemon that pinned between the check and here makes the pin
        // fail (EEXIST), and this one refuses. (Two daemons within the same few microseconds
        // can still both pass; nothing short of a lock on the folder closes that.)
        let _ = bpffs::remove_pins(&dir, &GUEST_PINS);
        let dir = bpffs::pin_dir(pin_root, maps::GUESTS_DIR)?;
        let mut pinned = GuestStatsMap {
            ebpf,
            dir,
            pinned: Vec::new(),
        };
        pinned.write_owner(xvio_common::DaemonStats::default())?;
        for name in [maps::DAEMON_STATS, maps::GUEST_STATS] {
            let path = pinned.dir.join(name);
            let map = pinned.ebpf.map(name).ok_or_else(|| missing(name))?;
            if let Err(e) = map.pin(&path) {
                check_pins_free(pin_root)?;
                return Err(GuestStatsError::Pin {
                    path,
                    source: Box::new(e),
                });
            }
            pinned.pinned.push(name);
        }
        Ok(pinned)
    }

    /// Writes every guest's counters (entry = its id): `stats[i]` is `guests[i]`'s snapshot;
    /// and `daemon` (uptime, clock, guest totals) as `daemon_stats[0]`, with this daemon's pid.
    pub fn publish(
        &mut self,
        guests: &[Guest],
        stats: &[GuestStats],
        daemon: xvio_common::DaemonStats,
    ) -> Result<(), GuestStatsError> {
        // First: a daemon that cannot write its guests' counters still says it runs.
        self.write_owner(daemon)?;
        let map = self
            .ebpf
            .map_mut(maps::GUEST_STATS)
            .ok_or_else(|| missing(maps::GUEST_STATS))?;
        let mut array: Array<&mut MapData, GuestStats> =
            Array::try_from(map).map_err(|e| GuestStatsError::Map(Box::new(e)))?;
        for (guest, s) in guests.iter().zip(stats) {
            if guest.device().id() < GUESTS_MAX {
                array
                    .set(guest.device().id(), *s, 0)
                    .map_err(|e| GuestStatsError::Map(Box::new(e)))?;
            }
        }
        Ok(())
    }

    /// `daemon` with this daemon's pid and the clock now as `daemon_stats[0]`: whose these
    /// pins are, and whether it still runs.
    fn write_owner(&mut self, daemon: xvio_common::DaemonStats) -> Result<(), GuestStatsError> {
        let owner = xvio_common::DaemonStats {
            pid: std::process::id(),
            updated_unix_ms: crate::stats::now_unix_ms(),
            ..daemon
        };
        let map = self
            .ebpf
            .map_mut(maps::DAEMON_STATS)
            .ok_or_else(|| missing(maps::DAEMON_STATS))?;
        let mut array: Array<&mut MapData, xvio_common::DaemonStats> =
            Array::try_from(map).map_err(|e| GuestStatsError::Map(Box::new(e)))?;
        array
            .set(0, owner, 0)
            .map_err(|e| GuestStatsError::Map(Box::new(e)))
    }
}

impl Drop for GuestStatsMap {
    fn drop(&mut self) {
        // Not when another daemon took the folder over meanwhile (this one stalled).
        if crate::stats::running_owner(&self.dir).is_none() {
            let _ = bpffs::remove_pins(&self.dir, &self.pinned);
        }
    }
}

/// One guest's counters as the map holds them.
pub fn snapshot(guest: &Guest) -> GuestStats {
    let device = guest.device();
    let c = device.counters();
    let get = |a: &std::sync::atomic::AtomicU64| a.load(Relaxed);
    let copy = guest.copy_stats();
    GuestStats {
        active: 1,
        connected: u32::from(guest.is_connected()),
        mac: device.mac().0,
        queue_pairs: guest.queue_pairs(),
        ready: u32::from(device.is_ready()),
        to_guest_packets: get(&c.to_guest_packets),
        to_guest_bytes: get(&c.to_guest_bytes),
        from_guest_packets: get(&c.from_guest_packets),
        from_guest_bytes: get(&c.from_guest_bytes),
        to_guest_dropped_full: get(&c.to_guest_dropped_full),
        to_guest_dropped_small: get(&c.to_guest_dropped_small),
        to_guest_dropped_reset: get(&c.to_guest_dropped_reset),
        from_guest_no_route: get(&c.from_guest_no_route),
        from_guest_oversize: get(&c.from_guest_oversize),
        from_guest_dropped_full: get(&c.from_guest_dropped_full),
        malformed_chains: get(&c.malformed_chains),
        broken_queues: get(&c.broken_queues),
        copy_cpu: copy.cpu_copies,
        copy_cpu_bytes: copy.cpu_bytes,
        copy_dma: copy.dma_copies,
        copy_dma_bytes: copy.dma_bytes,
        copy_fallback_full: copy.fallback_full,
        copy_fallback_enqueue: copy.fallback_enqueue,
        copy_fallback_error: copy.fallback_error,
        copy_fallback_submit: copy.fallback_submit,
        copy_inflight: copy.inflight,
        from_guest_dropped_reset: get(&c.from_guest_dropped_reset),
        to_guest_dropped_malformed: get(&c.to_guest_dropped_malformed),
    }
}

/// The guests' counters (their snapshots) summed into the guest fields of `daemon_stats`
/// (the others zero).
pub fn totals(stats: &[GuestStats]) -> xvio_common::DaemonStats {
    let mut t = xvio_common::DaemonStats {
        guests: u32::try_from(stats.len()).unwrap_or(u32::MAX),
        ..Default::default()
    };
    for g in stats {
        t.guests_connected += g.connected;
        t.to_guests_packets += g.to_guest_packets;
        t.from_guests_packets += g.from_guest_packets;
        t.guests_dropped += g.to_guest_dropped_full
            + g.to_guest_dropped_small
            + g.to_guest_dropped_reset
            + g.to_guest_dropped_malformed
            + g.from_guest_no_route
            + g.from_guest_oversize
            + g.from_guest_dropped_full
            + g.from_guest_dropped_reset;
        t.guests_malformed_chains += g.malformed_chains;
        t.copy_cpu += g.copy_cpu;
        t.copy_dma += g.copy_dma;
        t.copy_fallbacks += g.copy_fallbacks();
        t.copy_inflight += g.copy_inflight;
    }
    t
}
