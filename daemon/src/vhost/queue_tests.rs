//! Unit tests of `vhost::queue` on mock split queues (virtio-queue's `MockSplitQueue`).

use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::{
    Queue,
    desc::{RawDescriptor, split::Descriptor as SplitDescriptor},
    mock::MockSplitQueue,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::*;

const NEXT: u16 = VRING_DESC_F_NEXT as u16;
const WRITE: u16 = VRING_DESC_F_WRITE as u16;

fn memory() -> GuestMemoryMmap<()> {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
}

/// What the general path makes of each of `chains` (read into a 2 KiB room).
fn general_verdicts(
    chains: &[Option<DescriptorChain<&GuestMemoryMmap<()>>>],
    mem: &GuestMemoryMmap<()>,
) -> Vec<TxChain> {
    chains
        .iter()
        .map(|c| read_tx_into(c.clone().unwrap(), mem, &mut [0u8; 2048]))
        .collect()
}

/// The same 1 MiB as [`memory`], as two adjacent regions with their border at 0x8000.
fn two_regions() -> GuestMemoryMmap<()> {
    GuestMemoryMmap::from_ranges(&[
        (GuestAddress(0), 0x8000),
        (GuestAddress(0x8000), 0x10_0000 - 0x8000),
    ])
    .unwrap()
}

fn desc(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
    RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next))
}

fn frame(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 + 3) as u8).collect()
}

fn used(vq: &MockSplitQueue<'_, GuestMemoryMmap<()>>, i: usize) -> (u32, u32) {
    let e = vq.used().ring().ref_at(i).unwrap().load();
    (e.id(), e.len())
}

#[test]
fn tx_reads_a_frame_split_over_descriptors() {
    let mem = memory();
    let vq = MockSplitQueue::new(&mem, 16);
    let data = frame(HDR_LEN + 100);
    mem.write_slice(&data[..20], GuestAddress(0x1_0000))
        .unwrap();
    mem.write_slice(&data[20..], GuestAddress(0x2_0000))
        .unwrap();
    vq.add_desc_chains(
        &[
            desc(0x1_0000, 20, NEXT, 1),
            desc(0x2_0000, (data.len() - 20) as u32, 0, 0),
        ],
        0,
    )
    .unwrap();
    let mut q: Queue = vq.create_queue().unwrap();
    let chain = pop(&mut q, &mem).unwrap().unwrap();
    let mut buf = [0u8; TX_BUF];
    assert_eq!(read_tx(chain, &mem, &mut buf), TxChain::Frame(100));
    assert_eq!(&buf[..data.len()], &data[..]);
    assert!(pop(&mut q, &mem).unwrap().is_none());
}

#[test]
fn tx_refuses_hostile_chains() {
    let cases: Vec<(&str, Vec<RawDescriptor>, TxChain)> = vec![
        (
            "outside guest memory",
            vec![desc(0xffff_0000, 100, 0, 0)],
            TxChain::Malformed,
        ),
        (
            "straddling the end of memory",
            vec![desc(0x10_0000 - 10, 100, 0, 0)],
            TxChain::Malformed,
        ),
        (
            "a loop",
            vec![desc(0x1_0000, 64, NEXT, 1), desc(0x2_0000, 64, NEXT, 0)],
            TxChain::Malformed,
        ),
        (
            "next past the queue",
            vec![desc(0x1_0000, 64, NEXT, 200)],
            TxChain::Malformed,
        ),
        (
            "device-writable",
            vec![desc(0x1_0000, 64, WRITE, 0)],
            TxChain::Malformed,
        ),
        (
            "shorter than the headers",
            vec![desc(0x1_0000, (HDR_LEN + 13) as u32, 0, 0)],
            TxChain::Malformed,
        ),
        (
            "longer than a jumbo frame",
            vec![desc(0x1_0000, (TX_BUF + 1) as u32, 0, 0)],
            TxChain::Oversize,
        ),
        (
            "zero length",
            vec![desc(0x1_0000, 0, 0, 0)],
            TxChain::Malformed,
        ),
    ];
    for (what, descs, want) in cases {
        let mem = memory();
        let vq = MockSplitQueue::new(&mem, 16);
        vq.add_desc_chains(&descs, 0).unwrap();
        let mut q: Queue = vq.create_queue().unwrap();
        let chain = pop(&mut q, &mem).unwrap().unwrap();
        assert_eq!(
            check_tx(chain.clone(), &mem, TX_BUF - HDR_LEN),
            want,
            "{what}: checked without reading"
        );
        let mut frame = [0u8; TX_BUF - HDR_LEN];
        assert_eq!(
            read_tx_into(chain.clone(), &mem, &mut frame),
            want,
            "{what}: into a frame"
        );
        let mut buf = [0u8; TX_BUF];
        assert_eq!(read_tx(chain, &mem, &mut buf), want, "{what}");
    }
}

