//! `sw`: an asynchronous software copy engine. A worker thread (pinned to a configured core)
//! takes descriptors from a lock-free single-producer ring, copies, and publishes how many it
//! finished; the submitting thread polls that count, or waits on an eventfd.
//!
//! It is the DMA channel of machines without a DMA device, and the fair way to show what
//! offload buys on two cores: the submitting core pays a descriptor write and a doorbell
//! instead of the copy.
//!
//! Ring protocol (one producer: the channel's owner; one consumer: the worker):
//! - slot `i % N` is written by the owner only while `i >= tail` (not yet visible) and
//!   `i - reported < N` (the worker finished the op that last used it);
//! - `tail` (release) publishes slots below it; the worker reads a slot only below `tail`;
//! - `done` (release) says the worker finished every op below it; the owner reports in order.

use std::{
    cell::UnsafeCell,
    os::fd::{AsFd, BorrowedFd},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::{JoinHandle, Thread},
    time::{Duration, Instant},
};

use nix::sys::eventfd::{EfdFlags, EventFd};

use super::channel::{ChannelKind, Completed, DmaChannel, DmaError, OpStatus};

/// How the worker behaves.
#[derive(Clone, Debug)]
pub struct SwConfig {
    /// Core to pin the worker to (`None`: let the scheduler choose).
    pub core: Option<usize>,
    /// Ring entries (rounded up to a power of two, at most 32768).
    pub ring: u32,
    /// How long the worker busy-polls an empty ring before it sleeps.
    pub idle_spin: Duration,
}

impl Default for SwConfig {
    fn default() -> SwConfig {
        SwConfig {
            core: None,
            ring: 4096,
            idle_spin: Duration::from_micros(50),
        }
    }
}

#[derive(Clone, Copy)]
struct Desc {
    src: *const u8,
    dst: *mut u8,
    len: u32,
}

struct Shared {
    slots: Box<[UnsafeCell<Desc>]>,
    mask: u64,
    /// Ops published by the owner.
    tail: AtomicU64,
    /// Ops the worker finished.
    done: AtomicU64,
    stop: AtomicBool,
    sleeping: AtomicBool,
    notify: AtomicBool,
    eventfd: EventFd,
}

// SAFETY: the slots are plain data shared by the ring protocol in the module doc: the owner
// writes a slot only when the worker cannot be reading it, and the worker reads it only
// after the owner published it with a release store of `tail` (acquired by the worker).
// The raw pointers in them are covered by DmaChannel::copy's contract.
unsafe impl Sync for Shared {}
// SAFETY: as above; nothing in Shared is tied to a thread.
unsafe impl Send for Shared {}

/// A channel served by the software copy engine.
pub struct SwChannel {
    name: String,
    shared: Arc<Shared>,
    worker: Option<JoinHandle<()>>,
    thread: Thread,
    /// Ops written into the ring (published or not).
    enqueued: u64,
    /// Ops reported complete to the owner.
    reported: u64,
}

impl std::fmt::Debug for SwChannel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SwChannel")
            .field("name", &self.name)
            .field("enqueued", &self.enqueued)
            .field("reported", &self.reported)
            .finish()
    }
}

impl SwChannel {
    /// Starts a worker thread named after `name` with `config`.
    pub fn start(name: &str, config: &SwConfig) -> Result<SwChannel, DmaError> {
        let entries = config.ring.clamp(2, 1 << 15).next_power_of_two();
        let empty = Desc {
            src: std::ptr::null(),
            dst: std::ptr::null_mut(),
            len: 0,
        };
        let eventfd =
            EventFd::from_value_and_flags(0, EfdFlags::EFD_NONBLOCK | EfdFlags::EFD_CLOEXEC)
                .map_err(|e| DmaError::Unavailable(format!("eventfd for {name}: {e}")))?;
        let shared = Arc::new(Shared {
            slots: (0..entries).map(|_| UnsafeCell::new(empty)).collect(),
            mask: u64::from(entries - 1),
            tail: AtomicU64::new(0),
            done: AtomicU64::new(0),
            stop: AtomicBool::new(false),
            sleeping: AtomicBool::new(false),
            notify: AtomicBool::new(false),
            eventfd,
        });
        let name = match config.core {
            Some(core) => format!("{name}@cpu{core}"),
            None => name.to_owned(),
        };
        let worker_shared = Arc::clone(&shared);
        let (core, idle_spin) = (config.core, config.idle_spin);
        // The worker says whether it got its core before it works: a channel asked for a core
        // it cannot have does not start (as a datapath worker's CPU).
        let (pinned_tx, pinned_rx) = std::sync::mpsc::sync_channel(1);
        let worker = std::thread::Builder::new()
            .name(format!("xvio-{name}"))
            .spawn(move || {
                let pinned = core.map_or(Ok(()), crate::datapath::sched::pin_to);
                let ok = pinned.is_ok();
                let _ = pinned_tx.send(pinned);
                if ok {
                    work(&worker_shared, idle_spin);
                }
            })
            .map_err(|e| DmaError::Unavailable(format!("starting the {name} worker: {e}")))?;
        match pinned_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                let _ = worker.join();
                return Err(DmaError::Unavailable(format!(
                    "the {name} worker cannot run on CPU {}: {e}; give a CPU of this machine \
                     (see nproc) in --dma sw:CORE",
                    core.unwrap_or_default()
                )));
            }
            Err(_) => {
                let _ = worker.join();
                return Err(DmaError::Unavailable(format!(
                    "the {name} worker did not start"
                )));
            }
        }
        let thread = worker.thread().clone();
        Ok(SwChannel {
            name,
            shared,
            worker: Some(worker),
            thread,
            enqueued: 0,
            reported: 0,
        })
    }

    fn capacity(&self) -> u64 {
        self.shared.mask + 1
    }
}

