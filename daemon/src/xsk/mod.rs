//! AF_XDP ports: the NIC side of the datapath. One [`XskPort`] per (interface, rx queue),
//! each with its own UMEM, rings and frame pool, driven by one worker thread.
//!
//! `unsafe` here is the UMEM's: the mapping the kernel reads and writes, and the socket
//! options xdpilone does not wrap.

pub mod port;
pub mod queues;
pub mod tap;
pub mod umem;
pub mod worker;

pub use port::{BURST, BindMode, FrameCounts, XskConfig, XskError, XskPort};
pub use worker::PortWorker;
