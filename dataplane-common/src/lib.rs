//! What the kernel programs and the controller agree on: map names and sizes, the `#[repr(C)]`
//! layout of every map key and value, drop-reason codes and connection-tracking states.
//!
//! Nothing here is written twice: `dataplane-ebpf` reads these types in the kernel, `controller`
//! writes them (with the `user` feature, which adds `aya::Pod`). Multi-byte fields that the
//! kernel compares bit by bit (LPM keys) are byte arrays in network order; the others are native.
//!
//! Observability (README, "Why was my packet dropped?"): drops are counted per (reason, hook)
//! with bytes ([`DropCount`]); verdicts are reported as [`Event`]s through a ring buffer,
//! rate-limited per CPU ([`EventLimiter`]); every policy entry names the rule that produced it
//! and that rule's counter slot ([`PolicyValue`]), where new flows are counted per rule
//! ([`RuleHitsValue`], [`rule_slots`]); every conntrack entry counts the packets and bytes of
//! its flow each way, the TCP flags of the current interval and the rules that admitted it
//! ([`CtCounters`]), which flow logs and packets per rule are read from.
#![no_std]

pub mod conntrack;
pub mod nd;

/// Names of the pinned maps. Each is the ELF map name and the file name under the daemon's bpffs
/// directory. BPF object names are at most 15 bytes (`BPF_OBJ_NAME_LEN` in `linux/bpf.h`).
pub mod map_names {
    pub const ENDPOINTS: &str = "VERSE_ENDPOINTS";
    pub const ROUTES: &str = "VERSE_ROUTES";
    pub const CIDRS: &str = "VERSE_CIDRS";
    pub const POLICY: &str = "VERSE_POLICY";
    pub const CONNTRACK: &str = "VERSE_CT";
    pub const CONFIG: &str = "VERSE_CONFIG";
    pub const DROPS: &str = "VERSE_DROPS";
    pub const HOSTS: &str = "VERSE_HOSTS";
    pub const VNIS: &str = "VERSE_VNIS";
    pub const ENDPOINT_SLOTS: &str = "VERSE_EP_SLOTS";
    /// The route epoch's own map before it moved into [`Config::epoch`](super::Config): a pin
    /// of it left by an older `versed` is read once (its epoch carried over) and removed.
    pub const LEGACY_EPOCH: &str = "VERSE_EPOCH";
    pub const EVENTS: &str = "VERSE_EVENTS";
    pub const EVENT_LIMITS: &str = "VERSE_EV_LIMITS";
    pub const RULE_HITS: &str = "VERSE_RULE_HITS";
    pub const CT_OWNERS: &str = "VERSE_CT_OWNERS";
    pub const POLICY_KINDS: &str = "VERSE_POLICY_KINDS";
    /// IPv6 endpoint addresses ([`Route6Key`](super::Route6Key) -> [`Route`](super::Route)).
    pub const ROUTES6: &str = "VERSE_ROUTES6";
    /// IPv6 CIDR classes ([`Cidr6Key`](super::Cidr6Key)).
    pub const CIDRS6: &str = "VERSE_CIDRS6";
    /// The jump table of the programs (slots in [`jump`](super::jump)): `from_endpoint` tail-calls
    /// `from_endpoint6` for IPv6, which tail-calls `nd6` for neighbour discovery, and
    /// `from_underlay` tail-calls `from_underlay6` for wrapped IPv6. Pinned like the other
    /// maps, so that the pinned links keep judging IPv6 while no daemon runs (an array no one
    /// holds is emptied by the kernel); each load puts its own programs in the slots.
    pub const JUMP: &str = "VERSE_JUMP";
    /// Connection tracking of IPv6 flows ([`Ct6Key`](super::Ct6Key) ->
    /// [`CtValue`](super::CtValue)), charged to the same budgets (`VERSE_CT_OWNERS`).
    pub const CONNTRACK6: &str = "VERSE_CT6";
}

/// Name of the TC program attached (TCX ingress) to the host side of every endpoint veth.
pub const PROG_FROM_ENDPOINT: &str = "from_endpoint";
/// Name of the program `from_endpoint` tail-calls for an IPv6 frame (never attached): a
/// program of its own, so that IPv6 gets a stack of its own and the IPv4 path's code is what it
/// was without IPv6.
pub const PROG_FROM_ENDPOINT6: &str = "from_endpoint6";
/// Name of the program that receives encapsulated traffic on the underlay interface.
pub const PROG_FROM_UNDERLAY: &str = "from_underlay";
/// Name of the program `from_endpoint6` tail-calls for neighbour discovery (never attached):
/// the gateway's answer needs a stack of its own.
pub const PROG_ND6: &str = "nd6";
/// Name of the program `from_underlay` tail-calls for a wrapped IPv6 frame (never attached).
pub const PROG_FROM_UNDERLAY6: &str = "from_underlay6";

/// The slots of `VERSE_JUMP`, and the program each holds.
pub mod jump {
    pub const FROM_ENDPOINT6: u32 = 0;
    pub const ND6: u32 = 1;
    pub const FROM_UNDERLAY6: u32 = 2;
    /// Slots of the table.
    pub const SLOTS: u32 = 3;
    /// Every slot with its program's name, as each load fills them.
    pub const PROGRAMS: [(u32, &str); SLOTS as usize] = [
        (FROM_ENDPOINT6, super::PROG_FROM_ENDPOINT6),
        (ND6, super::PROG_ND6),
        (FROM_UNDERLAY6, super::PROG_FROM_UNDERLAY6),
    ];
}

/// Numbers of the wire formats the dataplane reads and writes, for the kernel programs
/// (`dataplane-ebpf/src/parse.rs` re-exports them), the reference model (`controller`'s
/// `verdict`) and the tests' frame builders alike.
pub mod wire {
    /// Length of an Ethernet II header.
    pub const ETH_HLEN: usize = 14;
    /// EtherTypes (IEEE 802.3).
    pub const ETHERTYPE_IPV4: u16 = 0x0800;
    pub const ETHERTYPE_ARP: u16 = 0x0806;
    pub const ETHERTYPE_IPV6: u16 = 0x86DD;

    /// IPv4 protocol numbers, IPv6 next-header values (IANA, one registry for both).
    pub const IPPROTO_ICMP: u8 = 1;
    pub const IPPROTO_TCP: u8 = 6;
    pub const IPPROTO_UDP: u8 = 17;
    pub const IPPROTO_ICMPV6: u8 = 58;

    /// IPv6: the fixed header, its extension headers and the bounded walk over them.
    pub mod ipv6;

    /// Fragment offset and "more fragments" bits of the IPv4 `frag_off` field (RFC 791).
    pub const IP_MF_OFFSET_MASK: u16 = 0x3FFF;

    /// TCP flag bits (RFC 9293 section 3.1, byte 13 of the header).
    pub const TCP_FIN: u8 = 0x01;
    pub const TCP_SYN: u8 = 0x02;
    pub const TCP_RST: u8 = 0x04;
    pub const TCP_ACK: u8 = 0x10;

    /// ICMP types (RFC 792): echo reply/request, and the errors that quote the datagram they
    /// are about (destination unreachable, time exceeded, parameter problem).
    pub const ICMP_ECHO_REPLY: u8 = 0;
    pub const ICMP_DEST_UNREACH: u8 = 3;
    pub const ICMP_ECHO_REQUEST: u8 = 8;
    pub const ICMP_TIME_EXCEEDED: u8 = 11;
    pub const ICMP_PARAMETER_PROBLEM: u8 = 12;

    /// ICMPv6 errors (RFC 4443 section 3): destination unreachable, packet too big, time
    /// exceeded, parameter problem.
    pub const ICMPV6_DEST_UNREACH: u8 = 1;
    pub const ICMPV6_PACKET_TOO_BIG: u8 = 2;
    pub const ICMPV6_TIME_EXCEEDED: u8 = 3;
    pub const ICMPV6_PARAMETER_PROBLEM: u8 = 4;
    /// ICMPv6 echo request and reply (RFC 4443 section 4).
    pub const ICMPV6_ECHO_REQUEST: u8 = 128;
    pub const ICMPV6_ECHO_REPLY: u8 = 129;
    /// Neighbour discovery (RFC 4861 section 4): router solicitation and advertisement,
    /// neighbour solicitation and advertisement, redirect.
    pub const ND_ROUTER_SOLICIT: u8 = 133;
    pub const ND_ROUTER_ADVERT: u8 = 134;
    pub const ND_NEIGHBOUR_SOLICIT: u8 = 135;
    pub const ND_NEIGHBOUR_ADVERT: u8 = 136;
    pub const ND_REDIRECT: u8 = 137;
    /// Multicast listener discovery (RFC 2710, RFC 3810): query, version 1 report and done,
    /// version 2 report.
    pub const MLD_QUERY: u8 = 130;
    pub const MLD_REPORT: u8 = 131;
    pub const MLD_DONE: u8 = 132;
    pub const MLD2_REPORT: u8 = 143;

