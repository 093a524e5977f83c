//! Following only what one host needs ([`EtcdOptions::scope`]), and judging, from the changes a
//! store that follows everything has seen, which revisions such a host has realized.
//!
//! Contract:
//! - A store with a scope (host H) follows four kinds of key ranges, each on a watcher of its
//!   own, all on one watch stream (watch ids it assigns): `hosts/` (the fleet's hosts: peers and
//!   their underlay addresses), `tokens/` (the API tokens, so that H can check the caller of
//!   its `/metrics`), `placement/H/` (H's claims, each naming its endpoint's universe) and
//!   `u/U/` for each universe U a claim names (everything of U). etcd orders events within a
//!   watcher only, so each range keeps its own progress: the etcd revision up to which the
//!   state holds every change of that range ([`State::followed`]).
//! - A universe is held whole or not at all (fail closed): when a batch of `placement/H/` names
//!   a universe not held yet, `u/U/` and `universes/U` are read in one transaction (one revision
//!   C) and watched from C + 1, before the batch counts as applied and before anything is
//!   published; when no claim names it any more, or its `version` key is deleted (the universe
//!   is), its objects leave the state and its watcher is cancelled. A read that fails ends the
//!   watch, which resumes from each range's own progress (or reads everything again after a
//!   compaction) with the placement not applied yet.
//! - Nothing else reaches H: an edit of a universe with no endpoint on H sends H nothing, and H
//!   keeps nothing of it.
//! - Acknowledgement (S13): H reports its ranges' progress with its realized revision
//!   ([`Realized::followed`]). A store that follows everything records which ranges each revision
//!   changed ([`Touches`]) and judges H's revision ([`Judge`]): the newest revision up to which
//!   no range H must hold (its ranges, and the universes that store's state places on H) changed
//!   past H's progress on it. A universe H does not hold cannot be behind there: an edit of it is
//!   realized on H trivially. Changes from before that store last read the whole state are not
//!   known one by one; for them a universe's `version` key (rewritten by every edit of it),
//!   `slots/H` (by every placement on H) and the hosts' records stand in: a placement removed or
//!   a host record deleted before that read is not seen.

use std::cell::Cell;
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};

use super::*;
use crate::store::layout::{Placement, HOSTS, PLACEMENT, TOKENS, U, UNIVERSES};

/// How many (revision, range) changes a store keeps to judge hosts by.
const TOUCHES_KEPT: usize = 100_000;

/// What a store with a scope follows (in its [`Cache`]).
pub(super) struct Scope {
    pub(super) host: String,
    /// `placement/<host>/<netns>` (relative) -> the universe of its endpoint.
    placed: BTreeMap<String, String>,
    /// Key range -> the etcd revision up to which the state holds every change of it.
    follows: BTreeMap<String, i64>,
}

impl Scope {
    fn placement(&self) -> String {
        format!("{PLACEMENT}{}/", self.host)
    }

    fn followed_universes(&self) -> BTreeSet<String> {
        self.follows
            .keys()
            .filter_map(|r| r.strip_prefix(U)?.strip_suffix('/'))
            .map(str::to_owned)
            .collect()
    }
}

/// The range of a relative key, as hosts with a scope follow them: `hosts/`,
/// `placement/<host>/`, `u/<universe>/`; `None` for the others.
fn range_of(rel: &str) -> Option<String> {
    if rel.starts_with(HOSTS) {
        return Some(HOSTS.to_owned());
    }
    if let Some(rest) = rel.strip_prefix(PLACEMENT) {
        return Some(format!("{PLACEMENT}{}/", rest.split_once('/')?.0));
    }
    let rest = rel.strip_prefix(U)?;
    Some(layout::universe_prefix(rest.split_once('/')?.0))
}

/// Which ranges each revision changed, as a store's watch applied them: the last
/// [`TOUCHES_KEPT`].
#[derive(Default)]
pub(super) struct Touches {
    /// The first revision recorded one by one: changes before it are not known.
    floor: i64,
    by_range: HashMap<String, BTreeSet<i64>>,
    order: VecDeque<(i64, String)>,
    /// The hosts judged from these changes, kept between publications ([`Judgements`]).
    pub(super) judged: Judgements,
}

