//! What a wake-up costs on this machine: a thread on the datapath's CPU waits for an
//! eventfd that a thread on CPU 0 writes every [`crate::cost::PING_INTERVAL_MS`] (as often as
//! the pings come), either asleep in `poll(2)` (as xvio's worker between sparse frames) or
//! polling it (as a PMD thread); the time from the write to the waiter seeing it. A ping to a
//! sleeping worker pays the first on top of what it pays through a polling datapath.

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

/// The wake-up latencies (ms) of a sleeping and of a polling waiter.
pub(crate) struct Wakes {
    pub(crate) sleeping: Vec<f64>,
    pub(crate) polling: Vec<f64>,
}

impl Wakes {
    /// Both ways, one after the other.
    pub(crate) fn measure() -> Result<Wakes, String> {
        Ok(Wakes {
            sleeping: wakes(true)?,
            polling: wakes(false)?,
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
        format!(
            "wake-up of a thread on CPU {} by an eventfd written on CPU 0, {WAKES} times every {PING_INTERVAL_MS} ms: asleep in poll(2) {}; polling {}",
            crate::setup::DATAPATH_CPU,
            p(&self.sleeping),
            p(&self.polling)
        )
    }
}

/// [`WAKES`] wake-ups of a waiter on the datapath's CPU that sleeps (or polls): ms each.
fn wakes(sleep: bool) -> Result<Vec<f64>, String> {
    let flags = if sleep {
        EfdFlags::EFD_CLOEXEC
    } else {
        EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK
    };
    let fd = Arc::new(EventFd::from_flags(flags).map_err(|e| format!("eventfd: {e}"))?);
    let cpu: usize = crate::setup::DATAPATH_CPU
        .parse()
        .map_err(|e| format!("the datapath CPU: {e}"))?;
    let base = Instant::now();
    // When the last write was made, ns since `base`.
    let sent = Arc::new(AtomicU64::new(0));
    let waiter = {
        let (fd, sent) = (Arc::clone(&fd), Arc::clone(&sent));
        std::thread::spawn(move || -> Result<Vec<f64>, String> {
            pin_current_thread(cpu);
            let mut out = Vec::with_capacity(WAKES);
            for _ in 0..WAKES {
                if sleep {
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
                let now = base.elapsed().as_nanos() as u64;
                out.push(now.saturating_sub(sent.load(Ordering::Acquire)) as f64 / 1e6);
            }
            Ok(out)
        })
    };
    // The writer is a thread of its own: pinning the bench's main thread would pin what it
    // starts later.
    let writer = std::thread::spawn(move || -> Result<(), String> {
        pin_current_thread(0);
        for _ in 0..WAKES {
            std::thread::sleep(Duration::from_millis(u64::from(PING_INTERVAL_MS)));
            sent.store(base.elapsed().as_nanos() as u64, Ordering::Release);
            fd.write(1).map_err(|e| format!("eventfd write: {e}"))?;
        }
        Ok(())
    });
    let written = writer
        .join()
        .map_err(|_| "the writer panicked".to_owned())?;
    let waited = waiter
        .join()
        .map_err(|_| "the waiter panicked".to_owned())?;
    written.and(waited)
}
