//! The REST API's contract: error statuses and codes naming the field, 201 shapes, the
//! `Verse-Revision` header, `/healthz`, `/metrics`, `/v1/hosts` and `/v1/openapi.json`.
use tests::*;

fn id(v: &Value) -> &str {
    v["id"].as_str().expect("resource has an id")
}

/// Asserts an error answer: status, `error.code`, and a message that names `field`.
#[track_caller]
fn assert_error(r: &Response, status: u16, code: &str, field: &str) {
    assert_eq!(r.status, status, "expected {status} {code} naming {field:?}, got: {}", r.body);
    let body = r.json();
    assert!(body["error"].is_object(), "errors are {{\"error\": {{code, message}}}}: {}", r.body);
    assert_eq!(r.error_code(), code, "error.code of {}", r.body);
    let message = r.error_message();
    assert!(message.contains(field), "error.message {message:?} does not name {field:?}");
}

#[test]
fn universe_errors_are_400_and_name_the_field() {
    let host = Host::start();
    let api = &host.api;
    let cases = [
        (json!({"name": "u", "cidr": "10.0.0.0/33"}), "cidr"),
        (json!({"name": "u", "cidr": "banana"}), "cidr"),
        (json!({"name": "u", "cidr": "10.0.0.300/24"}), "cidr"),
        (json!({"name": "u"}), "cidr"),
        (json!({"name": "u", "cidr": "fd00::/64"}), "cidr"),
        (json!({"name": "u", "cidrs": []}), "cidrs"),
        (json!({"name": "u", "cidrs": ["10.0.0.0/16", "10.0.1.0/24"]}), "cidrs"),
        (json!({"name": "u", "cidr": 5}), "cidr"),
        (json!({"name": "", "cidr": "10.0.0.0/16"}), "name"),
        (json!({"cidr": "10.0.0.0/16"}), "name"),
        (json!({"name": "u", "cidr": "10.0.0.0/16", "colour": "red"}), "colour"),
    ];
    for (body, field) in cases {
        let r = api.post("/v1/universes", &body);
        assert_error(&r, 400, "invalid_argument", field);
        assert_eq!(r.revision(), None, "a refused edit returns no revision: {body}");
    }
    let r = api.request("POST", "/v1/universes", None, std::time::Duration::from_secs(10)).unwrap();
    assert_eq!(r.status, 400, "a missing body is a 400: {}", r.body);
    assert_eq!(api.get("/v1/universes").json(), json!([]), "no refused edit created anything");
}