impl Touches {
    /// Nothing known up to `read_at` (the revision of a whole read).
    pub(super) fn from(read_at: i64) -> Touches {
        Touches { floor: read_at.saturating_add(1), ..Touches::default() }
    }

    /// Revision `rev` changed key `rel`.
    pub(super) fn record(&mut self, rev: i64, rel: &str) {
        if let Some(host) = rel.strip_prefix(layout::SLOTS) {
            self.judged.touched(host, rev);
        }
        let Some(range) = range_of(rel) else { return };
        if self.judged.valid {
            mark(&mut self.judged.dirty_ranges, &range, rev);
        }
        if self.by_range.entry(range.clone()).or_default().insert(rev) {
            self.order.push_back((rev, range));
        }
        while self.order.len() > TOUCHES_KEPT {
            let Some((old, range)) = self.order.pop_front() else { break };
            if let Some(set) = self.by_range.get_mut(&range) {
                set.remove(&old);
                if set.is_empty() {
                    self.by_range.remove(&range);
                }
            }
            self.floor = self.floor.max(old.saturating_add(1));
        }
    }

    /// Up to which revision `range`, held up to `progress`, is current: `None` through every
    /// change seen; `last_known` is the newest change of the range before the floor that the
    /// keys tell (see the module docs).
    fn current_until(&self, range: &str, progress: i64, last_known: i64) -> Option<i64> {
        // Changes past the progress but before the floor are forgotten: the keys decide.
        if progress.saturating_add(1) < self.floor && last_known > progress {
            return Some(progress);
        }
        let next =
            self.by_range.get(range).and_then(|s| s.range(progress.saturating_add(1)..).next());
        next.map(|next| next - 1)
    }
}

/// What bounds a host's judged revision, besides the revision the store has applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Judged {
    /// A host that follows everything (or reports no progress of its own ranges): the
    /// revision it reports.
    Own(u64),
    /// A host with a scope: current up to `until` (`i64::MAX`: through every change seen);
    /// `lowest` is the lowest progress it reports of any range.
    Until { until: i64, lowest: i64 },
}

impl Judged {
    /// The revision judged, with the store applied up to `applied`.
    pub(super) fn revision(self, applied: i64) -> u64 {
        match self {
            Judged::Own(r) => r,
            Judged::Until { until, .. } => u64::try_from(until.min(applied).max(0)).unwrap_or(0),
        }
    }
}

/// Judges the revision of each host from its report (see the module docs).
pub(super) struct Judge<'a> {
    view: &'a View,
    touches: &'a Touches,
    /// How many reports this judge judged.
    made: Cell<usize>,
}

impl<'a> Judge<'a> {
    pub(super) fn new(view: &'a View, touches: &'a Touches) -> Judge<'a> {
        Judge { view, touches, made: Cell::new(0) }
    }

    /// What bounds the revision host `name` has realized ([`Judged::revision`]): its own for a
    /// host that follows everything; for one with a scope, the newest revision up to which
    /// everything it must hold is current.
    pub(super) fn judge(&self, name: &str, realized: &Realized) -> Judged {
        self.made.set(self.made.get() + 1);
        let Some(followed) = &realized.followed else { return Judged::Own(realized.revision) };
        let at = |range: &str| followed.get(range).map(|r| i64::try_from(*r).unwrap_or(i64::MAX));
        let placement = format!("{PLACEMENT}{name}/");
        let (Some(p_hosts), Some(p_placed)) = (at(HOSTS), at(&placement)) else {
            return Judged::Own(realized.revision);
        };
        let mut until = i64::MAX;
        let mut limit = |c: Option<i64>| {
            if let Some(c) = c {
                until = until.min(c);
            }
        };
        limit(self.touches.current_until(HOSTS, p_hosts, self.view.hosts_last));
        let slots = self.view.keys.get(&layout::slots_key(name)).copied().unwrap_or(0);
        limit(self.touches.current_until(&placement, p_placed, slots));
        for (range, progress) in followed.iter() {
            let Some(uni) = range.strip_prefix(U).and_then(|r| r.strip_suffix('/')) else {
                continue;
            };
            let progress = i64::try_from(*progress).unwrap_or(i64::MAX);
            let changed = self.view.changed.get(uni).copied().unwrap_or(0);
            limit(self.touches.current_until(range, progress, changed));
        }
        // A universe placed on the host that it does not hold yet: it has not applied that
        // placement.
        let state = &self.view.state;
        let ids = state.idx.host_endpoints.get(name).into_iter().flatten();
        for e in ids.filter_map(|id| state.endpoints.get(id)).filter(|e| e.host == name) {
            if !followed.contains_key(&layout::universe_prefix(&e.universe)) {
                limit(Some(p_placed));
            }
        }
        let lowest = followed.values().map(|p| i64::try_from(*p).unwrap_or(i64::MAX)).min();
        Judged::Until { until, lowest: lowest.unwrap_or(0) }
    }
}

