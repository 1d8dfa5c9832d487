//! 802.1Q VLANs on the datapath. A guest given `mac=M@N` is an access port on VLAN N, as a
//! port with `tag=N` is in Open vSwitch: the guest sends and receives untagged frames, the
//! wire carries them tagged N, and the guest exchanges frames only with the guests of VLAN N
//! and the wire's VLAN N. An untagged guest is on VLAN 0 and sees frames as they are.
//!
//! A frame's VLAN is read as the XDP program reads it: the VID of one 802.1Q tag (TPID
//! 0x8100) right after the MACs, 0 without one (or with a priority tag, VID 0). The tag is
//! taken out or put in by moving the 12 bytes of MACs by 4 in the buffer the frame already
//! is in (a UMEM frame, a bounce buffer), so a frame still takes its one copy: the payload
//! is never moved for a tag.
//!
//! Every function here takes any bytes, of any length, and neither panics nor reads outside
//! them: a frame too short for what is asked is refused (`None`).

use std::ops::Deref;

use vm_memory::GuestMemory;

use crate::vhost::queue::{self, TxChain};

/// The 802.1Q tag protocol identifier.
pub const TPID: u16 = 0x8100;
/// Bytes of an 802.1Q tag (TPID and TCI).
pub const TAG_LEN: usize = 4;
/// Bytes of the two MACs, before the tag or the EtherType.
const MACS: usize = 12;
/// The VLAN id's bits of a TCI.
const VID_MASK: u16 = 0x0fff;

/// Whether `frame` carries an 802.1Q tag (it is at least long enough to say so).
pub fn is_tagged(frame: &[u8]) -> bool {
    frame.get(MACS..MACS + 2) == Some(&TPID.to_be_bytes()[..])
}

/// The VLAN of `frame` as the XDP program keys it: the VID of its 802.1Q tag, 0 when it has
/// none; `None` when it is shorter than an Ethernet header (with its tag and the EtherType
/// behind it, when tagged), which the XDP program passes to the kernel as malformed.
pub fn vlan_of(frame: &[u8]) -> Option<u16> {
    if frame.len() < MACS + 2 {
        return None;
    }
    if !is_tagged(frame) {
        return Some(0);
    }
    // The tag and the EtherType behind it.
    if frame.len() < MACS + TAG_LEN + 2 {
        return None;
    }
    Some(u16::from_be_bytes([frame[MACS + 2], frame[MACS + 3]]) & VID_MASK)
}

/// Removes the 802.1Q tag of `frame` where it lies: the MACs move 4 bytes on, over the tag.
/// Returns where the untagged frame now starts (`TAG_LEN`), or `None` (nothing changed) when
/// `frame` has no tag or is cut short in it.
pub fn strip_in_place(frame: &mut [u8]) -> Option<usize> {
    if !is_tagged(frame) || frame.len() < MACS + TAG_LEN {
        return None;
    }
    frame.copy_within(..MACS, TAG_LEN);
    Some(TAG_LEN)
}

/// Tags the untagged frame of `len` bytes at `buf[TAG_LEN..]` for `vlan`, where it lies: the
/// MACs move 4 bytes back and the tag goes between them and the EtherType. Returns the
/// tagged frame's length (it starts at `buf[0]`), or `None` when `buf` does not hold `len`
/// bytes after the tag's room or the frame has no EtherType.
pub fn tag_in_place(buf: &mut [u8], len: usize, vlan: u16) -> Option<usize> {
    let tagged_len = len.checked_add(TAG_LEN)?;
    if len < MACS + 2 || buf.len() < tagged_len {
        return None;
    }
    buf.copy_within(TAG_LEN..TAG_LEN + MACS, 0);
    buf[MACS..MACS + 2].copy_from_slice(&TPID.to_be_bytes());
    buf[MACS + 2..MACS + TAG_LEN].copy_from_slice(&(vlan & VID_MASK).to_be_bytes());
    Some(tagged_len)
}

/// Copies `frame` into `dst` without its 802.1Q tag, if it has one; returns the bytes
/// written (the frame is cut at `dst`'s end).
pub fn copy_untagged(frame: &[u8], dst: &mut [u8]) -> usize {
    let (head, rest) = match frame.split_at_checked(MACS) {
        Some((head, rest)) if is_tagged(frame) => (head, rest.get(TAG_LEN..).unwrap_or(&[])),
        _ => (frame, &[][..]),
    };
    let mut written = 0;
    for part in [head, rest] {
        let n = part.len().min(dst.len() - written);
        dst[written..written + n].copy_from_slice(&part[..n]);
        written += n;
    }
    written
}