#[test]
fn rule_errors_are_400_or_404_and_name_the_field() {
    let host = Host::start();
    let api = &host.api;
    let uni = api.create_universe("r", "10.1.0.0/16");
    let other_uni = api.create_universe("o", "10.2.0.0/16");
    let g = api.create_group(id(&uni), "g");
    let foreign = api.create_group(id(&other_uni), "f");
    let any = "0.0.0.0/0";
    let cases = [
        (
            json!({"direction": "sideways", "protocol": "tcp", "from_port": 1, "to_port": 2, "cidr": any}),
            400,
            "direction",
        ),
        (
            json!({"direction": "ingress", "protocol": "tcpx", "from_port": 1, "to_port": 2, "cidr": any}),
            400,
            "protocol",
        ),
        (json!({"direction": "ingress", "protocol": 256, "cidr": any}), 400, "protocol"),
        (json!({"direction": "ingress", "protocol": "-1", "cidr": any}), 400, "protocol"),
        (json!({"direction": "ingress", "cidr": any}), 400, "protocol"),
        (
            json!({"direction": "ingress", "protocol": "tcp", "to_port": 80, "cidr": any}),
            400,
            "from_port",
        ),
        (
            json!({"direction": "ingress", "protocol": "udp", "from_port": 80, "cidr": any}),
            400,
            "to_port",
        ),
        (
            json!({"direction": "ingress", "protocol": "tcp", "from_port": 90, "to_port": 80, "cidr": any}),
            400,
            "from_port",
        ),
        (
            json!({"direction": "ingress", "protocol": "tcp", "from_port": 1, "to_port": 70000, "cidr": any}),
            400,
            "to_port",
        ),
        (
            json!({"direction": "ingress", "protocol": "tcp", "from_port": -5, "to_port": 80, "cidr": any}),
            400,
            "from_port",
        ),
        (
            json!({"direction": "ingress", "protocol": "tcp", "from_port": 1, "to_port": 2, "icmp_type": 8, "cidr": any}),
            400,
            "icmp_type",
        ),
        (
            json!({"direction": "ingress", "protocol": "icmp", "icmp_type": 300, "cidr": any}),
            400,
            "icmp_type",
        ),
        (
            json!({"direction": "ingress", "protocol": "icmp", "icmp_type": 3, "icmp_code": -7, "cidr": any}),
            400,
            "icmp_code",
        ),
        (
            json!({"direction": "ingress", "protocol": "icmp", "icmp_code": 0, "cidr": any}),
            400,
            "icmp_code",
        ),
        (
            json!({"direction": "ingress", "protocol": "icmp", "from_port": 1, "to_port": 2, "cidr": any}),
            400,
            "from_port",
        ),
        (
            json!({"direction": "ingress", "protocol": "all", "from_port": 1, "to_port": 2, "cidr": any}),
            400,
            "from_port",
        ),
        (
            json!({"direction": "ingress", "protocol": "tcp", "from_port": 1, "to_port": 2}),
            400,
            "cidr",
        ),
        (
            json!({"direction": "ingress", "protocol": "tcp", "from_port": 1, "to_port": 2, "cidr": any, "group": id(&g)}),
            400,
            "cidr",
        ),
        (
            json!({"direction": "ingress", "protocol": "tcp", "from_port": 1, "to_port": 2, "cidr": "10.0.0.0/40"}),
            400,
            "cidr",
        ),
        (
            json!({"direction": "ingress", "protocol": "tcp", "from_port": 1, "to_port": 2, "cidr": "nonsense"}),
            400,
            "cidr",
        ),
        (
            json!({"direction": "ingress", "protocol": "tcp", "from_port": 1, "to_port": 2, "group": id(&foreign)}),
            404,
            "group",
        ),
        (
            json!({"direction": "ingress", "protocol": "tcp", "from_port": 1, "to_port": 2, "group": "sg-00000000"}),
            404,
            "group",
        ),
        (
            json!({"direction": "ingress", "protocol": "tcp", "from_port": 1, "to_port": 2, "cidr": any, "port": 3}),
            400,
            "port",
        ),
    ];
    let path = format!("/v1/security-groups/{}/rules", id(&g));
    for (body, status, field) in cases {
        let r = api.post(&path, &body);
        let code = if status == 404 { "not_found" } else { "invalid_argument" };
        assert_error(&r, status, code, field);
    }
    let after = api.group(id(&g));
    assert_eq!(after["ingress"], json!([]), "no refused rule was stored");
}

