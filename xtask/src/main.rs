//! `cargo xtask`: the one entry point for setting up, building, demonstrating, testing and
//! benchmarking Verse. Every command installs what it needs first (`setup`), so a fresh Debian
//! machine needs nothing but this repository and a Rust toolchain.
use std::path::PathBuf;
use std::process::Command;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

mod baseline;
mod bench;
mod bench_control;
mod bench_fleet;
mod bench_micro;
mod bench_rate;
mod demo;
mod plots;
mod results;
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
    /// Set up, build, and run every test: unit tests and, as root, the namespace integration
    /// tests and the kernel-versus-model differential test.
    Test {
        /// Extra arguments for `cargo test` (a filter, `--nocapture`, ...).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Set up, build, and show Verse at work: universes, groups and endpoints in namespaces,
    /// with traffic allowed and denied. Cleans up after itself.
    Demo,
    /// Set up, build (release), and run the benchmarks; writes target/bench/results.json,
    /// report.md and PNG plots.
    Bench {
        /// Run only these tiers (repeatable); all of them by default.
        #[arg(long = "tier", value_enum)]
        tiers: Vec<bench::Tier>,
        /// Fail if a ratio worsened by more than 15% against xtask/bench-baseline.json.
        #[arg(long)]
        check: bool,
        /// Store this run's ratios as the new baseline.
        #[arg(long)]
        save_baseline: bool,
    },
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Cmd::Setup => setup::run(),
        Cmd::Build => build(false),
        Cmd::Test { args } => test(&args),
        Cmd::Demo => {
            require_root("demo")?;
            build(false)?;
            demo::run(&bin_dir(false))
        }
        Cmd::Bench { tiers, check, save_baseline } => {
            require_root("bench")?;
            if cfg!(debug_assertions) {
                // The benchmarks time work done in this process too (compiling rules, writing
                // maps, the latency client): run them from an optimized xtask.
                let args: Vec<String> = std::env::args().skip(1).collect();
                return run(cargo()
                    .args(["run", "--quiet", "--release", "-p", "xtask", "--"])
                    .args(args));
            }
            build(true)?;
            bench::run(&bin_dir(true), &tiers, check, save_baseline)
        }
    }
}

/// The workspace root (xtask lives one level below it).
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root").to_path_buf()
}

pub fn bin_dir(release: bool) -> PathBuf {
    root().join("target").join(if release { "release" } else { "debug" })
}

fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(root());
    cmd
}

fn build(release: bool) -> Result<()> {
    setup::run()?;
    let mut cmd = cargo();
    cmd.args(["build", "-p", "controller", "--bins"]);
    if release {
        cmd.arg("--release");
    }
    run(&mut cmd)
}

fn test(args: &[String]) -> Result<()> {
    require_root("test")?;
    build(false)?;
    run(cargo().args(["test", "--no-fail-fast"]).args(args).env("VERSE_BIN_DIR", bin_dir(false)))
}

fn require_root(what: &str) -> Result<()> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        bail!("`cargo xtask {what}` needs root: it creates network namespaces and loads eBPF programs");
    }
    Ok(())
}

/// Runs a command to completion, failing with its command line if it fails.
pub fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("failed to start {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}