    /// ARP for Ethernet/IPv4 (RFC 826): payload length, hardware type, operations.
    pub const ARP_LEN: usize = 28;
    pub const ARP_HTYPE_ETHERNET: u16 = 1;
    pub const ARP_OP_REQUEST: u16 = 1;
    pub const ARP_OP_REPLY: u16 = 2;

    /// The Internet checksum (RFC 1071) of `bytes`, an odd last byte padded with zero: what an
    /// IPv4 or ICMP header carries, and 0 over a header that carries it right.
    pub fn checksum(bytes: &[u8]) -> u16 {
        let mut sum: u32 = bytes
            .chunks(2)
            .map(|c| u32::from(u16::from_be_bytes([c[0], c.get(1).copied().unwrap_or(0)])))
            .sum();
        while sum > 0xFFFF {
            sum = (sum & 0xFFFF) + (sum >> 16);
        }
        !(sum as u16)
    }
}

/// UDP destination port of the encapsulation (IANA VXLAN, RFC 7348).
pub const VXLAN_PORT: u16 = 4789;
/// Bytes the encapsulation adds inside the underlay MTU: outer IPv4 20 + UDP 8 + VXLAN 8 +
/// inner Ethernet 14. An endpoint's MTU is the underlay MTU minus this.
pub const ENCAP_OVERHEAD: u32 = 50;

/// The longest ICMP error that can be related to a tracked flow (S6): what a router sends,
/// at most 576 bytes of IPv4 datagram (RFC 1812 4.3.2.3). A longer one is ordinary ICMP.
pub const ICMP_ERROR_MAX_LEN: usize = 576;

/// The longest ICMPv6 error that can be related to a tracked flow: RFC 4443 section 2.4 (c)
/// bounds an error to the IPv6 minimum MTU, 1280 bytes of IPv6 packet. A longer one is
/// ordinary ICMPv6.
pub const ICMPV6_ERROR_MAX_LEN: usize = 1280;

/// Bytes of a packet too big to wrap that its ICMPv6 "packet too big" quotes: the fixed IPv6
/// header and room for extension headers and the upper-layer header (the error is 304 bytes of
/// IPv6 packet, well within [`ICMPV6_ERROR_MAX_LEN`]). A multiple of 4: the kernel sums it with
/// `bpf_csum_diff`.
pub const PTB_QUOTE: usize = 256;
/// The hop limit of that "packet too big": Linux's default, as the IPv4 error's TTL is 64.
pub const PTB_HOP_LIMIT: u8 = 64;

/// Capacities of the maps. The compiler refuses an edit whose compiled form would not fit (S12).
pub mod capacity {
    pub const ENDPOINTS: u32 = 4096;
    pub const ROUTES: u32 = 65536;
    pub const CIDRS: u32 = 262_144;
    /// `VERSE_ROUTES6` and `VERSE_CIDRS6`: as many as their IPv4 counterparts.
    pub const ROUTES6: u32 = ROUTES;
    pub const CIDRS6: u32 = CIDRS;
    pub const POLICY: u32 = 2_097_152;
    pub const CONNTRACK: u32 = 262_144;
    /// `VERSE_CT6`: as many as `VERSE_CT`. An endpoint's budget counts its flows of both
    /// families together, and the budgets of a host add up to at most `CONNTRACK`, so neither
    /// map can fill before a budget does.
    pub const CONNTRACK6: u32 = CONNTRACK;
    pub const HOSTS: u32 = 4096;
    /// Universes of the fleet (VNIs are 24 bits; the model hands them out smallest first).
    pub const VNIS: u32 = 65536;
    /// Drop reason codes: every `DropReason` code is below this. `VERSE_DROPS` has
    /// `DROPS * Hook::COUNT` slots (see [`drop_slot`](super::drop_slot)).
    pub const DROPS: u32 = 64;
    /// Bytes of the `VERSE_EVENTS` ring buffer (a power of two, a multiple of the page size):
    /// about 13,000 events before the daemon must have read them.
    pub const EVENTS: u32 = 1 << 20;
    /// Slots of `VERSE_RULE_HITS`, a per-CPU array preallocated at this size (8 bytes per slot
    /// per possible CPU: 2 MiB each). Slot 0 means "no rule" and is never counted. A host holds
    /// at most `RULE_HITS / 2 - 1` distinct rules (see [`rule_slots`](super::rule_slots)), which
    /// the compiler checks (S12).
    pub const RULE_HITS: u32 = 1 << 18;
    /// Slots of `VERSE_EP_SLOTS`: endpoints whose ifindex is below this live there (an array
    /// lookup, which the verifier inlines); the others in `VERSE_ENDPOINTS`.
    pub const ENDPOINT_SLOTS: u32 = 65536;
    /// Slots of `VERSE_CT_OWNERS`: one per local endpoint (`Endpoint::slot`, 1 to
    /// `ENDPOINTS`); slot 0 is never given out, so a zeroed value owns no budget.
    pub const CT_OWNERS: u32 = ENDPOINTS + 1;
    /// Slots of `VERSE_POLICY_KINDS`: one per identity (see [`peer_kind`](super::peer_kind)).
    pub const POLICY_KINDS: u32 = super::MAX_IDENTITY + 1;
}

/// `BPF_F_MMAPABLE` (`include/uapi/linux/bpf.h`): an array the controller maps into its memory,
/// so that it updates counters with the same atomic instructions as the kernel programs.
pub const MAP_F_MMAPABLE: u32 = 1 << 10;

/// Why a packet was dropped. One table for the dataplane, the metrics and the docs. Codes are
/// stable: a retired code stays reserved and is never reused. Retired: 3 (`ipv6_unsupported`,
/// well-formed IPv6 wrapped by another host, from before IPv6 was carried between hosts) and 34
/// (`ipv6_between_hosts`, IPv6 for an endpoint of another host, likewise).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DropReason {
    /// Shorter than an Ethernet header.
    TruncatedEthernet = 1,
    /// Neither IPv4, IPv6 nor ARP.
    UnknownEthertype = 2,
    /// IPv4 header truncated, version not 4, IHL below 5, or total length inconsistent with the
    /// frame.
    MalformedIpv4 = 4,
    /// An IPv4 fragment (MF set or offset non-zero): ports cannot be judged.
    Fragment = 5,
    /// TCP, UDP, ICMP or ICMPv6 header truncated (or TCP data offset below 5).
    MalformedL4 = 6,
    /// The packet arrived on an interface that is not a known endpoint.
    UnknownEndpoint = 7,
    /// Source MAC is not the endpoint's (S10).
    SpoofedMac = 8,
    /// Source IP is not the endpoint's (S10).
    SpoofedIp = 9,
    /// The destination is no endpoint of the sender's universe.
    NoRoute = 10,
    /// Denied by the sender's egress rules.
    PolicyEgress = 11,
    /// Denied by the receiver's ingress rules.
    PolicyIngress = 12,
    /// ARP that the dataplane does not answer (not a request, malformed, or asking for the
    /// sender's own address).
    ArpUnanswered = 13,
    /// A redirect helper (`bpf_redirect_peer`, `bpf_redirect_neigh`, `bpf_redirect`) refused
    /// the packet.
    RedirectFailed = 14,
    /// Encapsulated traffic from an underlay address that is no known host (S10).
    UnknownHost = 15,
    /// Encapsulated traffic naming a VNI that is no universe with an endpoint on this host.
    UnknownUniverse = 16,
    /// The inner source is not an endpoint that the control plane places on the sending host,
    /// in that universe (S10).
    NotPlacedOnSender = 17,
    /// The inner destination is not an endpoint of this host.
    NotLocal = 18,
    /// A truncated or malformed outer header, VXLAN header or inner frame.
    MalformedEncap = 19,
    /// Too big to wrap for the underlay MTU; an ICMP "fragmentation needed" (IPv4) or an ICMPv6
    /// "packet too big" (IPv6) went back.
    FragNeeded = 20,
    /// Encapsulated traffic whose Group Policy ID is not the identity the control plane gives
    /// its inner source endpoint (S10).
    IdentityMismatch = 21,
    /// The dataplane's settings (`VERSE_CONFIG` slot 0) could not be read.
    NoConfig = 22,
    /// `bpf_check_mtu` failed for the underlay device (it is gone).
    MtuCheckFailed = 23,
    /// Wrapping or unwrapping failed: `bpf_skb_adjust_room` refused, or the outer headers
    /// could not be written in the room it made.
    EncapFailed = 24,
    /// The destination is an endpoint of another host, and this host has no underlay.
    NoUnderlay = 25,
    /// Too big to wrap, and the ICMP "fragmentation needed" (or ICMPv6 "packet too big") could
    /// not be built or sent.
    FragNeededUnsent = 26,
    /// A new flow whose owner (the sending endpoint, or the local receiver of traffic from
    /// another host) already has as many tracked flows as its conntrack budget allows (S14).
    ConntrackBudgetExceeded = 27,
    /// IPv6 header truncated, version not 6, payload length beyond the frame, an extension
    /// header beyond the payload, or hop-by-hop options anywhere but first
    /// ([`wire::ipv6::walk`]).
    MalformedIpv6 = 28,
    /// An IPv6 fragment header (any fragment, atomic ones included): the dataplane never
    /// reassembles, and the ports may be in another fragment.
    Ipv6Fragment = 29,
    /// More IPv6 extension headers than [`wire::ipv6::EXT_MAX`].
    Ipv6TooManyHeaders = 30,
    /// An IPv6 jumbogram (RFC 2675): payload length 0 and a Jumbo Payload option.
    Ipv6Jumbogram = 31,
    /// Neighbour discovery the gateway answers no further: a neighbour solicitation it does not
    /// answer (duplicate-address detection from `::`, a target that is the endpoint's own
    /// address, a multicast or unspecified target, hop limit not 255, code not 0, truncated,
    /// or an answer that could not be built), a router solicitation (addresses are configured,
    /// never advertised), or a neighbour advertisement for the endpoint's own address (nobody
    /// but the gateway is on the link). See [`nd`].
    NdUnanswered = 32,
    /// A router advertisement or redirect from a workload, or a neighbour advertisement for an
    /// address that is not the endpoint's own; or any neighbour discovery wrapped by another
    /// host (a host never wraps it: it is the gateway's).
    NdSpoofed = 33,
    /// A program this one hands the packet to through `VERSE_JUMP` (the IPv6 walks, neighbour
    /// discovery) is not in its slot: a load that did not fill its jump table.
    ProgramMissing = 35,
    /// Multicast listener discovery (MLD query, report or done) from the endpoint's own
    /// addresses: a workload's stack reports the groups it joins (its solicited-node addresses,
    /// at least) when its interface comes up. Verse carries no multicast and the gateway answers
    /// every solicitation itself, so the reports are dropped, counted apart from spoofing. See
    /// [`nd`].
    MldUnanswered = 36,
}

