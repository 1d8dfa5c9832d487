//! A guest's mailbox: frames other ports send it, waiting for its worker to write them into
//! the guest's RX queue. Bounded, with its buffers allocated once; a full mailbox refuses
//! the frame (the sender counts the drop). Its eventfd wakes the guest's worker.

use std::{collections::VecDeque, sync::Mutex};

use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::net::MAX_FRAME;

/// Frames a mailbox holds at most.
pub const MAILBOX_FRAMES: usize = 256;

struct Slots {
    full: VecDeque<Vec<u8>>,
    free: Vec<Vec<u8>>,
}

/// One guest's incoming frames.
pub struct Mailbox {
    slots: Mutex<Slots>,
    event: EventFd,
}

impl std::fmt::Debug for Mailbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mailbox")
            .field("pending", &self.pending())
            .finish()
    }
}

impl Mailbox {
    /// An empty mailbox of [`MAILBOX_FRAMES`] buffers.
    pub fn new() -> std::io::Result<Mailbox> {
        Ok(Mailbox {
            slots: Mutex::new(Slots {
                full: VecDeque::with_capacity(MAILBOX_FRAMES),
                free: (0..MAILBOX_FRAMES)
                    .map(|_| Vec::with_capacity(MAX_FRAME))
                    .collect(),
            }),
            event: EventFd::new(EFD_NONBLOCK)?,
        })
    }

    /// The eventfd the owner's worker waits on.
    pub fn event(&self) -> &EventFd {
        &self.event
    }

    /// Queues a copy of `frame`; false when the mailbox is full or the frame too long.
    pub fn push(&self, frame: &[u8]) -> bool {
        if frame.len() > MAX_FRAME {
            return false;
        }
        let Ok(mut slots) = self.slots.lock() else {
            return false;
        };
        let Some(mut buf) = slots.free.pop() else {
            return false;
        };
        buf.clear();
        buf.extend_from_slice(frame);
        slots.full.push_back(buf);
        true
    }

    /// Wakes the owner (once per burst of pushes is enough).
    pub fn notify(&self) {
        let _ = self.event.write(1);
    }

    /// Shows waiting frames, oldest first, to `deliver` until it returns false (no room in
    /// the guest); the refused frame stays first in line. Returns how many were delivered.
    pub fn drain(&self, mut deliver: impl FnMut(&[u8]) -> bool) -> usize {
        let _ = self.event.read();
        let Ok(mut slots) = self.slots.lock() else {
            return 0;
        };
        let mut n = 0;
        while let Some(buf) = slots.full.pop_front() {
            if !deliver(&buf) {
                slots.full.push_front(buf);
                break;
            }
            slots.free.push(buf);
            n += 1;
        }
        n
    }

    /// Takes the oldest waiting frame's buffer out (for a copy that finishes later); give it
    /// back with [`Mailbox::recycle`] once copied, or [`Mailbox::put_back`] if not.
    pub fn take(&self) -> Option<Vec<u8>> {
        self.slots.lock().ok()?.full.pop_front()
    }

    /// Returns a frame taken with [`Mailbox::take`] to the front of the line.
    pub fn put_back(&self, frame: Vec<u8>) {
        if let Ok(mut slots) = self.slots.lock() {
            slots.full.push_front(frame);
        }
    }

    /// Returns the buffer of a frame taken with [`Mailbox::take`] and delivered (or dropped).
    pub fn recycle(&self, frame: Vec<u8>) {
        if let Ok(mut slots) = self.slots.lock() {
            slots.free.push(frame);
        }
    }

    /// Consumes a pending wake-up (the caller is about to look at the frames).
    pub fn clear_wakeup(&self) {
        let _ = self.event.read();
    }

    /// Frames waiting.
    pub fn pending(&self) -> usize {
        self.slots.lock().map_or(0, |s| s.full.len())
    }

    /// Drops every waiting frame (device reset); returns how many.
    pub fn clear(&self) -> usize {
        let _ = self.event.read();
        let Ok(mut slots) = self.slots.lock() else {
            return 0;
        };
        let Slots { full, free } = &mut *slots;
        let n = full.len();
        free.extend(full.drain(..));
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_wait_in_order_and_the_mailbox_is_bounded() {
        let mb = Mailbox::new().unwrap();
        for i in 0..MAILBOX_FRAMES {
            assert!(mb.push(&[i as u8; 60]));
        }
        assert!(!mb.push(&[0; 60]), "full");
        assert!(
            !Mailbox::new().unwrap().push(&vec![0; MAX_FRAME + 1]),
            "too long"
        );
        let mut seen = Vec::new();
        assert_eq!(
            mb.drain(|f| {
                seen.push(f[0]);
                seen.len() < 10
            }),
            9
        );
        assert_eq!(mb.pending(), MAILBOX_FRAMES - 9, "the refused frame stays");
        mb.drain(|f| {
            seen.push(f[0]);
            true
        });
        assert_eq!(seen[9], 9, "the refused frame comes first next time");
        assert_eq!(mb.pending(), 0);
        mb.push(&[1; 10]);
        mb.push(&[2; 10]);
        let first = mb.take().unwrap();
        assert_eq!(first[0], 1);
        mb.put_back(first);
        let again = mb.take().unwrap();
        assert_eq!(again[0], 1, "put back in front");
        mb.recycle(again);
        mb.clear();
        assert_eq!(mb.pending(), 0);
        // Every buffer is home: all MAILBOX_FRAMES can be pushed again.
        assert_eq!(
            (0..MAILBOX_FRAMES).filter(|_| mb.push(&[0; 60])).count(),
            MAILBOX_FRAMES
        );
    }
}
