//! A datapath worker: one thread, as an OVS-DPDK PMD thread, that polls its queues — the
//! AF_XDP sockets it receives from and the guest TX queues given to it — and moves every
//! frame it takes to its destination: any guest RX queue, or the wire on its own socket (the
//! first it receives from; else the first of all). It takes no lock per frame: its forwarding
//! table, bounce buffers and slots are its own, changed only between bursts through its
//! command queue; a socket, an RX queue and a vring are each locked once per burst, shared
//! with the other workers (and the library's control thread, for stops and restarts).
//!
//! Per iteration: commands; frames from the wire (a burst per uplink, each frame copied once,
//! from its UMEM frame into the guest); frames from the guests (a burst per TX queue: to the
//! wire copied once into a UMEM frame, now or through the queue's copy engine; to guests
//! through a bounce buffer); completions of copies in flight; the uplinks' transmit rings
//! flushed. Busy, it polls, and guests are asked not to kick (`VRING_USED_F_NO_NOTIFY` for
//! drivers without EVENT_IDX; with it, `avail_event` stays behind). Idle for
//! [`IDLE_BEFORE_PARK`] (`--busy-poll`), it asks every guest's TX queues to kick and parks in
//! `poll(2)` on its uplinks' sockets, its wake eventfd and its DMA channels' completion fds
//! (so an idle xvio uses no CPU); still idle when it wakes, it parks again at once. Wakers
//! set nothing but the eventfd, and only while the worker says it sleeps: the worker says so
//! *before* its last look at the queues, so no kick is lost.

use std::{
    os::fd::{AsFd, BorrowedFd, OwnedFd},
    sync::{
        Arc, Mutex, MutexGuard, PoisonError,
        atomic::{AtomicBool, Ordering},
        mpsc::{Receiver, Sender, SyncSender},
    },
    time::{Duration, Instant},
};

use nix::{
    poll::{PollFd, PollFlags, PollTimeout, poll},
    sys::eventfd::{EfdFlags, EventFd},
};
use vhost_user_backend::VringT;

use super::{
    bounce::{BOUNCE_BUFFERS, Bounce},
    counters::GuestCounters,
    device::{GuestId, Vring},
    fdb::{self, Dest, Fdb},
    from_guest::{Outgoing, Taken},
    inbox::Inbox,
    slot::GuestSlot,
    to_guest::Source,
    vlan,
};
use crate::{
    vhost::{
        dirty::{GuestMem, Memory},
        net::MAX_FRAME,
        queue::{self, Linear, TxChain},
    },
    xsk::XskPort,
};

/// Frames per burst (OVS's and DPDK's burst size).
pub const BURST: usize = 32;
/// Chains taken from a guest's TX queue at once: what the uplink's socket sends in one
/// `sendto` ([`crate::xsk::umem::TX_BUDGET`]; two sends where the kernel keeps its own 32).
const TX_BURST: usize = 64;
/// Chains ahead of the one the CPU copies whose frames it starts loading into the cache. A
/// burst's frames loaded all up front (64 of up to 1.5 KiB) outgrow the L1 cache before
/// they are copied; a few ahead arrive in time and stay (profiles of from_guest 1500 B, ten
/// alternating pairs: libc's copy took 189 against 306 ns a frame, medians).
const COPY_AHEAD: usize = 4;
/// Idle time before the worker parks, unless set otherwise (`--busy-poll`).
pub const IDLE_BEFORE_PARK: Duration = Duration::from_micros(200);
/// Longest park (counters are published at least this often).
const PARK_MAX: Duration = Duration::from_millis(100);
/// How often counters are published while busy.
const PUBLISH_EVERY: Duration = Duration::from_millis(100);
/// How long the control plane waits for a stop or reset to be confirmed.
const CALL_TIMEOUT: Duration = Duration::from_secs(3);

/// What the control plane and the guests' event threads tell a worker.
pub enum Command {
    /// Serve this guest.
    AddGuest(Box<GuestSlot>),
    /// Stop serving guest `id` (its copies drained first).
    RemoveGuest {
        /// The guest.
        id: GuestId,
        /// Confirmed when done.
        ack: SyncSender<()>,
    },
    /// Guest `id`'s vrings for this connection (by queue index).
    Vrings {
        /// The guest.
        id: GuestId,
        /// The vrings.
        vrings: Vec<Vring>,
    },
    /// Guest `id`'s memory (shared with the library; new tables replace its contents).
    Memory {
        /// The guest.
        id: GuestId,
        /// The memory.
        mem: Memory,
    },
    /// Guest `id`'s frontend stops queue `queue` (GET_VRING_BASE).
    StopVring {
        /// The guest.
        id: GuestId,
        /// Its queue index.
        queue: u16,
        /// Confirmed once the worker let go of it.
        ack: SyncSender<()>,
    },
    /// Guest `id`'s device is reset (VHOST_USER_RESET_DEVICE): copies in flight are
    /// dropped; the connection's vrings and memory stay.
    Reset {
        /// The guest.
        id: GuestId,
        /// Confirmed once done.
        ack: SyncSender<()>,
    },
    /// Guest `id`'s frontend left: as `Reset`, and its vrings and memory are let go of.
    Disconnect {
        /// The guest.
        id: GuestId,
        /// Confirmed once done.
        ack: SyncSender<()>,
    },
    /// An uplink (an AF_XDP socket on one NIC queue): every worker may transmit on it; the
    /// one given `poll` (a dup of its socket fd, to sleep on) also receives from it.
    AddUplink {
        /// The uplink.
        uplink: SharedUplink,
        /// For the worker that polls it.
        poll: Option<OwnedFd>,
    },
    /// Every worker's returns, by worker index (this one's included).
    Peers(Vec<Arc<Returns>>),
    /// Flood the group frames from the wire that arrive here to every guest.
    AddGroupInbox(Arc<Inbox>),
    /// Leave.
    Stop,
}

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = match self {
            Command::AddGuest(_) => "AddGuest",
            Command::RemoveGuest { .. } => "RemoveGuest",
            Command::Vrings { .. } => "Vrings",
            Command::Memory { .. } => "Memory",
            Command::StopVring { .. } => "StopVring",
            Command::Reset { .. } => "Reset",
            Command::Disconnect { .. } => "Disconnect",
            Command::AddUplink { .. } => "AddUplink",
            Command::Peers(_) => "Peers",
            Command::AddGroupInbox(_) => "AddGroupInbox",
            Command::Stop => "Stop",
        };
        f.write_str(name)
    }
}

