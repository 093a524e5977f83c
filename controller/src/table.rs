//! [`Table`]: one map of the desired state, persistent and journaled.
//!
//! Contract: a `Table` reads like a `BTreeMap` (sorted by key) and is cheap to clone: the
//! entries live in an [`imbl::OrdMap`] of `Arc`s, so a clone shares everything and a change
//! copies only the path to the entry it touches, plus that entry. Every change (`insert`,
//! `remove`, `get_mut`, `retain`) is journaled with the value the key had before the first
//! change since the journal was last taken ([`Table::take_changes`]): an edit of the desired
//! state costs what it changes, and the store learns which keys to write from the journal,
//! never by comparing two whole states. Equality compares the entries, never the journal.

use std::borrow::Borrow;
use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use imbl::OrdMap;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// What a key held before the changes of the journal (`None`: it did not exist).
pub type Before<V> = Option<Arc<V>>;

#[derive(Clone)]
pub struct Table<K: Ord + Clone, V> {
    map: OrdMap<K, Arc<V>>,
    /// For the store: taken once per edit.
    changes: BTreeMap<K, Before<V>>,
    /// For the state's indices (`crate::index`): taken whenever they catch up.
    pending: BTreeMap<K, Before<V>>,
}

impl<K: Ord + Clone, V> Default for Table<K, V> {
    fn default() -> Self {
        Table { map: OrdMap::new(), changes: BTreeMap::new(), pending: BTreeMap::new() }
    }
}

impl<K: Ord + Clone, V: Clone> Table<K, V> {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    pub fn get<Q>(&self, key: &Q) -> Option<&V>
    where
        K: Borrow<Q>,
        Q: Ord + ?Sized,
    {
        self.map.get(key).map(|v| &**v)
    }

    /// The entry as the table shares it (cheap to keep past the table).
    pub fn get_shared<Q>(&self, key: &Q) -> Option<&Arc<V>>
    where
        K: Borrow<Q>,
        Q: Ord + ?Sized,
    {
        self.map.get(key)
    }

    pub fn contains_key<Q>(&self, key: &Q) -> bool
    where
        K: Borrow<Q>,
        Q: Ord + ?Sized,
    {
        self.map.contains_key(key)
    }

    pub fn iter(&self) -> impl DoubleEndedIterator<Item = (&K, &V)> + '_ {
        self.map.iter().map(|(k, v)| (k, &**v))
    }

    pub fn keys(&self) -> impl DoubleEndedIterator<Item = &K> + '_ {
        self.map.keys()
    }

    pub fn values(&self) -> impl DoubleEndedIterator<Item = &V> + '_ {
        self.map.values().map(|v| &**v)
    }

    /// The entries whose keys are in `range`, in order.
    pub fn range<R, Q>(&self, range: R) -> impl DoubleEndedIterator<Item = (&K, &V)> + '_
    where
        R: std::ops::RangeBounds<Q>,
        K: Borrow<Q>,
        Q: Ord + ?Sized,
    {
        self.map.range(range).map(|(k, v)| (k, &**v))
    }

    fn journal(&mut self, key: &K) {
        if !self.changes.contains_key(key) {
            let before = self.map.get(key).cloned();
            self.changes.insert(key.clone(), before);
        }
        if !self.pending.contains_key(key) {
            let before = self.map.get(key).cloned();
            self.pending.insert(key.clone(), before);
        }
    }

    /// [`Self::journal`] for a key given by a borrowed form, if the table holds it (`None`: it
    /// does not, and nothing is journaled).
    fn journal_present<Q>(&mut self, key: &Q) -> Option<()>
    where
        K: Borrow<Q>,
        Q: Ord + ?Sized,
    {
        let (k, _) = self.map.get_key_value(key)?;
        let k = k.clone();
        self.journal(&k);
        Some(())
    }

    /// Sets `key`; returns what it held.
    pub fn insert(&mut self, key: K, value: V) -> Option<Arc<V>> {
        self.journal(&key);
        self.map.insert(key, Arc::new(value))
    }

    /// Sets `key` to a value shared with another table (no copy).
    pub fn insert_shared(&mut self, key: K, value: Arc<V>) -> Option<Arc<V>> {
        self.journal(&key);
        self.map.insert(key, value)
    }

    /// Removes `key`; returns what it held.
    pub fn remove<Q>(&mut self, key: &Q) -> Option<V>
    where
        K: Borrow<Q>,
        Q: Ord + ?Sized,
    {
        self.journal_present(key)?;
        self.map.remove(key).map(Arc::unwrap_or_clone)
    }

    /// The value of `key` to change in place (copied first if another table shares it).
    pub fn get_mut<Q>(&mut self, key: &Q) -> Option<&mut V>
    where
        K: Borrow<Q>,
        Q: Ord + ?Sized,
    {
        self.journal_present(key)?;
        self.map.get_mut(key).map(Arc::make_mut)
    }

    /// Keeps only the entries for which `keep` is true.
    pub fn retain(&mut self, mut keep: impl FnMut(&K, &V) -> bool) {
        let gone: Vec<K> =
            self.map.iter().filter(|(k, v)| !keep(k, v)).map(|(k, _)| k.clone()).collect();
        for k in gone {
            self.remove(&k);
        }
    }

    /// Removes every entry.
    pub fn clear(&mut self) {
        self.retain(|_, _| false);
    }

    /// Changes every value in place (each journaled: for small tables and tests).
    pub fn update_all(&mut self, mut change: impl FnMut(&K, &mut V)) {
        let keys: Vec<K> = self.map.keys().cloned().collect();
        for k in keys {
            self.journal(&k);
            if let Some(v) = self.map.get_mut(&k) {
                change(&k, Arc::make_mut(v));
            }
        }
    }

    /// Whether anything was changed since the journal was last taken.
    pub fn is_changed(&self) -> bool {
        !self.changes.is_empty()
    }

    /// The keys changed since the journal was last taken, with what they held before.
    pub fn changes(&self) -> &BTreeMap<K, Before<V>> {
        &self.changes
    }

    /// Takes the journal (leaving it empty).
    pub fn take_changes(&mut self) -> BTreeMap<K, Before<V>> {
        std::mem::take(&mut self.changes)
    }

    /// Forgets the journal.
    pub fn clear_changes(&mut self) {
        self.changes.clear();
    }

    /// Whether some change has not been seen by the indices yet.
    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    /// Takes the changes not yet seen by the indices of the state (a journal of its own, so
    /// that the indices and the store each see every change once).
    pub fn take_pending(&mut self) -> BTreeMap<K, Before<V>> {
        std::mem::take(&mut self.pending)
    }
}

