//! What forwarding costs, beside how fast it goes: the datapath process's CPU time with a
//! guest connected and no traffic; its CPU time per frame at the same paced load for every
//! datapath (64 B frames to the guest, well below what the sink drains, so that every frame
//! is delivered); and the round-trip time of pings from the peer to an icmpecho guest (a ping
//! run ends each datapath's run of the rates, so that they alternate as the rates do).
//!
//! xvio's CPU time is its threads' utime + stime (/proc/PID/task/*/stat, in clock ticks).
//! OVS's is ovs-vswitchd's the same way, which includes its PMD thread polling all the time,
//! and, from `ovs-appctl dpif-netdev/pmd-stats-show`, the PMD's processing cycles per
//! packet, which leave the polling out. testpmd's is its process's the same way (its
//! forwarding lcore polls all the time too), and, from `--record-core-cycles`, its forwarding
//! lcore's cycles in bursts that received frames per frame received, which testpmd prints only
//! when it stops: the bench restarts it after each paced load to read them.

use std::{
    process::Command,
    time::{Duration, Instant},
};

use xvio_tests::{
    bench::{
        cpu_by_thread, cpu_delta, make_current_thread_fifo, pin_current_thread, ticks_per_second,
        top_threads,
    },
    frames::{ETH_P_EXPERIMENTAL, frame},
    packet::RawSocket,
};

use crate::{
    rate::{Direction, describe},
    setup::{Bridge, GUEST, GUEST_MAC},
};

/// How long the idle CPU is measured.
pub(crate) const IDLE: Duration = Duration::from_secs(10);
/// The paced load: frames per second and for how long.
pub(crate) const PACED_PPS: u32 = 50_000;
pub(crate) const PACED: Duration = Duration::from_secs(5);
/// Bursts of the paced load: frames per generator call, one call per period (500: every
/// 10 ms; 32: every 640 µs). xvio's worker parks after 200 µs without work, so it sleeps
/// between bursts either way; OVS's PMD polls all the time.
pub(crate) const PACED_BURSTS: [u32; 2] = [500, 32];
/// Pings, and their interval.
pub(crate) const PINGS: u32 = 1000;
/// 9 ms, which ping keeps exactly. Not `-i 0.01`: with this kernel's 250 Hz tick, iputils
/// ping sends that every 16.0 ms, and 32 of those are exactly kdamond's 512 ms period, so a
/// run whose pings once met kdamond on the datapath's CPU met it on every 32nd ping (8 to 10
/// pings over 0.5 ms, for OVS-DPDK and xvio alike), and a run that started out of phase met
/// it never: p99 fell on either side by chance. 9 ms drifts through kdamond's phase.
pub(crate) const PING_INTERVAL_MS: u32 = 9;
/// The guest's address for the pings (the peer knows its MAC statically: no ARP, which
/// OVS's two flows would not carry).
const GUEST_IP: &str = "10.252.0.9";

/// Idle CPU, then CPU per frame under the paced load (each burst size), then pings; one
/// line of results.
pub(crate) fn measure(bridge: &mut Bridge) -> Result<String, String> {
    let pid = bridge.pid().ok_or("the datapath has no process")?;
    let rx = bridge.start_guest("rxonly", 64, "02:00:00:00:00:02")?;
    std::thread::sleep(Duration::from_secs(1));
    let t0 = cpu_by_thread(pid);
    std::thread::sleep(IDLE);
    let idle = cpu_delta(&t0, &cpu_by_thread(pid));
    let idle_pct = 100.0 * seconds(idle.values().sum()) / IDLE.as_secs_f64();
    drop(rx);
    bridge.wait_guest(false)?;

    let mut paced_results = Vec::new();
    for burst in PACED_BURSTS {
        paced_results.push(paced_cost(bridge, burst)?);
    }
    Ok(format!(
        "idle CPU {idle_pct:.1}% of a core | {}",
        paced_results.join(" | ")
    ))
}

