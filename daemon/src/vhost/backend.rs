//! The vhost-user-net backend of one guest, on vhost-user-backend's epoll workers: one
//! worker thread per queue pair; the guest's mailbox wakes the worker of pair 0, which
//! writes frames from other guests into RX queue 0.
//!
//! vhost-user-backend hands a `VhostUserBackendMut` to its workers behind one lock, so a
//! guest's queue pairs take turns (a version implementing the shared `VhostUserBackend` was
//! tried and reverted: a QEMU guest once lost its RX path under load with it, not understood).
//!
//! Event ids on a worker's epoll: `0` and `1` are the kicks of its pair's RX and TX vrings
//! (vhost-user-backend numbers a kick by the vring's place among the worker's vrings, not by
//! queue index), `num_queues` is the library's (vring-enabled events),
//! [`mailbox_event`] the mailbox and [`completion_event`] the RX copy channel's completions
//! (both on pair 0's worker), [`exit_event_id`] the worker's exit event (on every worker).

use std::{
    io,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost_user_backend::{VhostUserBackendMut, VringRwLock, VringT};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use vm_memory::GuestAddressSpace;
use vmm_sys_util::{
    epoll::EventSet,
    event::{EventConsumer, EventFlag, EventNotifier, new_event_consumer_and_notifier},
};

use super::{
    dirty::{self, DirtyPages, GuestMem, Memory},
    net::{self, QUEUE_SIZE},
    queue::{self, RxWrite, TX_BUF, TxChain},
    rx_dma::RxDma,
    switch::{GuestCounters, Port, Switch},
};

/// The vring type the backend works with.
pub type Vring = VringRwLock<Memory>;

/// The mailbox's event id (`num_queues + 1` for the backend's queue count).
pub fn mailbox_event(num_queues: usize) -> u16 {
    num_queues as u16 + 1
}

/// The RX copy channel's completion event id.
pub fn completion_event(num_queues: usize) -> u16 {
    num_queues as u16 + 2
}

/// A worker's exit event id. The backend registers its exit events itself rather than
/// handing them to the library through `exit_event`: vhost-user-backend 0.24 turns the
/// consumer it gets into a raw fd and never closes it, one leaked descriptor per worker per
/// connection.
pub fn exit_event_id(num_queues: usize) -> u16 {
    num_queues as u16 + 3
}

/// How often a malformed chain is logged at most, per guest.
const LOG_EVERY: Duration = Duration::from_secs(5);

/// One guest's backend.
pub struct NetBackend {
    name: String,
    port: Arc<Port>,
    switch: Arc<Switch>,
    queue_pairs: u16,
    acked_features: u64,
    event_idx: bool,
    mem: Option<Memory>,
    exits: Vec<(EventConsumer, EventNotifier)>,
    tx_buf: Vec<Box<[u8; TX_BUF]>>,
    broken: Vec<bool>,
    last_log: Option<Instant>,
    /// RX copies through a DMA channel, when one is bound (else the CPU copies).
    rx_dma: Option<Mutex<RxDma>>,
    /// RX queue 0, kept to complete in-flight copies when memory changes.
    rx_vring: Option<Vring>,
    /// Marks the pages DMA copies write while the frontend logs dirty pages.
    dirty: Arc<DirtyPages>,
}

impl std::fmt::Debug for NetBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NetBackend")
            .field("name", &self.name)
            .field("queue_pairs", &self.queue_pairs)
            .finish()
    }
}

impl NetBackend {
    /// A backend for the guest on switch port `port`, with `queue_pairs` queue pairs.
    pub fn new(
        name: &str,
        port: Arc<Port>,
        switch: Arc<Switch>,
        queue_pairs: u16,
        rx_channel: Option<crate::copy::BoundChannel>,
    ) -> io::Result<NetBackend> {
        let dirty = Arc::new(DirtyPages::default());
        let mut backend = NetBackend {
            rx_dma: rx_channel.map(|c| Mutex::new(RxDma::new(c, Arc::clone(&dirty)))),
            dirty,
            rx_vring: None,
            name: name.to_owned(),
            port,
            switch,
            queue_pairs: queue_pairs.max(1),
            acked_features: 0,
            event_idx: false,
            mem: None,
            exits: Vec::new(),
            tx_buf: (0..queue_pairs.max(1))
                .map(|_| Box::new([0u8; TX_BUF]))
                .collect(),
            broken: vec![false; 2 * usize::from(queue_pairs.max(1))],
            last_log: None,
        };
        backend.new_connection()?;
        Ok(backend)
    }

