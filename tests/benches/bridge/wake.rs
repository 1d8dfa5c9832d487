//! What a wake-up costs on this machine: a thread on the datapath's CPU waits for an
//! eventfd that a thread on CPU 0 writes every [`crate::cost::PING_INTERVAL_MS`] (as often as
//! the pings come), either asleep in `poll(2)` (as xvio's worker between sparse frames) or
//! polling it (as a PMD thread); the time from the write to the waiter seeing it. A ping to a
//! sleeping worker pays the first on top of what it pays through a polling datapath.
//!
//! A third way is xvio's default worker beside a busy guest: the writer stays busy on CPU 0
//! between writes (as a polling guest does) and the waiter, woken, spins for `--busy-poll`'s
//! default before it sleeps again. What it reports besides the wake-up is how often CPU 0
//! stopped (no progress for over [`STALL_US`]) during that spin: on a host that packs an idle
//! vCPU with a busy one after a slow wake-up, a guest makes no progress while the worker spins
//! and answers only once the worker sleeps.

use std::{
    os::fd::AsFd,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use nix::{
    poll::{PollFd, PollFlags, PollTimeout, poll},
    sys::eventfd::{EfdFlags, EventFd},
};
use xvio_tests::bench::pin_current_thread;

use crate::cost::{PING_INTERVAL_MS, percentile};

/// Wake-ups measured each way.
const WAKES: usize = 500;

/// A pause in the busy writer's progress longer than this is a stall.
const STALL_US: u64 = 50;

/// A wake-up slower than this counts as slow (to see whether stalls follow them).
const SLOW_WAKE_MS: f64 = 0.3;

/// How the waiter waits.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Waiter {
    /// Asleep in `poll(2)`; the writer sleeps between writes.
    Sleeping,
    /// Reading the eventfd in a loop; the writer sleeps between writes.
    Polling,
    /// Asleep in `poll(2)`, then spinning for `--busy-poll`'s default once woken; the writer
    /// busy between writes.
    SpinningAfter,
}

/// One wake-up: its latency (ms), and for [`Waiter::SpinningAfter`] whether the writer's CPU
/// stalled while the waiter spun.
#[derive(Clone, Copy)]
struct Wake {
    ms: f64,
    stalled: bool,
}

/// The wake-up latencies (ms) of a sleeping and of a polling waiter, and the wake-ups of
/// a waiter that spins once woken beside a busy CPU 0.
pub(crate) struct Wakes {
    sleeping: Vec<f64>,
    polling: Vec<f64>,
    spinning: Vec<Wake>,
}

impl Wakes {
    /// All three ways, one after the other.
    pub(crate) fn measure() -> Result<Wakes, String> {
        let ms = |w: Vec<Wake>| w.iter().map(|w| w.ms).collect();
        Ok(Wakes {
            sleeping: ms(wakes(Waiter::Sleeping)?),
            polling: ms(wakes(Waiter::Polling)?),
            spinning: wakes(Waiter::SpinningAfter)?,
        })
    }

    /// "sleeping p50 … p90 … p99 … ms; polling …".
    pub(crate) fn line(&self) -> String {
        let p = |v: &[f64]| {
            format!(
                "p50 {:.3} p90 {:.3} p99 {:.3} ms",
                percentile(v, 0.50),
                percentile(v, 0.90),
                percentile(v, 0.99)
            )
        };
        let spun: Vec<f64> = self.spinning.iter().map(|w| w.ms).collect();
        let stalled = self.spinning.iter().filter(|w| w.stalled).count();
        let slow: Vec<&Wake> = self
            .spinning
            .iter()
            .filter(|w| w.ms > SLOW_WAKE_MS)
            .collect();
        let slow_stalled = slow.iter().filter(|w| w.stalled).count();
        format!(
            "wake-up of a thread on CPU {cpu} by an eventfd written on CPU 0, {WAKES} times every {PING_INTERVAL_MS} ms: asleep in poll(2) {}; polling {}\n\
             the same beside a busy CPU 0, the thread spinning {spin} µs once woken (xvio's default --busy-poll): wake-up {}; CPU 0 stalled (over {STALL_US} µs without progress) during the spin after {stalled} of {WAKES} wake-ups, after {slow_stalled} of the {} slower than {SLOW_WAKE_MS} ms",
            p(&self.sleeping),
            p(&self.polling),
            p(&spun),
            slow.len(),
            cpu = crate::setup::DATAPATH_CPU,
            spin = xvio::config::DEFAULT_BUSY_POLL_US,
        )
    }
}