#[test]
fn endpoint_errors_are_400_404_or_409_and_name_the_field() {
    let host = Host::start();
    let api = &host.api;
    let uni = api.create_universe("e", "10.3.0.0/24");
    let other_uni = api.create_universe("o", "10.4.0.0/24");
    let foreign = api.create_group(id(&other_uni), "f");
    let u = id(&uni);
    let ns = Netns::new("x");
    let n = ns.name();
    let cases = [
        (json!({"universe": u, "netns": n, "ip": "10.9.0.5"}), 400, "invalid_argument", "ip"),
        (json!({"universe": u, "netns": n, "ip": "banana"}), 400, "invalid_argument", "ip"),
        (json!({"universe": u, "netns": n, "ip": "fd00::5"}), 400, "invalid_argument", "ip"),
        (json!({"universe": u, "netns": n, "ip": "10.3.0.1"}), 400, "invalid_argument", "ip"),
        (json!({"universe": u, "netns": n, "ip": "10.3.0.255"}), 400, "invalid_argument", "ip"),
        (json!({"universe": u, "netns": n}), 400, "invalid_argument", "ip"),
        (json!({"universe": u, "ip": "10.3.0.5"}), 400, "invalid_argument", "netns"),
        (
            json!({"universe": u, "netns": "../etc", "ip": "10.3.0.5"}),
            400,
            "invalid_argument",
            "netns",
        ),
        (
            json!({"universe": "uni-00000000", "netns": n, "ip": "10.3.0.5"}),
            404,
            "not_found",
            "universe",
        ),
        (
            json!({"universe": u, "netns": n, "ip": "10.3.0.5", "security_groups": []}),
            400,
            "invalid_argument",
            "security_groups",
        ),
        (
            json!({"universe": u, "netns": n, "ip": "10.3.0.5", "security_groups": ["sg-00000000"]}),
            404,
            "not_found",
            "security_groups",
        ),
        (
            json!({"universe": u, "netns": n, "ip": "10.3.0.5", "security_groups": [id(&foreign)]}),
            404,
            "not_found",
            "security_groups",
        ),
    ];
    for (body, status, code, field) in cases {
        assert_error(&api.post("/v1/endpoints", &body), status, code, field);
    }

    // S12: 17 groups is over the limit, 16 is fine.
    let groups: Vec<String> =
        (0..17).map(|i| id(&api.create_group(u, &format!("g{i}"))).to_owned()).collect();
    let r = api.post(
        "/v1/endpoints",
        &json!({"universe": u, "netns": n, "ip": "10.3.0.5", "security_groups": groups}),
    );
    assert_error(&r, 409, "limit_exceeded", "security_groups");

    let ep =
        host.endpoint(u, "10.3.0.5", &groups[..16].iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(ep.json["security_groups"].as_array().unwrap().len(), 16);
    let r = api.patch(&format!("/v1/endpoints/{}", ep.id), &json!({"security_groups": groups}));
    assert_error(&r, 409, "limit_exceeded", "security_groups");

    let ns2 = Netns::new("y");
    let r =
        api.post("/v1/endpoints", &json!({"universe": u, "netns": ns2.name(), "ip": "10.3.0.5"}));
    assert_error(&r, 409, "duplicate", "ip");
    let r =
        api.post("/v1/endpoints", &json!({"universe": u, "netns": ep.ns.name(), "ip": "10.3.0.6"}));
    assert_error(&r, 409, "duplicate", "netns");
}

#[test]
fn an_endpoint_in_a_namespace_that_does_not_exist_is_refused() {
    let host = Host::start();
    let api = &host.api;
    let uni = api.create_universe("n", "10.5.0.0/24");
    let missing = format!("{}-nope", run_prefix());
    let r = api
        .post("/v1/endpoints", &json!({"universe": id(&uni), "netns": missing, "ip": "10.5.0.5"}));
    // Like an id that does not exist: a 404 naming the field (and the host).
    assert_error(&r, 404, "not_found", "netns");
    assert!(r.error_message().contains(host.name()), "{}", r.body);
    assert_eq!(api.get("/v1/endpoints").json(), json!([]), "nothing half-made stays behind");
}

#[test]
fn unknown_ids_in_paths_are_404() {
    let host = Host::start();
    let api = &host.api;
    let uni = api.create_universe("p", "10.6.0.0/24");
    let g = api.create_group(id(&uni), "g");
    let rule_body = json!({"direction": "ingress", "protocol": "all", "cidr": "0.0.0.0/0"});
    let cases: Vec<Response> = vec![
        api.get("/v1/universes/uni-00000000"),
        api.delete("/v1/universes/uni-00000000"),
        api.get("/v1/security-groups/sg-00000000"),
        api.delete("/v1/security-groups/sg-00000000"),
        api.post("/v1/security-groups/sg-00000000/rules", &rule_body),
        api.delete("/v1/security-groups/sg-00000000/rules/sgr-00000000"),
        api.delete(&format!("/v1/security-groups/{}/rules/sgr-00000000", id(&g))),
        api.get("/v1/endpoints/ep-00000000"),
        api.delete("/v1/endpoints/ep-00000000"),
        api.patch("/v1/endpoints/ep-00000000", &json!({"security_groups": [id(&g)]})),
    ];
    for r in cases {
        assert_eq!(r.status, 404, "{}", r.body);
        assert_eq!(r.error_code(), "not_found", "{}", r.body);
        assert!(
            r.error_message().contains("00000000"),
            "the message names the unknown id: {}",
            r.body
        );
    }
}

#[test]
fn deleting_what_is_in_use_is_409() {
    let host = Host::start();
    let api = &host.api;
    let uni = api.create_universe("c", "10.7.0.0/24");
    let u = id(&uni);
    let used = api.create_group(u, "used");
    let referenced = api.create_group(u, "referenced");
    let referrer = api.create_group(u, "referrer");
    api.add_rule(
        id(&referrer),
        &json!({"direction": "ingress", "protocol": "all", "group": id(&referenced)}),
    );
    let ep = host.endpoint(u, "10.7.0.10", &[id(&used)]);
    let default = api.default_group(u);

    let r = api.delete(&format!("/v1/universes/{u}"));
    assert_eq!((r.status, r.error_code().as_str()), (409, "in_use"), "{}", r.body);
    let r = api.delete(&format!("/v1/security-groups/{}", id(&used)));
    assert_eq!((r.status, r.error_code().as_str()), (409, "in_use"), "{}", r.body);
    assert!(r.error_message().contains(&ep.id), "the message names the endpoint: {}", r.body);
    let r = api.delete(&format!("/v1/security-groups/{}", id(&referenced)));
    assert_eq!((r.status, r.error_code().as_str()), (409, "in_use"), "{}", r.body);
    assert!(
        r.error_message().contains(id(&referrer)),
        "the message names the referring group: {}",
        r.body
    );
    let r = api.delete(&format!("/v1/security-groups/{}", id(&default)));
    assert_eq!(
        (r.status, r.error_code().as_str()),
        (409, "protected"),
        "S3: default cannot be deleted: {}",
        r.body
    );

    // Once nothing uses them, the same deletes succeed.
    let r = api.delete(&format!("/v1/endpoints/{}", ep.id));
    assert_eq!(r.status, 204, "{}", r.body);
    assert!(
        wait_until(std::time::Duration::from_secs(5), || ep
            .ns
            .exec("ip", &["link", "show", "eth0"])
            .status
            .code()
            != Some(0)),
        "deleting the endpoint removes its interface"
    );
    assert_eq!(api.delete(&format!("/v1/security-groups/{}", id(&used))).status, 204);
    assert_eq!(api.delete(&format!("/v1/security-groups/{}", id(&referrer))).status, 204);
    assert_eq!(api.delete(&format!("/v1/security-groups/{}", id(&referenced))).status, 204);
    assert_eq!(api.delete(&format!("/v1/universes/{u}")).status, 204);
    assert_eq!(
        api.get(&format!("/v1/security-groups/{}", id(&default))).status,
        404,
        "the universe's groups went with it"
    );
}

#[test]
fn duplicate_rules_and_names_are_409() {
    let host = Host::start();
    let api = &host.api;
    let uni = api.create_universe("d", "10.8.0.0/24");
    let g = api.create_group(id(&uni), "g");
    let path = format!("/v1/security-groups/{}/rules", id(&g));
    api.add_rule(id(&g), &json!({"direction": "ingress", "protocol": "tcp", "from_port": 80, "to_port": 80, "cidr": "10.8.0.0/24"}));
    // Same rule, written differently (non-canonical CIDR, numeric protocol): still a duplicate (S4).
    let r = api.post(&path, &json!({"direction": "ingress", "protocol": 6, "from_port": 80, "to_port": 80, "cidr": "10.8.0.77/24"}));
    assert_eq!((r.status, r.error_code().as_str()), (409, "duplicate"), "{}", r.body);
    // The same match in the other direction is a different rule.
    api.add_rule(id(&g), &json!({"direction": "egress", "protocol": "tcp", "from_port": 80, "to_port": 80, "cidr": "10.8.0.0/24"}));
    let r = api.post("/v1/security-groups", &json!({"universe": id(&uni), "name": "g"}));
    assert_error(&r, 409, "duplicate", "name");
}

#[test]
fn the_thousand_and_first_rule_of_a_group_is_409() {
    let host = Host::start();
    let api = &host.api;
    let uni = api.create_universe("l", "10.9.0.0/24");
    let g = api.create_group(id(&uni), "g");
    let existing = g["ingress"].as_array().unwrap().len() + g["egress"].as_array().unwrap().len();
    let path = format!("/v1/security-groups/{}/rules", id(&g));
    for port in 0..(1000 - existing) {
        let r = api.post(&path, &json!({"direction": "ingress", "protocol": "tcp", "from_port": port + 1, "to_port": port + 1, "cidr": "0.0.0.0/0"}));
        assert_eq!(r.status, 201, "rule {} of 1000: {}", existing + port + 1, r.body);
    }
    let r = api.post(&path, &json!({"direction": "ingress", "protocol": "udp", "from_port": 1, "to_port": 1, "cidr": "0.0.0.0/0"}));
    assert_eq!((r.status, r.error_code().as_str()), (409, "limit_exceeded"), "{}", r.body);
    let got = api.group(id(&g));
    assert_eq!(
        got["ingress"].as_array().unwrap().len() + got["egress"].as_array().unwrap().len(),
        1000
    );
}

#[test]
fn created_resources_have_the_contract_shape_and_bump_the_revision() {
    let host = Host::start();
    let api = &host.api;
    let r = api.post("/v1/universes", &json!({"name": "shape", "cidr": "10.10.2.3/16"}));
    assert_eq!(r.status, 201, "{}", r.body);
    let rev1 = r.revision().expect("mutations return Verse-Revision");
    let uni = r.json();
    assert!(id(&uni).starts_with("uni-"), "{uni}");
    assert_eq!(uni["name"], "shape");
    assert_eq!(uni["cidrs"], json!(["10.10.0.0/16"]), "S4: canonical CIDR");
    assert!(uni["vni"].as_u64().is_some_and(|v| v > 0 && v < 1 << 24), "24-bit VNI: {uni}");
    assert_eq!(api.get(&format!("/v1/universes/{}", id(&uni))).json(), uni);
    assert_eq!(api.get("/v1/universes").json(), json!([uni.clone()]));

    // S3: every universe has `default`: ingress all from itself, egress all.
    let default = api.default_group(id(&uni));
    assert_eq!(default["ingress"].as_array().unwrap().len(), 1, "{default}");
    assert_eq!(default["ingress"][0]["group"], default["id"]);
    assert_eq!(default["ingress"][0]["protocol"], "all");

    let r = api.post(
        "/v1/security-groups",
        &json!({"universe": id(&uni), "name": "web", "description": "front"}),
    );
    assert_eq!(r.status, 201, "{}", r.body);
    let rev2 = r.revision().expect("Verse-Revision");
    assert!(rev2 > rev1, "S13: every edit bumps the revision ({rev1} then {rev2})");
    let g = r.json();
    assert!(id(&g).starts_with("sg-"));
    assert_eq!(
        (g["universe"].as_str(), g["name"].as_str(), g["description"].as_str()),
        (Some(id(&uni)), Some("web"), Some("front"))
    );
    assert_eq!(g["ingress"], json!([]), "S2: no ingress rules");
    let egress = g["egress"].as_array().expect("egress array");
    let cidrs: Vec<&str> = egress.iter().map(|r| r["cidr"].as_str().unwrap_or("")).collect();
    assert!(
        cidrs.contains(&"0.0.0.0/0") && cidrs.contains(&"::/0"),
        "S2: egress all, v4 and v6: {egress:?}"
    );
    assert!(egress.iter().all(|r| r["protocol"] == "all"));

    let r = api.post(
        &format!("/v1/security-groups/{}/rules", id(&g)),
        &json!({"direction": "ingress", "protocol": "tcp", "from_port": 443, "to_port": 443, "cidr": "192.0.2.7/24", "description": "https"}),
    );
    assert_eq!(r.status, 201, "{}", r.body);
    let rev3 = r.revision().expect("Verse-Revision");
    assert!(rev3 > rev2);
    let rule = r.json();
    assert!(id(&rule).starts_with("sgr-"));
    assert_eq!(
        (
            &rule["direction"],
            &rule["protocol"],
            &rule["from_port"],
            &rule["to_port"],
            &rule["cidr"],
            &rule["description"]
        ),
        (
            &json!("ingress"),
            &json!("tcp"),
            &json!(443),
            &json!(443),
            &json!("192.0.2.0/24"),
            &json!("https")
        )
    );
    let icmp = api.add_rule(id(&g), &json!({"direction": "ingress", "protocol": "icmp", "icmp_type": 8, "icmp_code": -1, "group": id(&g)}));
    assert_eq!(
        (&icmp["icmp_type"], &icmp["icmp_code"], &icmp["group"]),
        (&json!(8), &json!(-1), &json!(id(&g)))
    );
    assert_eq!(api.group(id(&g))["ingress"].as_array().unwrap().len(), 2);

    let ns = Netns::new("e");
    let r = api.post("/v1/endpoints", &json!({"universe": id(&uni), "netns": ns.name(), "ip": "10.10.0.5", "security_groups": [id(&g)]}));
    assert_eq!(r.status, 201, "{}", r.body);
    let rev4 = r.revision().expect("Verse-Revision");
    assert!(rev4 > rev3);
    let ep = r.json();
    assert!(id(&ep).starts_with("ep-"));
    assert_eq!(ep["universe"], json!(id(&uni)));
    assert_eq!(ep["host"], json!(host.name()), "host defaults to the host serving the request");
    assert_eq!(ep["netns"], json!(ns.name()));
    assert_eq!(ep["ip"], "10.10.0.5");
    assert_eq!(ep["security_groups"], json!([id(&g)]));
    let mac = ep["mac"].as_str().expect("mac");
    assert!(mac.len() == 17 && mac.starts_with("02:"), "locally administered MAC: {mac}");
    let iface = ep["interface"].as_str().expect("interface");
    assert!(!iface.is_empty() && iface.len() <= 15, "interface name fits IFNAMSIZ: {iface}");
    // The interface exists when POST returns: eth0 in the workload with the endpoint's address and MAC.
    let link = String::from_utf8(ns.ip(&["addr", "show", "dev", "eth0"]).stdout).unwrap();
    assert!(link.contains("10.10.0.5/32") && link.contains(mac), "workload eth0: {link}");
    let host_link = host.netns().exec("ip", &["link", "show", "dev", iface]);
    assert!(
        host_link.status.success(),
        "host side {iface} exists: {}",
        String::from_utf8_lossy(&host_link.stderr)
    );

    let mut list =
        api.get(&format!("/v1/endpoints?universe={}&host={}", id(&uni), host.name())).json();
    // The host serving it shows its conntrack use too (S14).
    let usage = list[0].as_object_mut().expect("an endpoint").remove("conntrack");
    assert_eq!(usage, Some(json!({"budget": 4096, "used": 0, "available": 4096, "exceeded": 0})));
    assert_eq!(list, json!([ep.clone()]));
    assert_eq!(
        api.get("/v1/endpoints?universe=uni-00000000").json(),
        json!([]),
        "the filter filters"
    );
    assert_eq!(
        api.get(&format!("/v1/security-groups?universe={}", id(&uni)))
            .json()
            .as_array()
            .unwrap()
            .len(),
        2
    );

    // S13: the host reports the revision it realized.
    let hosts = api.get("/v1/hosts");
    assert_eq!(hosts.status, 200, "{}", hosts.body);
    let hosts = hosts.json();
    let me = hosts
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["name"] == host.name())
        .cloned()
        .unwrap_or_else(|| panic!("{hosts}"));
    assert!(me["revision"].as_u64().unwrap_or(0) >= rev4, "realized revision: {me}");
    assert_eq!(me["healthy"], true);
    assert!(me.get("underlay_ip").is_some(), "{me}");

    let r = api.delete(&format!("/v1/security-groups/{}/rules/{}", id(&g), id(&rule)));
    assert_eq!(r.status, 204);
    assert!(r.revision().expect("Verse-Revision on delete") > rev4);
}

