//! Endpoint plumbing: the veth pair of every endpoint, and the workload side of it.
//!
//! Contract: [`plumb`] is idempotent. It leaves, for one endpoint, a veth pair whose host side is
//! `Endpoint::interface` in the namespace where versed runs and whose workload side is `eth0` in
//! the `ip netns` namespace `Endpoint::netns`, with the endpoint's MAC, `IP/32`, the MTU, IPv6
//! disabled on the host side, the workload's `eth0` and `lo` up, and
//! `default via <gateway> dev eth0 onlink` in the workload. An endpoint with an IPv6 address
//! ([`Ipv6Plumb`]) also gets, on `eth0`, IPv6 on, router advertisements ignored (`accept_ra=0`),
//! no duplicate-address detection (`accept_dad=0`: its addresses are usable at once, and the
//! gateway never answers a detection anyway), the link-local address of its MAC by modified
//! EUI-64 (`addr_gen_mode=0`: the one `dataplane_common::nd` lets it send neighbour discovery
//! from), `IPV6/128` and `default via <gateway6> dev eth0 onlink` (the gateway answers neighbour
//! solicitations for every address but the endpoint's own, as it answers ARP); one without keeps
//! IPv6 disabled on `eth0` as well. Calling it again on a plumbed endpoint
//! re-asserts the same settings and returns the same ifindex (a restarted versed does this), so
//! established flows are never disturbed. [`unplumb`] deletes the host side, which deletes the
//! pair; an absent interface is not an error.
//!
//! Fail closed: [`plumb`] leaves the host side as it found it, so a pair it creates stays down on
//! the host side (and without carrier in the workload) until the caller has attached the
//! dataplane program and brings it up with [`set_up`]. No packet of a new workload ever reaches
//! the daemon's namespace unfiltered, where a host that forwards could route it anywhere.
//!
//! A netlink socket belongs to the network namespace it was created in, and `setns` changes the
//! namespace of one thread only. Work inside a workload namespace therefore runs on a dedicated OS
//! thread that enters the namespace, opens its own rtnetlink connection there and ends when done,
//! so no thread of the daemon's runtime ever leaves the daemon's namespace.
//!
//! The workload side is created directly inside the workload namespace under its final name
//! (`IFLA_NET_NS_FD` and `IFLA_IFNAME` in the veth peer's attributes, as
//! `ip link add … type veth peer name eth0 netns NS` does), rather than created under a temporary
//! name, moved and renamed: one atomic request leaves no half-made interface behind in the
//! daemon's namespace when something fails or the daemon dies midway.

use std::collections::BTreeMap;
use std::fs::File;
use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::AsRawFd;

use futures::TryStreamExt;
use rtnetlink::packet_route::address::{AddressAttribute, AddressFlags};
use rtnetlink::packet_route::link::{InfoData, InfoVeth};
use rtnetlink::packet_route::link::{InfoKind, LinkAttribute, LinkInfo, LinkMessage};
use rtnetlink::{Handle, LinkMessageBuilder, LinkUnspec, LinkVeth, RouteMessageBuilder};

use crate::model;

/// Prefix of every host-side interface Verse makes (see `model::State::create_endpoint`).
pub const INTERFACE_PREFIX: &str = "vx";
/// Start of the alias (`IFLA_IFALIAS`) of every host-side interface [`plumb`] makes, followed
/// by the endpoint id: the mark that tells Verse's interfaces from others.
pub const ALIAS_PREFIX: &str = "verse endpoint ";
/// Name of the workload side of the veth, inside the workload namespace.
pub const WORKLOAD_IFACE: &str = "eth0";
/// Where `ip netns` keeps its named namespaces (iproute2 `NETNS_RUN_DIR`).
pub const NETNS_RUN_DIR: &str = "/run/netns";
/// `IFNAMSIZ` minus the terminating NUL (`linux/if.h`).
const MAX_IFNAME_LEN: usize = 15;