#[test]
fn an_avail_index_jumping_past_the_queue_size_breaks_the_queue() {
    let mem = memory();
    let vq = MockSplitQueue::new(&mem, 16);
    vq.avail().idx().store(u16::to_le(17));
    let mut q: Queue = vq.create_queue().unwrap();
    assert_eq!(pop(&mut q, &mem).err(), Some(Broken));
}

#[test]
fn rx_writes_header_and_frame_into_one_chain() {
    let mem = memory();
    let vq = MockSplitQueue::new(&mem, 16);
    vq.add_desc_chains(&[desc(0x1_0000, 2048, WRITE, 0)], 0)
        .unwrap();
    let mut q: Queue = vq.create_queue().unwrap();
    let f = frame(1000);
    assert_eq!(
        write_rx(&mut q, &mem, &f, false, None),
        Ok(RxWrite::Written(1))
    );
    let mut got = vec![0u8; HDR_LEN + 1000];
    mem.read_slice(&mut got, GuestAddress(0x1_0000)).unwrap();
    assert_eq!(u16::from_le_bytes([got[10], got[11]]), 1, "num_buffers");
    assert_eq!(&got[HDR_LEN..], &f[..]);
    assert_eq!(used(&vq, 0), (0, (HDR_LEN + 1000) as u32));
}

#[test]
fn rx_without_mrg_drops_a_frame_too_big_for_the_chain() {
    let mem = memory();
    let vq = MockSplitQueue::new(&mem, 16);
    vq.add_desc_chains(&[desc(0x1_0000, 512, WRITE, 0)], 0)
        .unwrap();
    let mut q: Queue = vq.create_queue().unwrap();
    assert_eq!(
        write_rx(&mut q, &mem, &frame(1000), false, None),
        Ok(RxWrite::TooSmall)
    );
    assert_eq!(used(&vq, 0), (0, 0));
}

#[test]
fn rx_with_mrg_spreads_a_frame_and_waits_for_buffers() {
    let mem = memory();
    let vq = MockSplitQueue::new(&mem, 16);
    // Two 512-byte buffers, the first split 4 + 508 so that the header straddles descriptors.
    vq.add_desc_chains(
        &[
            desc(0x1_0000, 4, WRITE | NEXT, 1),
            desc(0x1_1000, 508, WRITE, 0),
            desc(0x2_0000, 512, WRITE, 0),
        ],
        0,
    )
    .unwrap();
    let mut q: Queue = vq.create_queue().unwrap();
    let f = frame(1200);
    assert_eq!(
        write_rx(&mut q, &mem, &f, true, None),
        Ok(RxWrite::NoBuffers),
        "1212 bytes need three"
    );
    assert_eq!(vq.used().idx().load(), 0, "nothing used");
    vq.add_desc_chains(&[desc(0x3_0000, 512, WRITE, 0)], 3)
        .unwrap();
    assert_eq!(
        write_rx(&mut q, &mem, &f, true, None),
        Ok(RxWrite::Written(3))
    );
    let mut hdr = [0u8; HDR_LEN];
    mem.read_slice(&mut hdr[..4], GuestAddress(0x1_0000))
        .unwrap();
    mem.read_slice(&mut hdr[4..], GuestAddress(0x1_1000))
        .unwrap();
    assert_eq!(
        u16::from_le_bytes([hdr[10], hdr[11]]),
        3,
        "num_buffers across a split header"
    );
    let mut got = vec![0u8; 1200];
    mem.read_slice(&mut got[..500], GuestAddress(0x1_1000 + 8))
        .unwrap();
    mem.read_slice(&mut got[500..1012], GuestAddress(0x2_0000))
        .unwrap();
    mem.read_slice(&mut got[1012..], GuestAddress(0x3_0000))
        .unwrap();
    assert_eq!(got, f);
    assert_eq!(
        (used(&vq, 0), used(&vq, 1), used(&vq, 2)),
        ((0, 512), (2, 512), (3, 188))
    );
}

#[test]
fn rx_chains_outside_memory_are_completed_empty() {
    let mem = memory();
    let vq = MockSplitQueue::new(&mem, 16);
    vq.add_desc_chains(&[desc(0xfff0_0000, 2048, WRITE, 0)], 0)
        .unwrap();
    let mut q: Queue = vq.create_queue().unwrap();
    assert_eq!(
        write_rx(&mut q, &mem, &frame(100), true, None),
        Ok(RxWrite::Malformed)
    );
    assert_eq!(used(&vq, 0), (0, 0));
    let vq2 = MockSplitQueue::new(&mem, 16);
    vq2.add_desc_chains(&[desc(0x1_0000, 2048, 0, 0)], 0)
        .unwrap();
    let mut q2: Queue = vq2.create_queue().unwrap();
    assert_eq!(
        write_rx(&mut q2, &mem, &frame(100), true, None),
        Ok(RxWrite::Malformed),
        "device-readable RX buffer"
    );
}