/// Marks `key` changed at `rev` (the newest change counts).
fn mark(dirty: &mut BTreeMap<String, i64>, key: &str, rev: i64) {
    match dirty.get_mut(key) {
        Some(at) => *at = (*at).max(rev),
        None => {
            dirty.insert(key.to_owned(), rev);
        }
    }
}

/// The hosts judged, kept between publications so that an edit judges again only the hosts it
/// can change: those whose reports follow a range it changed, those whose endpoints or slots it
/// changed, and those behind the oldest change still known one by one; every host when a host
/// record or the whole state changed ([`Judgements::invalidate`]). The others' bounds stand:
/// their revision follows the applied one.
#[derive(Default)]
pub(super) struct Judgements {
    /// Whether `bounds` holds every host of the reports (false: judge them all again).
    valid: bool,
    /// Host -> what bounds its revision (hosts with a scope only; the others report their own).
    bounds: HashMap<String, (Judged, Vec<String>)>,
    /// Range -> the hosts whose reports follow it.
    followers: HashMap<String, BTreeSet<String>>,
    /// (lowest progress of any range, host).
    lowest: BTreeSet<(i64, String)>,
    /// Hosts to judge again, each once the view holds the revision that changed it: a
    /// publication between a change recorded and its view leaves it for the next.
    dirty: BTreeMap<String, i64>,
    /// Ranges changed, with the newest revision that changed each.
    dirty_ranges: BTreeMap<String, i64>,
    /// Reports judged so far (what a publication cost).
    pub(super) made: u64,
}

impl Judgements {
    /// Judge host `name` again once the view holds revision `rev` (its report, endpoints or
    /// slots changed; 0: a report).
    pub(super) fn touched(&mut self, name: &str, rev: i64) {
        if self.valid {
            mark(&mut self.dirty, name, rev);
        }
    }

    /// Judge every host again at the next publication.
    pub(super) fn invalidate(&mut self) {
        self.valid = false;
        self.dirty.clear();
        self.dirty_ranges.clear();
    }

    /// Judges again the hosts whose revision the changes since the last call can have moved
    /// (all of them if invalidated), from their reports `alive`.
    pub(super) fn update(
        touches: &mut Touches,
        view: &View,
        applied: i64,
        alive: &BTreeMap<String, (Realized, bool)>,
    ) {
        let mut me = std::mem::take(&mut touches.judged);
        let redo: BTreeSet<String> = if me.valid {
            let mut redo = BTreeSet::new();
            me.dirty.retain(|host, rev| {
                let seen = *rev <= applied;
                if seen {
                    redo.insert(host.clone());
                }
                !seen
            });
            let followers = &me.followers;
            me.dirty_ranges.retain(|range, rev| {
                let seen = *rev <= applied;
                if seen {
                    redo.extend(followers.get(range).into_iter().flatten().cloned());
                }
                !seen
            });
            let behind = me.lowest.range(..(touches.floor.saturating_sub(1), String::new()));
            redo.extend(behind.map(|(_, h)| h.clone()));
            redo
        } else {
            me.bounds.clear();
            me.followers.clear();
            me.lowest.clear();
            me.dirty.clear();
            me.dirty_ranges.clear();
            alive.keys().cloned().collect()
        };
        let judge = Judge::new(view, touches);
        for name in redo {
            if let Some((judged, ranges)) = me.bounds.remove(&name) {
                if let Judged::Until { lowest, .. } = judged {
                    me.lowest.remove(&(lowest, name.clone()));
                }
                for range in ranges {
                    if let Some(set) = me.followers.get_mut(&range) {
                        set.remove(&name);
                        if set.is_empty() {
                            me.followers.remove(&range);
                        }
                    }
                }
            }
            let Some((realized, _)) = alive.get(&name) else { continue };
            let judged = judge.judge(&name, realized);
            let Judged::Until { lowest, .. } = judged else { continue };
            let ranges: Vec<String> =
                realized.followed.iter().flat_map(|f| f.keys().cloned()).collect();
            for range in &ranges {
                me.followers.entry(range.clone()).or_default().insert(name.clone());
            }
            me.lowest.insert((lowest, name.clone()));
            me.bounds.insert(name, (judged, ranges));
        }
        me.made += judge.made.get() as u64;
        me.valid = true;
        touches.judged = me;
    }