#[test]
fn health_metrics_and_openapi_are_served() {
    let host = Host::start();
    let api = &host.api;
    assert_eq!(api.get("/healthz").status, 200);
    let metrics = api.metrics();
    assert!(metrics.contains("verse_drops_total"), "/metrics has the drop counters:\n{metrics}");
    assert!(metrics.contains("reason=\"policy_ingress\""), "every reason is exported:\n{metrics}");

    let r = api.get("/v1/openapi.json");
    assert_eq!(r.status, 200);
    let doc = r.json();
    assert!(doc["openapi"].is_string(), "openapi version field: {}", r.body);
    let paths = doc["paths"].as_object().expect("paths object");
    // Parameter names are the server's choice; compare paths with `{…}` blanked.
    let blank = |p: &str| {
        let mut out = String::new();
        let mut depth = 0;
        for c in p.chars() {
            match c {
                '{' => {
                    depth += 1;
                    out.push('{');
                }
                '}' => {
                    depth -= 1;
                    out.push('}');
                }
                _ if depth > 0 => {}
                _ => out.push(c),
            }
        }
        out
    };
    let have: Vec<String> = paths.keys().map(|k| blank(k)).collect();
    for want in [
        "/v1/universes",
        "/v1/universes/{}",
        "/v1/security-groups",
        "/v1/security-groups/{}",
        "/v1/security-groups/{}/rules",
        "/v1/security-groups/{}/rules/{}",
        "/v1/endpoints",
        "/v1/endpoints/{}",
        "/v1/hosts",
    ] {
        assert!(have.iter().any(|h| h == want), "openapi.json lacks {want}: {have:?}");
    }
}
