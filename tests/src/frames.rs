//! Ethernet frames for tests.

/// EtherType of IPv4, used for filler frames.
pub const ETH_P_IP: u16 = 0x0800;
/// EtherType of an experimental protocol (IEEE 802 local experimental 1): the kernel
/// drops such frames quietly, which suits frames that only XDP should see.
pub const ETH_P_EXPERIMENTAL: u16 = 0x88b5;

/// A frame of `len` bytes (at least 14, or 18 when tagged) to `dst` from `src`, with an
/// optional 802.1Q tag; the payload carries `seq` and then a byte pattern derived from it.
pub fn frame(
    dst: [u8; 6],
    src: [u8; 6],
    vlan: Option<u16>,
    ethertype: u16,
    len: usize,
    seq: u32,
) -> Vec<u8> {
    let mut f = Vec::with_capacity(len);
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    if let Some(vid) = vlan {
        f.extend_from_slice(&0x8100u16.to_be_bytes());
        f.extend_from_slice(&(vid & 0x0fff).to_be_bytes());
    }
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(&seq.to_be_bytes());
    let mut x = seq.wrapping_mul(2_654_435_761);
    while f.len() < len {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        f.push(x as u8);
    }
    f.truncate(len.max(if vlan.is_some() { 18 } else { 14 }));
    f
}

/// The `seq` that [`frame`] wrote into an untagged frame, if the frame is long enough.
pub fn seq_of(frame: &[u8]) -> Option<u32> {
    let bytes = frame.get(14..18)?;
    Some(u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]))
}
