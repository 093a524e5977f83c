//! Errors tell the truth (S13): `POST /v1/endpoints` answers 201 only when the endpoint's host
//! has plumbed it. When the host cannot (the namespace is not one there, an `eth0` is already in
//! it, the host is not in the fleet), the call answers an error naming the host and the cause,
//! and the endpoint is removed again: nothing is left half-applied, and the host reports its
//! revision realized with no error. An endpoint that breaks later stays, and its host says so in
//! `GET /v1/hosts` while every other edit goes on.
use std::time::Duration;

use tests::*;
use verse::model::CreateUniverse;

fn id(v: &Value) -> &str {
    v["id"].as_str().expect("resource has an id")
}

/// A file at `/run/netns/<name>` that is not a network namespace; removed on drop.
struct FakeNetns {
    name: String,
}

impl FakeNetns {
    fn new() -> FakeNetns {
        let name = unique_name("f");
        std::fs::write(format!("/run/netns/{name}"), b"not a namespace").unwrap();
        FakeNetns { name }
    }
}

impl Drop for FakeNetns {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(format!("/run/netns/{}", self.name));
    }
}

/// The interfaces Verse made in the host namespace (`vx…`).
/// Whether the API lists no endpoint at all (a refused creation left none behind).
fn no_endpoints(api: &Api) -> bool {
    api.client().list_endpoints(None, None).expect("list endpoints").is_empty()
}

fn verse_interfaces(host: &Host) -> Vec<String> {
    let out = host.netns().ip(&["-o", "link", "show"]);
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|n| n.split('@').next().unwrap_or(n).to_owned())
        .filter(|n| n.starts_with("vx"))
        .collect()
}

#[test]
fn an_endpoint_its_host_cannot_plumb_is_an_error_naming_host_and_cause_and_is_removed_again() {
    let host = Host::start();
    let api = &host.api;
    let uni = api.create_universe("u", "10.1.0.0/24");
    let uni = id(&uni);

    // The namespace name exists but is no namespace: the host cannot plumb into it.
    let fake = FakeNetns::new();
    let r =
        api.post("/v1/endpoints", &json!({"universe": uni, "netns": fake.name, "ip": "10.1.0.5"}));
    assert_eq!(r.status, 400, "{}", r.body);
    assert_eq!(r.error_code(), "invalid_argument");
    let msg = r.error_message();
    assert!(msg.starts_with("netns:"), "names the field: {msg}");
    assert!(
        msg.contains(host.name()) && msg.contains("not a network namespace"),
        "names host and cause: {msg}"
    );
    assert_eq!(r.revision(), None, "no revision for an edit that did not happen");

    // An eth0 already in the workload namespace: the veth's peer cannot take its name.
    let ns = Netns::new("w");
    ns.ip(&["link", "add", "eth0", "type", "veth", "peer", "name", "eth1"]);
    let r =
        api.post("/v1/endpoints", &json!({"universe": uni, "netns": ns.name(), "ip": "10.1.0.6"}));
    assert_eq!(r.status, 409, "{}", r.body);
    assert_eq!(r.error_code(), "conflict");
    let msg = r.error_message();
    assert!(msg.contains(host.name()) && msg.contains("eth0"), "names host and cause: {msg}");

    // Both were removed again: no endpoint, no interface, the host fully realized and clean.
    assert!(no_endpoints(api));
    assert!(verse_interfaces(&host).is_empty(), "left behind: {:?}", verse_interfaces(&host));
    let hosts = api.hosts();
    assert_eq!(hosts.len(), 1);
    assert_eq!(hosts[0]["errors"], json!([]), "{}", hosts[0]);

    // The same requests work once the namespace is right.
    let w = api.create_endpoint(None, uni, "10.1.0.7", &[]);
    assert_eq!(verse_interfaces(&host), vec![w.interface.clone()]);
}

#[test]
fn an_endpoint_on_a_host_outside_the_fleet_is_refused_naming_the_host() {
    let host = Host::start();
    let uni = host.api.create_universe("u", "10.1.0.0/24");
    let ns = Netns::new("w");
    let r = host.api.post(
        "/v1/endpoints",
        &json!({"universe": id(&uni), "host": "ghost", "netns": ns.name(), "ip": "10.1.0.5"}),
    );
    assert_eq!(r.status, 404, "{}", r.body);
    let msg = r.error_message();
    assert!(msg.starts_with("host:") && msg.contains("ghost"), "{msg}");
    assert!(msg.contains(host.name()), "lists the fleet's hosts: {msg}");
    assert!(no_endpoints(&host.api));
}

