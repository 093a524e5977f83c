//! The demo: a Verse fleet of three hosts, driven the way an operator would, with the `verse`
//! CLI. `cargo xtask demo` sets the machine up, builds `versed` and `verse`, and runs this
//! binary (as root) with `VERSE_BIN_DIR` pointing at them.
//!
//! The demo builds the fleet's network out of namespaces (an underlay namespace holding a bridge
//! and a three-member etcd cluster on 198.18.0.251-253, three host namespaces `alpha`, `bravo`,
//! `charlie` on 198.18.0.1-3, each running `versed --store etcd://… --underlay ul0`). Two universes
//! share the CIDRs 10.0.0.0/24 and fd00:5::/64 (dual stack) and are spread over all three hosts.
//! In `shop`, a `web` tier admits
//! HTTP from `clients`, a `db` tier admits PostgreSQL only from `web` (a group referencing a
//! group); `lab` reuses the same addresses on other hosts and never sees `shop`. The same rules
//! hold over IPv6 between the same endpoints, and a CIDR rule admits its own family only
//! (`0.0.0.0/0` admits no IPv6, `::/0` no IPv4, as in AWS). Every command goes
//! to some host's API and takes effect on all of them. The demo shows traffic that passes and
//! traffic that is dropped (and `verse trace` saying why), a membership change, spoofing from a workload and forged encapsulated
//! packets from a machine on the underlay, a host whose daemon stops (its dataplane keeps
//! enforcing, the fleet marks it unhealthy and goes on without it, and it catches up when it starts
//! again), the drop counters of each host, the hosts with the revision each has realized, and
//! cleans everything up (the test harness's guards remove namespaces, daemons, etcd and bpffs
//! mounts even if a step fails).
use std::cell::Cell;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::Value;
use tests::{drops, ping, tcp_connect, underlay_ip, Fleet, Netns, TcpServer, VxlanGbp, Workload};

/// The hosts of the demo fleet.
const HOSTS: [&str; 3] = ["alpha", "bravo", "charlie"];

/// `verse` run inside one host's namespace against that host's API, as the fleet's admin (the
/// operator's admin token every host was started with, in `VERSE_TOKEN`).
struct Cli<'a> {
    fleet: &'a Fleet,
    bin: PathBuf,
    /// The revision the last mutation produced (`verse` prints it on stderr).
    revision: Cell<u64>,
}

impl Cli<'_> {
    /// Runs `verse ARGS` against host `via`'s API, echoing the command and its output (the
    /// revision a mutation produced is printed on stderr); returns stdout.
    fn run(&self, via: usize, args: &[&str]) -> Result<String> {
        let host = self.fleet.host(via);
        println!("\n{}$ verse {}", host.name(), args.join(" "));
        let out = Command::new("ip")
            .args(["netns", "exec", host.netns().name()])
            .arg(&self.bin)
            .arg("--api")
            .arg(host.api.url())
            .args(args)
            .env("VERSE_TOKEN", self.fleet.admin_token())
            .output()
            .context("run verse")?;
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        if !out.status.success() {
            bail!("verse {} failed: {stderr}", args.join(" "));
        }
        print!("{stdout}");
        for line in stderr.lines() {
            println!("  ({line})");
            if let Some(rev) = line.strip_prefix("revision ").and_then(|r| r.trim().parse().ok()) {
                self.revision.set(rev);
            }
        }
        Ok(stdout)
    }

    /// Like `run` with `-o json`, returning the object.
    fn json(&self, via: usize, args: &[&str]) -> Result<Value> {
        let mut full = vec!["-o", "json"];
        full.extend_from_slice(args);
        let out = self.run(via, &full)?;
        serde_json::from_str(&out).with_context(|| format!("verse output: {out}"))
    }

    /// Like `json`, returning the object's `id`.
    fn create(&self, via: usize, args: &[&str]) -> Result<String> {
        let v = self.json(via, args)?;
        Ok(v["id"].as_str().context("id in verse output")?.to_owned())
    }

    /// A new workload namespace plugged as an endpoint placed on host `on`, created through
    /// host `via`'s API, with IPv4 address `ip` and IPv6 address `ipv6` (dual stack).
    fn endpoint(
        &self,
        via: usize,
        on: usize,
        uni: &str,
        (ip, ipv6): (&str, &str),
        sg: Option<&str>,
    ) -> Result<Workload> {
        let ns = Netns::new("d");
        let mut args = vec![
            "endpoint",
            "create",
            "--universe",
            uni,
            "--host",
            HOSTS[on],
            "--netns",
            ns.name(),
            "--ip",
            ip,
            "--ipv6",
            ipv6,
        ];
        if let Some(sg) = sg {
            args.extend_from_slice(&["--sg", sg]);
        }
        let v = self.json(via, &args)?;
        Ok(Workload {
            id: v["id"].as_str().context("endpoint.id")?.to_owned(),
            ip: ip.parse()?,
            ipv6: Some(ipv6.parse()?),
            mac: v["mac"].as_str().unwrap_or_default().to_owned(),
            interface: v["interface"].as_str().unwrap_or_default().to_owned(),
            json: v,
            ns,
        })
    }
}

