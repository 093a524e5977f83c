//! Neighbour discovery (RFC 4861) between a workload and its gateway, written once for the
//! kernel programs (`dataplane-ebpf/src/nd.rs`) and the reference model
//! (`controller/src/verdict/ipv6.rs`): which neighbour discovery messages a workload may send,
//! which solicitations the gateway answers, and the advertisement it answers with. Multicast
//! listener discovery (MLD, the other link-local ICMPv6 a workload's stack sends unasked) is
//! judged here too ([`for_gateway`]), and never answered.
//!
//! The gateway is the workload's only neighbour, as with ARP (`dataplane-ebpf/src/arp.rs`): it
//! answers a neighbour solicitation for every target but the endpoint's own addresses, with its
//! own MAC, so that every IPv6 address the workload sends to (a peer in the universe, or the
//! router it was given) resolves to the gateway. [`judge`] is the contract, first failing check
//! wins:
//! 1. The source must be the endpoint's IPv6 address, its link-local address ([`link_local`],
//!    derived from its MAC as Linux does by default: modified EUI-64) or `::` (duplicate-address
//!    detection): else `SpoofedIp`.
//! 2. A router advertisement or a redirect: `NdSpoofed` (only the gateway routes). An MLD
//!    message (query, report, done): `MldUnanswered` (Verse carries no multicast; a stack
//!    reports its solicited-node groups whenever an interface comes up, and counting that as
//!    spoofing would cry wolf).
//! 3. A neighbour advertisement: for the endpoint's own IPv6 or link-local address
//!    `NdUnanswered` (an announcement nobody else needs), for any other target, or too short
//!    to name one, `NdSpoofed`.
//! 4. A router solicitation: `NdUnanswered` (addresses are configured, never advertised).
//! 5. A neighbour solicitation is answered ([`advert`]) if its code is 0, its hop limit 255,
//!    it names a target (24 bytes of ICMPv6 within the payload), its source is not `::`
//!    (duplicate-address detection, which must go unanswered or the workload's address would
//!    be a duplicate), and the target is neither multicast, nor `::`, nor the endpoint's own
//!    IPv6 or link-local address; anything else `NdUnanswered`.
use crate::wire::{
    ETHERTYPE_IPV6, ETH_HLEN, IPPROTO_ICMPV6, MLD2_REPORT, MLD_DONE, MLD_QUERY, MLD_REPORT,
    ND_NEIGHBOUR_ADVERT, ND_NEIGHBOUR_SOLICIT, ND_REDIRECT, ND_ROUTER_ADVERT, ND_ROUTER_SOLICIT,
};
use crate::DropReason;

/// Offset of a solicitation's or advertisement's target address in its ICMPv6 message, and the
/// length of the message up to its end.
pub const TARGET_OFF: usize = 8;
pub const TARGET_END: usize = TARGET_OFF + 16;
/// The hop limit every neighbour discovery message carries (RFC 4861 section 7.1.1).
pub const HOP_LIMIT: u8 = 255;
/// Length of the advertisement the gateway answers with: its ICMPv6 message (header, flags,
/// target, target link-layer address option) and the whole frame.
pub const ADVERT_ICMP_LEN: usize = TARGET_END + 8;
pub const ADVERT_FRAME_LEN: usize = ETH_HLEN + 40 + ADVERT_ICMP_LEN;
/// Flags of the advertisement: solicited and override (RFC 4861 section 4.4).
pub const ADVERT_FLAGS: u8 = 0x60;
/// Option type of the target link-layer address (RFC 4861 section 4.6.1).
pub const OPT_TARGET_LL: u8 = 2;

/// True for the ICMPv6 types of neighbour discovery (133 to 137).
#[inline(always)]
pub const fn is_nd(icmp_type: u8) -> bool {
    icmp_type >= ND_ROUTER_SOLICIT && icmp_type <= ND_REDIRECT
}

