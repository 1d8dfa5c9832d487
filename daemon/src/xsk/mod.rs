//! AF_XDP ports: the NIC side of the datapath. One [`XskPort`] per (interface, rx queue),
//! each with its own UMEM, rings and frame pool, driven by one worker thread.
//!
//! `unsafe` lives in [`umem`] only: the mapping the kernel reads and writes, its registration,
//! and the socket calls xdpilone does not wrap. [`queues`] says which queues take a socket.

pub mod port;
pub mod queues;
pub mod umem;
pub mod worker;

pub use port::{BURST, BindMode, FrameCounts, XskConfig, XskError, XskPort};
pub use worker::PortWorker;
