//! The automatic copy threshold: for each channel, the smallest copy size from which handing
//! copies to the channel gives the datapath more throughput per core than copying on the
//! CPU, counting every core the offloaded copy uses.
//!
//! The model (docs/copy-engine.md has it with this machine's numbers). For a copy of size
//! `s`, with the datapath core saturated (when it is not, either choice keeps up):
//! - on the CPU, the datapath core spends `cpu_ns(s)`, and no other core anything;
//! - offloaded, the datapath core spends `offload_ns(s)` writing descriptors and reading
//!   completions, but it cannot retire copies faster than the channel does: not faster than
//!   the channel's sustained period `period_ns(s)`, nor than Little's law allows with the
//!   `depth` copies a queue keeps in flight, `latency_ns(s) / depth`. It waits, in order, for
//!   the slower of the two; so the datapath core's time per copy is the largest of the three.
//!   A channel that copies on a host core of its own (`sw`) also keeps that core busy for
//!   its period per copy (the worker spins while there is work); a device (`dsa`) uses none.
//!
//! Throughput per core is copies over the core time all cores spent, so the channel wins at
//! `s` when `max(offload_ns, period_ns, latency_ns / depth) + host_ns < cpu_ns`, with
//! `host_ns = period_ns` for a channel on a host core and 0 for a device. The threshold is
//! the smallest measured size from which that holds at every larger size too. A CPU channel
//! never pays off; a `sw` channel, whose worker copies as fast as the datapath core would,
//! costs two cores for one copy and does not either.
//!
//! Measured the way the datapath meets it: destinations cold (each copy lands in a fresh
//! part of a buffer larger than the last-level cache), sources likewise. `offload_ns` is the
//! submitting core's time in `copy`, `submit` and `completed` calls with copies in bursts of
//! 32 and one doorbell per burst, not counting waits for room; `period_ns` is the wall time of
//! that whole run per copy (the channel kept busy); `latency_ns` is the median time from the
//! doorbell to the completion of a lone copy.
//!
//! [`pick`] is a pure function of the measurements and the [`Model`], tested apart from
//! timing.

use std::time::{Duration, Instant};

use super::channel::{ChannelKind, DmaChannel, DmaError};

/// Copy sizes measured.
pub const SIZES: [u32; 8] = [64, 128, 256, 512, 1024, 1518, 4096, 9000];
/// Packets a datapath queue keeps in flight at most: a guest RX queue's limit
/// (`datapath::to_guest::MAX_INFLIGHT`), one copy each for frames that fit one guest buffer.
pub const DATAPATH_DEPTH: u32 = 256;
/// Bytes of each of the source and destination areas (larger than the LLC of the machines
/// this runs on, so that copies miss the cache as guest buffers do).
const AREA: usize = 64 << 20;
const BURST: usize = 32;
/// Lone copies timed per size for the latency.
const LONE_COPIES: usize = 101;
/// How long a channel may take to finish its calibration copies.
const DEADLINE: Duration = Duration::from_secs(5);

/// The measured cost of one size.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Point {
    /// Copy size in bytes.
    pub size: u32,
    /// ns per copy done by the CPU.
    pub cpu_ns: f64,
    /// ns per copy the submitting core spends handing it to the channel.
    pub offload_ns: f64,
    /// ns per copy of wall time with the channel kept busy: its sustained period.
    pub period_ns: f64,
    /// ns from the doorbell to the completion of a lone copy (median).
    pub latency_ns: f64,
}

/// What decides the cost of an offloaded copy besides the measurements.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Model {
    /// Copies a datapath queue keeps in flight at most.
    pub depth: u32,
    /// The channel copies on a host core of its own, busy for its period per copy.
    pub host_core: bool,
}

impl Model {
    /// The model of a channel of `kind` that holds `capacity` operations: depth is the
    /// smaller of that and [`DATAPATH_DEPTH`]; only `sw` runs on a host core.
    pub fn of(kind: ChannelKind, capacity: u16) -> Model {
        Model {
            depth: u32::from(capacity).clamp(1, DATAPATH_DEPTH),
            host_core: kind == ChannelKind::Sw,
        }
    }

    /// ns of core time, over all cores involved, one offloaded copy costs.
    pub fn offload_core_ns(&self, p: &Point) -> f64 {
        let in_flight = p.latency_ns / f64::from(self.depth.max(1));
        let datapath = p.offload_ns.max(p.period_ns).max(in_flight);
        let host = if self.host_core { p.period_ns } else { 0.0 };
        datapath + host
    }
}

/// What calibration found.
#[derive(Clone, Debug, PartialEq)]
pub struct Calibration {
    /// Copies shorter than this go to the CPU (`u32::MAX`: never use the channel).
    pub threshold: u32,
    /// The measurements behind it.
    pub points: Vec<Point>,
    /// The model they were judged with.
    pub model: Model,
}

