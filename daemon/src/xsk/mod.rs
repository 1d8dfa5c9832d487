//! The NIC side of the datapath. One [`XskPort`] per (interface, enabled rx queue), each with
//! its own UMEM, rings and frame pool, owned by the datapath worker; [`tap`] reads the
//! broadcast and multicast frames the interface receives, for the guests.
//!
//! `unsafe` lives in [`umem`] (the mapping the kernel reads and writes, its registration, and
//! the socket calls xdpilone does not wrap) and [`tap`] (its AF_PACKET socket and filter).
//! [`queues`] says which queues take a socket.

pub mod port;
pub mod queues;
pub mod tap;
pub mod umem;

pub use port::{BURST, BindMode, FrameCounts, XskConfig, XskError, XskPort};
