//! A guest's vhost-user-net device as vhost-user-backend sees it: features, config space,
//! memory and vrings. It moves no frames: the datapath worker that owns the guest does. The
//! library's event thread only tells that worker what changed (a vring started, the memory
//! table, a stop or reset) through its command queue, and wakes it on kicks while it sleeps.
//!
//! Stops and resets are synchronous: `stop_vring` (GET_VRING_BASE) and `reset_device` return
//! only once the worker has let go of the queue and completed or dropped every copy in flight
//! into it, as DPDK's `rte_vhost_clear_queue` and vhost-user-backend's `stop_vring` contract
//! ask; the frontend reads the queue's position only after that.
//!
//! The worker gets the guest's vrings once per connection, as soon as the connection starts:
//! the serving thread registers [`GuestDevice::announce_fd`] on the library's event thread
//! and writes it, and the library hands the device its vrings with that event. (Waiting for
//! the library's "queue started" events instead leaves a window in which a started queue is
//! unknown to the worker.) The worker checks on every burst whether a queue is ready and
//! enabled before it touches it.
//!
//! Event ids: the library runs one event thread per guest (all its queues), so a kick's id is
//! its queue index; `num_queues` is the library's own (vring-enabled events); `num_queues +
//! 1` is the announcement; `num_queues + 2` the exit event. The device hands the library no
//! exit event of its own: vhost-user-backend 0.24 turns the consumer it is given into a raw
//! fd for its epoll and never closes it (one leaked eventfd per connection). The serving
//! thread registers the device's exit eventfd instead, and `handle_event` returns an error on
//! it, which ends the library's event loop.
//!
//! A new memory table is mapped ahead, off the datapath (see [`crate::vhost::populate`]):
//! each table starts a thread that maps the pages it has and stops when the table is
//! replaced or the guest gone; `--lazy-guest-memory` leaves pages to be mapped on first touch.

use std::{
    io,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
};

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VringRwLock};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use vmm_sys_util::{
    epoll::EventSet,
    event::{EventConsumer, EventNotifier},
    eventfd::{EFD_NONBLOCK, EventFd},
};

use super::{
    counters::GuestCounters,
    worker::{Command, WorkerLink},
};
use crate::{
    config::MacAddr,
    copy::CopyStats,
    vhost::{
        dirty::{self, DirtyPages, Memory},
        net::{self, QUEUE_SIZE},
        populate::{self, Populated},
    },
};

/// The vring type the datapath works with.
pub type Vring = VringRwLock<Memory>;

/// A guest's id, unique in the daemon.
pub type GuestId = u32;

/// One guest's device.
pub struct GuestDevice {
    id: GuestId,
    name: String,
    mac: MacAddr,
    vlan: u16,
    queue_pairs: u16,
    counters: Arc<GuestCounters>,
    dirty: Arc<DirtyPages>,
    acked_features: AtomicU64,
    event_idx: AtomicBool,
    /// Written once per connection to have the library hand over the vrings.
    announce: EventFd,
    /// Each worker (bit by index) has the memory and an RX queue ready: frames for the guest
    /// are delivered once all have.
    ready: AtomicU64,
    /// The current connection's exit event (see the module doc).
    exit: Mutex<EventFd>,
    /// Every worker (each has a slot for the guest).
    links: Vec<WorkerLink>,
    /// The worker that polls each TX queue pair.
    tx_owner: Vec<usize>,
    /// The copy engines' counters, as each worker last published them.
    copy_stats: Mutex<Vec<CopyStats>>,
    /// Whether each memory table is mapped ahead (not `--lazy-guest-memory`).
    map_ahead: bool,
    /// Counts memory tables and resets: a thread mapping a table goes on only while this is
    /// still the value it started with.
    memory_generation: Arc<AtomicU64>,
}

impl Drop for GuestDevice {
    fn drop(&mut self) {
        // A thread still mapping the guest's memory stops at its next chunk.
        self.memory_generation.fetch_add(1, Ordering::AcqRel);
    }
}

impl std::fmt::Debug for GuestDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuestDevice")
            .field("id", &self.id)
            .field("name", &self.name)
            .field("mac", &self.mac)
            .field("vlan", &self.vlan)
            .finish()
    }
}

impl GuestDevice {
    /// A device for guest `id` with `mac` on `vlan` (0: untagged), served by the one worker
    /// behind `link`.
    #[cfg(test)]
    pub(crate) fn new(
        id: GuestId,
        name: &str,
        (mac, vlan): (MacAddr, u16),
        queue_pairs: u16,
        link: WorkerLink,
    ) -> io::Result<GuestDevice> {
        let pairs = usize::from(queue_pairs.max(1));
        GuestDevice::on_workers(
            id,
            name,
            (mac, vlan),
            queue_pairs,
            vec![link],
            vec![0; pairs],
        )
    }