impl Calibration {
    /// The threshold and the core times behind it, as words for the log.
    pub fn describe(&self) -> String {
        let at = |size: u32| self.points.iter().find(|p| p.size == size);
        match (self.threshold, self.points.last()) {
            (u32::MAX, None) => "never (the CPU channel copies on the CPU)".to_owned(),
            (u32::MAX, Some(p)) => format!(
                "never (offloaded, a copy costs the cores more than on the CPU at every size; \
                 at {} B {:.0} ns against {:.0} ns)",
                p.size,
                self.model.offload_core_ns(p),
                p.cpu_ns
            ),
            (t, _) => match at(t) {
                Some(p) => format!(
                    "{t} B (offloaded, a {t} B copy costs the cores {:.0} ns against {:.0} ns \
                     on the CPU)",
                    self.model.offload_core_ns(p),
                    p.cpu_ns
                ),
                None => format!("{t} B"),
            },
        }
    }
}

/// Measures `channel` with `copies` copies per size and picks the threshold (see the module
/// doc). The channel must be idle; it is idle again when this returns.
pub fn calibrate(channel: &mut dyn DmaChannel, copies: usize) -> Result<Calibration, DmaError> {
    let model = Model::of(channel.kind(), channel.burst_capacity());
    if channel.kind() == ChannelKind::Cpu {
        return Ok(Calibration {
            threshold: u32::MAX,
            points: Vec::new(),
            model,
        });
    }
    let src = vec![0x5au8; AREA];
    // Written, not just allocated: first-touch page faults would be charged to whoever
    // touches the page first, the CPU or the channel.
    let mut dst = vec![0xa5u8; AREA];
    let mut points = Vec::with_capacity(SIZES.len());
    for size in SIZES {
        let cpu = cpu_cost(&src, &mut dst, size as usize, copies);
        let (offload, wall) = offload_cost(channel, &src, &mut dst, size as usize, copies)?;
        let latency = lone_latency(channel, &src, &mut dst, size as usize)?;
        points.push(Point {
            size,
            cpu_ns: per_copy(cpu, copies),
            offload_ns: per_copy(offload, copies),
            period_ns: per_copy(wall, copies),
            latency_ns: latency.as_nanos() as f64,
        });
    }
    let threshold = pick(&points, &model);
    Ok(Calibration {
        threshold,
        points,
        model,
    })
}

/// The smallest size from which offloaded copies cost all cores less time than CPU copies,
/// at that size and every larger one; `u32::MAX` when there is none.
pub fn pick(points: &[Point], model: &Model) -> u32 {
    let mut threshold = u32::MAX;
    for p in points.iter().rev() {
        if model.offload_core_ns(p) < p.cpu_ns {
            threshold = p.size;
        } else {
            break;
        }
    }
    threshold
}

fn per_copy(d: Duration, copies: usize) -> f64 {
    d.as_nanos() as f64 / copies.max(1) as f64
}

/// (source, destination) offsets that walk through the areas page by page, half an area
/// apart, so that each copy starts cold on both sides.
fn offsets(size: usize, copies: usize) -> impl Iterator<Item = (usize, usize)> {
    let stride = size.next_multiple_of(4096) + 4096;
    let slots = (AREA - size) / stride;
    (0..copies).map(move |i| ((i % slots) * stride, ((i + slots / 2) % slots) * stride))
}

fn cpu_cost(src: &[u8], dst: &mut [u8], size: usize, copies: usize) -> Duration {
    let start = Instant::now();
    for (off, dst_off) in offsets(size, copies) {
        dst[dst_off..dst_off + size].copy_from_slice(&src[off..off + size]);
    }
    std::hint::black_box(&dst);
    start.elapsed()
}

/// The submitting core's time in channel calls, and the wall time until the last copy
/// completed.
fn offload_cost(
    channel: &mut dyn DmaChannel,
    src: &[u8],
    dst: &mut [u8],
    size: usize,
    copies: usize,
) -> Result<(Duration, Duration), DmaError> {
    let mut spent = Duration::ZERO;
    let mut outstanding = 0usize;
    let pairs: Vec<(usize, usize)> = offsets(size, copies).collect();
    let begin = Instant::now();
    for burst in pairs.chunks(BURST) {
        // Wait (uncounted) until the channel has room for the burst.
        while usize::from(channel.burst_capacity()) < burst.len() {
            outstanding -= usize::from(channel.completed(u16::MAX).count);
        }
        let start = Instant::now();
        for &(s, d) in burst {
            // SAFETY: both ranges are inside `src` and `dst`, which outlive this function's
            // wait for every copy below; different bursts may write the same `dst` range
            // with the same bytes, which is harmless for a measurement.
            unsafe { channel.copy(src[s..].as_ptr(), dst[d..].as_mut_ptr(), size as u32) }?;
        }
        channel.submit()?;
        outstanding += burst.len();
        outstanding -= usize::from(channel.completed(u16::MAX).count);
        spent += start.elapsed();
    }
    wait_all(channel, outstanding)?;
    Ok((spent, begin.elapsed()))
}