impl DropReason {
    pub const ALL: [DropReason; 34] = [
        DropReason::TruncatedEthernet,
        DropReason::UnknownEthertype,
        DropReason::MalformedIpv4,
        DropReason::Fragment,
        DropReason::MalformedL4,
        DropReason::UnknownEndpoint,
        DropReason::SpoofedMac,
        DropReason::SpoofedIp,
        DropReason::NoRoute,
        DropReason::PolicyEgress,
        DropReason::PolicyIngress,
        DropReason::ArpUnanswered,
        DropReason::RedirectFailed,
        DropReason::UnknownHost,
        DropReason::UnknownUniverse,
        DropReason::NotPlacedOnSender,
        DropReason::NotLocal,
        DropReason::MalformedEncap,
        DropReason::FragNeeded,
        DropReason::IdentityMismatch,
        DropReason::NoConfig,
        DropReason::MtuCheckFailed,
        DropReason::EncapFailed,
        DropReason::NoUnderlay,
        DropReason::FragNeededUnsent,
        DropReason::ConntrackBudgetExceeded,
        DropReason::MalformedIpv6,
        DropReason::Ipv6Fragment,
        DropReason::Ipv6TooManyHeaders,
        DropReason::Ipv6Jumbogram,
        DropReason::NdUnanswered,
        DropReason::NdSpoofed,
        DropReason::ProgramMissing,
        DropReason::MldUnanswered,
    ];

    /// The label used in metrics and the CLI.
    pub const fn label(self) -> &'static str {
        match self {
            DropReason::TruncatedEthernet => "truncated_ethernet",
            DropReason::UnknownEthertype => "unknown_ethertype",
            DropReason::MalformedIpv4 => "malformed_ipv4",
            DropReason::Fragment => "fragment",
            DropReason::MalformedL4 => "malformed_l4",
            DropReason::UnknownEndpoint => "unknown_endpoint",
            DropReason::SpoofedMac => "spoofed_mac",
            DropReason::SpoofedIp => "spoofed_ip",
            DropReason::NoRoute => "no_route",
            DropReason::PolicyEgress => "policy_egress",
            DropReason::PolicyIngress => "policy_ingress",
            DropReason::ArpUnanswered => "arp_unanswered",
            DropReason::RedirectFailed => "redirect_failed",
            DropReason::UnknownHost => "unknown_host",
            DropReason::UnknownUniverse => "unknown_universe",
            DropReason::NotPlacedOnSender => "not_placed_on_sender",
            DropReason::NotLocal => "not_local",
            DropReason::MalformedEncap => "malformed_encap",
            DropReason::FragNeeded => "frag_needed",
            DropReason::IdentityMismatch => "identity_mismatch",
            DropReason::NoConfig => "no_config",
            DropReason::MtuCheckFailed => "mtu_check_failed",
            DropReason::EncapFailed => "encap_failed",
            DropReason::NoUnderlay => "no_underlay",
            DropReason::FragNeededUnsent => "frag_needed_unsent",
            DropReason::ConntrackBudgetExceeded => "conntrack_budget_exceeded",
            DropReason::MalformedIpv6 => "malformed_ipv6",
            DropReason::Ipv6Fragment => "ipv6_fragment",
            DropReason::Ipv6TooManyHeaders => "ipv6_too_many_headers",
            DropReason::Ipv6Jumbogram => "ipv6_jumbogram",
            DropReason::NdUnanswered => "nd_unanswered",
            DropReason::NdSpoofed => "nd_spoofed",
            DropReason::ProgramMissing => "program_missing",
            DropReason::MldUnanswered => "mld_unanswered",
        }
    }

    pub fn from_code(code: u32) -> Option<DropReason> {
        DropReason::ALL.iter().copied().find(|r| *r as u32 == code)
    }

    pub fn from_label(label: &str) -> Option<DropReason> {
        DropReason::ALL.iter().copied().find(|r| r.label() == label)
    }
}

/// The programs that judge packets, as drop counters and events name them.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Hook {
    /// `from_endpoint`: what a workload sends.
    FromEndpoint = 0,
    /// `from_underlay`: what other hosts send.
    FromUnderlay = 1,
}

impl Hook {
    pub const COUNT: u32 = 2;
    pub const ALL: [Hook; 2] = [Hook::FromEndpoint, Hook::FromUnderlay];

    /// The label used in metrics, events and the CLI: the program's name.
    pub const fn label(self) -> &'static str {
        match self {
            Hook::FromEndpoint => PROG_FROM_ENDPOINT,
            Hook::FromUnderlay => PROG_FROM_UNDERLAY,
        }
    }

    pub fn from_code(code: u8) -> Option<Hook> {
        Hook::ALL.iter().copied().find(|h| *h as u8 == code)
    }

    pub fn from_label(label: &str) -> Option<Hook> {
        Hook::ALL.iter().copied().find(|h| h.label() == label)
    }
}

/// The slot of `VERSE_DROPS` that counts `reason` at `hook`.
pub const fn drop_slot(reason: DropReason, hook: Hook) -> u32 {
    reason as u32 * Hook::COUNT + hook as u32
}

/// `VERSE_DROPS` value (a per-CPU array of `capacity::DROPS * Hook::COUNT` slots, see
/// [`drop_slot`]): the packets dropped for one reason at one hook, and their bytes (`skb->len`
/// as the hook saw it: the whole frame, with the encapsulation at `from_underlay`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct DropCount {
    pub packets: u64,
    pub bytes: u64,
}

/// `VERSE_ENDPOINTS`: key = ifindex (u32) of the host-side veth of an endpoint on this host.
/// `VERSE_EP_SLOTS` (array indexed by ifindex, for ifindexes below
/// `capacity::ENDPOINT_SLOTS`): the same value; a slot whose `vni` is 0 holds no endpoint (VNI 0
/// is no universe), and the program then falls back to `VERSE_ENDPOINTS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Endpoint {
    /// The endpoint's IPv4 address, network order.
    pub ip: [u8; 4],
    /// The endpoint's MAC (the workload side of the veth).
    pub mac: [u8; 6],
    pub _pad: [u8; 2],
    /// Universe network id (24 bits used).
    pub vni: u32,
    /// Security identity: one per distinct (universe, set of groups). Also the key of the
    /// endpoint's policy in `VERSE_POLICY`.
    pub identity: u32,
    /// The endpoint's slot in `VERSE_CT_OWNERS`: the conntrack budget its new flows are
    /// charged to (1 to `capacity::ENDPOINTS`, unique on this host).
    pub slot: u32,
    /// The endpoint's serial: unique in the fleet and never reused. Conntrack entries record the
    /// serials of both endpoints of a flow and match no other endpoint (S7).
    pub serial: u64,
    /// The endpoint's IPv6 address, network order; all zero (`::`, never an endpoint's) for an
    /// endpoint without one, whose IPv6 packets are then all `SpoofedIp`.
    pub ip6: [u8; 16],
    /// The gateway of that address (the second address of its universe's IPv6 CIDR, the
    /// workload's default router): the source of the ICMPv6 "packet too big" the dataplane sends
    /// the endpoint. All zero without `ip6`.
    pub gateway6: [u8; 16],
}

