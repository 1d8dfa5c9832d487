//! How the kernel schedules a datapath worker: a short EEVDF slice, so that a worker woken
//! by a frame preempts whatever else runs on its CPU instead of waiting behind it.
//!
//! A worker sleeps when idle, which leaves its CPU idle; the scheduler then places other
//! tasks there (kernel threads, other daemons). Since Linux 6.6 (EEVDF) a task that wakes
//! does not preempt the running one before that one has used its slice (`RUN_TO_PARITY`,
//! by default the base slice: 0.75 ms times 1 + log2 of the CPUs), and it is only looked at
//! again at the next tick (4 ms at HZ=250): a frame then waits that long in its ring.
//! Since 6.12 a thread may ask for a shorter slice (`sched_attr.sched_runtime` for
//! `SCHED_OTHER`, 0.1 to 100 ms); a waking task with a shorter slice than the running one
//! preempts it (`PREEMPT_SHORT`). The slice changes how often the worker may be switched,
//! not its share of the CPU (its weight, its nice value, stay as they were).
//!
//! Older kernels accept the attribute and ignore it: [`set_worker_slice`] reads it back and
//! says so. The `sched_setattr`/`sched_getattr` calls (glibc wraps neither) and their
//! `unsafe` stay in this file.

use std::time::Duration;

/// Pins the calling thread to `cpu` (a datapath worker, a software DMA channel's thread): an
/// error says why, the caller says what was pinned.
pub fn pin_to(cpu: usize) -> std::io::Result<()> {
    let mut set = nix::sched::CpuSet::new();
    set.set(cpu).map_err(std::io::Error::from)?;
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set).map_err(std::io::Error::from)
}

use thiserror::Error;

/// The slice a worker asks for: the shortest the kernel gives (100 µs).
pub const WORKER_SLICE: Duration = Duration::from_micros(100);

/// Errors of the scheduler calls; each names the call.
#[derive(Debug, Error)]
pub enum SchedError {
    /// `sched_getattr` on the calling thread failed.
    #[error("reading the datapath worker's scheduling attributes (sched_getattr)")]
    GetAttr(#[source] std::io::Error),
    /// `sched_setattr` on the calling thread failed.
    #[error(
        "setting the datapath worker's scheduler slice to {} µs (sched_setattr); \
         its wake-ups may wait behind other tasks on its CPU",
        .slice.as_micros()
    )]
    SetAttr {
        /// The slice asked for.
        slice: Duration,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// What became of a slice asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SliceOutcome {
    /// The kernel runs the thread with this slice.
    Set(Duration),
    /// The kernel kept its own (before Linux 6.12, or a policy other than `SCHED_OTHER` and
    /// `SCHED_BATCH`, which the thread keeps): nothing changed.
    Unsupported,
}

/// Thread `tid`'s slice as the kernel reports it (`sched_attr.sched_runtime` of a
/// fair-class thread; 0 before Linux 6.12); 0 is the calling thread.
pub fn slice_of(tid: libc::pid_t) -> Result<Duration, SchedError> {
    get_attr(tid).map(|a| Duration::from_nanos(a.sched_runtime))
}