#[test]
fn a_driver_without_event_idx_is_asked_not_to_kick_while_polled_and_to_kick_before_sleep() {
    let mem = memory();
    let vq = MockSplitQueue::new(&mem, 16);
    let mut q: Queue = vq.create_queue().unwrap();
    let flags = |mem: &GuestMemoryMmap<()>| mem.read_obj::<u16>(vq.used_addr()).unwrap();
    quiet_kicks(&mut q, &mem).unwrap();
    assert_eq!(flags(&mem), 1, "VRING_USED_F_NO_NOTIFY while polled");
    assert!(!want_kicks(&mut q, &mem).unwrap(), "nothing to take");
    assert_eq!(flags(&mem), 0, "kicks wanted before sleeping");
    // The driver sent a chain (without kicking: the flag was set) before the worker slept.
    quiet_kicks(&mut q, &mem).unwrap();
    vq.add_desc_chains(&[desc(0x1_0000, 64, 0, 0)], 0).unwrap();
    assert!(want_kicks(&mut q, &mem).unwrap(), "look again, not sleep");
}

#[test]
fn a_driver_without_event_idx_that_polls_is_not_called() {
    let mem = memory();
    let vq = MockSplitQueue::new(&mem, 16);
    let mut q: Queue = vq.create_queue().unwrap();
    assert!(needs_call(&mut q, &mem), "interrupts wanted by default");
    // VRING_AVAIL_F_NO_INTERRUPT: a polling driver (DPDK's virtio PMD) reads no eventfd.
    mem.write_obj(1u16, vq.avail_addr()).unwrap();
    assert!(!needs_call(&mut q, &mem));
}

#[test]
fn with_event_idx_a_chain_added_before_the_worker_sleeps_is_found() {
    let mem = memory();
    let vq = MockSplitQueue::new(&mem, 16);
    vq.add_desc_chains(&[desc(0x1_0000, 64, 0, 0)], 0).unwrap();
    let mut q: Queue = vq.create_queue().unwrap();
    q.set_event_idx(true);
    assert!(pop(&mut q, &mem).unwrap().is_some());
    assert!(!want_kicks(&mut q, &mem).unwrap(), "all taken: sleep");
    // The guest adds a chain after the worker's last look, without kicking (its avail
    // index passes no `avail_event` the worker set before): the worker must not sleep.
    vq.add_desc_chains(&[desc(0x2_0000, 64, 0, 0)], 1).unwrap();
    assert!(want_kicks(&mut q, &mem).unwrap(), "look again, not sleep");
    let avail_event: u16 = mem
        .read_obj(vq.used_addr().checked_add(4 + 8 * 16).unwrap())
        .unwrap();
    assert_eq!(
        avail_event, 1,
        "kick when the avail index passes the backend's position"
    );
}

// Most UsedBurst tests lay out their own rings: virtio-queue's mock puts its used ring over
// the end of its avail ring (`used_event` is the second used entry's length), which only a
// test without EVENT_IDX can use (as the one of rings across two regions does).
const AVAIL: u64 = 0x1000;
const USED: u64 = 0x2000;

/// A ready 16-entry queue whose avail ring is at `AVAIL` and used ring at `USED`.
fn laid_out_queue(mem: &GuestMemoryMmap<()>) -> Queue {
    let mut q = Queue::new(16).unwrap();
    q.set_size(16);
    q.set_desc_table_address(Some(0), Some(0));
    q.set_avail_ring_address(Some(AVAIL as u32), Some(0));
    q.set_used_ring_address(Some(USED as u32), Some(0));
    q.set_ready(true);
    assert!(q.is_valid(mem));
    q
}

/// Used entry `i` as the driver reads it: (chain head, length).
fn used_at(mem: &GuestMemoryMmap<()>, i: u64) -> (u32, u32) {
    let at = GuestAddress(USED + 4 + 8 * i);
    (
        mem.read_obj(at).unwrap(),
        mem.read_obj(at.checked_add(4).unwrap()).unwrap(),
    )
}

/// The used index the driver sees.
fn used_idx(mem: &GuestMemoryMmap<()>) -> u16 {
    mem.read_obj(GuestAddress(USED + 2)).unwrap()
}

/// Sets the driver's `used_event` (EVENT_IDX), after the avail ring's 16 entries.
fn set_used_event(mem: &GuestMemoryMmap<()>, at: u16) {
    mem.write_obj(at, GuestAddress(AVAIL + 4 + 2 * 16)).unwrap();
}