impl<K: Ord + Clone, V: Clone> FromIterator<(K, V)> for Table<K, V> {
    fn from_iter<I: IntoIterator<Item = (K, V)>>(iter: I) -> Self {
        Table {
            map: iter.into_iter().map(|(k, v)| (k, Arc::new(v))).collect(),
            changes: BTreeMap::new(),
            pending: BTreeMap::new(),
        }
    }
}

impl<K: Ord + Clone, V: Clone + PartialEq> PartialEq for Table<K, V> {
    fn eq(&self, other: &Self) -> bool {
        self.map.len() == other.map.len()
            && self
                .map
                .iter()
                .zip(other.map.iter())
                .all(|((ka, va), (kb, vb))| ka == kb && (Arc::ptr_eq(va, vb) || va == vb))
    }
}

impl<K: Ord + Clone, V: Clone + Eq> Eq for Table<K, V> {}

impl<K: Ord + Clone + fmt::Debug, V: Clone + fmt::Debug> fmt::Debug for Table<K, V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

impl<Q, K, V> std::ops::Index<&Q> for Table<K, V>
where
    K: Ord + Clone + Borrow<Q>,
    Q: Ord + ?Sized,
    V: Clone,
{
    type Output = V;
    fn index(&self, key: &Q) -> &V {
        self.get(key).expect("no entry found for key")
    }
}

impl<'a, K: Ord + Clone, V: Clone> IntoIterator for &'a Table<K, V> {
    type Item = (&'a K, &'a V);
    type IntoIter = Box<dyn Iterator<Item = (&'a K, &'a V)> + 'a>;
    fn into_iter(self) -> Self::IntoIter {
        Box::new(self.iter())
    }
}

impl<K: Ord + Clone + Serialize, V: Clone + Serialize> Serialize for Table<K, V> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_map(self.iter())
    }
}

impl<'de, K, V> Deserialize<'de> for Table<K, V>
where
    K: Ord + Clone + Deserialize<'de>,
    V: Clone + Deserialize<'de>,
{
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let map = BTreeMap::<K, V>::deserialize(d)?;
        Ok(map.into_iter().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_clone_shares_entries_and_changes_are_journaled_with_what_was_before() {
        let mut a: Table<String, Vec<u32>> =
            (0..100).map(|i| (format!("k{i:03}"), vec![i])).collect();
        let b = a.clone();
        a.get_mut("k007").unwrap().push(70);
        a.insert("new".into(), vec![1]);
        a.remove("k008");
        a.retain(|k, _| k != "k009");
        // The clone is untouched, and shares every entry the edit did not change.
        assert_eq!(b["k007"], vec![7]);
        assert!(Arc::ptr_eq(a.get_shared("k010").unwrap(), b.get_shared("k010").unwrap()));
        let changes = a.take_changes();
        let keys: Vec<&str> = changes.keys().map(String::as_str).collect();
        assert_eq!(keys, ["k007", "k008", "k009", "new"]);
        assert_eq!(changes["k007"].as_deref(), Some(&vec![7]), "the value before the edit");
        assert_eq!(changes["new"], None);
        assert!(!a.is_changed());
        // A second change of a key keeps the first value before.
        a.insert("x".into(), vec![1]);
        a.insert("x".into(), vec![2]);
        assert_eq!(a.take_changes()["x"], None);
        assert_ne!(a, b);
        let mut c = b.clone();
        c.insert("k000".into(), vec![0]);
        assert_eq!(c, b, "equal entries, whatever the journal");
        let json = serde_json::to_string(&b).unwrap();
        assert_eq!(serde_json::from_str::<Table<String, Vec<u32>>>(&json).unwrap(), b);
    }
}