/// Asks for `slice` for the calling thread, keeping its policy and nice value; what the
/// kernel made of it.
pub fn set_worker_slice(slice: Duration) -> Result<SliceOutcome, SchedError> {
    let mut attr = get_attr(0)?;
    let policy = attr.sched_policy as libc::c_int;
    if policy != libc::SCHED_OTHER && policy != libc::SCHED_BATCH {
        // Real-time or deadline, chosen by whoever started xvio: theirs to keep.
        return Ok(SliceOutcome::Unsupported);
    }
    let wanted = u64::try_from(slice.as_nanos()).unwrap_or(u64::MAX);
    attr.sched_runtime = wanted;
    // Only reset-on-fork is carried over: the others would ask for more (utilization
    // clamps need a larger struct) or keep the old slice (KEEP_PARAMS).
    attr.sched_flags &= libc::SCHED_FLAG_RESET_ON_FORK as u64;
    attr.sched_deadline = 0;
    attr.sched_period = 0;
    attr.size = ATTR_SIZE;
    // SAFETY: sched_setattr reads `attr.size` bytes from a live, initialized
    // `libc::sched_attr` of that size; pid 0 is the calling thread.
    let rc = unsafe { libc::syscall(libc::SYS_sched_setattr, 0, &raw const attr, 0) };
    if rc != 0 {
        return Err(SchedError::SetAttr {
            slice,
            source: std::io::Error::last_os_error(),
        });
    }
    // A kernel that applied it reports it (clamped to its range); one that ignores it
    // reports 0.
    let now = get_attr(0)?.sched_runtime;
    Ok(if now == wanted.clamp(SLICE_MIN_NS, SLICE_MAX_NS) {
        SliceOutcome::Set(Duration::from_nanos(now))
    } else {
        SliceOutcome::Unsupported
    })
}

/// The range the kernel clamps a requested slice to, in ns.
const SLICE_MIN_NS: u64 = 100_000;
const SLICE_MAX_NS: u64 = 100_000_000;

/// `struct sched_attr` as `libc` has it (the first version, without utilization clamps).
const ATTR_SIZE: u32 = std::mem::size_of::<libc::sched_attr>() as u32;

/// Thread `tid`'s attributes (0: the calling thread).
fn get_attr(tid: libc::pid_t) -> Result<libc::sched_attr, SchedError> {
    // SAFETY: sched_attr is plain old data; all-zero is a valid value.
    let mut attr: libc::sched_attr = unsafe { std::mem::zeroed() };
    // SAFETY: sched_getattr writes at most ATTR_SIZE bytes into `attr`, a live value of
    // that size; `tid` is only a number to the kernel.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_sched_getattr,
            tid,
            &raw mut attr,
            ATTR_SIZE as libc::c_uint,
            0,
        )
    };
    if rc != 0 {
        return Err(SchedError::GetAttr(std::io::Error::last_os_error()));
    }
    Ok(attr)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// The kernel's version, (major, minor).
    pub(crate) fn kernel() -> (u32, u32) {
        let release = nix::sys::utsname::uname()
            .map(|u| u.release().to_string_lossy().into_owned())
            .unwrap_or_default();
        let mut parts = release.split(['.', '-']).map(|p| p.parse().unwrap_or(0));
        (parts.next().unwrap_or(0), parts.next().unwrap_or(0))
    }

    #[test]
    fn a_thread_gets_the_short_slice_and_keeps_its_nice_value() {
        std::thread::spawn(|| {
            // A nicer thread than the default (allowed without privileges).
            // SAFETY: setpriority takes no pointers; who 0 is the calling thread.
            assert_eq!(unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, 5) }, 0);
            let outcome = set_worker_slice(WORKER_SLICE).expect("sched_setattr");
            if kernel() >= (6, 12) {
                assert_eq!(outcome, SliceOutcome::Set(WORKER_SLICE));
                assert_eq!(slice_of(0).expect("sched_getattr"), WORKER_SLICE);
            } else {
                assert_eq!(outcome, SliceOutcome::Unsupported);
            }
            assert_eq!(get_attr(0).expect("sched_getattr").sched_nice, 5);
        })
        .join()
        .expect("the test thread");
    }

    #[test]
    fn a_real_time_thread_is_left_alone() {
        std::thread::spawn(|| {
            let param = libc::sched_param { sched_priority: 1 };
            // SAFETY: `param` is a live sched_param; pid 0 is the calling thread.
            if unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &raw const param) } != 0 {
                // Not root: nothing to check.
                return;
            }
            assert_eq!(
                set_worker_slice(WORKER_SLICE).expect("sched_getattr"),
                SliceOutcome::Unsupported
            );
            assert_eq!(
                get_attr(0).expect("sched_getattr").sched_policy as libc::c_int,
                libc::SCHED_FIFO
            );
        })
        .join()
        .expect("the test thread");
    }
}
