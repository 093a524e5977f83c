//! Raw `bpf(2)` for the benchmarks' own programs, each two instructions (return a constant), not
//! worth an object file: the rate tier's packet generator (`XDP_TX` in live-frames test runs)
//! and its `XDP_PASS`/`XDP_DROP` receivers, and the tcp tier's trivial TC and XDP programs that
//! show what a hook costs a TCP stream by itself.
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use anyhow::{Context, Result};

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_TEST_RUN: libc::c_long = 10;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_PROG_TYPE_SCHED_CLS: u32 = 3;
const BPF_PROG_TYPE_XDP: u32 = 6;
const BPF_XDP: u32 = 37;
const BPF_TCX_INGRESS: u32 = 46;
const BPF_F_TEST_XDP_LIVE_FRAMES: u32 = 1 << 1;
pub const XDP_DROP: i32 = 1;
pub const XDP_PASS: i32 = 2;
pub const XDP_TX: i32 = 3;
pub const TC_ACT_OK: i32 = 0;

/// `union bpf_attr` for `BPF_PROG_LOAD` (the prefix we use; the rest must be zero).
#[repr(C)]
#[derive(Default)]
struct ProgLoad {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    rest: [u64; 16],
}

/// `union bpf_attr` for `BPF_PROG_TEST_RUN`.
#[repr(C)]
#[derive(Default)]
struct TestRun {
    prog_fd: u32,
    retval: u32,
    data_size_in: u32,
    data_size_out: u32,
    data_in: u64,
    data_out: u64,
    repeat: u32,
    duration: u32,
    ctx_size_in: u32,
    ctx_size_out: u32,
    ctx_in: u64,
    ctx_out: u64,
    flags: u32,
    cpu: u32,
    batch_size: u32,
    _pad: u32,
    rest: [u64; 8],
}

/// `union bpf_attr` for `BPF_LINK_CREATE`.
#[repr(C)]
#[derive(Default)]
struct LinkCreate {
    prog_fd: u32,
    target_ifindex: u32,
    attach_type: u32,
    flags: u32,
    rest: [u64; 8],
}

fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<i64> {
    // SAFETY: `attr` is a valid, initialised `#[repr(C)]` prefix of `union bpf_attr` with
    // every unused byte zero, and its size is passed along; the kernel reads (and for
    // TEST_RUN writes) only within that size.
    let r = unsafe {
        libc::syscall(libc::SYS_bpf, cmd, attr as *mut T, std::mem::size_of::<T>() as u32)
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(r)
}

/// Loads an XDP program that returns `action` and does nothing else.
pub fn xdp_return(action: i32, name: &str) -> Result<OwnedFd> {
    load_return(BPF_PROG_TYPE_XDP, action, name)
        .with_context(|| format!("BPF_PROG_LOAD of the XDP program {name}"))
}

/// Loads a TC classifier that returns `action` and does nothing else (with `TC_ACT_OK`, the
/// same as the dataplane's `empty` program).
pub fn tc_return(action: i32, name: &str) -> Result<OwnedFd> {
    load_return(BPF_PROG_TYPE_SCHED_CLS, action, name)
        .with_context(|| format!("BPF_PROG_LOAD of the TC program {name}"))
}

/// Loads a program of `prog_type` made of `mov64 r0, action; exit`.
fn load_return(prog_type: u32, action: i32, name: &str) -> io::Result<OwnedFd> {
    let mut mov = [0u8; 8];
    mov[0] = 0xb7;
    mov[4..8].copy_from_slice(&action.to_le_bytes());
    let insns = [u64::from_le_bytes(mov), 0x95];
    let license = b"GPL\0";
    let mut attr = ProgLoad {
        prog_type,
        insn_cnt: insns.len() as u32,
        insns: insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
        ..Default::default()
    };
    for (d, s) in attr.prog_name.iter_mut().zip(name.bytes().take(15)) {
        *d = s;
    }
    let fd = bpf(BPF_PROG_LOAD, &mut attr)?;
    // SAFETY: the kernel just returned this descriptor to us; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Attaches `prog` as the XDP program of `ifindex` (in the caller's network namespace)
/// through a BPF link: closing the returned descriptor detaches it.
pub fn attach_xdp(prog: &OwnedFd, ifindex: u32) -> Result<OwnedFd> {
    link_create(prog, ifindex, BPF_XDP)
        .with_context(|| format!("BPF_LINK_CREATE (XDP) on ifindex {ifindex}"))
}

/// Attaches `prog` at TCX ingress of `ifindex` (in the caller's network namespace), where the
/// dataplane's programs run, through a BPF link: closing the returned descriptor detaches it.
pub fn attach_tcx_ingress(prog: &OwnedFd, ifindex: u32) -> Result<OwnedFd> {
    link_create(prog, ifindex, BPF_TCX_INGRESS)
        .with_context(|| format!("BPF_LINK_CREATE (TCX ingress) on ifindex {ifindex}"))
}

fn link_create(prog: &OwnedFd, ifindex: u32, attach_type: u32) -> io::Result<OwnedFd> {
    let mut attr = LinkCreate {
        prog_fd: prog.as_raw_fd() as u32,
        target_ifindex: ifindex,
        attach_type,
        ..Default::default()
    };
    let fd = bpf(BPF_LINK_CREATE, &mut attr)?;
    // SAFETY: the kernel just returned this descriptor to us; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Sends `frame` `repeat` times out of `ifindex` (in the caller's network namespace) through
/// the live-frames test run of `prog` (an `XDP_TX` program).
pub fn live_frames(prog: &OwnedFd, frame: &[u8], ifindex: u32, repeat: u32) -> Result<()> {
    // struct xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index,
    // egress_ifindex.
    let ctx: [u32; 6] = [0, frame.len() as u32, 0, ifindex, 0, 0];
    let mut attr = TestRun {
        prog_fd: prog.as_raw_fd() as u32,
        data_size_in: frame.len() as u32,
        data_in: frame.as_ptr() as u64,
        repeat,
        ctx_size_in: std::mem::size_of_val(&ctx) as u32,
        ctx_in: ctx.as_ptr() as u64,
        flags: BPF_F_TEST_XDP_LIVE_FRAMES,
        ..Default::default()
    };
    bpf(BPF_PROG_TEST_RUN, &mut attr)
        .with_context(|| format!("BPF_PROG_TEST_RUN (XDP live frames) out of ifindex {ifindex}"))?;
    Ok(())
}
