//! The encapsulation fixtures shared by the encapsulation test (`tests/dataplane_encap.rs`) and
//! the micro benchmark's wrap and unwrap scenarios: this host is [`HERE`] on the underlay, its
//! one local endpoint A (10.0.0.2, identity 1, slot 1) may send anything and admits TCP/80 from
//! one identity of endpoints placed on other hosts; the maps are written by hand (no compiler),
//! and a remote host's frames are built as that host puts them on the underlay.

use dataplane_common::{
    policy_prefix, Endpoint, PolicyKey, PolicyValue, Route, RouteKey, DIRECTION_EGRESS,
    DIRECTION_INGRESS, VXLAN_PORT,
};
use verse::compile::{MapContents, OwnerBudget};

use crate::frames::{ethernet, ipv4, udp, ETH_IPV4, ETH_IPV6};

pub const GATEWAY_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x00, 0x01];
pub const MAC_A: [u8; 6] = [0x02, 0xAA, 0x00, 0x00, 0x00, 0x02];
pub const IP_A: [u8; 4] = [10, 0, 0, 2];
pub const VNI: u32 = 7;
pub const ID_A: u32 = 1;
/// This host's underlay address.
pub const HERE: [u8; 4] = [198, 18, 0, 1];
/// The other hosts, in the order of their ids in the hosts map (2, 3, ...).
pub const HOSTS: [[u8; 4]; 2] = [[198, 18, 0, 2], [198, 18, 0, 3]];
pub const UNDERLAY_MTU: u32 = 1500;

/// An endpoint placed on another host, as its route says.
#[derive(Clone, Copy, Debug)]
pub struct Remote {
    pub ip: [u8; 4],
    pub mac: [u8; 6],
    pub identity: u32,
    /// Its host's underlay address.
    pub host: [u8; 4],
    pub serial: u64,
}

/// The maps for A on `if_a` (a conntrack budget of `budget` flows) and `remotes` on
/// [`HOSTS`]: A may send anything (egress to all), and admits TCP/80 from identity
/// `admit_from`.
pub fn desired(if_a: u32, budget: u64, remotes: &[Remote], admit_from: u32) -> MapContents {
    let mut d = MapContents::default();
    // A is serial 1 in slot 1; remote endpoints have no slot.
    d.endpoints.insert(
        if_a,
        Endpoint {
            ip: IP_A,
            mac: MAC_A,
            _pad: [0; 2],
            vni: VNI,
            identity: ID_A,
            slot: 1,
            serial: 1,
            ip6: [0; 16],
            gateway6: [0; 16],
        },
    );
    d.ct_owners.insert(1, OwnerBudget { serial: 1, budget });
    let route = |ifindex, identity, mac, underlay, serial| Route {
        ifindex,
        identity,
        mac,
        _pad: [0; 2],
        underlay,
        slot: if ifindex == 0 { 0 } else { 1 },
        serial,
    };
    d.routes.insert(RouteKey { vni: VNI, ip: IP_A }, route(if_a, ID_A, MAC_A, [0; 4], 1));
    for r in remotes {
        d.routes
            .insert(RouteKey { vni: VNI, ip: r.ip }, route(0, r.identity, r.mac, r.host, r.serial));
    }
    for (n, h) in HOSTS.iter().enumerate() {
        d.hosts.insert(*h, n as u32 + 2);
    }
    d.vnis.insert(VNI);
    d.policy.insert(
        (
            policy_prefix::PEER,
            PolicyKey {
                identity: ID_A.to_be_bytes(),
                direction: DIRECTION_EGRESS,
                peer: [0; 4],
                proto: 0,
                port: [0; 2],
            },
        ),
        PolicyValue::default(),
    );
    d.policy.insert(
        (
            policy_prefix::FULL,
            PolicyKey {
                identity: ID_A.to_be_bytes(),
                direction: DIRECTION_INGRESS,
                peer: admit_from.to_be_bytes(),
                proto: 6,
                port: 80u16.to_be_bytes(),
            },
        ),
        PolicyValue::default(),
    );
    d.policy_kinds = verse::compile::policy_kinds(&d.policy);
    d
}

/// A frame as host `from` sends it to host `to` on the underlay: outer Ethernet, IPv4, UDP
/// from port 50000 to [`VXLAN_PORT`], the 8-byte `vxlan` header, then the inner Ethernet frame
/// (`inner_dst` from `inner_src`) carrying the IP packet `inner` (IPv4 or IPv6, as its version
/// says).
pub fn wrapped(
    from: [u8; 4],
    to: [u8; 4],
    vxlan: [u8; 8],
    (inner_dst, inner_src): ([u8; 6], [u8; 6]),
    inner: &[u8],
) -> Vec<u8> {
    let ethertype = if inner.first().is_some_and(|b| b >> 4 == 6) { ETH_IPV6 } else { ETH_IPV4 };
    let payload = [&vxlan[..], &ethernet(inner_dst, inner_src, ethertype, inner)].concat();
    let ip = ipv4(from, to, 17, &udp(50000, VXLAN_PORT, &payload));
    ethernet([0x02, 0x55, 0, 0, 0, 1], [0x02, 0x55, 0, 0, 0, 2], ETH_IPV4, &ip)
}
