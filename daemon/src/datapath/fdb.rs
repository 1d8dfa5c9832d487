//! The worker's forwarding table: which of its guests owns a destination MAC. Owned by the
//! worker and changed only between bursts (guests come and go through its command queue), so
//! a lookup takes no lock. Group addresses (multicast, broadcast) are not in it: they go to
//! every guest but the sender, and to the wire.

use std::{
    collections::HashMap,
    hash::{BuildHasherDefault, Hasher},
};

use crate::config::MacAddr;

/// Where a frame goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dest {
    /// The guest in this slot of the worker.
    Guest(usize),
    /// Every guest but the sender, and the wire.
    Flood,
    /// Not a local guest: the wire.
    Wire,
}

/// A multiplicative hash of a MAC packed into a u64 (keys are already well spread).
#[derive(Debug, Default)]
pub struct MacHasher(u64);

impl Hasher for MacHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = (n ^ (n >> 29)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

/// MAC → slot of a local guest.
#[derive(Debug, Default)]
pub struct Fdb {
    by_mac: HashMap<u64, usize, BuildHasherDefault<MacHasher>>,
}

/// The MAC at the start of `bytes` as a key.
fn key(mac: &[u8; 6]) -> u64 {
    let mut k = [0u8; 8];
    k[..6].copy_from_slice(mac);
    u64::from_le_bytes(k)
}

impl Fdb {
    /// Where a frame to `dst` goes.
    pub fn lookup(&self, dst: &[u8; 6]) -> Dest {
        if dst[0] & 1 != 0 {
            return Dest::Flood;
        }
        match self.by_mac.get(&key(dst)) {
            Some(&slot) => Dest::Guest(slot),
            None => Dest::Wire,
        }
    }

    /// Rebuilds the table from the worker's guests (slot order).
    pub fn rebuild(&mut self, macs: impl Iterator<Item = MacAddr>) {
        self.by_mac.clear();
        for (slot, mac) in macs.enumerate() {
            self.by_mac.insert(key(&mac.0), slot);
        }
    }
}

/// The destination MAC of `frame`, if it is long enough to have one.
pub fn dst_of(frame: &[u8]) -> Option<&[u8; 6]> {
    frame.get(..6)?.try_into().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unicast_to_its_guest_group_to_all_unknown_to_the_wire() {
        let mut fdb = Fdb::default();
        fdb.rebuild([MacAddr([2, 0, 0, 0, 0, 1]), MacAddr([2, 0, 0, 0, 0, 2])].into_iter());
        assert_eq!(fdb.lookup(&[2, 0, 0, 0, 0, 2]), Dest::Guest(1));
        assert_eq!(fdb.lookup(&[2, 0, 0, 0, 0, 3]), Dest::Wire);
        assert_eq!(fdb.lookup(&[0xff; 6]), Dest::Flood);
        assert_eq!(fdb.lookup(&[0x33, 0x33, 0, 0, 0, 1]), Dest::Flood);
        assert_eq!(dst_of(&[1, 2, 3]), None);
    }
}
