//! Small pieces the benchmarks share: pinning the calling thread, the summary of repeated
//! runs (median, min, max), xvio's published counters read from their pins, and a
//! process's CPU time from /proc.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use aya::maps::{Array, Map, MapData};
use xvio_common::{GuestStats, PortStats, maps};

/// Pins the calling thread to `cpu` (ignored when the CPU does not exist).
pub fn pin_current_thread(cpu: usize) {
    let mut set = nix::sched::CpuSet::new();
    if set.set(cpu).is_ok() {
        let _ = nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set);
    }
}

/// Makes the calling thread real-time (SCHED_FIFO, priority 1), so that when it wakes it
/// preempts busy-polling threads on its CPU at once: a paced sender that sleeps between
/// bursts then keeps its pace. Whether it worked.
pub fn make_current_thread_fifo() -> bool {
    let param = libc::sched_param { sched_priority: 1 };
    // SAFETY: `param` is a valid sched_param that outlives the call; pid 0 is the calling
    // thread; the call reads `param` and changes only that thread's scheduling.
    unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &param) == 0 }
}

/// DPDK's runtime folders (/var/run/dpdk/FILE_PREFIX). A DPDK process leaves its folder
/// behind when it exits (several MiB of tmpfs for a `--no-huge` testpmd): a caller that
/// lists them before and after starting one knows which to remove once it stopped.
pub fn dpdk_runtime_dirs() -> std::collections::BTreeSet<PathBuf> {
    std::fs::read_dir("/var/run/dpdk")
        .map(|dir| dir.filter_map(Result::ok).map(|e| e.path()).collect())
        .unwrap_or_default()
}

/// Median, min and max of repeated measurements.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Summary {
    /// The middle value (the upper one of the two middles for an even count).
    pub median: f64,
    /// The smallest.
    pub min: f64,
    /// The largest.
    pub max: f64,
}

impl Summary {
    /// The summary of `values`; `None` when there are none.
    pub fn of(values: &[f64]) -> Option<Summary> {
        let mut v = values.to_vec();
        v.sort_by(f64::total_cmp);
        Some(Summary {
            median: *v.get(v.len() / 2)?,
            min: *v.first()?,
            max: *v.last()?,
        })
    }
}

/// Where xvio pins `guest_stats`.
pub fn guest_stats_pin() -> PathBuf {
    Path::new(xvio_common::PIN_ROOT)
        .join(maps::GUESTS_DIR)
        .join(maps::GUEST_STATS)
}

/// Guest `id`'s counters as the daemon published them last (about once a second); `None`
/// when the map is not pinned (no daemon).
pub fn guest_stats(id: u32) -> Option<GuestStats> {
    let map = Map::Array(MapData::from_pin(guest_stats_pin()).ok()?);
    let array: Array<MapData, GuestStats> = Array::try_from(map).ok()?;
    array.get(&id, 0).ok()
}

/// Queue `queue`'s AF_XDP port counters in the `port_stats` map pinned under `pin_dir` (an
/// interface's pin folder), as published last.
pub fn port_stats(pin_dir: &Path, queue: u32) -> Option<PortStats> {
    let map = Map::Array(MapData::from_pin(pin_dir.join(maps::PORT_STATS)).ok()?);
    let array: Array<MapData, PortStats> = Array::try_from(map).ok()?;
    array.get(&queue, 0).ok()
}

/// CPU time (user + system, in clock ticks) of each thread of process `pid`, by thread
/// name, from /proc/PID/task/*/stat.
pub fn thread_cpu_ticks(pid: i32) -> Vec<(String, u64)> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .filter_map(Result::ok)
        .filter_map(|t| std::fs::read_to_string(t.path().join("stat")).ok())
        .filter_map(|stat| parse_stat_ticks(&stat))
        .collect()
}

/// CPU ticks by thread name (threads of one name added up).
pub fn cpu_by_thread(pid: i32) -> BTreeMap<String, u64> {
    let mut by_name = BTreeMap::new();
    for (name, ticks) in thread_cpu_ticks(pid) {
        *by_name.entry(name).or_insert(0) += ticks;
    }
    by_name
}

