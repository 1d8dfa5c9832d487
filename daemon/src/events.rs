//! Drains an interface's `events` ring buffer into `tracing` logs (aya-log only serves Rust
//! kernel programs). The kernel already rate-limits events per kind and CPU and says how
//! many it suppressed, so every record read is logged.
//!
//! The ring is polled every [`POLL_PERIOD`] rather than waited on through epoll: events are
//! rate-limited to a few per second, the ring holds over a thousand, and polling keeps this
//! module free of `unsafe` (tokio's `AsyncFd::register` is unsafe).

use std::time::Duration;

use aya::maps::{MapData, RingBuf};
use tracing::warn;
use xvio_common::{Event, EventKind};

use crate::config::MacAddr;

/// How often the ring buffer is drained.
pub const POLL_PERIOD: Duration = Duration::from_millis(200);

/// Logs every event of `ring`, polling it every [`POLL_PERIOD`]; never returns.
pub async fn log_events(iface: String, mut ring: RingBuf<MapData>) {
    let mut tick = tokio::time::interval(POLL_PERIOD);
    loop {
        tick.tick().await;
        drain(&iface, &mut ring);
    }
}

/// Logs the events waiting in `ring`; returns how many were read.
pub fn drain(iface: &str, ring: &mut RingBuf<MapData>) -> usize {
    let mut read = 0;
    while let Some(item) = ring.next() {
        read += 1;
        match Event::from_bytes(&item) {
            Some(event) => log_event(iface, &event),
            None => warn!(
                iface,
                len = item.len(),
                "short record in the events ring buffer"
            ),
        }
    }
    read
}

fn log_event(iface: &str, event: &Event) {
    let mac = MacAddr(event.mac);
    match EventKind::from_u32(event.kind) {
        Some(EventKind::NoSocket) => warn!(
            iface,
            %mac,
            vlan = event.vlan,
            rx_queue = event.rx_queue,
            frame_len = event.frame_len,
            suppressed = event.suppressed,
            "steered frame found no AF_XDP socket for its rx queue; passed to the kernel"
        ),
        Some(EventKind::Malformed) => warn!(
            iface,
            rx_queue = event.rx_queue,
            frame_len = event.frame_len,
            suppressed = event.suppressed,
            "frame shorter than its Ethernet/802.1Q header; passed to the kernel"
        ),
        None => warn!(iface, kind = event.kind, "unknown kernel event kind"),
    }
}