/// The median time from the doorbell to the completion of one copy alone in the channel.
fn lone_latency(
    channel: &mut dyn DmaChannel,
    src: &[u8],
    dst: &mut [u8],
    size: usize,
) -> Result<Duration, DmaError> {
    let mut times = Vec::with_capacity(LONE_COPIES);
    for (s, d) in offsets(size, LONE_COPIES) {
        // SAFETY: as in `offload_cost`; the copy completes before the next one starts.
        unsafe { channel.copy(src[s..].as_ptr(), dst[d..].as_mut_ptr(), size as u32) }?;
        let start = Instant::now();
        channel.submit()?;
        wait_all(channel, 1)?;
        times.push(start.elapsed());
    }
    times.sort_unstable();
    Ok(times[times.len() / 2])
}

fn wait_all(channel: &mut dyn DmaChannel, mut outstanding: usize) -> Result<(), DmaError> {
    let deadline = Instant::now() + DEADLINE;
    while outstanding > 0 {
        let done = channel.completed(u16::MAX);
        outstanding -= usize::from(done.count);
        if done.has_error {
            return Err(DmaError::Unavailable(format!(
                "{} failed a copy during calibration",
                channel.name()
            )));
        }
        if Instant::now() > deadline {
            return Err(DmaError::Unavailable(format!(
                "{} did not complete its calibration copies",
                channel.name()
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::copy::{
        cpu::CpuChannel,
        sw::{SwChannel, SwConfig},
    };

    /// Cold copies as `cargo xtask bench copy` measured them on the 2-vCPU test machine
    /// (docs/benchmarks.md): per size, the calibration's CPU copy and submitter cost, and
    /// the `sw` channel's cold round trip from the criterion table (interpolated at 128 and
    /// 1518 B).
    const MEASURED: [(u32, f64, f64, f64); 8] = [
        (64, 144.6, 9.8, 582.0),
        (128, 115.3, 20.4, 590.0),
        (256, 116.9, 14.9, 601.0),
        (512, 187.2, 16.1, 681.0),
        (1024, 248.6, 18.8, 696.0),
        (1518, 315.0, 16.9, 852.0),
        (4096, 571.1, 7.8, 1199.0),
        (9000, 1337.5, 22.7, 1600.0),
    ];

    /// The measurements, with the channel's period and latency at size `s` given by
    /// `period(s, cpu_ns)` and `latency(s, round_trip_ns)`.
    fn points(period: impl Fn(f64, f64) -> f64, latency: impl Fn(f64, f64) -> f64) -> Vec<Point> {
        MEASURED
            .iter()
            .map(|&(size, cpu_ns, offload_ns, rtt)| Point {
                size,
                cpu_ns,
                offload_ns,
                period_ns: period(f64::from(size), cpu_ns),
                latency_ns: latency(f64::from(size), rtt),
            })
            .collect()
    }

    /// What the threshold was before: the submitting core's time against the CPU copy.
    fn submitter_only(points: &[Point]) -> u32 {
        let model = Model {
            depth: u32::MAX,
            host_core: false,
        };
        let bare: Vec<Point> = points
            .iter()
            .map(|p| Point {
                period_ns: 0.0,
                latency_ns: 0.0,
                ..*p
            })
            .collect();
        pick(&bare, &model)
    }

    #[test]
    fn a_cpu_like_channel_and_far_and_near_dma_get_different_thresholds() {
        // sw: a worker on another core copies as fast as the datapath core would (its
        // period is the CPU copy), with the measured round trips.
        let sw = points(|_, cpu| cpu, |_, rtt| rtt);
        // A DMA device on the socket (DSA-like): 30 GB/s, 1.5 µs.
        let near = points(|s, _| 10.0 + s / 30.0, |s, _| 1500.0 + s / 30.0);
        // A far-away DMA engine (across a PCIe link or another socket): same rate, 10 µs,
        // and a queue kept 64 deep.
        let far = points(|s, _| 10.0 + s / 30.0, |s, _| 10_000.0 + s / 10.0);

        let sw_model = Model::of(ChannelKind::Sw, 4096);
        let dsa_model = Model::of(ChannelKind::Dsa, 1024);
        let far_model = Model {
            depth: 64,
            ..dsa_model
        };
        assert_eq!(
            sw_model,
            Model {
                depth: 256,
                host_core: true
            }
        );
        assert_eq!(
            dsa_model,
            Model {
                depth: 256,
                host_core: false
            }
        );

        let chosen = [
            pick(&sw, &sw_model),
            pick(&far, &far_model),
            pick(&near, &dsa_model),
        ];
        // sw: two cores for one copy's worth of work, never cheaper per core. Far DMA: from
        // 512 B, where 10 µs / 64 in flight (156 ns) undercuts the CPU copy (187 ns). Near
        // DMA: everywhere.
        assert_eq!(chosen, [u32::MAX, 512, 64]);
        // The submitter-only criterion saw none of that: 64 B for all three.
        assert_eq!(
            [
                submitter_only(&sw),
                submitter_only(&far),
                submitter_only(&near)
            ],
            [64, 64, 64]
        );
    }

    #[test]
    fn every_core_the_offload_uses_is_counted() {
        let p = Point {
            size: 1500,
            cpu_ns: 170.0,
            offload_ns: 10.0,
            period_ns: 100.0,
            latency_ns: 2560.0,
        };
        let device = Model {
            depth: 256,
            host_core: false,
        };
        assert_eq!(
            device.offload_core_ns(&p),
            100.0,
            "the channel's period bounds it"
        );
        let shallow = Model {
            depth: 16,
            ..device
        };
        assert_eq!(shallow.offload_core_ns(&p), 160.0, "2560 ns / 16 in flight");
        let host = Model {
            host_core: true,
            ..device
        };
        assert_eq!(host.offload_core_ns(&p), 200.0, "plus the worker's core");
        assert_eq!(pick(&[p], &device), 1500);
        assert_eq!(pick(&[p], &host), u32::MAX);
    }

    #[test]
    fn picks_the_start_of_the_winning_tail() {
        let model = Model {
            depth: 256,
            host_core: false,
        };
        let point = |size, cpu_ns, offload_ns| Point {
            size,
            cpu_ns,
            offload_ns,
            period_ns: 0.0,
            latency_ns: 0.0,
        };
        let pts = [
            point(64, 10.0, 20.0),
            point(256, 30.0, 25.0),
            point(512, 40.0, 50.0),
            point(1024, 80.0, 30.0),
            point(4096, 300.0, 30.0),
        ];
        assert_eq!(
            pick(&pts, &model),
            1024,
            "256 wins alone but 512 loses again"
        );
        assert_eq!(pick(&[point(64, 10.0, 20.0)], &model), u32::MAX);
        assert_eq!(
            pick(&[point(64, 30.0, 20.0), point(128, 40.0, 20.0)], &model),
            64
        );
    }

    #[test]
    fn the_model_depth_is_the_vhost_rx_engines_limit() {
        assert_eq!(
            DATAPATH_DEPTH as usize,
            crate::datapath::to_guest::MAX_INFLIGHT
        );
    }

    #[test]
    fn the_log_line_says_why() {
        let cal = Calibration {
            threshold: 1500,
            points: vec![Point {
                size: 1500,
                cpu_ns: 170.0,
                offload_ns: 10.0,
                period_ns: 100.0,
                latency_ns: 0.0,
            }],
            model: Model {
                depth: 256,
                host_core: false,
            },
        };
        assert_eq!(
            cal.describe(),
            "1500 B (offloaded, a 1500 B copy costs the cores 100 ns against 170 ns on the CPU)"
        );
        let never = Calibration {
            threshold: u32::MAX,
            model: Model {
                host_core: true,
                ..cal.model
            },
            ..cal
        };
        assert_eq!(
            never.describe(),
            "never (offloaded, a copy costs the cores more than on the CPU at every size; at \
             1500 B 200 ns against 170 ns)"
        );
    }

    #[test]
    fn a_cpu_channel_never_pays_off() {
        let c = calibrate(&mut CpuChannel::new(), 100).unwrap();
        assert_eq!(c.threshold, u32::MAX);
    }

    #[test]
    fn the_sw_channel_is_measured_at_every_size_and_drained() {
        let mut ch = SwChannel::start("sw-cal", &SwConfig::default()).unwrap();
        let c = calibrate(&mut ch, 200).unwrap();
        assert_eq!(c.points.len(), SIZES.len());
        assert_eq!(
            c.model,
            Model {
                depth: 256,
                host_core: true
            }
        );
        assert!(
            c.points.iter().all(|p| p.cpu_ns > 0.0
                && p.offload_ns > 0.0
                && p.period_ns > 0.0
                && p.latency_ns > 0.0),
            "{c:?}"
        );
        assert!(SIZES.contains(&c.threshold) || c.threshold == u32::MAX);
        assert_eq!(ch.completed(u16::MAX).count, 0, "nothing left in flight");
        assert_eq!(usize::from(ch.burst_capacity()), 4096);
    }
}
