//! The guest side: serving a guest's vhost-user socket, and what a virtqueue and virtio-net
//! need (the datapath's worker does the moving; see `datapath`).
//!
//! - `guest`: a guest's socket, connection after connection; `compat`: the control-socket
//!   shim; `dirty`: the dirty log for live migration.
//! - `net`: virtio-net features, header and config space.
//! - `queue`: frames out of TX chains and into RX chains, validating every descriptor.
//! - `stats`: the guests' counters in the pinned `guest_stats` map.
//! - `socket`: a server-mode socket's file (only a stale socket is replaced).

pub mod compat;
pub mod dirty;
pub mod guest;
pub mod net;
pub mod populate;
pub mod queue;
pub mod socket;
pub mod stats;
