//! Unit tests of a guest slot and the worker's guest side on vrings in plain guest memory:
//! nothing is touched through a queue the frontend has not started, a guest with fewer RX
//! buffers than a frame needs is asked to kick (and the frame dropped) instead of being
//! polled forever, and a stopped queue starts afresh. Each of these, got wrong, once spun a
//! worker holding a vring's lock or wrote into guest memory through a queue not set up.

use std::{
    sync::{Arc, atomic::Ordering, mpsc},
    time::Duration,
};

use vhost_user_backend::{VhostUserBackend, VringT};
use virtio_bindings::{virtio_config::VIRTIO_F_VERSION_1, virtio_net::VIRTIO_NET_F_MRG_RXBUF};
use virtio_queue::{
    desc::{RawDescriptor, split::Descriptor as SplitDescriptor},
    mock::MockSplitQueue,
};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryAtomic, GuestMemoryMmap};

use super::super::{
    device::{GuestDevice, Vring},
    slot::GuestSlot,
    to_guest::Source,
    worker::Worker,
};
use crate::{
    config::MacAddr,
    vhost::dirty::{GuestMem, Memory},
};

const MAC: MacAddr = MacAddr([2, 0, 0, 0, 0, 1]);
const WRITE: u16 = virtio_bindings::virtio_ring::VRING_DESC_F_WRITE as u16;
/// Long enough for any of these calls; they take microseconds when they return at all.
const RETURNS_WITHIN: Duration = Duration::from_secs(5);

fn memory() -> GuestMem {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
}

/// A slot for a one-pair guest (its worker is never run: nothing here talks to it).
fn slot(mem: &GuestMem) -> (GuestSlot, Arc<GuestDevice>, Memory) {
    let (_worker, link) = Worker::new("test").unwrap();
    let device = Arc::new(GuestDevice::new(0, "t", (MAC, 0), 1, link).unwrap());
    let atomic = GuestMemoryAtomic::new(mem.clone());
    let mut slot = GuestSlot::new(Arc::clone(&device), Vec::new());
    slot.set_memory(atomic.clone());
    (slot, device, atomic)
}

/// Runs `f` on another thread; `None` if it did not return in time (the thread is left
/// spinning: the test fails anyway).
fn returns<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Option<T> {
    let (done, wait) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = done.send(f());
    });
    wait.recv_timeout(RETURNS_WITHIN).ok()
}

fn frame(len: usize) -> Vec<u8> {
    let mut f = vec![0x5a; len];
    f[..6].copy_from_slice(&MAC.0);
    f
}

#[test]
fn a_queue_that_is_not_ready_is_not_touched() {
    let mem = memory();
    // What a booted x86 guest has at address 2 (the real-mode interrupt table): read through
    // a queue whose ring addresses are still 0, it looks like an avail index with work.
    mem.write_obj(0x1234u16, GuestAddress(2)).unwrap();
    let (mut slot, device, atomic) = slot(&mem);
    device.set_event_idx(true);
    let rx = Vring::new(atomic.clone(), 256).unwrap();
    rx.set_queue_event_idx(true);
    slot.set_vrings(vec![rx, Vring::new(atomic, 256).unwrap()]);
    slot.refresh_ready();
    assert_eq!(slot.rx_pair_for(0), None, "no RX queue is ready");
    assert!(!device.is_ready());
    let f = frame(60);
    let snapshot = slot.memory().unwrap();
    let Some((slot, released)) = returns(move || {
        let mut released = Vec::new();
        let frames = std::iter::once((Source::Bounce(3), &f[..]));
        slot.deliver(0, &snapshot, frames, &mut |s| released.push(s));
        (slot, released)
    }) else {
        panic!("to_guest spun on a queue that is not ready");
    };
    assert_eq!(
        released,
        vec![Source::Bounce(3)],
        "the frame's buffer comes back"
    );
    // `avail_event` of a 256-entry used ring at address 0.
    let avail_event: u16 = mem.read_obj(GuestAddress(4 + 8 * 256)).unwrap();
    assert_eq!(avail_event, 0, "nothing written through the queue");
    assert_eq!(
        slot.counters()
            .to_guest_dropped_reset
            .load(Ordering::Relaxed),
        1
    );
}

/// An RX vring on `vq`, started and enabled, with EVENT_IDX.
fn started_rx(vq: &MockSplitQueue<'_, GuestMem>, atomic: &Memory) -> Vring {
    let rx = Vring::new(atomic.clone(), 256).unwrap();
    rx.set_queue_size(16);
    rx.set_queue_info(vq.desc_table_addr().0, vq.avail_addr().0, vq.used_addr().0)
        .unwrap();
    rx.set_queue_event_idx(true);
    rx.set_queue_ready(true);
    rx.set_enabled(true);
    rx
}

fn rx_buffer(addr: u64, len: u32) -> RawDescriptor {
    RawDescriptor::from(SplitDescriptor::new(addr, len, WRITE, 0))
}