    /// The revision host `name`, reporting `realized`, has realized (as last judged).
    pub(super) fn revision(&self, name: &str, realized: &Realized, applied: i64) -> u64 {
        match self.bounds.get(name) {
            Some((judged, _)) => judged.revision(applied),
            None => realized.revision,
        }
    }
}

/// The objects of the keys `kvs` (read at one revision), in the order their keys were created,
/// one batch per transaction, applied to `state` and their guards to `cache`.
fn apply_read(cache: &mut Cache, prefix: &str, kvs: &mut [&etcd_client::KeyValue]) {
    kvs.sort_by(|a, b| (a.create_revision(), a.key()).cmp(&(b.create_revision(), b.key())));
    let mut state = cache.state.clone();
    let mut start = 0;
    while start < kvs.len() {
        let created = kvs[start].create_revision();
        let end = kvs[start..]
            .iter()
            .position(|kv| kv.create_revision() != created)
            .map_or(kvs.len(), |n| start + n);
        let mut events = Vec::new();
        for kv in &kvs[start..end] {
            let Some(rel) = kv.key().strip_prefix(prefix.as_bytes()) else { continue };
            let Ok(rel) = std::str::from_utf8(rel) else { continue };
            cache.record(rel, Some(kv.value()), kv.mod_revision());
            if layout::is_state(rel) {
                events.push(layout::Event { key: rel, value: Some(kv.value()) });
            }
        }
        // A batch that does not decode is skipped whole, as the watch skips one (so that a
        // corrupt key does not fail every read again).
        let before = state.clone();
        if let Err(e) = layout::apply(&mut state, &events) {
            tracing::error!(
                error = %e, etcd_revision = created,
                "a change of the desired state in etcd does not decode; skipping it"
            );
            state = before;
        }
        start = end;
    }
    cache.state = state;
}

/// The store's state and revisions catch up with its ranges' progress.
fn seal(cache: &mut Cache) {
    let Some(scope) = &cache.scope else { return };
    let newest = scope.follows.values().copied().max().unwrap_or(0);
    cache.revision = cache.revision.max(newest);
    cache.state.revision = cache.state.revision.max(u64::try_from(cache.revision).unwrap_or(0));
    let followed =
        scope.follows.iter().map(|(r, at)| (r.clone(), u64::try_from(*at).unwrap_or(0))).collect();
    cache.state.followed = Some(Arc::new(followed));
    cache.state.take_touched_hosts();
    cache.state.clear_changes();
}

/// Leaves universe `uni` out of the state (its objects, its record, its guard and progress).
fn drop_universe(cache: &mut Cache, uni: &str) {
    let prefix = layout::universe_prefix(uni);
    let mut keys = layout::keys_under(&cache.state, &prefix);
    keys.push(format!("{UNIVERSES}{uni}"));
    let events: Vec<layout::Event<'_>> =
        keys.iter().map(|k| layout::Event { key: k, value: None }).collect();
    if let Err(e) = layout::apply(&mut cache.state, &events) {
        tracing::error!(universe = %uni, error = %e, "leaving a universe out of the state failed");
    }
    cache.versions.remove(uni);
    cache.changed.remove(uni);
    cache.keys.retain(|k, _| !k.starts_with(&prefix));
    if let Some(scope) = &mut cache.scope {
        scope.follows.remove(&prefix);
    }
    tracing::debug!(universe = %uni, "no endpoint of this universe here any more: no longer followed");
}

