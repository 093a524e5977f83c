//! Packets built from literal bytes: the frames `verse trace --run` synthesizes and the tests
//! send, one function per layer, composed the way the wire nests them (smoltcp's tests do the
//! same). The checksum and the wire numbers come from `dataplane_common::wire`, the ones the
//! kernel programs and the reference model read.
//!
//! Contract: every builder writes exactly the fields a reader of the header would check, with
//! fixed values for the rest (IPv4: IHL 5 unless [`with_ipv4_options`] adds options, TTL 64, ID
//! 1 and DF unless [`ipv4_with`] says otherwise, header checksum computed; TCP: seq 1, data
//! offset 5, window 0xFFFF, checksum 0; UDP: checksum 0, which IPv4 reads as "none"; ICMP:
//! checksum computed; IPv6: traffic class and flow label 0, hop limit 64; ICMPv6: checksum
//! computed over the pseudo-header). A test that needs a broken header builds the good one and
//! then overwrites the bytes it wants to break. The builders panic on a packet over 64 KiB:
//! every caller builds small, fixed shapes. TCP and UDP checksums stay 0 inside IPv6 too,
//! where a receiving stack would refuse them: nothing past the dataplane reads these frames.

use dataplane_common::wire::{checksum, ipv6, ETHERTYPE_ARP, IPPROTO_ICMPV6, ND_NEIGHBOUR_SOLICIT};

/// An Ethernet II frame.
pub fn ethernet(dst: [u8; 6], src: [u8; 6], ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(14 + payload.len());
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// An IPv4 packet (ID 1, DF) carrying `payload` as protocol `proto`.
pub fn ipv4(src: [u8; 4], dst: [u8; 4], proto: u8, payload: &[u8]) -> Vec<u8> {
    ipv4_with(src, dst, proto, 1, true, payload)
}

/// An IPv4 packet with the given identification and don't-fragment bit.
pub fn ipv4_with(
    src: [u8; 4],
    dst: [u8; 4],
    proto: u8,
    id: u16,
    df: bool,
    payload: &[u8],
) -> Vec<u8> {
    let total = u16::try_from(20 + payload.len()).expect("an IPv4 packet fits 64 KiB");
    let mut h = Vec::with_capacity(usize::from(total));
    h.extend_from_slice(&[0x45, 0]);
    h.extend_from_slice(&total.to_be_bytes());
    h.extend_from_slice(&id.to_be_bytes());
    h.extend_from_slice(&[if df { 0x40 } else { 0 }, 0, 64, proto, 0, 0]);
    h.extend_from_slice(&src);
    h.extend_from_slice(&dst);
    let c = checksum(&h);
    h[10..12].copy_from_slice(&c.to_be_bytes());
    h.extend_from_slice(payload);
    h
}

/// `packet` (IPv4 without options, as [`ipv4_with`] builds it) with `options` (a multiple of 4
/// bytes, at most 40) after its fixed header: the IHL, the total length and the checksum count
/// them.
pub fn with_ipv4_options(packet: &[u8], options: &[u8]) -> Vec<u8> {
    assert!(
        options.len().is_multiple_of(4) && options.len() <= 40,
        "IPv4 options are whole words, at most 10"
    );
    let header = 20 + options.len();
    let mut p = [&packet[..20], options, &packet[20..]].concat();
    let total = u16::try_from(p.len()).expect("an IPv4 packet fits 64 KiB");
    p[0] = 0x40 | (header / 4) as u8;
    p[2..4].copy_from_slice(&total.to_be_bytes());
    p[10..12].fill(0);
    let c = checksum(&p[..header]);
    p[10..12].copy_from_slice(&c.to_be_bytes());
    p
}

/// An IPv6 packet whose fixed header names `next` and whose payload (extension headers
/// included, see [`ipv6_extensions`]) is `payload`.
pub fn ipv6(src: [u8; 16], dst: [u8; 16], next: u8, payload: &[u8]) -> Vec<u8> {
    let len = u16::try_from(payload.len()).expect("an IPv6 payload fits 64 KiB");
    let mut p = Vec::with_capacity(ipv6::HLEN + payload.len());
    p.extend_from_slice(&[0x60, 0, 0, 0]);
    p.extend_from_slice(&len.to_be_bytes());
    p.extend_from_slice(&[next, 64]);
    p.extend_from_slice(&src);
    p.extend_from_slice(&dst);
    p.extend_from_slice(payload);
    p
}

/// The extension headers `exts` (each its next-header value and its length in bytes: a multiple
/// of 8, or for AH of 4, at least 8) in that order, each naming the one after it and the last
/// naming `proto`, then `payload`: what follows the fixed IPv6 header, and the next header the
/// fixed header names (`proto` when `exts` is empty). Each header's length byte counts in its
/// own unit (RFC 8200 section 4; AH: RFC 4302 section 2.2); its options or data are zeros
/// (Pad1 options, or a type 0 routing header with no segments left).
pub fn ipv6_extensions(exts: &[(u8, usize)], proto: u8, payload: &[u8]) -> (u8, Vec<u8>) {
    let mut out = Vec::new();
    for (i, &(kind, len)) in exts.iter().enumerate() {
        let units = if kind == ipv6::NEXTHDR_AUTH { len / 4 - 2 } else { len / 8 - 1 };
        let mut h = vec![0; len];
        h[0] = exts.get(i + 1).map_or(proto, |e| e.0);
        h[1] = u8::try_from(units).expect("an extension header's length fits its byte");
        out.extend_from_slice(&h);
    }
    out.extend_from_slice(payload);
    (exts.first().map_or(proto, |e| e.0), out)
}

/// An ICMPv6 message from `src` to `dst`: type, code, the four type-specific bytes `rest`, then
/// `payload`; checksum computed over the IPv6 pseudo-header (RFC 8200 section 8.1).
pub fn icmpv6(
    src: [u8; 16],
    dst: [u8; 16],
    ty: u8,
    code: u8,
    rest: [u8; 4],
    payload: &[u8],
) -> Vec<u8> {
    let mut i = vec![ty, code, 0, 0];
    i.extend_from_slice(&rest);
    i.extend_from_slice(payload);
    let len = u32::try_from(i.len()).expect("an ICMPv6 message fits 4 GiB");
    let pseudo = [&src[..], &dst, &len.to_be_bytes(), &[0, 0, 0, IPPROTO_ICMPV6], &i].concat();
    let c = checksum(&pseudo);
    i[2..4].copy_from_slice(&c.to_be_bytes());
    i
}

/// A TCP segment with `flags` followed by `payload` bytes counting up from 0.
pub fn tcp(sport: u16, dport: u16, flags: u8, payload: usize) -> Vec<u8> {
    let mut t = Vec::with_capacity(20 + payload);
    t.extend_from_slice(&sport.to_be_bytes());
    t.extend_from_slice(&dport.to_be_bytes());
    t.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0x50, flags, 0xFF, 0xFF, 0, 0, 0, 0]);
    t.extend((0..payload).map(|i| i as u8));
    t
}