/// Why plumbing failed. Every variant names the interface or namespace concerned.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The endpoint's host-side name cannot be an interface name.
    #[error("invalid interface name {iface:?}: 1 to {MAX_IFNAME_LEN} bytes, no '/' or whitespace")]
    InvalidInterfaceName { iface: String },
    /// The endpoint's MAC is not six colon-separated hex bytes.
    #[error("invalid MAC {mac:?} for interface {iface}")]
    InvalidMac { iface: String, mac: String },
    /// No rtnetlink socket could be opened.
    #[error("failed to open an rtnetlink socket in {netns}: {source}")]
    Connection { netns: String, source: io::Error },
    /// `/run/netns/<name>` could not be opened (the namespace does not exist).
    #[error("failed to open network namespace {netns} ({NETNS_RUN_DIR}/{netns}): {source}")]
    OpenNetns { netns: String, source: io::Error },
    /// `setns(CLONE_NEWNET)` into the workload namespace failed.
    #[error("setns(CLONE_NEWNET) into {netns}: {source}")]
    Setns { netns: String, source: io::Error },
    /// The worker thread for a namespace could not be started or its runtime built.
    #[error("failed to start the worker for namespace {netns}: {source}")]
    Worker { netns: String, source: io::Error },
    /// The worker thread for a namespace ended without an answer (it panicked).
    #[error("the worker for namespace {netns} died without an answer")]
    WorkerDied { netns: String },
    /// `RTM_GETLINK` failed.
    #[error("failed to look up interface {iface} in {netns}: {source}")]
    GetLink { iface: String, netns: String, source: NlError },
    /// An interface needed in the workload namespace is not there.
    #[error("interface {iface} not found in {netns}")]
    MissingLink { iface: String, netns: String },
    /// The host-side name is taken by an interface that is not a Verse veth (not a veth, or a
    /// veth without Verse's alias whose peer is not in the endpoint's namespace).
    #[error("interface {iface} exists and is not a Verse endpoint veth; refusing to touch it")]
    ForeignInterface { iface: String },
    /// `eth0` in the workload namespace is not the peer of the host side.
    #[error("{WORKLOAD_IFACE} in {netns} (ifindex {found}) is not the peer of {iface} (ifindex {expected})")]
    PeerMismatch { iface: String, netns: String, expected: u32, found: u32 },
    /// `RTM_GETNSID` for the workload namespace failed.
    #[error("failed to resolve the nsid of {netns}: {source}")]
    GetNsid { netns: String, source: NlError },
    /// `RTM_NEWLINK` (veth creation) failed.
    #[error("failed to create veth {iface} <-> {WORKLOAD_IFACE} in {netns}: {source}")]
    CreateVeth { iface: String, netns: String, source: NlError },
    /// `RTM_SETLINK` (MTU, MAC, up) failed.
    #[error("failed to set {what} of {iface} in {netns}: {source}")]
    SetLink { iface: String, netns: String, what: &'static str, source: NlError },
    /// `RTM_DELLINK` failed.
    #[error("failed to delete interface {iface}: {source}")]
    DeleteLink { iface: String, source: NlError },
    /// `RTM_NEWADDR` failed.
    #[error("failed to add address {addr}/{prefix} to {iface} in {netns}: {source}")]
    AddAddress { iface: String, netns: String, addr: IpAddr, prefix: u8, source: NlError },
    /// `RTM_GETADDR` failed.
    #[error("failed to list the addresses of {iface}: {source}")]
    GetAddress { iface: String, source: NlError },
    /// `RTM_NEWROUTE` failed.
    #[error("failed to add route default via {gateway} dev {iface} onlink in {netns}: {source}")]
    AddRoute { iface: String, netns: String, gateway: IpAddr, source: NlError },
    /// Writing an IPv6 sysctl failed.
    #[error("failed to write {path} in {netns}: {source}")]
    Sysctl { path: String, netns: String, source: io::Error },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// An rtnetlink error, boxed: it carries the whole netlink message and would make every
/// `Result` of this module large.
pub type NlError = Box<rtnetlink::Error>;

/// How the daemon's own namespace is named in errors.
const HOST_NS: &str = "the host namespace";

/// The IPv6 side of an endpoint: its address and the gateway its default route points to
/// (`model::gateway6`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ipv6Plumb {
    pub ip: Ipv6Addr,
    pub gateway: Ipv6Addr,
}