/// True for the ICMPv6 a workload sends its link, which the gateway takes and [`judge`]s:
/// neighbour discovery and multicast listener discovery (130 to 132, 143).
#[inline(always)]
pub const fn for_gateway(icmp_type: u8) -> bool {
    is_nd(icmp_type)
        || (icmp_type >= MLD_QUERY && icmp_type <= MLD_DONE)
        || icmp_type == MLD2_REPORT
}

/// The link-local address Linux gives an interface with `mac` by default (RFC 4291 appendix
/// A, modified EUI-64): fe80::, then the MAC with ff:fe in its middle and the
/// universal/local bit flipped.
#[inline(always)]
pub const fn link_local(mac: [u8; 6]) -> [u8; 16] {
    [
        0xfe,
        0x80,
        0,
        0,
        0,
        0,
        0,
        0,
        mac[0] ^ 0x02,
        mac[1],
        mac[2],
        0xff,
        0xfe,
        mac[3],
        mac[4],
        mac[5],
    ]
}

/// True if `a` is [`link_local`]`(mac)`, compared without building that address (the kernel
/// programs would build it on their stack, with stores the verifier may refuse).
#[inline(always)]
pub const fn is_link_local_of(a: &[u8; 16], mac: &[u8; 6]) -> bool {
    a[0] == 0xfe
        && a[1] == 0x80
        && a[2] | a[3] | a[4] | a[5] | a[6] | a[7] == 0
        && a[8] == mac[0] ^ 0x02
        && a[9] == mac[1]
        && a[10] == mac[2]
        && a[11] == 0xff
        && a[12] == 0xfe
        && a[13] == mac[3]
        && a[14] == mac[4]
        && a[15] == mac[5]
}

#[inline(always)]
const fn is_zero(a: &[u8; 16]) -> bool {
    let mut i = 0;
    while i < 16 {
        if a[i] != 0 {
            return false;
        }
        i += 1;
    }
    true
}

#[inline(always)]
const fn same(a: &[u8; 16], b: &[u8; 16]) -> bool {
    let mut i = 0;
    while i < 16 {
        if a[i] != b[i] {
            return false;
        }
        i += 1;
    }
    true
}

/// The neighbour discovery message of type `ty` and `code`, with `hop_limit`, from `src`,
/// naming `target` (`None`: too short to name one), sent by the endpoint whose IPv6 address is
/// `own` (`::` for none) and MAC `mac` (its link-local address is [`link_local`]`(mac)`): `Ok`
/// if the gateway answers it, else why it is dropped (see the module contract).
#[inline(always)]
pub fn judge(
    ty: u8,
    code: u8,
    hop_limit: u8,
    src: &[u8; 16],
    target: Option<&[u8; 16]>,
    own: &[u8; 16],
    mac: &[u8; 6],
) -> Result<(), DropReason> {
    let mine = |a: &[u8; 16]| (!is_zero(own) && same(a, own)) || is_link_local_of(a, mac);
    if !mine(src) && !is_zero(src) {
        return Err(DropReason::SpoofedIp);
    }
    match ty {
        ND_ROUTER_ADVERT | ND_REDIRECT => Err(DropReason::NdSpoofed),
        MLD_QUERY | MLD_REPORT | MLD_DONE | MLD2_REPORT => Err(DropReason::MldUnanswered),
        ND_NEIGHBOUR_ADVERT => match target {
            Some(t) if mine(t) => Err(DropReason::NdUnanswered),
            _ => Err(DropReason::NdSpoofed),
        },
        ND_NEIGHBOUR_SOLICIT => match target {
            Some(t)
                if code == 0
                    && hop_limit == HOP_LIMIT
                    && !is_zero(src)
                    && t[0] != 0xff
                    && !is_zero(t)
                    && !mine(t) =>
            {
                Ok(())
            }
            _ => Err(DropReason::NdUnanswered),
        },
        _ => Err(DropReason::NdUnanswered),
    }
}

/// The gateway's answer to a solicitation for `target` from `src` (the workload at `mac`): a
/// solicited neighbour advertisement from `target` to `src`, hop limit 255, with the gateway's
/// MAC as the target's link-layer address, in an Ethernet frame from the gateway to `mac`.
pub fn advert(
    gateway_mac: &[u8; 6],
    mac: &[u8; 6],
    target: &[u8; 16],
    src: &[u8; 16],
) -> [u8; ADVERT_FRAME_LEN] {
    let mut f = [0u8; ADVERT_FRAME_LEN];
    advert_into(&mut f, gateway_mac, mac, target, src);
    f
}