/// A UDP datagram (no checksum).
pub fn udp(sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let len = u16::try_from(8 + payload.len()).expect("a UDP datagram fits 64 KiB");
    let mut u = Vec::with_capacity(usize::from(len));
    u.extend_from_slice(&sport.to_be_bytes());
    u.extend_from_slice(&dport.to_be_bytes());
    u.extend_from_slice(&len.to_be_bytes());
    u.extend_from_slice(&[0, 0]);
    u.extend_from_slice(payload);
    u
}

/// A UDP datagram over IPv6 from `src` to `dst`, its checksum computed over the pseudo-header
/// (RFC 8200 section 8.1: mandatory over IPv6).
pub fn udp6(src: [u8; 16], dst: [u8; 16], sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut u = udp(sport, dport, payload);
    let len = u32::try_from(u.len()).expect("a UDP datagram fits 64 KiB");
    let pseudo = [&src[..], &dst, &len.to_be_bytes(), &[0, 0, 0, 17], &u].concat();
    let c = match checksum(&pseudo) {
        0 => 0xFFFF,
        c => c,
    };
    u[6..8].copy_from_slice(&c.to_be_bytes());
    u
}

/// An ICMP message: type, code, the four type-specific bytes `rest`, then `payload`; checksum
/// computed.
pub fn icmp(ty: u8, code: u8, rest: [u8; 4], payload: &[u8]) -> Vec<u8> {
    let mut i = vec![ty, code, 0, 0];
    i.extend_from_slice(&rest);
    i.extend_from_slice(payload);
    let c = checksum(&i);
    i[2..4].copy_from_slice(&c.to_be_bytes());
    i
}

/// The IPv6 packet `packet` (from [`ipv6`]) with hop limit `hop`.
pub fn with_hop_limit(mut packet: Vec<u8>, hop: u8) -> Vec<u8> {
    packet[7] = hop;
    packet
}

/// An ICMPv6 neighbour solicitation (RFC 4861 section 4.3) from `src` to `dst` for `target`,
/// with a source link-layer address option `mac` when there is one.
pub fn neighbour_solicit(
    src: [u8; 16],
    dst: [u8; 16],
    target: [u8; 16],
    mac: Option<[u8; 6]>,
) -> Vec<u8> {
    let mut body = target.to_vec();
    if let Some(mac) = mac {
        body.extend_from_slice(&[1, 1]);
        body.extend_from_slice(&mac);
    }
    icmpv6(src, dst, ND_NEIGHBOUR_SOLICIT, 0, [0; 4], &body)
}

/// The four type-specific bytes of an echo request or reply: identifier `id`, sequence `seq`.
pub fn echo_rest(id: u16, seq: u16) -> [u8; 4] {
    let (i, s) = (id.to_be_bytes(), seq.to_be_bytes());
    [i[0], i[1], s[0], s[1]]
}

