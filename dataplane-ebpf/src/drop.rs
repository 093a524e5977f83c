//! Drops (S11): every packet the dataplane refuses is counted by reason in `VERSE_DROPS`
//! (per CPU; the controller sums) and shot.
use aya_ebpf::bindings::TC_ACT_SHOT;
use dataplane_common::DropReason;

use crate::maps::VERSE_DROPS;

#[inline(always)]
pub fn drop(reason: DropReason) -> i32 {
    count(reason);
    TC_ACT_SHOT as i32
}

/// Counts a refused packet without deciding its fate: a too-big packet is refused but answered
/// (`FragNeeded`), so its program returns a redirect.
#[inline(always)]
pub fn count(reason: DropReason) {
    if let Some(counter) = VERSE_DROPS.get_ptr_mut(reason as u32) {
        // SAFETY: a per-CPU slot of this program's own array: no other writer runs on this CPU
        // while we hold it (BPF programs are not preempted by each other on one CPU in TC).
        unsafe { *counter += 1 };
    }
}