/// The worker's wake-up, shared with whoever wakes it.
#[derive(Debug)]
pub struct Shared {
    wake: EventFd,
    sleeping: AtomicBool,
}

impl Shared {
    fn new() -> std::io::Result<Shared> {
        Ok(Shared {
            wake: EventFd::from_value_and_flags(0, EfdFlags::EFD_NONBLOCK | EfdFlags::EFD_CLOEXEC)
                .map_err(std::io::Error::from)?,
            sleeping: AtomicBool::new(false),
        })
    }

    fn wake(&self) {
        let _ = self.wake.write(1);
    }
}

/// A handle to a worker: its command queue and its wake-up.
#[derive(Debug, Clone)]
pub struct WorkerLink {
    commands: Sender<Command>,
    shared: Arc<Shared>,
}

impl WorkerLink {
    /// Queues `command` and wakes the worker (commands are rare: always wake).
    pub fn send(&self, command: Command) {
        if self.commands.send(command).is_ok() {
            self.shared.wake();
        }
    }

    /// Sends the command `make` builds around an acknowledgement and waits for it (bounded);
    /// false if the worker did not confirm in time (or is gone).
    pub fn call(&self, make: impl FnOnce(SyncSender<()>) -> Command) -> bool {
        let (ack, done) = std::sync::mpsc::sync_channel(1);
        self.send(make(ack));
        done.recv_timeout(CALL_TIMEOUT).is_ok()
    }

    /// A guest kicked: wake the worker if it sleeps (while it runs, it polls).
    pub fn kick(&self) {
        if self.shared.sleeping.load(Ordering::SeqCst) {
            self.shared.wake();
        }
    }
}

/// An uplink as the workers share it: one receives from it, any transmits on it, a burst at a
/// time under its lock (as OVS-DPDK's PMD threads share a port's transmit queue).
pub type SharedUplink = Arc<Mutex<Uplink>>;

/// A guest's TX chain that goes nowhere (no route, or no free buffer to copy it into),
/// judged all the same against the `room` its frame would have had: a bad or oversize chain
/// is counted as one (by the caller, from the verdict), a good one as dropped by `reason`.
fn dropped_judged<M>(
    chain: virtio_queue::DescriptorChain<M>,
    room: usize,
    mem: &GuestMem,
    reason: &std::sync::atomic::AtomicU64,
) -> TxChain
where
    M: std::ops::Deref<Target = GuestMem>,
{
    let outcome = queue::check_tx(chain, mem, room);
    if let TxChain::Frame(_) = outcome {
        GuestCounters::add(reason, 1);
    }
    outcome
}

fn lock_uplink(uplink: &SharedUplink) -> MutexGuard<'_, Uplink> {
    uplink.lock().unwrap_or_else(PoisonError::into_inner)
}

/// What other workers finished with that is this worker's (its bounce buffers, after a
/// copy another worker completed): handed back in batches, taken each iteration.
#[derive(Debug, Default)]
pub struct Returns {
    pending: AtomicBool,
    sources: Mutex<Vec<Source>>,
}

impl Returns {
    fn give(&self, sources: impl Iterator<Item = Source>) {
        let mut list = self.sources.lock().unwrap_or_else(PoisonError::into_inner);
        list.extend(sources);
        self.pending.store(true, Ordering::Release);
    }

    fn take_into(&self, into: &mut Vec<Source>) {
        if self.pending.swap(false, Ordering::Acquire) {
            let mut list = self.sources.lock().unwrap_or_else(PoisonError::into_inner);
            into.append(&mut list);
        }
    }
}

/// The uplinks a worker transmits on, each locked once for a run of frames.
struct Wire<'a> {
    uplinks: &'a [SharedUplink],
    held: Option<(usize, MutexGuard<'a, Uplink>)>,
    /// Uplinks sent on (bit by index): flushed at the end of the iteration.
    used: &'a mut u64,
}

impl<'a> Wire<'a> {
    fn new(uplinks: &'a [SharedUplink], used: &'a mut u64) -> Wire<'a> {
        Wire {
            uplinks,
            held: None,
            used,
        }
    }

    /// Uplink `u`, locked (the one held before is let go of).
    fn get(&mut self, u: usize) -> Option<&mut Uplink> {
        if self.held.as_ref().is_none_or(|(h, _)| *h != u) {
            self.held = None;
            self.held = Some((u, lock_uplink(self.uplinks.get(u)?)));
        }
        *self.used |= 1u64 << (u % 64);
        self.held.as_mut().map(|(_, g)| &mut **g)
    }

    /// Queues a frame whose copy out of a guest completed on its uplink's transmit ring (or
    /// frees it: `stale`, or the ring and stage are full even after a flush); whether it
    /// went out.
    fn transmit(&mut self, o: &Outgoing, stale: bool) -> bool {
        let Some(uplink) = self.get(usize::from(o.uplink)) else {
            return false;
        };
        if !stale && uplink.port.from_guest_push(o.addr, o.len) {
            return true;
        }
        uplink.port.from_guest_free(o.addr);
        false
    }
}

/// An AF_XDP socket a worker serves, with the counters it publishes.
pub struct Uplink {
    port: XskPort,
    published: Arc<Mutex<xvio_common::PortStats>>,
    no_guest: u64,
    /// Received frames done with, back to the fill ring at the end of the iteration.
    to_refill: Vec<u64>,
}

impl std::fmt::Debug for Uplink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Uplink").field("port", &self.port).finish()
    }
}