/// Plumbs `ep` (see the module contract) and returns the host-side ifindex.
pub async fn plumb(
    ep: &model::Endpoint,
    mtu: u32,
    gateway: Ipv4Addr,
    ipv6: Option<Ipv6Plumb>,
) -> Result<u32> {
    let iface = ep.interface.clone();
    check_ifname(&iface)?;
    let mac = model::parse_mac(&ep.mac)
        .ok_or_else(|| Error::InvalidMac { iface: iface.clone(), mac: ep.mac.clone() })?;
    let handle = connect(HOST_NS)?;
    // Held open for the whole call: the fd is what the kernel resolves `IFLA_NET_NS_FD` against,
    // and it pins the namespace while we work.
    let ns_file = open_netns(&ep.netns)?;

    let mut existing = get_link_by_name(&handle, &iface, HOST_NS).await?;
    if let Some(link) = &existing {
        if link_kind(link) != Some(&InfoKind::Veth) {
            return Err(Error::ForeignInterface { iface });
        }
        let nsid =
            handle.link().get_netns_id(ep.netns.clone()).execute().await.map_err(|source| {
                Error::GetNsid { netns: ep.netns.clone(), source: source.into() }
            })?;
        let peer_nsid = link.attributes.iter().find_map(|a| match a {
            LinkAttribute::LinkNetNsId(id) => Some(*id),
            _ => None,
        });
        if nsid.is_none() || peer_nsid != nsid {
            // Ours (by its alias) but its peer is elsewhere: a leftover of an endpoint whose
            // workload namespace was deleted and made anew, say. Only a fresh pair is right.
            // Without the alias it is someone else's veth, and not ours to delete.
            if !is_ours(link) {
                return Err(Error::ForeignInterface { iface });
            }
            tracing::info!(%iface, netns = %ep.netns, "host side exists with its peer elsewhere; recreating the pair");
            delete_link(&handle, link.header.index, &iface).await?;
            existing = None;
        }
    }

    let (ifindex, peer_index) = match existing {
        Some(link) => (link.header.index, link_peer_index(&link)),
        None => {
            // `ip link add IFACE mtu MTU type veth peer name eth0 address MAC mtu MTU netns FD`.
            let peer = LinkMessageBuilder::<LinkUnspec>::new()
                .name(WORKLOAD_IFACE)
                .address(mac.to_vec())
                .mtu(mtu)
                .setns_by_fd(ns_file.as_raw_fd())
                .build();
            let msg = LinkVeth::new(&iface, WORKLOAD_IFACE)
                .set_info_data(InfoData::Veth(InfoVeth::Peer(peer)))
                .mtu(mtu)
                .build();
            handle.link().add(msg).execute().await.map_err(|source| Error::CreateVeth {
                iface: iface.clone(),
                netns: ep.netns.clone(),
                source: source.into(),
            })?;
            let link = get_link_by_name(&handle, &iface, HOST_NS).await?.ok_or_else(|| {
                Error::MissingLink { iface: iface.clone(), netns: HOST_NS.into() }
            })?;
            (link.header.index, link_peer_index(&link))
        }
    };

    // IPv6 off on the host side before the link goes up, so it never gets a link-local address
    // nor sends router solicitations: the dataplane judges the workload's frames on this side,
    // the host's stack has no business with them.
    set_ipv6_conf(&iface, "disable_ipv6", "1", HOST_NS)?;
    handle
        .link()
        .set(
            LinkUnspec::new_with_index(ifindex)
                .mtu(mtu)
                .alias(format!("{ALIAS_PREFIX}{}", ep.id))
                .build(),
        )
        .execute()
        .await
        .map_err(|source| Error::SetLink {
            iface: iface.clone(),
            netns: HOST_NS.into(),
            what: "mtu/alias",
            source: source.into(),
        })?;

    let ip = ep.ip;
    let netns = ep.netns.clone();
    let host_iface = iface.clone();
    in_netns(ns_file, &ep.netns, move |h| async move {
        configure_workload(h, &netns, &host_iface, peer_index, mac, mtu, ip, gateway, ipv6).await
    })
    .await?;
    Ok(ifindex)
}

