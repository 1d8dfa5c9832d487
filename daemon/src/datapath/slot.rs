//! A guest as a worker holds it: the vrings the device handed over, the guest memory, the
//! RX queues (shared by every worker: any of them may deliver into any RX queue, one burst
//! at a time under the queue's lock, as OVS-DPDK's PMD threads share a port's transmit
//! queues), and the TX queues this worker polls (each TX queue has one worker, with its copy
//! side). Each worker has a slot of its own for every guest.

use std::{
    os::fd::{AsFd, OwnedFd},
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, Instant},
};

use vhost_user_backend::VringT;
use virtio_queue::QueueT;

use super::{
    counters::GuestCounters,
    device::{GuestDevice, Vring},
    from_guest::{FromGuest, Outgoing},
    to_guest::{Source, ToGuest},
};
use crate::{
    copy::{BoundChannel, CopyStats},
    vhost::{
        dirty::{DirtyPages, GuestMem, Memory},
        queue,
    },
};

/// How often a malformed chain is logged at most, per guest.
const LOG_EVERY: Duration = Duration::from_secs(5);

/// One RX queue of a guest, shared by the workers: its copy side, whether it is broken, and
/// whether its driver was asked not to kick.
#[derive(Debug)]
pub struct RxQueue {
    to_guest: ToGuest,
    broken: bool,
    /// `VRING_USED_F_NO_NOTIFY` set (for good: a frame never waits for RX buffers).
    quiet: bool,
}

/// An RX queue as the workers share it.
pub type SharedRx = Arc<Mutex<RxQueue>>;

impl RxQueue {
    /// An RX queue whose copies go to `channel` (the CPU without one).
    pub fn shared(channel: Option<BoundChannel>, dirty: Arc<DirtyPages>) -> SharedRx {
        Arc::new(Mutex::new(RxQueue {
            to_guest: ToGuest::new(channel, dirty),
            broken: false,
            quiet: false,
        }))
    }
}

fn lock(rx: &SharedRx) -> MutexGuard<'_, RxQueue> {
    rx.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The RX queue, unless another worker holds it now (then it delivers or completes there).
fn try_lock(rx: &SharedRx) -> Option<MutexGuard<'_, RxQueue>> {
    match rx.try_lock() {
        Ok(q) => Some(q),
        Err(std::sync::TryLockError::Poisoned(e)) => Some(e.into_inner()),
        Err(std::sync::TryLockError::WouldBlock) => None,
    }
}

/// One guest, on its worker.
pub struct GuestSlot {
    device: Arc<GuestDevice>,
    /// The worker holding this slot.
    worker: usize,
    counters: Arc<GuestCounters>,
    mem: Option<Memory>,
    /// By queue index: RX queues are even, TX queues odd.
    vrings: Vec<Option<Vring>>,
    /// By RX queue pair, shared by the workers.
    rx: Vec<SharedRx>,
    /// Dups of the RX queues' channels' completion fds (to wait on without their locks).
    rx_fds: Vec<OwnedFd>,
    /// RX queues found broken at the last look (bit by pair), for when another worker holds
    /// one.
    rx_broken_seen: u64,
    /// TX queue pairs this worker polls.
    tx_mine: u64,
    /// By TX queue pair: the copy side of a TX queue of this worker's with a DMA channel
    /// (without one, the worker copies its frames on the CPU at once).
    from_guest: Vec<Option<FromGuest>>,
    /// Broken TX queues (by queue index; an RX queue's flag is in its `RxQueue`).
    broken: u64,
    /// TX queues whose driver was asked not to kick (see `queue::quiet_kicks`), until the
    /// worker next sleeps.
    quiet: u64,
    /// RX queue pairs ready and enabled, as of the worker's last look (once per iteration).
    rx_ready: u64,
    last_log: Option<Instant>,
}

impl std::fmt::Debug for GuestSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuestSlot")
            .field("device", &self.device)
            .field(
                "vrings",
                &self.vrings.iter().map(|v| v.is_some()).collect::<Vec<_>>(),
            )
            .field("rx_ready", &self.rx_ready)
            .field("broken", &self.broken)
            .finish()
    }
}