impl Shared {
    /// Reads what host `host` needs: the hosts, the tokens and its placements at one revision,
    /// then each universe they name (each at one revision of its own).
    pub(super) async fn read_scoped(&self, host: &str) -> Result<Cache> {
        let placement = format!("{PLACEMENT}{host}/");
        let prefixed = || Some(GetOptions::new().with_prefix());
        let txn = Txn::new().and_then(vec![
            TxnOp::get(self.key(HOSTS), prefixed()),
            TxnOp::get(self.key(TOKENS), prefixed()),
            TxnOp::get(self.key(&placement), prefixed()),
        ]);
        let mut kv = self.client.kv_client().max_decoding_message_size(MAX_MESSAGE);
        let resp = timed(
            "transaction (read the hosts, the tokens and this host's placements)",
            kv.txn(txn),
        )
        .await?;
        let at = resp.header().map_or(0, |h| h.revision());
        let mut cache = Cache { revision: at, ..Cache::default() };
        let mut scope = Scope {
            host: host.to_owned(),
            placed: BTreeMap::new(),
            follows: BTreeMap::from([
                (HOSTS.to_owned(), at),
                (TOKENS.to_owned(), at),
                (placement, at),
            ]),
        };
        let ops = resp.op_responses();
        let mut kvs = Vec::new();
        for op in &ops {
            let TxnOpResponse::Get(range) = op else { continue };
            for kv in range.kvs() {
                let Some(rel) = self.relative(kv.key()) else { continue };
                if rel.starts_with(PLACEMENT) {
                    // One that does not decode is skipped, as the watch skips one.
                    match placed_universe(rel, kv.value()) {
                        Ok(uni) => {
                            scope.placed.insert(rel.to_owned(), uni);
                        }
                        Err(e) => {
                            tracing::error!(error = %e, "skipping a placement that does not decode")
                        }
                    }
                } else {
                    kvs.push(kv);
                }
            }
        }
        apply_read(&mut cache, &self.prefix, &mut kvs);
        let held: BTreeSet<String> = scope.placed.values().cloned().collect();
        cache.scope = Some(scope);
        for uni in held {
            self.load_universe(&mut cache, &uni).await?;
        }
        seal(&mut cache);
        Ok(cache)
    }

    /// Reads universe `uni` whole (its keys and its record, at one revision) into `cache`, and
    /// returns that revision (its watch starts after it).
    async fn load_universe(&self, cache: &mut Cache, uni: &str) -> Result<i64> {
        let range = layout::universe_prefix(uni);
        let txn = Txn::new().and_then(vec![
            TxnOp::get(self.key(&range), Some(GetOptions::new().with_prefix())),
            TxnOp::get(self.key(&format!("{UNIVERSES}{uni}")), None),
        ]);
        let mut kv = self.client.kv_client().max_decoding_message_size(MAX_MESSAGE);
        let resp = timed("transaction (read a universe placed on this host)", kv.txn(txn)).await?;
        let at = resp.header().map_or(0, |h| h.revision());
        let ops = resp.op_responses();
        let mut kvs: Vec<&etcd_client::KeyValue> = ops
            .iter()
            .flat_map(|op| match op {
                TxnOpResponse::Get(r) => r.kvs(),
                _ => &[],
            })
            .collect();
        apply_read(cache, &self.prefix, &mut kvs);
        if let Some(scope) = &mut cache.scope {
            scope.follows.insert(range, at);
        }
        tracing::debug!(universe = %uni, etcd_revision = at, "an endpoint of this universe is placed here: following it");
        Ok(at)
    }

