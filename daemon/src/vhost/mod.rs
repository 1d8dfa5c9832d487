//! The guest side: vhost-user-net backends (one per guest) and the L2 switch between them.
//!
//! - `net`: virtio-net features, header and config space.
//! - `queue`: frames out of TX chains and into RX chains, validating every descriptor.
//! - `mailbox`, `switch`: frames from one guest's worker to another's.
//! - `socket`: a server-mode socket's file (only a stale socket is replaced).

pub mod backend;
pub mod compat;
pub mod dirty;
pub mod guest;
pub mod mailbox;
pub mod net;
pub mod queue;
pub mod rx_dma;
pub mod socket;
pub mod stats;
pub mod switch;
