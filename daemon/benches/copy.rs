//! `cargo xtask bench copy`: what a copy costs the submitting core, by size, cache-hot and
//! cache-cold, done by the CPU or handed to the `sw` channel (worker on the other core);
//! the `sw` channel's end-to-end latency; and what the threshold calibration measures
//! (CPU copy, submitter time, sustained period, lone-copy latency, core time offloaded)
//! and picks.
//!
//! The submitting thread runs on CPU 0 and the sw worker on CPU 1 when the machine has two.

use std::{
    hint::black_box,
    time::{Duration, Instant},
};

use criterion::{BenchmarkId, Criterion, Throughput};
use xvio::copy::{
    DmaChannel,
    calibrate::{Model, calibrate, pick},
    sw::{SwChannel, SwConfig},
};

const SIZES: [usize; 7] = [64, 256, 512, 1024, 1500, 4096, 9000];
/// Cold copies walk through areas this large (beyond the last-level cache).
const AREA: usize = 64 << 20;
const BURST: usize = 32;

/// Source and destination offsets for copy `i`: the same two buffers when hot, a fresh page
/// on each side when cold.
fn offsets(size: usize, cold: bool, i: usize) -> (usize, usize) {
    if !cold {
        return (0, 0);
    }
    let stride = size.next_multiple_of(4096) + 4096;
    let slots = (AREA - size) / stride;
    ((i % slots) * stride, ((i + slots / 2) % slots) * stride)
}

fn pin_self(core: usize) {
    let mut set = nix::sched::CpuSet::new();
    if set.set(core).is_ok() {
        let _ = nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set);
    }
}

fn bench_cpu(c: &mut Criterion, src: &[u8], dst: &mut [u8]) {
    let mut group = c.benchmark_group("cpu_copy");
    for cold in [false, true] {
        for size in SIZES {
            group.throughput(Throughput::Bytes(size as u64));
            let id = BenchmarkId::new(if cold { "cold" } else { "hot" }, size);
            let mut i = 0;
            group.bench_function(id, |b| {
                b.iter(|| {
                    let (s, d) = offsets(size, cold, i);
                    i += 1;
                    dst[d..d + size].copy_from_slice(black_box(&src[s..s + size]));
                })
            });
        }
    }
    group.finish();
}

/// Time the submitting core spends in copy + submit + completed, per copy, in bursts of 32;
/// waits for a full channel are not counted.
fn bench_sw_submit(c: &mut Criterion, ch: &mut SwChannel, src: &[u8], dst: &mut [u8]) {
    let mut group = c.benchmark_group("sw_submit");
    for cold in [false, true] {
        for size in SIZES {
            group.throughput(Throughput::Bytes(size as u64));
            let id = BenchmarkId::new(if cold { "cold" } else { "hot" }, size);
            group.bench_function(id, |b| {
                b.iter_custom(|iters| {
                    let mut spent = Duration::ZERO;
                    let mut i = 0usize;
                    let mut left = iters as usize;
                    while left > 0 {
                        let n = left.min(BURST);
                        while usize::from(ch.burst_capacity()) < n {
                            ch.completed(u16::MAX);
                        }
                        let start = Instant::now();
                        for _ in 0..n {
                            let (s, d) = offsets(size, cold, i);
                            i += 1;
                            // SAFETY: both ranges lie in live buffers that outlive the
                            // benchmark; concurrent copies to one hot dst write equal bytes.
                            unsafe {
                                ch.copy(src[s..].as_ptr(), dst[d..].as_mut_ptr(), size as u32)
                            }
                            .unwrap();
                        }
                        ch.submit().unwrap();
                        ch.completed(u16::MAX);
                        spent += start.elapsed();
                        left -= n;
                    }
                    while ch.burst_capacity() < 4096 {
                        ch.completed(u16::MAX);
                    }
                    spent
                })
            });
        }
    }
    group.finish();
}

/// One copy, submitted and waited for: the latency a packet sees.
fn bench_sw_latency(c: &mut Criterion, ch: &mut SwChannel, src: &[u8], dst: &mut [u8]) {
    let mut group = c.benchmark_group("sw_roundtrip");
    for cold in [false, true] {
        for size in SIZES {
            let id = BenchmarkId::new(if cold { "cold" } else { "hot" }, size);
            let mut i = 0;
            group.bench_function(id, |b| {
                b.iter(|| {
                    let (s, d) = offsets(size, cold, i);
                    i += 1;
                    // SAFETY: as above; the copy completes before the next iteration.
                    unsafe { ch.copy(src[s..].as_ptr(), dst[d..].as_mut_ptr(), size as u32) }
                        .unwrap();
                    ch.submit().unwrap();
                    while ch.completed(1).count == 0 {
                        std::hint::spin_loop();
                    }
                })
            });
        }
    }
    group.finish();
}

fn main() {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    pin_self(0);
    let worker_core = (cores > 1).then_some(1);
    let src = vec![0x5au8; AREA];
    let mut dst = vec![0xa5u8; AREA];
    let mut ch = SwChannel::start(
        "sw0",
        &SwConfig {
            core: worker_core,
            ..SwConfig::default()
        },
    )
    .unwrap();
    let mut c = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .configure_from_args();
    bench_cpu(&mut c, &src, &mut dst);
    bench_sw_submit(&mut c, &mut ch, &src, &mut dst);
    bench_sw_latency(&mut c, &mut ch, &src, &mut dst);
    c.final_summary();

    // What the automatic threshold would choose on this machine, now (median of 5 runs).
    let mut thresholds: Vec<u32> = (0..5)
        .map(|_| calibrate(&mut ch, 2000).unwrap().threshold)
        .collect();
    thresholds.sort_unstable();
    let cal = calibrate(&mut ch, 2000).unwrap();
    println!(
        "calibration (sw channel {}, 2000 cold copies per size; {:?}):",
        ch.name(),
        cal.model
    );
    println!("   size |   cpu ns | submit ns | period ns | latency ns | offload, all cores ns");
    for p in &cal.points {
        println!(
            "  {:>5} | {:>8.1} | {:>9.1} | {:>9.1} | {:>10.1} | {:>8.1}",
            p.size,
            p.cpu_ns,
            p.offload_ns,
            p.period_ns,
            p.latency_ns,
            cal.model.offload_core_ns(p)
        );
    }
    println!("threshold: {}", cal.describe());
    let words = |t: u32| match t {
        u32::MAX => "never".to_owned(),
        t => format!("{t} B"),
    };
    println!(
        "auto threshold, 5 runs: [{}]; median {}",
        thresholds
            .iter()
            .map(|&t| words(t))
            .collect::<Vec<_>>()
            .join(", "),
        words(thresholds[2])
    );
    // The same measurements judged as if the channel were a device (no host core), to show
    // what the host core costs.
    let device = Model {
        host_core: false,
        ..cal.model
    };
    println!(
        "the same channel counted as a device (no host core): threshold {}",
        words(pick(&cal.points, &device))
    );
}