/// `VERSE_ROUTES` key: an address within a universe.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default, PartialOrd, Ord)]
pub struct RouteKey {
    pub vni: u32,
    pub ip: [u8; 4],
}

/// `VERSE_ROUTES` value: where an endpoint address lives.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Route {
    /// Host-side veth of the endpoint (local endpoints); 0 for an endpoint on another host.
    pub ifindex: u32,
    /// Security identity of the endpoint.
    pub identity: u32,
    /// MAC of the endpoint, written as the destination of delivered frames.
    pub mac: [u8; 6],
    pub _pad: [u8; 2],
    /// Underlay IPv4 address of the host the endpoint is placed on, network order; all zero for
    /// a local endpoint. Encapsulated traffic claiming this endpoint as its inner source is
    /// accepted only from this address (S10).
    pub underlay: [u8; 4],
    /// `Endpoint::slot` of a local endpoint (the budget that flows it receives from other hosts
    /// are charged to); 0 for an endpoint on another host.
    pub slot: u32,
    /// `Endpoint::serial` of the endpoint, wherever it is.
    pub serial: u64,
}

/// `VERSE_CIDRS` LPM key data (after the kernel's `prefixlen`): universe then address, both
/// network order, so that `prefixlen = 32 + cidr_len`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default, PartialOrd, Ord)]
pub struct CidrKey {
    pub vni: [u8; 4],
    pub addr: [u8; 4],
}

/// Bits of `CidrKey` before the address.
pub const CIDR_KEY_VNI_BITS: u32 = 32;

impl CidrKey {
    /// The `VERSE_CIDRS` key of `addr/len` in universe `vni`: the trie's prefix length and the
    /// key data, the address masked to its first `len` bits (`len` above 32 counts as 32).
    pub const fn encode(vni: u32, addr: [u8; 4], len: u8) -> (u32, CidrKey) {
        let len = if len > 32 { 32 } else { len };
        let mask = if len == 0 { 0 } else { u32::MAX << (32 - len as u32) };
        let addr = (u32::from_be_bytes(addr) & mask).to_be_bytes();
        (CIDR_KEY_VNI_BITS + len as u32, CidrKey { vni: vni.to_be_bytes(), addr })
    }

    /// What [`CidrKey::encode`] wrote: (vni, network address, CIDR length), or `None` for a
    /// prefix length it never writes or an address with bits beyond the prefix.
    pub fn decode(prefix_len: u32, key: &CidrKey) -> Option<(u32, [u8; 4], u8)> {
        let len = u8::try_from(prefix_len.checked_sub(CIDR_KEY_VNI_BITS)?).ok()?;
        let vni = u32::from_be_bytes(key.vni);
        (len <= 32 && CidrKey::encode(vni, key.addr, len) == (prefix_len, *key))
            .then_some((vni, key.addr, len))
    }
}

/// `VERSE_ROUTES6` key: an IPv6 address within a universe. Its value is a [`Route`], as for
/// IPv4: the same endpoint (identity, MAC, underlay, slot, serial) under its IPv6 address. The
/// source check of a packet an endpoint sends over IPv6 is this lookup too: the source must be
/// a local route whose `ifindex` is the endpoint's own.
///
/// The address comes first and the key is 8-byte aligned: the kernel programs build it on
/// their stack, where the verifier refuses a wide access at an offset it is not aligned to
/// (which LLVM, allowed misaligned accesses, would otherwise make of a 16-byte copy).
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default, PartialOrd, Ord)]
pub struct Route6Key {
    pub ip: [u8; 16],
    pub vni: u32,
    pub _pad: u32,
}

impl Route6Key {
    #[inline(always)]
    pub const fn new(vni: u32, ip: [u8; 16]) -> Route6Key {
        Route6Key { ip, vni, _pad: 0 }
    }
}

/// `VERSE_CIDRS6` LPM key data: universe then IPv6 address, both network order, so that
/// `prefixlen = 32 + cidr_len`. Its value is a CIDR class peer value (`peer::CIDR_FLAG | n`),
/// numbered apart from the IPv4 classes (a class of one family is never looked up by a packet
/// of the other: see [`DIRECTION_IPV6`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default, PartialOrd, Ord)]
pub struct Cidr6Key {
    pub vni: [u8; 4],
    pub addr: [u8; 16],
}

impl Cidr6Key {
    /// The `VERSE_CIDRS6` key of `addr/len` in universe `vni`: the trie's prefix length and the
    /// key data, the address masked to its first `len` bits (`len` above 128 counts as 128).
    pub const fn encode(vni: u32, addr: [u8; 16], len: u8) -> (u32, Cidr6Key) {
        let len = if len > 128 { 128 } else { len };
        let mask = if len == 0 { 0 } else { u128::MAX << (128 - len as u32) };
        let addr = (u128::from_be_bytes(addr) & mask).to_be_bytes();
        (CIDR_KEY_VNI_BITS + len as u32, Cidr6Key { vni: vni.to_be_bytes(), addr })
    }

    /// What [`Cidr6Key::encode`] wrote: (vni, network address, CIDR length), or `None` for a
    /// prefix length it never writes or an address with bits beyond the prefix.
    pub fn decode(prefix_len: u32, key: &Cidr6Key) -> Option<(u32, [u8; 16], u8)> {
        let len = u8::try_from(prefix_len.checked_sub(CIDR_KEY_VNI_BITS)?).ok()?;
        let vni = u32::from_be_bytes(key.vni);
        (len <= 128 && Cidr6Key::encode(vni, key.addr, len) == (prefix_len, *key))
            .then_some((vni, key.addr, len))
    }
}

/// `VERSE_POLICY` LPM key data. One trie holds every policy of the host; an entry allows, and
/// its value ([`PolicyValue`]) names the rule it came from.
///
/// Bits, most significant first: identity (the local endpoint's), direction, peer,
/// protocol, port. A rule for "all protocols" stops its prefix after the peer; a rule for one
/// protocol without ports after the protocol; a port range is split into aligned power-of-two
/// blocks, each a prefix of the port. For ICMP the port is `type << 8 | code`. Any match means
/// allow (S1), so the longest-match semantics of the trie never hide a rule.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default, PartialOrd, Ord)]
pub struct PolicyKey {
    pub identity: [u8; 4],
    pub direction: u8,
    pub peer: [u8; 4],
    pub proto: u8,
    pub port: [u8; 2],
}

/// `VERSE_POLICY` value: the user rule that produced the entry, and where its new flows are
/// counted.
///
/// Several rules can produce the same entry (the same key and prefix): the entry names one of
/// them, the first in the order the compiler visits them (the identity's groups by id, each
/// group's rules in order). A packet admitted by several entries is credited to the one its
/// lookups find first: an identity peer before a CIDR class before `ANY`, and within one lookup
/// the longest prefix (the narrowest protocol and port match).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default, PartialOrd, Ord)]
pub struct PolicyValue {
    /// The rule's id: the 32 bits of its `sgr-` hex digits (never 0, which means no rule).
    pub rule: u32,
    /// The rule's slot in `VERSE_RULE_HITS` on this host (1 to `capacity::RULE_HITS - 1`; 0:
    /// not counted). Every entry of one rule carries the same slot, and a slot names one rule
    /// for as long as any entry of that rule is in the map (see [`rule_slots`]).
    pub slot: u32,
}

/// `VERSE_RULE_HITS` (a per-CPU array of `capacity::RULE_HITS` values, index =
/// `PolicyValue::slot`): the new flows each rule admitted on this host (conntrack entries it
/// created). An array lookup by index is inlined by the verifier and needs no hashing, which
/// makes counting a new flow a lookup and an add; a hash keyed by rule id cost two hash updates
/// per new flow.
pub type RuleHitsValue = u64;

/// How the controller hands out `VERSE_RULE_HITS` slots, so that a count is never credited to
/// another rule than the one whose flows made it:
/// - a rule keeps its slot for as long as some policy entry of the host names it; it is freed
///   when the rule's last entry leaves the host;
/// - a slot freed by one edit is not handed out again by the same edit (entries are added
///   before others are removed, so the old rule's entries still count into it meanwhile);
/// - a slot is zeroed on every CPU before the first entry naming it for a new rule is written;
/// - after a restart the slots are read back from the entries of `VERSE_POLICY`, and the
///   counts stay where they are.
///
/// So that the second rule never runs out of slots, a host may hold at most [`MAX_RULES`]
/// distinct rules: the rules before an edit and after it then fit together.
pub mod rule_slots {
    /// The most distinct rules one host's policy entries may name (S12).
    pub const MAX_RULES: u32 = super::capacity::RULE_HITS / 2 - 1;
}

