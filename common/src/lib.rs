//! The types xvio's XDP program (`ebpf/xvio.bpf.c`) shares with its daemon.
//!
//! Every `#[repr(C)]` type here mirrors a C type of `ebpf/xvio.h` field by field; the
//! integration test `common_matches_btf` checks sizes, field offsets and enum values
//! against the BTF of the compiled object, so the two cannot drift apart silently.
//! Map names and pin paths live here too, so the daemon, the tests and the docs name
//! the same things.
#![no_std]

/// Root of xvio's pins on bpffs; each interface gets `PIN_ROOT/<ifname>/`.
pub const PIN_ROOT: &str = "/sys/fs/bpf/xvio";
/// The XDP program's function name in the object.
pub const PROGRAM_NAME: &str = "xvio_steer";

/// Names of the maps declared in the object (also their file names under the pin directory).
pub mod maps {
    /// Per-CPU array of [`crate::XdpStats`], indexed by [`crate::XdpOutcome`].
    pub const XDP_STATS: &str = "xdp_stats";
    /// Hash of [`crate::SteerKey`] to [`crate::SteerValue`]: the frames that go to guests.
    pub const STEER: &str = "steer";
    /// Array of [`crate::SteerSlot`], indexed by [`crate::SteerKey::slot`]: which slots
    /// `steer`'s keys have, so that most frames are decided without hashing (written by
    /// the daemon with `steer`; not pinned).
    pub const STEER_INDEX: &str = "steer_index";
    /// XSKMAP: rx queue index to AF_XDP socket.
    pub const XSKS: &str = "xsks";
    /// Array with one [`crate::DaemonStats`], written by the daemon.
    pub const DAEMON_STATS: &str = "daemon_stats";
    /// Array of [`crate::PortStats`], indexed by rx queue, written by the daemon.
    pub const PORT_STATS: &str = "port_stats";
    /// Array of [`crate::GuestStats`], indexed by guest id; pinned once under
    /// `PIN_ROOT/guests/`.
    pub const GUEST_STATS: &str = "guest_stats";
    /// The folder below `PIN_ROOT` that holds `guest_stats`.
    pub const GUESTS_DIR: &str = "guests";
    /// Ring buffer of [`crate::Event`].
    pub const EVENTS: &str = "events";
    /// Per-CPU array of [`crate::EventState`], indexed by [`crate::EventKind`].
    pub const EVENT_STATE: &str = "event_state";
    /// The maps the daemon pins, in the order `bpftool` users will look for them.
    pub const PINNED: [&str; 6] = [
        XDP_STATS,
        STEER,
        XSKS,
        DAEMON_STATS,
        PORT_STATS,
        EVENT_STATE,
    ];
}

/// Entries of `steer` (`XVIO_STEER_MAX`).
pub const STEER_MAX: u32 = 4096;
/// Entries of `steer_index` (`XVIO_STEER_SLOTS`, a power of two).
pub const STEER_SLOTS: u32 = 1024;
/// Entries of `guest_stats`: guests one daemon reports.
pub const GUESTS_MAX: u32 = 256;
/// Entries of `xsks`, so the highest rx queue that can be steered is this minus one.
pub const XSKS_MAX: u32 = 64;
/// Kernel events of one kind are emitted at most once per this many ns per CPU.
pub const EVENT_PERIOD_NS: u64 = 1_000_000_000;

/// The outcome of one frame in the XDP program (`enum xvio_xdp_outcome`).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum XdpOutcome {
    /// Unicast to a MAC that is not steered: kernel stack.
    Passed = 0,
    /// Steered and handed to the AF_XDP socket of its rx queue.
    Redirected = 1,
    /// Steered, but no socket is registered for that rx queue: kernel stack.
    NoSocket = 2,
    /// Shorter than its Ethernet (and 802.1Q) header: kernel stack, untouched.
    Malformed = 3,
    /// Broadcast: kernel stack.
    Broadcast = 4,
    /// Multicast (group bit set, not broadcast): kernel stack.
    Multicast = 5,
}

impl XdpOutcome {
    /// Every outcome, in index order.
    pub const ALL: [XdpOutcome; 6] = [
        XdpOutcome::Passed,
        XdpOutcome::Redirected,
        XdpOutcome::NoSocket,
        XdpOutcome::Malformed,
        XdpOutcome::Broadcast,
        XdpOutcome::Multicast,
    ];

