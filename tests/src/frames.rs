//! Packet tests built from literal bytes: the builders of `verse::frames` (the frames `verse
//! trace --run` synthesizes, one function per layer; its documentation states what each header
//! carries), the wire numbers under the short names the tests write, and a MAC parser.

pub use verse::frames::*;

/// The RFC 1071 checksum the frames carry (0 over a header that carries its own right).
pub use dataplane_common::wire::checksum;
/// EtherTypes and TCP flags, from the wire numbers the kernel and the model use, under the short
/// names the tests write.
pub use dataplane_common::wire::{
    ETHERTYPE_ARP as ETH_ARP, ETHERTYPE_IPV4 as ETH_IPV4, ETHERTYPE_IPV6 as ETH_IPV6,
    TCP_ACK as ACK, TCP_SYN as SYN,
};
pub const SYN_ACK: u8 = SYN | ACK;

/// The IPv6 address the literal-frame tests give the endpoint at the IPv4 address `ip`:
/// fd00::<its last byte>.
pub fn ip6_of(ip: [u8; 4]) -> [u8; 16] {
    let mut a = [0; 16];
    a[0] = 0xfd;
    a[15] = ip[3];
    a
}

/// Parses a MAC written `aa:bb:cc:dd:ee:ff`.
pub fn mac_bytes(text: &str) -> [u8; 6] {
    let parts: Vec<u8> = text
        .split(':')
        .map(|p| u8::from_str_radix(p, 16).unwrap_or_else(|e| panic!("MAC {text:?}: {e}")))
        .collect();
    parts.try_into().unwrap_or_else(|_| panic!("MAC {text:?} is not 6 bytes"))
}

/// An Ethernet frame from MAC `src_mac` to `dst_mac` carrying a UDP datagram from `src` to `dst`
/// (both of one family), as a workload that forges packets would write it.
pub fn udp_frame(
    (dst_mac, src_mac): ([u8; 6], [u8; 6]),
    (src, dst): (std::net::IpAddr, std::net::IpAddr),
    (sport, dport): (u16, u16),
    msg: &[u8],
) -> Vec<u8> {
    use std::net::IpAddr;
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let packet = ipv4(s.octets(), d.octets(), 17, &udp(sport, dport, msg));
            ethernet(dst_mac, src_mac, ETH_IPV4, &packet)
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            let (s, d) = (s.octets(), d.octets());
            let packet = ipv6(s, d, 17, &udp6(s, d, sport, dport, msg));
            ethernet(dst_mac, src_mac, ETH_IPV6, &packet)
        }
        _ => panic!("{src} and {dst} are not of one family"),
    }
}
