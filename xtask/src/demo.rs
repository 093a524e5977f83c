//! `cargo xtask demo`: Verse on one host, driven the way an operator would, with the `verse` CLI.
//!
//! Two universes share the CIDR 10.0.0.0/24. In `shop`, a `web` tier admits HTTP from `clients`,
//! a `db` tier admits PostgreSQL only from `web` (a group referencing a group). `lab` reuses the
//! same addresses and never sees `shop`. The demo then shows real traffic that passes and traffic
//! that is dropped, the drop counters, and finally cleans everything up (the guards of the test
//! harness remove namespaces, the daemon and its bpffs even if a step fails).
use std::net::Ipv4Addr;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::Value;
use tests::{ping, tcp_connect, Host, Netns, TcpServer, Workload};

struct Cli<'a> {
    host: &'a Host,
    bin: std::path::PathBuf,
}

impl Cli<'_> {
    /// Runs `verse ARGS` inside the host namespace (where the API listens), echoing the command
    /// and its table output; returns the JSON form when asked for one.
    fn run(&self, args: &[&str]) -> Result<String> {
        println!("\n$ verse {}", args.join(" "));
        let out = Command::new("ip")
            .args(["netns", "exec", self.host.netns().name()])
            .arg(&self.bin)
            .arg("--api")
            .arg(self.host.api.url())
            .args(args)
            .output()
            .context("run verse")?;
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        print!("{stdout}");
        if !out.status.success() {
            bail!("verse {} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
        }
        Ok(stdout)
    }

    /// Like `run` with `-o json`, returning the object's `id`.
    fn create(&self, args: &[&str]) -> Result<String> {
        let mut full = vec!["-o", "json"];
        full.extend_from_slice(args);
        let out = self.run(&full)?;
        let v: Value =
            serde_json::from_str(&out).with_context(|| format!("verse output: {out}"))?;
        Ok(v["id"].as_str().context("id in verse output")?.to_owned())
    }
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

pub fn run(bin_dir: &Path) -> Result<()> {
    std::env::set_var("VERSE_BIN_DIR", bin_dir);
    println!("== Starting versed (embedded store) in a host namespace");
    let host = Host::start();
    let cli = Cli { host: &host, bin: bin_dir.join("verse") };

    println!("\n== Two universes with the same CIDR");
    let shop = cli.create(&["universe", "create", "shop", "--cidr", "10.0.0.0/24"])?;
    let lab = cli.create(&["universe", "create", "lab", "--cidr", "10.0.0.0/24"])?;

    println!("\n== Security groups in `shop`: clients -> web:80 -> db:5432");
    let clients = cli.create(&["sg", "create", "--universe", &shop, "clients"])?;
    let web =
        cli.create(&["sg", "create", "--universe", &shop, "web", "--description", "HTTP tier"])?;
    let db = cli.create(&["sg", "create", "--universe", &shop, "db"])?;
    cli.run(&[
        "rule",
        "add",
        &web,
        "--direction",
        "ingress",
        "--protocol",
        "tcp",
        "--ports",
        "80",
        "--group",
        &clients,
    ])?;
    cli.run(&[
        "rule",
        "add",
        &db,
        "--direction",
        "ingress",
        "--protocol",
        "tcp",
        "--ports",
        "5432",
        "--group",
        &web,
    ])?;
    cli.run(&["sg", "show", &web])?;

    println!("\n== Endpoints: one network namespace each");
    let ep = |uni: &str, ip: &str, sg: Option<&str>| -> Result<Workload> {
        let ns = Netns::new("d");
        let mut args =
            vec!["endpoint", "create", "--universe", uni, "--netns", ns.name(), "--ip", ip];
        if let Some(sg) = sg {
            args.extend_from_slice(&["--sg", sg]);
        }
        let mut full = vec!["-o", "json"];
        full.extend_from_slice(&args);
        let out = cli.run(&full)?;
        let v: Value = serde_json::from_str(&out).context("endpoint JSON")?;
        Ok(Workload {
            id: v["id"].as_str().context("endpoint.id")?.to_owned(),
            ip: ip.parse()?,
            mac: v["mac"].as_str().unwrap_or_default().to_owned(),
            interface: v["interface"].as_str().unwrap_or_default().to_owned(),
            json: v,
            ns,
        })
    };
    let client = ep(&shop, "10.0.0.20", Some(&clients))?;
    let web1 = ep(&shop, "10.0.0.10", Some(&web))?;
    let db1 = ep(&shop, "10.0.0.30", Some(&db))?;
    let lab_a = ep(&lab, "10.0.0.10", None)?;
    let lab_b = ep(&lab, "10.0.0.20", None)?;
    cli.run(&["endpoint", "list"])?;

    let _web_srv = TcpServer::start(web1.ns(), 80, "shop-web");
    let _db_srv = TcpServer::start(db1.ns(), 5432, "shop-db");
    let _lab_srv = TcpServer::start(lab_a.ns(), 80, "lab-a");
    let t = Duration::from_secs(1);
    let (ip_web, ip_db) = (Ipv4Addr::new(10, 0, 0, 10), Ipv4Addr::new(10, 0, 0, 30));

    println!("\n== Traffic in `shop`");
    check(
        "client -> web:80 (clients may reach web)",
        true,
        tcp_connect(client.ns(), ip_web, 80, t),
    )?;
    check(
        "client -> db:5432 (only web may reach db)",
        false,
        tcp_connect(client.ns(), ip_db, 5432, t),
    )?;
    check("web -> db:5432 (group references group)", true, tcp_connect(web1.ns(), ip_db, 5432, t))?;
    check("client ping web (no ICMP rule: default deny)", false, ping(client.ns(), ip_web))?;

    println!("\n== Allow ICMP echo from clients to web; no restart, no reconnect");
    cli.run(&[
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
    ])?;
    check("client ping web", true, ping(client.ns(), ip_web))?;

    println!("\n== Membership, not rules: move the client into `web` (S5)");
    cli.run(&["endpoint", "update", &client.id, "--sg", &web])?;
    check(
        "client -> db:5432 now that it is in web",
        true,
        tcp_connect(client.ns(), ip_db, 5432, t),
    )?;

    println!("\n== `lab` has the same addresses and its own default group (S3)");
    check(
        "lab 10.0.0.20 -> 10.0.0.10:80 (lab's own server)",
        true,
        tcp_connect(lab_b.ns(), ip_web, 80, t),
    )?;
    check(
        "lab 10.0.0.20 -> 10.0.0.30:5432 (exists only in shop)",
        false,
        tcp_connect(lab_b.ns(), ip_db, 5432, t),
    )?;

    println!("\n== Spoofing: lab-b sends from an address that is not its own");
    lab_b.ns().ip(&["addr", "add", "10.0.0.99/32", "dev", "eth0"]);
    let spoofed = lab_b
        .ns()
        .exec("ping", &["-c", "1", "-W", "1", "-I", "10.0.0.99", "10.0.0.10"])
        .status
        .success();
    check("spoofed source 10.0.0.99", false, spoofed)?;

    println!("\n== Drop counters (GET /metrics)");
    for line in host
        .api
        .metrics()
        .lines()
        .filter(|l| l.starts_with("verse_drops_total") && !l.ends_with(" 0"))
    {
        println!("  {line}");
    }
    cli.run(&["host", "list"])?;
    println!("\n== Done: cleaning up namespaces, the daemon and its bpffs");
    drop((client, web1, db1, lab_a, lab_b));
    Ok(())
}
