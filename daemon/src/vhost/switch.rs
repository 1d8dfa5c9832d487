//! The L2 switch between guests: unicast by destination MAC, broadcast and multicast flooded
//! to every other guest, unknown destinations counted (they will go to the NIC once the
//! AF_XDP bridge exists).
//!
//! Each guest is a port with a [`Mailbox`]; the sender's worker copies the frame into the
//! destination's mailbox and the destination's worker writes it into its guest. Wake-ups are
//! batched: `forward` marks the mailbox, `notify_marked` wakes each marked one once per burst.

use std::{
    collections::HashMap,
    sync::{
        Arc, RwLock,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
};

use thiserror::Error;

use super::mailbox::Mailbox;
use crate::config::MacAddr;

/// Counters of one guest, shared by the threads that touch it.
#[derive(Debug, Default)]
pub struct GuestCounters {
    /// Frames written into the guest.
    pub rx_packets: AtomicU64,
    /// Their bytes (without the virtio-net header).
    pub rx_bytes: AtomicU64,
    /// Frames the guest sent.
    pub tx_packets: AtomicU64,
    /// Their bytes.
    pub tx_bytes: AtomicU64,
    /// Frames for this guest dropped because its mailbox was full (it posts no RX buffers).
    pub rx_dropped_full: AtomicU64,
    /// Frames for this guest dropped because its RX buffers were too small.
    pub rx_dropped_small: AtomicU64,
    /// Frames the guest sent to a MAC no guest has.
    pub tx_unknown_dst: AtomicU64,
    /// Frames the guest sent longer than the backend moves.
    pub tx_oversize: AtomicU64,
    /// Descriptor chains that point outside guest memory, loop, are too long or too short.
    pub malformed_chains: AtomicU64,
    /// Times a queue was found broken (e.g. the avail index jumped) and stopped.
    pub broken_queues: AtomicU64,
    /// Frames for this guest dropped because its RX queue was stopped or reset (waiting in
    /// the mailbox, or in flight to a queue that is gone).
    pub rx_dropped_reset: AtomicU64,
}

impl GuestCounters {
    /// Adds `n` to `counter`.
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}

/// A guest's place on the switch.
#[derive(Debug)]
pub struct Port {
    id: u32,
    mac: MacAddr,
    mailbox: Mailbox,
    marked: AtomicBool,
    counters: GuestCounters,
}

impl Port {
    /// The port's id.
    pub fn id(&self) -> u32 {
        self.id
    }

    /// The guest's MAC.
    pub fn mac(&self) -> MacAddr {
        self.mac
    }

    /// Its incoming frames.
    pub fn mailbox(&self) -> &Mailbox {
        &self.mailbox
    }

    /// Its counters.
    pub fn counters(&self) -> &GuestCounters {
        &self.counters
    }
}

/// Errors of adding a port.
#[derive(Debug, Error)]
pub enum SwitchError {
    /// Two guests with one MAC.
    #[error("MAC {0} is already used by another guest")]
    DuplicateMac(MacAddr),
    /// The mailbox's eventfd could not be made.
    #[error("creating a mailbox")]
    Mailbox(#[source] std::io::Error),
}

#[derive(Default)]
struct Table {
    ports: Vec<Arc<Port>>,
    by_mac: HashMap<[u8; 6], usize>,
}

/// The switch.
#[derive(Default)]
pub struct Switch {
    table: RwLock<Table>,
    next_id: AtomicU64,
}

impl std::fmt::Debug for Switch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ports = self.table.read().map_or(0, |t| t.ports.len());
        f.debug_struct("Switch").field("ports", &ports).finish()
    }
}

impl Switch {
    /// An empty switch.
    pub fn new() -> Arc<Switch> {
        Arc::new(Switch::default())
    }

    /// Adds a guest with `mac`.
    pub fn add_port(&self, mac: MacAddr) -> Result<Arc<Port>, SwitchError> {
        let mut table = self.table.write().unwrap_or_else(|e| e.into_inner());
        if table.by_mac.contains_key(&mac.0) {
            return Err(SwitchError::DuplicateMac(mac));
        }
        let port = Arc::new(Port {
            id: self.next_id.fetch_add(1, Ordering::Relaxed) as u32,
            mac,
            mailbox: Mailbox::new().map_err(SwitchError::Mailbox)?,
            marked: AtomicBool::new(false),
            counters: GuestCounters::default(),
        });
        let index = table.ports.len();
        table.ports.push(Arc::clone(&port));
        table.by_mac.insert(mac.0, index);
        Ok(port)
    }