/// [`advert`], written into `f` (every byte of it): the kernel programs write it straight into
/// the packet.
#[inline(always)]
pub fn advert_into(
    f: &mut [u8; ADVERT_FRAME_LEN],
    gateway_mac: &[u8; 6],
    mac: &[u8; 6],
    target: &[u8; 16],
    src: &[u8; 16],
) {
    let ip = ETH_HLEN;
    let icmp = ip + 40;
    let mut i = 0;
    while i < 6 {
        f[i] = mac[i];
        f[6 + i] = gateway_mac[i];
        f[icmp + TARGET_END + 2 + i] = gateway_mac[i];
        i += 1;
    }
    let et = ETHERTYPE_IPV6.to_be_bytes();
    f[12] = et[0];
    f[13] = et[1];
    // Version 6, traffic class and flow label 0; payload length; next header; hop limit.
    let fixed = [0x60, 0, 0, 0, 0, ADVERT_ICMP_LEN as u8, IPPROTO_ICMPV6, HOP_LIMIT];
    let mut i = 0;
    while i < 8 {
        f[ip + i] = fixed[i];
        i += 1;
    }
    let mut i = 0;
    while i < 16 {
        f[ip + 8 + i] = target[i];
        f[ip + 24 + i] = src[i];
        f[icmp + TARGET_OFF + i] = target[i];
        i += 1;
    }
    // Type, code, checksum (0 while summing), flags and reserved; the option's type and length.
    let head = [ND_NEIGHBOUR_ADVERT, 0, 0, 0, ADVERT_FLAGS, 0, 0, 0];
    let mut i = 0;
    while i < 8 {
        f[icmp + i] = head[i];
        i += 1;
    }
    f[icmp + TARGET_END] = OPT_TARGET_LL;
    f[icmp + TARGET_END + 1] = 1;
    // The ICMPv6 checksum (RFC 4443 section 2.3) over the pseudo-header (addresses, length,
    // next header) and the message.
    let mut sum: u32 = ADVERT_ICMP_LEN as u32 + IPPROTO_ICMPV6 as u32;
    let mut i = ip + 8;
    while i < ADVERT_FRAME_LEN {
        sum += u32::from(u16::from_be_bytes([f[i], f[i + 1]]));
        i += 2;
    }
    while sum > 0xFFFF {
        sum = (sum & 0xFFFF) + (sum >> 16);
    }
    let c = (!(sum as u16)).to_be_bytes();
    f[icmp + 2] = c[0];
    f[icmp + 3] = c[1];
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use crate::wire::checksum;

    const MAC: [u8; 6] = [0x02, 0xaa, 0, 0, 0, 2];
    const GW: [u8; 6] = [0x02, 0, 0, 0, 0, 1];

    fn addr(last: u8) -> [u8; 16] {
        let mut a = [0; 16];
        a[0] = 0xfd;
        a[15] = last;
        a
    }

    #[test]
    fn the_link_local_address_is_the_modified_eui64_of_the_mac() {
        let ll = link_local([0x02, 0xaa, 0xbb, 0xcc, 0xdd, 0xee]);
        assert_eq!(ll, "fe80::aa:bbff:fecc:ddee".parse::<std::net::Ipv6Addr>().unwrap().octets());
        assert!(is_link_local_of(&ll, &[0x02, 0xaa, 0xbb, 0xcc, 0xdd, 0xee]));
        for i in 0..16 {
            let mut other = ll;
            other[i] ^= 1;
            assert!(!is_link_local_of(&other, &[0x02, 0xaa, 0xbb, 0xcc, 0xdd, 0xee]), "byte {i}");
        }
    }

    #[test]
    fn solicitations_are_answered_for_every_target_but_the_endpoints_own() {
        let (own, ll) = (addr(2), link_local(MAC));
        let ns = |src: &[u8; 16], t: &[u8; 16], hop| {
            judge(ND_NEIGHBOUR_SOLICIT, 0, hop, src, Some(t), &own, &MAC)
        };
        assert_eq!(ns(&own, &addr(3), 255), Ok(()));
        assert_eq!(ns(&ll, &link_local(GW), 255), Ok(()));
        assert_eq!(ns(&[0; 16], &own, 255), Err(DropReason::NdUnanswered), "DAD");
        assert_eq!(ns(&[0; 16], &addr(3), 255), Err(DropReason::NdUnanswered), "DAD");
        assert_eq!(ns(&ll, &own, 255), Err(DropReason::NdUnanswered));
        assert_eq!(ns(&own, &ll, 255), Err(DropReason::NdUnanswered));
        assert_eq!(ns(&own, &addr(3), 64), Err(DropReason::NdUnanswered), "hop limit");
        let mut mcast = addr(3);
        mcast[0] = 0xff;
        assert_eq!(ns(&own, &mcast, 255), Err(DropReason::NdUnanswered));
        assert_eq!(ns(&addr(9), &addr(3), 255), Err(DropReason::SpoofedIp));
        let short = judge(ND_NEIGHBOUR_SOLICIT, 0, 255, &own, None, &own, &MAC);
        assert_eq!(short, Err(DropReason::NdUnanswered));
        // An endpoint without an IPv6 address owns only its link-local one.
        let none = judge(ND_NEIGHBOUR_SOLICIT, 0, 255, &[0; 16], Some(&addr(3)), &[0; 16], &MAC);
        assert_eq!(none, Err(DropReason::NdUnanswered));
        let from_ll = judge(ND_NEIGHBOUR_SOLICIT, 0, 255, &ll, Some(&addr(3)), &[0; 16], &MAC);
        assert_eq!(from_ll, Ok(()));
    }

    #[test]
    fn a_workload_advertises_only_its_own_addresses_and_never_routes() {
        let (own, ll) = (addr(2), link_local(MAC));
        let na = |t: &[u8; 16]| judge(ND_NEIGHBOUR_ADVERT, 0, 255, &own, Some(t), &own, &MAC);
        assert_eq!(na(&own), Err(DropReason::NdUnanswered));
        assert_eq!(na(&ll), Err(DropReason::NdUnanswered));
        assert_eq!(na(&addr(3)), Err(DropReason::NdSpoofed));
        assert_eq!(
            judge(ND_NEIGHBOUR_ADVERT, 0, 255, &own, None, &own, &MAC),
            Err(DropReason::NdSpoofed)
        );
        for ty in [ND_ROUTER_ADVERT, ND_REDIRECT] {
            assert_eq!(judge(ty, 0, 255, &ll, None, &own, &MAC), Err(DropReason::NdSpoofed));
        }
        let rs = judge(ND_ROUTER_SOLICIT, 0, 255, &ll, None, &own, &MAC);
        assert_eq!(rs, Err(DropReason::NdUnanswered));
    }

    #[test]
    fn the_advertisement_is_a_checksummed_solicited_answer_from_the_gateway() {
        let f = advert(&GW, &MAC, &addr(3), &addr(2));
        assert_eq!(f.len(), 86);
        assert_eq!((&f[0..6], &f[6..12]), (&MAC[..], &GW[..]));
        assert_eq!((&f[22..38], &f[38..54]), (&addr(3)[..], &addr(2)[..]));
        assert_eq!((f[54], f[58], &f[62..78]), (136, 0x60, &addr(3)[..]));
        assert_eq!(&f[78..86], &[2, 1, GW[0], GW[1], GW[2], GW[3], GW[4], GW[5]]);
        // The checksum over the pseudo-header and the message verifies to 0.
        let mut pseudo = std::vec::Vec::new();
        pseudo.extend_from_slice(&f[22..54]);
        pseudo.extend_from_slice(&[0, 0, 0, 32, 0, 0, 0, 58]);
        pseudo.extend_from_slice(&f[54..86]);
        assert_eq!(checksum(&pseudo), 0);
    }
}
