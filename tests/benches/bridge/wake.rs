//! What a wake-up costs on this machine: a thread on the datapath's CPU waits for an
//! eventfd that a thread on CPU 0 writes every [`crate::cost::PING_INTERVAL_MS`] (as often as
//! the pings come), either asleep in `poll(2)` (as xvio's worker between sparse frames) or
//! polling it (as a PMD thread); the time from the write to the waiter seeing it. A ping to a
//! sleeping worker pays the first on top of what it pays through a polling datapath.
//!
//! A third way is xvio's default worker beside a busy guest: the writer stays busy on CPU 0
//! between writes (as a polling guest does) and the waiter, woken, spins for `--busy-poll`'s
//! default before it sleeps again. What it reports besides the wake-up is how often CPU 0
//! stopped (no progress for [`STALL_US`] or more of the spin) while the waiter spun, against
//! how often it stopped as long in as long a window 4 ms after each write, when nothing on
//! CPU 1 spins: on a host that puts a freshly woken vCPU on a busy one's physical CPU, a guest
//! makes no progress while the worker spins, and answers only once the worker sleeps.

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
use xvio::datapath::worker::IDLE_BEFORE_PARK;
use xvio_tests::bench::pin_current_thread;

use crate::cost::{PING_INTERVAL_MS, percentile};

/// Wake-ups measured each way (writes; a waiter that sees two at once counts one wake-up).
const WAKES: usize = 500;

/// A pause in the busy writer's progress of this long or more is a stall.
const STALL_US: u64 = 50;

/// A wake-up slower than this counts as slow (stalls followed them in a traced ping run).
const SLOW_WAKE_MS: f64 = 0.5;

/// Where the control window starts after each write (nothing on CPU 1 spins then).
const CONTROL_AFTER_MS: u64 = 4;

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

/// One wake-up: its latency (ms) from the first write it saw, and for
/// [`Waiter::SpinningAfter`] whether the writer's CPU stalled while the waiter spun, and
/// whether it stalled in the control window after that write.
#[derive(Clone, Copy)]
struct Wake {
    ms: f64,
    stalled: bool,
    stalled_in_control: bool,
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

    /// Two lines: "wake-up … asleep in poll(2) p50 … ms; polling …", then the spinning
    /// waiter's wake-ups and the stalls of CPU 0.
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
        let count = |f: &dyn Fn(&Wake) -> bool| self.spinning.iter().filter(|w| f(w)).count();
        let stalled = count(&|w| w.stalled);
        let slow = count(&|w| w.ms > SLOW_WAKE_MS);
        let slow_stalled = count(&|w| w.ms > SLOW_WAKE_MS && w.stalled);
        let control = count(&|w| w.stalled_in_control);
        format!(
            "wake-up of a thread on CPU {cpu} by an eventfd written on CPU 0, {WAKES} times every {PING_INTERVAL_MS} ms: asleep in poll(2) {}; polling {}\n\
             the same beside a busy CPU 0, the thread spinning {spin} µs once woken (xvio's default --busy-poll): wake-up {}; CPU 0 stalled ({STALL_US} µs or more of the spin without progress) during the spin after {stalled} of {} wake-ups, after {slow_stalled} of the {slow} slower than {SLOW_WAKE_MS} ms; as long in as long a window {CONTROL_AFTER_MS} ms after each write (nothing spinning): {control}",
            p(&self.sleeping),
            p(&self.polling),
            p(&spun),
            self.spinning.len(),
            cpu = crate::setup::DATAPATH_CPU,
            spin = IDLE_BEFORE_PARK.as_micros(),
        )
    }
}

/// The overlap of two time ranges (ns).
fn overlap((a, b): (u64, u64), (c, d): (u64, u64)) -> u64 {
    b.min(d).saturating_sub(a.max(c))
}