impl Uplink {
    /// An uplink on `port`; its counters are published into the returned handle.
    pub fn new(port: XskPort) -> (Uplink, Arc<Mutex<xvio_common::PortStats>>) {
        let published = Arc::new(Mutex::new(port.stats()));
        let uplink = Uplink {
            port,
            published: Arc::clone(&published),
            no_guest: 0,
            to_refill: Vec::with_capacity(4 * BURST),
        };
        (uplink, published)
    }

    fn publish(&self) {
        let mut value = self.port.stats();
        value.rx_no_guest = self.no_guest;
        if let Ok(mut slot) = self.published.lock() {
            *slot = value;
        }
    }
}

/// Frames of one TX burst the guest sent (to the wire by the CPU, or into a bounce buffer for
/// other guests), added to its shared counters once per burst rather than with two atomic
/// additions per frame.
#[derive(Debug, Default)]
struct Sent {
    packets: u64,
    bytes: u64,
}

impl Sent {
    fn add_to(&self, counters: &GuestCounters) {
        if self.packets > 0 {
            GuestCounters::add(&counters.from_guest_packets, self.packets);
            GuestCounters::add(&counters.from_guest_bytes, self.bytes);
        }
    }
}

/// A frame from a guest waiting in a bounce buffer for its second copy.
#[derive(Clone, Copy, Debug)]
struct Bounced {
    buf: u32,
    len: usize,
    /// The sending guest's slot (`usize::MAX`: the wire).
    from: usize,
    dest: Dest,
    /// A flooded frame goes to the wire too (not one that came from it).
    to_wire: bool,
    /// Its flow hash (picks the receiver's RX queue).
    hash: u32,
    /// Its VLAN (0: untagged); the buffer holds it untagged.
    vlan: u16,
}

/// The worker's own state.
pub struct Worker {
    name: String,
    /// Its index among the workers.
    index: usize,
    commands: Receiver<Command>,
    shared: Arc<Shared>,
    fdb: Fdb,
    guests: Vec<GuestSlot>,
    /// Every uplink, by index (the same on every worker).
    uplinks: Vec<SharedUplink>,
    /// The uplinks it receives from, and dups of their socket fds (to sleep on).
    polled: Vec<usize>,
    poll_fds: Vec<OwnedFd>,
    /// Uplinks it transmitted on since they were last flushed (bit by index).
    tx_used: u64,
    /// Frames done with, by uplink, for its fill ring.
    refill: Vec<Vec<u64>>,
    /// Its returns, and every worker's.
    returns: Arc<Returns>,
    peers: Vec<Arc<Returns>>,
    /// Sources of other workers' done with here, by worker.
    foreign: Vec<Vec<Source>>,
    bounce: Bounce,
    /// Broadcast and multicast frames from the wire (see `xsk::tap`).
    group_inboxes: Vec<Arc<Inbox>>,
    /// Scratch of one burst, allocated once.
    rx_descs: [(u64, u32); BURST],
    rx_dest: [Option<(usize, usize)>; BURST],
    bounced: Vec<Bounced>,
    /// For one receiver, the RX queue pair of each bounced frame it gets.
    bounced_pair: Vec<Option<usize>>,
    released: Vec<Source>,
    last_publish: Instant,
    /// Idle time before the worker parks.
    busy_poll: Duration,
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker")
            .field("name", &self.name)
            .field("guests", &self.guests.len())
            .field("uplinks", &self.uplinks.len())
            .finish()
    }
}

impl Worker {
    /// A worker (the only one) and the link to it.
    pub fn new(name: &str) -> std::io::Result<(Worker, WorkerLink)> {
        Worker::numbered(name, 0)
    }

    /// Worker number `index` of a datapath, and the link to it.
    pub fn numbered(name: &str, index: usize) -> std::io::Result<(Worker, WorkerLink)> {
        let (tx, rx) = std::sync::mpsc::channel();
        let shared = Arc::new(Shared::new()?);
        let link = WorkerLink {
            commands: tx,
            shared: Arc::clone(&shared),
        };
        let returns = Arc::new(Returns::default());
        let worker = Worker {
            name: name.to_owned(),
            index,
            commands: rx,
            shared,
            fdb: Fdb::default(),
            guests: Vec::new(),
            uplinks: Vec::new(),
            polled: Vec::new(),
            poll_fds: Vec::new(),
            tx_used: 0,
            refill: Vec::new(),
            peers: vec![Arc::clone(&returns)],
            returns,
            foreign: Vec::new(),
            bounce: Bounce::with_base(BOUNCE_BUFFERS, (index * BOUNCE_BUFFERS) as u32),
            group_inboxes: Vec::new(),
            rx_descs: [(0, 0); BURST],
            rx_dest: [None; BURST],
            bounced: Vec::with_capacity(TX_BURST.max(BURST)),
            bounced_pair: Vec::with_capacity(TX_BURST.max(BURST)),
            released: Vec::with_capacity(8 * BURST),
            last_publish: Instant::now(),
            busy_poll: IDLE_BEFORE_PARK,
        };
        Ok((worker, link))
    }

    /// The uplink it sends frames to the wire on: the first it receives from (each worker its
    /// own when there are as many sockets as workers), else the first of all (shared).
    fn tx_uplink(&self) -> usize {
        self.polled.first().copied().unwrap_or(0)
    }

    /// Its returns, for the other workers (see [`Command::Peers`]).
    pub fn returns(&self) -> Arc<Returns> {
        Arc::clone(&self.returns)
    }

    /// How long to keep polling after the last frame before parking.
    pub fn set_busy_poll(&mut self, busy_poll: Duration) {
        self.busy_poll = busy_poll;
    }