    /// Every port, for stats.
    pub fn ports(&self) -> Vec<Arc<Port>> {
        self.table
            .read()
            .map(|t| t.ports.clone())
            .unwrap_or_default()
    }

    /// Sends `frame` from `from` to its destination(s). Returns how many ports took it.
    pub fn forward(&self, from: &Port, frame: &[u8]) -> usize {
        let Some(dst) = frame.get(..6) else { return 0 };
        let Ok(table) = self.table.read() else {
            return 0;
        };
        let mut delivered = 0;
        let mut give = |port: &Port| {
            if port.mailbox.push(frame) {
                port.marked.store(true, Ordering::Release);
                delivered += 1;
            } else {
                GuestCounters::add(&port.counters.rx_dropped_full, 1);
            }
        };
        if dst[0] & 1 != 0 {
            for port in table.ports.iter().filter(|p| p.id != from.id) {
                give(port);
            }
        } else {
            match table.by_mac.get(dst).map(|&i| &table.ports[i]) {
                Some(port) if port.id != from.id => give(port),
                Some(_) => {}
                None => GuestCounters::add(&from.counters.tx_unknown_dst, 1),
            }
        }
        delivered
    }

    /// Wakes every port `forward` gave frames to since the last call.
    pub fn notify_marked(&self) {
        let Ok(table) = self.table.read() else { return };
        for port in &table.ports {
            if port.marked.swap(false, Ordering::AcqRel) {
                port.mailbox.notify();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mac(n: u8) -> MacAddr {
        MacAddr([2, 0, 0, 0, 0, n])
    }

    fn frame(dst: [u8; 6], src: MacAddr) -> Vec<u8> {
        let mut f = dst.to_vec();
        f.extend_from_slice(&src.0);
        f.extend_from_slice(&[0x88, 0xb5, 1, 2, 3]);
        f
    }

    #[test]
    fn unicast_goes_to_its_port_and_broadcast_to_all_others() {
        let sw = Switch::new();
        let (a, b, c) = (
            sw.add_port(mac(1)).unwrap(),
            sw.add_port(mac(2)).unwrap(),
            sw.add_port(mac(3)).unwrap(),
        );
        assert!(matches!(
            sw.add_port(mac(1)),
            Err(SwitchError::DuplicateMac(_))
        ));
        assert_eq!(sw.forward(&a, &frame(mac(2).0, a.mac())), 1);
        assert_eq!((b.mailbox().pending(), c.mailbox().pending()), (1, 0));
        assert_eq!(sw.forward(&a, &frame([0xff; 6], a.mac())), 2);
        assert_eq!(sw.forward(&a, &frame([0x33, 0x33, 0, 0, 0, 1], a.mac())), 2);
        assert_eq!(
            (
                a.mailbox().pending(),
                b.mailbox().pending(),
                c.mailbox().pending()
            ),
            (0, 3, 2)
        );
        assert_eq!(sw.forward(&a, &frame(mac(9).0, a.mac())), 0);
        assert_eq!(a.counters().tx_unknown_dst.load(Ordering::Relaxed), 1);
        assert_eq!(
            sw.forward(&a, &frame(mac(1).0, a.mac())),
            0,
            "never back to the sender"
        );
        assert_eq!(sw.forward(&a, &[1, 2, 3]), 0, "a runt is not forwarded");
        sw.notify_marked();
        assert_eq!(
            b.mailbox().event().read().unwrap(),
            1,
            "one wake-up per burst"
        );
    }

    #[test]
    fn a_full_mailbox_counts_the_drop_at_the_destination() {
        let sw = Switch::new();
        let (a, b) = (sw.add_port(mac(1)).unwrap(), sw.add_port(mac(2)).unwrap());
        for _ in 0..super::super::mailbox::MAILBOX_FRAMES + 5 {
            sw.forward(&a, &frame(mac(2).0, a.mac()));
        }
        assert_eq!(b.counters().rx_dropped_full.load(Ordering::Relaxed), 5);
    }
}
