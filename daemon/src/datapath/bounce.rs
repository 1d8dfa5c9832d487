//! The worker's bounce buffers: where a frame from one guest waits between its two copies
//! (out of the sender's TX chain, into the receivers' RX buffers). Allocated once; a buffer
//! is handed out by index and comes back when every copy out of it completed.

use crate::vhost::{net::MAX_FRAME, queue::TX_BUF};

/// Bounce buffers per worker.
pub const BOUNCE_BUFFERS: usize = 512;

/// A fixed set of frame-sized buffers.
pub struct Bounce {
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
        Bounce {
            bufs: vec![[0u8; TX_BUF]; n].into_boxed_slice(),
            users: vec![0u16; n].into_boxed_slice(),
            free: (0..n as u32).rev().collect(),
        }
    }

    /// Takes a free buffer (one user), if any.
    pub fn take(&mut self) -> Option<u32> {
        let id = self.free.pop()?;
        self.users[id as usize] = 1;
        Some(id)
    }

    /// The buffer, to fill or read.
    pub fn buf_mut(&mut self, id: u32) -> &mut [u8; TX_BUF] {
        &mut self.bufs[id as usize]
    }

    /// `len` bytes of the buffer's frame (after the virtio-net header the TX read left).
    pub fn frame(&self, id: u32, off: usize, len: usize) -> &[u8] {
        &self.bufs[id as usize][off..off + len.min(MAX_FRAME)]
    }

    /// One more copy reads the buffer.
    pub fn share(&mut self, id: u32) {
        self.users[id as usize] += 1;
    }

    /// One copy out of the buffer is done; the last one frees it.
    pub fn release(&mut self, id: u32) {
        let users = &mut self.users[id as usize];
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
}