/// Inside the workload namespace: `eth0` (MAC, MTU, IPv6 off or configured, up, addresses, default
/// routes) and `lo`.
#[allow(clippy::too_many_arguments)]
async fn configure_workload(
    h: Handle,
    netns: &str,
    host_iface: &str,
    expected_peer: Option<u32>,
    mac: [u8; 6],
    mtu: u32,
    ip: Ipv4Addr,
    gateway: Ipv4Addr,
    ipv6: Option<Ipv6Plumb>,
) -> Result<()> {
    let eth0 = get_link_by_name(&h, WORKLOAD_IFACE, netns)
        .await?
        .ok_or_else(|| Error::MissingLink { iface: WORKLOAD_IFACE.into(), netns: netns.into() })?;
    let index = eth0.header.index;
    if let Some(expected) = expected_peer {
        if expected != index {
            return Err(Error::PeerMismatch {
                iface: host_iface.into(),
                netns: netns.into(),
                expected,
                found: index,
            });
        }
    }
    let set_err = |what: &'static str| {
        move |source: rtnetlink::Error| Error::SetLink {
            iface: WORKLOAD_IFACE.into(),
            netns: netns.into(),
            what,
            source: source.into(),
        }
    };
    let current_mac = eth0.attributes.iter().find_map(|a| match a {
        LinkAttribute::Address(m) => Some(m.as_slice()),
        _ => None,
    });
    if current_mac != Some(&mac[..]) {
        h.link()
            .set(LinkUnspec::new_with_index(index).address(mac.to_vec()).build())
            .execute()
            .await
            .map_err(set_err("MAC"))?;
    }
    match ipv6 {
        // Before IPv6 goes on (and the link up): the link-local address is made when it does.
        Some(_) => {
            for (key, value) in [
                ("accept_ra", "0"),
                ("accept_dad", "0"),
                ("addr_gen_mode", "0"),
                ("disable_ipv6", "0"),
            ] {
                set_ipv6_conf(WORKLOAD_IFACE, key, value, netns)?;
            }
        }
        None => set_ipv6_conf(WORKLOAD_IFACE, "disable_ipv6", "1", netns)?,
    }
    h.link()
        .set(LinkUnspec::new_with_index(index).mtu(mtu).up().build())
        .execute()
        .await
        .map_err(set_err("mtu/up"))?;
    h.address().add(index, IpAddr::V4(ip), 32).replace().execute().await.map_err(|source| {
        Error::AddAddress {
            iface: WORKLOAD_IFACE.into(),
            netns: netns.into(),
            addr: IpAddr::V4(ip),
            prefix: 32,
            source: source.into(),
        }
    })?;
    if let Some(v6) = ipv6 {
        let mut add = h.address().add(index, IpAddr::V6(v6.ip), 128).replace();
        add.message_mut().attributes.push(AddressAttribute::Flags(AddressFlags::Nodad));
        add.execute().await.map_err(|source| Error::AddAddress {
            iface: WORKLOAD_IFACE.into(),
            netns: netns.into(),
            addr: IpAddr::V6(v6.ip),
            prefix: 128,
            source: source.into(),
        })?;
    }

    let lo = get_link_by_name(&h, "lo", netns)
        .await?
        .ok_or_else(|| Error::MissingLink { iface: "lo".into(), netns: netns.into() })?;
    h.link()
        .set(LinkUnspec::new_with_index(lo.header.index).up().build())
        .execute()
        .await
        .map_err(|source| Error::SetLink {
            iface: "lo".into(),
            netns: netns.into(),
            what: "up",
            source: source.into(),
        })?;

    // `onlink`: the gateway is in no subnet of eth0 (the address is a /32); the dataplane answers
    // ARP for it (proxy ARP with the gateway MAC).
    let route = RouteMessageBuilder::<Ipv4Addr>::new()
        .gateway(gateway)
        .output_interface(index)
        .onlink()
        .build();
    h.route().add(route).replace().execute().await.map_err(|source| Error::AddRoute {
        iface: WORKLOAD_IFACE.into(),
        netns: netns.into(),
        gateway: IpAddr::V4(gateway),
        source: source.into(),
    })?;
    if let Some(v6) = ipv6 {
        // The same for IPv6: the address is a /128, the gateway on no prefix of eth0, and the
        // dataplane answers neighbour solicitations for it.
        let route = RouteMessageBuilder::<Ipv6Addr>::new()
            .gateway(v6.gateway)
            .output_interface(index)
            .onlink()
            .build();
        h.route().add(route).replace().execute().await.map_err(|source| Error::AddRoute {
            iface: WORKLOAD_IFACE.into(),
            netns: netns.into(),
            gateway: IpAddr::V6(v6.gateway),
            source: source.into(),
        })?;
    }
    Ok(())
}

