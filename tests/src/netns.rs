//! Network namespaces and the other guards of what a test makes: a namespace, a temporary
//! directory, a bpffs mount, each removed on drop, also while a failing test unwinds.

use std::fs::{self, File};
use std::io::{self};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use crate::*;

/// Runs `f` on a thread that has joined the network namespace `/run/netns/<name>`.
///
/// Only that thread changes namespace; sockets it creates stay in the namespace wherever they
/// are used afterwards. A panic inside `f` is propagated to the caller.
pub fn enter_netns<T: Send, F: FnOnce() -> T + Send>(name: &str, f: F) -> T {
    let path = format!("/run/netns/{name}");
    std::thread::scope(|s| {
        let handle = s.spawn(|| {
            let file = File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
            // SAFETY: `file` is an open namespace file that outlives the call; setns(2) with
            // CLONE_NEWNET only changes the network namespace of this thread, which ends when
            // the closure returns.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns({path}, CLONE_NEWNET): {}", io::Error::last_os_error());
            f()
        });
        handle.join().unwrap_or_else(|p| std::panic::resume_unwind(p))
    })
}

/// An `ip netns` namespace, deleted on drop. Its loopback is up.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

/// Makes the child started by `cmd` receive SIGKILL when the thread that spawns it exits, so a
/// daemon never outlives a test process killed before its guards could run.
pub fn die_with_parent(cmd: &mut Command) {
    // SAFETY: prctl(PR_SET_PDEATHSIG) is async-signal-safe and touches no memory of the
    // parent, as a pre_exec hook requires.
    unsafe {
        use std::os::unix::process::CommandExt;
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Whether the test runs as root. Tests that need bpf, netns or mount assert it first, so
/// without root they fail with a message saying so (they never pass by skipping).
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

impl Netns {
    pub fn new(tag: &str) -> Netns {
        let name = unique_name(tag);
        run_ok("ip", &["netns", "add", &name]);
        let ns = Netns { name };
        run_ok("ip", &["-n", &ns.name, "link", "set", "lo", "up"]);
        ns
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `ip -n <ns> args...`, which must succeed.
    pub fn ip(&self, args: &[&str]) -> Output {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        run_ok("ip", &all)
    }

    /// The ifindex of `iface` in this namespace (read through iproute2: /sys shows the
    /// namespace of whoever mounted it).
    pub fn ifindex(&self, iface: &str) -> u32 {
        let out = self.ip(&["-o", "link", "show", iface]);
        let text = String::from_utf8_lossy(&out.stdout);
        text.split(':')
            .next()
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or_else(|| panic!("no ifindex for {iface} in {}: {text}", self.name))
    }

    /// Turns IPv6 off for the links of this namespace, those there and those made later: the
    /// kernel then sends nothing of its own (router solicitations, MLD reports, duplicate
    /// address probes, at random delays after a link comes up) from a link a test attached a
    /// program to, which would otherwise count as drops the test did not cause.
    pub fn disable_ipv6(&self) {
        for conf in ["all", "default"] {
            let key = format!("net.ipv6.conf.{conf}.disable_ipv6=1");
            let out = self.exec("sysctl", &["-q", "-w", &key]);
            assert!(out.status.success(), "sysctl -w {key} in {}: {:?}", self.name, out);
        }
    }

    /// `ip netns exec <ns> cmd args...`; the caller judges the outcome.
    pub fn exec(&self, cmd: &str, args: &[&str]) -> Output {
        Command::new("ip")
            .args(["netns", "exec", &self.name, cmd])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("failed to start ip netns exec {} {cmd}: {e}", self.name))
    }

    /// Runs `f` inside this namespace (see [`enter_netns`]).
    pub fn enter<T: Send, F: FnOnce() -> T + Send>(&self, f: F) -> T {
        enter_netns(&self.name, f)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Some(out) = run_quiet("ip", &["netns", "del", &self.name]) {
            if !out.status.success() {
                eprintln!(
                    "cleanup: ip netns del {}: {}",
                    self.name,
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
    }
}

/// A directory under the system temp dir, removed (recursively) on drop.
#[derive(Debug)]
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let path = std::env::temp_dir().join(format!("verse-tests-{}", unique_name(tag)));
        fs::create_dir_all(&path).unwrap_or_else(|e| panic!("mkdir {}: {e}", path.display()));
        TempDir { path }
    }
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if let Err(e) = fs::remove_dir_all(&self.path) {
            eprintln!("cleanup: rm -r {}: {e}", self.path.display());
        }
    }
}

/// A bpffs mounted in the root mount namespace, unmounted (and its mountpoint removed) on drop.
///
/// It must be mounted here, not by the daemon: `ip netns exec` gives the daemon a private mount
/// namespace, and a bpffs mounted inside it would vanish, with the pinned maps and links, when
/// the daemon exits. Mounted out here it survives a daemon restart, as a host's `/sys/fs/bpf`
/// does.
#[derive(Debug)]
pub struct Bpffs {
    path: PathBuf,
}

impl Bpffs {
    pub fn mount(path: &Path) -> Bpffs {
        fs::create_dir_all(path).unwrap_or_else(|e| panic!("mkdir {}: {e}", path.display()));
        let p = path.to_str().expect("utf-8 path");
        run_ok("mount", &["-t", "bpf", "bpf", p]);
        Bpffs { path: path.to_owned() }
    }
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for Bpffs {
    fn drop(&mut self) {
        let p = self.path.to_string_lossy().into_owned();
        match run_quiet("umount", &[&p]) {
            Some(out) if out.status.success() => {
                let _ = fs::remove_dir(&self.path);
            }
            Some(out) => eprintln!("cleanup: umount {p}: {}", String::from_utf8_lossy(&out.stderr)),
            None => eprintln!("cleanup: umount {p}: could not run umount"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bpffs_guard_mounts_and_unmounts() {
        let dir = TempDir::new("bt");
        let mnt = dir.path().join("bpf");
        {
            let _fs = Bpffs::mount(&mnt);
            let mounts = fs::read_to_string("/proc/self/mounts").unwrap();
            assert!(
                mounts.lines().any(|l| l.contains(mnt.to_str().unwrap()) && l.contains(" bpf ")),
                "{mounts}"
            );
        }
        let mounts = fs::read_to_string("/proc/self/mounts").unwrap();
        assert!(!mounts.contains(mnt.to_str().unwrap()), "unmounted on drop");
    }
}