/// The datapath's CPU time per frame delivered under the paced load in bursts of `burst`.
fn paced_cost(bridge: &mut Bridge, burst: u32) -> Result<String, String> {
    // testpmd's pid changes with each restart.
    let pid = bridge.pid().ok_or("the datapath has no process")?;
    let rx = bridge.start_guest("rxonly", 64, "02:00:00:00:00:02")?;
    std::thread::sleep(Duration::from_millis(500));
    if let Some(ovs) = bridge.ovs() {
        ovs.appctl(&["dpif-netdev/pmd-stats-clear"])?;
    }
    let before = bridge.snapshot()?;
    let t0 = cpu_by_thread(pid);
    let offered = paced(bridge, burst)?;
    std::thread::sleep(Duration::from_millis(300));
    let busy = cpu_delta(&t0, &cpu_by_thread(pid));
    let pmd = match bridge.ovs() {
        Some(ovs) => Some(ovs.appctl(&["dpif-netdev/pmd-stats-show"])?),
        None => None,
    };
    let delivered = rx.stop().rx;
    // xvio's counters as published with the guest's disconnection: all of the load.
    let after = bridge.final_snapshot()?;
    // Where the frames the guest did not get went, by the datapath's own counters.
    let short = if delivered < offered {
        format!(
            " (short by {}: {})",
            offered - delivered,
            describe(
                Direction::ToGuest,
                &bridge.topo.ifname,
                [&before, &after, &after]
            )
        )
    } else {
        String::new()
    };
    let testpmd = bridge.restart_testpmd()?.map_or(String::new(), |c| {
        format!(
            "; lcore busy {:.0} cycles/frame = {:.2} µs at {} MHz ({} frames)",
            c.per_frame,
            c.per_frame / c.mhz as f64,
            c.mhz,
            c.frames
        )
    });
    if delivered == 0 {
        return Err(format!(
            "{}: the guest received nothing of the paced load",
            bridge.datapath().name()
        ));
    }
    let per_frame = |ticks: u64| 1e6 * seconds(ticks) / delivered as f64;
    let breakdown = top_threads(&busy, 2)
        .iter()
        .map(|(name, t)| format!("{name} {:.2}", per_frame(*t)))
        .collect::<Vec<_>>()
        .join(", ");
    let pmd = pmd.map_or(String::new(), |out| {
        let cycles = pmd_processing_cycles_per_packet(&out);
        format!(
            "; PMD processing {} cycles/frame{}",
            cycles.map_or("?".to_owned(), |c| format!("{c:.0}")),
            match (cycles, tsc_mhz()) {
                (Some(c), Some(mhz)) => format!(" = {:.2} µs at {mhz:.0} MHz", c / mhz),
                _ => String::new(),
            }
        )
    });
    Ok(format!(
        "paced, bursts of {burst}: guest got {delivered} of {offered}{short}, CPU {:.2} µs/frame ({breakdown}){pmd}{testpmd}",
        per_frame(busy.values().sum()),
    ))
}

/// Sends 64 B frames to the guest at [`PACED_PPS`] for [`PACED`], in bursts of `burst`
/// frames through an AF_PACKET socket on the peer's veth end (the rates' generator does not
/// pace: it sends in calls of 100,000 frames), from a real-time thread on
/// CPU 0 so that the sink's busy polling there does not delay it; how many it sent.
fn paced(bridge: &Bridge, burst: u32) -> Result<u64, String> {
    let data = frame(GUEST_MAC, bridge.peer_mac, None, ETH_P_EXPERIMENTAL, 64, 1);
    let topo = &bridge.topo;
    topo.peer.run(|| {
        pin_current_thread(0);
        if !make_current_thread_fifo() {
            return Err("SCHED_FIFO for the paced sender was refused".to_owned());
        }
        let socket = RawSocket::bind(&topo.peer_if)
            .map_err(|e| format!("AF_PACKET on {}: {e}", topo.peer_if))?;
        let period = Duration::from_secs_f64(f64::from(burst) / f64::from(PACED_PPS));
        let start = Instant::now();
        let mut sent = 0u64;
        let mut next = start;
        while start.elapsed() < PACED {
            for _ in 0..burst {
                socket
                    .send(&data)
                    .map_err(|e| format!("sending on {}: {e}", topo.peer_if))?;
            }
            sent += u64::from(burst);
            next += period;
            if let Some(wait) = next.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
        }
        Ok(sent)
    })
}

/// One run of [`PINGS`] pings.
#[derive(Clone, Debug)]
pub(crate) struct PingRun {
    /// The round trips of the answered pings, ms, in order.
    pub(crate) rtts: Vec<f64>,
    /// The share of samples in which the kernel's kdamond sat on the datapath's CPU (`None`:
    /// no kdamond).
    pub(crate) kdamond: Option<f64>,
}

impl PingRun {
    /// The pings slower than [`SLOW_PING`], "#N: ms" by their number.
    pub(crate) fn slow(&self) -> Vec<String> {
        self.rtts
            .iter()
            .enumerate()
            .filter(|&(_, &t)| t > SLOW_PING)
            .map(|(i, t)| format!("#{}: {t:.2}", i + 1))
            .collect()
    }

    /// "p50 … p90 … p99 … max … ms (N of 1000 answered); K over 0.5 ms [..]; kdamond …".
    pub(crate) fn line(&self) -> String {
        let slow = self.slow();
        format!(
            "RTT p50 {:.3} ms p90 {:.3} ms p99 {:.3} ms max {:.3} ms ({} of {PINGS} answered); {} over {SLOW_PING} ms [{}]; {}",
            percentile(&self.rtts, 0.50),
            percentile(&self.rtts, 0.90),
            percentile(&self.rtts, 0.99),
            percentile(&self.rtts, 1.0),
            self.rtts.len(),
            slow.len(),
            slow.join(", "),
            kdamond_text(self.kdamond),
        )
    }
}

/// "kdamond on CPU 1 in N% of samples", or that there is none.
fn kdamond_text(share: Option<f64>) -> String {
    match share {
        None => "no kdamond".to_owned(),
        Some(share) => format!(
            "kdamond on CPU {} in {:.0}% of samples",
            crate::setup::DATAPATH_CPU,
            100.0 * share
        ),
    }
}

/// A ping slower than this (ms) is listed by its number.
pub(crate) const SLOW_PING: f64 = 0.5;