    /// Fresh exit events for the worker threads of the next connection (the last
    /// connection's were used up telling its workers to stop).
    pub fn new_connection(&mut self) -> io::Result<()> {
        self.exits = (0..self.queue_pairs)
            .map(|_| new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC))
            .collect::<io::Result<_>>()?;
        self.broken.fill(false);
        Ok(())
    }

    /// The exit event of the current connection's worker `thread`, to register under
    /// [`exit_event_id`] on its epoll.
    pub fn exit_fd(&self, thread: usize) -> Option<std::os::fd::RawFd> {
        use std::os::fd::AsRawFd;
        self.exits
            .get(thread)
            .map(|(consumer, _)| consumer.as_raw_fd())
    }

    /// Stops the worker threads of the current connection.
    pub fn stop_workers(&self) {
        for (_, notifier) in &self.exits {
            let _ = notifier.notify();
        }
    }

    /// The dirty-page log marks go to (installed by the control-socket shim).
    pub fn dirty(&self) -> Arc<DirtyPages> {
        Arc::clone(&self.dirty)
    }

    /// The switch port.
    pub fn port(&self) -> &Arc<Port> {
        &self.port
    }

    fn counters(&self) -> &GuestCounters {
        self.port.counters()
    }

    fn malformed(&mut self, what: &str, queue: usize) {
        GuestCounters::add(&self.counters().malformed_chains, 1);
        if self.last_log.is_none_or(|t| t.elapsed() >= LOG_EVERY) {
            self.last_log = Some(Instant::now());
            tracing::warn!(guest = %self.name, queue, "{what}; completed with length 0 (further ones counted, logged at most every 5 s)");
        }
    }

    fn broken_queue(&mut self, queue: usize) {
        if !self.broken[queue] {
            self.broken[queue] = true;
            GuestCounters::add(&self.counters().broken_queues, 1);
            tracing::warn!(guest = %self.name, queue, "the guest's avail index is inconsistent: queue stopped until the device is reset");
        }
    }

    /// Sends every frame the guest queued on TX queue `index`.
    fn process_tx(
        &mut self,
        vring: &Vring,
        index: usize,
        pair: usize,
        mem: &GuestMem,
    ) -> io::Result<()> {
        if self.broken[index] {
            return Ok(());
        }
        let mut state = vring.get_mut();
        if !queue::serving(state.get_queue(), state.is_enabled()) {
            return Ok(());
        }
        let mut sent_any = false;
        // Passes that found nothing: the second one ends the loop whatever the guest's avail
        // index says (a guest can make it say "more" forever).
        let mut idle_passes = 0;
        loop {
            let mut popped = 0usize;
            loop {
                let chain = match queue::pop(state.get_queue_mut(), mem) {
                    Ok(Some(chain)) => chain,
                    Ok(None) => break,
                    Err(queue::Broken) => {
                        drop(state);
                        self.broken_queue(index);
                        return Ok(());
                    }
                };
                popped += 1;
                let head = chain.head_index();
                let outcome = queue::read_tx(chain, mem, &mut self.tx_buf[pair]);
                if state.add_used(head, 0).is_err() {
                    drop(state);
                    self.broken_queue(index);
                    return Ok(());
                }
                sent_any = true;
                match outcome {
                    TxChain::Frame(len) => {
                        let frame = &self.tx_buf[pair][net::HDR_LEN..net::HDR_LEN + len];
                        GuestCounters::add(&self.port.counters().tx_packets, 1);
                        GuestCounters::add(&self.port.counters().tx_bytes, len as u64);
                        self.switch.forward(&self.port, frame);
                    }
                    TxChain::Oversize => GuestCounters::add(&self.port.counters().tx_oversize, 1),
                    TxChain::Malformed => self.malformed("malformed TX descriptor chain", index),
                }
            }
            if popped == 0 {
                idle_passes += 1;
            }
            // Without EVENT_IDX the guest kicks for every frame (the backend never sets
            // NO_NOTIFY); with it, ask for a kick on the next frame and look once more if one
            // came meanwhile.
            if !self.event_idx
                || idle_passes > 1
                || !queue::notify_on_more(state.get_queue(), mem).unwrap_or(false)
            {
                break;
            }
        }
        if sent_any {
            self.dirty.mark_used_ring(state.get_queue());
        }
        if sent_any && state.needs_notification().unwrap_or(true) {
            state.signal_used_queue()?;
        }
        drop(state);
        self.switch.notify_marked();
        Ok(())
    }

    /// Writes the mailbox's frames into RX queue 0 while the guest has buffers.
    fn process_rx(&mut self, vring: &Vring, mem: &Arc<GuestMem>) -> io::Result<()> {
        if self.broken[0] {
            self.port.mailbox().clear_wakeup();
            return Ok(());
        }
        if self.rx_vring.is_none() {
            self.rx_vring = Some(vring.clone());
        }
        if self.rx_dma.is_some() {
            return self.process_rx_dma(vring, mem);
        }
        let mrg = net::mrg_rxbuf(self.acked_features);
        let port = Arc::clone(&self.port);
        let counters = port.counters();
        let mut state = vring.get_mut();
        if !queue::serving(state.get_queue(), state.is_enabled()) {
            // The frames wait; the library calls again when the frontend starts the queue.
            port.mailbox().clear_wakeup();
            return Ok(());
        }
        let mem: &GuestMem = mem;
        let mut used_any = false;
        let mut broken = false;
        let mut malformed = 0;
        let mut looked_again = false;
        loop {
            let mut out_of_buffers = false;
            port.mailbox().drain(|frame| {
                match queue::write_rx(state.get_queue_mut(), mem, frame, mrg, Some(&self.dirty)) {
                    Ok(RxWrite::Written(_)) => {
                        GuestCounters::add(&counters.rx_packets, 1);
                        GuestCounters::add(&counters.rx_bytes, frame.len() as u64);
                        used_any = true;
                        true
                    }
                    Ok(RxWrite::NoBuffers) => {
                        out_of_buffers = true;
                        false
                    }
                    Ok(RxWrite::TooSmall) => {
                        GuestCounters::add(&counters.rx_dropped_small, 1);
                        used_any = true;
                        true
                    }
                    Ok(RxWrite::Malformed) => {
                        malformed += 1;
                        used_any = true;
                        true
                    }
                    Err(queue::Broken) => {
                        broken = true;
                        false
                    }
                }
            });
            // Out of buffers: ask the guest to kick when it adds some, and look once more
            // (once) in case it did in between.
            if out_of_buffers
                && self.event_idx
                && !broken
                && !looked_again
                && queue::notify_on_more(state.get_queue(), mem).unwrap_or(false)
            {
                looked_again = true;
                continue;
            }
            break;
        }
        if used_any {
            self.dirty.mark_used_ring(state.get_queue());
        }
        if used_any && state.needs_notification().unwrap_or(true) {
            state.signal_used_queue()?;
        }
        drop(state);
        for _ in 0..malformed {
            self.malformed("malformed RX descriptor chain", 0);
        }
        if broken {
            self.broken_queue(0);
        }
        Ok(())
    }
}