/// The worker: copies published descriptors in order; spins when idle, then sleeps.
fn work(shared: &Shared, idle_spin: Duration) {
    let mut head = shared.done.load(Ordering::Relaxed);
    let mut idle_since = Instant::now();
    let mut idle_spins = 0u64;
    loop {
        let tail = shared.tail.load(Ordering::Acquire);
        if head < tail {
            while head < tail {
                // SAFETY: slot `head` was published by the release store of `tail` that the
                // acquire load above saw, and the owner will not rewrite it before `done`
                // passes `head` (ring protocol).
                let desc = unsafe { *shared.slots[(head & shared.mask) as usize].get() };
                // SAFETY: DmaChannel::copy's contract: src readable, dst writable for len
                // bytes, no overlap, valid until the op is reported, which is after `done`
                // covers it.
                unsafe { std::ptr::copy_nonoverlapping(desc.src, desc.dst, desc.len as usize) };
                head += 1;
            }
            shared.done.store(head, Ordering::Release);
            // A plain load first: the read-modify-write only when someone is waiting.
            if shared.notify.load(Ordering::Relaxed) && shared.notify.swap(false, Ordering::AcqRel)
            {
                let _ = shared.eventfd.write(1);
            }
            idle_spins = 0;
            continue;
        }
        if shared.stop.load(Ordering::Acquire) {
            return;
        }
        // Read the clock only every 64 idle polls: it costs more than a poll.
        idle_spins += 1;
        if idle_spins == 1 {
            idle_since = Instant::now();
        }
        if !idle_spins.is_multiple_of(64) || idle_since.elapsed() < idle_spin {
            std::hint::spin_loop();
            continue;
        }
        // Announce the sleep, then look once more, so a submit in between is not missed.
        shared.sleeping.store(true, Ordering::SeqCst);
        if shared.tail.load(Ordering::SeqCst) == head && !shared.stop.load(Ordering::SeqCst) {
            // Woken by `submit` (or `drop`), which sees `sleeping` after storing `tail`: with
            // both sides SeqCst, either that store is visible above or the unpark comes.
            std::thread::park();
        }
        shared.sleeping.store(false, Ordering::SeqCst);
        idle_spins = 0;
    }
}

impl DmaChannel for SwChannel {
    fn kind(&self) -> ChannelKind {
        ChannelKind::Sw
    }

    fn name(&self) -> &str {
        &self.name
    }

    unsafe fn copy(&mut self, src: *const u8, dst: *mut u8, len: u32) -> Result<u16, DmaError> {
        if self.enqueued - self.reported >= self.capacity() {
            return Err(DmaError::Full);
        }
        let slot = &self.shared.slots[(self.enqueued & self.shared.mask) as usize];
        // SAFETY: ring protocol: `enqueued >= tail`, so the worker does not read this slot,
        // and `enqueued - reported < N`, so the op that used it last is finished.
        unsafe { *slot.get() = Desc { src, dst, len } };
        let idx = self.enqueued as u16;
        self.enqueued += 1;
        Ok(idx)
    }

    fn submit(&mut self) -> Result<(), DmaError> {
        self.shared.tail.store(self.enqueued, Ordering::SeqCst);
        if self.shared.sleeping.load(Ordering::SeqCst) {
            self.thread.unpark();
        }
        Ok(())
    }

    fn completed(&mut self, max: u16) -> Completed {
        let done = self.shared.done.load(Ordering::Acquire);
        let count = (done - self.reported).min(u64::from(max)) as u16;
        self.reported += u64::from(count);
        Completed {
            count,
            last_idx: self.reported.wrapping_sub(1) as u16,
            has_error: false,
        }
    }

    fn completed_status(&mut self, status: &mut [OpStatus]) -> u16 {
        let done = self.completed(u16::try_from(status.len()).unwrap_or(u16::MAX));
        status[..usize::from(done.count)].fill(OpStatus::Success);
        done.count
    }

    fn burst_capacity(&self) -> u16 {
        u16::try_from(self.capacity() - (self.enqueued - self.reported)).unwrap_or(u16::MAX)
    }

