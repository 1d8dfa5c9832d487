//! Receiving with the daemon's own AF_XDP port (`xvio::xsk::XskPort`) in tests.

use std::time::{Duration, Instant};

use xvio::xsk::XskPort;

/// Receives on `ports` until `want` frames came in all or none came for `idle`; returns
/// copies of the frames, per port, in arrival order.
pub fn receive_all(ports: &mut [XskPort], want: usize, idle: Duration) -> Vec<Vec<Vec<u8>>> {
    let mut got: Vec<Vec<Vec<u8>>> = ports.iter().map(|_| Vec::new()).collect();
    let mut last = Instant::now();
    while got.iter().map(Vec::len).sum::<usize>() < want && last.elapsed() < idle {
        let mut any = 0;
        for (port, out) in ports.iter_mut().zip(got.iter_mut()) {
            any += port.to_guest_burst(64, |bytes| out.push(bytes.to_vec()));
        }
        if any > 0 {
            last = Instant::now();
        } else {
            std::thread::sleep(Duration::from_micros(100));
        }
    }
    got
}
