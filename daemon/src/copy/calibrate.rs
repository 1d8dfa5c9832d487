//! The automatic copy threshold: for each channel, the smallest copy size from which handing
//! the copy to the channel costs the submitting core less than doing it itself.
//!
//! Measured the way the datapath meets it: destinations cold (each copy lands in a fresh
//! part of a buffer larger than the last-level cache), sources likewise, copies in bursts of
//! 32 with one doorbell per burst. The submitter's cost for the channel is the time spent in
//! `copy`, `submit` and `completed` calls; time spent waiting for a full channel to drain is
//! not counted (a datapath would do other work then). A CPU channel never pays off.

use std::time::{Duration, Instant};

use super::channel::{ChannelKind, DmaChannel, DmaError};

/// Copy sizes measured.
pub const SIZES: [u32; 8] = [64, 128, 256, 512, 1024, 1518, 4096, 9000];
/// Bytes of each of the source and destination areas (larger than the LLC of the machines
/// this runs on, so that copies miss the cache as guest buffers do).
const AREA: usize = 64 << 20;
const BURST: usize = 32;

/// The measured cost of one size.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Point {
    /// Copy size in bytes.
    pub size: u32,
    /// ns per copy done by the CPU.
    pub cpu_ns: f64,
    /// ns per copy the submitting core spends handing it to the channel.
    pub offload_ns: f64,
}

/// What calibration found.
#[derive(Clone, Debug, PartialEq)]
pub struct Calibration {
    /// Copies shorter than this go to the CPU (`u32::MAX`: never use the channel).
    pub threshold: u32,
    /// The measurements behind it.
    pub points: Vec<Point>,
}

impl Calibration {
    /// The threshold as words for the log.
    pub fn describe(&self) -> String {
        match self.threshold {
            u32::MAX => "never (the CPU is cheaper at every size)".to_owned(),
            t => format!("{t} B"),
        }
    }
}

/// Measures `channel` with `copies` copies per size and picks the threshold: the smallest
/// size from which the channel is cheaper at that and every larger size.
pub fn calibrate(channel: &mut dyn DmaChannel, copies: usize) -> Result<Calibration, DmaError> {
    if channel.kind() == ChannelKind::Cpu {
        return Ok(Calibration {
            threshold: u32::MAX,
            points: Vec::new(),
        });
    }
    let src = vec![0x5au8; AREA];
    // Written, not just allocated: first-touch page faults would be charged to whoever
    // touches the page first, the CPU or the channel.
    let mut dst = vec![0xa5u8; AREA];
    let mut points = Vec::with_capacity(SIZES.len());
    for size in SIZES {
        let cpu = cpu_cost(&src, &mut dst, size as usize, copies);
        let offload = offload_cost(channel, &src, &mut dst, size as usize, copies)?;
        points.push(Point {
            size,
            cpu_ns: per_copy(cpu, copies),
            offload_ns: per_copy(offload, copies),
        });
    }
    let threshold = pick(&points);
    Ok(Calibration { threshold, points })
}

/// The smallest size from which the channel wins at every larger size too.
pub fn pick(points: &[Point]) -> u32 {
    let mut threshold = u32::MAX;
    for p in points.iter().rev() {
        if p.offload_ns < p.cpu_ns {
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

fn offload_cost(
    channel: &mut dyn DmaChannel,
    src: &[u8],
    dst: &mut [u8],
    size: usize,
    copies: usize,
) -> Result<Duration, DmaError> {
    let mut spent = Duration::ZERO;
    let mut outstanding = 0usize;
    let pairs: Vec<(usize, usize)> = offsets(size, copies).collect();
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
    let deadline = Instant::now() + Duration::from_secs(5);
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
    Ok(spent)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::copy::{
        cpu::CpuChannel,
        sw::{SwChannel, SwConfig},
    };

    fn point(size: u32, cpu_ns: f64, offload_ns: f64) -> Point {
        Point {
            size,
            cpu_ns,
            offload_ns,
        }
    }

    #[test]
    fn picks_the_start_of_the_winning_tail() {
        let pts = [
            point(64, 10.0, 20.0),
            point(256, 30.0, 25.0),
            point(512, 40.0, 50.0),
            point(1024, 80.0, 30.0),
            point(4096, 300.0, 30.0),
        ];
        assert_eq!(pick(&pts), 1024, "256 wins alone but 512 loses again");
        assert_eq!(pick(&[point(64, 10.0, 20.0)]), u32::MAX);
        assert_eq!(pick(&[point(64, 30.0, 20.0), point(128, 40.0, 20.0)]), 64);
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
        assert!(
            c.points
                .iter()
                .all(|p| p.cpu_ns > 0.0 && p.offload_ns > 0.0),
            "{c:?}"
        );
        assert!(SIZES.contains(&c.threshold) || c.threshold == u32::MAX);
        assert_eq!(ch.completed(u16::MAX).count, 0, "nothing left in flight");
        assert_eq!(usize::from(ch.burst_capacity()), 4096);
    }
}