#[test]
fn a_burst_of_used_entries_is_seen_by_the_driver_only_when_published() {
    let mem = memory();
    let mut q = laid_out_queue(&mem);
    let mut burst = UsedBurst::new(&q);
    for (head, len) in [(4, 0), (7, 60), (2, 1514)] {
        burst.push(&SplitRing::new(&q, &mem), head, len).unwrap();
    }
    assert_eq!(burst.len(), 3);
    assert_eq!(used_idx(&mem), 0, "nothing visible before publish");
    assert_eq!(used_at(&mem, 0), (4, 0));
    assert_eq!(used_at(&mem, 1), (7, 60));
    assert_eq!(used_at(&mem, 2), (2, 1514));
    assert!(
        burst.publish(&mut q, &mem).unwrap(),
        "interrupts wanted by default"
    );
    assert_eq!(used_idx(&mem), 3);
    assert_eq!(q.next_used(), 3);
    // The next burst goes on from there.
    let mut burst = UsedBurst::new(&q);
    burst.push(&SplitRing::new(&q, &mem), 9, 0).unwrap();
    burst.publish(&mut q, &mem).unwrap();
    assert_eq!(used_at(&mem, 3), (9, 0));
    assert_eq!(used_idx(&mem), 4);
}

#[test]
fn an_empty_burst_publishes_nothing_and_calls_nobody() {
    let mem = memory();
    let mut q = laid_out_queue(&mem);
    let burst = UsedBurst::new(&q);
    assert!(burst.is_empty());
    assert!(!burst.publish(&mut q, &mem).unwrap());
    assert_eq!(used_idx(&mem), 0);
}

#[test]
fn a_head_outside_the_queue_is_refused_and_not_written() {
    let mem = memory();
    let q = laid_out_queue(&mem);
    let mut burst = UsedBurst::new(&q);
    assert_eq!(burst.push(&SplitRing::new(&q, &mem), 16, 0), Err(Broken));
    assert!(burst.is_empty());
    assert_eq!(used_at(&mem, 0), (0, 0));
}

#[test]
fn an_event_idx_driver_is_called_when_its_used_event_falls_in_the_burst() {
    let mem = memory();
    let mut q = laid_out_queue(&mem);
    q.set_event_idx(true);
    let publish = |q: &mut Queue, n: u16| {
        let mut burst = UsedBurst::new(q);
        for head in 0..n {
            burst.push(&SplitRing::new(q, &mem), head, 0).unwrap();
        }
        burst.publish(q, &mem).unwrap()
    };
    // Entries 0, 1, 2; the driver wants to hear once entry 1 is used.
    set_used_event(&mem, 1);
    assert!(publish(&mut q, 3));
    // Entries 3, 4, 5: 1 is behind, so no call.
    assert!(!publish(&mut q, 3));
    // Entries 6, 7, 8 with the event at 8 (the burst's last entry), then at 9 (the next).
    set_used_event(&mem, 8);
    assert!(publish(&mut q, 3));
    set_used_event(&mem, 9);
    assert!(!publish(&mut q, 0), "no entries, no call");
    assert!(publish(&mut q, 1));
}

#[test]
fn a_burst_wraps_around_the_ring_and_the_index() {
    let mem = memory();
    let mut q = laid_out_queue(&mem);
    q.set_event_idx(true);
    q.set_next_used(65534);
    let mut burst = UsedBurst::new(&q);
    for head in [1, 2, 3, 4] {
        burst.push(&SplitRing::new(&q, &mem), head, 0).unwrap();
    }
    // 65534 % 16 = 14: the entries take slots 14, 15, 0, 1; the index wraps to 2, past an
    // event at 65535.
    set_used_event(&mem, 65535);
    assert!(burst.publish(&mut q, &mem).unwrap());
    assert_eq!(used_at(&mem, 14), (1, 0));
    assert_eq!(used_at(&mem, 15), (2, 0));
    assert_eq!(used_at(&mem, 0), (3, 0));
    assert_eq!(used_at(&mem, 1), (4, 0));
    assert_eq!(used_idx(&mem), 2);
    assert_eq!(q.next_used(), 2);
}

#[test]
fn a_polling_driver_is_not_called_after_a_burst() {
    let mem = memory();
    let mut q = laid_out_queue(&mem);
    // VRING_AVAIL_F_NO_INTERRUPT, as DPDK's virtio PMD sets.
    mem.write_obj(1u16, GuestAddress(AVAIL)).unwrap();
    let mut burst = UsedBurst::new(&q);
    burst.push(&SplitRing::new(&q, &mem), 0, 0).unwrap();
    assert!(!burst.publish(&mut q, &mem).unwrap());
    assert_eq!(used_idx(&mem), 1);
}