    /// The index of this outcome in `xdp_stats`.
    pub const fn index(self) -> u32 {
        self as u32
    }

    /// The C enumerator's name (`XVIO_XDP_PASSED` …).
    pub const fn c_name(self) -> &'static str {
        match self {
            XdpOutcome::Passed => "XVIO_XDP_PASSED",
            XdpOutcome::Redirected => "XVIO_XDP_REDIRECTED",
            XdpOutcome::NoSocket => "XVIO_XDP_NO_SOCKET",
            XdpOutcome::Malformed => "XVIO_XDP_MALFORMED",
            XdpOutcome::Broadcast => "XVIO_XDP_BROADCAST",
            XdpOutcome::Multicast => "XVIO_XDP_MULTICAST",
        }
    }

    /// A short lower-case name for logs and stats output.
    pub const fn name(self) -> &'static str {
        match self {
            XdpOutcome::Passed => "passed",
            XdpOutcome::Redirected => "redirected",
            XdpOutcome::NoSocket => "no_socket",
            XdpOutcome::Malformed => "malformed",
            XdpOutcome::Broadcast => "broadcast",
            XdpOutcome::Multicast => "multicast",
        }
    }

    /// The outcome with this index, if any.
    pub const fn from_index(index: u32) -> Option<XdpOutcome> {
        match index {
            0 => Some(XdpOutcome::Passed),
            1 => Some(XdpOutcome::Redirected),
            2 => Some(XdpOutcome::NoSocket),
            3 => Some(XdpOutcome::Malformed),
            4 => Some(XdpOutcome::Broadcast),
            5 => Some(XdpOutcome::Multicast),
            _ => None,
        }
    }
}

/// Value of `xdp_stats` (`struct xvio_xdp_stats`), one per CPU.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct XdpStats {
    /// Frames counted under this outcome.
    pub packets: u64,
    /// Their bytes, all fragments included.
    pub bytes: u64,
}

/// Key of `steer` (`struct xvio_steer_key`): a guest's MAC on one VLAN.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SteerKey {
    /// Destination MAC address.
    pub mac: [u8; 6],
    /// 802.1Q VLAN id (12 bits); 0 for untagged or priority-tagged frames.
    pub vlan: u16,
}

impl SteerKey {
    /// The key for `mac` on `vlan` (0: untagged).
    pub const fn new(mac: [u8; 6], vlan: u16) -> SteerKey {
        SteerKey { mac, vlan }
    }

    /// Its slot in `steer_index` (`xvio_steer_slot()`): the MAC's last two bytes, its
    /// fourth, and the VLAN.
    pub const fn slot(&self) -> u32 {
        let m = &self.mac;
        let h = ((m[4] as u32) << 8 | m[5] as u32) ^ ((m[3] as u32) << 2) ^ self.vlan as u32;
        h & (STEER_SLOTS - 1)
    }
}

/// Value of `steer_index` (`struct xvio_steer_slot`): how many steered keys have this slot,
/// and the key when it is one, so that the program decides most frames with one array
/// lookup: no key, not steered; one key, steered if it is that key; more, `steer` decides.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SteerSlot {
    /// The slot's key when `keys` is 1.
    pub key: SteerKey,
    /// 0, 1, or 2 for more than one (written after `key`).
    pub keys: u32,
    /// As in `steer`, when `keys` is 1.
    pub guest_id: u32,
}

/// Value of `steer` (`struct xvio_steer_value`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SteerValue {
    /// The daemon's id of the guest port the MAC belongs to.
    pub guest_id: u32,
    /// Reserved, 0.
    pub flags: u32,
}

/// How the XDP program is attached (`enum xvio_xdp_mode`).
#[repr(u32)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum XdpMode {
    /// Not attached.
    #[default]
    None = 0,
    /// In the driver (native XDP).
    Native = 1,
    /// In the kernel's generic path (skb mode), slower.
    Generic = 2,
}

impl XdpMode {
    /// The C enumerator's name.
    pub const fn c_name(self) -> &'static str {
        match self {
            XdpMode::None => "XVIO_XDP_MODE_NONE",
            XdpMode::Native => "XVIO_XDP_MODE_NATIVE",
            XdpMode::Generic => "XVIO_XDP_MODE_GENERIC",
        }
    }
}

