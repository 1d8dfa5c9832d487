//! The datapath: what joins the NIC side (`xsk`), the guest side (`vhost`) and the copy
//! engine (`copy`), none of which know each other.
//!
//! - `worker`: the thread that owns queues and moves every frame (see its doc for the loop).
//! - `device`: a guest's vhost-user device; it tells the worker what the frontend set up.
//! - `slot`: a guest as its worker holds it; `to_guest`: frames into one RX queue through
//!   the copy engine; `bounce`: buffers between the two copies of a guest-to-guest frame;
//!   `fdb`: where a destination MAC is (on a VLAN); `vlan`: guests on 802.1Q VLANs, tags
//!   taken out and put in; `counters`: a guest's counters.
//!
//! The buffer model: a frame from the wire stays in its UMEM frame until its one copy into
//! the guest completed; a frame from a guest to the wire is copied once, from its TX chain
//! into a UMEM frame that the socket sends; from a guest to a guest it takes two copies,
//! through a bounce buffer. Every copy in flight owns its source and the guest memory it
//! writes.
//!
//! Today the datapath runs one worker (pinned with `--datapath-cpus`); the command queue, the
//! per-worker table and the slot model are what more workers will be built from.

pub mod bounce;
pub mod counters;
pub mod device;
pub mod fdb;
pub mod from_guest;
pub mod inbox;
pub mod slot;
pub mod to_guest;
pub mod vlan;
pub mod worker;

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU32, Ordering},
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
    /// The worker thread could not be started or pinned.
    #[error("starting the datapath worker")]
    Worker(#[source] std::io::Error),
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
    link: WorkerLink,
    thread: Mutex<Option<JoinHandle<()>>>,
    /// The guests' (MAC, VLAN).
    macs: Mutex<HashMap<([u8; 6], u16), GuestId>>,
    next_id: AtomicU32,
}

impl Datapath {
    /// Starts the worker, pinned to `cpu` when given, polling for `busy_poll` after its last
    /// frame before it sleeps.
    pub fn start(
        cpu: Option<usize>,
        busy_poll: std::time::Duration,
    ) -> Result<Arc<Datapath>, DatapathError> {
        let (mut worker, link) = Worker::new("xvio-dp0").map_err(DatapathError::Worker)?;
        worker.set_busy_poll(busy_poll);
        let (started, ready) = std::sync::mpsc::sync_channel(1);
        let thread = std::thread::Builder::new()
            .name("xvio-dp0".to_owned())
            .spawn(move || {
                let pinned = cpu.map_or(Ok(()), pin_to);
                let ok = pinned.is_ok();
                let _ = started.send(pinned);
                if ok {
                    worker.run();
                }
            })
            .map_err(DatapathError::Worker)?;
        match ready.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                let _ = thread.join();
                return Err(DatapathError::Worker(e));
            }
            Err(_) => {
                return Err(DatapathError::Worker(std::io::Error::other(
                    "the worker thread died at start",
                )));
            }
        }
        Ok(Arc::new(Datapath {
            link,
            thread: Mutex::new(Some(thread)),
            macs: Mutex::default(),
            next_id: AtomicU32::new(0),
        }))
    }

    /// Adds a guest with `mac` on `vlan` (0: untagged) and `queue_pairs` queue pairs, its RX
    /// queues' copies on `channels` (one per queue pair at most; the others copy on the CPU).
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
        let device = GuestDevice::new(id, name, (mac, vlan), queue_pairs, self.link.clone())
            .map_err(|source| DatapathError::Device {
                name: name.to_owned(),
                source,
            })?;
        let device = Arc::new(device);
        let slot = slot::GuestSlot::new(Arc::clone(&device), channels);
        self.link.send(Command::AddGuest(Box::new(slot)));
        macs.insert((mac.0, vlan), id);
        Ok(device)
    }

    /// Removes a guest: the worker drains its copies and forgets it.
    pub fn remove_guest(&self, device: &GuestDevice) {
        let id = device.id();
        if !self.link.call(|ack| Command::RemoveGuest { id, ack }) {
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
    /// runs until dropped.
    pub fn add_group_tap(&self, ifname: &str) -> std::io::Result<GroupFeed> {
        let inbox = Arc::new(inbox::Inbox::default());
        let (to_worker, link) = (Arc::clone(&inbox), self.link.clone());
        let tap = crate::xsk::tap::GroupTap::start(ifname, move |frame| {
            if to_worker.push(frame) {
                link.kick();
            }
        })?;
        self.link.send(Command::AddGroupInbox(Arc::clone(&inbox)));
        Ok(GroupFeed { tap, inbox })
    }

    /// Serves an AF_XDP socket; returns where its counters are published.
    pub fn add_uplink(&self, port: XskPort) -> Arc<Mutex<xvio_common::PortStats>> {
        let (uplink, published) = Uplink::new(port);
        self.link.send(Command::AddUplink(Box::new(uplink)));
        published
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
        self.link.send(Command::Stop);
        if let Some(thread) = self.thread.lock().ok().and_then(|mut t| t.take()) {
            let _ = thread.join();
        }
    }
}

/// Pins the calling thread to `cpu`.
fn pin_to(cpu: usize) -> std::io::Result<()> {
    use nix::sched::{CpuSet, sched_setaffinity};
    let mut set = CpuSet::new();
    set.set(cpu)
        .map_err(|e| std::io::Error::other(format!("CPU {cpu}: {e}")))?;
    sched_setaffinity(nix::unistd::Pid::from_raw(0), &set).map_err(|e| {
        std::io::Error::other(format!("pinning the datapath worker to CPU {cpu}: {e}"))
    })
}
