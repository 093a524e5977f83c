//! `verse-bench`: the benchmarks, separate from the tests. `cargo xtask bench` sets the machine
//! up, builds `versed` and this binary in release mode and runs it; run alone, it finds
//! `versed` in `$VERSE_BIN_DIR`, else beside itself (`target/release`).
//!
//! Every figure is reported with a ratio to a baseline measured in the same run (the machine is
//! shared and noisy), and written with its configuration to `target/bench/results.json`.
//!
//! - Micro (`micro`): ns per packet of `from_endpoint` through BPF_PROG_TEST_RUN, with verdict
//!   events on and off; and the latency of the daemon's API while a workload floods denied
//!   packets (`flood`).
//! - TCP (`tcp`): one iperf3 stream between two endpoints on one host through Verse, against
//!   two namespaces joined by a bare veth pair with no program at all; and over the same pair
//!   with a trivial TC program, and with a trivial XDP program (with and without GRO), which
//!   shows why Verse's hooks are TC.
//! - Fleet (`fleet`): across hosts, TCP throughput (with CPU per Gbit/s) and request/response
//!   latency against plain routing and kernel VXLAN + nftables at underlay MTU 1500 and 9000,
//!   and edit-to-enforcement time on one host and on three.
//! - Rate (`rate`): denied traffic dropped on the underlay, against nftables and iptables.
//! - Control (`control`): compiling and loading rules, against `nft -f` and `iptables-restore`
//!   (part `loads`); the control plane under load: edits per second and latency at 50 and 200
//!   clients over three hosts (etcd) and on one (embedded), an edit on a full fleet against an
//!   empty one, and etcd's database per 10,000 rules (part `edits`, see `edits.rs`); a thousand
//!   simulated hosts and three real ones on one three-member etcd: edit to realized on every
//!   host, watch events, bytes per host, memory per host (part `hosts`, see `hosts.rs`).
//!
//! It also writes `target/bench/report.md` and PNG plots, and with `--check` fails if a ratio
//! worsened by more than 15% against `bench/baseline.json` (`baseline`).
use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::Parser;

mod baseline;
mod bpf;
mod control;
mod edits;
mod fleet;
mod flood;
mod hosts;
mod iperf;
mod micro;
mod plots;
mod profile;
mod rate;
mod results;
mod scenario;
mod tcp;

/// The tiers, each runnable alone with `--tier`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Tier {
    /// ns per packet through BPF_PROG_TEST_RUN (`micro`).
    Micro,
    /// One TCP stream between two endpoints of one host, against a bare veth pair, and over that
    /// pair with a trivial TC or XDP program (`tcp`).
    Tcp,
    /// Across hosts: TCP, latency, edit-to-enforcement (`fleet`).
    Fleet,
    /// Packet rate of dropping denied traffic, against nftables and iptables (`rate`).
    Rate,
    /// Loading rules, against `nft -f` and `iptables-restore` (`control`).
    Control,
}