#[test]
fn a_linear_chain_is_read_ahead_with_the_verdicts_of_the_general_path() {
    let mem = memory();
    let vq = MockSplitQueue::new(&mem, 16);
    let data = frame(HDR_LEN + 100);
    mem.write_slice(&data, GuestAddress(0x1_0000)).unwrap();
    mem.write_slice(&data, GuestAddress(0x2_0000)).unwrap();
    // 0: one descriptor; 1: the same frame in two; 2: too short for an Ethernet header;
    // 3: device-writable; 4: outside memory; 5: one descriptor again.
    vq.add_desc_chains(
        &[
            desc(0x1_0000, (HDR_LEN + 100) as u32, 0, 0),
            desc(0x2_0000, 20, NEXT, 2),
            desc(0x2_0000 + 20, (HDR_LEN + 80) as u32, 0, 0),
            desc(0x3_0000, (HDR_LEN + 13) as u32, 0, 0),
            desc(0x4_0000, 200, WRITE, 0),
            desc(0x7000_0000, 200, 0, 0),
            desc(0x1_0000, (HDR_LEN + 100) as u32, 0, 0),
        ],
        0,
    )
    .unwrap();
    let mut q: Queue = vq.create_queue().unwrap();
    let mut chains = [const { None }; 8];
    assert_eq!(pop_burst(&mut q, &mem, &mut chains).unwrap(), 6);
    let mut linear = [const { None }; 8];
    look_ahead(&SplitRing::new(&q, &mem), &chains[..6], &mut linear[..6]);
    let found: Vec<bool> = linear.iter().map(Option::is_some).collect();
    assert_eq!(
        found,
        [true, false, false, false, false, true, false, false]
    );
    // Nothing was taken or changed by looking.
    assert!(chains[..6].iter().all(Option::is_some));
    assert_eq!(q.next_avail(), 6);
    let l = linear[0].as_ref().unwrap();
    assert_eq!(l.frame_len(), 100);
    assert_eq!(l.dst(), data[HDR_LEN..HDR_LEN + 6]);
    // The copy and its verdict are read_tx_into's, in a room that fits and one that does not.
    for room in [100, 150, 99] {
        let mut fast = vec![0u8; room];
        let mut general = vec![0u8; room];
        let chain = chains[0].clone().unwrap();
        assert_eq!(
            l.read_into(&mut fast),
            read_tx_into(chain, &mem, &mut general)
        );
        assert_eq!(fast, general);
    }
    assert_eq!(l.read_into(&mut [0u8; 99]), TxChain::Oversize);
    // The others, left to the general path, are judged there.
    assert_eq!(
        general_verdicts(&chains[1..5], &mem),
        [
            TxChain::Frame(100),
            TxChain::Malformed,
            TxChain::Malformed,
            TxChain::Malformed
        ]
    );
}

#[test]
fn bursts_and_single_used_entries_on_one_queue_leave_no_event_uncalled() {
    // The CPU path publishes bursts; DMA completions add entries one by one and ask
    // virtio-queue (its own count since its last check). Every entry falls in one window.
    let mem = memory();
    let mut q = laid_out_queue(&mem);
    q.set_event_idx(true);
    let burst = |q: &mut Queue, heads: std::ops::Range<u16>| {
        let mut b = UsedBurst::new(q);
        for h in heads {
            b.push(&SplitRing::new(q, &mem), h, 0).unwrap();
        }
        b.publish(q, &mem).unwrap()
    };
    // A burst of 0, 1, 2 with the event at 5: no call.
    set_used_event(&mem, 5);
    assert!(!burst(&mut q, 0..3));
    // Entries 3, 4, 5 one by one: the event is among them.
    for h in 3..6 {
        q.add_used(&mem, h, 0).unwrap();
    }
    assert!(needs_call(&mut q, &mem));
    // A burst of 6, 7 with the event at 6: called.
    set_used_event(&mem, 6);
    assert!(burst(&mut q, 6..8));
    assert_eq!(used_idx(&mem), 8);
    // One more entry (8) with the event at 7, already passed: no call.
    set_used_event(&mem, 7);
    q.add_used(&mem, 8, 0).unwrap();
    assert!(!needs_call(&mut q, &mem));
}

