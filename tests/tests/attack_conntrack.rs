//! Attack: one endpoint cuts other endpoints' connections by flooding the conntrack table with
//! new flows (S14). With one table shared by every endpoint, a flood of new UDP flows (two
//! datagrams each) pushes the victim's idle, established TCP connection out; the server's next
//! push is then judged as a new flow, against the client's ingress rules, and dropped. Each
//! endpoint has a conntrack budget instead: the attacker's flows beyond its own budget are
//! dropped (`conntrack_budget_exceeded`, counted for it alone), and nobody else's flow is ever
//! evicted, whichever CPUs the flood runs on.
//!
//! The victim's socket is the judge: the client reads the push the server sends after the
//! flood, on a connection the client never speaks on again.
//!
//! IPv6 flows are tracked in a table of their own (`VERSE_CT6`, as large), charged to the same
//! budget: each flood test is one body with a [`Family`] parameter, run over IPv4 and over IPv6
//! (the victim's connection and the flood of the same family, the universes and endpoints dual
//! stack, every IPv4 address with its IPv6 counterpart, [`Family::text`]); once the attacker's budget is
//! spent, a new flow of the other family is refused too. The budgets' API test has no family.
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use tests::*;

fn id(v: &Value) -> &str {
    v["id"].as_str().expect("resource has an id")
}

/// New flows the attacker starts: more than the whole table (262,144 entries) holds.
const FLOOD_FLOWS: u32 = 330_000;
/// Where the sink listens for the attacker's probes: beyond the flood's ports (1..=60000).
const PROBE_PORT: u16 = 61000;

/// Whether a datagram of a new flow from `from` (source port `sport`) reaches `listener`, the
/// sink's socket on [`PROBE_PORT`] of its address in `listener`'s family (three tries: a loaded
/// machine may lose one).
fn probe_reaches(from: &Workload, sport: u16, listener: &UdpSocket) -> bool {
    let to = listener.local_addr().expect("the listener's address");
    let family = if to.is_ipv6() { Family::V6 } else { Family::V4 };
    let sock = from
        .ns
        .enter(|| UdpSocket::bind(SocketAddr::from((family.any(), sport))))
        .expect("bind the probe's socket");
    let mut buf = [0u8; 16];
    (0..3).any(|_| {
        sock.send_to(b"probe", to).expect("send the probe");
        matches!(listener.recv_from(&mut buf), Ok((5, _)))
    })
}

/// An idle TCP connection from `client` to `server:port`, established and used once both ways;
/// the test holds both ends.
struct Idle {
    client: TcpStream,
    server: TcpStream,
}

impl Idle {
    fn open(family: Family, server: &Workload, client: &Workload, port: u16) -> Idle {
        let addr = SocketAddr::from((family.addr(server), port));
        let listener =
            server.ns.enter(|| TcpListener::bind(addr)).expect("listen in the server's namespace");
        let mut c = client
            .ns
            .enter(|| TcpStream::connect_timeout(&addr, ALLOWED))
            .expect("the server's group admits the client");
        let (mut s, _) = listener.accept().expect("accept");
        for stream in [&c, &s] {
            stream.set_read_timeout(Some(ALLOWED)).expect("read timeout");
        }
        c.write_all(b"hello\n").expect("client writes");
        let mut buf = [0u8; 6];
        s.read_exact(&mut buf).expect("the server reads the client");
        s.write_all(b"ready\n").expect("server writes");
        c.read_exact(&mut buf).expect("the client reads the server");
        Idle { client: c, server: s }
    }

    /// The server pushes a line the client has not asked for; whether the client reads it.
    fn push_arrives(&mut self) -> bool {
        if self.server.write_all(b"pushed\n").is_err() {
            return false;
        }
        let mut buf = [0u8; 7];
        self.client.read_exact(&mut buf).is_ok() && &buf == b"pushed\n"
    }
}

/// A victim universe: a server admitting TCP/7000 from group `cli`, and a client in `cli`,
/// which admits nothing (so a push from the server passes only as part of the tracked flow).
fn victim(host: &Host, cidr_prefix: &str) -> (Workload, Workload) {
    let api = &host.api;
    let uni = api.create_dual_universe("victim", &format!("{cidr_prefix}.0/24"));
    let srv = api.create_group(id(&uni), "srv");
    let cli = api.create_group(id(&uni), "cli");
    api.add_rule(
        id(&srv),
        &json!({"direction": "ingress", "protocol": "tcp", "from_port": 7000, "to_port": 7000, "group": id(&cli)}),
    );
    let server = host.dual_endpoint(id(&uni), &format!("{cidr_prefix}.10"), &[id(&srv)]);
    let client = host.dual_endpoint(id(&uni), &format!("{cidr_prefix}.20"), &[id(&cli)]);
    (server, client)
}