    /// As [`GuestDevice::new`], served by the workers behind `links`, TX queue pair `p` by
    /// worker `tx_owner[p]`.
    pub(crate) fn on_workers(
        id: GuestId,
        name: &str,
        (mac, vlan): (MacAddr, u16),
        queue_pairs: u16,
        links: Vec<WorkerLink>,
        tx_owner: Vec<usize>,
    ) -> io::Result<GuestDevice> {
        let workers = links.len();
        let device = GuestDevice {
            id,
            name: name.to_owned(),
            mac,
            vlan,
            queue_pairs: queue_pairs.max(1),
            counters: Arc::default(),
            dirty: Arc::default(),
            acked_features: AtomicU64::new(0),
            event_idx: AtomicBool::new(false),
            announce: EventFd::new(EFD_NONBLOCK)?,
            ready: AtomicU64::new(0),
            exit: Mutex::new(EventFd::new(EFD_NONBLOCK)?),
            links,
            tx_owner,
            copy_stats: Mutex::new(vec![CopyStats::default(); workers]),
            map_ahead: true,
            memory_generation: Arc::default(),
        };
        device.new_connection()?;
        Ok(device)
    }

    /// Whether each new memory table is mapped ahead, off the datapath (true unless
    /// `--lazy-guest-memory`).
    pub fn set_map_ahead(&mut self, on: bool) {
        self.map_ahead = on;
    }

    /// Starts a thread that maps the pages `mem` has into the process (see
    /// [`crate::vhost::populate`]), unless `--lazy-guest-memory`; it stops when the memory is
    /// replaced or the guest gone (disconnected, reset, removed).
    fn map_ahead(&self, mem: &Memory) {
        use vm_memory::GuestAddressSpace;
        let generation = self.memory_generation.fetch_add(1, Ordering::AcqRel) + 1;
        if !self.map_ahead {
            return;
        }
        // The snapshot keeps the regions mapped while the thread works on them.
        let snapshot = mem.memory().into_inner();
        let current = Arc::clone(&self.memory_generation);
        let guest = self.name.clone();
        let started = std::thread::Builder::new()
            .name("xvio-map-guest".to_owned())
            .spawn(move || {
                // Off the workers' CPUs (the serving thread this comes from may be on them).
                // At the default priority, done as soon as it can be: at nice 19, yielding
                // between chunks, it stayed at work for seconds among the guests' threads and
                // the pings' p99 rose (1.3-2.3 ms against 0.23-0.61 ms, three runs each).
                if let Err(e) = super::stay_off() {
                    tracing::warn!(%guest, error = %e, "the thread that maps guest memory could not be kept off the datapath CPUs");
                }
                let is_current = || current.load(Ordering::Acquire) == generation;
                // The pages the guest has, again after each pause: a guest keeps touching its
                // memory after it shares it (testpmd fills its mempools after SET_MEM_TABLE).
                let mut map = populate::MapAhead::default();
                for (pass, pause) in populate::PASSES.iter().enumerate() {
                    if !populate::wait_while(*pause, is_current) {
                        return;
                    }
                    match map.pass(&snapshot, populate::CHUNK, is_current) {
                        Populated::Done {
                            bytes,
                            took,
                            refused,
                        } => {
                            let (mib, ms) = (bytes >> 20, took.as_millis() as u64);
                            if pass == 0 {
                                tracing::info!(%guest, mib, ms, "guest memory mapped ahead");
                            } else {
                                tracing::debug!(%guest, mib, ms, pass, "guest memory mapped ahead again");
                            }
                            if let Some((skipped, error)) = refused {
                                tracing::warn!(
                                    %guest,
                                    mib = skipped.div_ceil(1 << 20),
                                    %error,
                                    "part of the guest's memory could not be mapped ahead \
                                     (madvise MADV_POPULATE_READ): it is mapped as the \
                                     datapath first touches it"
                                );
                                return;
                            }
                        }
                        Populated::Superseded { bytes } => {
                            tracing::debug!(
                                %guest,
                                mib = bytes >> 20,
                                "guest memory replaced, or the guest gone, while it was being mapped"
                            );
                            return;
                        }
                        Populated::Unsupported => {
                            static SAID: AtomicBool = AtomicBool::new(false);
                            if !SAID.swap(true, Ordering::Relaxed) {
                                tracing::info!(
                                    "the kernel cannot map memory ahead (MADV_POPULATE_READ \
                                     needs Linux 5.14): guest pages are mapped as the datapath \
                                     first touches them, a page fault each"
                                );
                            }
                            return;
                        }
                    }
                }
            });
        if let Err(e) = started {
            tracing::warn!(guest = %self.name, error = %e, "starting the thread that maps guest memory ahead");
        }
    }