impl GuestSlot {
    /// A slot for `device` on a datapath of one worker: the copies of each queue on the
    /// channel of `channels` bound to it (queues without one copy on the CPU).
    pub fn new(device: Arc<GuestDevice>, channels: Vec<BoundChannel>) -> GuestSlot {
        let pairs = usize::from(device.queue_pairs());
        let (rx, tx) = split_channels(pairs, channels);
        let rx = rx
            .into_iter()
            .map(|c| RxQueue::shared(c, device.dirty()))
            .collect();
        let from_guest = tx
            .into_iter()
            .map(|c| Some(c.map(FromGuest::new)))
            .collect();
        GuestSlot::with_queues(device, 0, rx, from_guest)
    }

    /// Worker `worker`'s slot for `device`: the shared RX queues `rx` (worker 0's slot
    /// publishes their copy counters), and its TX queues: `Some` in `tx` for each TX queue
    /// pair this worker polls (with the queue's copy side when it has a channel).
    pub fn with_queues(
        device: Arc<GuestDevice>,
        worker: usize,
        rx: Vec<SharedRx>,
        tx: Vec<Option<Option<FromGuest>>>,
    ) -> GuestSlot {
        let pairs = usize::from(device.queue_pairs());
        let tx_mine = tx
            .iter()
            .enumerate()
            .filter(|(_, t)| t.is_some())
            .fold(0u64, |m, (p, _)| m | 1 << p);
        let from_guest = tx.into_iter().map(Option::flatten).collect();
        let rx_fds = rx
            .iter()
            .filter_map(|q| {
                let q = lock(q);
                q.to_guest.completion_fd()?.try_clone_to_owned().ok()
            })
            .collect();
        GuestSlot {
            counters: device.counters_arc(),
            device,
            worker,
            mem: None,
            vrings: vec![None; 2 * pairs],
            rx,
            rx_fds,
            rx_broken_seen: 0,
            tx_mine,
            from_guest,
            broken: 0,
            quiet: 0,
            rx_ready: 0,
            last_log: None,
        }
    }

    /// Whether this worker polls TX queue pair `pair`.
    pub fn polls_tx(&self, pair: usize) -> bool {
        self.tx_mine & (1 << pair) != 0
    }

    /// The device.
    pub fn device(&self) -> &Arc<GuestDevice> {
        &self.device
    }

    /// Its counters.
    pub fn counters(&self) -> &GuestCounters {
        &self.counters
    }

    /// Its counters, shared.
    pub fn counters_arc(&self) -> Arc<GuestCounters> {
        Arc::clone(&self.counters)
    }

    /// Whether copies into or out of the guest are in flight.
    pub fn has_inflight(&self) -> bool {
        // An RX queue another worker holds now is that worker's to complete.
        self.rx
            .iter()
            .any(|q| try_lock(q).is_some_and(|q| q.to_guest.inflight() > 0))
            || self.from_guest.iter().flatten().any(|f| f.inflight() > 0)
    }

    /// Before the worker sleeps: consumes the completion wake-ups of channels with nothing
    /// in flight (copies completed since the wake-up was armed), which would otherwise wake it
    /// at once, and again.
    pub fn clear_idle_notifications(&mut self) {
        for q in &self.rx {
            if let Some(mut q) = try_lock(q)
                && q.to_guest.inflight() == 0
            {
                q.to_guest.clear_notification();
            }
        }
        for f in self.from_guest.iter_mut().flatten() {
            if f.inflight() == 0 {
                f.clear_notification();
            }
        }
    }

    /// The copy side of TX queue pair `pair`, when it has a DMA channel.
    pub fn from_guest_mut(&mut self, pair: usize) -> Option<&mut FromGuest> {
        self.from_guest.get_mut(pair)?.as_mut()
    }