impl NetBackend {
    /// As `process_rx`, the copies going to the DMA channel.
    fn process_rx_dma(&mut self, vring: &Vring, mem: &Arc<GuestMem>) -> io::Result<()> {
        let mrg = net::mrg_rxbuf(self.acked_features);
        let port = Arc::clone(&self.port);
        let Some(dma) = self.rx_dma.as_ref() else {
            return Ok(());
        };
        let mut dma = dma.lock().unwrap_or_else(|e| e.into_inner());
        let mut state = vring.get_mut();
        if !queue::serving(state.get_queue(), state.is_enabled()) {
            // The frames wait (copies in flight complete at the next pass or drain).
            port.mailbox().clear_wakeup();
            dma.clear_notification();
            return Ok(());
        }
        let mut pass = dma.run(
            state.get_queue_mut(),
            mem,
            port.mailbox(),
            port.counters(),
            mrg,
        );
        // Out of buffers: ask the guest to kick when it adds some, and look once more.
        if pass.out_of_buffers
            && self.event_idx
            && !pass.broken
            && queue::notify_on_more(state.get_queue(), &**mem).unwrap_or(false)
        {
            let again = dma.run(
                state.get_queue_mut(),
                mem,
                port.mailbox(),
                port.counters(),
                mrg,
            );
            pass.used |= again.used;
            pass.malformed += again.malformed;
            pass.broken |= again.broken;
        }
        if pass.used {
            self.dirty.mark_used_ring(state.get_queue());
        }
        if pass.used && state.needs_notification().unwrap_or(true) {
            state.signal_used_queue()?;
        }
        drop(state);
        drop(dma);
        for _ in 0..pass.malformed {
            self.malformed("malformed RX descriptor chain", 0);
        }
        if pass.broken {
            self.broken_queue(0);
        }
        Ok(())
    }

