//! Names and waiting: every name a test makes carries the run's prefix, so parallel runs never
//! collide and a later run can sweep what a killed one left; every wait is a bounded poll.

use std::fs::{self};

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

static COUNTER: AtomicU32 = AtomicU32::new(0);

fn base36(mut n: u64) -> String {
    const DIGITS: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut out = Vec::new();
    loop {
        out.push(DIGITS[(n % 36) as usize]);
        n /= 36;
        if n == 0 {
            break;
        }
    }
    out.reverse();
    String::from_utf8(out).expect("ascii digits")
}

/// The prefix of every name this process makes: `vt` + the process id in base 36.
pub fn run_prefix() -> String {
    format!("vt{}", base36(u64::from(std::process::id())))
}

/// A name unique to this run and this call: `vt<pid36>-<n36><tag>`. Interface and namespace
/// names must fit `IFNAMSIZ` (15 bytes), so tags are short. The first call also sweeps what
/// runs that died without cleaning up left behind (see [`sweep_stale`]).
pub fn unique_name(tag: &str) -> String {
    static SWEEP: std::sync::Once = std::sync::Once::new();
    SWEEP.call_once(sweep_stale);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let name = format!("{}-{}{}", run_prefix(), base36(u64::from(n)), tag);
    assert!(name.len() <= 15, "name {name} is longer than 15 bytes: shorten the tag {tag:?}");
    name
}

/// The process id encoded in a name made by [`unique_name`], if it is one.
fn owner_pid(name: &str) -> Option<u32> {
    let digits = name.strip_prefix("vt")?.split_once('-')?.0;
    u32::from_str_radix(digits, 36).ok()
}

/// Removes the namespaces, bpffs mounts and state directories of test runs whose process is
/// gone (killed before its guards could run), so a reused pid cannot collide with them.
/// Daemons of such runs died with them (`PR_SET_PDEATHSIG`, see [`Versed`]).
pub fn sweep_stale() {
    let dead = |name: &str| {
        owner_pid(name).is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists())
    };
    if let Ok(entries) = fs::read_dir("/run/netns") {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if dead(&name) {
                let _ = run_quiet("ip", &["netns", "del", &name]);
            }
        }
    }
    let tmp = std::env::temp_dir();
    let mounts = fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    if let Ok(entries) = fs::read_dir(&tmp) {
        for e in entries.flatten() {
            let file = e.file_name().to_string_lossy().into_owned();
            let Some(name) = file.strip_prefix("verse-tests-") else {
                continue;
            };
            if !dead(name) {
                continue;
            }
            let dir = e.path();
            let prefix = dir.to_string_lossy().into_owned();
            for mnt in mounts
                .lines()
                .filter_map(|l| l.split_whitespace().nth(1))
                .filter(|m| m.starts_with(&prefix))
            {
                let _ = run_quiet("umount", &[mnt]);
            }
            let _ = fs::remove_dir_all(&dir);
        }
    }
}

/// Polls `cond` every 20 ms until it holds or `timeout` passes; returns whether it held.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs a command to completion; panics with its command line and output if it fails.
pub fn run_ok(cmd: &str, args: &[&str]) -> Output {
    let out = Command::new(cmd)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("failed to start {cmd} {args:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

pub(crate) fn run_quiet(cmd: &str, args: &[&str]) -> Option<Output> {
    Command::new(cmd).args(args).stdin(Stdio::null()).output().ok()
}

/// A TCP port for a listener of this test process (distinct within the run).
///
/// Below Linux's ephemeral range (32768-60999 by default): a client polling a port that nobody
/// listens on yet can be given that very port as its own source and connect to itself (TCP
/// simultaneous open), and the daemon that then binds it fails with "Address already in use".
pub fn unique_port() -> u16 {
    // Every daemon listens on the loopback of its own namespace, so ports cannot collide across
    // tests; keeping them distinct anyway makes logs unambiguous.
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    10000 + ((std::process::id() % 500) * 40 + n % 40) as u16
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_fit_ifnamsiz_and_name_their_owner() {
        for _ in 0..100 {
            let name = unique_name("abcd");
            assert!(name.len() <= 15, "{name}");
            assert_eq!(owner_pid(&name), Some(std::process::id()), "{name}");
        }
        assert_eq!(owner_pid("vtzz-1h"), Some(35 * 36 + 35));
        assert_eq!(owner_pid("other"), None);
    }
}