    /// Completes finished copies out of every TX queue: each frame goes to `sent` (see
    /// [`FromGuest::complete`]) and its chain is marked used; returns how many frames are
    /// still in flight.
    pub fn complete_from_guest(&mut self, sent: &mut impl FnMut(&Outgoing, bool) -> bool) -> usize {
        let Some(mem) = self.memory() else {
            return 0;
        };
        let mut inflight = 0;
        for pair in 0..self.pairs() {
            let Some(from_guest) = self.from_guest[pair].as_mut() else {
                continue;
            };
            if from_guest.inflight() == 0 {
                continue;
            }
            from_guest.clear_notification();
            let counters = &self.counters;
            let Some(vring) = self.vrings[2 * pair + 1].as_ref() else {
                from_guest.complete(counters, sent, &mut |_| {});
                inflight += from_guest.inflight();
                continue;
            };
            let mut state = vring.get_mut();
            let mut broken = false;
            let n = from_guest.complete(counters, sent, &mut |o| {
                broken |= state.add_used(o.head, 0).is_err();
            });
            if n > 0 {
                self.device.dirty().mark_used_ring(state.get_queue());
                if queue::needs_call(state.get_queue_mut(), &*mem) {
                    let _ = state.signal_used_queue();
                }
            }
            if from_guest.inflight() > 0 {
                from_guest.flush();
            }
            inflight += from_guest.inflight();
            drop(state);
            if broken {
                self.break_queue(2 * pair + 1);
            }
        }
        inflight
    }

    /// Waits for the copies out of TX queue pair `pair`: their frames go to `sent`; with
    /// `complete` their chains are marked used (the queue stops: the frontend reads its
    /// position next), without (a reset) they are not.
    fn drain_from_guest(
        &mut self,
        pair: usize,
        complete: bool,
        sent: &mut impl FnMut(&Outgoing, bool) -> bool,
    ) {
        let Some(from_guest) = self.from_guest.get_mut(pair).and_then(Option::as_mut) else {
            return;
        };
        let counters = &self.counters;
        match (complete, self.vrings[2 * pair + 1].as_ref()) {
            (true, Some(vring)) => {
                let mut state = vring.get_mut();
                from_guest.drain(counters, sent, &mut |o| {
                    let _ = state.add_used(o.head, 0);
                });
                self.device.dirty().mark_used_ring(state.get_queue());
                let _ = state.signal_used_queue();
            }
            _ => from_guest.drain(counters, sent, &mut |_| {}),
        }
    }

    /// The guest memory now (one snapshot per burst).
    pub fn memory(&self) -> Option<Arc<GuestMem>> {
        use vm_memory::GuestAddressSpace;
        Some(self.mem.as_ref()?.memory().into_inner())
    }

    /// A new memory table (the same `Memory` for the whole connection, in practice).
    pub fn set_memory(&mut self, mem: Memory) {
        self.mem = Some(mem);
    }

    /// The vrings of a new connection.
    pub fn set_vrings(&mut self, vrings: Vec<Vring>) {
        let n = self.vrings.len();
        self.vrings = vrings
            .into_iter()
            .map(Some)
            .chain(std::iter::repeat(None))
            .take(n)
            .collect();
        self.broken = 0;
        self.quiet = 0;
        self.rx_ready = 0;
    }

    /// Looks which RX queues are ready and enabled (the frontend may start or stop one at
    /// any time; a stop also waits for the workers, see [`Self::stop_vring`]).
    pub fn refresh_ready(&mut self) {
        let mut ready = 0u64;
        for pair in 0..self.pairs() {
            // Not waiting for a worker that delivers into the queue now: the last look stands.
            let broken = match try_lock(&self.rx[pair]) {
                Some(q) => q.broken,
                None => self.rx_broken_seen & (1 << pair) != 0,
            };
            if broken {
                self.rx_broken_seen |= 1 << pair;
            } else {
                self.rx_broken_seen &= !(1 << pair);
            }
            if let Some(vring) = self.vrings[2 * pair].as_ref()
                && !broken
            {
                let state = vring.get_ref();
                if queue::serving(state.get_queue(), state.is_enabled()) {
                    ready |= 1 << pair;
                }
            }
        }
        self.rx_ready = ready;
        self.device
            .set_ready(self.worker, ready != 0 && self.mem.is_some());
    }

    /// The TX vring of `pair`, if started.
    pub fn tx_vring(&self, pair: usize) -> Option<&Vring> {
        self.vrings.get(2 * pair + 1)?.as_ref()
    }

    /// Queue pairs.
    pub fn pairs(&self) -> usize {
        self.rx.len()
    }