/// Value of `daemon_stats[0]` (`struct xvio_daemon_stats`), written by the daemon.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DaemonStats {
    /// Milliseconds since the daemon started.
    pub uptime_ms: u64,
    /// Wall clock (Unix ms) of this write; a stale value means a dead daemon.
    pub updated_unix_ms: u64,
    /// The daemon's process id.
    pub pid: u32,
    /// Interfaces this daemon has attached.
    pub ifaces_attached: u32,
    /// How the program is attached to this interface ([`XdpMode`] as u32).
    pub xdp_mode: u32,
    /// Entries the daemon put in `steer`.
    pub steer_entries: u32,
    /// AF_XDP sockets open on this interface.
    pub xsk_sockets: u32,
    /// How many of them are in zero-copy mode.
    pub xsk_zero_copy: u32,
    /// vhost-user guest ports the daemon serves (this and the fields below are the daemon's
    /// guests summed over `guest_stats`, the same in every interface's map).
    pub guests: u32,
    /// Of them, with a frontend connected.
    pub guests_connected: u32,
    /// Frames written into guests.
    pub to_guests_packets: u64,
    /// Frames guests sent that were forwarded.
    pub from_guests_packets: u64,
    /// The guests' drops (every `to_guest_dropped_*` and `from_guest_*` drop), summed.
    pub guests_dropped: u64,
    /// Malformed descriptor chains.
    pub guests_malformed_chains: u64,
    /// Guest RX copies the copy engine gave the CPU (guests with a DMA channel; a guest
    /// without one copies on the CPU outside the engine and counts only `to_guests_packets`).
    pub copy_cpu: u64,
    /// Guest RX copies done by DMA channels.
    pub copy_dma: u64,
    /// Copies meant for a channel that the CPU did (every reason).
    pub copy_fallbacks: u64,
    /// Frames whose RX copies are in flight.
    pub copy_inflight: u64,
    /// Broadcast and multicast frames this interface's tap read (each flooded to the guests
    /// of its VLAN, counted per guest, unless lost as `group_dropped` says).
    pub group_frames: u64,
    /// Broadcast and multicast frames lost before they reached the guests: dropped by the
    /// kernel at the tap's socket (these are not in `group_frames`), refused by a full inbox,
    /// or with no free bounce buffer.
    pub group_dropped: u64,
}

/// Value of `port_stats[rx queue]` (`struct xvio_port_stats`): one AF_XDP port.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PortStats {
    /// 1 while a socket is open on this queue.
    pub active: u32,
    /// 1: zero-copy; 0: copy mode.
    pub zero_copy: u32,
    /// 1: the rings use need_wakeup.
    pub need_wakeup: u32,
    /// Reserved, 0.
    pub reserved: u32,
    /// Frames received.
    pub rx_packets: u64,
    /// Their bytes.
    pub rx_bytes: u64,
    /// Frames handed to the tx ring.
    pub tx_packets: u64,
    /// Their bytes.
    pub tx_bytes: u64,
    /// Receive polls that found nothing.
    pub rx_empty_polls: u64,
    /// Kernel drops: no frame in the fill ring.
    pub fill_ring_empty: u64,
    /// Kernel drops: rx ring full (and any other of its drops but `fill_ring_empty`'s).
    pub rx_ring_full: u64,
    /// Frames not sent: tx ring full.
    pub tx_ring_full: u64,
    /// Frames not sent: no free frame.
    pub tx_no_frame: u64,
    /// Frames in the tx ring or awaiting completion.
    pub tx_in_flight: u64,
    /// Frames received with no guest to deliver them to (dropped).
    pub rx_no_guest: u64,
    /// Frames not sent: longer than a UMEM frame (a guest's broadcast or multicast; a unicast
    /// frame that long is its guest's `from_guest_oversize`).
    pub tx_oversize: u64,
}