#[test]
fn an_endpoint_that_breaks_later_stays_and_its_host_reports_it_while_other_edits_go_on() {
    let host = Host::start();
    let api = &host.api;
    let uni = api.create_universe("u", "10.1.0.0/24");
    let w = api.create_endpoint(None, id(&uni), "10.1.0.5", &[]);
    let ep = w.id.clone();
    // Its namespace is deleted behind Verse's back (the veth goes with it).
    drop(w);
    // The next edit is still in force (and answered 201) ...
    let other = CreateUniverse {
        name: "other".into(),
        cidr: Some("10.2.0.0/24".into()),
        cidrs: None,
        ipv6_cidrs: None,
    };
    let (_, revision) = api.client().create_universe(&other).expect("another edit");
    // ... and the host says what it could not realize at that revision.
    let mut status = Value::Null;
    let reported = wait_until(Duration::from_secs(10), || {
        status = api.hosts()[0].clone();
        status["revision"].as_u64() >= Some(revision) && status["errors"] != json!([])
    });
    assert!(reported, "the host reports the broken endpoint: {status}");
    let errors = status["errors"].as_array().unwrap();
    assert_eq!(errors.len(), 1, "{status}");
    assert_eq!(errors[0]["endpoint"], json!(ep));
    assert_eq!(errors[0]["code"], json!("not_found"), "its namespace is gone");
    assert!(errors[0]["message"].as_str().unwrap().contains("network namespace"), "{status}");
    // The endpoint stays until it is deleted; then the report is clean again.
    api.client().get_endpoint(&ep).expect("the endpoint stays");
    api.client().delete_endpoint(&ep).expect("delete the endpoint");
    assert!(wait_until(Duration::from_secs(10), || api.hosts()[0]["errors"] == json!([])));
}

/// The namespace goes after the last edit, and no edit follows: the host notices the interface
/// gone by itself (it checks its endpoints' interfaces every 2 s) and reports the endpoint at
/// the revision it is at, instead of showing it healthy until someone edits something.
#[test]
fn an_endpoint_whose_namespace_goes_after_the_last_edit_is_reported_without_another_edit() {
    let host = Host::start();
    let api = &host.api;
    let uni = api.create_universe("u", "10.1.0.0/24");
    let w = api.create_endpoint(None, id(&uni), "10.1.0.5", &[]);
    let ep = w.id.clone();
    assert_eq!(api.hosts()[0]["errors"], json!([]), "plumbed and realized");
    drop(w);
    let mut status = Value::Null;
    let reported = wait_until(Duration::from_secs(10), || {
        status = api.hosts()[0].clone();
        status["errors"] != json!([])
    });
    assert!(reported, "the host reports the broken endpoint with no edit after: {status}");
    assert_eq!(status["errors"][0]["endpoint"], json!(ep), "{status}");
    assert_eq!(status["errors"][0]["code"], json!("not_found"), "its namespace is gone");
    api.client().delete_endpoint(&ep).expect("delete the endpoint");
    assert!(wait_until(Duration::from_secs(10), || api.hosts()[0]["errors"] == json!([])));
}

#[test]
fn a_host_of_the_fleet_that_cannot_plumb_an_endpoint_makes_the_call_fail_on_another_host() {
    let fleet = Fleet::start(2);
    let api = fleet.api(0);
    let uni = api.create_universe("u", "10.1.0.0/24");
    let b = fleet.host(1).name().to_owned();
    // A namespace name that exists on no host: host A does not check another host's
    // namespaces, host B fails to plumb it and reports so.
    let r = api.post(
        "/v1/endpoints",
        &json!({"universe": id(&uni), "host": b, "netns": unique_name("gone"), "ip": "10.1.0.5"}),
    );
    assert_eq!(r.status, 404, "{}", r.body);
    assert_eq!(r.error_code(), "not_found");
    let msg = r.error_message();
    assert!(msg.starts_with("netns:") && msg.contains(&b), "names host B and the cause: {msg}");
    assert!(msg.contains("network namespace"), "{msg}");
    assert!(no_endpoints(api), "removed again");
    // Both hosts end realized with no error.
    for h in fleet.api(1).hosts() {
        assert!(wait_until(Duration::from_secs(10), || {
            fleet
                .host_status(0, h["name"].as_str().unwrap())
                .is_some_and(|s| s["errors"] == json!([]))
        }));
    }
}
