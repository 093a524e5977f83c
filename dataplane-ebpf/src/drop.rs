//! Drops (S11): every packet the dataplane refuses is counted in `VERSE_DROPS` by reason and
//! hook, packets and bytes (per CPU; the controller sums), reported as an event
//! ([`events::dropped`], rate-limited) and shot.
use aya_ebpf::{bindings::TC_ACT_SHOT, programs::TcContext};
use dataplane_common::{drop_slot, DropReason, Hook};

use crate::{events, maps::VERSE_DROPS};

#[inline(always)]
pub fn drop(ctx: &TcContext, hook: Hook, reason: DropReason) -> i32 {
    count(ctx, hook, reason);
    events::dropped::<false>(ctx, hook, reason);
    TC_ACT_SHOT as i32
}

/// [`drop`] as a call of its own, for `from_endpoint`: the walk's many ways to a drop then
/// hand the reason over in a register (an argument); inlined, the reason was a value live
/// across the counter's lookup, which the walk keeps in a stack slot, so every check on the
/// established path first stored its reason there, in case it failed.
#[inline(never)]
pub fn drop_call(ctx: &TcContext, hook: Hook, reason: DropReason) -> i32 {
    drop(ctx, hook, reason)
}

/// [`drop`] in the IPv6 programs: the event describes the frame as IPv6 (see `events`).
#[inline(always)]
pub fn drop6(ctx: &TcContext, hook: Hook, reason: DropReason) -> i32 {
    count(ctx, hook, reason);
    events::dropped::<true>(ctx, hook, reason);
    TC_ACT_SHOT as i32
}

/// [`drop6`] as a call of its own, for the programs whose walk and the calls it makes fill most
/// of the 512 bytes of stack (`from_endpoint6`, `from_underlay6`): the event is built in this
/// frame, not in the walk's. Called for a refused packet only: an admitted one returns its
/// action without a call (a call on every packet, with its frame and its return, cost the
/// established path a few nanoseconds).
#[inline(never)]
pub fn drop6_call(ctx: &TcContext, hook: Hook, reason: DropReason) -> i32 {
    drop6(ctx, hook, reason)
}

/// Counts a refused packet without deciding its fate: a too-big packet is refused but answered
/// (`FragNeeded`), so its program returns a redirect.
#[inline(always)]
pub fn count(ctx: &TcContext, hook: Hook, reason: DropReason) {
    if let Some(counter) = VERSE_DROPS.get_ptr_mut(drop_slot(reason, hook)) {
        // SAFETY: a per-CPU slot of this program's own array: no other writer runs on this CPU
        // while we hold it (BPF programs are not preempted by each other on one CPU in TC).
        unsafe {
            (*counter).packets += 1;
            (*counter).bytes += u64::from(ctx.len());
        }
    }
}