    /// Runs until [`Command::Stop`] (or every link is gone).
    pub fn run(mut self) {
        let mut idle_since: Option<Instant> = None;
        loop {
            if !self.commands() {
                break;
            }
            self.returns.take_into(&mut self.released);
            let mut work = self.poll_wire();
            work += self.poll_group_inboxes();
            work += self.poll_guests();
            work += self.complete_copies();
            work += self.flush_uplinks();
            if self.last_publish.elapsed() >= PUBLISH_EVERY {
                self.publish();
            }
            if work > 0 {
                idle_since = None;
                continue;
            }
            match idle_since {
                None => idle_since = Some(Instant::now()),
                // Still idle after a park (it timed out, or a wake-up brought nothing): the
                // idle time goes on, so the worker parks again at once rather than polling
                // for another `busy_poll`.
                Some(t) if t.elapsed() >= self.busy_poll => self.park(),
                Some(_) => std::hint::spin_loop(),
            }
        }
        for slot in &mut self.guests {
            let (released, mut wire) = (
                &mut self.released,
                Wire::new(&self.uplinks, &mut self.tx_used),
            );
            slot.disconnect(&mut |s| released.push(s), &mut |o, stale| {
                wire.transmit(o, stale)
            });
        }
        self.release_sources();
        self.publish();
    }

    /// Applies pending commands; false on `Stop`.
    fn commands(&mut self) -> bool {
        loop {
            let command = match self.commands.try_recv() {
                Ok(c) => c,
                Err(std::sync::mpsc::TryRecvError::Empty) => return true,
                Err(std::sync::mpsc::TryRecvError::Disconnected) => return false,
            };
            match command {
                Command::AddGuest(slot) => {
                    self.guests.push(*slot);
                    self.rebuild_fdb();
                }
                Command::RemoveGuest { id, ack } => {
                    if let Some(i) = self.slot_of(id) {
                        let mut slot = self.guests.remove(i);
                        let released = &mut self.released;
                        let mut wire = Wire::new(&self.uplinks, &mut self.tx_used);
                        slot.disconnect(&mut |s| released.push(s), &mut |o, stale| {
                            wire.transmit(o, stale)
                        });
                        drop(wire);
                        self.release_sources();
                        self.rebuild_fdb();
                    }
                    let _ = ack.send(());
                }
                Command::Vrings { id, vrings } => {
                    if let Some(i) = self.slot_of(id) {
                        self.guests[i].set_vrings(vrings);
                    }
                }
                Command::Memory { id, mem } => {
                    if let Some(i) = self.slot_of(id) {
                        self.guests[i].set_memory(mem);
                    }
                }
                Command::StopVring { id, queue, ack } => {
                    if let Some(i) = self.slot_of(id) {
                        let released = &mut self.released;
                        let mut wire = Wire::new(&self.uplinks, &mut self.tx_used);
                        self.guests[i].stop_vring(
                            usize::from(queue),
                            &mut |s| released.push(s),
                            &mut |o, stale| wire.transmit(o, stale),
                        );
                        drop(wire);
                        self.release_sources();
                    }
                    let _ = ack.send(());
                }
                Command::Reset { id, ack } => {
                    if let Some(i) = self.slot_of(id) {
                        let released = &mut self.released;
                        let mut wire = Wire::new(&self.uplinks, &mut self.tx_used);
                        self.guests[i].reset(&mut |s| released.push(s), &mut |o, stale| {
                            wire.transmit(o, stale)
                        });
                        drop(wire);
                        self.release_sources();
                    }
                    let _ = ack.send(());
                }
                Command::Disconnect { id, ack } => {
                    if let Some(i) = self.slot_of(id) {
                        let released = &mut self.released;
                        let mut wire = Wire::new(&self.uplinks, &mut self.tx_used);
                        self.guests[i].disconnect(&mut |s| released.push(s), &mut |o, stale| {
                            wire.transmit(o, stale)
                        });
                        drop(wire);
                        self.release_sources();
                    }
                    let _ = ack.send(());
                }
                Command::AddUplink { uplink, poll } => {
                    if let Some(fd) = poll {
                        self.polled.push(self.uplinks.len());
                        self.poll_fds.push(fd);
                    }
                    self.uplinks.push(uplink);
                    self.refill.push(Vec::with_capacity(4 * BURST));
                }
                Command::Peers(peers) => {
                    self.foreign = peers.iter().map(|_| Vec::new()).collect();
                    self.peers = peers;
                }
                Command::AddGroupInbox(inbox) => self.group_inboxes.push(inbox),
                Command::Stop => return false,
            }
        }
    }

    fn slot_of(&self, id: GuestId) -> Option<usize> {
        self.guests.iter().position(|g| g.device().id() == id)
    }

    fn rebuild_fdb(&mut self) {
        self.fdb.rebuild(
            self.guests
                .iter()
                .map(|g| (g.device().mac(), g.device().vlan())),
        );
    }

    /// A burst from each uplink into the guests; returns the frames received.
    fn poll_wire(&mut self) -> usize {
        for slot in &mut self.guests {
            slot.refresh_ready();
        }
        let mut total = 0;
        for k in 0..self.polled.len() {
            let u = self.polled[k];
            let shared = Arc::clone(&self.uplinks[u]);
            let mut guard = lock_uplink(&shared);
            let uplink = &mut *guard;
            let n = uplink.port.to_guest_take(&mut self.rx_descs);
            if n == 0 {
                continue;
            }
            total += n;
            let Worker {
                guests,
                fdb,
                rx_descs,
                rx_dest,
                released,
                ..
            } = self;
            // Where each frame goes: (guest slot, RX queue pair).
            for i in 0..n {
                let (addr, len) = rx_descs[i];
                let frame = uplink.port.frame(addr, len);
                rx_dest[i] = None;
                let to = fdb::dst_of(frame).zip(vlan::vlan_of(frame));
                match to.map(|(dst, vlan)| fdb.lookup(dst, vlan)) {
                    Some(Dest::Guest(s)) => {
                        // A guest on a VLAN gets its frames untagged.
                        if guests[s].device().vlan() != 0 {
                            rx_descs[i] = untag_received(&mut uplink.port, addr, len);
                        }
                        let (addr, len) = rx_descs[i];
                        match guests[s].rx_pair_for(flow_hash(uplink.port.frame(addr, len))) {
                            Some(p) => rx_dest[i] = Some((s, p)),
                            None => {
                                // The guest's RX queues are not started (or broken).
                                let counters = guests[s].counters();
                                GuestCounters::add(&counters.to_guest_dropped_reset, 1);
                                uplink.to_refill.push(addr);
                            }
                        }
                    }
                    // XDP steers only guests' unicast MACs (on their VLANs) here: a guest that
                    // just left.
                    _ => {
                        uplink.no_guest += 1;
                        uplink.to_refill.push(addr);
                    }
                }
            }
            // Each (guest, queue) once: one vring lock for all its frames of the burst.
            for i in 0..n {
                let Some((s, p)) = rx_dest[i] else { continue };
                let Some(mem) = guests[s].memory() else {
                    for j in i..n {
                        if rx_dest[j] == Some((s, p)) {
                            rx_dest[j] = None;
                            GuestCounters::add(&guests[s].counters().to_guest_dropped_reset, 1);
                            uplink.to_refill.push(rx_descs[j].0);
                        }
                    }
                    continue;
                };
                let port = &uplink.port;
                let frames = (i..n).filter(|&j| rx_dest[j] == Some((s, p))).map(|j| {
                    let (addr, len) = rx_descs[j];
                    (
                        Source::Umem {
                            uplink: u as u16,
                            addr,
                        },
                        port.frame(addr, len),
                    )
                });
                guests[s].deliver(p, &mem, frames, &mut |src| released.push(src));
                for dest in &mut rx_dest[i..n] {
                    if *dest == Some((s, p)) {
                        *dest = None;
                    }
                }
            }
            if !uplink.to_refill.is_empty() {
                uplink.port.to_guest_release(&uplink.to_refill);
                uplink.to_refill.clear();
            }
        }
        self.release_sources();
        total
    }