/// Value of `guest_stats[guest id]` (`struct xvio_guest_stats`): one vhost-user guest.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GuestStats {
    /// 1 while the guest's port exists.
    pub active: u32,
    /// 1 while a vhost-user frontend is connected.
    pub connected: u32,
    /// The guest's MAC.
    pub mac: [u8; 6],
    /// Queue pairs.
    pub queue_pairs: u16,
    /// 1 while the datapath delivers frames to the guest (it has the guest's memory and an
    /// RX queue the frontend started); until then frames for it are dropped and counted.
    pub ready: u32,
    /// Frames written into the guest.
    pub to_guest_packets: u64,
    /// Their bytes.
    pub to_guest_bytes: u64,
    /// Frames the guest sent that were forwarded (to guests, the wire, or both).
    pub from_guest_packets: u64,
    /// Their bytes.
    pub from_guest_bytes: u64,
    /// Frames for the guest dropped: no RX buffers for them.
    pub to_guest_dropped_full: u64,
    /// … its RX buffer was too small (no MRG_RXBUF).
    pub to_guest_dropped_small: u64,
    /// … its RX queue was stopped, reset or not started.
    pub to_guest_dropped_reset: u64,
    /// Frames the guest sent to no one (no guest has the MAC, no interface to send on).
    pub from_guest_no_route: u64,
    /// Frames the guest sent longer than the datapath moves.
    pub from_guest_oversize: u64,
    /// Frames the guest sent that the interface had no transmit frame or ring room for.
    pub from_guest_dropped_full: u64,
    /// Malformed descriptor chains.
    pub malformed_chains: u64,
    /// Queues stopped for an inconsistent avail index.
    pub broken_queues: u64,
    /// RX copies done by the CPU.
    pub copy_cpu: u64,
    /// Their bytes.
    pub copy_cpu_bytes: u64,
    /// RX copies done by the guest's DMA channel.
    pub copy_dma: u64,
    /// Their bytes.
    pub copy_dma_bytes: u64,
    /// Copies meant for the channel, done by the CPU: the channel was full.
    pub copy_fallback_full: u64,
    /// … the channel refused the copy.
    pub copy_fallback_enqueue: u64,
    /// … the channel reported the copy failed.
    pub copy_fallback_error: u64,
    /// … the doorbell failed.
    pub copy_fallback_submit: u64,
    /// Frames whose copies (both directions) are in flight.
    pub copy_inflight: u64,
    /// Frames the guest sent, dropped: their copies to the wire were in flight when the TX
    /// queue stopped or was reset, and the DMA channel did not finish them in time.
    pub from_guest_dropped_reset: u64,
    /// Frames for the guest dropped: the RX chain they were to go into was malformed (the
    /// chain is also counted in `malformed_chains`).
    pub to_guest_dropped_malformed: u64,
}

impl GuestStats {
    /// Copies the copy engine redid on the CPU, for any reason.
    pub fn copy_fallbacks(&self) -> u64 {
        self.copy_fallback_full
            + self.copy_fallback_enqueue
            + self.copy_fallback_error
            + self.copy_fallback_submit
    }
}

/// Kind of a kernel event (`enum xvio_event_kind`).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    /// A steered frame found no AF_XDP socket for its rx queue.
    NoSocket = 1,
    /// A frame shorter than its headers.
    Malformed = 2,
}

impl EventKind {
    /// Every kind, in index order.
    pub const ALL: [EventKind; 2] = [EventKind::NoSocket, EventKind::Malformed];
    /// Entries of `event_state` (`XVIO_EVENT_KINDS`; index 0 is unused).
    pub const ENTRIES: u32 = 3;

    /// The C enumerator's name.
    pub const fn c_name(self) -> &'static str {
        match self {
            EventKind::NoSocket => "XVIO_EVENT_NO_SOCKET",
            EventKind::Malformed => "XVIO_EVENT_MALFORMED",
        }
    }

    /// The kind with this value, if any.
    pub const fn from_u32(value: u32) -> Option<EventKind> {
        match value {
            1 => Some(EventKind::NoSocket),
            2 => Some(EventKind::Malformed),
            _ => None,
        }
    }
}