fn args(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

fn check(what: &str, expected: bool, actual: bool) -> Result<()> {
    let verdict = if actual { "PASSES" } else { "is DROPPED" };
    let mark = if actual == expected { "ok" } else { "UNEXPECTED" };
    println!("  [{mark}] {what}: {verdict}");
    if actual != expected {
        bail!("{what}: expected it to {}", if expected { "pass" } else { "be dropped" });
    }
    Ok(())
}

fn main() -> Result<()> {
    if !tests::is_root() {
        bail!("the demo needs root: it creates network namespaces and loads eBPF programs");
    }
    let bin_dir = tests::bin_dir();
    println!(
        "== The fleet's network: an underlay bridge, a three-member etcd on 198.18.0.251-253, \
         three hosts"
    );
    let mut fleet = Fleet::start_named(&HOSTS);
    for (i, name) in HOSTS.iter().enumerate() {
        println!(
            "  {name}: namespace {}, underlay ul0 {}",
            fleet.host(i).netns().name(),
            underlay_ip(i)
        );
    }
    println!("  etcd: {}", fleet.etcd().store_url());
    let verse = bin_dir.join("verse");
    let cli = Cli { fleet: &fleet, bin: verse.clone(), revision: Cell::new(0) };
    let (alpha, bravo, charlie) = (0, 1, 2);
    cli.run(alpha, &["host", "list"])?;

    println!("\n== Two dual-stack universes with the same CIDRs, created through different hosts");
    let cidrs = |name: &'static str| ["universe", "create", name, "--cidr", "10.0.0.0/24"];
    let dual = |name| [&cidrs(name)[..], &["--ipv6-cidr", "fd00:5::/64"]].concat();
    let shop = cli.json(alpha, &dual("shop"))?;
    let shop_vni = shop["vni"].as_u64().and_then(|v| u32::try_from(v).ok()).context("vni")?;
    let shop = shop["id"].as_str().context("universe id")?.to_owned();
    let lab = cli.create(bravo, &dual("lab"))?;

    println!("\n== Security groups in `shop`: clients -> web:80 -> db:5432");
    let clients = cli.create(charlie, &["sg", "create", "--universe", &shop, "clients"])?;
    let web = cli.create(
        alpha,
        &["sg", "create", "--universe", &shop, "web", "--description", "HTTP tier"],
    )?;
    let db = cli.create(bravo, &["sg", "create", "--universe", &shop, "db"])?;
    let tcp_from = |sg: &str, port: &str, from: &str| -> Vec<String> {
        ["rule", "add", sg, "--direction", "ingress", "--protocol", "tcp", "--ports", port]
            .into_iter()
            .chain(["--group", from])
            .map(str::to_owned)
            .collect()
    };
    cli.run(charlie, &args(&tcp_from(&web, "80", &clients)))?;
    cli.run(alpha, &args(&tcp_from(&db, "5432", &web)))?;
    cli.run(bravo, &["sg", "show", &web])?;

    println!("\n== Endpoints spread over the hosts (one network namespace each)");
    let client = cli.endpoint(alpha, alpha, &shop, ("10.0.0.20", "fd00:5::20"), Some(&clients))?;
    let web1 = cli.endpoint(alpha, bravo, &shop, ("10.0.0.10", "fd00:5::10"), Some(&web))?;
    let db1 = cli.endpoint(bravo, charlie, &shop, ("10.0.0.30", "fd00:5::30"), Some(&db))?;
    let lab_a = cli.endpoint(charlie, charlie, &lab, ("10.0.0.10", "fd00:5::10"), None)?;
    let lab_b = cli.endpoint(charlie, bravo, &lab, ("10.0.0.20", "fd00:5::20"), None)?;
    cli.run(charlie, &["endpoint", "list"])?;

    // Every server listens on both families (IPv4's any address, and the endpoint's IPv6).
    let serve = |w: &Workload, port: u16, banner: &str| {
        let v6 = IpAddr::V6(w.ipv6.unwrap_or(Ipv6Addr::UNSPECIFIED));
        (TcpServer::start(w.ns(), port, banner), TcpServer::start_on(w.ns(), v6, port, banner))
    };
    let _web_srv = serve(&web1, 80, "shop-web");
    let _web_alt = serve(&web1, 8080, "shop-web-8080");
    let _db_srv = serve(&db1, 5432, "shop-db");
    let _db_ssh = TcpServer::start(db1.ns(), 22, "shop-db-ssh");
    let _lab_srv = serve(&lab_a, 80, "lab-a");
    let t = Duration::from_secs(1);
    let (ip_web, ip_db) = (Ipv4Addr::new(10, 0, 0, 10), Ipv4Addr::new(10, 0, 0, 30));
    let (ip6_web, ip6_db): (Ipv6Addr, Ipv6Addr) = ("fd00:5::10".parse()?, "fd00:5::30".parse()?);

    println!("\n== Traffic in `shop`, across hosts over the encapsulating underlay");
    check(
        "client (alpha) -> web:80 (bravo): clients may reach web",
        true,
        tcp_connect(client.ns(), ip_web, 80, t),
    )?;
    check(
        "client (alpha) -> db:5432 (charlie): only web may reach db",
        false,
        tcp_connect(client.ns(), ip_db, 5432, t),
    )?;
    check(
        "web (bravo) -> db:5432 (charlie): a group references a group",
        true,
        tcp_connect(web1.ns(), ip_db, 5432, t),
    )?;
    check(
        "web (bravo) -> db:22 (charlie): no rule for ssh",
        false,
        tcp_connect(web1.ns(), ip_db, 22, t),
    )?;
    check(
        "client (alpha) ping web (bravo): no ICMP rule, default deny",
        false,
        ping(client.ns(), ip_web),
    )?;

    println!("\n== The same groups over IPv6: rules naming a group cover both families");
    check(
        "client (alpha) -> [fd00:5::10]:80 web (bravo)",
        true,
        tcp_connect(client.ns(), ip6_web, 80, t),
    )?;
    check(
        "client (alpha) -> [fd00:5::30]:5432 db (charlie): only web may reach db",
        false,
        tcp_connect(client.ns(), ip6_db, 5432, t),
    )?;
    check(
        "web (bravo) -> [fd00:5::30]:5432 db (charlie)",
        true,
        tcp_connect(web1.ns(), ip6_db, 5432, t),
    )?;
    check("client (alpha) ping -6 web (bravo): no ICMPv6 rule", false, ping(client.ns(), ip6_web))?;

    println!("\n== A CIDR rule admits its own family only: web:8080 from 0.0.0.0/0, then ::/0");
    let anywhere = |cidr: &str| -> Vec<String> {
        ["rule", "add", &web, "--direction", "ingress", "--protocol", "tcp", "--ports", "8080"]
            .into_iter()
            .chain(["--cidr", cidr])
            .map(str::to_owned)
            .collect()
    };
    cli.run(alpha, &args(&anywhere("0.0.0.0/0")))?;
    check("client (alpha) -> 10.0.0.10:8080", true, tcp_connect(client.ns(), ip_web, 8080, t))?;
    check(
        "client (alpha) -> [fd00:5::10]:8080: 0.0.0.0/0 admits no IPv6",
        false,
        tcp_connect(client.ns(), ip6_web, 8080, t),
    )?;
    cli.run(bravo, &args(&anywhere("::/0")))?;
    check(
        "client (alpha) -> [fd00:5::10]:8080 once ::/0 is admitted",
        true,
        tcp_connect(client.ns(), ip6_web, 8080, t),
    )?;

    println!("\n== Why was client -> db:5432 dropped? `verse trace` (no traffic sent)");
    println!(
        "  alpha judges the sender's hook, charlie the receiver's: the CLI asks each host's API"
    );
    println!("  (charlie's is relayed into alpha's namespace for the demo; --run also pushes the");
    println!("  synthesized frame through each host's real program, on private state)");
    let charlie_api = tests::ApiRelay::start(fleet.host(alpha).netns(), fleet.api(charlie));
    let trace = cli.run(
        alpha,
        &[
            "trace",
            "--from",
            &client.id,
            "--to",
            "10.0.0.30",
            "--protocol",
            "tcp",
            "--port",
            "5432",
            "--run",
            "--host-api",
            &format!("charlie={}", charlie_api.url()),
        ],
    )?;
    let explained = [
        "charlie: drop (policy_ingress)",
        "charlie: reference model: drop (policy_ingress)",
        "charlie: kernel (from_underlay, BPF_PROG_TEST_RUN): drop (policy_ingress)",
    ];
    if let Some(missing) = explained.iter().find(|w| !trace.contains(*w)) {
        bail!("verse trace did not explain the drop: {missing:?} is not in its output");
    }
    println!("  [ok] charlie's ingress rules drop it; the model and the kernel agree");
    drop(charlie_api);

    println!("\n== Allow ICMP echo from clients to web, through charlie; no restart, no reconnect");
    cli.run(
        charlie,
        &[
            "rule",
            "add",
            &web,
            "--direction",
            "ingress",
            "--protocol",
            "icmp",
            "--icmp-type",
            "8",
            "--icmp-code",
            "-1",
            "--group",
            &clients,
        ],
    )?;
    check("client (alpha) ping web (bravo)", true, ping(client.ns(), ip_web))?;

    println!("\n== Membership, not rules: move the client into `web` through bravo (S5)");
    cli.run(bravo, &["endpoint", "update", &client.id, "--sg", &web])?;
    check(
        "client (alpha) -> db:5432 (charlie) now that it is in web",
        true,
        tcp_connect(client.ns(), ip_db, 5432, t),
    )?;

    println!("\n== `lab` has the same addresses on other hosts and its own default group (S3)");
    check(
        "lab 10.0.0.20 (bravo) -> 10.0.0.10:80: lab's own server on charlie",
        true,
        tcp_connect(lab_b.ns(), ip_web, 80, t),
    )?;
    check(
        "lab 10.0.0.20 (bravo) -> 10.0.0.30:5432: exists only in shop",
        false,
        tcp_connect(lab_b.ns(), ip_db, 5432, t),
    )?;
    check(
        "lab fd00:5::20 (bravo) -> [fd00:5::10]:80: lab's own server on charlie",
        true,
        tcp_connect(lab_b.ns(), ip6_web, 80, t),
    )?;
    check(
        "lab fd00:5::20 (bravo) -> [fd00:5::30]:5432: exists only in shop",
        false,
        tcp_connect(lab_b.ns(), ip6_db, 5432, t),
    )?;

    println!("\n== Spoofing: lab-b sends from an address that is not its own");
    lab_b.ns().ip(&["addr", "add", "10.0.0.99/32", "dev", "eth0"]);
    let spoofed = lab_b
        .ns()
        .exec("ping", &["-c", "1", "-W", "1", "-I", "10.0.0.99", "10.0.0.10"])
        .status
        .success();
    check("spoofed source 10.0.0.99", false, spoofed)?;

    println!("\n== Forged encapsulation: a machine on the underlay (198.18.0.200) that is no host");
    let intruder_ip = Ipv4Addr::new(198, 18, 0, 200);
    let intruder = fleet.underlay_node(intruder_ip);
    let before = drops(&fleet.host(bravo).api, "unknown_host");
    let hosts = (intruder_ip, underlay_ip(bravo));
    let to_web1 = (web1.ip, web1.mac.as_str());
    let forged = VxlanGbp::datagram(hosts, 0, shop_vni, client.ip, to_web1, 80, b"forged");
    println!("  sending a VXLAN-GBP packet claiming to carry shop's client to web on bravo");
    forged.send_from(&intruder).context("send the forged packet")?;
    let counted = tests::wait_until(Duration::from_secs(3), || {
        drops(&fleet.host(bravo).api, "unknown_host") > before
    });
    check("forged packet from an unknown underlay address", false, !counted)?;

    println!("\n== charlie's daemon stops: its dataplane keeps enforcing what it last realized");
    drop(cli);
    let status = fleet.host_mut(charlie).versed.stop();
    println!("  versed on charlie exited ({status})");
    check(
        "client (alpha) -> db:5432 (charlie), versed down",
        true,
        tcp_connect(client.ns(), ip_db, 5432, t),
    )?;
    check(
        "web (bravo) -> db:22 (charlie), versed down",
        false,
        tcp_connect(web1.ns(), ip_db, 22, t),
    )?;
    println!("  waiting for charlie's lease to lapse ...");
    let lapsed = tests::wait_until(Duration::from_secs(30), || {
        fleet.host_status(alpha, HOSTS[charlie]).is_some_and(|h| h["healthy"] == false)
    });
    if !lapsed {
        bail!("charlie is still listed healthy 30 s after its daemon stopped");
    }
    let cli = Cli { fleet: &fleet, bin: verse.clone(), revision: Cell::new(0) };
    cli.run(alpha, &["host", "list"])?;

    println!("\n== The fleet goes on without charlie: allow ssh from web to db, through alpha");
    cli.run(alpha, &args(&tcp_from(&db, "22", &web)))?;
    let ssh_rule = cli.revision.get();
    cli.run(bravo, &["wait", "--revision", &ssh_rule.to_string(), "--timeout", "10s"])?;
    check(
        "web (bravo) -> db:22 (charlie): charlie has not realized the rule",
        false,
        tcp_connect(web1.ns(), ip_db, 22, t),
    )?;

    println!("\n== charlie's daemon starts again and catches up from etcd");
    drop(cli);
    fleet.host_mut(charlie).versed.start_again();
    let cli = Cli { fleet: &fleet, bin: verse, revision: Cell::new(0) };
    // `verse wait` waits for the healthy hosts; charlie is healthy again once it has
    // re-registered, so wait for that first.
    let back = tests::wait_until(Duration::from_secs(30), || {
        fleet.host_status(alpha, HOSTS[charlie]).is_some_and(|h| h["healthy"] == true)
    });
    if !back {
        bail!("charlie is not listed healthy 30 s after its daemon restarted");
    }
    cli.run(alpha, &["wait", "--revision", &ssh_rule.to_string(), "--timeout", "30s"])?;
    check("web (bravo) -> db:22 (charlie)", true, tcp_connect(web1.ns(), ip_db, 22, t))?;

    println!("\n== Drop counters of each host (GET /metrics)");
    for (i, name) in HOSTS.iter().enumerate() {
        let metrics = fleet.host(i).api.metrics();
        let counted: Vec<&str> = metrics
            .lines()
            .filter(|l| l.starts_with("verse_drops_total") && !l.ends_with(" 0"))
            .collect();
        println!("  {name}:{}", if counted.is_empty() { " no drops" } else { "" });
        for line in counted {
            println!("    {line}");
        }
    }

    println!("\n== Every host has realized the last edit (S13)");
    cli.run(charlie, &["host", "list"])?;

    println!("\n== Done: cleaning up namespaces, daemons, etcd and bpffs mounts");
    drop((client, web1, db1, lab_a, lab_b, intruder));
    Ok(())
}