/// Ticks each thread name used between two [`cpu_by_thread`] readings (a thread that ended in
/// between is lost; one that started counts from zero).
pub fn cpu_delta(
    before: &BTreeMap<String, u64>,
    after: &BTreeMap<String, u64>,
) -> BTreeMap<String, u64> {
    after
        .iter()
        .map(|(name, t)| {
            (
                name.clone(),
                t.saturating_sub(before.get(name).copied().unwrap_or(0)),
            )
        })
        .collect()
}

/// The `n` threads that used the most ticks (none that used none), busiest first.
pub fn top_threads(ticks: &BTreeMap<String, u64>, n: usize) -> Vec<(String, u64)> {
    let mut v: Vec<(String, u64)> = ticks
        .iter()
        .filter(|(_, t)| **t > 0)
        .map(|(name, t)| (name.clone(), *t))
        .collect();
    v.sort_by_key(|(_, t)| std::cmp::Reverse(*t));
    v.truncate(n);
    v
}

/// CPU time (user + system, in clock ticks) of every thread of `pid` together.
pub fn process_cpu_ticks(pid: i32) -> u64 {
    thread_cpu_ticks(pid).iter().map(|(_, t)| t).sum()
}

/// Voluntary context switches (times it went to sleep) of each thread of `pid`, by thread
/// name, from /proc/PID/task/*/status: for a thread that sleeps until an event, how many
/// times it woke.
pub fn thread_sleeps(pid: i32) -> Vec<(String, u64)> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .filter_map(Result::ok)
        .filter_map(|t| std::fs::read_to_string(t.path().join("status")).ok())
        .filter_map(|status| {
            let value = |key: &str| {
                status
                    .lines()
                    .find_map(|l| l.strip_prefix(key))
                    .map(str::trim)
            };
            Some((
                value("Name:")?.to_owned(),
                value("voluntary_ctxt_switches:")?.parse().ok()?,
            ))
        })
        .collect()
}

/// Busy and total clock ticks of each CPU since boot (/proc/stat `cpuN` lines; busy is all
/// but idle and iowait).
pub fn cpu_ticks() -> Vec<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    stat.lines()
        .filter(|l| l.starts_with("cpu") && l.as_bytes().get(3).is_some_and(u8::is_ascii_digit))
        .map(|l| {
            let v: Vec<u64> = l
                .split_whitespace()
                .skip(1)
                .filter_map(|x| x.parse().ok())
                .collect();
            let total: u64 = v.iter().sum();
            let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
            (total - idle, total)
        })
        .collect()
}

/// Each CPU's busy share (percent) between two [`cpu_ticks`] readings.
pub fn cpu_busy_percent(before: &[(u64, u64)], after: &[(u64, u64)]) -> Vec<f64> {
    before
        .iter()
        .zip(after)
        .map(|((b0, t0), (b1, t1))| {
            let total = t1.saturating_sub(*t0).max(1);
            100.0 * b1.saturating_sub(*b0) as f64 / total as f64
        })
        .collect()
}

/// Clock ticks per second (`sysconf(_SC_CLK_TCK)`).
pub fn ticks_per_second() -> u64 {
    // SAFETY: sysconf reads a constant of the system and has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    u64::try_from(t).ok().filter(|&t| t > 0).unwrap_or(100)
}

/// `(comm, utime + stime)` of one `/proc/…/stat` line; the name is between the first `(`
/// and the last `)` and may hold spaces.
fn parse_stat_ticks(stat: &str) -> Option<(String, u64)> {
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    let name = stat.get(open + 1..close)?.to_owned();
    // After ") ": state(3) ppid(4) … utime(14) stime(15); index 0 here is field 3.
    let fields: Vec<&str> = stat.get(close + 2..)?.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((name, utime + stime))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_of_five() {
        let s = Summary::of(&[3.0, 1.0, 5.0, 2.0, 4.0]).unwrap();
        assert_eq!((s.median, s.min, s.max), (3.0, 1.0, 5.0));
        assert!(Summary::of(&[]).is_none());
    }

    #[test]
    fn stat_ticks_with_a_space_in_the_name() {
        let stat =
            "4242 (xvio dp 0) R 1 4242 4242 0 -1 4194560 100 0 0 0 700 35 0 0 20 0 9 0 1 2 3";
        assert_eq!(parse_stat_ticks(stat), Some(("xvio dp 0".to_owned(), 735)));
    }
}