    /// Its id.
    pub fn id(&self) -> GuestId {
        self.id
    }

    /// Its name (the socket path), for logs.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its MAC.
    pub fn mac(&self) -> MacAddr {
        self.mac
    }

    /// Its 802.1Q VLAN, 0 when untagged (see `datapath::vlan`).
    pub fn vlan(&self) -> u16 {
        self.vlan
    }

    /// Its queue pairs.
    pub fn queue_pairs(&self) -> u16 {
        self.queue_pairs
    }

    /// Its counters.
    pub fn counters(&self) -> &GuestCounters {
        &self.counters
    }

    /// Its counters, shared with the worker.
    pub(crate) fn counters_arc(&self) -> Arc<GuestCounters> {
        Arc::clone(&self.counters)
    }

    /// The pages the datapath writes, for the dirty log (installed by the control shim).
    pub fn dirty(&self) -> Arc<DirtyPages> {
        Arc::clone(&self.dirty)
    }

    /// The copy engines' counters (as of the workers' last publications), summed.
    pub fn copy_stats(&self) -> CopyStats {
        let Ok(all) = self.copy_stats.lock() else {
            return CopyStats::default();
        };
        all.iter().copied().sum()
    }

    /// Worker `worker`'s copy counters for this guest.
    pub(crate) fn publish_copy_stats(&self, worker: usize, stats: CopyStats) {
        if let Ok(mut all) = self.copy_stats.lock()
            && let Some(slot) = all.get_mut(worker)
        {
            *slot = stats;
        }
    }

    /// Sends `command` to every worker, and waits for each to confirm; false if one did not
    /// in time.
    fn call_all(&self, make: impl Fn(std::sync::mpsc::SyncSender<()>) -> Command) -> bool {
        // Every worker is asked, even after one did not answer.
        self.links
            .iter()
            .map(|link| link.call(&make))
            .filter(|confirmed| !confirmed)
            .count()
            == 0
    }

    /// Whether the datapath delivers frames to the guest now: it has the guest's memory and
    /// at least one RX queue the frontend started (until then frames for it are dropped and
    /// counted, as a NIC whose driver is not up drops them).
    pub fn is_ready(&self) -> bool {
        let all = u64::MAX >> (64 - self.links.len().clamp(1, 64));
        self.ready.load(Ordering::Relaxed) & all == all
    }

    /// Worker `worker` says whether it has the memory and an RX queue ready.
    pub(crate) fn set_ready(&self, worker: usize, ready: bool) {
        let bit = 1u64 << (worker % 64);
        let now = self.ready.load(Ordering::Relaxed);
        if (now & bit != 0) != ready {
            if ready {
                self.ready.fetch_or(bit, Ordering::Relaxed);
            } else {
                self.ready.fetch_and(!bit, Ordering::Relaxed);
            }
        }
    }

    /// Whether MRG_RXBUF was negotiated.
    pub(crate) fn mrg_rxbuf(&self) -> bool {
        net::mrg_rxbuf(self.acked_features.load(Ordering::Relaxed))
    }

    /// Whether EVENT_IDX was negotiated.
    pub(crate) fn event_idx(&self) -> bool {
        self.event_idx.load(Ordering::Relaxed)
    }

    /// A fresh exit event for the next connection's event thread (the last one's was used
    /// up telling it to stop); replacing it closes the old one.
    pub fn new_connection(&self) -> io::Result<()> {
        *self.exit.lock().unwrap_or_else(|e| e.into_inner()) = EventFd::new(EFD_NONBLOCK)?;
        Ok(())
    }

    /// Stops the event thread of the current connection.
    pub fn stop_workers(&self) {
        let _ = self.exit.lock().unwrap_or_else(|e| e.into_inner()).write(1);
    }

    /// The exit event's id on the library's event thread.
    pub fn exit_event_id(&self) -> u16 {
        2 * self.queue_pairs + 2
    }

    /// The current connection's exit eventfd, to register with [`Self::exit_event_id`].
    pub fn exit_fd(&self) -> std::os::fd::RawFd {
        use std::os::fd::AsRawFd;
        self.exit
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_raw_fd()
    }

    /// The connection ended (its event thread has stopped): the worker lets go of the vrings
    /// and the guest's memory (a whole VM's RAM, released now rather than when the next
    /// frontend sets its table), after completing or dropping what it had in flight.
    pub fn end_connection(&self) {
        // Memory still being mapped is no longer the guest's.
        self.memory_generation.fetch_add(1, Ordering::AcqRel);
        let id = self.id;
        if !self.call_all(|ack| Command::Disconnect { id, ack }) {
            tracing::warn!(guest = %self.name, "the datapath did not confirm the disconnect in time");
        }
        self.forget_features();
    }