/// [`WAKES`] wake-ups of a waiter on the datapath's CPU that waits as `how` says.
fn wakes(how: Waiter) -> Result<Vec<Wake>, String> {
    let flags = if how == Waiter::Polling {
        EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK
    } else {
        EfdFlags::EFD_CLOEXEC
    };
    let fd = Arc::new(EventFd::from_flags(flags).map_err(|e| format!("eventfd: {e}"))?);
    let cpu: usize = crate::setup::DATAPATH_CPU
        .parse()
        .map_err(|e| format!("the datapath CPU: {e}"))?;
    let base = Instant::now();
    let ns = move || base.elapsed().as_nanos() as u64;
    // When the last write was made, ns since `base`.
    let sent = Arc::new(AtomicU64::new(0));
    let spin = Duration::from_micros(xvio::config::DEFAULT_BUSY_POLL_US);
    let waiter = {
        let (fd, sent) = (Arc::clone(&fd), Arc::clone(&sent));
        std::thread::spawn(move || -> Result<Vec<(f64, u64, u64)>, String> {
            pin_current_thread(cpu);
            // Each wake-up: ms, and when the waiter saw it and stopped spinning (ns).
            let mut out = Vec::with_capacity(WAKES);
            for _ in 0..WAKES {
                if how != Waiter::Polling {
                    let mut fds = [PollFd::new(fd.as_fd(), PollFlags::POLLIN)];
                    poll(&mut fds, PollTimeout::from(1000u16)).map_err(|e| format!("poll: {e}"))?;
                }
                // A polling waiter reads until the write shows; a sleeping one finds it there.
                let deadline = Instant::now() + Duration::from_secs(1);
                while fd.read().is_err() {
                    if Instant::now() > deadline {
                        return Err("no wake-up within 1 s".to_owned());
                    }
                    std::hint::spin_loop();
                }
                let seen = ns();
                let ms = seen.saturating_sub(sent.load(Ordering::Acquire)) as f64 / 1e6;
                if how == Waiter::SpinningAfter {
                    let until = Instant::now() + spin;
                    while Instant::now() < until {
                        std::hint::spin_loop();
                    }
                }
                out.push((ms, seen, ns()));
            }
            Ok(out)
        })
    };
    // The writer is a thread of its own: pinning the bench's main thread would pin what it
    // starts later.
    let writer = std::thread::spawn(move || -> Result<Vec<(u64, u64)>, String> {
        pin_current_thread(0);
        // Each interval's longest pause in the writer's progress: (start, end) in ns.
        let mut pauses = Vec::with_capacity(WAKES);
        let interval = Duration::from_millis(u64::from(PING_INTERVAL_MS));
        if how == Waiter::SpinningAfter {
            // The waiter asleep before the first write, as before the others.
            std::thread::sleep(interval);
        }
        for _ in 0..WAKES {
            if how != Waiter::SpinningAfter {
                std::thread::sleep(interval);
            }
            let now = ns();
            sent.store(now, Ordering::Release);
            fd.write(1).map_err(|e| format!("eventfd write: {e}"))?;
            let mut longest = (now, now);
            if how == Waiter::SpinningAfter {
                let (mut last, end) = (now, now + interval.as_nanos() as u64);
                while last < end {
                    let t = ns();
                    if t - last > longest.1 - longest.0 {
                        longest = (last, t);
                    }
                    last = t;
                }
            }
            pauses.push(longest);
        }
        Ok(pauses)
    });
    let pauses = writer
        .join()
        .map_err(|_| "the writer panicked".to_owned())??;
    let waited = waiter
        .join()
        .map_err(|_| "the waiter panicked".to_owned())??;
    Ok(waited
        .into_iter()
        .zip(pauses)
        .map(|((ms, seen, spun), (from, to))| Wake {
            ms,
            // The writer's longest pause after this write overlaps the waiter's spin.
            stalled: to - from > STALL_US * 1000 && to > seen && from < spun,
        })
        .collect())
}
