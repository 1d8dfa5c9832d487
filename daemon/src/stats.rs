//! `xvio stats`: reads the maps a running daemon pinned for one interface and prints them
//! summed over CPUs, with names, for people who do not want to add up bpftool's per-CPU
//! JSON by hand.

use std::{fmt::Write as _, path::PathBuf};

use aya::maps::{Array, Map, MapData, MapError, PerCpuArray};
use thiserror::Error;
use xvio_common::{DaemonStats, GuestStats, PortStats, XdpMode, XdpOutcome, XdpStats, maps};

use crate::config::StatsConfig;

/// Errors of `xvio stats`.
#[derive(Debug, Error)]
pub enum StatsError {
    /// The pin is missing or unreadable.
    #[error(
        "reading {path} (is xvio running with that interface, or with guests, under this --pin-root? are you root?)"
    )]
    Open {
        /// The pin.
        path: PathBuf,
        /// The cause.
        #[source]
        source: Box<MapError>,
    },
}

/// `xdp_stats` summed over CPUs, indexed like [`XdpOutcome::ALL`].
pub fn xdp_totals<T: std::borrow::Borrow<MapData>>(
    array: &PerCpuArray<T, XdpStats>,
) -> Result<[XdpStats; XdpOutcome::ALL.len()], MapError> {
    let mut sums = [XdpStats::default(); XdpOutcome::ALL.len()];
    for (sum, outcome) in sums.iter_mut().zip(XdpOutcome::ALL) {
        for value in array.get(&outcome.index(), 0)?.iter() {
            sum.packets += value.packets;
            sum.bytes += value.bytes;
        }
    }
    Ok(sums)
}

/// Counters not written for this long are no running daemon's (it writes them about once a
/// second).
pub const STALE_AFTER_S: u64 = 5;

/// Why the counters are a dead daemon's, if they are: its process is gone, or it has not
/// written them for [`STALE_AFTER_S`].
fn stale(ds: &DaemonStats, dir: &std::path::Path) -> Option<String> {
    let (alive, age_s) = (writer_alive(ds), written_ago_s(ds));
    // Never written yet: a daemon that just started (its first write comes within a second).
    if ds.updated_unix_ms == 0 || (alive && age_s < STALE_AFTER_S) {
        return None;
    }
    Some(format!(
        "STALE: these counters were last written {age_s} s ago by daemon pid {}, which {}. \
         Start xvio again (it replaces them) or remove {}",
        ds.pid,
        if alive {
            "runs but has stopped writing them (stuck?)"
        } else {
            "is not running: they are a dead daemon's"
        },
        dir.display()
    ))
}

/// Whether the process that wrote `ds` (its `pid`) is running.
pub fn writer_alive(ds: &DaemonStats) -> bool {
    ds.pid != 0
        && nix::sys::signal::kill(nix::unistd::Pid::from_raw(ds.pid as i32), None)
            .map_or_else(|e| e != nix::errno::Errno::ESRCH, |()| true)
}

/// The running daemon, other than this one, whose `daemon_stats` is pinned in `dir`: its pid
/// and the seconds since it wrote them, when it is alive and wrote them less than
/// [`STALE_AFTER_S`] ago (pins of a daemon that died may be taken over).
pub fn running_owner(dir: &std::path::Path) -> Option<(u32, u64)> {
    let ds = pinned_daemon_stats(dir).ok()?;
    let ago = written_ago_s(&ds);
    (ds.pid != std::process::id() && writer_alive(&ds) && ago < STALE_AFTER_S)
        .then_some((ds.pid, ago))
}

/// The wall clock in Unix milliseconds, as `daemon_stats.updated_unix_ms` holds it.
pub fn now_unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Seconds since `ds` was written.
pub fn written_ago_s(ds: &DaemonStats) -> u64 {
    now_unix_ms().saturating_sub(ds.updated_unix_ms) / 1000
}

/// The report for `config.iface` and, with `--guests`, for the guests, as text.
pub fn report(config: &StatsConfig) -> Result<String, StatsError> {
    let mut out = String::new();
    if let Some(iface) = &config.iface {
        out += &iface_report(&config.pin_root, iface)?;
    }
    if config.guests {
        out += &guests_report(&config.pin_root)?;
    }
    Ok(out)
}

/// The error of reading pin `name` in `dir`.
fn open_error(dir: &std::path::Path, name: &str) -> impl FnOnce(MapError) -> StatsError + use<> {
    let path = dir.join(name);
    move |e| StatsError::Open {
        path,
        source: Box::new(e),
    }
}

/// Opens the pin `name` in `dir`.
fn open_pin(dir: &std::path::Path, name: &str) -> Result<MapData, StatsError> {
    MapData::from_pin(dir.join(name)).map_err(open_error(dir, name))
}

/// The array pinned as `name` in `dir`.
fn pinned_array<T: aya::Pod>(
    dir: &std::path::Path,
    name: &str,
) -> Result<Array<MapData, T>, StatsError> {
    Array::try_from(Map::Array(open_pin(dir, name)?)).map_err(open_error(dir, name))
}

/// `daemon_stats[0]` pinned in `dir`.
fn pinned_daemon_stats(dir: &std::path::Path) -> Result<DaemonStats, StatsError> {
    pinned_array(dir, maps::DAEMON_STATS)?
        .get(&0, 0)
        .map_err(open_error(dir, maps::DAEMON_STATS))
}