/// Copies `frame` (from a guest: untagged) into `dst` as the wire carries it: tagged for
/// `vlan`, or as it is for VLAN 0. Returns its length on the wire, or `None` when it does not
/// fit in `dst` or is shorter than an Ethernet header.
pub fn copy_for_wire(frame: &[u8], dst: &mut [u8], vlan: u16) -> Option<usize> {
    if vlan == 0 {
        dst.get_mut(..frame.len())?.copy_from_slice(frame);
        return Some(frame.len());
    }
    dst.get_mut(TAG_LEN..TAG_LEN + frame.len())?
        .copy_from_slice(frame);
    tag_in_place(dst, frame.len(), vlan)
}

/// Whether the port of a guest on `vlan` refuses `frame`, one the guest sent: an access port
/// (a VLAN other than 0) takes untagged frames only, as Open vSwitch's access ports drop
/// frames with an 802.1Q header (here also those with VID 0).
pub fn refuses(frame: &[u8], vlan: u16) -> bool {
    vlan != 0 && is_tagged(frame)
}

/// The guest on an access port sent a frame that already carries an 802.1Q tag.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Refused;

/// Reads a guest's TX chain into `dst` (a UMEM frame) as the wire carries it, in its one
/// copy: for a guest on `vlan` (not 0) the frame lands 4 bytes in and is tagged in place, so
/// it must fit in `dst` with its tag or it is `Oversize`. `Frame(len)` gives the length on
/// the wire. `Err(Refused)` when the port refuses the frame (see [`refuses`]).
pub fn read_tx_for_wire<M>(
    chain: virtio_queue::DescriptorChain<M>,
    mem: &M::Target,
    dst: &mut [u8],
    vlan: u16,
) -> Result<TxChain, Refused>
where
    M: Deref,
    M::Target: GuestMemory,
{
    if vlan == 0 {
        return Ok(queue::read_tx_into(chain, mem, dst));
    }
    let Some(room) = dst.get_mut(TAG_LEN..) else {
        return Ok(queue::check_tx(chain, mem, 0));
    };
    match queue::read_tx_into(chain, mem, room) {
        TxChain::Frame(len) => {
            if refuses(&dst[TAG_LEN..TAG_LEN + len], vlan) {
                return Err(Refused);
            }
            // A frame read is at least an Ethernet header long and fits its room.
            Ok(tag_in_place(dst, len, vlan).map_or(TxChain::Malformed, TxChain::Frame))
        }
        other => Ok(other),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn untagged(len: usize) -> Vec<u8> {
        let mut f: Vec<u8> = (0..len).map(|i| i as u8).collect();
        if len >= 14 {
            f[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
        }
        f
    }

    fn tagged(len: usize, tci: u16) -> Vec<u8> {
        let inner = untagged(len);
        let mut f = inner[..12].to_vec();
        f.extend_from_slice(&TPID.to_be_bytes());
        f.extend_from_slice(&tci.to_be_bytes());
        f.extend_from_slice(&inner[12..]);
        f
    }

    #[test]
    fn reads_the_vlan_as_the_xdp_program_does() {
        assert_eq!(vlan_of(&untagged(60)), Some(0));
        assert_eq!(vlan_of(&tagged(60, 100)), Some(100));
        // The priority and DEI bits are not the VLAN; a priority tag is VLAN 0.
        assert_eq!(vlan_of(&tagged(60, 0xe000 | 4094)), Some(4094));
        assert_eq!(vlan_of(&tagged(60, 0x6000)), Some(0));
        assert_eq!(vlan_of(&untagged(14)), Some(0));
        assert_eq!(vlan_of(&untagged(13)), None);
        assert_eq!(vlan_of(&tagged(60, 100)[..18]), Some(100));
        assert_eq!(
            vlan_of(&tagged(60, 100)[..17]),
            None,
            "no EtherType after the tag"
        );
        assert_eq!(vlan_of(&tagged(60, 100)[..15]), None, "tag cut short");
    }

    #[test]
    fn a_tag_is_stripped_in_place_and_the_payload_stays_where_it_is() {
        let wire = tagged(64, 0x2000 | 100);
        let mut buf = wire.clone();
        assert_eq!(strip_in_place(&mut buf), Some(TAG_LEN));
        assert_eq!(buf[TAG_LEN..], untagged(64)[..]);
        let mut plain = untagged(64);
        assert_eq!(strip_in_place(&mut plain), None);
        assert_eq!(plain, untagged(64), "untouched");
    }

    #[test]
    fn a_tag_is_inserted_in_place_in_the_room_before_the_frame() {
        let frame = untagged(1514);
        let mut buf = vec![0xaa; TAG_LEN];
        buf.extend_from_slice(&frame);
        assert_eq!(tag_in_place(&mut buf, frame.len(), 100), Some(1518));
        assert_eq!(buf, tagged(1514, 100));
        assert_eq!(vlan_of(&buf), Some(100));
        // The VLAN id is 12 bits: nothing else is written into the TCI.
        let mut buf = vec![0; TAG_LEN + 60];
        tag_in_place(&mut buf, 60, 0xf000 | 5).unwrap();
        assert_eq!(&buf[12..16], &[0x81, 0x00, 0x00, 0x05]);
    }

    #[test]
    fn copies_strip_or_insert_the_tag_and_refuse_what_does_not_fit() {
        let mut dst = [0u8; 2048];
        let n = copy_untagged(&tagged(300, 7), &mut dst);
        assert_eq!(dst[..n], untagged(300)[..]);
        let n = copy_untagged(&untagged(300), &mut dst);
        assert_eq!(dst[..n], untagged(300)[..], "an untagged frame as it is");
        let n = copy_for_wire(&untagged(300), &mut dst, 7).unwrap();
        assert_eq!(dst[..n], tagged(300, 7)[..]);
        let n = copy_for_wire(&untagged(300), &mut dst, 0).unwrap();
        assert_eq!(dst[..n], untagged(300)[..]);
        // 2044 bytes and a tag fill a 2048-byte frame; one more does not fit.
        assert_eq!(copy_for_wire(&untagged(2044), &mut dst, 7), Some(2048));
        assert_eq!(copy_for_wire(&untagged(2045), &mut dst, 7), None);
        assert_eq!(copy_for_wire(&untagged(2049), &mut dst, 0), None);
        // The cut is at the destination's end.
        let mut small = [0u8; 20];
        assert_eq!(copy_untagged(&tagged(300, 7), &mut small), 20);
        assert_eq!(small[..], untagged(300)[..20]);
    }

    #[test]
    fn an_access_port_refuses_tagged_frames_only() {
        assert!(refuses(&tagged(60, 100), 100));
        assert!(refuses(&tagged(60, 0), 100), "a priority tag too");
        assert!(!refuses(&untagged(60), 100));
        assert!(
            !refuses(&tagged(60, 100), 0),
            "an untagged guest sends what it likes"
        );
    }

    #[test]
    fn no_input_makes_them_panic() {
        let mut seed = 0x9e37_79b9_u32;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 17;
            seed ^= seed << 5;
            seed
        };
        for len in 0..40usize {
            for _ in 0..64 {
                let mut frame: Vec<u8> = (0..len).map(|_| next() as u8).collect();
                if len >= 14 && next() % 2 == 0 {
                    frame[12..14].copy_from_slice(&TPID.to_be_bytes());
                }
                let vlan = (next() % 4096) as u16;
                let _ = vlan_of(&frame);
                let _ = refuses(&frame, vlan);
                let mut dst = vec![0u8; (next() % 48) as usize];
                let n = copy_untagged(&frame, &mut dst);
                assert!(n <= dst.len() && n <= frame.len());
                if let Some(n) = copy_for_wire(&frame, &mut dst, vlan) {
                    assert!(n <= dst.len());
                }
                let claimed = (next() % 48) as usize;
                if let Some(n) = tag_in_place(&mut frame.clone(), claimed, vlan) {
                    assert_eq!(n, claimed + TAG_LEN);
                    assert!(n <= frame.len());
                }
                let _ = tag_in_place(&mut frame.clone(), usize::MAX, vlan);
                if let Some(off) = strip_in_place(&mut frame) {
                    assert_eq!(off, TAG_LEN);
                }
            }
        }
    }
}