#[test]
fn a_linear_chain_gives_the_general_paths_verdict_bytes_and_destination_whatever_the_guest_wrote() {
    // Two adjacent memory regions, descriptors across their border, at their ends and
    // outside memory; lengths from 0 to near u32::MAX; NEXT and WRITE flags; rooms around
    // a frame's size. Wherever look_ahead finds a Linear chain, it must agree with
    // read_tx_into and peek_dst.
    let mem = two_regions();
    let mut seed = 0x1234_5678_9abc_def0u64;
    let mut rnd = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let mut linear_seen = 0;
    for _ in 0..20_000 {
        let vq = MockSplitQueue::new(&mem, 16);
        let addr = match rnd() % 4 {
            0 => 0x8000 - (rnd() % 64),
            1 => 0x10_0000 - (rnd() % 4096),
            2 => 0x3_0000,
            _ => 0x20_0000,
        };
        let len = match rnd() % 5 {
            0 => (rnd() % 40) as u32,
            1 => 2048 - 26 + (rnd() % 60) as u32,
            2 => (HDR_LEN + 14) as u32,
            3 => (rnd() % 5000) as u32,
            _ => u32::MAX - (rnd() % 3) as u32,
        };
        let flags = [0, NEXT, WRITE][(rnd() % 3) as usize];
        let next = (rnd() % 20) as u16;
        vq.add_desc_chains(&[desc(addr, len, flags, next)], 0)
            .unwrap();
        let mut q: Queue = vq.create_queue().unwrap();
        let mut chains = [const { None }; 1];
        assert_eq!(pop_burst(&mut q, &mem, &mut chains).unwrap(), 1);
        let mut linear = [const { None }; 1];
        look_ahead(&SplitRing::new(&q, &mem), &chains, &mut linear);
        let room = [2048usize - 26, 2048 - 12, 2036, 1514, 100][(rnd() % 5) as usize];
        let mut general = vec![0u8; room];
        let verdict = read_tx_into(chains[0].clone().unwrap(), &mem, &mut general);
        let dst = peek_dst(chains[0].as_ref().unwrap(), &mem);
        if let Some(l) = &linear[0] {
            linear_seen += 1;
            let mut fast = vec![0u8; room];
            assert_eq!(
                l.read_into(&mut fast),
                verdict,
                "addr {addr:#x} len {len} flags {flags} room {room}"
            );
            assert_eq!(Some(l.dst()), dst);
            assert_eq!(fast, general);
        }
    }
    assert!(linear_seen > 100, "only {linear_seen} linear chains");
}

#[test]
fn rings_across_two_regions_are_read_and_written_alike_through_vm_memory() {
    // Two adjacent regions. The queue's descriptor table straddles their border (0x7f80),
    // or its used ring does (0x7e80): that ring is then reached through vm-memory, with the
    // same results as through the mapping (0x4_0000). (A misaligned ring cannot be set:
    // virtio-queue refuses it.) The buffers alternate between the regions (the remembered
    // region changes), one straddles the border, one is an indirect descriptor and one
    // chain's head is outside the table: none of those three is linear.
    let mem = two_regions();
    let len = HDR_LEN + 60;
    let buffers = [0x1000u64, 0x2_0000, 0x1800, 0x8000 - 40, 0x3_0000];
    for (i, &at) in buffers.iter().enumerate() {
        let mut data = frame(len);
        data[HDR_LEN] = i as u8;
        mem.write_slice(&data, GuestAddress(at)).unwrap();
    }
    let indirect = VRING_DESC_F_INDIRECT as u16;
    for (start, by_pointer) in [
        (0x7f80u64, (false, true)),
        (0x7e80, (true, false)),
        (0x4_0000, (true, true)),
    ] {
        let vq = MockSplitQueue::create(&mem, GuestAddress(start), 16);
        let descs: Vec<RawDescriptor> = buffers
            .iter()
            .enumerate()
            .map(|(i, &at)| desc(at, len as u32, if i == 4 { indirect } else { 0 }, 0))
            .collect();
        for (i, d) in descs.iter().enumerate() {
            vq.add_desc_chains(std::slice::from_ref(d), i as u16)
                .unwrap();
        }
        // A sixth chain whose head, as the avail ring gives it, is outside the table.
        vq.add_desc_chains(&descs[..1], 5).unwrap();
        vq.avail()
            .ring()
            .ref_at(5)
            .unwrap()
            .store(u16::to_le(16 + 4));
        let mut q: Queue = vq.create_queue().unwrap();
        let mut chains = [const { None }; 8];
        assert_eq!(pop_burst(&mut q, &mem, &mut chains).unwrap(), 6);
        assert_eq!(chains[5].as_ref().unwrap().head_index(), 20);
        let ring = SplitRing::new(&q, &mem);
        assert_eq!(
            (ring.desc.is_some(), ring.used.is_some()),
            by_pointer,
            "queue at {start:#x}"
        );
        let mut linear = [const { None }; 8];
        look_ahead(&ring, &chains[..6], &mut linear[..6]);
        let found: Vec<bool> = linear[..6].iter().map(Option::is_some).collect();
        assert_eq!(
            found,
            [true, true, true, false, false, false],
            "queue at {start:#x}"
        );
        for i in 0..3 {
            let l = linear[i].as_ref().unwrap();
            assert_eq!(l.dst()[0], i as u8);
            let (mut fast, mut general) = (vec![0u8; 2048], vec![0u8; 2048]);
            assert_eq!(
                l.read_into(&mut fast),
                read_tx_into(chains[i].clone().unwrap(), &mem, &mut general)
            );
            assert_eq!(fast, general);
        }
        // The general path's verdicts on the others: the straddling buffer is still a frame;
        // the indirect descriptor (whose table is not a whole number of descriptors) and the
        // head outside the table are malformed.
        assert_eq!(
            general_verdicts(&chains[3..6], &mem),
            [TxChain::Frame(60), TxChain::Malformed, TxChain::Malformed]
        );
        let mut burst = UsedBurst::new(&q);
        for head in [4u16, 0, 3, 1, 2] {
            burst.push(&ring, head, u32::from(head) * 10).unwrap();
        }
        assert_eq!(burst.push(&ring, 16, 0), Err(Broken));
        burst.publish(&mut q, &mem).unwrap();
        let entries: Vec<(u32, u32)> = (0..5).map(|i| used(&vq, i)).collect();
        assert_eq!(
            entries,
            [(4, 40), (0, 0), (3, 30), (1, 10), (2, 20)],
            "queue at {start:#x}"
        );
        assert_eq!(vq.used().idx().load(), 5);
    }
}