/// An ARP packet (Ethernet/IPv4) with operation `oper` (1 request, 2 reply) and an unknown
/// target hardware address, in an Ethernet broadcast from `eth_src`.
pub fn arp(eth_src: [u8; 6], oper: u16, sha: [u8; 6], spa: [u8; 4], tpa: [u8; 4]) -> Vec<u8> {
    let mut a = vec![0, 1, 0x08, 0x00, 6, 4];
    a.extend_from_slice(&oper.to_be_bytes());
    a.extend_from_slice(&sha);
    a.extend_from_slice(&spa);
    a.extend_from_slice(&[0; 6]);
    a.extend_from_slice(&tpa);
    ethernet([0xFF; 6], eth_src, ETHERTYPE_ARP, &a)
}

/// A broadcast ARP request (Ethernet/IPv4): who has `tpa`, tell `spa` at `sha`.
pub fn arp_request(sha: [u8; 6], spa: [u8; 4], tpa: [u8; 4]) -> Vec<u8> {
    arp(sha, 1, sha, spa, tpa)
}

/// The 8-byte VXLAN header with the Group Policy extension (README, wire format): `flags`
/// (G|I = 0x88 when well formed), the sender's identity as group policy id, the 24-bit VNI.
pub fn vxlan_gbp(flags: u8, group: u16, vni: u32) -> [u8; 8] {
    let g = group.to_be_bytes();
    let v = vni.to_be_bytes();
    [flags, 0, g[0], g[1], v[1], v[2], v[3], 0]
}

#[cfg(test)]
mod tests {
    use super::*;
    use dataplane_common::wire::{ETHERTYPE_IPV4, TCP_SYN};

    #[test]
    fn checksums_verify_to_zero_and_layers_nest() {
        let p = ipv4([10, 0, 0, 2], [10, 0, 0, 3], 1, &icmp(8, 0, echo_rest(1, 7), b"abc"));
        assert_eq!(checksum(&p[..20]), 0, "IPv4 header checksum");
        assert_eq!(checksum(&p[20..]), 0, "ICMP checksum over an odd length");
        assert_eq!(&p[2..4], &(20u16 + 8 + 3).to_be_bytes());
        assert_eq!(&p[4..8], &[0, 1, 0x40, 0]);
        let o = with_ipv4_options(&ipv4_with([1; 4], [2; 4], 6, 9, false, b"z"), &[1, 1, 1, 0]);
        assert_eq!((o[0], &o[2..4], &o[4..8]), (0x46, &[0u8, 25][..], &[0u8, 9, 0, 0][..]));
        assert_eq!(checksum(&o[..24]), 0, "the checksum covers the options");
        let u = udp(1, 2, b"xy");
        assert_eq!(u, [0, 1, 0, 2, 0, 10, 0, 0, b'x', b'y']);
        assert_eq!(
            vxlan_gbp(0x88, 0x1234, 0x00ab_cdef),
            [0x88, 0, 0x12, 0x34, 0xab, 0xcd, 0xef, 0]
        );
        let f = ethernet([1; 6], [2; 6], ETHERTYPE_IPV4, &p);
        assert_eq!(&f[12..14], &[0x08, 0x00]);
        assert_eq!(tcp(1, 2, TCP_SYN, 3)[20..], [0, 1, 2]);
        let a = arp_request([3; 6], [10, 0, 0, 1], [10, 0, 0, 9]);
        assert_eq!((a.len(), &a[..6], &a[20..22]), (42, &[0xFF; 6][..], &[0u8, 1][..]));
    }

    #[test]
    fn ipv6_headers_count_their_lengths_in_their_own_units() {
        let (src, dst) = ([0xfd; 16], [0xfe; 16]);
        let (first, rest) = ipv6_extensions(&[(0, 8), (43, 24), (51, 12)], 17, b"u");
        assert_eq!(first, 0);
        assert_eq!(rest.len(), 8 + 24 + 12 + 1);
        assert_eq!((rest[0], rest[1]), (43, 0), "hop-by-hop names routing; 8 bytes");
        assert_eq!((rest[8], rest[9]), (51, 2), "routing names AH; 24 bytes");
        assert_eq!((rest[32], rest[33]), (17, 1), "AH names UDP; 12 bytes in 4-octet units");
        assert_eq!(ipv6_extensions(&[], 6, b"t"), (6, b"t".to_vec()));
        let p = ipv6(src, dst, first, &rest);
        assert_eq!(&p[..8], &[0x60, 0, 0, 0, 0, 45, 0, 64]);
        assert_eq!((&p[8..24], &p[24..40]), (&src[..], &dst[..]));
        // The checksum of a message with its pseudo-header is 0.
        let m = icmpv6(src, dst, 128, 0, echo_rest(1, 2), b"abc");
        let pseudo = [&src[..], &dst, &[0, 0, 0, 11, 0, 0, 0, 58], &m].concat();
        assert_eq!(checksum(&pseudo), 0);
    }
}
