//! Tests of the copy engine against the scripted mock channel: order, exactly-once release,
//! byte-exact destinations and dirty logging under every fault the script can produce.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use proptest::prelude::*;

use super::{
    engine::{CopyEngine, DirtyLog, Segment},
    mock::{MockChannel, Script},
    pool::{ChannelPool, QueueRef},
};

#[derive(Default)]
struct Dirty(Mutex<Vec<(u64, usize)>>);

impl DirtyLog for Dirty {
    fn mark_dirty(&self, guest_addr: u64, len: usize) {
        self.0.lock().unwrap().push((guest_addr, len));
    }
}

/// Packets of segments with their source bytes and destination buffers.
struct Fixture {
    src: Vec<Vec<u8>>,
    dst: Vec<Vec<u8>>,
    /// For each packet, the indexes of its segments in `src`/`dst`.
    packets: Vec<Vec<usize>>,
}

impl Fixture {
    fn new(shapes: &[Vec<u32>]) -> Fixture {
        let mut f = Fixture {
            src: Vec::new(),
            dst: Vec::new(),
            packets: Vec::new(),
        };
        for (p, lens) in shapes.iter().enumerate() {
            let mut segs = Vec::new();
            for (s, &len) in lens.iter().enumerate() {
                let seed = (p * 31 + s * 7) as u8;
                f.src.push(
                    (0..len)
                        .map(|i| seed.wrapping_add(i as u8).wrapping_mul(13) | 1)
                        .collect(),
                );
                f.dst.push(vec![0u8; len as usize]);
                segs.push(f.src.len() - 1);
            }
            f.packets.push(segs);
        }
        f
    }

    fn segments(&mut self, packet: usize) -> Vec<Segment> {
        self.packets[packet]
            .iter()
            .map(|&i| {
                let len = self.src[i].len() as u32;
                Segment::new(self.src[i].as_ptr(), self.dst[i].as_mut_ptr(), len)
                    .into_guest(i as u64 * 0x1_0000)
            })
            .collect()
    }
}

fn bound(script: Script, threshold: u32) -> super::pool::BoundChannel {
    let mut pool = ChannelPool::new();
    pool.add(Box::new(MockChannel::new(script)), threshold);
    pool.bind(
        "mock",
        QueueRef {
            device: "test".into(),
            queue: 0,
        },
    )
    .unwrap()
}

/// Runs every packet through an engine with `script`, in bursts of `burst`, polling between
/// bursts; returns the release order and the engine's stats.
fn run(
    shapes: &[Vec<u32>],
    script: Option<Script>,
    threshold: u32,
    burst: usize,
) -> (Vec<usize>, Fixture, Arc<Dirty>, super::CopyStats) {
    let mut fx = Fixture::new(shapes);
    let dirty = Arc::new(Dirty::default());
    let mut engine: CopyEngine<usize> = CopyEngine::new(32, Some(dirty.clone()));
    if let Some(script) = script {
        engine.bind(bound(script, threshold)).unwrap();
    }
    let mut released = Vec::new();
    let mut next = 0;
    let mut idle = 0;
    while next < shapes.len() {
        let mut n = 0;
        while n < burst && next < shapes.len() {
            let segs = fx.segments(next);
            // SAFETY: the fixture's buffers outlive the engine run and are not touched
            // until every packet came back.
            if unsafe { engine.enqueue(next, &segs) }.is_err() {
                break;
            }
            next += 1;
            n += 1;
        }
        engine.flush();
        if engine.poll_completed(usize::MAX, |t| released.push(t)) == 0 && n == 0 {
            idle += 1;
            assert!(idle < 100_000, "no progress");
        }
    }
    engine
        .drain(Duration::from_secs(5), |t| released.push(t))
        .unwrap();
    let stats = engine.stats();
    (released, fx, dirty, stats)
}

