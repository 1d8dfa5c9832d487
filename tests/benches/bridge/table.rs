//! The results once every run is done: the rates of each datapath beside xvio's (with xvio's
//! share of each), the `--dma sw` comparison at 1500 B, and the cost lines.

use xvio_tests::bench::Summary;

use crate::{
    Point, Results, Settings, cost,
    rate::Direction,
    setup::{DMA_ARGS, Datapath, SIZES},
};

/// The rows of the rate table, in order; the DMA variant has its own table.
const ROWS: [Datapath; 4] = [
    Datapath::Xvio,
    Datapath::Ovs,
    Datapath::Testpmd,
    Datapath::Bare,
];
/// The target for xvio against bare AF_XDP of the same direction.
const BARE_TARGET: f64 = 0.90;

pub(crate) fn rates(s: &Settings, results: &Results) {
    if results.is_empty() {
        return;
    }
    println!();
    println!(
        "bridge NIC <-> guest: frames/s (Mpps) and Gbit/s of frame bytes (no FCS), median [min-max] of {} runs of {} s, datapaths alternating; CPU1 = the datapath's CPU, busy share (/proc/stat) median [min-max]; xvio/X = the ratio of the medians, and run by run: of xvio's run i to X's run i, median [min-max]",
        s.reps,
        s.window.as_secs()
    );
    println!(
        "placement: generator and sink on CPU 0 (to_guest: AF_XDP generator, receive-only guest looking every 100 µs; from_guest: testpmd txonly, peer XDP counter); datapath on CPU 1 (xvio --datapath-cpus 1 | OVS pmd-cpu-mask=0x2 | testpmd --main-lcore 0 -l 0,1, forwarding lcore 1, net_af_xdp busy_budget={} | bare AF_XDP loop pinned to CPU 1)",
        s.testpmd_busy_budget
    );
    for dir in [Direction::ToGuest, Direction::FromGuest] {
        for len in SIZES {
            let xvio = summary(results, dir, len, Datapath::Xvio).map(|(r, _)| r);
            let mut first = true;
            for dp in ROWS {
                let Some((rate, cpu1)) = summary(results, dir, len, dp) else {
                    continue;
                };
                let label = if first {
                    format!("{:<10} {len:>4} B", dir.name())
                } else {
                    String::new()
                };
                first = false;
                let paired = paired_ratios(results, dir, len, dp)
                    .map(|p| format!(", run by run {:.2} [{:.2}-{:.2}]", p.median, p.min, p.max))
                    .unwrap_or_default();
                let ratio = match (dp, xvio) {
                    (Datapath::Xvio, _) | (_, None) => String::new(),
                    (Datapath::Bare, Some(x)) => format!(
                        "  xvio/bare {:.2}{paired} (target >= {BARE_TARGET:.2})",
                        x.median / rate.median
                    ),
                    (_, Some(x)) => {
                        format!("  xvio/{} {:.2}{paired}", dp.name(), x.median / rate.median)
                    }
                };
                println!(
                    "{label:<18} {:<12} {} {:>5.2} Gbit/s  CPU1 {}{ratio}",
                    dp.name(),
                    mpps(&rate),
                    rate.median * len as f64 * 8.0 / 1e9,
                    percent(&cpu1),
                );
            }
        }
    }
}

/// xvio's rate over `dp`'s in each round of the alternating runs (run i of each), as
/// median [min-max]: a slow drift of the machine over the bench moves both sides of a pair.
fn paired_ratios(results: &Results, dir: Direction, len: usize, dp: Datapath) -> Option<Summary> {
    let xvio = results.get(&(dir, len, Datapath::Xvio))?;
    let other = results.get(&(dir, len, dp))?;
    let ratios: Vec<f64> = xvio
        .iter()
        .zip(other)
        .filter(|(_, o)| o.rate > 0.0)
        .map(|(x, o)| x.rate / o.rate)
        .collect();
    Summary::of(&ratios)
}