/// GET /v1/endpoints/{id}: `conntrack` as this host reports it.
fn conntrack_of(api: &Api, endpoint: &str) -> Value {
    let r = api.get(&format!("/v1/endpoints/{endpoint}"));
    assert_eq!(r.status, 200, "{}", r.body);
    r.json()["conntrack"].clone()
}

/// The per-endpoint sample of a metric family in `/metrics`.
fn per_endpoint(metrics: &str, family: &str, endpoint: &str) -> u64 {
    metric_sum(metrics, family, &format!("endpoint=\"{endpoint}\""))
}

/// The sink's UDP socket on [`PROBE_PORT`] of its address of `family`.
fn listen(family: Family, sink: &Workload) -> UdpSocket {
    let listener = sink
        .ns
        .enter(|| UdpSocket::bind(SocketAddr::from((family.addr(sink), PROBE_PORT))))
        .expect("listen in the sink");
    listener.set_read_timeout(Some(ALLOWED)).expect("read timeout");
    listener
}

/// The attacker (`flooder`, sending to `sink`) floods over `family`; the victim's idle
/// connection survives, and the flood is refused beyond the attacker's budget, for it alone.
fn flood_spares_the_victim(
    family: Family,
    host: &Host,
    flooder: &Workload,
    sink: &Workload,
    idle: &mut Idle,
) {
    let api = &host.api;
    let budget = u64::from(model_default_budget());
    // The sink listens where the attacker's probes go, in both families; while the attacker
    // has budget left, a new flow of its reaches it (and spends one flow of the budget).
    let other = match family {
        Family::V4 => Family::V6,
        Family::V6 => Family::V4,
    };
    let (listener, other_listener) = (listen(family, sink), listen(other, sink));
    assert!(probe_reaches(flooder, 30001, &listener), "the sink admits the attacker");
    assert!(probe_reaches(flooder, 30003, &other_listener), "in both families");
    for l in [&listener, &other_listener] {
        l.set_read_timeout(Some(DENIED)).expect("read timeout");
    }
    let before = drops(api, "conntrack_budget_exceeded");

    let sent = udp_flood(&flooder.ns, family.addr(sink), 20000, FLOOD_FLOWS, 2);
    eprintln!("attack_conntrack: {sent} datagrams on {FLOOD_FLOWS} new flows");

    assert!(
        idle.push_arrives(),
        "S14: the flood of another endpoint evicted the victim's established connection: the \
         server's push did not reach the client"
    );
    // The attacker alone paid: its budget is spent, and its flows beyond it were refused.
    let refused = drops(api, "conntrack_budget_exceeded") - before;
    let beyond = u64::from(FLOOD_FLOWS) - budget;
    assert!(refused >= beyond, "only {refused} new flows refused, {beyond} went beyond the budget");
    let ct = conntrack_of(api, &flooder.id);
    assert_eq!(ct["budget"], budget, "{ct}");
    assert_eq!(ct["used"], budget, "the attacker's budget is what it holds: {ct}");
    assert_eq!(ct["available"], 0, "{ct}");
    let metrics = api.metrics();
    let exceeded = per_endpoint(&metrics, "verse_conntrack_budget_exceeded_total", &flooder.id);
    assert!(
        exceeded >= beyond,
        "verse_conntrack_budget_exceeded_total of the attacker: {exceeded}"
    );
    assert_eq!(per_endpoint(&metrics, "verse_conntrack_used", &flooder.id), budget);
    assert_eq!(per_endpoint(&metrics, "verse_conntrack_budget", &flooder.id), budget);
    // One more new flow of the attacker, to the listener that heard it before: refused, for
    // want of budget.
    assert_dropped(host, "conntrack_budget_exceeded", "a new flow beyond the budget", || {
        probe_reaches(flooder, 30002, &listener)
    });
    // One budget for both families: a new flow of the other family is refused as well.
    let what = format!("a new flow over {other:?} once the budget is spent over {family:?}");
    assert_dropped(host, "conntrack_budget_exceeded", &what, || {
        probe_reaches(flooder, 30004, &other_listener)
    });
    // And the connection is still tracked: another push, and the client answers.
    assert!(idle.push_arrives(), "the victim's connection lives on");
}

