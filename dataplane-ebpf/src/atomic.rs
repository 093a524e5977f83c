//! Atomic read-modify-write on map values: the conntrack budget counters (S14), and the flow
//! counters of a conntrack entry (the claim of a direction, and the adds of other CPUs).
//!
//! Why inline assembly: `bpfel-unknown-none` declares no atomic read-modify-write (no
//! `target_has_atomic`), so `core::sync::atomic` offers loads and stores only. The instructions
//! exist (`BPF_ATOMIC`: `lock ... +=` since the first eBPF, with `BPF_FETCH` since Linux 5.12)
//! and the verifier accepts them on map values. `asm_experimental_arch` is enabled for this
//! crate alone by `controller/build.rs`.
//!
//! The crate is also type-checked for the host (`cargo build --workspace` builds every member);
//! there the same functions use the host's atomics, and are never run.

/// Adds `v` to `*p` and returns the value `*p` held before, atomically with respect to every
/// CPU and to the controller, which maps the same memory (`BPF_ATOMIC | BPF_ADD | BPF_FETCH`).
///
/// # Safety
/// `p` must point into a map value that stays valid for the call (any map value does, for the
/// whole program run), aligned to 8 bytes.
#[cfg(target_arch = "bpf")]
#[inline(always)]
pub unsafe fn fetch_add(p: *mut u64, v: u64) -> u64 {
    let mut r = v;
    // SAFETY: the caller guarantees `p`; the instruction reads and writes those 8 bytes only.
    unsafe {
        core::arch::asm!(
            "{r} = atomic_fetch_add((u64 *)({p} + 0), {r})",
            p = in(reg) p,
            r = inout(reg) r,
            options(nostack),
        )
    };
    r
}

/// Adds `v` (two's complement: `u64::MAX` subtracts one) to `*p` atomically, without fetching
/// the old value (`BPF_ATOMIC | BPF_ADD`).
///
/// # Safety
/// As for [`fetch_add`].
#[cfg(target_arch = "bpf")]
#[inline(always)]
pub unsafe fn add(p: *mut u64, v: u64) {
    // SAFETY: as in `fetch_add`.
    unsafe {
        core::arch::asm!(
            "lock *(u64 *)({p} + 0) += {v}",
            p = in(reg) p,
            v = in(reg) v,
            options(nostack),
        )
    };
}

/// Compares `*p` with `old` and, if equal, stores `new`, atomically (`BPF_ATOMIC | BPF_CMPXCHG`);
/// returns the value `*p` held before either way.
///
/// # Safety
/// As for [`fetch_add`].
#[cfg(target_arch = "bpf")]
#[inline(always)]
pub unsafe fn cmpxchg(p: *mut u64, old: u64, new: u64) -> u64 {
    let mut r0 = old;
    // SAFETY: as in `fetch_add`; the instruction compares with and answers in r0.
    unsafe {
        core::arch::asm!(
            "r0 = cmpxchg_64({p} + 0, r0, {new})",
            p = in(reg) p,
            new = in(reg) new,
            inout("r0") r0,
            options(nostack),
        )
    };
    r0
}

/// The host build's [`fetch_add`] (type-checking only; the dataplane runs as BPF).
///
/// # Safety
/// As for the BPF build's.
#[cfg(not(target_arch = "bpf"))]
#[inline(always)]
pub unsafe fn fetch_add(p: *mut u64, v: u64) -> u64 {
    // SAFETY: the caller guarantees `p` valid and 8-byte aligned, as AtomicU64 needs.
    unsafe { core::sync::atomic::AtomicU64::from_ptr(p) }
        .fetch_add(v, core::sync::atomic::Ordering::SeqCst)
}

/// The host build's [`add`] (type-checking only).
///
/// # Safety
/// As for the BPF build's.
#[cfg(not(target_arch = "bpf"))]
#[inline(always)]
pub unsafe fn add(p: *mut u64, v: u64) {
    // SAFETY: as in `fetch_add`.
    unsafe { fetch_add(p, v) };
}

/// The host build's [`cmpxchg`] (type-checking only).
///
/// # Safety
/// As for the BPF build's.
#[cfg(not(target_arch = "bpf"))]
#[inline(always)]
pub unsafe fn cmpxchg(p: *mut u64, old: u64, new: u64) -> u64 {
    use core::sync::atomic::Ordering::SeqCst;
    // SAFETY: as in `fetch_add`.
    match unsafe { core::sync::atomic::AtomicU64::from_ptr(p) }
        .compare_exchange(old, new, SeqCst, SeqCst)
    {
        Ok(v) | Err(v) => v,
    }
}