/// Brings interface `iface` of the daemon's namespace up (the host side of an endpoint, once the
/// dataplane program is attached to it).
pub async fn set_up(iface: &str) -> Result<()> {
    let handle = connect(HOST_NS)?;
    let link = get_link_by_name(&handle, iface, HOST_NS)
        .await?
        .ok_or_else(|| Error::MissingLink { iface: iface.into(), netns: HOST_NS.into() })?;
    handle
        .link()
        .set(LinkUnspec::new_with_index(link.header.index).up().build())
        .execute()
        .await
        .map_err(|source| Error::SetLink {
            iface: iface.into(),
            netns: HOST_NS.into(),
            what: "up",
            source: source.into(),
        })
}

/// Deletes the host side of an endpoint's veth (the kernel deletes its peer with it). An absent
/// interface is not an error.
pub async fn unplumb(iface: &str) -> Result<()> {
    let handle = connect(HOST_NS)?;
    let Some(link) = get_link_by_name(&handle, iface, HOST_NS).await? else {
        return Ok(());
    };
    if link_kind(&link) != Some(&InfoKind::Veth) {
        return Err(Error::ForeignInterface { iface: iface.into() });
    }
    delete_link(&handle, link.header.index, iface).await
}

/// The ifindex of interface `name` in the daemon's namespace, if it exists.
pub async fn ifindex(name: &str) -> Result<Option<u32>> {
    let handle = connect(HOST_NS)?;
    Ok(get_link_by_name(&handle, name, HOST_NS).await?.map(|l| l.header.index))
}

/// The first IPv4 address of interface `name` in the daemon's namespace (`None` if it has none).
pub async fn ipv4_address(name: &str) -> Result<Option<Ipv4Addr>> {
    use rtnetlink::packet_route::address::{AddressAttribute, AddressMessage};
    let handle = connect(HOST_NS)?;
    let link = get_link_by_name(&handle, name, HOST_NS)
        .await?
        .ok_or_else(|| Error::MissingLink { iface: name.into(), netns: HOST_NS.into() })?;
    let mut addrs = handle.address().get().set_link_index_filter(link.header.index).execute();
    loop {
        let msg: AddressMessage = match addrs.try_next().await {
            Ok(Some(msg)) => msg,
            Ok(None) => return Ok(None),
            Err(source) => {
                return Err(Error::GetAddress { iface: name.into(), source: source.into() })
            }
        };
        // The kernel filters by index only for strict-checking sockets; filter here too.
        if msg.header.index != link.header.index {
            continue;
        }
        // IFA_LOCAL is the interface's own address; IFA_ADDRESS is the same except on
        // point-to-point links, where it is the peer's (`linux/if_addr.h`).
        let local = msg.attributes.iter().find_map(|a| match a {
            AddressAttribute::Local(IpAddr::V4(ip)) => Some(*ip),
            _ => None,
        });
        let address = msg.attributes.iter().find_map(|a| match a {
            AddressAttribute::Address(IpAddr::V4(ip)) => Some(*ip),
            _ => None,
        });
        if let Some(ip) = local.or(address) {
            return Ok(Some(ip));
        }
    }
}

/// Names of the host-side endpoint interfaces in the daemon's namespace: veths whose name starts
/// with [`INTERFACE_PREFIX`] and whose alias marks them as made by [`plumb`]. The reconciler
/// deletes those that the state no longer has, so a veth someone else named `vx…` (or a
/// `vxlan0`) is never taken for Verse's.
pub async fn list_verse_interfaces() -> Result<Vec<String>> {
    Ok(verse_interfaces().await?.into_keys().collect())
}