    /// Completes every RX copy in flight: into the queue when it is still valid
    /// (`complete`), else dropping the frames. Runs before memory changes, queue stops,
    /// resets and disconnects.
    fn drain_rx(&mut self, complete: bool) {
        let port = Arc::clone(&self.port);
        let Some(dma) = self.rx_dma.as_ref() else {
            return;
        };
        let mut dma = dma.lock().unwrap_or_else(|e| e.into_inner());
        let mem = self.mem.as_ref().map(|m| m.memory());
        match (complete, self.rx_vring.as_ref(), mem.as_ref()) {
            (true, Some(vring), Some(mem)) => {
                let mut state = vring.get_mut();
                dma.drain(
                    Some((state.get_queue_mut(), mem)),
                    port.mailbox(),
                    port.counters(),
                );
                self.dirty.mark_used_ring(state.get_queue());
                let _ = state.signal_used_queue();
            }
            _ => dma.drain(None, port.mailbox(), port.counters()),
        }
    }

    /// Drops the frames waiting for RX queue 0 (it was stopped or reset), counted.
    fn drop_waiting_frames(&self) {
        let n = self.port.mailbox().clear();
        GuestCounters::add(&self.counters().rx_dropped_reset, n as u64);
    }

    /// The RX copy engine's counters (zero without a channel).
    pub fn copy_stats(&self) -> crate::copy::CopyStats {
        self.rx_dma
            .as_ref()
            .and_then(|d| d.lock().ok().map(|d| d.stats()))
            .unwrap_or_default()
    }

    /// The RX copy channel's completion fd, to wait on with the mailbox.
    pub fn rx_completion_fd(&self) -> Option<std::os::fd::RawFd> {
        use std::os::fd::AsRawFd;
        let dma = self.rx_dma.as_ref()?.lock().ok()?;
        dma.completion_fd().map(|fd| fd.as_raw_fd())
    }
}