#[test]
fn the_lines_loaded_ahead_are_exactly_those_holding_the_bytes_asked_for() {
    for skew in [0, 1, 12, 63] {
        for (from, to) in [
            (0, 0),
            (0, 1),
            (0, 76),
            (128, 76),
            (128, 1526),
            (63, 65),
            (64, 64),
        ] {
            let got: Vec<usize> = line_offsets(skew, from, to).collect();
            let mut want: Vec<usize> = (from..to).map(|b| (skew + b) / 64 * 64).collect();
            want.dedup();
            assert_eq!(got, want, "skew {skew}, bytes {from}..{to}");
        }
    }
}

/// Writes an indirect table at `at` of `n` descriptors of `len` bytes each, linked by NEXT,
/// their buffers one after another from `buffers`; `flags` added to each.
fn indirect_table(mem: &GuestMemoryMmap<()>, at: u64, n: u16, len: u32, flags: u16, buffers: u64) {
    for i in 0..n {
        let next = if i + 1 < n { NEXT } else { 0 };
        let d = desc(
            buffers + u64::from(i) * u64::from(len),
            len,
            flags | next,
            i + 1,
        );
        mem.write_obj(d, GuestAddress(at + 16 * u64::from(i)))
            .unwrap();
    }
}

/// The verdicts on the first chain of `vq`'s avail ring, for a frame of `room` bytes, of the
/// copy, the check of a chain dropped unread, and the walk for a DMA channel (each given the
/// chain afresh).
fn tx_verdicts(
    vq: &MockSplitQueue<'_, GuestMemoryMmap<()>>,
    mem: &GuestMemoryMmap<()>,
    room: usize,
) -> [TxChain; 3] {
    let chain = || {
        let mut q: Queue = vq.create_queue().unwrap();
        pop(&mut q, mem).unwrap().unwrap()
    };
    [
        read_tx_into(chain(), mem, &mut vec![0u8; room]),
        check_tx(chain(), mem, room),
        // As the DMA path takes them: pieces of guest memory.
        tx_pieces(chain(), mem, room, |addr, _, n| {
            GuestMemory::check_range(mem, addr, n, vm_memory::Permissions::Read)
        }),
    ]
}

#[test]
fn a_tx_chain_of_more_descriptors_than_a_frame_may_span_is_malformed() {
    // An indirect table may list 65535 descriptors, which virtio-queue follows: a chain
    // through one of MAX_DESCRIPTORS + 1 is malformed on every path; one of MAX_DESCRIPTORS
    // is a frame.
    let indirect = VRING_DESC_F_INDIRECT as u16;
    let max = MAX_DESCRIPTORS as u16;
    for (n, want) in [
        (max, TxChain::Frame(MAX_DESCRIPTORS * 8 - HDR_LEN)),
        (max + 1, TxChain::Malformed),
        (4096, TxChain::Malformed),
    ] {
        let mem = memory();
        let vq = MockSplitQueue::new(&mem, 16);
        indirect_table(&mem, 0x8_0000, n, 8, 0, 0x9_0000);
        vq.add_desc_chains(&[desc(0x8_0000, 16 * u32::from(n), indirect, 0)], 0)
            .unwrap();
        assert_eq!(tx_verdicts(&vq, &mem, 2048), [want; 3], "{n} descriptors");
        // The destination lies in the first three descriptors.
        let mut q: Queue = vq.create_queue().unwrap();
        assert!(peek_dst(&pop(&mut q, &mem).unwrap().unwrap(), &mem).is_some());
    }
}

#[test]
fn a_tx_chain_whose_destination_lies_past_max_descriptors_has_none() {
    // MAX_DESCRIPTORS empty descriptors, then the header and frame.
    let mem = memory();
    let vq = MockSplitQueue::new(&mem, 16);
    let n = MAX_DESCRIPTORS as u16;
    indirect_table(&mem, 0x8_0000, n, 0, 0, 0x9_0000);
    let last = desc(0x9_0000, 100, 0, 0);
    mem.write_obj(last, GuestAddress(0x8_0000 + 16 * u64::from(n)))
        .unwrap();
    // The table's last empty descriptor leads on to the frame.
    mem.write_obj(
        desc(0x9_0000, 0, NEXT, n),
        GuestAddress(0x8_0000 + 16 * u64::from(n - 1)),
    )
    .unwrap();
    let indirect = VRING_DESC_F_INDIRECT as u16;
    vq.add_desc_chains(&[desc(0x8_0000, 16 * (u32::from(n) + 1), indirect, 0)], 0)
        .unwrap();
    let mut q: Queue = vq.create_queue().unwrap();
    let chain = pop(&mut q, &mem).unwrap().unwrap();
    assert_eq!(peek_dst(&chain, &mem), None);
    assert_eq!(
        read_tx_into(chain, &mem, &mut [0u8; 2048]),
        TxChain::Malformed
    );
}