/// The interfaces of [`list_verse_interfaces`], each with its ifindex.
pub async fn verse_interfaces() -> Result<BTreeMap<String, u32>> {
    let handle = connect(HOST_NS)?;
    let mut links = handle.link().get().execute();
    let mut found = BTreeMap::new();
    loop {
        let link = match links.try_next().await {
            Ok(Some(link)) => link,
            Ok(None) => break,
            Err(source) => {
                return Err(Error::GetLink {
                    iface: "(all)".into(),
                    netns: HOST_NS.into(),
                    source: source.into(),
                });
            }
        };
        if link_kind(&link) != Some(&InfoKind::Veth) || !is_ours(&link) {
            continue;
        }
        if let Some(name) = link_name(&link) {
            if name.starts_with(INTERFACE_PREFIX) {
                found.insert(name.to_owned(), link.header.index);
            }
        }
    }
    Ok(found)
}

// ---- helpers ----

fn connect(netns: &str) -> Result<Handle> {
    let (conn, handle, _) = rtnetlink::new_connection()
        .map_err(|source| Error::Connection { netns: netns.into(), source })?;
    tokio::spawn(conn);
    Ok(handle)
}

fn open_netns(netns: &str) -> Result<File> {
    // The API's check of a namespace name: a name with a '/' would escape the directory.
    crate::model::check_netns(netns).map_err(|e| Error::OpenNetns {
        netns: netns.into(),
        source: io::Error::new(io::ErrorKind::InvalidInput, e.to_string()),
    })?;
    let file = File::open(format!("{NETNS_RUN_DIR}/{netns}"))
        .map_err(|source| Error::OpenNetns { netns: netns.into(), source })?;
    // A file that is not a namespace (a leftover of `ip netns` after a failed `add`, say) would
    // only fail later with a bare EINVAL from the kernel: say what it is now.
    // SAFETY: an all-zero `statfs` is a valid value of this plain C struct.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: the descriptor is open for the duration of the call; `st` is valid and writable.
    let rc = unsafe { libc::fstatfs(file.as_raw_fd(), &mut st) };
    #[allow(clippy::unnecessary_cast)] // f_type's width differs between libcs.
    if rc != 0 || st.f_type as i64 != NSFS_MAGIC {
        return Err(Error::OpenNetns {
            netns: netns.into(),
            source: io::Error::new(io::ErrorKind::InvalidInput, "not a network namespace"),
        });
    }
    Ok(file)
}

/// `NSFS_MAGIC` (`include/uapi/linux/magic.h`): the filesystem of namespace files.
const NSFS_MAGIC: i64 = 0x6e73_6673;

/// The MTU of `iface` in the daemon's network namespace. An ioctl on a socket rather than
/// `/sys/class/net`: `/sys` shows the namespace of whoever mounted it, which under `setns(2)`
/// is not ours.
pub fn interface_mtu(iface: &str) -> io::Result<u32> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    let name = iface.as_bytes();
    if name.len() >= libc::IFNAMSIZ || name.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{iface:?} is no interface name"),
        ));
    }
    // SAFETY: socket(2) with constant arguments; the result is checked below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: socket(2) returned a new descriptor that we own from here on.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: an all-zero `ifreq` is a valid value of this plain C struct.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(name) {
        *dst = *src as libc::c_char;
    }
    // SAFETY: `req` is a valid ifreq with a NUL-terminated name (checked length, zeroed rest);
    // SIOCGIFMTU writes only `ifr_mtu` inside it.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFMTU, &mut req) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: SIOCGIFMTU succeeded, so the union holds `ifru_mtu`.
    let mtu = unsafe { req.ifr_ifru.ifru_mtu };
    u32::try_from(mtu)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, format!("negative MTU {mtu}")))
}

/// Runs `f` with an rtnetlink handle inside namespace `ns` (an open `/run/netns/<name>`), on a
/// dedicated thread with its own single-threaded runtime.
async fn in_netns<F, Fut, T>(ns: File, netns: &str, f: F) -> Result<T>
where
    F: FnOnce(Handle) -> Fut + Send + 'static,
    Fut: Future<Output = Result<T>>,
    T: Send + 'static,
{
    let (tx, rx) = tokio::sync::oneshot::channel();
    let name = netns.to_owned();
    let spawned = std::thread::Builder::new().name(format!("netns-{netns}")).spawn(move || {
        let result = (|| {
            // SAFETY: `ns` is an open file descriptor of a network namespace for the whole call;
            // setns changes only this thread's namespace, and this thread ends after `f`, so no
            // other code ever runs in the workload namespace.
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(Error::Setns {
                    netns: name.clone(),
                    source: io::Error::last_os_error(),
                });
            }
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|source| Error::Worker { netns: name.clone(), source })?;
            rt.block_on(async {
                let handle = connect(&name)?;
                f(handle).await
            })
        })();
        // The receiver is gone only if the caller was cancelled; nobody wants the answer then.
        let _ = tx.send(result);
    });
    spawned.map_err(|source| Error::Worker { netns: netns.into(), source })?;
    rx.await.map_err(|_| Error::WorkerDied { netns: netns.into() })?
}