/// [`WAKES`] writes to a waiter on the datapath's CPU that waits as `how` says: its wake-ups.
fn wakes(how: Waiter) -> Result<Vec<Wake>, String> {
    // Non-blocking either way: a read never hangs, whatever was missed.
    let fd = Arc::new(
        EventFd::from_flags(EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)
            .map_err(|e| format!("eventfd: {e}"))?,
    );
    let cpu: usize = crate::setup::DATAPATH_CPU
        .parse()
        .map_err(|e| format!("the datapath CPU: {e}"))?;
    let base = Instant::now();
    let ns = move || base.elapsed().as_nanos() as u64;
    // When each write was made, ns since `base` (0: not yet).
    let sent: Arc<Vec<AtomicU64>> = Arc::new((0..WAKES).map(|_| AtomicU64::new(0)).collect());
    let spin = IDLE_BEFORE_PARK;
    let interval = Duration::from_millis(u64::from(PING_INTERVAL_MS));
    let waiter = {
        let (fd, sent) = (Arc::clone(&fd), Arc::clone(&sent));
        std::thread::spawn(move || -> Result<Vec<(usize, f64, u64, u64)>, String> {
            pin_current_thread(cpu);
            // Each wake-up: the first write it saw, ms since that write, and when the waiter
            // saw it and stopped spinning (ns).
            let mut out = Vec::with_capacity(WAKES);
            let mut next = 0;
            while next < WAKES {
                if how != Waiter::Polling {
                    let mut fds = [PollFd::new(fd.as_fd(), PollFlags::POLLIN)];
                    let ready = poll(&mut fds, PollTimeout::from(1000u16))
                        .map_err(|e| format!("poll: {e}"))?;
                    if ready == 0 {
                        return Err("no wake-up within 1 s".to_owned());
                    }
                }
                // A polling waiter reads until a write shows; a sleeping one finds it there.
                let deadline = Instant::now() + Duration::from_secs(1);
                let writes = loop {
                    if let Ok(n) = fd.read() {
                        break n as usize;
                    }
                    if Instant::now() > deadline {
                        return Err("no wake-up within 1 s".to_owned());
                    }
                    std::hint::spin_loop();
                };
                let seen = ns();
                let ms = seen.saturating_sub(sent[next].load(Ordering::Acquire)) as f64 / 1e6;
                if how == Waiter::SpinningAfter {
                    let until = Instant::now() + spin;
                    while Instant::now() < until {
                        std::hint::spin_loop();
                    }
                }
                out.push((next, ms, seen, ns()));
                // Slower than the interval: it saw more than one write, and waits for the next.
                next += writes.max(1);
            }
            Ok(out)
        })
    };
    // The writer is a thread of its own: pinning the bench's main thread would pin what it
    // starts later.
    let writer = {
        let (fd, sent) = (Arc::clone(&fd), Arc::clone(&sent));
        std::thread::spawn(move || -> Result<Vec<Vec<(u64, u64)>>, String> {
            pin_current_thread(0);
            // Each interval's pauses in the writer's progress of STALL_US or more: (start, end).
            let mut pauses = Vec::with_capacity(WAKES);
            if how == Waiter::SpinningAfter {
                // The waiter asleep before the first write, as before the others.
                std::thread::sleep(interval);
            }
            for slot in sent.iter() {
                if how != Waiter::SpinningAfter {
                    std::thread::sleep(interval);
                }
                let at = ns();
                slot.store(at, Ordering::Release);
                fd.write(1).map_err(|e| format!("eventfd write: {e}"))?;
                let mut these = Vec::new();
                if how == Waiter::SpinningAfter {
                    // From after the write to the next one, busy.
                    let (mut last, end) = (ns(), at + interval.as_nanos() as u64);
                    while last < end {
                        let t = ns();
                        if t - last >= STALL_US * 1000 {
                            these.push((last, t));
                        }
                        last = t;
                    }
                }
                pauses.push(these);
            }
            Ok(pauses)
        })
    };
    let pauses = writer
        .join()
        .map_err(|_| "the writer panicked".to_owned())??;
    let waited = waiter
        .join()
        .map_err(|_| "the waiter panicked".to_owned())??;
    let stall = STALL_US * 1000;
    Ok(waited
        .into_iter()
        .map(|(i, ms, seen, spun)| {
            // The pauses after the write this wake-up answered (a spin that outlasts the
            // interval is looked at only up to the next write).
            let theirs = &pauses[i];
            let at = sent[i].load(Ordering::Acquire) + CONTROL_AFTER_MS * 1_000_000;
            let control = (at, at + (spun - seen));
            Wake {
                ms,
                stalled: theirs.iter().any(|&p| overlap(p, (seen, spun)) >= stall),
                stalled_in_control: theirs.iter().any(|&p| overlap(p, control) >= stall),
            }
        })
        .collect())
}
