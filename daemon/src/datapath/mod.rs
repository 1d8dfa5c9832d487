//! The datapath: what joins the NIC side (`xsk`), the guest side (`vhost`) and the copy
//! engine (`copy`), none of which know each other.
//!
//! - `worker`: the thread that owns queues and moves every frame (see its doc for the loop).
//! - `device`: a guest's vhost-user device; it tells the worker what the frontend set up.
//! - `slot`: a guest as its worker holds it; `to_guest`: frames into one RX queue through
//!   the copy engine; `bounce`: buffers between the two copies of a guest-to-guest frame;
//!   `fdb`: where a destination MAC is (on a VLAN); `vlan`: guests on 802.1Q VLANs, tags
//!   taken out and put in; `counters`: a guest's counters; `sched`: the workers' short
//!   scheduler slice (a waking worker preempts what else runs on its CPU).
//!
//! The buffer model: a frame from the wire stays in its UMEM frame until its one copy into
//! the guest completed; a frame from a guest to the wire is copied once, from its TX chain
//! into a UMEM frame that the socket sends; from a guest to a guest it takes two copies,
//! through a bounce buffer. Every copy in flight owns its source and the guest memory it
//! writes.
//!
//! The datapath runs one worker per CPU of `--datapath-cpus` (one unpinned without it): each
//! AF_XDP socket is received from by one worker and each guest TX queue polled by one, in
//! turn; any worker delivers into any RX queue and sends on any socket, a burst at a time
//! under its lock (see `worker` and `slot`).

pub mod bounce;
pub mod counters;
pub mod device;
pub mod fdb;
pub mod from_guest;
pub mod inbox;
pub mod sched;
pub mod slot;
pub mod to_guest;
pub mod vlan;
pub mod worker;

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering},
    },
    thread::JoinHandle,
};

use thiserror::Error;

pub use counters::GuestCounters;
pub use device::{GuestDevice, GuestId};

use crate::{config::MacAddr, copy::BoundChannel, xsk::XskPort};
use worker::{Command, Uplink, Worker, WorkerLink};