async fn get_link_by_name(handle: &Handle, name: &str, netns: &str) -> Result<Option<LinkMessage>> {
    let mut links = handle.link().get().match_name(name).execute();
    match links.try_next().await {
        Ok(link) => Ok(link),
        Err(e) if is_errno(&e, libc::ENODEV) => Ok(None),
        Err(source) => {
            Err(Error::GetLink { iface: name.into(), netns: netns.into(), source: source.into() })
        }
    }
}

async fn delete_link(handle: &Handle, index: u32, iface: &str) -> Result<()> {
    match handle.link().del(index).execute().await {
        Ok(()) => Ok(()),
        // Deleted meanwhile (by its peer's namespace going away, say): that is what we wanted.
        Err(e) if is_errno(&e, libc::ENODEV) => Ok(()),
        Err(source) => Err(Error::DeleteLink { iface: iface.into(), source: source.into() }),
    }
}

fn is_errno(e: &rtnetlink::Error, errno: i32) -> bool {
    matches!(e, rtnetlink::Error::NetlinkError(m) if m.raw_code() == -errno)
}

fn link_kind(link: &LinkMessage) -> Option<&InfoKind> {
    link.attributes.iter().find_map(|a| match a {
        LinkAttribute::LinkInfo(infos) => infos.iter().find_map(|i| match i {
            LinkInfo::Kind(k) => Some(k),
            _ => None,
        }),
        _ => None,
    })
}

/// Whether `link` carries the alias [`plumb`] gives the host sides it makes.
fn is_ours(link: &LinkMessage) -> bool {
    link.attributes
        .iter()
        .any(|a| matches!(a, LinkAttribute::IfAlias(alias) if alias.starts_with(ALIAS_PREFIX)))
}

fn link_name(link: &LinkMessage) -> Option<&str> {
    link.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(n) => Some(n.as_str()),
        _ => None,
    })
}

/// `IFLA_LINK` of a veth: the ifindex of its peer, in the peer's namespace.
fn link_peer_index(link: &LinkMessage) -> Option<u32> {
    link.attributes.iter().find_map(|a| match a {
        LinkAttribute::Link(i) => Some(*i),
        _ => None,
    })
}

/// Writes `net.ipv6.conf.<iface>.<key> = value` in the calling thread's namespace:
/// `/proc/sys/net` resolves against the namespace of the thread that opens it. A kernel without
/// IPv6 has no such file, which is as good as `disable_ipv6 = 1` (and nothing else is asked of
/// it); anything else it asks of such a kernel fails.
fn set_ipv6_conf(iface: &str, key: &str, value: &str, netns: &str) -> Result<()> {
    let path = format!("/proc/sys/net/ipv6/conf/{iface}/{key}");
    match std::fs::write(&path, value.as_bytes()) {
        Ok(()) => Ok(()),
        Err(e)
            if key == "disable_ipv6"
                && value == "1"
                && e.kind() == io::ErrorKind::NotFound
                && !std::path::Path::new("/proc/sys/net/ipv6").exists() =>
        {
            Ok(())
        }
        Err(source) => Err(Error::Sysctl { path, netns: netns.into(), source }),
    }
}

fn check_ifname(iface: &str) -> Result<()> {
    let ok = !iface.is_empty()
        && iface.len() <= MAX_IFNAME_LEN
        && iface != "."
        && iface != ".."
        && !iface.bytes().any(|b| b == b'/' || b == b':' || b.is_ascii_whitespace() || b == 0);
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidInterfaceName { iface: iface.into() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interface_names_respect_ifnamsiz() {
        assert!(check_ifname("vx0123456789abc").is_ok());
        assert!(check_ifname("vx0123456789abcd").is_err());
        assert!(check_ifname("").is_err());
        assert!(check_ifname("a/b").is_err());
    }
}