/// One record of the `events` ring buffer (`struct xvio_event`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Event {
    /// `bpf_ktime_get_ns()` (CLOCK_MONOTONIC) when emitted.
    pub ktime_ns: u64,
    /// [`EventKind`] as u32.
    pub kind: u32,
    /// [`XdpOutcome`] the frame was counted under.
    pub outcome: u32,
    /// Interface the frame arrived on.
    pub ifindex: u32,
    /// Its rx queue.
    pub rx_queue: u32,
    /// Its length in bytes.
    pub frame_len: u32,
    /// Events of this kind not emitted on this CPU before this one (rate limit).
    pub suppressed: u32,
    /// VLAN id parsed (0 if none).
    pub vlan: u16,
    /// Destination MAC (zeros when the frame is shorter than it).
    pub mac: [u8; 6],
}

/// Value of `event_state` (`struct xvio_event_state`), one per CPU and kind.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EventState {
    /// Events not emitted since `last`.
    pub suppressed: u32,
    /// Reserved, 0.
    pub reserved: u32,
    /// The last event emitted.
    pub last: Event,
}

#[cfg(feature = "user")]
mod pod {
    use super::{
        DaemonStats, Event, EventState, GuestStats, PortStats, SteerKey, SteerSlot, SteerValue,
        XdpStats,
    };

    // SAFETY: each type is `#[repr(C)]`, `Copy`, made only of integers and integer arrays
    // with no padding (checked against the object's BTF), so any bit pattern is valid.
    unsafe impl aya::Pod for XdpStats {}
    // SAFETY: as above.
    unsafe impl aya::Pod for SteerKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for SteerValue {}
    // SAFETY: as above.
    unsafe impl aya::Pod for SteerSlot {}
    // SAFETY: as above.
    unsafe impl aya::Pod for DaemonStats {}
    // SAFETY: as above.
    unsafe impl aya::Pod for Event {}
    // SAFETY: as above.
    unsafe impl aya::Pod for EventState {}
    // SAFETY: as above.
    unsafe impl aya::Pod for PortStats {}
    // SAFETY: as above.
    unsafe impl aya::Pod for GuestStats {}
}

impl Event {
    /// Size of one record in the ring buffer.
    pub const SIZE: usize = core::mem::size_of::<Event>();

    /// Reads a record from the ring buffer's bytes (native endian); `None` when too short.
    pub fn from_bytes(bytes: &[u8]) -> Option<Event> {
        let bytes: &[u8; Event::SIZE] = bytes.get(..Event::SIZE)?.try_into().ok()?;
        let u32_at = |at: usize| {
            u32::from_ne_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
        };
        let mut ktime = [0u8; 8];
        ktime.copy_from_slice(&bytes[0..8]);
        let mut mac = [0u8; 6];
        mac.copy_from_slice(&bytes[34..40]);
        Some(Event {
            ktime_ns: u64::from_ne_bytes(ktime),
            kind: u32_at(8),
            outcome: u32_at(12),
            ifindex: u32_at(16),
            rx_queue: u32_at(20),
            frame_len: u32_at(24),
            suppressed: u32_at(28),
            vlan: u16::from_ne_bytes([bytes[32], bytes[33]]),
            mac,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_from_bytes_reads_every_field() {
        let mut bytes = [0u8; Event::SIZE + 3];
        bytes[0..8].copy_from_slice(&7u64.to_ne_bytes());
        for (i, v) in [1u32, 2, 3, 4, 60, 9].iter().enumerate() {
            bytes[8 + 4 * i..12 + 4 * i].copy_from_slice(&v.to_ne_bytes());
        }
        bytes[32..34].copy_from_slice(&100u16.to_ne_bytes());
        bytes[34..40].copy_from_slice(&[2, 0, 0, 0, 0, 1]);
        let ev = Event::from_bytes(&bytes).unwrap();
        assert_eq!(
            ev,
            Event {
                ktime_ns: 7,
                kind: 1,
                outcome: 2,
                ifindex: 3,
                rx_queue: 4,
                frame_len: 60,
                suppressed: 9,
                vlan: 100,
                mac: [2, 0, 0, 0, 0, 1],
            }
        );
        assert_eq!(Event::from_bytes(&bytes[..Event::SIZE - 1]), None);
    }

    #[test]
    fn outcome_indices_round_trip() {
        for (i, o) in XdpOutcome::ALL.iter().enumerate() {
            assert_eq!(o.index() as usize, i);
            assert_eq!(XdpOutcome::from_index(o.index()), Some(*o));
        }
        assert_eq!(XdpOutcome::from_index(6), None);
    }
}
