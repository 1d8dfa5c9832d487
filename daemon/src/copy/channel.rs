//! The DMA channel interface, shaped like DPDK's dmadev (`rte_dma_copy`, `rte_dma_submit`,
//! `rte_dma_completed`, `rte_dma_completed_status`, `rte_dma_burst_capacity`).
//!
//! Contract every backend keeps:
//! - `copy` enqueues one operation and returns its ring index; indexes count up by one per
//!   operation and wrap at 2^16. Nothing is started before `submit`.
//! - Operations are reported complete strictly in enqueue order, each exactly once, whether
//!   they succeeded or failed. A failed `submit` does not lose operations: the ones it could
//!   not hand to the engine are reported as failed with [`DmaFault::NotSubmitted`].
//! - A failed operation may have written any part of its destination; the caller must redo it.

use std::os::fd::BorrowedFd;

use thiserror::Error;

/// Which implementation a channel is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChannelKind {
    /// Synchronous memcpy on the calling core.
    Cpu,
    /// The asynchronous software copy engine on a core of its own.
    Sw,
    /// Intel DSA through an idxd work queue.
    Dsa,
    /// A scripted channel for tests.
    Mock,
}

/// Why an operation failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DmaFault {
    /// The engine hit a page fault on the source or destination.
    PageFault,
    /// The engine refused the descriptor.
    InvalidDescriptor,
    /// The operation was enqueued but `submit` could not hand it to the engine.
    NotSubmitted,
    /// Any other error status the device reported (raw code).
    Device(u8),
}

/// Outcome of one completed operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpStatus {
    /// Copied in full.
    Success,
    /// Failed; the destination holds unknown bytes.
    Failed(DmaFault),
}

/// What `completed` found: `count` operations completed successfully, the last of them with
/// ring index `last_idx`; `has_error` says the next one failed (read it with
/// `completed_status`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Completed {
    /// Successful operations reported.
    pub count: u16,
    /// Ring index of the last one (meaningless when `count` is 0).
    pub last_idx: u16,
    /// The operation after them failed and is not consumed yet.
    pub has_error: bool,
}

/// Errors of channel calls.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum DmaError {
    /// No room for another operation before some complete.
    #[error("the DMA channel is full")]
    Full,
    /// The doorbell could not be rung; the operations are reported as `NotSubmitted`.
    #[error("submitting to the DMA channel failed: {0}")]
    Submit(String),
    /// The device is not there or cannot be used.
    #[error("DMA channel unavailable: {0}")]
    Unavailable(String),
    /// A copy longer than the channel accepts.
    #[error("a copy of {len} bytes exceeds the channel's maximum of {max}")]
    TooLong {
        /// Requested.
        len: u64,
        /// Accepted.
        max: u64,
    },
}

/// A DMA channel: asynchronous copies, submitted in bursts, completed in order.
pub trait DmaChannel: Send + std::fmt::Debug {
    /// The implementation.
    fn kind(&self) -> ChannelKind;

    /// A name for logs and stats (`sw0@cpu1`, `dsa/wq0.0` …).
    fn name(&self) -> &str;

    /// Enqueues a copy of `len` bytes from `src` to `dst`; returns its ring index.
    ///
    /// # Safety
    ///
    /// - `src` must be valid for reads and `dst` for writes of `len` bytes, and the two ranges
    ///   must not overlap;
    /// - both must stay valid, and nothing else may write `dst` or `src`, until this
    ///   operation is reported by `completed` or `completed_status`.
    unsafe fn copy(&mut self, src: *const u8, dst: *mut u8, len: u32) -> Result<u16, DmaError>;

    /// Enqueues a scatter-gather copy: every `(src, dst, len)` of `segments`, or none of them
    /// when the channel has no room for all (DPDK checks `rte_dma_burst_capacity` the same
    /// way before a packet, so that nothing is half-queued). Returns the last ring index.
    ///
    /// # Safety
    ///
    /// As [`DmaChannel::copy`], for every segment.
    unsafe fn copy_sg(&mut self, segments: &[(*const u8, *mut u8, u32)]) -> Result<u16, DmaError> {
        if segments.is_empty() || usize::from(self.burst_capacity()) < segments.len() {
            return Err(DmaError::Full);
        }
        let mut last = 0;
        for &(src, dst, len) in segments {
            // SAFETY: the caller's contract covers every segment.
            last = unsafe { self.copy(src, dst, len) }?;
        }
        Ok(last)
    }

    /// Hands every operation enqueued since the last submit to the engine.
    fn submit(&mut self) -> Result<(), DmaError>;

    /// Reports up to `max` operations that completed successfully, in order, stopping
    /// before the first failed one.
    fn completed(&mut self, max: u16) -> Completed;

    /// Reports up to `status.len()` completed operations, failed or not, in order, writing
    /// each one's status; returns how many.
    fn completed_status(&mut self, status: &mut [OpStatus]) -> u16;

    /// How many more operations can be enqueued now.
    fn burst_capacity(&self) -> u16;

    /// An fd that becomes readable when operations complete after
    /// [`DmaChannel::arm_notification`], for an epoll worker that waits; `None` when the
    /// channel completes synchronously. A channel whose device raises no completion
    /// interrupt (`dsa`) makes it readable a bounded poll interval after arming instead,
    /// whether or not anything completed: a waiter polls `completed` on every wake-up and
    /// arms again while operations are outstanding.
    fn completion_fd(&self) -> Option<BorrowedFd<'_>>;

    /// Asks for one wake-up on `completion_fd` at the next completion (or, without a
    /// completion interrupt, after the channel's poll interval).
    fn arm_notification(&mut self) {}

    /// Consumes a wake-up that `completion_fd` signalled (so that a level-triggered epoll
    /// does not report it again).
    fn clear_notification(&mut self) {}
}