/// Errors of the datapath's control side; each names what failed.
#[derive(Debug, Error)]
pub enum DatapathError {
    /// Two guests with one MAC on one VLAN.
    #[error(
        "MAC {mac} is already used by another guest{}; give each guest its own MAC",
        on_vlan(*.vlan)
    )]
    DuplicateMac {
        /// The MAC.
        mac: MacAddr,
        /// Its VLAN (0: untagged).
        vlan: u16,
    },
    /// A worker thread could not be started or pinned.
    #[error("starting datapath worker {index}{}", cpu.map(|c| format!(" on CPU {c}")).unwrap_or_default())]
    Worker {
        /// The worker.
        index: usize,
        /// Its CPU (`--datapath-cpus`).
        cpu: Option<usize>,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// An AF_XDP socket's fd could not be duplicated for the worker that waits on it.
    #[error("handing an AF_XDP socket to the datapath")]
    Uplink(#[source] std::io::Error),
    /// A guest's device could not be made.
    #[error("setting up guest {name}")]
    Device {
        /// The guest.
        name: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// " on VLAN N" for a VLAN, nothing for untagged.
fn on_vlan(vlan: u16) -> String {
    match vlan {
        0 => String::new(),
        v => format!(" on VLAN {v}"),
    }
}

/// The running datapath.
#[derive(Debug)]
pub struct Datapath {
    /// One per worker.
    links: Vec<WorkerLink>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    /// The guests' (MAC, VLAN).
    macs: Mutex<HashMap<([u8; 6], u16), GuestId>>,
    next_id: AtomicU32,
    /// Uplinks added so far (each is received from by one worker, in turn); held while one is
    /// added, so every worker numbers them alike.
    uplinks: Mutex<usize>,
    /// TX queue pairs given out so far (each is polled by one worker, in turn).
    tx_pairs: AtomicUsize,
    /// Guests' memory mapped on first touch only (`--lazy-guest-memory`), not ahead.
    lazy_memory: AtomicBool,
}

impl Datapath {
    /// Starts one worker per CPU of `cpus`, each pinned to its CPU (one unpinned worker
    /// when `cpus` is empty), polling for `busy_poll` after its last frame before it sleeps.
    pub fn start(
        cpus: &[usize],
        busy_poll: std::time::Duration,
    ) -> Result<Arc<Datapath>, DatapathError> {
        let placement: Vec<Option<usize>> = if cpus.is_empty() {
            vec![None]
        } else {
            cpus.iter().copied().map(Some).collect()
        };
        let mut links = Vec::with_capacity(placement.len());
        let mut threads = Vec::with_capacity(placement.len());
        let mut returns = Vec::with_capacity(placement.len());
        for (index, cpu) in placement.into_iter().enumerate() {
            let started = spawn_worker(index, cpu, busy_poll);
            let (link, thread, back) = match started {
                Ok(started) => started,
                Err(e) => {
                    // The workers started so far stop with the links dropped.
                    for link in &links {
                        WorkerLink::send(link, Command::Stop);
                    }
                    for thread in threads {
                        let _ = JoinHandle::join(thread);
                    }
                    return Err(e);
                }
            };
            links.push(link);
            threads.push(thread);
            returns.push(back);
        }
        for link in &links {
            link.send(Command::Peers(returns.clone()));
        }
        Ok(Arc::new(Datapath {
            links,
            threads: Mutex::new(threads),
            macs: Mutex::default(),
            next_id: AtomicU32::new(0),
            uplinks: Mutex::new(0),
            tx_pairs: AtomicUsize::new(0),
            lazy_memory: AtomicBool::new(false),
        }))
    }

    /// Whether the guests added from now on have their memory mapped on first touch only
    /// (`--lazy-guest-memory`) rather than all of it as each memory table arrives (see
    /// [`crate::vhost::populate`]).
    pub fn set_lazy_guest_memory(&self, lazy: bool) {
        self.lazy_memory.store(lazy, Ordering::Relaxed);
    }

    /// Workers.
    pub fn workers(&self) -> usize {
        self.links.len()
    }

    /// Adds a guest with `mac` on `vlan` (0: untagged) and `queue_pairs` queue pairs, the
    /// copies of its queues on `channels` (each bound to one of its queues; the others copy
    /// on the CPU). Its TX queues go to the workers in turn; every worker delivers into its
    /// RX queues.
    pub fn add_guest(
        &self,
        name: &str,
        (mac, vlan): (MacAddr, u16),
        queue_pairs: u16,
        channels: Vec<BoundChannel>,
    ) -> Result<Arc<GuestDevice>, DatapathError> {
        let mut macs = self.macs.lock().unwrap_or_else(|e| e.into_inner());
        if macs.contains_key(&(mac.0, vlan)) {
            return Err(DatapathError::DuplicateMac { mac, vlan });
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let pairs = usize::from(queue_pairs.max(1));
        let workers = self.links.len();
        // From the second worker on (the first receives from the first socket).
        let first = self.tx_pairs.fetch_add(pairs, Ordering::Relaxed) + 1;
        let tx_owner: Vec<usize> = (0..pairs).map(|p| (first + p) % workers).collect();
        let mut device = GuestDevice::on_workers(
            id,
            name,
            (mac, vlan),
            queue_pairs,
            self.links.clone(),
            tx_owner.clone(),
        )
        .map_err(|source| DatapathError::Device {
            name: name.to_owned(),
            source,
        })?;
        device.set_map_ahead(!self.lazy_memory.load(Ordering::Relaxed));
        let device = Arc::new(device);
        let (rx_channels, mut tx_channels) = slot::split_channels(pairs, channels);
        let rx: Vec<slot::SharedRx> = rx_channels
            .into_iter()
            .map(|c| slot::RxQueue::shared(c, device.dirty()))
            .collect();
        for (w, link) in self.links.iter().enumerate() {
            let tx = (0..pairs)
                .map(|p| {
                    (tx_owner[p] == w)
                        .then(|| tx_channels[p].take().map(from_guest::FromGuest::new))
                })
                .collect();
            // The first worker's slot publishes the shared RX queues' copy counters.
            let slot = slot::GuestSlot::with_queues(Arc::clone(&device), w, rx.clone(), tx);
            link.send(Command::AddGuest(Box::new(slot)));
        }
        macs.insert((mac.0, vlan), id);
        Ok(device)
    }

    /// Removes a guest: the workers drain its copies and forget it.
    pub fn remove_guest(&self, device: &GuestDevice) {
        let id = device.id();
        let confirmed = self
            .links
            .iter()
            .map(|link| link.call(|ack| Command::RemoveGuest { id, ack }))
            .filter(|confirmed| !confirmed)
            .count()
            == 0;
        if !confirmed {
            tracing::warn!(
                guest = device.name(),
                "the datapath did not confirm the guest's removal in time"
            );
        }
        self.macs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&(device.mac().0, device.vlan()));
    }

    /// Floods the broadcast and multicast frames `ifname` receives (in this thread's network
    /// namespace) to every guest of the frame's VLAN, while the host still gets them; the tap
    /// runs until dropped. The first worker floods them.
    pub fn add_group_tap(&self, ifname: &str) -> std::io::Result<GroupFeed> {
        let inbox = Arc::new(inbox::Inbox::default());
        let (to_worker, link) = (Arc::clone(&inbox), self.links[0].clone());
        let tap = crate::xsk::tap::GroupTap::start(ifname, move |frame| {
            if to_worker.push(frame) {
                link.kick();
            }
        })?;
        self.links[0].send(Command::AddGroupInbox(Arc::clone(&inbox)));
        Ok(GroupFeed { tap, inbox })
    }

    /// Serves an AF_XDP socket: the workers receive from their uplinks in turn, and every
    /// worker may transmit on any; returns where its counters are published.
    pub fn add_uplink(
        &self,
        port: XskPort,
    ) -> Result<Arc<Mutex<xvio_common::PortStats>>, DatapathError> {
        // The poller sleeps on a dup of the socket's fd (the port is behind a lock).
        let fd = port
            .fd()
            .try_clone_to_owned()
            .map_err(DatapathError::Uplink)?;
        let mut added = self.uplinks.lock().unwrap_or_else(|e| e.into_inner());
        let poller = *added % self.links.len();
        *added += 1;
        let (uplink, published) = Uplink::new(port);
        let uplink = Arc::new(Mutex::new(uplink));
        let mut fd = Some(fd);
        for (w, link) in self.links.iter().enumerate() {
            link.send(Command::AddUplink {
                uplink: Arc::clone(&uplink),
                poll: if w == poller { fd.take() } else { None },
            });
        }
        Ok(published)
    }
}

/// Starts worker `index`, pinned to `cpu` when given.
fn spawn_worker(
    index: usize,
    cpu: Option<usize>,
    busy_poll: std::time::Duration,
) -> Result<(WorkerLink, JoinHandle<()>, Arc<worker::Returns>), DatapathError> {
    let name = format!("xvio-dp{index}");
    let failed = |source| DatapathError::Worker { index, cpu, source };
    let (mut worker, link) = Worker::numbered(&name, index).map_err(failed)?;
    worker.set_busy_poll(busy_poll);
    let returns = worker.returns();
    let (started, ready) = std::sync::mpsc::sync_channel(1);
    let thread = std::thread::Builder::new()
        .name(name)
        .spawn(move || {
            let pinned = cpu.map_or(Ok(()), sched::pin_to);
            let ok = pinned.is_ok();
            if ok {
                ask_short_slice(index);
            }
            let _ = started.send(pinned);
            if ok {
                worker.run();
            }
        })
        .map_err(failed)?;
    match ready.recv() {
        Ok(Ok(())) => Ok((link, thread, returns)),
        Ok(Err(e)) => {
            let _ = thread.join();
            Err(failed(e))
        }
        Err(_) => Err(failed(std::io::Error::other(
            "the worker thread died at start",
        ))),
    }
}

/// An interface's broadcast and multicast feed: its tap and the inbox it fills.
#[derive(Debug)]
pub struct GroupFeed {
    tap: crate::xsk::tap::GroupTap,
    inbox: Arc<inbox::Inbox>,
}

impl GroupFeed {
    /// Frames the tap read, and frames lost before the guests (the socket's kernel drops, a
    /// full inbox, no free bounce buffer): `daemon_stats.group_frames` and `group_dropped`.
    pub fn counters(&self) -> (u64, u64) {
        let lost = self.tap.kernel_drops() + self.inbox.dropped() + self.inbox.unusable();
        (self.inbox.received(), lost)
    }
}

impl Drop for Datapath {
    fn drop(&mut self) {
        for link in &self.links {
            link.send(Command::Stop);
        }
        let threads = std::mem::take(&mut *self.threads.lock().unwrap_or_else(|e| e.into_inner()));
        for thread in threads {
            let _ = thread.join();
        }
    }
}

/// Asks the kernel to let worker `index` (the calling thread) preempt other tasks on its CPU
/// when it wakes (see `sched`); logs what came of it. Not fatal: without it, frames may
/// wait up to a tick behind another task.
fn ask_short_slice(index: usize) {
    match sched::set_worker_slice(sched::WORKER_SLICE) {
        Ok(sched::SliceOutcome::Set(slice)) => tracing::debug!(
            worker = index,
            slice_us = slice.as_micros() as u64,
            "datapath worker runs with a short scheduler slice"
        ),
        Ok(sched::SliceOutcome::Unsupported) => tracing::info!(
            worker = index,
            "the kernel keeps its own scheduler slice for the datapath worker (custom slices \
             need Linux 6.12): a frame may wait behind another task on the worker's CPU"
        ),
        Err(e) => tracing::warn!(worker = index, error = %e, "datapath worker scheduling"),
    }
}

/// The calling thread's CPUs before [`keep_off`] changed them, for [`rejoin`].
static BEFORE_KEEP_OFF: std::sync::OnceLock<nix::sched::CpuSet> = std::sync::OnceLock::new();
/// The CPUs [`keep_off`] left, for [`stay_off`].
static KEPT_OFF: std::sync::OnceLock<nix::sched::CpuSet> = std::sync::OnceLock::new();

/// Keeps the calling thread, and every thread it starts from now on, off the datapath's
/// `cpus` (as OVS-DPDK keeps its other threads on `dpdk-lcore-mask`, off its PMD cores): a
/// control-plane thread woken on a worker's CPU would take it from the worker until the next
/// tick. Returns the CPUs left, or `None` (and changes nothing) when `cpus` is empty or
/// would leave no CPU.
pub fn keep_off(cpus: &[usize]) -> std::io::Result<Option<Vec<usize>>> {
    use nix::sched::{CpuSet, sched_getaffinity, sched_setaffinity};
    if cpus.is_empty() {
        return Ok(None);
    }
    let me = nix::unistd::Pid::from_raw(0);
    let allowed = sched_getaffinity(me).map_err(std::io::Error::from)?;
    let mut rest = CpuSet::new();
    let mut left = Vec::new();
    for cpu in 0..CpuSet::count() {
        if allowed.is_set(cpu).unwrap_or(false) && !cpus.contains(&cpu) {
            rest.set(cpu).map_err(std::io::Error::from)?;
            left.push(cpu);
        }
    }
    if left.is_empty() {
        return Ok(None);
    }
    sched_setaffinity(me, &rest).map_err(std::io::Error::from)?;
    let _ = BEFORE_KEEP_OFF.set(allowed);
    let _ = KEPT_OFF.set(rest);
    Ok(Some(left))
}

/// Puts the calling thread on the CPUs [`keep_off`] left (nothing if it changed nothing): for
/// a thread of background work started from a guest's serving thread, which [`rejoin`]ed the
/// workers' CPUs.
pub fn stay_off() -> std::io::Result<()> {
    set_own_cpus(KEPT_OFF.get())
}

/// Gives the calling thread (and the threads it starts from now on) back the CPUs it had
/// before [`keep_off`], datapath CPUs included; nothing if `keep_off` changed nothing. For a
/// guest's serving thread: the vhost-user library's vring threads it starts wake a sleeping
/// worker at each kick, and belong with the workers: on the CPUs left they would preempt the
/// guests' own vCPUs or lcores there at every kick (in `bench vhost`, 400 times a second,
/// 12% of the guest-to-guest rate).
pub fn rejoin() -> std::io::Result<()> {
    set_own_cpus(BEFORE_KEEP_OFF.get())
}

/// Puts the calling thread on `cpus` (nothing when `None`: [`keep_off`] changed nothing).
fn set_own_cpus(cpus: Option<&nix::sched::CpuSet>) -> std::io::Result<()> {
    match cpus {
        Some(set) => nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), set)
            .map_err(std::io::Error::from),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_other_threads_keep_off_the_datapath_cpus_and_what_they_start_inherits_it() {
        use nix::sched::sched_getaffinity;
        std::thread::spawn(|| {
            let me = nix::unistd::Pid::from_raw(0);
            let before = sched_getaffinity(me).expect("sched_getaffinity");
            let allowed: Vec<usize> = (0..nix::sched::CpuSet::count())
                .filter(|&c| before.is_set(c).unwrap_or(false))
                .collect();
            assert_eq!(keep_off(&[]).expect("keep_off"), None, "no datapath CPUs");
            // Every allowed CPU a datapath CPU: nothing would be left, nothing changes.
            assert_eq!(keep_off(&allowed).expect("keep_off"), None);
            assert_eq!(sched_getaffinity(me).expect("sched_getaffinity"), before);
            if allowed.len() < 2 {
                return;
            }
            let worker = allowed[allowed.len() - 1];
            let left = keep_off(&[worker]).expect("keep_off");
            assert_eq!(left.as_deref(), Some(&allowed[..allowed.len() - 1]));
            let now = sched_getaffinity(me).expect("sched_getaffinity");
            assert!(!now.is_set(worker).unwrap_or(true), "off CPU {worker}");
            let child = std::thread::spawn(move || {
                sched_getaffinity(nix::unistd::Pid::from_raw(0)).expect("sched_getaffinity")
            })
            .join()
            .expect("the child thread");
            assert_eq!(child, now, "a thread started later inherits it");
            // A worker pins itself to its CPU all the same.
            sched::pin_to(worker).expect("pin_to");
        })
        .join()
        .expect("the test thread");
    }

    /// The kernel's id of the thread named `name` in this process.
    fn tid_named(name: &str) -> Option<libc::pid_t> {
        std::fs::read_dir("/proc/self/task")
            .ok()?
            .find_map(|entry| {
                let path = entry.ok()?.path();
                let comm = std::fs::read_to_string(path.join("comm")).ok()?;
                (comm.trim_end() == name)
                    .then(|| path.file_name()?.to_str()?.parse().ok())
                    .flatten()
            })
    }

    #[test]
    fn a_started_worker_runs_with_the_short_slice() {
        // A number no other test's worker has, to find this thread by its name.
        let index = 907;
        let (link, thread, _) =
            spawn_worker(index, None, std::time::Duration::ZERO).expect("a worker");
        let tid = tid_named(&format!("xvio-dp{index}")).expect("the worker's thread");
        let slice = sched::slice_of(tid).expect("sched_getattr");
        link.send(Command::Stop);
        thread.join().expect("the worker");
        if sched::tests::kernel() >= (6, 12) {
            assert_eq!(slice, sched::WORKER_SLICE);
        }
    }
}
