//! The worker's bounce buffers: where a frame from one guest waits between its two copies
//! (out of the sender's TX chain, into the receivers' RX buffers). Allocated once; a buffer
//! is handed out by id and comes back when every copy out of it completed. Each worker's
//! buffers have ids of their own (from `base`), so a buffer another worker finished with
//! finds its way home.

use crate::vhost::{net::MAX_FRAME, queue::TX_BUF};

/// Bounce buffers per worker.
pub const BOUNCE_BUFFERS: usize = 512;

/// A fixed set of frame-sized buffers.
pub struct Bounce {
    /// The first id.
    base: u32,
    bufs: Box<[[u8; TX_BUF]]>,
    /// Copies still reading each buffer (a broadcast frame goes to several guests).
    users: Box<[u16]>,
    free: Vec<u32>,
}

impl std::fmt::Debug for Bounce {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bounce")
            .field("free", &self.free.len())
            .finish()
    }
}

impl Default for Bounce {
    fn default() -> Bounce {
        Bounce::new(BOUNCE_BUFFERS)
    }
}

impl Bounce {
    /// `n` buffers.
    pub fn new(n: usize) -> Bounce {
        Bounce::with_base(n, 0)
    }

    /// `n` buffers with ids from `base`.
    pub fn with_base(n: usize, base: u32) -> Bounce {
        Bounce {
            base,
            bufs: vec![[0u8; TX_BUF]; n].into_boxed_slice(),
            users: vec![0u16; n].into_boxed_slice(),
            free: (base..base + n as u32).rev().collect(),
        }
    }

    /// Whether buffer `id` is one of these.
    pub fn owns(&self, id: u32) -> bool {
        id.checked_sub(self.base)
            .is_some_and(|i| (i as usize) < self.bufs.len())
    }

    fn index(&self, id: u32) -> usize {
        id.wrapping_sub(self.base) as usize
    }

    /// Takes a free buffer (one user), if any.
    pub fn take(&mut self) -> Option<u32> {
        let id = self.free.pop()?;
        let i = self.index(id);
        self.users[i] = 1;
        Some(id)
    }

    /// The buffer, to fill or read.
    pub fn buf_mut(&mut self, id: u32) -> &mut [u8; TX_BUF] {
        let i = self.index(id);
        &mut self.bufs[i]
    }

    /// `len` bytes of the buffer's frame (after the virtio-net header the TX read left).
    pub fn frame(&self, id: u32, off: usize, len: usize) -> &[u8] {
        &self.bufs[self.index(id)][off..off + len.min(MAX_FRAME)]
    }

    /// One more copy reads the buffer.
    pub fn share(&mut self, id: u32) {
        let i = self.index(id);
        self.users[i] += 1;
    }

    /// One copy out of the buffer is done; the last one frees it.
    pub fn release(&mut self, id: u32) {
        let i = self.index(id);
        let users = &mut self.users[i];
        debug_assert!(*users > 0, "bounce buffer {id} released twice");
        *users = users.saturating_sub(1);
        if *users == 0 {
            self.free.push(id);
        }
    }

    /// Buffers free now.
    pub fn available(&self) -> usize {
        self.free.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_shared_buffer_comes_back_with_its_last_user() {
        let mut b = Bounce::new(2);
        let x = b.take().unwrap();
        let _y = b.take().unwrap();
        assert!(b.take().is_none());
        b.share(x);
        b.release(x);
        assert_eq!(b.available(), 0);
        b.release(x);
        assert_eq!(b.available(), 1);
        assert_eq!(b.take(), Some(x));
    }

    #[test]
    fn a_second_workers_buffers_have_ids_of_their_own() {
        let (mut a, mut b) = (Bounce::new(4), Bounce::with_base(4, 4));
        let (x, y) = (a.take().unwrap(), b.take().unwrap());
        assert!(a.owns(x) && !a.owns(y) && b.owns(y) && !b.owns(x));
        b.buf_mut(y)[0] = 7;
        assert_eq!(b.frame(y, 0, 1), &[7]);
        b.release(y);
        assert_eq!(b.available(), 4);
    }
}