    /// Whether queue `queue` is broken.
    pub fn is_broken(&self, queue: usize) -> bool {
        if queue.is_multiple_of(2) {
            return self.rx.get(queue / 2).is_some_and(|q| lock(q).broken);
        }
        self.broken & (1u64 << queue) != 0
    }

    /// Asks the driver of queue `index` not to kick while the worker serves it, once (the
    /// caller holds the queue's lock and serves it).
    pub fn quiet_kicks(&mut self, index: usize, q: &mut virtio_queue::Queue, mem: &GuestMem) {
        let bit = 1u64 << index;
        if self.quiet & bit == 0 && queue::quiet_kicks(q, mem).is_ok() {
            self.quiet |= bit;
        }
    }

    /// Before the worker sleeps: asks the driver of each TX queue served to kick when it
    /// sends; true if one has sent meanwhile (look again instead of sleeping).
    pub fn want_kicks(&mut self) -> bool {
        let Some(mem) = self.memory() else {
            return false;
        };
        let mut more = false;
        let mine = self.tx_mine;
        for pair in (0..self.pairs()).filter(|&p| mine & (1 << p) != 0) {
            let index = 2 * pair + 1;
            let Some(vring) = self.vrings[index].as_ref() else {
                continue;
            };
            if self.is_broken(index) {
                continue;
            }
            let mut state = vring.get_mut();
            if queue::serving(state.get_queue(), state.is_enabled()) {
                more |= queue::want_kicks(state.get_queue_mut(), &*mem).unwrap_or(false);
                self.quiet &= !(1u64 << index);
            } else if self.quiet & (1u64 << index) != 0 && state.get_queue().ready() {
                // Disabled (SET_VRING_ENABLE 0, which the library does not pass on) while its
                // driver was asked not to kick: the ring must not keep saying so, or the
                // driver enabling it again does not kick a worker asleep by then.
                let _ = queue::want_kicks(state.get_queue_mut(), &*mem);
                self.quiet &= !(1u64 << index);
            }
        }
        more
    }

    /// Marks queue `queue` broken (counted, logged once).
    pub fn break_queue(&mut self, queue: usize) {
        let newly = if queue.is_multiple_of(2) {
            self.rx
                .get(queue / 2)
                .is_some_and(|q| !std::mem::replace(&mut lock(q).broken, true))
        } else {
            let was = self.broken & (1u64 << queue) != 0;
            self.broken |= 1u64 << queue;
            !was
        };
        if newly {
            GuestCounters::add(&self.counters.broken_queues, 1);
            tracing::warn!(guest = %self.device.name(), queue, "the guest's avail index is inconsistent: queue stopped until the driver restarts it");
        }
    }

    /// Logs a malformed chain, at most every few seconds (each one is counted elsewhere).
    pub fn log_malformed(&mut self, what: &str, queue: usize) {
        if self.last_log.is_none_or(|t| t.elapsed() >= LOG_EVERY) {
            self.last_log = Some(Instant::now());
            tracing::warn!(guest = %self.device.name(), queue, "{what}; completed with length 0 (further ones counted, logged at most every 5 s)");
        }
    }

    /// The RX queue pair a frame goes to: by flow, over the ready RX queues.
    pub fn rx_pair_for(&self, hash: u32) -> Option<usize> {
        let ready = self.rx_ready.count_ones();
        if ready == 0 {
            return None;
        }
        let nth = hash % ready;
        (0..self.pairs())
            .filter(|p| self.rx_ready & (1 << p) != 0)
            .nth(nth as usize)
    }