    /// One watch stream of the scope's ranges, each from its own progress, applied to `cache`
    /// until it ends.
    pub(super) async fn watch_scoped(&self, cache: &mut Cache, delay: &mut Duration) -> WatchEnd {
        let Some(scope) = &cache.scope else {
            return WatchEnd::failed("no scope");
        };
        let placement = scope.placement();
        let options = |from: i64, id: i64| {
            WatchOptions::new()
                .with_prefix()
                .with_start_revision(from.saturating_add(1))
                .with_watch_id(id)
        };
        let mut ids: HashMap<i64, String> = HashMap::new();
        let mut next_id = 1;
        let mut client = self.client.watch_client().max_decoding_message_size(MAX_MESSAGE);
        let mut ranges = scope.follows.iter();
        let Some((first, from)) = ranges.next() else {
            return WatchEnd::failed("nothing to follow");
        };
        let mut stream = match timed(
            "watch",
            client.watch(self.key(first), Some(options(*from, next_id))),
        )
        .await
        {
            Ok(s) => s,
            Err(e) => return WatchEnd::Failed(e),
        };
        ids.insert(next_id, first.clone());
        for (range, from) in ranges {
            next_id += 1;
            if let Err(source) = stream.watch(self.key(range), Some(options(*from, next_id))).await
            {
                return WatchEnd::Failed(Error::Etcd { op: "watch", source });
            }
            ids.insert(next_id, range.clone());
        }
        loop {
            let resp = match next_response(&mut stream).await {
                Ok(resp) => resp,
                Err(end) => return end,
            };
            if resp.canceled() {
                // A watcher this store cancelled itself ends nothing (its events are left out).
                // A creation refused (`created` and `canceled` at once: permission denied
                // answers with the id asked for, other refusals with -1) ends the watch: that
                // range would otherwise never be followed.
                let refused = resp.created();
                if refused || resp.compact_revision() > 0 || ids.contains_key(&resp.watch_id()) {
                    return WatchEnd::cancelled(&resp);
                }
                continue;
            }
            self.received.count(&resp);
            *delay = RETRY_MIN;
            if resp.events().is_empty() {
                continue;
            }
            // Events of a watcher cancelled meanwhile are left out.
            let Some(range) = ids.get(&resp.watch_id()).cloned() else { continue };
            let is_placement = range == placement;
            let Some(scope) = &cache.scope else { continue };
            let mut placed = scope.placed.clone();
            let mut progress = scope.follows.get(&range).copied().unwrap_or(0);
            let mut gone_universe = false;
            for (rev, events) in by_revision(resp.events()) {
                let mut batch = Vec::new();
                for event in events {
                    let Some((rel, value, mod_revision)) = self.change(event) else { continue };
                    if is_placement {
                        match value {
                            Some(v) => match placed_universe(rel, v) {
                                Ok(uni) => {
                                    placed.insert(rel.to_owned(), uni);
                                }
                                Err(e) => {
                                    tracing::error!(error = %e, "skipping a placement that does not decode")
                                }
                            },
                            None => {
                                placed.remove(rel);
                            }
                        }
                        continue;
                    }
                    if value.is_none() && matches!(layout::kind(rel), layout::Kind::Version(_)) {
                        // The universe is deleted (its claims here go in the same revision).
                        gone_universe = true;
                    }
                    cache.record(rel, value, mod_revision);
                    if layout::is_state(rel) {
                        batch.push(layout::Event { key: rel, value });
                    }
                }
                if let Err(e) = layout::apply(&mut cache.state, &batch) {
                    tracing::error!(
                        error = %e, etcd_revision = rev,
                        "a change of the desired state in etcd does not decode; skipping it"
                    );
                }
                progress = progress.max(rev);
            }
            // No header: etcd 3.4 sends a catching-up watcher at most 1000 revisions per
            // response, each with the header of its current revision.
            if is_placement {
                // The universes placed here now, whole, before the placements count as applied.
                let held: BTreeSet<String> = placed.values().cloned().collect();
                let followed =
                    cache.scope.as_ref().map(Scope::followed_universes).unwrap_or_default();
                for uni in held.difference(&followed) {
                    let at = match self.load_universe(cache, uni).await {
                        Ok(at) => at,
                        Err(e) => return WatchEnd::Failed(e),
                    };
                    next_id += 1;
                    let range = layout::universe_prefix(uni);
                    if let Err(source) =
                        stream.watch(self.key(&range), Some(options(at, next_id))).await
                    {
                        return WatchEnd::Failed(Error::Etcd { op: "watch", source });
                    }
                    ids.insert(next_id, range);
                }
                for uni in followed.difference(&held) {
                    drop_universe(cache, uni);
                    let range = layout::universe_prefix(uni);
                    let id = ids.iter().find(|(_, r)| **r == range).map(|(id, _)| *id);
                    if let Some(id) = id {
                        ids.remove(&id);
                        if let Err(source) = stream.cancel(id).await {
                            return WatchEnd::Failed(Error::Etcd { op: "watch", source });
                        }
                    }
                }
                if let Some(scope) = &mut cache.scope {
                    scope.placed = placed;
                }
            }
            if let Some(scope) = &mut cache.scope {
                if scope.follows.contains_key(&range) {
                    scope.follows.insert(range.clone(), progress);
                }
            }
            if gone_universe {
                if let Some(uni) = range.strip_prefix(U).and_then(|r| r.strip_suffix('/')) {
                    drop_universe(cache, uni);
                    // Its watcher goes too (etcd would keep it until the stream ends).
                    let id = ids.iter().find(|(_, r)| **r == range).map(|(id, _)| *id);
                    if let Some(id) = id {
                        ids.remove(&id);
                        if let Err(source) = stream.cancel(id).await {
                            return WatchEnd::Failed(Error::Etcd { op: "watch", source });
                        }
                    }
                }
            }
            seal(cache);
            // Judged from scratch: a store with a scope records no changes to judge by.
            self.publish(cache, true, true);
        }
    }
}