    /// Floods the group frames from the wire to every guest of their VLAN, untagged (through
    /// bounce buffers: these are rare); returns how many.
    fn poll_group_inboxes(&mut self) -> usize {
        let mut total = 0;
        for i in 0..self.group_inboxes.len() {
            if !self.group_inboxes[i].has_frames() {
                continue;
            }
            let inbox = Arc::clone(&self.group_inboxes[i]);
            total += inbox.drain(|frame| {
                let Some((vlan, buf)) =
                    vlan::vlan_of(frame).and_then(|vlan| Some((vlan, self.bounce.take()?)))
                else {
                    inbox.count_unusable();
                    return;
                };
                let len = match vlan {
                    0 => {
                        let len = frame.len().min(self.bounce.buf_mut(buf).len());
                        self.bounce.buf_mut(buf)[..len].copy_from_slice(&frame[..len]);
                        len
                    }
                    _ => vlan::copy_untagged(frame, &mut self.bounce.buf_mut(buf)[..]),
                };
                let hash = flow_hash(self.bounce.frame(buf, 0, len));
                self.bounced.push(Bounced {
                    buf,
                    len,
                    from: usize::MAX,
                    dest: Dest::Flood,
                    to_wire: false,
                    hash,
                    vlan,
                });
            });
        }
        if total > 0 {
            self.deliver_bounced();
        }
        total
    }

    /// A burst from each guest TX queue; returns the chains taken.
    fn poll_guests(&mut self) -> usize {
        let mut total = 0;
        for s in 0..self.guests.len() {
            let Some(mem) = self.guests[s].memory() else {
                continue;
            };
            for pair in 0..self.guests[s].pairs() {
                if !self.guests[s].polls_tx(pair) {
                    continue;
                }
                total += self.poll_guest_tx(s, pair, &mem);
                self.deliver_bounced();
            }
        }
        total
    }

