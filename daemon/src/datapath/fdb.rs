//! The worker's forwarding table: which of its guests owns a destination MAC on a VLAN (0:
//! untagged), as the XDP program's `steer` map is keyed. Owned by the worker and changed only
//! between bursts (guests come and go through its command queue), so a lookup takes no lock.
//! Group addresses (multicast, broadcast) are not in it: they go to every guest of the VLAN
//! but the sender, and to the wire.

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

/// (MAC, VLAN) → slot of a local guest.
#[derive(Debug, Default)]
pub struct Fdb {
    by_mac: HashMap<u64, usize, BuildHasherDefault<MacHasher>>,
}

/// `mac` on `vlan` as a key: the MAC in the low 48 bits, the VLAN id (12 bits) above.
fn key(mac: &[u8; 6], vlan: u16) -> u64 {
    let mut k = [0u8; 8];
    k[..6].copy_from_slice(mac);
    k[6..].copy_from_slice(&(vlan & 0x0fff).to_le_bytes());
    u64::from_le_bytes(k)
}

impl Fdb {
    /// Where a frame to `dst` on `vlan` (0: untagged) goes.
    pub fn lookup(&self, dst: &[u8; 6], vlan: u16) -> Dest {
        if dst[0] & 1 != 0 {
            return Dest::Flood;
        }
        match self.by_mac.get(&key(dst, vlan)) {
            Some(&slot) => Dest::Guest(slot),
            None => Dest::Wire,
        }
    }

    /// Rebuilds the table from the worker's guests' MACs and VLANs (slot order).
    pub fn rebuild(&mut self, guests: impl Iterator<Item = (MacAddr, u16)>) {
        self.by_mac.clear();
        for (slot, (mac, vlan)) in guests.enumerate() {
            self.by_mac.insert(key(&mac.0, vlan), slot);
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
        fdb.rebuild(
            [
                (MacAddr([2, 0, 0, 0, 0, 1]), 0),
                (MacAddr([2, 0, 0, 0, 0, 2]), 0),
            ]
            .into_iter(),
        );
        assert_eq!(fdb.lookup(&[2, 0, 0, 0, 0, 2], 0), Dest::Guest(1));
        assert_eq!(fdb.lookup(&[2, 0, 0, 0, 0, 3], 0), Dest::Wire);
        assert_eq!(fdb.lookup(&[0xff; 6], 0), Dest::Flood);
        assert_eq!(fdb.lookup(&[0x33, 0x33, 0, 0, 0, 1], 0), Dest::Flood);
        assert_eq!(dst_of(&[1, 2, 3]), None);
    }

    #[test]
    fn a_guest_is_found_on_its_vlan_only() {
        let a = MacAddr([2, 0, 0, 0, 0, 1]);
        let mut fdb = Fdb::default();
        fdb.rebuild([(a, 100), (MacAddr([2, 0, 0, 0, 0, 2]), 0), (a, 200)].into_iter());
        assert_eq!(fdb.lookup(&a.0, 100), Dest::Guest(0));
        assert_eq!(
            fdb.lookup(&a.0, 200),
            Dest::Guest(2),
            "one MAC on two VLANs"
        );
        assert_eq!(fdb.lookup(&a.0, 0), Dest::Wire, "untagged is not VLAN 100");
        assert_eq!(fdb.lookup(&a.0, 101), Dest::Wire);
        assert_eq!(fdb.lookup(&[2, 0, 0, 0, 0, 2], 100), Dest::Wire);
        assert_eq!(fdb.lookup(&[2, 0, 0, 0, 0, 2], 0), Dest::Guest(1));
        assert_eq!(fdb.lookup(&[0xff; 6], 100), Dest::Flood);
        // Only the VLAN id's 12 bits are the key: 4096 + 100 is VLAN 100.
        assert_eq!(fdb.lookup(&a.0, 4096 + 100), Dest::Guest(0));
    }
}