/// Prefix lengths within `PolicyKey`.
pub mod policy_prefix {
    /// Up to and including the peer: "any protocol".
    pub const PEER: u32 = 72;
    /// Up to and including the protocol: "this protocol, any port / type".
    pub const PROTO: u32 = 80;
    /// The whole key.
    pub const FULL: u32 = 96;
}

pub const DIRECTION_INGRESS: u8 = 0;
pub const DIRECTION_EGRESS: u8 = 1;
/// Added to `PolicyKey::direction` for a packet whose peer is an IPv6 address (2: ingress, 3:
/// egress). The entries of the two families are disjoint subtrees of the trie, so a rule of
/// one family never admits a packet of the other (`0.0.0.0/0` never admits IPv6, `::/0` never
/// IPv4, as in AWS): `peer::ANY` under an IPv6 direction is `::/0`, and a group peer's
/// identities are written under both families. In `VERSE_POLICY_KINDS` the IPv6 directions'
/// bits sit above the IPv4 ones ([`peer_kind::bit`]).
pub const DIRECTION_IPV6: u8 = 2;

/// Peer values in `PolicyKey::peer`.
pub mod peer {
    /// A rule whose peer is 0.0.0.0/0: matches every source or destination.
    pub const ANY: u32 = 0;
    /// Identities are below this; CIDR classes have this bit set.
    pub const CIDR_FLAG: u32 = 0x8000_0000;
}

/// `VERSE_POLICY_KINDS` (an array indexed by identity): which of the three ways of naming the peer
/// (the three lookups of a policy check, see [`PolicyKey`]) the policy entries of an identity
/// use, a bit per kind and direction. A policy check skips a lookup whose kind has no entry, so
/// an identity whose egress is the S2 default (`0.0.0.0/0`) pays one lookup there, not four
/// (identity peer, CIDR class, class peer, `ANY`).
///
/// Contract: for every identity the bits in the map are at all times a superset of the kinds of
/// its entries in `VERSE_POLICY` (the controller sets a bit before the first entry of its kind
/// is written, and clears it only after the last one is removed), so skipping never hides an
/// entry: the verdict and the rule credited are those of the three lookups.
pub mod peer_kind {
    use super::peer;

    /// The peer is an endpoint identity (a group peer, S5).
    pub const IDENTITY: u32 = 1;
    /// The peer is a CIDR class.
    pub const CIDR: u32 = 2;
    /// The peer is `0.0.0.0/0` (`peer::ANY`).
    pub const ANY: u32 = 4;

    /// The kind of a `PolicyKey::peer` value.
    pub const fn of(peer_value: u32) -> u32 {
        if peer_value == peer::ANY {
            ANY
        } else if peer_value & peer::CIDR_FLAG != 0 {
            CIDR
        } else {
            IDENTITY
        }
    }

    /// The bit of an identity's value for its entries of `direction` with peers of `kind`
    /// (`direction` 0 to 3: the IPv6 directions of [`DIRECTION_IPV6`](super::DIRECTION_IPV6)
    /// take bits 16 to 31).
    pub const fn bit(direction: u8, kind: u32) -> u32 {
        kind << (8 * direction as u32)
    }
}

/// Identities fit the 16-bit group id of the VXLAN-GBP header.
pub const MAX_IDENTITY: u32 = 0xFFFF;

/// `VERSE_CT` key: a flow as first seen (its original direction) in a universe (S7).
/// TCP/UDP: ports. ICMP echo: request `sport = id, dport = 0`, reply `sport = 0, dport = id`, so a
/// reply's key is the request's reversed. Other protocols: ports 0.
///
/// 16 bytes: the universe's VNI (24 bits, [`MAX_VNI`]) and the protocol share one word
/// (`vni_proto`, read with [`CtKey::vni`] and [`CtKey::proto`]). The kernel hashes and compares
/// the whole key on every lookup, a byte at a time past the last full word: the word saved is
/// part of every packet's conntrack lookup. 8-byte aligned, so that stores LLVM merges into
/// 8-byte ones land on aligned stack slots (the verifier refuses misaligned ones).
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct CtKey {
    pub src: [u8; 4],
    pub dst: [u8; 4],
    pub sport: u16,
    pub dport: u16,
    /// The VNI in bits 0 to 23, the IP protocol in bits 24 to 31.
    pub vni_proto: u32,
}

/// The largest VNI: 24 bits, the VXLAN network identifier (RFC 7348 section 5). The model hands
/// out no larger one, and a conntrack key has room for no more.
pub const MAX_VNI: u32 = 0xFF_FFFF;

impl CtKey {
    /// The key of a flow, the one builder of conntrack keys for the kernel programs, the
    /// reference model and the trace alike (ports as [`ct_ports`] gives them). `vni` is at
    /// most [`MAX_VNI`] (universes are numbered so, and the underlay's field is 24 bits); its
    /// bits above are dropped.
    #[inline(always)]
    pub const fn new(
        vni: u32,
        src: [u8; 4],
        dst: [u8; 4],
        sport: u16,
        dport: u16,
        proto: u8,
    ) -> CtKey {
        CtKey { src, dst, sport, dport, vni_proto: (vni & MAX_VNI) | (proto as u32) << 24 }
    }

    /// The flow's universe.
    #[inline(always)]
    pub const fn vni(&self) -> u32 {
        self.vni_proto & MAX_VNI
    }

    /// The flow's IP protocol.
    #[inline(always)]
    pub const fn proto(&self) -> u8 {
        (self.vni_proto >> 24) as u8
    }

    /// The same flow in universe `vni`.
    #[inline(always)]
    pub const fn in_universe(&self, vni: u32) -> CtKey {
        CtKey::new(vni, self.src, self.dst, self.sport, self.dport, self.proto())
    }

    /// The key of the same flow seen the other way: what a reply's packets carry.
    #[inline(always)]
    pub const fn reversed(&self) -> CtKey {
        CtKey {
            src: self.dst,
            dst: self.src,
            sport: self.dport,
            dport: self.sport,
            vni_proto: self.vni_proto,
        }
    }
}

/// `VERSE_CT6` key: an IPv6 flow as first seen (its original direction) in a universe, with
/// the ports of [`CtKey`] (ICMPv6 echo as ICMP echo, `wire::ipv6::icmpv6_ct_ports`). A map of
/// its own, so that the IPv4 key (and the IPv4 established path's hashing) stays 16 bytes.
///
/// The addresses come first and the key is 8-byte aligned (see [`Route6Key`] for why).
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Ct6Key {
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub vni: u32,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub _pad: [u8; 7],
}

impl Ct6Key {
    /// The key of an IPv6 flow, the one builder of them (see [`CtKey::new`] for why the
    /// protocol and padding are one word).
    #[inline(always)]
    pub const fn new(
        vni: u32,
        src: [u8; 16],
        dst: [u8; 16],
        sport: u16,
        dport: u16,
        proto: u8,
    ) -> Ct6Key {
        const _: () = assert!(
            core::mem::offset_of!(Ct6Key, proto) == 40 && core::mem::size_of::<Ct6Key>() == 48
        );
        let mut k = core::mem::MaybeUninit::<Ct6Key>::uninit();
        let p = k.as_mut_ptr();
        // SAFETY: every byte of the key is written exactly once: the five fields before `proto`
        // through their places, then bytes 40..48 (`proto` and `_pad`, checked above) as one
        // aligned word whose first byte in memory is `proto` and the others 0.
        unsafe {
            core::ptr::addr_of_mut!((*p).src).write(src);
            core::ptr::addr_of_mut!((*p).dst).write(dst);
            core::ptr::addr_of_mut!((*p).vni).write(vni);
            core::ptr::addr_of_mut!((*p).sport).write(sport);
            core::ptr::addr_of_mut!((*p).dport).write(dport);
            p.cast::<u8>().add(40).cast::<u64>().write((proto as u64).to_le());
            k.assume_init()
        }
    }

    /// The key of the same flow seen the other way: what a reply's packets carry.
    #[inline(always)]
    pub const fn reversed(&self) -> Ct6Key {
        Ct6Key::new(self.vni, self.dst, self.src, self.dport, self.sport, self.proto)
    }
}

/// Conntrack ports of an L4 header (see [`CtKey`]), from its first four bytes `head` and, for
/// ICMP, the echo identifier `icmp_id` (bytes 4..6, host order): TCP and UDP their ports, ICMP
/// as [`icmp_ct_ports`], other protocols `(0, 0)`.
#[inline(always)]
pub const fn ct_ports(proto: u8, head: [u8; 4], icmp_id: u16) -> (u16, u16) {
    match proto {
        wire::IPPROTO_TCP | wire::IPPROTO_UDP => {
            (u16::from_be_bytes([head[0], head[1]]), u16::from_be_bytes([head[2], head[3]]))
        }
        wire::IPPROTO_ICMP => icmp_ct_ports(head[0], icmp_id),
        _ => (0, 0),
    }
}