/// The universe a placement claim names.
fn placed_universe(rel: &str, value: &[u8]) -> Result<String> {
    let placement: Placement = serde_json::from_slice(value).map_err(|e| Error::Corrupt {
        key: rel.to_owned(),
        reason: format!("not a placement: {e}"),
    })?;
    Ok(placement.universe)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_fall_in_the_ranges_a_scoped_host_follows() {
        assert_eq!(range_of("hosts/h1").as_deref(), Some("hosts/"));
        assert_eq!(range_of("placement/h1/ns-a").as_deref(), Some("placement/h1/"));
        assert_eq!(range_of("u/uni-1/rules/sg-1/sgr-2").as_deref(), Some("u/uni-1/"));
        assert_eq!(range_of("u/uni-1/version").as_deref(), Some("u/uni-1/"));
        for other in ["universes/uni-1", "catalog", "ids/sg-1", "slots/h1", "counters/vnis"] {
            assert_eq!(range_of(other), None, "{other}");
        }
    }

    #[test]
    fn a_range_is_current_until_its_next_change_past_the_progress() {
        let mut t = Touches::from(10);
        t.record(12, "u/a/rules/g/r");
        t.record(12, "u/a/version");
        t.record(15, "u/b/version");
        t.record(17, "u/a/version");
        assert_eq!(t.current_until("u/a/", 11, 0), Some(11));
        assert_eq!(t.current_until("u/a/", 12, 0), Some(16));
        assert_eq!(t.current_until("u/a/", 17, 0), None);
        assert_eq!(t.current_until("u/b/", 10, 0), Some(14));
        // Before the floor: the last change the keys tell decides.
        assert_eq!(t.current_until("u/c/", 5, 4), None);
        assert_eq!(t.current_until("u/c/", 5, 8), Some(5));
    }

    /// a change forgotten (past TOUCHES_KEPT) between a host's progress and a
    /// later change still known must hold the host at its progress, not at the later change.
    #[test]
    fn a_forgotten_change_before_a_known_one_still_holds_the_host_back() {
        let mut t = Touches::from(0);
        t.record(300, "u/a/rules/g/r");
        for rev in 0..TOUCHES_KEPT as i64 {
            t.record(1_000 + rev, "u/b/version");
        }
        t.record(200_000, "u/a/version");
        assert!(t.floor > 300, "the change at 300 is forgotten");
        // The host holds u/a/ up to 100: it lacks the change at 300.
        let until = t.current_until("u/a/", 100, 200_000);
        assert!(until.is_some_and(|r| r < 300), "judged current until {until:?}");
    }

    /// The revisions `t.judged` gives every host of `alive`.
    fn revisions(t: &Touches, alive: &BTreeMap<String, (Realized, bool)>, at: i64) -> Vec<u64> {
        alive.iter().map(|(name, (r, _))| t.judged.revision(name, r, at)).collect()
    }

    /// What judging every host afresh gives (today's judgements, kept apart).
    fn afresh(
        t: &mut Touches,
        view: &View,
        alive: &BTreeMap<String, (Realized, bool)>,
        at: i64,
    ) -> Vec<u64> {
        let kept = std::mem::take(&mut t.judged);
        Judgements::update(t, view, at, alive);
        let fresh = revisions(t, alive, at);
        t.judged = kept;
        fresh
    }

    /// An edit judges again only the hosts it can move (edit cost must not grow with the
    /// fleet): none for a universe no host holds, the holders for one they hold; the others'
    /// revisions follow the applied one, exactly as judging every host afresh says.
    #[test]
    fn an_edit_judges_only_the_hosts_it_can_move() {
        const N: usize = 200;
        let mut view = View {
            state: Arc::default(),
            versions: imbl::HashMap::new(),
            catalog: 0,
            keys: imbl::HashMap::new(),
            hosts_last: 3,
            changed: imbl::HashMap::new(),
            holds: imbl::HashSet::new(),
            revision: 10,
        };
        let mut alive = BTreeMap::new();
        for i in 0..N {
            view.keys.insert(format!("hosts/h{i}"), 3);
            view.versions.insert(format!("uni-{i}"), 5);
            view.changed.insert(format!("uni-{i}"), 5);
            let followed = BTreeMap::from([
                (HOSTS.to_owned(), 10),
                (format!("placement/h{i}/"), 10),
                (format!("u/uni-{i}/"), 10),
            ]);
            let report = Realized { revision: 10, errors: Vec::new(), followed: Some(followed) };
            alive.insert(format!("h{i}"), (report, true));
        }
        let mut t = Touches::from(10);
        Judgements::update(&mut t, &view, 10, &alive);
        assert_eq!(t.judged.made, N as u64, "the first publication judges every host");
        assert!(revisions(&t, &alive, 10).iter().all(|r| *r == 10));

        // An edit of a universe no host holds (and of nothing that names a host).
        t.record(11, "u/other/rules/g/r");
        t.record(11, "u/other/version");
        t.record(11, "catalog");
        view.versions.insert("other".into(), 11);
        view.changed.insert("other".into(), 11);
        let before = t.judged.made;
        Judgements::update(&mut t, &view, 11, &alive);
        assert_eq!(t.judged.made - before, 0, "an edit that touches no host judges none");
        assert_eq!(revisions(&t, &alive, 11), afresh(&mut t, &view, &alive, 11));
        assert!(revisions(&t, &alive, 11).iter().all(|r| *r == 11));

        // An edit of uni-7 (held by h7 only): h7 lacks it.
        t.record(12, "u/uni-7/rules/g/r");
        t.record(12, "u/uni-7/version");
        view.versions.insert("uni-7".into(), 12);
        view.changed.insert("uni-7".into(), 12);
        let before = t.judged.made;
        Judgements::update(&mut t, &view, 12, &alive);
        assert_eq!(t.judged.made - before, 1, "only uni-7's holder is judged again");
        let now = revisions(&t, &alive, 12);
        assert_eq!(now, afresh(&mut t, &view, &alive, 12));
        assert_eq!(now[alive.keys().position(|h| h == "h7").unwrap()], 11);

        // Recorded, but not in the view yet (a publication from the liveness watch in
        // between): judged once the view holds it.
        t.record(13, "u/uni-3/version");
        let before = t.judged.made;
        Judgements::update(&mut t, &view, 12, &alive);
        assert_eq!(t.judged.made - before, 0);
        view.versions.insert("uni-3".into(), 13);
        view.changed.insert("uni-3".into(), 13);
        Judgements::update(&mut t, &view, 13, &alive);
        assert_eq!(t.judged.made - before, 1);
        assert_eq!(revisions(&t, &alive, 13), afresh(&mut t, &view, &alive, 13));

        // h7 reports uni-7 realized: only its report is judged.
        if let Some(f) = alive.get_mut("h7").and_then(|(r, _)| r.followed.as_mut()) {
            f.insert("u/uni-7/".into(), 12);
        }
        t.judged.touched("h7", 0);
        t.record(14, "slots/h9");
        view.keys.insert("slots/h9".into(), 14);
        let before = t.judged.made;
        Judgements::update(&mut t, &view, 14, &alive);
        assert_eq!(t.judged.made - before, 2, "h7's report, h9's slots");
        let now = revisions(&t, &alive, 14);
        assert_eq!(now, afresh(&mut t, &view, &alive, 14));
        assert_eq!(now[alive.keys().position(|h| h == "h7").unwrap()], 14, "h7 caught up");

        // A host record: every host.
        t.judged.invalidate();
        let before = t.judged.made;
        Judgements::update(&mut t, &view, 14, &alive);
        assert_eq!(t.judged.made - before, N as u64);
    }
}