#[test]
fn too_few_rx_buffers_for_a_frame_ask_for_a_kick_instead_of_spinning() {
    // A 3000-byte frame needs two 2048-byte buffers (MRG_RXBUF); the guest posted one.
    let mem = memory();
    let vq = MockSplitQueue::create(&mem, GuestAddress(0x1_0000), 16);
    vq.add_desc_chains(&[rx_buffer(0x2_0000, 2048)], 0).unwrap();
    let (mut slot, device, atomic) = slot(&mem);
    device.set_event_idx(true);
    device.acked_features((1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_NET_F_MRG_RXBUF));
    slot.set_vrings(vec![
        started_rx(&vq, &atomic),
        Vring::new(atomic, 256).unwrap(),
    ]);
    slot.refresh_ready();
    assert_eq!(slot.rx_pair_for(7), Some(0));
    assert!(device.is_ready());
    let big = frame(3000);
    let snapshot = slot.memory().unwrap();
    let (f, s) = (big.clone(), Arc::clone(&snapshot));
    let Some(mut slot) = returns(move || {
        slot.deliver(
            0,
            &s,
            std::iter::once((Source::Bounce(0), &f[..])),
            &mut |_| {},
        );
        slot
    }) else {
        panic!("to_guest spun while the guest had too few RX buffers");
    };
    assert_eq!(vq.used().idx().load(), 0, "nothing used");
    assert_eq!(
        slot.counters()
            .to_guest_dropped_full
            .load(Ordering::Relaxed),
        1,
        "dropped and counted"
    );
    // The guest has made 1 buffer available: it must kick when it adds the next one, so
    // `avail_event` is 1 (the backend's own position, 0, lies behind the guest already).
    let avail_event: u16 = mem
        .read_obj(vq.used_addr().checked_add(4 + 8 * 16).unwrap())
        .unwrap();
    assert_eq!(avail_event, 1);

    // The guest adds a second buffer: the next frame goes into both.
    vq.add_desc_chains(&[rx_buffer(0x3_0000, 2048)], 1).unwrap();
    slot.deliver(
        0,
        &snapshot,
        std::iter::once((Source::Bounce(0), &big[..])),
        &mut |_| {},
    );
    assert_eq!(vq.used().idx().load(), 2, "one frame in two buffers");
    assert_eq!(slot.counters().to_guest_packets.load(Ordering::Relaxed), 1);
}

#[test]
fn stopping_a_vring_clears_its_broken_flag() {
    let mem = memory();
    let (mut slot, _device, atomic) = slot(&mem);
    slot.set_vrings(vec![
        Vring::new(atomic.clone(), 256).unwrap(),
        Vring::new(atomic, 256).unwrap(),
    ]);
    slot.break_queue(0);
    slot.break_queue(1);
    slot.stop_vring(1, &mut |_| {}, &mut |_, _| false);
    assert!(!slot.is_broken(1), "TX queue serves again after a restart");
    assert!(slot.is_broken(0), "the RX queue was not stopped");
    slot.stop_vring(0, &mut |_| {}, &mut |_, _| false);
    assert!(!slot.is_broken(0));
    assert_eq!(slot.counters().broken_queues.load(Ordering::Relaxed), 2);
}

#[test]
fn a_guest_without_event_idx_kicks_only_while_the_worker_sleeps() {
    let mem = memory();
    let rxq = MockSplitQueue::create(&mem, GuestAddress(0x1_0000), 16);
    let txq = MockSplitQueue::create(&mem, GuestAddress(0x4_0000), 16);
    rxq.add_desc_chains(&[rx_buffer(0x2_0000, 2048)], 0)
        .unwrap();
    let (mut slot, _device, atomic) = slot(&mem);
    let started = |vq: &MockSplitQueue<'_, GuestMem>| {
        let v = started_rx(vq, &atomic);
        v.set_queue_event_idx(false);
        v
    };
    slot.set_vrings(vec![started(&rxq), started(&txq)]);
    slot.refresh_ready();
    let used_flags =
        |vq: &MockSplitQueue<'_, GuestMem>| mem.read_obj::<u16>(vq.used_addr()).unwrap();
    let snapshot = slot.memory().unwrap();
    let f = frame(60);
    slot.deliver(
        0,
        &snapshot,
        std::iter::once((Source::Bounce(0), &f[..])),
        &mut |_| {},
    );
    assert_eq!(rxq.used().idx().load(), 1);
    assert_eq!(
        used_flags(&rxq),
        1,
        "RX: VRING_USED_F_NO_NOTIFY (no frame waits for buffers)"
    );
    // The worker polls the TX queue: no kicks; before it sleeps: kicks, and RX stays quiet.
    let tx = slot.tx_vring(0).unwrap().clone();
    slot.quiet_kicks(1, tx.get_mut().get_queue_mut(), &snapshot);
    assert_eq!(used_flags(&txq), 1);
    assert!(!slot.want_kicks(), "nothing sent");
    assert_eq!(
        used_flags(&txq),
        0,
        "TX: kicks wanted while the worker sleeps"
    );
    assert_eq!(used_flags(&rxq), 1);
    // Served again after the sleep: quiet again.
    slot.quiet_kicks(1, tx.get_mut().get_queue_mut(), &snapshot);
    assert_eq!(used_flags(&txq), 1);
}
