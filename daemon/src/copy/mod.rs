//! The copy engine: copies between AF_XDP buffers and guest memory, offloaded to DMA
//! channels, following DPDK's vhost asynchronous data path.
//!
//! - `channel`: the dmadev-shaped [`DmaChannel`] trait and its contract.
//! - backends: `cpu` (synchronous memcpy), `sw` (an asynchronous software engine on a core
//!   of its own), `dsa` (Intel DSA work queues; feature `dsa`).
//! - `pool`: the daemon's channels and the virtqueue each is bound to.
//! - `engine`: the per-virtqueue [`CopyEngine`]: threshold, in-order release, CPU fallback on
//!   any fault, drain, dirty logging, counters.
//! - `calibrate`: the automatic threshold.
//!
//! `unsafe` lives here because a copy engine writes through raw addresses by nature; every
//! entry point that takes addresses is an `unsafe fn` whose `# Safety` says what must hold.

pub mod calibrate;
pub mod channel;
pub mod cpu;
#[cfg(all(feature = "dsa", target_arch = "x86_64"))]
pub mod dsa;
pub mod engine;
#[cfg(test)]
mod engine_tests;
#[cfg(test)]
mod mock;
pub mod pool;
pub mod sw;

pub use channel::{ChannelKind, Completed, DmaChannel, DmaError, DmaFault, OpStatus};
pub use engine::{CopyEngine, CopyStats, DirtyLog, DrainError, Segment};
pub use pool::{BindError, BoundChannel, ChannelPool, QueueRef};