    /// Takes up to a burst of chains from TX queue `pair` of guest `s`.
    fn poll_guest_tx(&mut self, s: usize, pair: usize, mem: &Arc<GuestMem>) -> usize {
        let queue_index = 2 * pair + 1;
        if self.guests[s].is_broken(queue_index) {
            return 0;
        }
        let Some(vring) = self.guests[s].tx_vring(pair).cloned() else {
            return 0;
        };
        let mut state = vring.get_mut();
        if !queue::serving(state.get_queue(), state.is_enabled()) {
            return 0;
        }
        self.guests[s].quiet_kicks(queue_index, state.get_queue_mut(), mem);
        // The uplink to the wire, locked at the first frame for it, for the rest of the burst.
        let t = self.tx_uplink();
        let first = self.uplinks.get(t).cloned();
        let mut wire: Option<MutexGuard<'_, Uplink>> = None;
        let counters = self.guests[s].counters_arc();
        let vlan = self.guests[s].device().vlan();
        let mut taken = 0;
        let mut broken = false;
        let mut malformed = 0u32;
        // At most as many as the TX queue's copies to the wire have room for in flight.
        let dma_room = self.guests[s].from_guest_mut(pair).map(|f| f.room());
        let limit = dma_room.map_or(TX_BURST, |room| room.min(TX_BURST));
        let mut chains = [const { None }; TX_BURST];
        let n = match queue::pop_burst(state.get_queue_mut(), &**mem, &mut chains[..limit]) {
            Ok(n) => n,
            Err(queue::Broken) => {
                broken = true;
                0
            }
        };
        // The headers of the whole burst are loaded up front. The CPU copies a linear chain's
        // frame loaded `COPY_AHEAD` chains before; a DMA channel (untagged guests) does not
        // need it in this core's cache.
        let window = !(vlan == 0 && dma_room.is_some());
        let mut linear = [const { None }; TX_BURST];
        // The rings' places, found only when there is a chain (not on every idle poll).
        let ring = (n > 0).then(|| queue::SplitRing::new(state.get_queue(), mem));
        if let Some(ring) = &ring {
            queue::look_ahead(ring, &chains[..n], &mut linear[..n]);
            if window {
                for l in linear[..n.min(COPY_AHEAD)].iter().flatten() {
                    l.prefetch_rest();
                }
            }
        }
        // The burst's frames sent: counted once, at its end.
        let mut sent = Sent::default();
        let mut done = queue::UsedBurst::new(state.get_queue());
        for (i, chain) in chains.iter_mut().enumerate().take(n) {
            let (Some(chain), Some(ring)) = (chain.take(), &ring) else {
                break;
            };
            taken += 1;
            if window && let Some(Some(l)) = linear.get(i + COPY_AHEAD) {
                l.prefetch_rest();
            }
            let head = chain.head_index();
            let flat = linear[i].take();
            let dst = flat
                .as_ref()
                .map_or_else(|| queue::peek_dst(&chain, &**mem), |l| Some(l.dst()));
            let dest = dst.map(|dst| self.fdb.lookup(&dst, vlan));
            let outcome = match dest {
                None => TxChain::Malformed,
                // To itself: nowhere to go.
                Some(Dest::Guest(d)) if d == s => {
                    dropped_judged(chain, MAX_FRAME, mem, &counters.from_guest_no_route)
                }
                Some(Dest::Wire) => {
                    if wire.is_none() {
                        wire = first.as_ref().map(lock_uplink);
                        self.tx_used |= 1u64 << (t % 64);
                    }
                    let uplink = wire.as_deref_mut().map(|u| (t as u16, u));
                    let to = (&*counters, uplink, &mut sent);
                    match self.send_to_wire(s, pair, to, (chain, flat.as_ref()), mem, vlan) {
                        Some(outcome) => outcome,
                        // In flight: its chain is marked used when the copy completed.
                        None => continue,
                    }
                }
                Some(dest) => match self.bounce.take() {
                    None => {
                        dropped_judged(chain, MAX_FRAME, mem, &counters.from_guest_dropped_full)
                    }
                    Some(buf) => {
                        // The largest frame moved, as on the other paths: the buffer's room
                        // beyond it is for a header.
                        let room = &mut self.bounce.buf_mut(buf)[..MAX_FRAME];
                        let mut outcome = match &flat {
                            Some(l) => l.read_into(room),
                            None => queue::read_tx_into(chain, &**mem, room),
                        };
                        if let TxChain::Frame(len) = outcome
                            && vlan::refuses(self.bounce.frame(buf, 0, len), vlan)
                        {
                            // Tagged, from an access port: goes nowhere.
                            GuestCounters::add(&counters.from_guest_no_route, 1);
                            outcome = TxChain::Frame(0);
                            self.bounce.release(buf);
                        } else if let TxChain::Frame(len) = outcome {
                            sent.packets += 1;
                            sent.bytes += len as u64;
                            let hash = flow_hash(self.bounce.frame(buf, 0, len));
                            self.bounced.push(Bounced {
                                buf,
                                len,
                                from: s,
                                dest,
                                to_wire: true,
                                hash,
                                vlan,
                            });
                        } else {
                            self.bounce.release(buf);
                        }
                        outcome
                    }
                },
            };
            match outcome {
                TxChain::Frame(_) => {}
                TxChain::Oversize => GuestCounters::add(&counters.from_guest_oversize, 1),
                TxChain::Malformed => {
                    GuestCounters::add(&counters.malformed_chains, 1);
                    malformed += 1;
                }
            }
            if done.push(ring, head, 0).is_err() {
                // The queue stops (broken) until the driver restarts it: the chains taken
                // but not looked at go back, as if never taken.
                queue::untake(state.get_queue_mut(), n - i - 1);
                broken = true;
                break;
            }
        }
        if !done.is_empty() {
            match done.publish(state.get_queue_mut(), &**mem) {
                Ok(true) => {
                    let _ = state.signal_used_queue();
                }
                Ok(false) => {}
                // The driver's wishes could not be read: it is told, and the queue stops.
                Err(queue::Broken) => {
                    let _ = state.signal_used_queue();
                    broken = true;
                }
            }
            self.guests[s]
                .device()
                .dirty()
                .mark_used_ring(state.get_queue());
        }
        drop(state);
        sent.add_to(&counters);
        if let Some(from_guest) = self.guests[s].from_guest_mut(pair) {
            from_guest.flush();
        }
        if malformed > 0 {
            self.guests[s].log_malformed("malformed TX descriptor chain", queue_index);
        }
        if broken {
            self.guests[s].break_queue(queue_index);
        }
        taken
    }