/// Conntrack ports of an ICMP message of type `ty` (see [`CtKey`]): echo request `(id, 0)`,
/// echo reply `(0, id)`, anything else `(0, 0)`, so that a reply's key is its request's
/// reversed.
#[inline(always)]
pub const fn icmp_ct_ports(ty: u8, id: u16) -> (u16, u16) {
    match ty {
        wire::ICMP_ECHO_REQUEST => (id, 0),
        wire::ICMP_ECHO_REPLY => (0, id),
        _ => (0, 0),
    }
}

/// `VERSE_CT` value: the flow's state, the endpoints it belongs to, and its owner.
///
/// A flow is bound to the serials of its two endpoints (S7): a packet matches it only if its
/// sender and receiver are those very endpoints, so an endpoint created later with the same
/// address never inherits it. Every entry is charged to one local endpoint, its owner (the
/// sender of its first packet, or the local receiver when that came from another host): the
/// owner's slot in `VERSE_CT_OWNERS` counts it until the entry is deleted (S14).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct CtEntry {
    /// `bpf_ktime_get_coarse_ns()` (CLOCK_MONOTONIC_COARSE, advancing by scheduler ticks) of the
    /// last packet either way.
    pub last_seen_ns: u64,
    /// Serial of the endpoint at the key's `src` (the flow's originator).
    pub src_serial: u64,
    /// Serial of the endpoint at the key's `dst`.
    pub dst_serial: u64,
    /// The owner's slot in `VERSE_CT_OWNERS`.
    pub owner_slot: u32,
    /// One of `ct_state`; selects the idle timeout.
    pub state: u8,
    /// Which endpoint owns the entry: `ct_owner::SRC` or `ct_owner::DST`.
    pub owner: u8,
    pub _pad: [u8; 2],
}

impl CtEntry {
    /// The serial of the entry's owner.
    pub const fn owner_serial(&self) -> u64 {
        if self.owner == ct_owner::DST {
            self.dst_serial
        } else {
            self.src_serial
        }
    }
}

/// Values of `CtEntry::owner`.
pub mod ct_owner {
    /// The originator owns the flow (it was created by `from_endpoint`).
    pub const SRC: u8 = 0;
    /// The receiver owns the flow (it came from another host and was created by
    /// `from_underlay`).
    pub const DST: u8 = 1;
}

/// `VERSE_CT_OWNERS` value (array indexed by `Endpoint::slot`, mapped into the controller's
/// memory): one local endpoint's conntrack budget and what it uses. One cache line each, so
/// that endpoints on different CPUs never contend for one.
///
/// `used` is the number of `VERSE_CT` entries whose `owner_slot` is this slot: the kernel adds
/// one (atomically) when it inserts an entry and the controller subtracts one (atomically) for
/// every entry it deletes. `serial` and `budget` are written by the controller only.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct CtOwner {
    /// Serial of the endpoint that has the slot; 0 for a free slot. The kernel does not read it.
    pub serial: u64,
    /// Flows the endpoint may have tracked at once (S14); 0 for a free slot.
    pub budget: u64,
    /// Entries charged to the slot.
    pub used: u64,
    /// New flows dropped because `used` had reached `budget`.
    pub exceeded: u64,
    pub _pad: [u64; 4],
}

/// Where a flow's packets in one direction were last delivered, cached in its conntrack entry so
/// that an established flow skips the route lookup. Valid only while `epoch` equals
/// [`Config::epoch`] (and is not 0): the controller bumps that after every change to
/// `VERSE_ROUTES` or the endpoint maps, so a cached delivery is never older than the routes.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct CtHop {
    /// [`Config::epoch`] as read *before* the route lookup this hop was copied from; 0 = empty.
    pub epoch: u32,
    /// `Route::ifindex`: the receiver's host-side veth, 0 for a receiver on another host.
    pub ifindex: u32,
    /// `Route::mac`.
    pub mac: [u8; 6],
    pub _pad: [u8; 2],
    /// `Route::underlay`.
    pub underlay: [u8; 4],
}

/// What a flow carried, kept in its conntrack entry for flow logs and packets per rule (README,
/// "Why was my packet dropped?"). Index 0 of each pair is the flow's original direction (to the
/// key's `dst`), 1 its replies.
///
/// The kernel adds every packet it delivers on the flow; the daemon reads the entries once per
/// flow-log interval and reports what each counted since its last read ([`CtCounters::packets`],
/// [`CtCounters::bytes`]: the sums of the two halves below).
///
/// Why two halves: several CPUs may carry one flow, and an atomic add (`lock add` on x86) costs
/// about as much as the rest of an established packet's refresh. So each direction is claimed by
/// the first CPU that counts it (`cpu`, set once by compare-and-swap: the creating CPU for the
/// original direction, the first replying CPU for the other): that CPU alone adds to `own_*`,
/// with plain adds, which no other CPU ever writes; every other CPU adds to `shared_*`
/// atomically. A flow carried by one CPU each way, the common case, never pays for an atomic.
///
/// TCP flags are OR-ed per interval: the kernel stamps them with `Config::flow_interval`, and
/// the first packet of a flow in a new interval moves the flags of the interval before into
/// `flags[2..4]` (or clears them if that was longer ago), so the daemon, which bumps the interval
/// and then reads, finds the closed interval's flags in one slot or the other (two CPUs rotating
/// at once may lose a flag bit).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct CtCounters {
    /// Per direction, the CPU that counts it in `own_*`, plus one; 0 until one claims it.
    pub cpu: [u64; 2],
    /// Packets delivered by the direction's claiming CPU (`cpu`): segments on the wire (a GSO
    /// packet counts its `gso_segs`).
    pub own_packets: [u64; 2],
    /// Their bytes: IPv4 datagrams, headers included (per segment on the wire).
    pub own_bytes: [u64; 2],
    /// `Config::flow_interval` when the flags were last written.
    pub flags_interval: u32,
    /// TCP flags OR-ed: original and reply direction in interval `flags_interval`, then the
    /// same in the interval before it.
    pub flags: [u8; 4],
    // What an established packet reads and writes ends here: with the entry and the hops, the
    // first 128 bytes of the value (two cache lines if the value started on one; a hash map's
    // element puts its header and key first, so usually three). What follows is written rarely.
    /// Packets delivered by any other CPU (atomic adds).
    pub shared_packets: [u64; 2],
    /// Their bytes.
    pub shared_bytes: [u64; 2],
    /// The conntrack clock when the entry was made: an entry made anew under the same key is
    /// another flow.
    pub created_ns: u64,
    /// The rules that admitted the flow on this host (`PolicyValue::rule`, the ids, not the
    /// slots; 0: not judged here):
    /// the sender's egress rule and the receiver's ingress rule.
    pub rule_egress: u32,
    pub rule_ingress: u32,
}

impl CtCounters {
    /// Packets delivered each way, whichever CPU counted them.
    pub const fn packets(&self) -> [u64; 2] {
        [
            self.own_packets[0].wrapping_add(self.shared_packets[0]),
            self.own_packets[1].wrapping_add(self.shared_packets[1]),
        ]
    }

    /// Bytes delivered each way, whichever CPU counted them.
    pub const fn bytes(&self) -> [u64; 2] {
        [
            self.own_bytes[0].wrapping_add(self.shared_bytes[0]),
            self.own_bytes[1].wrapping_add(self.shared_bytes[1]),
        ]
    }
}

/// `VERSE_CT` value: the flow's state (the part the reference model knows), the delivery cache
/// of each direction (an optimisation the verdict never depends on) and what it carried.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct CtValue {
    pub entry: CtEntry,
    /// Delivery of packets in the flow's original direction (to the key's `dst`).
    pub original: CtHop,
    /// Delivery of replies (to the key's `src`).
    pub reply: CtHop,
    pub counters: CtCounters,
}

/// Connection-tracking states; each indexes `Config::timeouts_ns` (S9).
pub mod ct_state {
    pub const TCP_OPENING: u8 = 0;
    pub const TCP_ESTABLISHED: u8 = 1;
    pub const TCP_CLOSING: u8 = 2;
    pub const UDP_ONE_WAY: u8 = 3;
    pub const UDP_REPLIED: u8 = 4;
    pub const ICMP: u8 = 5;
    pub const OTHER: u8 = 6;
    pub const COUNT: usize = 7;

    /// The S9 default idle timeout of each state, seconds (the daemon's `[conntrack]` settings
    /// start from these; the reference model's default timeouts are these).
    pub const DEFAULT_TIMEOUT_SECS: [u64; COUNT] = {
        let mut t = [0; COUNT];
        t[TCP_OPENING as usize] = 60;
        t[TCP_ESTABLISHED as usize] = 432_000;
        t[TCP_CLOSING as usize] = 60;
        t[UDP_ONE_WAY as usize] = 30;
        t[UDP_REPLIED as usize] = 180;
        t[ICMP as usize] = 30;
        t[OTHER as usize] = 600;
        t
    };
}

