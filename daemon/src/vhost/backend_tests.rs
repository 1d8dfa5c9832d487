//! Unit tests of the backend's event handling on vrings in plain guest memory: what it does
//! before memory arrives, with a queue the frontend has not started, and when the guest has
//! fewer RX buffers than a frame needs. Each would hang the worker (spin forever holding the
//! vring's lock) or write into guest memory through a queue that is not set up, without the
//! checks they test.

use std::{
    sync::{atomic::Ordering, mpsc},
    time::Duration,
};

use vhost_user_backend::VringT;
use virtio_bindings::virtio_net::VIRTIO_NET_F_MRG_RXBUF;
use virtio_queue::{
    QueueT,
    desc::{RawDescriptor, split::Descriptor as SplitDescriptor},
    mock::MockSplitQueue,
};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryAtomic, GuestMemoryMmap};

use super::*;
use crate::config::MacAddr;

const MAC: MacAddr = MacAddr([2, 0, 0, 0, 0, 1]);
const WRITE: u16 = virtio_bindings::virtio_ring::VRING_DESC_F_WRITE as u16;
/// Long enough for any of these calls; they take microseconds when they return at all.
const RETURNS_WITHIN: Duration = Duration::from_secs(5);

fn memory() -> GuestMem {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
}

/// A backend of one queue pair with a frame waiting in its mailbox.
fn backend_with_a_frame(frame_len: usize) -> (NetBackend, Arc<Port>) {
    let switch = Switch::new();
    let port = switch.add_port(MAC).unwrap();
    let backend = NetBackend::new("t", Arc::clone(&port), switch, 1, None).unwrap();
    let mut frame = vec![0u8; frame_len];
    frame[..6].copy_from_slice(&MAC.0);
    assert!(port.mailbox().push(&frame));
    port.mailbox().notify();
    (backend, port)
}

/// Runs `handle_event` on another thread; `None` if it did not return in time (the thread is
/// left spinning: the test fails anyway).
fn handle(
    mut backend: NetBackend,
    event: u16,
    vrings: Vec<Vring>,
) -> Option<(NetBackend, Vec<Vring>)> {
    let (done, wait) = mpsc::channel();
    std::thread::spawn(move || {
        backend
            .handle_event(event, EventSet::IN, &vrings, 0)
            .unwrap();
        let _ = done.send((backend, vrings));
    });
    wait.recv_timeout(RETURNS_WITHIN).ok()
}

fn mailbox_wakeup_pending(port: &Port) -> bool {
    port.mailbox().event().read().is_ok()
}

#[test]
fn before_memory_arrives_the_mailbox_wakeup_is_consumed() {
    let (backend, port) = backend_with_a_frame(60);
    let atomic = GuestMemoryAtomic::new(memory());
    let vrings = vec![
        Vring::new(atomic.clone(), 256).unwrap(),
        Vring::new(atomic, 256).unwrap(),
    ];
    // The level-triggered eventfd, left readable, makes the worker's epoll return at once,
    // again and again, until a memory table arrives.
    assert!(handle(backend, mailbox_event(2), vrings).is_some());
    assert!(!mailbox_wakeup_pending(&port), "wake-up consumed");
    assert_eq!(port.mailbox().pending(), 1, "the frame waits");
}

#[test]
fn a_queue_that_is_not_ready_is_not_touched() {
    let (mut backend, port) = backend_with_a_frame(60);
    let mem = memory();
    // What a booted x86 guest has at address 2 (the real-mode interrupt table): read through
    // a queue whose ring addresses are still 0, it looks like an avail index with work.
    mem.write_obj(0x1234u16, GuestAddress(2)).unwrap();
    let atomic = GuestMemoryAtomic::new(mem.clone());
    backend.update_memory(atomic.clone()).unwrap();
    backend.set_event_idx(true);
    let rx = Vring::new(atomic.clone(), 256).unwrap();
    rx.set_queue_event_idx(true);
    let vrings = vec![rx, Vring::new(atomic, 256).unwrap()];
    let Some((_, vrings)) = handle(backend, mailbox_event(2), vrings) else {
        panic!("handle_event spun on a queue that is not ready");
    };
    // `avail_event` of a 256-entry used ring at address 0.
    let avail_event: u16 = mem.read_obj(GuestAddress(4 + 8 * 256)).unwrap();
    assert_eq!(avail_event, 0, "nothing written through the queue");
    assert!(!mailbox_wakeup_pending(&port), "wake-up consumed");
    assert_eq!(port.mailbox().pending(), 1, "the frame waits for the queue");
    assert!(!vrings[0].get_ref().get_queue().ready());
}

/// An RX vring on `mem`'s mock queue, started and enabled, with EVENT_IDX.
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
    let (mut backend, port) = backend_with_a_frame(3000);
    let mem = memory();
    let vq = MockSplitQueue::create(&mem, GuestAddress(0x1_0000), 16);
    vq.add_desc_chains(&[rx_buffer(0x2_0000, 2048)], 0).unwrap();
    let atomic = GuestMemoryAtomic::new(mem.clone());
    backend.update_memory(atomic.clone()).unwrap();
    backend.set_event_idx(true);
    backend.acked_features((1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_NET_F_MRG_RXBUF));
    let vrings = vec![started_rx(&vq, &atomic), Vring::new(atomic, 256).unwrap()];
    let Some((backend, vrings)) = handle(backend, mailbox_event(2), vrings) else {
        panic!("handle_event spun while the guest had too few RX buffers");
    };
    assert_eq!(port.mailbox().pending(), 1, "the frame waits");
    assert_eq!(vq.used().idx().load(), 0, "nothing used");
    // The guest has made 1 buffer available: it must kick when it adds the next one, so
    // `avail_event` is 1 (the backend's own position, 0, lies behind the guest already).
    let avail_event: u16 = mem
        .read_obj(vq.used_addr().checked_add(4 + 8 * 16).unwrap())
        .unwrap();
    assert_eq!(avail_event, 1);

    // The guest adds a second buffer and kicks: the frame goes into both.
    vq.add_desc_chains(&[rx_buffer(0x3_0000, 2048)], 1).unwrap();
    let Some(_) = handle(backend, 0, vrings) else {
        panic!("handle_event did not return");
    };
    assert_eq!(port.mailbox().pending(), 0);
    assert_eq!(vq.used().idx().load(), 2, "one frame in two buffers");
    assert_eq!(port.counters().rx_packets.load(Ordering::Relaxed), 1);
}

#[test]
fn stopping_a_vring_clears_its_broken_flag_and_waiting_frames() {
    let (mut backend, port) = backend_with_a_frame(60);
    backend.broken[0] = true;
    backend.broken[1] = true;
    backend.stop_vring(1).unwrap();
    assert!(!backend.broken[1], "TX queue serves again after a restart");
    assert_eq!(
        port.mailbox().pending(),
        1,
        "RX frames untouched by a TX stop"
    );
    backend.stop_vring(0).unwrap();
    assert!(!backend.broken[0]);
    assert_eq!(port.mailbox().pending(), 0);
    assert_eq!(port.counters().rx_dropped_reset.load(Ordering::Relaxed), 1);
}