    /// Places `frames` (each a source and its bytes) into RX queue pair `pair`, one lock for
    /// all. Sources whose frame is done with (delivered by the CPU, or dropped) go to
    /// `release`; those whose copies are in flight come back from [`Self::complete`].
    pub fn deliver<'a>(
        &mut self,
        pair: usize,
        mem: &Arc<GuestMem>,
        frames: impl Iterator<Item = (Source, &'a [u8])>,
        release: &mut impl FnMut(Source),
    ) {
        let mrg = self.device.mrg_rxbuf();
        let event_idx = self.device.event_idx();
        let queue_index = 2 * pair;
        let counters = Arc::clone(&self.counters);
        let Some(vring) = self.vrings[queue_index].as_ref() else {
            for (src, _) in frames {
                GuestCounters::add(&counters.to_guest_dropped_reset, 1);
                release(src);
            }
            return;
        };
        // The queue's lock, then its vring's (every worker takes them in this order).
        let mut rxq = lock(&self.rx[pair]);
        let mut state = vring.get_mut();
        let serving = queue::serving(state.get_queue(), state.is_enabled()) && !rxq.broken;
        if serving && !rxq.quiet && queue::quiet_kicks(state.get_queue_mut(), &**mem).is_ok() {
            rxq.quiet = true;
        }
        let to_guest = &mut rxq.to_guest;
        let mut used = to_guest.complete(state.get_queue_mut(), mem, &counters, release);
        let mut broken = false;
        let mut looked_again = false;
        let mut frames = frames.peekable();
        while let Some(&(src, frame)) = frames.peek() {
            if !serving || broken {
                GuestCounters::add(&counters.to_guest_dropped_reset, 1);
                release(src);
                frames.next();
                continue;
            }
            let placed = to_guest.place(state.get_queue_mut(), mem, frame, src, mrg, &counters);
            match placed {
                super::to_guest::Placed::InFlight => {}
                super::to_guest::Placed::Done | super::to_guest::Placed::Dropped => {
                    used = true;
                    release(src);
                }
                super::to_guest::Placed::NoBuffers => {
                    // Ask the guest to kick when it adds buffers; look once more (once) in
                    // case it did meanwhile, then drop what does not fit (as OVS does).
                    if event_idx
                        && !looked_again
                        && queue::notify_on_more(state.get_queue(), &**mem).unwrap_or(false)
                    {
                        looked_again = true;
                        continue;
                    }
                    GuestCounters::add(&counters.to_guest_dropped_full, 1);
                    release(src);
                }
                super::to_guest::Placed::Broken => {
                    broken = true;
                    GuestCounters::add(&counters.to_guest_dropped_reset, 1);
                    release(src);
                }
            }
            frames.next();
        }
        to_guest.flush();
        used |= to_guest.complete(state.get_queue_mut(), mem, &counters, release);
        if used {
            self.device.dirty().mark_used_ring(state.get_queue());
            if queue::needs_call(state.get_queue_mut(), &**mem) {
                let _ = state.signal_used_queue();
            }
        }
        drop(state);
        drop(rxq);
        if broken {
            self.break_queue(queue_index);
        }
    }

    /// Completes finished copies on every RX queue (sources to `release`); returns how many
    /// frames are still in flight.
    pub fn complete(&mut self, release: &mut impl FnMut(Source)) -> usize {
        let Some(mem) = self.memory() else {
            return 0;
        };
        let mut inflight = 0;
        for pair in 0..self.pairs() {
            // Held by another worker: it completes what is done there.
            let Some(mut rxq) = try_lock(&self.rx[pair]) else {
                continue;
            };
            if rxq.to_guest.inflight() == 0 {
                continue;
            }
            rxq.to_guest.clear_notification();
            let Some(vring) = self.vrings[2 * pair].as_ref() else {
                continue;
            };
            let mut state = vring.get_mut();
            let to_guest = &mut rxq.to_guest;
            if to_guest.complete(state.get_queue_mut(), &mem, &self.counters, release) {
                self.device.dirty().mark_used_ring(state.get_queue());
                if queue::needs_call(state.get_queue_mut(), &*mem) {
                    let _ = state.signal_used_queue();
                }
            }
            if to_guest.inflight() > 0 {
                to_guest.flush();
            }
            inflight += to_guest.inflight();
        }
        inflight
    }

    /// The frontend stops queue `queue` (GET_VRING_BASE): copies in flight into it are
    /// completed into it (it is still mapped, and the frontend reads its position next); a
    /// broken queue starts afresh when the frontend starts it again.
    pub fn stop_vring(
        &mut self,
        queue: usize,
        release: &mut impl FnMut(Source),
        sent: &mut impl FnMut(&Outgoing, bool) -> bool,
    ) {
        if queue.is_multiple_of(2) {
            self.drain(queue / 2, true, release);
            self.rx_ready &= !(1 << (queue / 2));
            if let Some(q) = self.rx.get(queue / 2) {
                let mut q = lock(q);
                q.broken = false;
                q.quiet = false;
            }
        } else {
            self.drain_from_guest(queue / 2, true, sent);
            // Served since the worker last asked for kicks: ask now, or a restart on the same
            // ring (a reconnect) finds NO_NOTIFY or a stale `avail_event` and does not kick.
            if self.quiet & (1u64 << queue) != 0
                && let (Some(vring), Some(mem)) = (self.vrings[queue].as_ref(), self.memory())
            {
                let _ = queue::want_kicks(vring.get_mut().get_queue_mut(), &*mem);
            }
        }
        self.broken &= !(1u64 << queue);
        self.quiet &= !(1u64 << queue);
    }