#[test]
fn an_rx_frame_may_span_max_descriptors_over_all_its_chains_and_no_more() {
    // Chains through indirect tables of 128 four-byte descriptors each (512 bytes a chain),
    // every descriptor of a chain the frame takes walked (those past its end too). A
    // 1000-byte frame takes two chains, 256 descriptors: exactly the limit. A 1500-byte
    // frame needs a third, whose first descriptor is the 257th: the three chains taken are
    // completed empty, the frame dropped.
    let indirect = VRING_DESC_F_INDIRECT as u16;
    for (len, want) in [(1000, RxWrite::Written(2)), (1500, RxWrite::Malformed)] {
        let mem = memory();
        let vq = MockSplitQueue::new(&mem, 16);
        let heads: Vec<RawDescriptor> = (0..4u64)
            .map(|c| {
                let table = 0x8_0000 + c * 0x1000;
                indirect_table(&mem, table, 128, 4, WRITE, 0x9_0000 + c * 0x1000);
                desc(table, 16 * 128, indirect, 0)
            })
            .collect();
        for (i, h) in heads.iter().enumerate() {
            vq.add_desc_chains(std::slice::from_ref(h), i as u16)
                .unwrap();
        }
        let mut q: Queue = vq.create_queue().unwrap();
        assert_eq!(
            write_rx(&mut q, &mem, &frame(len), true, None),
            Ok(want),
            "{len} bytes"
        );
        if want == RxWrite::Malformed {
            assert_eq!(
                (used(&vq, 0), used(&vq, 1), used(&vq, 2)),
                ((0, 0), (1, 0), (2, 0))
            );
            assert_eq!(vq.used().idx().load(), 3);
        } else {
            assert_eq!((used(&vq, 0), used(&vq, 1)), ((0, 512), (1, 500)));
        }
    }
}

#[test]
fn a_huge_linear_descriptor_is_loaded_ahead_only_as_far_as_the_largest_frame() {
    // A descriptor may be as long as a region (here 200 MiB of a lazily mapped 256 MiB):
    // loading all of it ahead would take the worker as long as reading it. The chain is
    // linear, loaded as far as TX_BUF, and oversize.
    let mem: GuestMemoryMmap<()> =
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 256 << 20)]).unwrap();
    let vq = MockSplitQueue::new(&mem, 16);
    mem.write_slice(&frame(HDR_LEN + 14), GuestAddress(0x10_0000))
        .unwrap();
    vq.add_desc_chains(&[desc(0x10_0000, 200 << 20, 0, 0)], 0)
        .unwrap();
    let mut q: Queue = vq.create_queue().unwrap();
    let mut chains = [const { None }; 1];
    assert_eq!(pop_burst(&mut q, &mem, &mut chains).unwrap(), 1);
    let ring = SplitRing::new(&q, &mem);
    let mut linear = [const { None }; 1];
    look_ahead(&ring, &chains, &mut linear);
    let l = linear[0]
        .as_ref()
        .expect("one descriptor in one piece is linear");
    assert_eq!(l.rest_to_load(), HEAD_PREFETCH..TX_BUF);
    l.prefetch_rest();
    assert_eq!(l.read_into(&mut [0u8; 2048]), TxChain::Oversize);
}

#[test]
fn an_oversize_chain_is_oversize_on_every_path_whatever_lies_past_the_room() {
    // A frame too long for its room, whose last descriptor points outside guest memory: the
    // copy never reaches that descriptor, and neither does the check of a chain dropped
    // unread, so both call it oversize.
    let mem = memory();
    let vq = MockSplitQueue::new(&mem, 16);
    mem.write_slice(&frame(HDR_LEN + 1500), GuestAddress(0x1_0000))
        .unwrap();
    vq.add_desc_chains(
        &[
            desc(0x1_0000, (HDR_LEN + 1500) as u32, NEXT, 1),
            desc(0xdead_0000_0000, 1000, 0, 0),
        ],
        0,
    )
    .unwrap();
    assert_eq!(tx_verdicts(&vq, &mem, 2048), [TxChain::Oversize; 3]);
    // With room for all of it, the tail is reached: malformed everywhere.
    assert_eq!(tx_verdicts(&vq, &mem, MAX_FRAME), [TxChain::Malformed; 3]);
}