    /// Copies a guest's chain into a frame of the first uplink and queues it (one copy),
    /// tagged for `vlan` unless 0: now on the CPU, or (an untagged guest's) through TX queue
    /// `pair`'s copy engine when it has a DMA channel (then `None`: the chain is marked used,
    /// and the frame queued, when the copy completed).
    fn send_to_wire<M>(
        &mut self,
        s: usize,
        pair: usize,
        (counters, uplink, sent): (&GuestCounters, Option<(u16, &mut Uplink)>, &mut Sent),
        (chain, flat): (virtio_queue::DescriptorChain<M>, Option<&Linear<'_, ()>>),
        mem: &Arc<GuestMem>,
        vlan: u16,
    ) -> Option<TxChain>
    where
        M: std::ops::Deref<Target = GuestMem>,
    {
        let Some((t, uplink)) = uplink else {
            // No interface: nowhere to go.
            return Some(dropped_judged(
                chain,
                MAX_FRAME,
                mem,
                &counters.from_guest_no_route,
            ));
        };
        let Some(base) = uplink.port.from_guest_alloc() else {
            // Judged against the room it would have had: a frame, less a tag to add.
            let room = uplink.port.frame_room() - if vlan == 0 { 0 } else { vlan::TAG_LEN };
            return Some(dropped_judged(
                chain,
                room,
                mem,
                &counters.from_guest_dropped_full,
            ));
        };
        // A VLAN guest's frame is tagged in its UMEM frame after the copy: the CPU's.
        if vlan == 0
            && let Some(from_guest) = self.guests[s].from_guest_mut(pair)
        {
            return match from_guest.send(chain, mem, (t, base, uplink.port.frame_mut(base))) {
                Taken::InFlight => None,
                Taken::Done(outcome) => {
                    uplink.port.from_guest_free(base);
                    if let TxChain::Frame(_) = outcome {
                        // The engine had no room after all: not sent.
                        GuestCounters::add(&counters.from_guest_dropped_full, 1);
                    }
                    Some(outcome)
                }
            };
        }
        let frame = uplink.port.frame_mut(base);
        let read = match flat {
            Some(l) if vlan == 0 => Ok(l.read_into(frame)),
            _ => vlan::read_tx_for_wire(chain, &**mem, frame, vlan),
        };
        let Ok(outcome) = read else {
            // Tagged, from an access port: goes nowhere.
            uplink.port.from_guest_free(base);
            GuestCounters::add(&counters.from_guest_no_route, 1);
            return Some(TxChain::Frame(0));
        };
        match outcome {
            TxChain::Frame(len) => {
                if uplink.port.from_guest_push(base, len as u32) {
                    sent.packets += 1;
                    sent.bytes += len as u64;
                } else {
                    // The tx ring and the stage are full even after a flush.
                    uplink.port.from_guest_free(base);
                    GuestCounters::add(&counters.from_guest_dropped_full, 1);
                }
            }
            _ => uplink.port.from_guest_free(base),
        }
        Some(outcome)
    }

    /// The second copy of the frames waiting in bounce buffers: for each receiving guest and
    /// RX queue, all its frames of the burst under one vring lock, in the order they came.
    fn deliver_bounced(&mut self) {
        if self.bounced.is_empty() {
            return;
        }
        let t = self.tx_uplink();
        let Worker {
            guests,
            uplinks,
            tx_used,
            bounce,
            bounced,
            bounced_pair,
            released,
            ..
        } = self;
        let mut wire = Wire::new(uplinks, tx_used);
        // Each receiver of a flooded frame (the guests of its VLAN) holds a share of its
        // buffer; the wire gets a copy.
        for b in bounced.iter().filter(|b| b.dest == Dest::Flood) {
            for _ in
                (0..guests.len()).filter(|&d| d != b.from && guests[d].device().vlan() == b.vlan)
            {
                bounce.share(b.buf);
            }
            if b.to_wire {
                flood_to_wire(wire.get(t), bounce.frame(b.buf, 0, b.len), b.vlan);
            }
        }
        drop(wire);
        for (d, slot) in guests.iter_mut().enumerate() {
            let vlan_d = slot.device().vlan();
            let goes_to_d = |b: &Bounced| match b.dest {
                Dest::Guest(g) => g == d,
                Dest::Flood => b.from != d && b.vlan == vlan_d,
                Dest::Wire => false,
            };
            if !bounced.iter().any(goes_to_d) {
                continue;
            }
            let mem = slot.memory();
            bounced_pair.clear();
            bounced_pair.extend(bounced.iter().map(|b| {
                (goes_to_d(b) && mem.is_some())
                    .then(|| slot.rx_pair_for(b.hash))
                    .flatten()
            }));
            if let Some(mem) = mem.as_ref() {
                for pair in 0..slot.pairs() {
                    if !bounced_pair.contains(&Some(pair)) {
                        continue;
                    }
                    let frames = bounced
                        .iter()
                        .zip(bounced_pair.iter())
                        .filter(|(_, p)| **p == Some(pair))
                        .map(|(b, _)| (Source::Bounce(b.buf), bounce.frame(b.buf, 0, b.len)));
                    slot.deliver(pair, mem, frames, &mut |src| released.push(src));
                }
            }
            // No ready RX queue (or no memory yet): dropped.
            for (b, pair) in bounced.iter().zip(bounced_pair.iter()) {
                if goes_to_d(b) && pair.is_none() {
                    GuestCounters::add(&slot.counters().to_guest_dropped_reset, 1);
                    released.push(Source::Bounce(b.buf));
                }
            }
        }
        // The sender's own reference of a flooded frame's buffer (a unicast frame's went
        // with its one copy).
        for b in bounced.iter().filter(|b| b.dest == Dest::Flood) {
            bounce.release(b.buf);
        }
        bounced.clear();
        self.release_sources();
    }

    /// Completes finished copies; returns how many frames are still in flight.
    fn complete_copies(&mut self) -> usize {
        let Worker {
            guests,
            released,
            uplinks,
            tx_used,
            ..
        } = self;
        let mut wire = Wire::new(uplinks, tx_used);
        let mut inflight = 0;
        for slot in guests.iter_mut() {
            inflight += slot.complete(&mut |s| released.push(s));
            inflight += slot.complete_from_guest(&mut |o, stale| wire.transmit(o, stale));
        }
        drop(wire);
        let done = !self.released.is_empty();
        self.release_sources();
        // Copies in flight are work: keep polling them rather than park.
        usize::from(done) + inflight
    }

    /// Hands back the sources of finished frames: bounce buffers to the pool, UMEM frames to
    /// their uplink's fill ring (in batches).
    fn release_sources(&mut self) {
        for src in self.released.drain(..) {
            match src {
                Source::Bounce(id) if self.bounce.owns(id) => self.bounce.release(id),
                // Another worker's buffer (a copy of its frame this worker completed).
                Source::Bounce(id) => {
                    if let Some(list) = self.foreign.get_mut(id as usize / BOUNCE_BUFFERS) {
                        list.push(src);
                    }
                }
                Source::Umem { uplink, addr } => {
                    if let Some(list) = self.refill.get_mut(usize::from(uplink)) {
                        list.push(addr);
                    }
                }
            }
        }
        for (u, list) in self.refill.iter_mut().enumerate() {
            if !list.is_empty() {
                lock_uplink(&self.uplinks[u]).port.to_guest_release(list);
                list.clear();
            }
        }
        for (w, list) in self.foreign.iter_mut().enumerate() {
            if !list.is_empty()
                && let Some(peer) = self.peers.get(w)
            {
                peer.give(list.drain(..));
            }
        }
    }

    /// Flushes the uplinks it receives from and those it sent on. An uplink whose frames wait
    /// for ring room, or sit in its tx ring unsent, stays on the list: in copy mode the kernel
    /// transmits only inside the worker's `sendto`, a budget of frames at a time, so a ring
    /// left holding frames when the guests go quiet would otherwise wait for the worker's
    /// next wake-up. Returns 1 while such a flush still moves frames (the worker keeps
    /// polling until the ring is empty), else 0 (frames that do not move, on an interface
    /// that is down, say, are looked at again from a short park).
    fn flush_uplinks(&mut self) -> usize {
        let sent = self.tx_used;
        self.tx_used = 0;
        let mut moving = 0;
        for (u, uplink) in self.uplinks.iter().enumerate() {
            if self.polled.contains(&u) || sent & (1u64 << (u % 64)) != 0 {
                let mut uplink = lock_uplink(uplink);
                let before = uplink.port.tx_unsent() as usize;
                let inserted = uplink.port.flush();
                let unsent = uplink.port.tx_unsent() as usize;
                if uplink.port.frame_counts().staged > 0 || unsent > 0 {
                    self.tx_used |= 1u64 << (u % 64);
                }
                if unsent > 0 && before + inserted > unsent {
                    moving = 1;
                }
            }
        }
        moving
    }

    fn publish(&mut self) {
        for slot in &self.guests {
            slot.device()
                .publish_copy_stats(self.index, slot.copy_stats());
        }
        for &u in &self.polled {
            lock_uplink(&self.uplinks[u]).publish();
        }
        self.last_publish = Instant::now();
    }

    /// Sleeps until a socket has frames, a guest kicks, a copy completes, a command comes, or
    /// [`PARK_MAX`] passes.
    fn park(&mut self) {
        self.publish();
        self.shared.sleeping.store(true, Ordering::SeqCst);
        // The flag before the stores that ask for kicks (a weakly ordered CPU could show a
        // guest those first, and its kick then find the worker awake).
        std::sync::atomic::fence(Ordering::SeqCst);
        // The last look, after saying we sleep: a kick from here on writes the eventfd.
        let mut more = false;
        for slot in &mut self.guests {
            more |= slot.want_kicks();
            slot.clear_idle_notifications();
        }
        // A group frame handed over before the flag was up: its sender found the worker
        // awake and wrote nothing.
        more |= self.group_inboxes.iter().any(|i| i.has_frames());
        if !more {
            // Copies in flight on a channel without a completion fd, or frames accepted for
            // transmit that wait for room in a full tx ring (the kernel frees it, and says
            // nothing): look again soon.
            let inflight = self.guests.iter().any(|g| g.has_inflight()) || self.tx_used != 0;
            let mut fds: Vec<PollFd<'_>> = Vec::with_capacity(1 + self.poll_fds.len());
            fds.push(PollFd::new(self.shared.wake.as_fd(), PollFlags::POLLIN));
            for fd in &self.poll_fds {
                fds.push(PollFd::new(fd.as_fd(), PollFlags::POLLIN));
            }
            let completion: Vec<BorrowedFd<'_>> = self
                .guests
                .iter()
                .flat_map(|g| g.completion_fds())
                .collect();
            for fd in completion {
                fds.push(PollFd::new(fd, PollFlags::POLLIN));
            }
            let timeout = if inflight {
                Duration::from_millis(1)
            } else {
                PARK_MAX
            };
            let _ = poll(
                &mut fds,
                PollTimeout::try_from(timeout).unwrap_or(PollTimeout::MAX),
            );
        }
        self.shared.sleeping.store(false, Ordering::SeqCst);
        let _ = self.shared.wake.read();
    }
}

/// Copies a flooded frame into a frame of `uplink` (tagged for `vlan` unless 0) and queues it
/// for transmit (best effort: without a free frame or ring room, or longer than a frame, the
/// wire misses it, counted on the port; the guests got it).
fn flood_to_wire(uplink: Option<&mut Uplink>, frame: &[u8], vlan: u16) {
    let Some(uplink) = uplink else { return };
    let Some(base) = uplink.port.from_guest_alloc() else {
        return;
    };
    let Some(len) = vlan::copy_for_wire(frame, uplink.port.frame_mut(base), vlan) else {
        uplink.port.from_guest_free(base);
        uplink.port.count_oversize();
        return;
    };
    if !uplink.port.from_guest_push(base, len as u32) {
        uplink.port.from_guest_free(base);
    }
}

/// Takes the 802.1Q tag out of received frame (`addr`, `len`) of `port` where it lies, for a
/// guest on a VLAN; returns where the untagged frame is (the same frame when it has no tag).
fn untag_received(port: &mut XskPort, addr: u64, len: u32) -> (u64, u32) {
    let frame = port.frame_received_mut(addr, len);
    let len = frame.len() as u32;
    match vlan::strip_in_place(frame) {
        Some(off) => (addr + off as u64, len - off as u32),
        None => (addr, len),
    }
}

/// A flow's hash, to spread a guest's frames over its RX queues: the IPv4 or IPv6 addresses
/// and (TCP/UDP) ports when there are any, else the MACs.
pub fn flow_hash(frame: &[u8]) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    let mut mix = |bytes: &[u8]| {
        for &b in bytes {
            h = (h ^ u32::from(b)).wrapping_mul(0x0100_0193);
        }
    };
    let ethertype = frame.get(12..14).map(|t| u16::from_be_bytes([t[0], t[1]]));
    match ethertype {
        Some(0x0800) if frame.len() >= 34 => {
            let ihl = usize::from(frame[14] & 0x0f) * 4;
            mix(&frame[26..34]);
            if matches!(frame[23], 6 | 17)
                && let Some(ports) = frame.get(14 + ihl..18 + ihl)
            {
                mix(ports);
            }
        }
        Some(0x86dd) if frame.len() >= 54 => {
            mix(&frame[22..54]);
            if matches!(frame[20], 6 | 17)
                && let Some(ports) = frame.get(54..58)
            {
                mix(ports);
            }
        }
        _ => mix(frame.get(..12).unwrap_or(frame)),
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_group_frame_handed_over_before_the_worker_parks_keeps_it_awake() {
        let (mut worker, _link) = Worker::new("test").unwrap();
        let inbox = Arc::new(Inbox::default());
        worker.group_inboxes.push(Arc::clone(&inbox));
        // The tap pushed it while the worker was still up: its kick wrote nothing.
        assert!(inbox.push(&[0xff; 60]));
        let start = Instant::now();
        worker.park();
        assert!(
            start.elapsed() < PARK_MAX / 2,
            "the worker looked at its inboxes before sleeping ({:?})",
            start.elapsed()
        );
    }
}