fn check(shapes: &[Vec<u32>], released: &[usize], fx: &Fixture, dirty: &Dirty) {
    assert_eq!(
        released,
        (0..shapes.len()).collect::<Vec<_>>(),
        "in order, exactly once"
    );
    for (i, (s, d)) in fx.src.iter().zip(&fx.dst).enumerate() {
        assert!(s == d, "segment {i} ({} B) has wrong bytes", s.len());
    }
    let mut marked = dirty.0.lock().unwrap().clone();
    marked.sort_unstable();
    marked.dedup();
    let want: Vec<(u64, usize)> = fx
        .src
        .iter()
        .enumerate()
        .map(|(i, s)| (i as u64 * 0x1_0000, s.len()))
        .collect();
    // Every written segment is marked; a re-copied one may be marked twice (dedup above).
    for w in &want {
        assert!(
            marked.binary_search(w).is_ok(),
            "segment at {:#x} not marked dirty",
            w.0
        );
    }
}

#[test]
fn without_a_channel_everything_is_copied_by_the_cpu() {
    let shapes = vec![vec![60], vec![1500, 40], vec![9000]];
    let (released, fx, dirty, stats) = run(&shapes, None, 0, 4);
    check(&shapes, &released, &fx, &dirty);
    assert_eq!((stats.cpu_copies, stats.dma_copies), (4, 0));
}

#[test]
fn the_threshold_splits_cpu_and_dma() {
    let shapes = vec![vec![64, 1500], vec![100], vec![2048, 2048, 10]];
    let (released, fx, dirty, stats) = run(&shapes, Some(Script::default()), 512, 8);
    check(&shapes, &released, &fx, &dirty);
    assert_eq!((stats.cpu_copies, stats.dma_copies), (3, 3), "{stats:?}");
    assert_eq!(stats.dma_bytes, 1500 + 4096);
}

#[test]
fn failed_operations_are_redone_on_the_cpu() {
    let shapes: Vec<Vec<u32>> = (0..200).map(|i| vec![256 + i, 1000]).collect();
    let script = Script {
        fail: 300,
        ..Script::default()
    };
    let (released, fx, dirty, stats) = run(&shapes, Some(script), 0, 16);
    check(&shapes, &released, &fx, &dirty);
    assert!(stats.fallback_error > 0, "{stats:?}");
    // A packet with a failed copy has all its DMA copies redone on the CPU.
    assert_eq!(stats.dma_copies + stats.cpu_copies, 400, "{stats:?}");
    assert!(stats.cpu_copies >= stats.fallback_error, "{stats:?}");
}

#[test]
fn failed_submits_lose_nothing() {
    let shapes: Vec<Vec<u32>> = (0..100).map(|i| vec![100 + i]).collect();
    let script = Script {
        fail_submit: 500,
        ..Script::default()
    };
    let (released, fx, dirty, stats) = run(&shapes, Some(script), 0, 8);
    check(&shapes, &released, &fx, &dirty);
    assert!(stats.fallback_submit > 0, "{stats:?}");
    assert_eq!(stats.dma_copies + stats.cpu_copies, 100);
    assert_eq!(
        stats.cpu_copies, stats.fallback_submit,
        "one-copy packets: each lost submit is one CPU copy"
    );
}

#[test]
fn a_full_channel_sends_whole_packets_to_the_cpu() {
    let shapes: Vec<Vec<u32>> = (0..50).map(|_| vec![600, 600, 600]).collect();
    let script = Script {
        capacity: 4,
        progress: 1,
        ..Script::default()
    };
    let (released, fx, dirty, stats) = run(&shapes, Some(script), 0, 8);
    check(&shapes, &released, &fx, &dirty);
    assert!(stats.fallback_full > 0, "{stats:?}");
    assert_eq!(stats.fallback_full % 3, 0, "never half a packet: {stats:?}");
}

#[test]
fn refused_enqueues_mid_packet_fall_back_for_the_rest() {
    let shapes: Vec<Vec<u32>> = (0..100).map(|_| vec![300, 300, 300, 300]).collect();
    let script = Script {
        refuse_enqueue: 200,
        ..Script::default()
    };
    let (released, fx, dirty, stats) = run(&shapes, Some(script), 0, 8);
    check(&shapes, &released, &fx, &dirty);
    assert!(stats.fallback_enqueue > 0, "{stats:?}");
}