/// The guests' report: the daemon that writes their counters, and a line per guest.
fn guests_report(pin_root: &std::path::Path) -> Result<String, StatsError> {
    let dir = pin_root.join(maps::GUESTS_DIR);
    let ds = pinned_daemon_stats(&dir)?;
    let guests: Array<MapData, GuestStats> = pinned_array(&dir, maps::GUEST_STATS)?;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "guests: {} ({} connected), daemon pid {}, uptime {} s",
        ds.guests,
        ds.guests_connected,
        ds.pid,
        ds.uptime_ms / 1000
    );
    if let Some(stale) = stale(&ds, &dir) {
        let _ = writeln!(out, "{stale}");
    }
    for id in 0..guests.len() {
        let g = guests
            .get(&id, 0)
            .map_err(open_error(&dir, maps::GUEST_STATS))?;
        if g.active == 0 {
            continue;
        }
        let mac = g.mac.map(|b| format!("{b:02x}")).join(":");
        let _ = writeln!(
            out,
            "  guest {id}: mac {mac}, {}, {} queue pair(s); to guest {} pkts {} B, dropped: no buffers {}, buffers too small {}, queue reset {}, bad RX chain {}; from guest {} pkts {} B, dropped: no route {}, too long {}, tx full {}, queue reset {}; malformed chains {}, broken queues {}; copies: cpu {}, dma {}, fallbacks {}",
            match (g.connected != 0, g.ready != 0) {
                (true, true) => "connected, ready",
                (true, false) => "connected, not ready",
                (false, _) => "not connected",
            },
            g.queue_pairs,
            g.to_guest_packets,
            g.to_guest_bytes,
            g.to_guest_dropped_full,
            g.to_guest_dropped_small,
            g.to_guest_dropped_reset,
            g.to_guest_dropped_malformed,
            g.from_guest_packets,
            g.from_guest_bytes,
            g.from_guest_no_route,
            g.from_guest_oversize,
            g.from_guest_dropped_full,
            g.from_guest_dropped_reset,
            g.malformed_chains,
            g.broken_queues,
            g.copy_cpu,
            g.copy_dma,
            g.copy_fallbacks(),
        );
    }
    Ok(out)
}

/// The report for interface `iface`.
fn iface_report(pin_root: &std::path::Path, iface: &str) -> Result<String, StatsError> {
    let dir = pin_root.join(iface);
    let xdp: PerCpuArray<MapData, XdpStats> =
        PerCpuArray::try_from(Map::PerCpuArray(open_pin(&dir, maps::XDP_STATS)?))
            .map_err(open_error(&dir, maps::XDP_STATS))?;
    let ds = pinned_daemon_stats(&dir)?;

    let mut out = String::new();
    let mode = [XdpMode::None, XdpMode::Native, XdpMode::Generic]
        .into_iter()
        .find(|m| *m as u32 == ds.xdp_mode)
        .map_or("unknown", XdpMode::c_name);
    let _ = writeln!(
        out,
        "{}: xdp_mode {mode}, daemon pid {}, uptime {} s, steer entries: {}",
        iface,
        ds.pid,
        ds.uptime_ms / 1000,
        ds.steer_entries
    );
    if let Some(stale) = stale(&ds, &dir) {
        let _ = writeln!(out, "{stale}");
    }
    let _ = writeln!(out, "{:<12} {:>14} {:>16}", "outcome", "packets", "bytes");
    let totals = xdp_totals(&xdp).map_err(open_error(&dir, maps::XDP_STATS))?;
    for (outcome, total) in XdpOutcome::ALL.iter().zip(totals) {
        let _ = writeln!(
            out,
            "{:<12} {:>14} {:>16}",
            outcome.name(),
            total.packets,
            total.bytes
        );
    }
    let ports: Array<MapData, PortStats> = pinned_array(&dir, maps::PORT_STATS)?;
    let _ = writeln!(
        out,
        "AF_XDP sockets: {} ({} zero-copy)",
        ds.xsk_sockets, ds.xsk_zero_copy
    );
    for queue in 0..ports.len() {
        let p = ports
            .get(&queue, 0)
            .map_err(open_error(&dir, maps::PORT_STATS))?;
        if p.active == 0 {
            continue;
        }
        let _ = writeln!(
            out,
            "  queue {queue}: {}{}, rx {} pkts {} B, tx {} pkts {} B, no guest {}, drops: fill ring empty {}, rx ring full {}, tx ring full {}, no tx frame {}, too long {}",
            if p.zero_copy != 0 {
                "zero-copy"
            } else {
                "copy mode"
            },
            if p.need_wakeup != 0 {
                ", need_wakeup"
            } else {
                ""
            },
            p.rx_packets,
            p.rx_bytes,
            p.tx_packets,
            p.tx_bytes,
            p.rx_no_guest,
            p.fill_ring_empty,
            p.rx_ring_full,
            p.tx_ring_full,
            p.tx_no_frame,
            p.tx_oversize
        );
    }
    if ds.guests > 0 {
        let _ = writeln!(
            out,
            "guests: {} ({} connected), to guests {} pkts, from guests {} pkts, dropped {}, malformed chains {}; copies: cpu {}, dma {}, fallbacks {}, in flight {}",
            ds.guests,
            ds.guests_connected,
            ds.to_guests_packets,
            ds.from_guests_packets,
            ds.guests_dropped,
            ds.guests_malformed_chains,
            ds.copy_cpu,
            ds.copy_dma,
            ds.copy_fallbacks,
            ds.copy_inflight
        );
    }
    if ds.group_frames + ds.group_dropped > 0 {
        let _ = writeln!(
            out,
            "broadcast/multicast from the wire: {} to the guests, {} lost on the way",
            ds.group_frames, ds.group_dropped
        );
    }
    Ok(out)
}
