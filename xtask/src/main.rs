//! `cargo xtask`: the one entry point for setting up, building, demonstrating, testing and
//! benchmarking Verse. Every command installs what it needs first (`setup`), so a fresh Debian
//! machine needs nothing but this repository and a Rust toolchain.
//!
//! This crate therefore depends on nothing that needs what set-up installs: the daemon's
//! build needs protoc (etcd's protos) and Debian's rustc with bpf-linker (the eBPF programs).
//! The demo (`tests/src/bin/demo.rs`) and the benchmarks (`bench/`, binary `verse-bench`) are
//! binaries of their own that xtask builds and runs through cargo once the machine is set up.
use std::path::PathBuf;
use std::process::Command;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

mod setup;

#[derive(Parser)]
#[command(name = "xtask", about = "Set-up, build, demo, tests and benchmarks of Verse")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install the Debian packages and bpf-linker the build and the tests need.
    Setup,
    /// Set up, then build the daemon, the CLI and the eBPF dataplane.
    Build,
    /// Set up, check the formatting (`cargo fmt --check`) and the lints (`cargo clippy
    /// --all-targets -- -D warnings`), build, and run every test: unit tests and, as root, the
    /// namespace integration tests and the kernel-versus-model differential test. A formatting
    /// or lint failure fails the run before any test.
    Test {
        /// Extra arguments for `cargo test` (a filter, `--nocapture`, ...).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Set up, build, and show Verse at work: three hosts, universes, groups and endpoints in
    /// namespaces, with traffic allowed and denied. Cleans up after itself.
    Demo,
    /// Set up, build (release), and run the benchmarks (`verse-bench`); writes
    /// target/bench/results.json, report.md and PNG plots.
    Bench {
        /// Run only these tiers (repeatable); all of them by default.
        #[arg(long = "tier", value_parser = ["micro", "tcp", "fleet", "rate", "control"])]
        tiers: Vec<String>,
        /// Fail if a ratio worsened by more than 15% against bench/baseline.json.
        #[arg(long)]
        check: bool,
        /// Store this run's ratios in bench/baseline.json as the new baseline (the rows this
        /// run measured replace theirs; the others are kept).
        #[arg(long)]
        save_baseline: bool,
        /// Run only these parts of the tiers (repeatable): the control tier has `loads`,
        /// `edits` and `hosts`.
        #[arg(long = "part")]
        parts: Vec<String>,
        /// Further options for `verse-bench` (`--sim-hosts N`, ...; see `verse-bench --help`).
        #[arg(last = true)]
        extra: Vec<String>,
    },
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Cmd::Setup => setup::run(),
        Cmd::Build => build(Profile::Debug),
        Cmd::Test { args } => {
            require_root("test")?;
            build(Profile::Debug)?;
            lint()?;
            run(cargo()
                .args(["test", "--no-fail-fast"])
                .args(args)
                .env("VERSE_BIN_DIR", bin_dir(Profile::Debug)))
        }
        Cmd::Demo => {
            require_root("demo")?;
            build(Profile::Debug)?;
            run(cargo()
                .args(["run", "--quiet", "-p", "tests", "--bin", "demo"])
                .env("VERSE_BIN_DIR", bin_dir(Profile::Debug)))
        }
        Cmd::Bench { tiers, check, save_baseline, parts, extra } => {
            require_root("bench")?;
            // The benchmarks time work done in their own process too (compiling rules, writing
            // maps, the latency client): everything runs from a release build.
            build(Profile::Release)?;
            let mut cmd = cargo();
            cmd.args(["run", "--quiet", "--release", "-p", "bench", "--"]);
            for tier in &tiers {
                cmd.args(["--tier", tier]);
            }
            if check {
                cmd.arg("--check");
            }
            if save_baseline {
                cmd.arg("--save-baseline");
            }
            for part in &parts {
                cmd.args(["--part", part]);
            }
            cmd.args(&extra);
            run(cmd.env("VERSE_BIN_DIR", bin_dir(Profile::Release)))
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Profile {
    Debug,
    Release,
}

/// The workspace root (xtask lives one level below it).
fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root").to_path_buf()
}

/// Where cargo puts `versed` and `verse` for `profile`.
fn bin_dir(profile: Profile) -> PathBuf {
    let target =
        std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or(root().join("target"));
    target.join(if profile == Profile::Release { "release" } else { "debug" })
}

fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(root());
    cmd
}

/// Sets the machine up, then builds the daemon and the CLI (and, through controller/build.rs,
/// the eBPF dataplane).
fn build(profile: Profile) -> Result<()> {
    setup::run()?;
    let mut cmd = cargo();
    cmd.args(["build", "-p", "verse", "--bins"]);
    if profile == Profile::Release {
        cmd.arg("--release");
    }
    run(&mut cmd)
}

/// The habits the tools enforce: rustfmt's layout (rustfmt.toml) and the workspace lints
/// (`[workspace.lints]` in Cargo.toml, every other clippy warning denied too), over the default
/// members and all their targets (the BPF-only crate is checked by its own build).
fn lint() -> Result<()> {
    run(cargo().args(["fmt", "--all", "--check"]))?;
    run(cargo().args(["clippy", "--all-targets", "--", "-D", "warnings"]))
}

fn require_root(what: &str) -> Result<()> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        bail!("`cargo xtask {what}` needs root: it creates network namespaces and loads eBPF programs");
    }
    Ok(())
}

/// Runs a command to completion, failing with its command line if it fails.
fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("failed to start {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}