#[test]
fn binding_twice_is_refused_and_unbind_drains() {
    let mut engine: CopyEngine<u32> = CopyEngine::new(8, None);
    engine.bind(bound(Script::default(), 0)).unwrap();
    let busy = engine.bind(bound(Script::default(), 0)).unwrap_err();
    assert_eq!(busy.current, "mock");
    let src = vec![7u8; 4096];
    let mut dst = vec![0u8; 4096];
    // SAFETY: both buffers outlive the engine's use of them (unbind drains below).
    unsafe { engine.enqueue(1, &[Segment::new(src.as_ptr(), dst.as_mut_ptr(), 4096)]) }.unwrap();
    let mut back = Vec::new();
    let channel = engine
        .unbind(Duration::from_secs(1), |t| back.push(t))
        .unwrap();
    assert_eq!(back, [1]);
    assert_eq!(dst, src);
    assert_eq!(channel.unwrap().name(), "mock");
    assert_eq!(engine.channel_name(), None);
}

#[test]
fn drain_gives_up_on_a_stuck_channel() {
    let mut engine: CopyEngine<u32> = CopyEngine::new(8, None);
    engine
        .bind(bound(
            Script {
                progress: 0,
                ..Script::default()
            },
            0,
        ))
        .unwrap();
    let src = [7u8; 64];
    let mut dst = vec![0u8; 64];
    // SAFETY: the buffers outlive the engine (dropped at the end of the test, after it).
    unsafe { engine.enqueue(1, &[Segment::new(src.as_ptr(), dst.as_mut_ptr(), 64)]) }.unwrap();
    let err = engine.drain(Duration::from_millis(20), |_| {}).unwrap_err();
    assert_eq!(err.inflight, 1);
    assert!(
        err.to_string().contains("'mock' completed nothing"),
        "{err}"
    );
    std::mem::forget(engine); // the stuck op still points into `dst`; never release it
}

#[test]
fn a_full_tracker_hands_the_packet_back() {
    let mut engine: CopyEngine<u32> = CopyEngine::new(2, None);
    engine
        .bind(bound(
            Script {
                progress: 0,
                ..Script::default()
            },
            0,
        ))
        .unwrap();
    let src = [1u8; 64];
    let mut dst = [vec![0u8; 64], vec![0u8; 64]];
    for (i, d) in dst.iter_mut().enumerate() {
        // SAFETY: the buffers outlive the engine (forgotten below, never released).
        unsafe { engine.enqueue(i as u32, &[Segment::new(src.as_ptr(), d.as_mut_ptr(), 64)]) }
            .unwrap();
    }
    let mut third = vec![0u8; 64];
    // SAFETY: as above.
    let back = unsafe { engine.enqueue(9, &[Segment::new(src.as_ptr(), third.as_mut_ptr(), 64)]) };
    assert_eq!(back, Err(9));
    assert_eq!(engine.room(), 0);
    std::mem::forget(engine);
}

fn shapes_strategy() -> impl Strategy<Value = Vec<Vec<u32>>> {
    prop::collection::vec(prop::collection::vec(0u32..3000, 1..5), 1..120)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    #[test]
    fn any_script_releases_every_packet_once_in_order_with_correct_bytes(
        shapes in shapes_strategy(),
        seed in any::<u64>(),
        threshold in prop_oneof![Just(0u32), 0u32..3000, Just(u32::MAX)],
        capacity in 1u16..64,
        fail in prop_oneof![Just(0u16), 0u16..1000],
        refuse_enqueue in prop_oneof![Just(0u16), 0u16..500],
        fail_submit in prop_oneof![Just(0u16), 0u16..500],
        progress in 1usize..16,
        burst in 1usize..40,
    ) {
        let script = Script { seed, capacity, fail, refuse_enqueue, fail_submit, progress };
        let (released, fx, dirty, stats) = run(&shapes, Some(script), threshold, burst);
        check(&shapes, &released, &fx, &dirty);
        let copies: u64 = shapes.iter().map(|p| p.len() as u64).sum();
        prop_assert_eq!(stats.cpu_copies + stats.dma_copies, copies, "every copy counted once where it finally happened: {:?}", stats);
        prop_assert_eq!(stats.packets, shapes.len() as u64);
        prop_assert_eq!(stats.inflight, 0);
    }
}