/// [`PINGS`] pings from the peer (on CPU 0) to an icmpecho guest. The peer's counting
/// program (which drops what comes from the guest's MAC) is detached first.
pub(crate) fn ping_guest(bridge: &mut Bridge) -> Result<PingRun, String> {
    bridge.detach_counter();
    let topo = &bridge.topo;
    topo.peer.ip(&[
        "neigh",
        "replace",
        GUEST_IP,
        "lladdr",
        GUEST,
        "dev",
        &topo.peer_if,
        "nud",
        "permanent",
    ]);
    let peer = bridge.peer_mac.map(|b| format!("{b:02x}")).join(":");
    let echo = bridge.start_guest("icmpecho", 64, &peer)?;
    std::thread::sleep(Duration::from_millis(500));
    let kdamond = KdamondWatch::start();
    let out = Command::new("nsenter")
        .arg(format!("--net={}", topo.peer.path()))
        .args(["taskset", "-c", "0", "ping", "-n", "-c"])
        .arg(PINGS.to_string())
        .args([
            "-i",
            &format!("0.{PING_INTERVAL_MS:03}"),
            "-W",
            "1",
            GUEST_IP,
        ])
        .output()
        .map_err(|e| format!("ping: {e}"))?;
    let kdamond = kdamond.stop()?;
    drop(echo);
    bridge.wait_guest(false)?;
    let text = String::from_utf8_lossy(&out.stdout);
    let rtts: Vec<f64> = text
        .lines()
        .filter_map(|l| l.split("time=").nth(1))
        .filter_map(|t| t.split_whitespace().next()?.parse().ok())
        .collect();
    if rtts.is_empty() {
        return Err(format!(
            "{}: no ping came back:\n{text}{}",
            bridge.datapath().name(),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(PingRun { rtts, kdamond })
}

/// Where the kernel's DAMON threads (`kdamond.N`) sit while the pings run. Here one runs for
/// 1.0–1.2 ms every 512 ms, unpinned, and the scheduler leaves it on whichever CPU it woke on
/// last: on the datapath's CPU it delays the pings that meet it (a busy-polling datapath loses
/// the CPU to it; a sleeping one wakes behind it); on CPU 0 it does not. Which CPU that is
/// differs from run to run, so each ping run says.
struct KdamondWatch {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<(u32, u32)>>,
}

impl Drop for KdamondWatch {
    /// Ends the sampling when the pings could not run.
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

impl KdamondWatch {
    /// Samples the CPU of every kdamond thread every 50 ms until [`KdamondWatch::stop`].
    fn start() -> KdamondWatch {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = std::sync::Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            // With the generator and the sink: not a task on the datapath's CPU itself.
            pin_current_thread(0);
            let pids = kdamond_pids();
            let datapath_cpu: u32 = crate::setup::DATAPATH_CPU.parse().unwrap_or(u32::MAX);
            let (mut samples, mut on_datapath) = (0u32, 0u32);
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                for &pid in &pids {
                    if let Some(cpu) = cpu_of(pid) {
                        samples += 1;
                        on_datapath += u32::from(cpu == datapath_cpu);
                    }
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            (samples, on_datapath)
        });
        KdamondWatch {
            stop,
            thread: Some(thread),
        }
    }

    /// The share of samples on the datapath's CPU; `None` without a kdamond.
    fn stop(mut self) -> Result<Option<f64>, String> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        match self.thread.take().map(std::thread::JoinHandle::join) {
            None => Err("the kdamond watch was stopped twice".to_owned()),
            Some(result) => match result {
                Ok((0, _)) => Ok(None),
                Ok((samples, on)) => Ok(Some(f64::from(on) / f64::from(samples))),
                Err(_) => Err("the kdamond watch panicked".to_owned()),
            },
        }
    }
}

/// The pids of the kernel threads named kdamond.*.
fn kdamond_pids() -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|c| c.starts_with("kdamond"))
        })
        .collect()
}

/// The CPU a task last ran on (field 39 of /proc/PID/stat).
fn cpu_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The fields after the command, which is in parentheses and may hold spaces.
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split_whitespace().nth(39 - 3)?.parse().ok()
}

pub(crate) fn percentile(values: &[f64], p: f64) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let at = ((v.len() as f64 * p).ceil() as usize).clamp(1, v.len());
    v[at - 1]
}

fn seconds(ticks: u64) -> f64 {
    ticks as f64 / ticks_per_second() as f64
}

/// "avg processing cycles per packet: X" of the PMD on core 1.
fn pmd_processing_cycles_per_packet(out: &str) -> Option<f64> {
    let core = out.find("core_id 1:")?;
    out[core..]
        .lines()
        .take_while(|l| !l.starts_with("main thread"))
        .find_map(|l| l.trim().strip_prefix("avg processing cycles per packet:"))
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
}

/// The CPU's clock as /proc/cpuinfo reports it (OVS counts TSC cycles).
fn tsc_mhz() -> Option<f64> {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()?
        .lines()
        .find(|l| l.starts_with("cpu MHz"))
        .and_then(|l| l.split(':').nth(1)?.trim().parse().ok())
}
