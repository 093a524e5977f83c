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
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use tests::*;

fn id(v: &Value) -> &str {
    v["id"].as_str().expect("resource has an id")
}

/// New flows the attacker starts: more than the whole table (262,144 entries) holds.
const FLOOD_FLOWS: u32 = 330_000;
/// Where the sink listens for the attacker's probes: beyond the flood's ports (1..=60000).
const PROBE_PORT: u16 = 61000;

/// Whether a datagram of a new flow from `from` (source port `sport`) reaches `listener`, the
/// sink's socket on [`PROBE_PORT`] (three tries: a loaded machine may lose one).
fn probe_reaches(from: &Workload, sport: u16, sink: &Workload, listener: &UdpSocket) -> bool {
    let sock = from
        .ns
        .enter(|| UdpSocket::bind(SocketAddr::from((Ipv4Addr::UNSPECIFIED, sport))))
        .expect("bind the probe's socket");
    let mut buf = [0u8; 16];
    (0..3).any(|_| {
        sock.send_to(b"probe", SocketAddr::from((sink.ip, PROBE_PORT))).expect("send the probe");
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
    fn open(server: &Workload, client: &Workload, port: u16) -> Idle {
        let listener = server
            .ns
            .enter(|| TcpListener::bind(SocketAddr::from((Ipv4Addr::UNSPECIFIED, port))))
            .expect("listen in the server's namespace");
        let addr = SocketAddr::from((server.ip, port));
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
    let uni = api.create_universe("victim", &format!("{cidr_prefix}.0/24"));
    let srv = api.create_group(id(&uni), "srv");
    let cli = api.create_group(id(&uni), "cli");
    api.add_rule(
        id(&srv),
        &json!({"direction": "ingress", "protocol": "tcp", "from_port": 7000, "to_port": 7000, "group": id(&cli)}),
    );
    let server = host.endpoint(id(&uni), &format!("{cidr_prefix}.10"), &[id(&srv)]);
    let client = host.endpoint(id(&uni), &format!("{cidr_prefix}.20"), &[id(&cli)]);
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

/// The attacker (`flooder`, sending to `sink`) floods; the victim's idle connection survives,
/// and the flood is refused beyond the attacker's budget, for it alone.
fn flood_spares_the_victim(host: &Host, flooder: &Workload, sink: &Workload, idle: &mut Idle) {
    let api = &host.api;
    let budget = u64::from(model_default_budget());
    // The sink listens where the attacker's probes go; while the attacker has budget left, a
    // new flow of its reaches it (and spends one flow of the budget).
    let listener = sink
        .ns
        .enter(|| UdpSocket::bind(SocketAddr::from((Ipv4Addr::UNSPECIFIED, PROBE_PORT))))
        .expect("listen in the sink");
    listener.set_read_timeout(Some(ALLOWED)).expect("read timeout");
    assert!(probe_reaches(flooder, 30001, sink, &listener), "the sink admits the attacker");
    listener.set_read_timeout(Some(DENIED)).expect("read timeout");
    let before = drops(api, "conntrack_budget_exceeded");

    let sent = udp_flood(&flooder.ns, sink.ip, 20000, FLOOD_FLOWS, 2);
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
        probe_reaches(flooder, 30002, sink, &listener)
    });
    // And the connection is still tracked: another push, and the client answers.
    assert!(idle.push_arrives(), "the victim's connection lives on");
}

/// The default budget an endpoint gets when created through the API without one.
fn model_default_budget() -> u32 {
    verse::model::DEFAULT_CONNTRACK_BUDGET
}

/// S14: a tenant in another universe floods new flows; the victim's idle connection survives.
#[test]
fn a_flood_of_new_flows_from_another_universe_cannot_evict_an_idle_connection() {
    let host = Host::start();
    let (server, client) = victim(&host, "10.71.0");
    let mut idle = Idle::open(&server, &client, 7000);

    let api = &host.api;
    let attacker = api.create_universe("attacker", "10.72.0.0/24");
    let flooder = host.endpoint(id(&attacker), "10.72.0.10", &[]);
    let sink = host.endpoint(id(&attacker), "10.72.0.20", &[]);
    flood_spares_the_victim(&host, &flooder, &sink, &mut idle);
    // The victim's endpoints were charged nothing of the flood.
    for e in [&server, &client] {
        let ct = conntrack_of(api, &e.id);
        assert!(ct["used"].as_u64().expect("used") <= 1, "{}: {ct}", e.id);
        assert_eq!(ct["exceeded"], 0, "{}: {ct}", e.id);
    }
}

/// S14: the same within one universe: a neighbour floods, the connection next door survives.
#[test]
fn a_flood_of_new_flows_within_one_universe_cannot_evict_a_neighbours_connection() {
    let host = Host::start();
    let (server, client) = victim(&host, "10.73.0");
    let mut idle = Idle::open(&server, &client, 7000);
    // The flooder and its sink are the victims' neighbours: same universe, default group.
    let uni = client.json["universe"].as_str().expect("universe").to_owned();
    let flooder = host.endpoint(&uni, "10.73.0.30", &[]);
    let sink = host.endpoint(&uni, "10.73.0.40", &[]);
    flood_spares_the_victim(&host, &flooder, &sink, &mut idle);
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