#[derive(Parser)]
#[command(name = "verse-bench", about = "The benchmarks of Verse (run by `cargo xtask bench`)")]
struct Cli {
    /// Run only these tiers (repeatable); all of them by default.
    #[arg(long = "tier", value_enum)]
    tiers: Vec<Tier>,
    /// Fail if a ratio worsened by more than 15% against bench/baseline.json.
    #[arg(long)]
    check: bool,
    /// Store this run's ratios as the new baseline (the rows this run measured replace theirs;
    /// the others are kept).
    #[arg(long)]
    save_baseline: bool,
    /// Run only these parts of the tiers (repeatable; all by default). The control tier has
    /// `loads`, `edits` and `hosts`; the fleet tier `cross_host` and `edits`.
    #[arg(long = "part")]
    parts: Vec<String>,
    /// Run only these scenarios of the micro tier (repeatable; all by default): their record
    /// names without `micro_` (`established`, `established_other_cpu`, `new_flow_10_rules`,
    /// `wrap_established`, `established_ipv6`, `new_flow_100k_rules_ipv6`, ...; an `_events_on` scenario brings its partner), `ct_gc` for the
    /// garbage collection rows, `flood` for the API under a flood. The empty program and the
    /// parse are always measured.
    #[arg(long = "scenario")]
    scenarios: Vec<String>,
    /// Of the control tier's part `edits`, only the runs under load (edits per second and
    /// latency at 50 and 200 clients), not the one edit on an empty and a full fleet nor etcd's
    /// database per 10,000 rules: to compare two builds back to back.
    #[arg(long)]
    edits_load_only: bool,
    /// Of the control tier's part `edits`, only the one edit on an empty and a full fleet (and
    /// etcd's database per 10,000 rules), not the runs under load.
    #[arg(long, conflicts_with = "edits_load_only")]
    edits_sequential_only: bool,
    /// Edits of the part `edits`' one-edit measurement, on each side (half adds, half
    /// deletes; the port of each added rule is 20,000 plus its number: at most 20,000).
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u16).range(2..=20_000))]
    edits_sequential: u16,
    /// The stores the part `edits` measures (`etcd`, `embedded`; repeatable; both by default).
    #[arg(long = "edits-store")]
    edits_stores: Vec<String>,
    /// Simulated hosts of the control tier's `hosts` part (50 complete on a shared 2-core
    /// machine; `--sim-hosts 1000 --sim-budget 1800` is the thousand-host run, README "Scale").
    #[arg(long, default_value_t = 50)]
    sim_hosts: usize,
    /// Endpoints placed on each simulated host.
    #[arg(long, default_value_t = 10)]
    sim_endpoints: usize,
    /// Universes the endpoints are spread over.
    #[arg(long, default_value_t = 100)]
    sim_universes: usize,
    /// Edits timed.
    #[arg(long, default_value_t = 25)]
    sim_edits: usize,
    /// etcd clients the simulated hosts share (0: one each, as real hosts).
    #[arg(long, default_value_t = 0)]
    sim_connections: usize,
    /// Seconds allowed for the simulated hosts to join, and again for placing the endpoints,
    /// for every host to realize the placed state, and for the edits (each phase): the part
    /// ends in about four budgets whatever the machine's load.
    #[arg(long, default_value_t = 300)]
    sim_budget: u64,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the benchmarks need root: they create network namespaces and load eBPF programs");
    }
    // The harness finds `versed` through this variable: the release build beside this binary
    // unless told otherwise.
    let bin_dir = match std::env::var_os("VERSE_BIN_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => {
            let exe = std::env::current_exe()?;
            let dir = exe.parent().map(PathBuf::from).unwrap_or_default();
            std::env::set_var("VERSE_BIN_DIR", &dir);
            dir
        }
    };
    if !bin_dir.join("versed").is_file() {
        bail!(
            "no versed in {}: build it with `cargo build --release -p verse --bins` (or run \
             `cargo xtask bench`, which does), or point VERSE_BIN_DIR at it",
            bin_dir.display()
        );
    }
    let want = |t: Tier| cli.tiers.is_empty() || cli.tiers.contains(&t);
    let mut records = Vec::new();
    if want(Tier::Micro) {
        let scenario = |s: &str| cli.scenarios.is_empty() || cli.scenarios.iter().any(|x| x == s);
        micro::run(&mut records, &scenario)?;
        if scenario("flood") {
            flood::run(&mut records)?;
        }
    }
    if want(Tier::Tcp) {
        tcp::run(&mut records)?;
    }
    let part = |p: &str| cli.parts.is_empty() || cli.parts.iter().any(|x| x == p);
    if want(Tier::Fleet) {
        fleet::run(&mut records, &part)?;
    }
    if want(Tier::Rate) {
        rate::run(&mut records)?;
    }
    if want(Tier::Control) {
        if part("loads") {
            control::run(&mut records)?;
        }
        if part("edits") {
            let store =
                |s: &str| cli.edits_stores.is_empty() || cli.edits_stores.iter().any(|x| x == s);
            let options = edits::Options {
                load_only: cli.edits_load_only,
                sequential_only: cli.edits_sequential_only,
                sequential: usize::from(cli.edits_sequential),
                etcd: store("etcd"),
                embedded: store("embedded"),
            };
            edits::run(&mut records, &options)?;
        }
        if part("hosts") {
            let scale = hosts::Scale {
                hosts: cli.sim_hosts,
                endpoints_per_host: cli.sim_endpoints,
                universes: cli.sim_universes,
                edits: cli.sim_edits,
                connections: cli.sim_connections,
                budget_s: cli.sim_budget,
            };
            hosts::run(&mut records, &scale)?;
        }
    }
    results::fill_spread(&mut records);
    results::write(&records)?;
    let plots = plots::draw(&records, &out_dir())?;
    results::write_report(&records, &plots)?;
    results::print_table(&records);
    if cli.save_baseline {
        baseline::save(&records)?;
    }
    if cli.check {
        baseline::check(&records)?;
    }
    Ok(())
}

/// The workspace root (this crate lives one level below it).
fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root").to_path_buf()
}

/// Where the results, the report and the plots go: `target/bench` (or `$CARGO_TARGET_DIR/bench`).
fn out_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target"))
        .join("bench")
}

/// The median of `v` (the upper one of an even count).
fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}