    fn completion_fd(&self) -> Option<BorrowedFd<'_>> {
        Some(self.shared.eventfd.as_fd())
    }

    fn clear_notification(&mut self) {
        self.consume_eventfd();
    }

    fn arm_notification(&mut self) {
        self.shared.notify.store(true, Ordering::SeqCst);
        // Completions that landed before arming would not wake anyone: signal them now.
        if self.shared.done.load(Ordering::SeqCst) > self.reported
            && self.shared.notify.swap(false, Ordering::AcqRel)
        {
            let _ = self.shared.eventfd.write(1);
        }
    }
}

impl SwChannel {
    fn consume_eventfd(&self) {
        // Non-blocking: EAGAIN when nothing was signalled.
        let _ = self.shared.eventfd.read();
    }
}

impl Drop for SwChannel {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.thread.unpark();
        if let Some(worker) = self.worker.take() {
            let _ = worker.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;

    use super::*;

    /// Every byte of a couple of million copies of random sizes and alignments, with the
    /// worker on the other core when there is one.
    #[test]
    fn millions_of_random_copies_are_exact() {
        const SRC: usize = 8 << 20;
        const DST: usize = 8 << 20;
        const COPIES: u64 = 2_000_000;
        let mut rng = 0x2545_f491_4f6c_dd1du64;
        let mut next = move |n: usize| {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            (rng % n as u64) as usize
        };
        let src: Vec<u8> = (0..SRC).map(|i| (i * 7 + i / 251) as u8).collect();
        let mut dst = vec![0u8; DST];
        let mut ch = SwChannel::start(
            "sw-test",
            &SwConfig {
                core: Some(1),
                ..SwConfig::default()
            },
        )
        .unwrap();
        // (src offset, dst offset, len) of ops not yet verified, in order.
        let mut pending: VecDeque<(usize, usize, usize)> = VecDeque::new();
        let (mut dst_head, mut submitted, mut verified) = (0usize, 0u64, 0u64);
        while verified < COPIES {
            // At most 512 copies of at most 4 KiB are pending: under 2 MiB of the 8 MiB dst
            // ring, so a new copy never lands on a pending one.
            while submitted < COPIES && ch.burst_capacity() > 0 && pending.len() < 512 {
                let len = 1 + if next(4) == 0 { next(4096) } else { next(256) };
                if dst_head + len > DST {
                    dst_head = 0;
                }
                let s = next(SRC - len);
                // SAFETY: both ranges are inside live vectors; the dst range overlaps no
                // pending copy (see above) and is not touched until verified.
                unsafe {
                    ch.copy(
                        src.as_ptr().add(s),
                        dst.as_mut_ptr().add(dst_head),
                        len as u32,
                    )
                }
                .unwrap();
                pending.push_back((s, dst_head, len));
                dst_head += len;
                submitted += 1;
            }
            ch.submit().unwrap();
            let done = ch.completed(u16::MAX);
            assert!(!done.has_error);
            for _ in 0..done.count {
                let (s, d, len) = pending.pop_front().unwrap();
                assert!(
                    src[s..s + len] == dst[d..d + len],
                    "copy {verified}: {len} B from {s} to {d}"
                );
                verified += 1;
            }
        }
        assert_eq!(ch.completed(u16::MAX).count, 0);
    }

    #[test]
    fn a_channel_asked_for_a_cpu_it_cannot_have_does_not_start() {
        let config = SwConfig {
            core: Some(4000),
            ..SwConfig::default()
        };
        match SwChannel::start("sw9", &config) {
            Ok(_) => panic!("a channel pinned to CPU 4000 started"),
            Err(e) => assert!(e.to_string().contains("cannot run on CPU 4000"), "{e}"),
        }
        let here = SwConfig {
            core: Some(0),
            ..SwConfig::default()
        };
        assert!(SwChannel::start("sw0", &here).is_ok(), "CPU 0 is there");
    }

    #[test]
    fn the_eventfd_wakes_a_waiter() {
        let mut ch = SwChannel::start(
            "sw-notify",
            &SwConfig {
                idle_spin: Duration::ZERO,
                ..SwConfig::default()
            },
        )
        .unwrap();
        let src = vec![3u8; 1 << 16];
        let mut dst = vec![0u8; 1 << 16];
        std::thread::sleep(Duration::from_millis(5)); // let the worker go to sleep
        ch.arm_notification();
        // SAFETY: both vectors outlive the channel's use of them (completion awaited below).
        unsafe { ch.copy(src.as_ptr(), dst.as_mut_ptr(), 1 << 16) }.unwrap();
        ch.submit().unwrap();
        let fd = ch.completion_fd().unwrap();
        let mut fds = [nix::poll::PollFd::new(fd, nix::poll::PollFlags::POLLIN)];
        let ready = nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(5000u16)).unwrap();
        assert_eq!(ready, 1, "the completion fd became readable");
        assert_eq!(ch.completed(8).count, 1);
        assert_eq!(dst, src);
    }
}