/// xvio with `--dma sw` against xvio with CPU copies at 1500 B, when both ran.
pub(crate) fn dma(results: &Results) {
    let len = SIZES[1];
    let rows: Vec<_> = [Direction::ToGuest, Direction::FromGuest]
        .into_iter()
        .filter_map(|dir| {
            Some((
                dir,
                summary(results, dir, len, Datapath::Xvio)?,
                summary(results, dir, len, Datapath::XvioDma)?,
            ))
        })
        .collect();
    if rows.is_empty() {
        return;
    }
    println!();
    println!(
        "--dma sw against CPU copies at {len} B (xvio {}: software DMA engines on CPU 0, one per queue, take copies of 1024 B or more), same runs; CPU1 = the datapath's CPU, busy share",
        DMA_ARGS.join(" ")
    );
    for (dir, (cpu_rate, cpu_busy), (dma_rate, dma_busy)) in rows {
        println!(
            "{:<10} {len:>4} B  CPU copies {} CPU1 {} | --dma sw {} CPU1 {} | rate x{:.2}, CPU1 {:+.0} points",
            dir.name(),
            mpps(&cpu_rate),
            percent(&cpu_busy),
            mpps(&dma_rate),
            percent(&dma_busy),
            dma_rate.median / cpu_rate.median,
            dma_busy.median - cpu_busy.median,
        );
    }
}

/// The cost phase's lines, when it ran.
pub(crate) fn costs(costs: &[(Datapath, String)]) {
    if costs.is_empty() {
        return;
    }
    println!();
    println!(
        "cost: idle = datapath process CPU over {} s, guest connected, no traffic; paced = 64 B to_guest at {} frames/s for {} s in bursts of {:?} frames, datapath process CPU per delivered frame (top threads), OVS's PMD processing cycles and testpmd's forwarding lcore's busy cycles per frame",
        cost::IDLE.as_secs(),
        cost::PACED_PPS,
        cost::PACED.as_secs(),
        cost::PACED_BURSTS,
    );
    for (dp, line) in costs {
        println!("{:<9} {line}", dp.name());
    }
}

/// The summaries of one cell: rate and CPU 1's busy share.
fn summary(
    results: &Results,
    dir: Direction,
    len: usize,
    dp: Datapath,
) -> Option<(Summary, Summary)> {
    let points: &Vec<Point> = results.get(&(dir, len, dp))?;
    let rates: Vec<f64> = points.iter().map(|p| p.rate).collect();
    let busy: Vec<f64> = points.iter().map(|p| p.cpu1).collect();
    Some((Summary::of(&rates)?, Summary::of(&busy)?))
}

/// "0.085 Mpps [0.081-0.089]".
fn mpps(s: &Summary) -> String {
    format!(
        "{:>6.3} Mpps [{:.3}-{:.3}]",
        s.median / 1e6,
        s.min / 1e6,
        s.max / 1e6
    )
}

/// "35% [28-39]".
fn percent(s: &Summary) -> String {
    format!("{:>3.0}% [{:.0}-{:.0}]", s.median, s.min, s.max)
}

/// The ping runs of each datapath: all its runs' round trips together, and the spread of the
/// runs' p99.
pub(crate) fn pings(runs: &crate::Pings) {
    if runs.is_empty() {
        return;
    }
    println!();
    println!(
        "ping: runs of {} pings every {} ms from the peer (CPU 0) to an icmpecho guest (testpmd on CPU 0), one at the end of each datapath's run, alternating; RTT percentiles of all runs' pings together, the p99 of each run as median [min-max], pings over {} ms, and per run the share of samples in which kdamond sat on the datapath's CPU",
        cost::PINGS,
        cost::PING_INTERVAL_MS,
        cost::SLOW_PING
    );
    for (dp, list) in runs {
        let all: Vec<f64> = list.iter().flat_map(|r| r.rtts.iter().copied()).collect();
        let p99s: Vec<f64> = list
            .iter()
            .map(|r| cost::percentile(&r.rtts, 0.99))
            .collect();
        let Some(p99) = Summary::of(&p99s) else {
            continue;
        };
        let slow: usize = list.iter().map(|r| r.slow().len()).sum();
        let kdamond: Vec<String> = list
            .iter()
            .map(|r| {
                r.kdamond
                    .map_or("-".to_owned(), |k| format!("{:.0}%", 100.0 * k))
            })
            .collect();
        println!(
            "{:<22} p50 {:.3} p90 {:.3} p99 {:.3} max {:.3} ms ({} pings) | p99 per run {:.3} [{:.3}-{:.3}] ms | {slow} over {} ms | kdamond on CPU {}: {}",
            dp.name(),
            cost::percentile(&all, 0.50),
            cost::percentile(&all, 0.90),
            cost::percentile(&all, 0.99),
            cost::percentile(&all, 1.0),
            all.len(),
            p99.median,
            p99.min,
            p99.max,
            cost::SLOW_PING,
            crate::setup::DATAPATH_CPU,
            kdamond.join(" ")
        );
    }
}