/// `VERSE_CONFIG` (array, one slot, `BPF_F_MMAPABLE`): settings the controller writes at start,
/// and the route epoch, which it moves on after every route or endpoint change.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Config {
    /// Idle timeout per `ct_state`, nanoseconds.
    pub timeouts_ns: [u64; ct_state::COUNT],
    /// MAC the dataplane answers ARP with and writes as the source of delivered frames.
    pub gateway_mac: [u8; 6],
    pub _pad: [u8; 2],
    /// The underlay interface (0: none, this host sends nothing to other hosts).
    pub underlay_ifindex: u32,
    /// This host's underlay IPv4 address, network order: the outer source.
    pub underlay_ip: [u8; 4],
    /// MTU of the underlay interface (outer IPv4 packet size).
    pub underlay_mtu: u32,
    /// `config_flags`: what the dataplane reports besides its verdicts.
    pub flags: u32,
    /// Events: each CPU may write one event of a kind per this many nanoseconds on average
    /// (the token bucket's refill; 0: no limit)...
    pub event_interval_ns: u64,
    /// ...and at most this many nanoseconds' worth at once (the bucket's depth, `burst *
    /// interval`).
    pub event_burst_ns: u64,
    /// The number of the current flow-log interval: TCP flags in conntrack are OR-ed per
    /// interval ([`CtCounters`]). The daemon adds one at the end of each.
    pub flow_interval: u32,
    /// The route epoch: a delivery cached in conntrack ([`CtHop`]) is current only while its
    /// stamp equals this (0: no epoch, nothing cached is current). The controller moves it on
    /// (skipping 0) after every change to the routes or the endpoint maps and at every start,
    /// with one atomic 4-byte store through its mapping of the array (never by rewriting the
    /// whole value, which the kernel copies in pieces it does not promise: a program must never
    /// read half of two epochs). It lives here, not in a map of its own, so that the
    /// established path reads it without a lookup more.
    pub epoch: u32,
}

/// Bits of `Config::flags`.
pub mod config_flags {
    /// Write verdict events (drops, new flows) to `VERSE_EVENTS`.
    pub const EVENTS: u32 = 1;
}

/// Kinds of [`Event`] (`Event::kind`); also the index of each kind's token bucket and counters
/// in [`EventLimiter`].
pub mod event_kind {
    /// A packet dropped (`Event::reason` says why).
    pub const DROP: u8 = 0;
    /// A new flow admitted by policy (a conntrack entry made).
    pub const NEW_FLOW: u8 = 1;
    pub const COUNT: usize = 2;
}

/// `VERSE_EVENTS` (a ring buffer) record: one verdict, as the hook saw the packet. Fields the
/// hook did not know are 0 (a drop before the packet was parsed has no addresses).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Event {
    /// `bpf_ktime_get_ns()` (CLOCK_MONOTONIC) when the packet was judged.
    pub time_ns: u64,
    /// `event_kind`.
    pub kind: u8,
    /// `Hook` code.
    pub hook: u8,
    /// IP protocol of the (inner) packet (IPv6: the upper layer past the extension headers); 0
    /// if none was parsed.
    pub proto: u8,
    /// TCP flags of the packet (0 for other protocols).
    pub tcp_flags: u8,
    /// `DropReason` code of a drop; 0 for a new flow.
    pub reason: u32,
    /// Host-side ifindex of the local endpoint the hook judged for: the sender at
    /// `from_endpoint`, the receiver at `from_underlay`; 0 if none is known.
    pub ifindex: u32,
    /// The universe (VNI); 0 if not known.
    pub vni: u32,
    /// (Inner) source and destination, network order: an IPv4 address in the first 4 bytes
    /// (the rest 0), an IPv6 address in all 16, as `ip_version` says.
    pub src: [u8; 16],
    pub dst: [u8; 16],
    /// TCP/UDP source port; the ICMP (ICMPv6) echo identifier; else 0.
    pub sport: u16,
    /// TCP/UDP destination port; ICMP (ICMPv6) `type << 8 | code` (the port of policy keys).
    pub dport: u16,
    /// Identities of the source and destination endpoints (0: not an endpoint, or unknown).
    /// At `from_underlay` the source's is the one its VXLAN-GBP header carried.
    pub src_identity: u32,
    pub dst_identity: u32,
    /// New flow: the rule ids that admitted it, the sender's egress rule and the receiver's
    /// ingress rule (0: not judged at this hook).
    pub rule_egress: u32,
    pub rule_ingress: u32,
    /// `skb->len` at the hook.
    pub len: u32,
    /// The other host's underlay address, network order: the outer source at `from_underlay`,
    /// the receiver's host when `from_endpoint` sends to another host; 0 otherwise (the
    /// underlay is IPv4 whatever the inner family).
    pub peer_host: [u8; 4],
    /// 4 or 6: the family of the (inner) packet whose addresses `src` and `dst` hold; 0 when
    /// no IP header was read (the addresses are then 0).
    pub ip_version: u8,
    pub _pad: [u8; 3],
}

impl Event {
    /// `src` and `dst` as an IPv4 event holds them: the address in the first 4 bytes.
    pub const fn v4(a: [u8; 4]) -> [u8; 16] {
        let mut out = [0; 16];
        out[0] = a[0];
        out[1] = a[1];
        out[2] = a[2];
        out[3] = a[3];
        out
    }

    /// The (inner) source and destination as `ip_version` says; `None` when no IP header was
    /// read.
    pub fn addrs(&self) -> Option<(core::net::IpAddr, core::net::IpAddr)> {
        use core::net::{IpAddr, Ipv4Addr, Ipv6Addr};
        let v4 = |a: [u8; 16]| IpAddr::V4(Ipv4Addr::new(a[0], a[1], a[2], a[3]));
        match self.ip_version {
            4 => Some((v4(self.src), v4(self.dst))),
            6 => Some((IpAddr::V6(Ipv6Addr::from(self.src)), IpAddr::V6(Ipv6Addr::from(self.dst)))),
            _ => None,
        }
    }

    /// Writes `src` and `dst` (one family) and `ip_version`, as the kernel does: the inverse of
    /// [`Event::addrs`].
    pub fn set_addrs(&mut self, src: core::net::IpAddr, dst: core::net::IpAddr) {
        use core::net::IpAddr;
        let bytes = |a: IpAddr| match a {
            IpAddr::V4(a) => Event::v4(a.octets()),
            IpAddr::V6(a) => a.octets(),
        };
        self.src = bytes(src);
        self.dst = bytes(dst);
        self.ip_version = if src.is_ipv6() { 6 } else { 4 };
    }
}

/// `VERSE_EV_LIMITS` value (a per-CPU array of one slot): each CPU's token buckets, one per
/// `event_kind`, and what became of the events it had to report. A bucket is kept as the
/// theoretical arrival time of its next event (GCRA): an event at time `t` is written if
/// `t + burst >= tat + interval`, and then `tat = max(tat, t) + interval`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct EventLimiter {
    /// Theoretical arrival time per kind, ns of the conntrack clock.
    pub tat_ns: [u64; event_kind::COUNT],
    /// Events written to `VERSE_EVENTS`, per kind.
    pub emitted: [u64; event_kind::COUNT],
    /// Events the bucket refused (a flood beyond the rate), per kind.
    pub suppressed: [u64; event_kind::COUNT],
    /// Events the ring buffer had no room for (the daemon fell behind), per kind.
    pub lost: [u64; event_kind::COUNT],
}

/// `VERSE_HOSTS`: underlay IPv4 address (network order) -> [`HOST_KNOWN`], one entry per other
/// host that holds an endpoint of a universe with an endpoint on this host (the only hosts this
/// one exchanges workload traffic with). Encapsulated traffic from any other address is dropped
/// (`UnknownHost`, S10).
pub type HostKey = [u8; 4];

/// The value of every `VERSE_HOSTS` entry (only its presence is checked).
pub const HOST_KNOWN: u32 = 1;

/// `VERSE_VNIS`: VNI (native u32) -> 1, one entry per universe with an endpoint on this host.
/// Encapsulated traffic naming any other VNI is dropped (`UnknownUniverse`).
pub type VniKey = u32;

#[cfg(feature = "user")]
mod pod {
    macro_rules! pod {
        ($($ty:ident),* $(,)?) => {$(
            // SAFETY: the type is `#[repr(C)]`, `Copy`, made only of integers and byte arrays,
            // with explicit padding fields (`layouts_have_no_implicit_padding` checks the sizes),
            // so any bit pattern is a valid value and it has no uninitialised bytes.
            unsafe impl aya::Pod for super::$ty {}
        )*};
    }
    pod!(
        Endpoint,
        RouteKey,
        Route6Key,
        Route,
        CidrKey,
        Cidr6Key,
        PolicyKey,
        CtKey,
        Ct6Key,
        CtEntry,
        CtHop,
        CtValue,
        CtCounters,
        CtOwner,
        Config,
        DropCount,
        PolicyValue,
        Event,
        EventLimiter,
    );
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use core::mem::size_of;

