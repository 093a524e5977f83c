//! Endpoint plumbing against the kernel (root): `verse::netlink` makes the veth pair, configures
//! the workload side, keeps the host side down until asked, is idempotent, and removes the pair.
use std::fs::File;
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;

use verse::model;
use verse::netlink::{
    ifindex, ipv4_address, list_verse_interfaces, plumb, set_up, unplumb, Ipv6Plumb, NETNS_RUN_DIR,
};

/// Needs root. Runs in namespaces of its own: `vtn<pid>h` plays the daemon's namespace (the
/// test body runs on a thread that entered it), `vtn<pid>w` the workload's.
#[test]
fn plumb_is_idempotent_and_unplumb_removes_the_pair() {
    struct Netns(String);
    impl Netns {
        fn add(name: String) -> Netns {
            let ok = std::process::Command::new("ip")
                .args(["netns", "add", &name])
                .status()
                .unwrap()
                .success();
            assert!(ok, "ip netns add {name}");
            Netns(name)
        }
    }
    impl Drop for Netns {
        fn drop(&mut self) {
            let _ = std::process::Command::new("ip").args(["netns", "del", &self.0]).status();
        }
    }
    let pid = std::process::id();
    let host = Netns::add(format!("vtn{pid}h"));
    let work = Netns::add(format!("vtn{pid}w"));
    ip_in(&host.0, &["link", "set", "lo", "up"]);
    let (host_ns, work_ns) = (host.0.clone(), work.0.clone());
    let body = std::thread::spawn(move || {
        let file = File::open(format!("{NETNS_RUN_DIR}/{host_ns}")).unwrap();
        // SAFETY: `file` is an open namespace file; only this test thread changes namespace.
        assert_eq!(unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) }, 0);
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(plumb_unplumb(host_ns, work_ns, pid));
    });
    let result = body.join();
    drop((host, work));
    if let Err(panic) = result {
        std::panic::resume_unwind(panic);
    }
}

fn ip_in(ns: &str, args: &[&str]) -> String {
    let out = std::process::Command::new("ip").args(["-n", ns]).args(args).output().unwrap();
    assert!(out.status.success(), "ip -n {ns} {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

async fn plumb_unplumb(host: String, work: String, pid: u32) {
    let ep = model::Endpoint {
        id: "ep-00000001".into(),
        universe: "uni-00000001".into(),
        host: "h".into(),
        netns: work.clone(),
        ip: Ipv4Addr::new(10, 99, 0, 5),
        mac: "02:00:0a:63:00:05".into(),
        interface: format!("vxt{pid}"),
        security_groups: vec![],
        identity: 1,
        conntrack_budget: 1,
        serial: 1,
        slot: 1,
        flow_logs: false,
        ipv6: None,
    };
    let gw = Ipv4Addr::new(10, 99, 0, 1);
    let first = plumb(&ep, 1400, gw, None).await.unwrap();
    let host_link = || ip_in(&host, &["-o", "link", "show", &ep.interface]);
    let shown = host_link();
    assert!(!shown.contains(",UP"), "the host side stays down until set_up: {shown}");
    set_up(&ep.interface).await.unwrap();
    let shown = host_link();
    assert!(shown.contains(",UP") && shown.contains("alias verse endpoint ep-00000001"), "{shown}");
    assert_eq!(ifindex(&ep.interface).await.unwrap(), Some(first));
    assert!(list_verse_interfaces().await.unwrap().contains(&ep.interface));
    // A veth that Verse did not make is never listed, whatever its name.
    let foreign = format!("vxf{pid}");
    ip_in(&host, &["link", "add", &foreign, "type", "veth", "peer", "name", "vxg"]);
    let listed = list_verse_interfaces().await.unwrap();
    assert!(!listed.contains(&foreign), "{listed:?}");

    let second = plumb(&ep, 1400, gw, None).await.unwrap();
    assert_eq!(first, second, "a second plumb keeps the same pair");
    let shown = host_link();
    assert!(shown.contains(",UP"), "a second plumb leaves the host side up: {shown}");

    let link = ip_in(&work, &["-o", "link", "show", "eth0"]);
    assert!(
        link.contains("02:00:0a:63:00:05")
            && link.contains("mtu 1400")
            && link.contains("LOWER_UP"),
        "{link}"
    );
    let addrs = ip_in(&work, &["-o", "addr", "show", "dev", "eth0"]);
    assert!(addrs.contains("10.99.0.5/32") && !addrs.contains("inet6"), "{addrs}");
    let lo = ip_in(&work, &["-o", "link", "show", "lo"]);
    assert!(lo.contains(",UP"), "{lo}");
    let routes = ip_in(&work, &["route", "show"]);
    assert!(
        routes.contains("default via 10.99.0.1 dev eth0") && routes.contains("onlink"),
        "{routes}"
    );
    // This thread is in the host namespace, so /proc/sys/net is the host's.
    let host_v6 =
        std::fs::read_to_string(format!("/proc/sys/net/ipv6/conf/{}/disable_ipv6", ep.interface))
            .unwrap();
    assert_eq!(host_v6.trim(), "1");

    // With an IPv6 address: IPv6 on in the workload, its /128, the link-local address of its MAC
    // (modified EUI-64) and the default route via the IPv6 gateway; no router advertisement
    // taken, no duplicate-address detection (the addresses are not tentative).
    let v6 =
        Ipv6Plumb { ip: "fd00:99::5".parse().unwrap(), gateway: "fd00:99::1".parse().unwrap() };
    let mut ep6 = ep.clone();
    ep6.ipv6 = Some(v6.ip);
    assert_eq!(plumb(&ep6, 1400, gw, Some(v6)).await.unwrap(), first, "the same pair");
    let addrs = ip_in(&work, &["-6", "-o", "addr", "show", "dev", "eth0"]);
    assert!(addrs.contains("inet6 fd00:99::5/128"), "{addrs}");
    assert!(addrs.contains("inet6 fe80::aff:fe63:5/64"), "{addrs}");
    assert!(!addrs.contains("tentative"), "{addrs}");
    assert_eq!(addrs.lines().count(), 2, "{addrs}");
    let routes = ip_in(&work, &["-6", "route", "show", "default"]);
    assert!(
        routes.contains("default via fd00:99::1 dev eth0") && routes.contains("onlink"),
        "{routes}"
    );
    for (key, want) in [("accept_ra", "0"), ("accept_dad", "0"), ("addr_gen_mode", "0")] {
        let out = std::process::Command::new("ip")
            .args(["netns", "exec", &work, "cat", &format!("/proc/sys/net/ipv6/conf/eth0/{key}")])
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), want, "{key}");
    }
    // Plumbed again without it: IPv6 off in the workload, its addresses gone.
    plumb(&ep, 1400, gw, None).await.unwrap();
    let addrs = ip_in(&work, &["-o", "addr", "show", "dev", "eth0"]);
    assert!(!addrs.contains("inet6"), "{addrs}");

    assert_eq!(ipv4_address("lo").await.unwrap(), Some(Ipv4Addr::LOCALHOST));
    assert_eq!(ipv4_address(&ep.interface).await.unwrap(), None);

    unplumb(&ep.interface).await.unwrap();
    assert_eq!(ifindex(&ep.interface).await.unwrap(), None);
    unplumb(&ep.interface).await.unwrap();
    assert!(!ip_in(&work, &["-o", "link"]).contains("eth0"));
}