    fn forget_features(&self) {
        self.acked_features.store(0, Ordering::Relaxed);
        self.event_idx.store(false, Ordering::Relaxed);
        self.dirty.set_logging(false);
        self.dirty.set_log(None);
    }

    /// The event id of the announcement on the library's event thread.
    pub fn announce_event(&self) -> u16 {
        2 * self.queue_pairs + 1
    }

    /// The announcement's eventfd: register it on the connection's event thread with
    /// [`Self::announce_event`], then call [`Self::announce`].
    pub fn announce_fd(&self) -> std::os::fd::RawFd {
        use std::os::fd::AsRawFd;
        self.announce.as_raw_fd()
    }

    /// Asks the library's event thread to hand the vrings over.
    pub fn announce(&self) -> io::Result<()> {
        self.announce.write(1)
    }
}

impl VhostUserBackend for GuestDevice {
    type Bitmap = ();
    type Vring = Vring;

    fn num_queues(&self) -> usize {
        2 * usize::from(self.queue_pairs)
    }

    fn max_queue_size(&self) -> usize {
        usize::from(QUEUE_SIZE)
    }

    fn features(&self) -> u64 {
        net::features(self.queue_pairs)
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
            | VhostUserVirtioFeatures::LOG_ALL.bits()
    }

    fn acked_features(&self, features: u64) {
        if features & (1 << VIRTIO_F_VERSION_1) == 0 {
            tracing::warn!(guest = %self.name, "the frontend did not accept VIRTIO_F_VERSION_1; legacy virtio-net headers are not supported");
        }
        self.acked_features.store(features, Ordering::Relaxed);
        self.dirty.set_logging(dirty::log_all(features));
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::LOG_SHMFD
    }

    fn reset_device(&self) {
        // A table still being mapped is no longer the guest's.
        self.memory_generation.fetch_add(1, Ordering::AcqRel);
        let id = self.id;
        if !self.call_all(|ack| Command::Reset { id, ack }) {
            tracing::warn!(guest = %self.name, "the datapath did not confirm the reset in time");
        }
        self.forget_features();
    }

    fn set_event_idx(&self, enabled: bool) {
        self.event_idx.store(enabled, Ordering::Relaxed);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        // vhost-user carries at most 256 bytes of config; never allocate what a frontend asks.
        let size = size.min(256);
        let config = net::config_space(self.mac.0, self.queue_pairs);
        let start = (offset as usize).min(config.len());
        let end = start.saturating_add(size as usize).min(config.len());
        let mut out = config[start..end].to_vec();
        out.resize(size as usize, 0);
        out
    }

    fn update_memory(&self, mem: Memory) -> io::Result<()> {
        self.map_ahead(&mem);
        // In-flight copies hold the snapshot they write into, so nothing waits here.
        for link in &self.links {
            link.send(Command::Memory {
                id: self.id,
                mem: mem.clone(),
            });
        }
        Ok(())
    }

    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        let (id, queue) = (self.id, queue_index as u16);
        if !self.call_all(|ack| Command::StopVring { id, queue, ack }) {
            tracing::warn!(guest = %self.name, queue, "the datapath did not confirm the queue stop in time");
        }
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        vec![(1u64 << self.num_queues()) - 1]
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        // See the module doc: the serving thread registers the exit event itself.
        None
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[Vring],
        _thread_id: usize,
    ) -> io::Result<()> {
        if !evset.contains(EventSet::IN) {
            return Ok(());
        }
        if device_event == self.exit_event_id() {
            // An error is what ends the library's event loop when it has no exit event.
            return Err(io::Error::other(
                "the connection ended; the event thread stops",
            ));
        }
        if device_event == self.announce_event() {
            let _ = self.announce.read();
            for link in &self.links {
                link.send(Command::Vrings {
                    id: self.id,
                    vrings: vrings.to_vec(),
                });
            }
        } else if usize::from(device_event) < self.num_queues() {
            // A kick (or the library's "queue started"): the worker that polls the TX queue
            // (any, for an RX queue), if it sleeps; a running worker polls.
            let owner = (device_event % 2 == 1)
                .then(|| self.tx_owner.get(usize::from(device_event / 2)))
                .flatten();
            match owner.and_then(|&w| self.links.get(w)) {
                Some(link) => link.kick(),
                None => self.links.iter().for_each(WorkerLink::kick),
            }
        }
        Ok(())
    }
}