    #[test]
    fn cidr_keys_decode_to_what_was_encoded() {
        let (prefix, key) = CidrKey::encode(7, [10, 1, 2, 3], 16);
        assert_eq!(prefix, 48);
        assert_eq!(key, CidrKey { vni: [0, 0, 0, 7], addr: [10, 1, 0, 0] }, "masked");
        assert_eq!(CidrKey::decode(prefix, &key), Some((7, [10, 1, 0, 0], 16)));
        for len in [0u8, 1, 8, 24, 31, 32] {
            let (p, k) = CidrKey::encode(0x00ab_cdef, [192, 168, 255, 255], len);
            let (vni, addr, l) = CidrKey::decode(p, &k).expect("decodes");
            assert_eq!((vni, l, CidrKey::encode(vni, addr, l)), (0x00ab_cdef, len, (p, k)));
        }
        // Never written by encode: shorter than the VNI, longer than an address, host bits set.
        assert_eq!(CidrKey::decode(31, &key), None);
        assert_eq!(CidrKey::decode(65, &key), None);
        assert_eq!(CidrKey::decode(40, &CidrKey { vni: [0; 4], addr: [10, 1, 0, 0] }), None);
    }

    #[test]
    fn layouts_have_no_implicit_padding() {
        assert_eq!(size_of::<Endpoint>(), 64);
        assert_eq!(size_of::<RouteKey>(), 8);
        assert_eq!(size_of::<Route>(), 32);
        assert_eq!(size_of::<CidrKey>(), 8);
        assert_eq!(size_of::<Route6Key>(), 24);
        assert_eq!(size_of::<Cidr6Key>(), 20);
        assert_eq!(size_of::<PolicyKey>(), 12);
        assert_eq!(size_of::<CtKey>(), 16);
        assert_eq!(size_of::<Ct6Key>(), 48);
        assert_eq!(size_of::<CtEntry>(), 32);
        assert_eq!(size_of::<CtHop>(), 20);
        assert_eq!(size_of::<CtCounters>(), 104);
        assert_eq!(size_of::<CtValue>(), 176);
        assert_eq!(core::mem::offset_of!(CtValue, counters) % 8, 0, "atomic adds need 8 bytes");
        // The established path's reads and writes fit the value's first 128 bytes.
        let hot_end = core::mem::offset_of!(CtValue, counters)
            + core::mem::offset_of!(CtCounters, shared_packets);
        assert_eq!(hot_end, 128, "the hot part of a conntrack value is its first 128 bytes");
        assert_eq!(size_of::<CtOwner>(), 64);
        assert_eq!(size_of::<Config>(), 104);
        assert_eq!(core::mem::offset_of!(Config, epoch) % 4, 0, "stored with one 4-byte store");
        assert_eq!(size_of::<DropCount>(), 16);
        assert_eq!(size_of::<PolicyValue>(), 8);
        assert_eq!(size_of::<Event>(), 88);
        assert_eq!(size_of::<EventLimiter>(), 64);
    }

    #[test]
    fn drop_reason_codes_round_trip_and_fit_the_counter_array() {
        for r in DropReason::ALL {
            assert_eq!(DropReason::from_code(r as u32), Some(r));
            assert!((r as u32) < capacity::DROPS);
            assert_eq!(DropReason::from_label(r.label()), Some(r));
        }
        let labels: std::collections::BTreeSet<_> =
            DropReason::ALL.iter().map(|r| r.label()).collect();
        assert_eq!(labels.len(), DropReason::ALL.len(), "labels are distinct");
    }

    #[test]
    fn drop_slots_are_distinct_and_within_the_map() {
        let mut seen = std::collections::BTreeSet::new();
        for r in DropReason::ALL {
            for h in Hook::ALL {
                let slot = drop_slot(r, h);
                assert!(slot < capacity::DROPS * Hook::COUNT);
                assert!(seen.insert(slot));
                assert_eq!(Hook::from_label(h.label()), Some(h));
                assert_eq!(Hook::from_code(h as u8), Some(h));
            }
        }
    }

    #[test]
    fn ipv6_cidr_keys_are_masked_and_decode_only_what_encode_writes() {
        let addr = 0xfd00_0000_0000_00ab_0000_0000_0000_0001u128.to_be_bytes();
        let (len, key) = Cidr6Key::encode(7, addr, 56);
        assert_eq!(len, 32 + 56);
        assert_eq!(key.addr, 0xfd00_0000_0000_0000_0000_0000_0000_0000u128.to_be_bytes());
        assert_eq!(Cidr6Key::decode(len, &key), Some((7, key.addr, 56)));
        assert_eq!(Cidr6Key::encode(7, addr, 200).0, 32 + 128);
        assert_eq!(Cidr6Key::encode(7, addr, 0).1.addr, [0; 16]);
        assert_eq!(Cidr6Key::decode(len, &Cidr6Key { addr, ..key }), None, "bits past the prefix");
        assert_eq!(Cidr6Key::decode(32 + 129, &key), None);
        assert_eq!(Cidr6Key::decode(31, &key), None);
        // The IPv6 directions' kinds sit above the IPv4 ones, within the u32.
        let top = peer_kind::bit(DIRECTION_EGRESS + DIRECTION_IPV6, peer_kind::ANY);
        assert_eq!(top, peer_kind::ANY << 24);
        assert_eq!(peer_kind::bit(DIRECTION_INGRESS + DIRECTION_IPV6, peer_kind::CIDR), 2 << 16);
    }

    #[test]
    fn policy_prefixes_match_the_key_layout() {
        assert_eq!(policy_prefix::FULL as usize, size_of::<PolicyKey>() * 8);
    }

    #[test]
    fn conntrack_keys_are_built_zero_padded_and_reverse_to_their_reply() {
        let k = CtKey::new(7, [10, 0, 0, 1], [10, 0, 0, 2], 40000, 80, wire::IPPROTO_TCP);
        let literal = CtKey {
            src: [10, 0, 0, 1],
            dst: [10, 0, 0, 2],
            sport: 40000,
            dport: 80,
            vni_proto: 7 | (wire::IPPROTO_TCP as u32) << 24,
        };
        assert_eq!(k, literal);
        assert_eq!((k.vni(), k.proto()), (7, wire::IPPROTO_TCP));
        let r = k.reversed();
        assert_eq!((r.src, r.dst, r.sport, r.dport), ([10, 0, 0, 2], [10, 0, 0, 1], 80, 40000));
        assert_eq!((r.vni(), r.proto()), (7, wire::IPPROTO_TCP));
        assert_eq!(r.reversed(), k);
        // The VNI and the protocol never mix: the largest VNI with every protocol, and another
        // universe, are other keys.
        let top = CtKey::new(MAX_VNI, [10, 0, 0, 1], [10, 0, 0, 2], 40000, 80, 0xFF);
        assert_eq!((top.vni(), top.proto()), (MAX_VNI, 0xFF));
        assert_ne!(k.in_universe(8), k);
        assert_eq!(k.in_universe(8).in_universe(7), k);
        let (a, b) = ([0xfd; 16], [0xfe; 16]);
        let k6 = Ct6Key::new(7, a, b, 40000, 80, wire::IPPROTO_TCP);
        let literal6 = Ct6Key {
            vni: 7,
            src: a,
            dst: b,
            sport: 40000,
            dport: 80,
            proto: wire::IPPROTO_TCP,
            _pad: [0; 7],
        };
        assert_eq!(k6, literal6);
        let r6 = k6.reversed();
        assert_eq!((r6.src, r6.dst, r6.sport, r6.dport, r6.proto), (b, a, 80, 40000, 6));
        assert_eq!(r6.reversed(), k6);
        // An echo reply's key is its request's reversed.
        let req = icmp_ct_ports(wire::ICMP_ECHO_REQUEST, 9);
        let rep = icmp_ct_ports(wire::ICMP_ECHO_REPLY, 9);
        assert_eq!((req, rep), ((9, 0), (0, 9)));
        assert_eq!(icmp_ct_ports(wire::ICMP_DEST_UNREACH, 9), (0, 0));
        assert_eq!(ct_ports(wire::IPPROTO_UDP, [0x12, 0x34, 0, 53], 0), (0x1234, 53));
        assert_eq!(ct_ports(wire::IPPROTO_ICMP, [wire::ICMP_ECHO_REQUEST, 0, 0, 0], 5), (5, 0));
        assert_eq!(ct_ports(47, [1, 2, 3, 4], 5), (0, 0));
    }
}
