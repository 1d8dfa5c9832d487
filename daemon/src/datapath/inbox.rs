//! Frames handed to a worker by another thread (today: group frames from the wire, read by an
//! interface's tap). Bounded, its buffers allocated once; a full inbox refuses the frame (the
//! sender counts it). The worker looks at an atomic count each iteration, so an empty inbox
//! costs it one load.

use std::{
    collections::VecDeque,
    sync::{
        Mutex,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
};

use crate::vhost::net::MAX_FRAME;

/// Frames an inbox holds at most.
pub const INBOX_FRAMES: usize = 256;

struct Slots {
    full: VecDeque<Vec<u8>>,
    free: Vec<Vec<u8>>,
}

/// A bounded queue of frames.
pub struct Inbox {
    slots: Mutex<Slots>,
    len: AtomicUsize,
    received: AtomicU64,
    dropped: AtomicU64,
    unusable: AtomicU64,
}

impl std::fmt::Debug for Inbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inbox")
            .field("len", &self.len.load(Ordering::Relaxed))
            .finish()
    }
}

impl Default for Inbox {
    fn default() -> Inbox {
        Inbox {
            slots: Mutex::new(Slots {
                full: VecDeque::with_capacity(INBOX_FRAMES),
                free: (0..INBOX_FRAMES)
                    .map(|_| Vec::with_capacity(MAX_FRAME))
                    .collect(),
            }),
            len: AtomicUsize::new(0),
            received: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            unusable: AtomicU64::new(0),
        }
    }
}

impl Inbox {
    /// Queues a copy of `frame`; false (counted) when full or the frame too long.
    pub fn push(&self, frame: &[u8]) -> bool {
        self.received.fetch_add(1, Ordering::Relaxed);
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        let buf = (frame.len() <= MAX_FRAME)
            .then(|| slots.free.pop())
            .flatten();
        let Some(mut buf) = buf else {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return false;
        };
        buf.clear();
        buf.extend_from_slice(frame);
        slots.full.push_back(buf);
        // SeqCst, as the worker's flag that it sleeps: either the worker's last look before
        // sleeping sees this frame, or the sender's look at the flag that follows sees it
        // asleep and wakes it.
        self.len.fetch_add(1, Ordering::SeqCst);
        true
    }

    /// Whether frames wait (one atomic load).
    pub fn has_frames(&self) -> bool {
        self.len.load(Ordering::SeqCst) > 0
    }

    /// Shows every waiting frame, oldest first, to `each`, and frees them.
    pub fn drain(&self, mut each: impl FnMut(&[u8])) -> usize {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        let mut n = 0;
        while let Some(buf) = slots.full.pop_front() {
            each(&buf);
            slots.free.push(buf);
            n += 1;
        }
        self.len.fetch_sub(n, Ordering::Release);
        n
    }

    /// Frames refused because the inbox was full (or the frame too long).
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Frames offered to the inbox, taken or not.
    pub fn received(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }

    /// Counts a frame the worker took out and dropped: no free bounce buffer, or shorter
    /// than an Ethernet header.
    pub fn count_unusable(&self) {
        self.unusable.fetch_add(1, Ordering::Relaxed);
    }

    /// Frames the worker took out and dropped (see [`Self::count_unusable`]).
    pub fn unusable(&self) -> u64 {
        self.unusable.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_come_out_in_order_and_a_full_inbox_counts_its_drops() {
        let inbox = Inbox::default();
        assert!(!inbox.has_frames());
        for i in 0..INBOX_FRAMES {
            assert!(inbox.push(&[i as u8; 60]));
        }
        assert!(!inbox.push(&[0; 60]));
        assert!(!Inbox::default().push(&vec![0; MAX_FRAME + 1]));
        assert_eq!(inbox.dropped(), 1);
        assert_eq!(inbox.received(), INBOX_FRAMES as u64 + 1);
        let mut seen = Vec::new();
        assert_eq!(inbox.drain(|f| seen.push(f[0])), INBOX_FRAMES);
        assert_eq!(seen[..3], [0, 1, 2]);
        assert!(!inbox.has_frames());
        assert!(inbox.push(&[1; 60]), "buffers are reused");
    }
}