/// The default budget an endpoint gets when created through the API without one.
fn model_default_budget() -> u32 {
    verse::model::DEFAULT_CONNTRACK_BUDGET
}

/// S14: a tenant in another universe floods new flows; the victim's idle connection survives.
fn flood_from_another_universe(family: Family) {
    let host = Host::start();
    let (server, client) = victim(&host, "10.71.0");
    let mut idle = Idle::open(family, &server, &client, 7000);

    let api = &host.api;
    let attacker = api.create_dual_universe("attacker", "10.72.0.0/24");
    let flooder = host.dual_endpoint(id(&attacker), "10.72.0.10", &[]);
    let sink = host.dual_endpoint(id(&attacker), "10.72.0.20", &[]);
    flood_spares_the_victim(family, &host, &flooder, &sink, &mut idle);
    // The victim's endpoints were charged nothing of the flood.
    for e in [&server, &client] {
        let ct = conntrack_of(api, &e.id);
        assert!(ct["used"].as_u64().expect("used") <= 1, "{}: {ct}", e.id);
        assert_eq!(ct["exceeded"], 0, "{}: {ct}", e.id);
    }
}

#[test]
fn a_flood_of_new_flows_from_another_universe_cannot_evict_an_idle_connection_over_ipv4() {
    flood_from_another_universe(Family::V4);
}

#[test]
fn a_flood_of_new_flows_from_another_universe_cannot_evict_an_idle_connection_over_ipv6() {
    flood_from_another_universe(Family::V6);
}

/// S14: the same within one universe: a neighbour floods, the connection next door survives.
fn flood_within_one_universe(family: Family) {
    let host = Host::start();
    let (server, client) = victim(&host, "10.73.0");
    let mut idle = Idle::open(family, &server, &client, 7000);
    // The flooder and its sink are the victims' neighbours: same universe, default group.
    let uni = client.json["universe"].as_str().expect("universe").to_owned();
    let flooder = host.dual_endpoint(&uni, "10.73.0.30", &[]);
    let sink = host.dual_endpoint(&uni, "10.73.0.40", &[]);
    flood_spares_the_victim(family, &host, &flooder, &sink, &mut idle);
}

#[test]
fn a_flood_of_new_flows_within_one_universe_cannot_evict_a_neighbours_connection_over_ipv4() {
    flood_within_one_universe(Family::V4);
}

#[test]
fn a_flood_of_new_flows_within_one_universe_cannot_evict_a_neighbours_connection_over_ipv6() {
    flood_within_one_universe(Family::V6);
}

/// Budgets are an API field with limits: the endpoint shows its budget, a budget the host cannot
/// hold is refused (409, naming the field), never over-committed.
#[test]
fn budgets_are_shown_and_never_over_committed() {
    let host = Host::start();
    let api = &host.api;
    let uni = api.create_universe("budgets", "10.74.0.0/24");
    let (ns1, ns2) = (Netns::new("w"), Netns::new("w"));
    let body = |ns: &Netns, ip: &str, budget: Value| json!({"universe": id(&uni), "netns": ns.name(), "ip": ip, "conntrack_budget": budget});
    let r = api.post("/v1/endpoints", &body(&ns1, "10.74.0.10", json!(100)));
    assert_eq!(r.status, 201, "{}", r.body);
    let ep = r.json();
    assert_eq!(ep["conntrack_budget"], 100);
    let ct = conntrack_of(api, id(&ep));
    assert_eq!(ct, json!({"budget": 100, "used": 0, "available": 100, "exceeded": 0}));
    // The whole table no longer fits this host: 100 flows of it are promised.
    let capacity = dataplane_common::capacity::CONNTRACK;
    let r = api.post("/v1/endpoints", &body(&ns2, "10.74.0.20", json!(capacity)));
    assert_eq!((r.status, r.error_code()), (409, "limit_exceeded".to_string()), "{}", r.body);
    assert!(r.error_message().starts_with("conntrack_budget"), "{}", r.body);
    for bad in [json!(0), json!(-5), json!("many")] {
        let r = api.post("/v1/endpoints", &body(&ns2, "10.74.0.20", bad));
        assert_eq!((r.status, r.error_code()), (400, "invalid_argument".to_string()), "{}", r.body);
        assert!(r.error_message().starts_with("conntrack_budget"), "{}", r.body);
    }
    let r = api.post("/v1/endpoints", &body(&ns2, "10.74.0.20", json!(capacity - 100)));
    assert_eq!(r.status, 201, "exactly what is left fits: {}", r.body);
}