    /// The device was reset: copies in flight are waited for and dropped, broken queues
    /// start afresh; the connection's vrings and memory stay (the frontend starts the queues
    /// again on them).
    pub fn reset(
        &mut self,
        release: &mut impl FnMut(Source),
        sent: &mut impl FnMut(&Outgoing, bool) -> bool,
    ) {
        for pair in 0..self.pairs() {
            self.drain(pair, false, release);
            self.drain_from_guest(pair, false, sent);
            let mut q = lock(&self.rx[pair]);
            q.broken = false;
            q.quiet = false;
        }
        self.broken = 0;
        self.quiet = 0;
        self.rx_ready = 0;
        self.device.set_ready(self.worker, false);
    }

    /// The frontend went away: as [`Self::reset`], and the vrings and the guest's memory are
    /// let go of.
    pub fn disconnect(
        &mut self,
        release: &mut impl FnMut(Source),
        sent: &mut impl FnMut(&Outgoing, bool) -> bool,
    ) {
        self.reset(release, sent);
        self.vrings.iter_mut().for_each(|v| *v = None);
        self.mem = None;
    }

    fn drain(&mut self, pair: usize, complete: bool, release: &mut impl FnMut(Source)) {
        let mem = self.memory();
        let vring = self.vrings[2 * pair].clone();
        let mut rxq = lock(&self.rx[pair]);
        let to_guest = &mut rxq.to_guest;
        if to_guest.inflight() == 0 {
            // Nothing in flight (another worker drained it already, or there was nothing).
            return;
        }
        match (complete, vring, mem) {
            (true, Some(vring), Some(mem)) => {
                let mut state = vring.get_mut();
                to_guest.drain(Some((state.get_queue_mut(), &mem)), &self.counters, release);
                self.device.dirty().mark_used_ring(state.get_queue());
                let _ = state.signal_used_queue();
            }
            _ => to_guest.drain(None, &self.counters, release),
        }
    }

    /// Copy counters summed over the queues this slot publishes: the RX queues' (when it is
    /// the one that does) and its TX queues'.
    pub fn copy_stats(&self) -> CopyStats {
        let rx: Vec<CopyStats> = if self.worker == 0 {
            self.rx.iter().map(|q| lock(q).to_guest.stats()).collect()
        } else {
            Vec::new()
        };
        rx.into_iter()
            .chain(self.from_guest.iter().flatten().map(FromGuest::stats))
            .sum()
    }

    /// The completion fds of the queues' channels.
    pub fn completion_fds(&self) -> impl Iterator<Item = std::os::fd::BorrowedFd<'_>> {
        self.rx_fds.iter().map(AsFd::as_fd).chain(
            self.from_guest
                .iter()
                .flatten()
                .filter_map(FromGuest::completion_fd),
        )
    }
}

/// The channels bound to RX queues and to TX queues, by queue pair.
pub fn split_channels(
    pairs: usize,
    channels: Vec<BoundChannel>,
) -> (Vec<Option<BoundChannel>>, Vec<Option<BoundChannel>>) {
    let mut rx: Vec<Option<BoundChannel>> = (0..pairs).map(|_| None).collect();
    let mut tx: Vec<Option<BoundChannel>> = (0..pairs).map(|_| None).collect();
    for channel in channels {
        let queue = usize::from(channel.queue().queue);
        let side = if queue.is_multiple_of(2) {
            &mut rx
        } else {
            &mut tx
        };
        if let Some(spot) = side.get_mut(queue / 2) {
            *spot = Some(channel);
        }
    }
    (rx, tx)
}

#[cfg(test)]
#[path = "slot_tests.rs"]
mod tests;