impl VhostUserBackendMut for NetBackend {
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
            | vhost::vhost_user::message::VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
            | vhost::vhost_user::message::VhostUserVirtioFeatures::LOG_ALL.bits()
    }

    fn acked_features(&mut self, features: u64) {
        if !has_version_1(features) {
            tracing::warn!(guest = %self.name, "the frontend did not accept VIRTIO_F_VERSION_1; legacy virtio-net headers are not supported");
        }
        self.acked_features = features;
        self.dirty.set_logging(dirty::log_all(features));
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::LOG_SHMFD
    }

    fn reset_device(&mut self) {
        self.drain_rx(false);
        self.rx_vring = None;
        self.drop_waiting_frames();
        self.broken.fill(false);
        self.acked_features = 0;
        self.dirty.set_logging(false);
        self.dirty.set_log(None);
        self.event_idx = false;
    }

    fn set_event_idx(&mut self, enabled: bool) {
        self.event_idx = enabled;
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        // vhost-user carries at most 256 bytes of config; never allocate what a frontend asks.
        let size = size.min(256);
        let config = net::config_space(self.port.mac().0, self.queue_pairs);
        let start = (offset as usize).min(config.len());
        let end = start.saturating_add(size as usize).min(config.len());
        let mut out = config[start..end].to_vec();
        out.resize(size as usize, 0);
        out
    }

    fn update_memory(&mut self, mem: Memory) -> io::Result<()> {
        // No copy may still be writing into the memory about to be replaced.
        self.drain_rx(true);
        self.mem = Some(mem);
        Ok(())
    }

    fn stop_vring(&mut self, queue_index: u32) -> io::Result<()> {
        // GET_VRING_BASE: the frontend stops the queue (a driver unloads, a guest reboots)
        // and starts it afresh later, without reconnecting.
        if queue_index == 0 {
            self.drain_rx(true);
            self.drop_waiting_frames();
        }
        if let Some(broken) = self.broken.get_mut(queue_index as usize) {
            *broken = false;
        }
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        (0..self.queue_pairs).map(|i| 0b11u64 << (2 * i)).collect()
    }

    /// None: the library would leak the consumer (see [`exit_event_id`]).
    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        None
    }

    fn handle_event(
        &mut self,
        device_event: u16,
        evset: EventSet,
        vrings: &[Vring],
        thread_id: usize,
    ) -> io::Result<()> {
        if !evset.contains(EventSet::IN) {
            return Ok(());
        }
        let num_queues = self.num_queues();
        if device_event == exit_event_id(num_queues) {
            // An error is what ends the library's worker loop once it has no exit event.
            return Err(io::Error::other("the connection ended; worker stops"));
        }
        let Some(mem) = self.mem.as_ref().map(|m| m.memory().into_inner()) else {
            // No memory table yet: nothing can be delivered. The mailbox's eventfd is
            // level-triggered on this epoll: consume it, or the worker spins until memory
            // arrives. The frames wait; the RX vring's start delivers them.
            if device_event == mailbox_event(num_queues) {
                self.port.mailbox().clear_wakeup();
            }
            return Ok(());
        };
        // vhost-user-backend numbers a vring's kick by its place among the thread's vrings,
        // not by its queue index: thread `t` serves pair `t`, [rx, tx] = events [0, 1].
        if device_event == mailbox_event(num_queues)
            || device_event == completion_event(num_queues)
            || (device_event == 0 && thread_id == 0)
        {
            // Frames from other guests, or the guest added RX buffers: pair 0's worker.
            if let Some(rx) = vrings.first().filter(|_| thread_id == 0) {
                return self.process_rx(rx, &mem);
            }
            return Ok(());
        }
        if device_event == 1
            && let Some(tx) = vrings.get(1)
        {
            let pair = thread_id;
            return self.process_tx(tx, 2 * pair + 1, pair, &mem);
        }
        // RX kicks of pairs other than 0: nothing to deliver there (frames go to queue 0).
        Ok(())
    }
}

/// Whether `features` include VERSION_1 (the backend requires it: the 12-byte header).
pub fn has_version_1(features: u64) -> bool {
    features & (1 << VIRTIO_F_VERSION_1) != 0
}

#[cfg(test)]
#[path = "backend_tests.rs"]
mod event_tests;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::MacAddr;

    #[test]
    fn config_reads_are_clamped_and_padded() {
        let switch = Switch::new();
        let port = switch.add_port(MacAddr([2, 0, 0, 0, 0, 7])).unwrap();
        let backend = NetBackend::new("t", port, Arc::clone(&switch), 2, None).unwrap();
        assert_eq!(backend.get_config(0, 6), vec![2, 0, 0, 0, 0, 7]);
        assert_eq!(backend.get_config(8, 2), vec![2, 0], "max_virtqueue_pairs");
        assert_eq!(
            backend.get_config(9, 4),
            vec![0, 0, 0, 0],
            "past the end: zeros, no panic"
        );
        assert_eq!(backend.get_config(u32::MAX, 8).len(), 8);
        assert_eq!(
            backend.get_config(0, u32::MAX).len(),
            256,
            "a huge request is clamped"
        );
        assert_eq!(backend.queues_per_thread(), vec![0b11, 0b1100]);
        assert_eq!(backend.num_queues(), 4);
        assert!(has_version_1(backend.features()));
        const { assert!(net::MAX_FRAME >= 1518) };
    }
}
