//! A guest's counters, named by direction (`to_guest`: frames the datapath writes into the
//! guest; `from_guest`: frames the guest sends). Every frame that enters the datapath for or
//! from a guest leaves through exactly one of them: delivered, or dropped for a named reason.
//! Written by the worker that owns the guest (relaxed atomics, one cache line each group),
//! read by the control plane about once a second.

use std::sync::atomic::{AtomicU64, Ordering};

/// Counters of one guest.
#[derive(Debug, Default)]
pub struct GuestCounters {
    /// Frames written into the guest.
    pub to_guest_packets: AtomicU64,
    /// Their bytes (without the virtio-net header).
    pub to_guest_bytes: AtomicU64,
    /// Frames for the guest dropped: it had no RX buffers for them.
    pub to_guest_dropped_full: AtomicU64,
    /// Frames for the guest dropped: its RX buffer was too small (no MRG_RXBUF).
    pub to_guest_dropped_small: AtomicU64,
    /// Frames for the guest dropped: its RX queue was stopped or reset (or not started).
    pub to_guest_dropped_reset: AtomicU64,
    /// Frames for the guest dropped: the RX chain they were to go into was malformed (the
    /// chain counted in `malformed_chains` too).
    pub to_guest_dropped_malformed: AtomicU64,
    /// Frames the guest sent that the datapath forwarded (to a guest, the wire, or both).
    pub from_guest_packets: AtomicU64,
    /// Their bytes.
    pub from_guest_bytes: AtomicU64,
    /// Frames the guest sent to a MAC no guest has, with no interface to send them on.
    pub from_guest_no_route: AtomicU64,
    /// Frames the guest sent longer than the datapath moves.
    pub from_guest_oversize: AtomicU64,
    /// Frames the guest sent that could not go out: the interface's transmit ring or frames
    /// were exhausted.
    pub from_guest_dropped_full: AtomicU64,
    /// Frames the guest sent that were dropped: their copies to the wire were in flight when
    /// their TX queue stopped or was reset, and the DMA channel did not finish them in time
    /// (copies it does finish then are sent).
    pub from_guest_dropped_reset: AtomicU64,
    /// Descriptor chains that point outside guest memory, loop, are too long or too short.
    pub malformed_chains: AtomicU64,
    /// Times a queue was found broken (e.g. the avail index jumped) and stopped.
    pub broken_queues: AtomicU64,
}

impl GuestCounters {
    /// Adds `n` to `counter`.
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// Reads `counter`.
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}
