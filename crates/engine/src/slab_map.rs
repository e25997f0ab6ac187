//! `SlabMap`: the sharded concurrent map behind the session ledger, built so
//! that its resident memory is the entries themselves plus a small index at
//! every size, whatever the allocator does.
//!
//! Each shard (a std `RwLock` on cache lines of its own, picked from the
//! hash's high bits) owns a
//! `hashbrown::HashTable<u32>` of slot numbers (five bytes a bucket, so the
//! table's doubling slack costs at most ~12 bytes an entry) and a slab of
//! `(key, value)` slots in fixed-capacity chunks, each allocated once and
//! never reallocated (no doubling slack, no copy of the entries on growth),
//! plus a list of vacated slots that inserts reuse first. Capacity follows
//! the high-water mark: chunks are not given back when entries go.
//! Keys are hashed once per operation with a per-process random seed
//! (`foldhash::fast::RandomState`): the keys are client-chosen.
//!
//! Lock discipline: every method takes at most one shard lock at a time and
//! releases it before returning. While a lock is held the map runs only its
//! own bookkeeping, the key's `Hash`/`Eq`, the value's `Drop`, and the
//! closure the caller passed to that very call; that closure (and those
//! impls) must not call back into the same map, or it may deadlock on its
//! own shard. A closure that panics leaves the map consistent (the lock's
//! poison is ignored). No `unsafe`, nothing async.

use std::fmt;
use std::hash::{BuildHasher, Hash};
use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

use crossbeam_utils::CachePadded;
use foldhash::fast::RandomState;
use hashbrown::hash_table::Entry;
use hashbrown::HashTable;

/// Slots per slab chunk. Large enough that the outer vector of chunks stays
/// small, small enough that a shard's last, partly used chunk is noise.
const CHUNK_SLOTS: usize = 1024;

/// What one slab slot stores: `size_of::<Slot<K, V>>()` is the real cost of
/// an entry, before the index.
pub(crate) type Slot<K, V> = Option<(K, V)>;

pub(crate) struct SlabMap<K, V> {
    /// Padded: a shard is ~100 bytes, so unpadded neighbours share a cache
    /// line and two data threads working on sessions in different shards
    /// still wrote the same line with every lock and unlock.
    shards: Box<[PaddedShard<K, V>]>,
    /// `64 - log2(shards.len())`: the shard is taken from the bits just
    /// below hashbrown's 7-bit tag, so shard choice and in-shard bucket
    /// choice use different bits of the same hash.
    shard_shift: u32,
    hasher: RandomState,
    /// Kept in step under the shard locks so `len` never walks the shards.
    len: AtomicUsize,
}

/// A shard's lock on cache lines of its own (see `SlabMap::shards`).
type PaddedShard<K, V> = CachePadded<RwLock<Shard<K, V>>>;

struct Shard<K, V> {
    index: HashTable<u32>,
    slab: Slab<K, V>,
}

struct Slab<K, V> {
    chunks: Vec<Vec<Slot<K, V>>>,
    vacant: Vec<u32>,
}

impl<K, V> Slab<K, V> {
    const fn new() -> Slab<K, V> {
        Slab {
            chunks: Vec::new(),
            vacant: Vec::new(),
        }
    }

    fn get(&self, slot: u32) -> Option<&(K, V)> {
        let slot = slot as usize;
        self.chunks
            .get(slot / CHUNK_SLOTS)?
            .get(slot % CHUNK_SLOTS)?
            .as_ref()
    }

    fn get_mut(&mut self, slot: u32) -> Option<&mut (K, V)> {
        let slot = slot as usize;
        self.chunks
            .get_mut(slot / CHUNK_SLOTS)?
            .get_mut(slot % CHUNK_SLOTS)?
            .as_mut()
    }

    /// The entry the index points at. The index only ever holds occupied
    /// slots, so a miss here is a bug in this module.
    fn occupied_mut(&mut self, slot: u32) -> &mut (K, V) {
        match self.get_mut(slot) {
            Some(pair) => pair,
            None => panic!("slab_map: the index points at vacant slot {slot}"),
        }
    }

    fn insert(&mut self, pair: (K, V)) -> u32 {
        if let Some(slot) = self.vacant.pop() {
            let cell = self
                .chunks
                .get_mut(slot as usize / CHUNK_SLOTS)
                .and_then(|chunk| chunk.get_mut(slot as usize % CHUNK_SLOTS));
            match cell {
                Some(cell) => *cell = Some(pair),
                None => panic!("slab_map: vacant slot {slot} is outside the slab"),
            }
            return slot;
        }
        if self
            .chunks
            .last()
            .is_none_or(|chunk| chunk.len() == CHUNK_SLOTS)
        {
            // Allocated once at full size; pushes below never exceed it, so
            // the chunk is never reallocated.
            self.chunks.push(Vec::with_capacity(CHUNK_SLOTS));
        }
        let full_chunks = self.chunks.len() - 1;
        let chunk = &mut self.chunks[full_chunks];
        let slot = full_chunks * CHUNK_SLOTS + chunk.len();
        chunk.push(Some(pair));
        // 4 billion slots in one shard would be terabytes of entries.
        u32::try_from(slot).expect("slab_map: more than u32::MAX slots in one shard")
    }

    fn take(&mut self, slot: u32) -> Option<(K, V)> {
        let slot_number = slot as usize;
        let pair = self
            .chunks
            .get_mut(slot_number / CHUNK_SLOTS)?
            .get_mut(slot_number % CHUNK_SLOTS)?
            .take()?;
        self.vacant.push(slot);
        Some(pair)
    }

    #[cfg(test)]
    fn slots(&self) -> usize {
        self.chunks.iter().map(Vec::len).sum()
    }

    fn iter(&self) -> impl Iterator<Item = &(K, V)> {
        self.chunks.iter().flatten().flatten()
    }
}

impl<K: Hash + Eq, V> Shard<K, V> {
    fn find(&self, hash: u64, key: &K) -> Option<&(K, V)> {
        let slab = &self.slab;
        let slot = self
            .index
            .find(hash, |&slot| slab.get(slot).is_some_and(|(k, _)| k == key))?;
        slab.get(*slot)
    }

    fn find_mut(&mut self, hash: u64, key: &K) -> Option<&mut (K, V)> {
        let slab = &self.slab;
        let slot = *self
            .index
            .find(hash, |&slot| slab.get(slot).is_some_and(|(k, _)| k == key))?;
        self.slab.get_mut(slot)
    }
}

// Not used by the crate, but `clippy::new_without_default` asks for it next
// to a public argument-less `new`.
impl<K: Hash + Eq, V> Default for SlabMap<K, V> {
    fn default() -> Self {
        SlabMap::new()
    }
}

impl<K, V> fmt::Debug for SlabMap<K, V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SlabMap")
            .field("len", &self.len.load(Ordering::Relaxed))
            .field("shards", &self.shards.len())
            .finish_non_exhaustive()
    }
}

impl<K: Hash + Eq, V> SlabMap<K, V> {
    /// Four shards per core, rounded up to a power of two (as `DashMap`).
    pub(crate) fn new() -> SlabMap<K, V> {
        let cores = std::thread::available_parallelism().map_or(1, NonZeroUsize::get);
        SlabMap::with_shards(cores.saturating_mul(4))
    }

    /// `shards` is rounded up to a power of two (at least 1).
    fn with_shards(shards: usize) -> SlabMap<K, V> {
        let shards = shards.clamp(1, 1 << 16).next_power_of_two();
        SlabMap {
            shards: (0..shards)
                .map(|_| {
                    CachePadded::new(RwLock::new(Shard {
                        index: HashTable::new(),
                        slab: Slab::new(),
                    }))
                })
                .collect(),
            shard_shift: 64 - shards.trailing_zeros(),
            hasher: RandomState::default(),
            len: AtomicUsize::new(0),
        }
    }

    /// Entries now; exact when no call is in progress.
    pub(crate) fn len(&self) -> usize {
        self.len.load(Ordering::Relaxed)
    }

    #[cfg(test)]
    pub(crate) fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Slab slots in use or vacant (the high-water mark of entries): tests
    /// check that churn reuses slots instead of growing the slab.
    #[cfg(test)]
    fn slots(&self) -> usize {
        self.shards
            .iter()
            .map(|shard| read(shard).slab.slots())
            .sum()
    }

    fn shard_of(&self, hash: u64) -> &RwLock<Shard<K, V>> {
        // One shard: the shift is 64 and `checked_shr` gives shard 0.
        let shard = (hash << 7).checked_shr(self.shard_shift).unwrap_or(0);
        &self.shards[shard as usize & (self.shards.len() - 1)]
    }

    #[cfg(test)]
    pub(crate) fn contains_key(&self, key: &K) -> bool {
        let hash = self.hasher.hash_one(key);
        read(self.shard_of(hash)).find(hash, key).is_some()
    }

    /// Runs `f` on the value under a read lock.
    pub(crate) fn with<R>(&self, key: &K, f: impl FnOnce(&V) -> R) -> Option<R> {
        let hash = self.hasher.hash_one(key);
        let shard = read(self.shard_of(hash));
        shard.find(hash, key).map(|(_, value)| f(value))
    }

    /// Runs `f` on the value under a write lock.
    pub(crate) fn with_mut<R>(&self, key: &K, f: impl FnOnce(&mut V) -> R) -> Option<R> {
        self.try_with_mut(key, f).ok()
    }

    /// As `with_mut`, but hands `f` back when the key is absent, so the
    /// caller can still use it (say, to insert after making room).
    pub(crate) fn try_with_mut<R, F: FnOnce(&mut V) -> R>(&self, key: &K, f: F) -> Result<R, F> {
        let hash = self.hasher.hash_one(key);
        let mut shard = write(self.shard_of(hash));
        match shard.find_mut(hash, key) {
            Some((_, value)) => Ok(f(value)),
            None => Err(f),
        }
    }

    /// Runs `f` on the value, first inserting `make()` if the key is absent;
    /// one lookup either way.
    pub(crate) fn with_or_insert<R>(
        &self,
        key: K,
        make: impl FnOnce() -> V,
        f: impl FnOnce(&mut V) -> R,
    ) -> R {
        let hash = self.hasher.hash_one(&key);
        let mut shard = write(self.shard_of(hash));
        let Shard { index, slab } = &mut *shard;
        let hasher = &self.hasher;
        let entry = index.entry(
            hash,
            |&slot| slab.get(slot).is_some_and(|(k, _)| *k == key),
            // Only for growth: rehashing a slot rehashes its key.
            |&slot| slab.get(slot).map_or(0, |(k, _)| hasher.hash_one(k)),
        );
        match entry {
            Entry::Occupied(entry) => {
                let slot = *entry.get();
                f(&mut slab.occupied_mut(slot).1)
            }
            Entry::Vacant(entry) => {
                // `make` runs before anything changes, so if it panics
                // nothing was inserted.
                let value = make();
                let slot = slab.insert((key, value));
                entry.insert(slot);
                self.len.fetch_add(1, Ordering::Relaxed);
                f(&mut slab.occupied_mut(slot).1)
            }
        }
    }

    #[cfg(test)]
    fn remove(&self, key: &K) -> Option<(K, V)> {
        self.remove_if(key, |_, _| true)
    }

    /// Removes the entry if `remove(key, value)`, run under the write
    /// lock, says so (lets a caller re-check a choice made earlier, or
    /// update something that must change together with the removal).
    pub(crate) fn remove_if(
        &self,
        key: &K,
        remove: impl FnOnce(&K, &mut V) -> bool,
    ) -> Option<(K, V)> {
        let hash = self.hasher.hash_one(key);
        let mut shard = write(self.shard_of(hash));
        let Shard { index, slab } = &mut *shard;
        let found = index
            .find_entry(hash, |&slot| slab.get(slot).is_some_and(|(k, _)| k == key))
            .ok()?;
        let slot = *found.get();
        let (k, v) = slab.occupied_mut(slot);
        if !remove(k, v) {
            return None;
        }
        found.remove();
        let pair = slab.take(slot);
        self.len.fetch_sub(1, Ordering::Relaxed);
        pair
    }

    /// Keeps the entries for which `keep` is true, one shard (write lock) at
    /// a time. Removed values are dropped under the lock.
    pub(crate) fn retain(&self, mut keep: impl FnMut(&K, &mut V) -> bool) {
        for shard in self.shards.iter() {
            let mut shard = write(shard);
            let Shard { index, slab } = &mut *shard;
            let mut removed = 0;
            index.retain(|&mut slot| {
                let (k, v) = slab.occupied_mut(slot);
                if keep(k, v) {
                    return true;
                }
                slab.take(slot);
                removed += 1;
                false
            });
            self.len.fetch_sub(removed, Ordering::Relaxed);
        }
    }

    /// Visits every entry, one shard (read lock) at a time, in no
    /// particular order.
    pub(crate) fn for_each(&self, mut visit: impl FnMut(&K, &V)) {
        for shard in self.shards.iter() {
            let shard = read(shard);
            for (key, value) in shard.slab.iter() {
                visit(key, value);
            }
        }
    }

    /// Every key, copied out (no lock held once this returns).
    pub(crate) fn keys(&self) -> Vec<K>
    where
        K: Clone,
    {
        let mut keys = Vec::with_capacity(self.len());
        self.for_each(|key, _| keys.push(key.clone()));
        keys
    }
}

// A panic in a caller's closure poisons the lock but leaves the shard
// consistent (every change is made before or after the closure runs, never
// across it), so the poison is ignored.
fn read<T>(lock: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(PoisonError::into_inner)
}

fn write<T>(lock: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;
    use std::sync::Arc;

    fn contents(map: &SlabMap<u32, u64>) -> HashMap<u32, u64> {
        let mut seen = HashMap::new();
        map.for_each(|key, value| {
            assert!(seen.insert(*key, *value).is_none(), "key {key} twice");
        });
        seen
    }

    #[test]
    fn insert_update_read_remove() {
        for shards in [1, 2, 64] {
            let map: SlabMap<u32, u64> = SlabMap::with_shards(shards);
            assert!(map.is_empty());
            let mut made = 0;
            for key in 0..5_000 {
                map.with_or_insert(
                    key,
                    || {
                        made += 1;
                        u64::from(key)
                    },
                    |value| *value += 1,
                );
            }
            assert_eq!(made, 5_000);
            assert_eq!(map.len(), 5_000);
            // Present: `make` is not called again, `f` sees the old value.
            let seen = map.with_or_insert(7, || panic!("7 exists"), |value| *value);
            assert_eq!(seen, 8);
            assert_eq!(map.with(&4_999, |value| *value), Some(5_000));
            assert_eq!(
                map.with_mut(&10, |value| std::mem::replace(value, 0)),
                Some(11)
            );
            assert_eq!(map.with(&10, |value| *value), Some(0));
            assert!(map.contains_key(&0));
            assert!(!map.contains_key(&5_000));
            assert_eq!(map.with_mut(&5_000, |_| ()), None);
            assert_eq!(map.remove(&3), Some((3, 4)));
            assert_eq!(map.remove(&3), None);
            assert!(!map.contains_key(&3));
            assert_eq!(map.len(), 4_999);
            let mut keys = map.keys();
            keys.sort_unstable();
            assert_eq!(keys.len(), 4_999);
            assert_eq!(keys[..4], [0, 1, 2, 4]);
        }
    }

    #[test]
    fn try_with_mut_hands_the_closure_back_when_absent() {
        let map: SlabMap<u32, u64> = SlabMap::with_shards(4);
        let add = |value: &mut u64| *value += 5;
        let Err(add) = map.try_with_mut(&1, add) else {
            panic!("key 1 is absent");
        };
        map.with_or_insert(1, || 1, add);
        assert_eq!(map.with(&1, |value| *value), Some(6));
        assert_eq!(map.try_with_mut(&1, |value| *value).ok(), Some(6));
    }

    #[test]
    fn remove_if_removes_only_when_told() {
        let map: SlabMap<u32, u64> = SlabMap::with_shards(2);
        map.with_or_insert(1, || 10, |_| ());
        assert_eq!(map.remove_if(&1, |_, value| *value > 10), None);
        assert_eq!(map.len(), 1);
        assert_eq!(map.remove_if(&1, |_, value| *value == 10), Some((1, 10)));
        assert!(map.is_empty());
        assert_eq!(map.remove_if(&1, |_, _| true), None);
    }

    #[test]
    fn vacated_slots_are_reused_so_churn_does_not_grow_the_slab() {
        let map: SlabMap<u32, u64> = SlabMap::with_shards(8);
        for key in 0..3_000 {
            map.with_or_insert(key, || 0, |_| ());
        }
        let high_water = map.slots();
        assert_eq!(high_water, 3_000);
        // The same keys go and come back many times (each to its own shard):
        // every return lands in a vacated slot.
        for _ in 0..20 {
            for key in 0..3_000 {
                map.remove(&key).expect("present");
                map.with_or_insert(key, || 1, |_| ());
            }
        }
        assert_eq!(map.len(), 3_000);
        assert_eq!(map.slots(), high_water, "the slab grew under churn");
        // New keys replacing removed ones, in one shard: no growth either.
        let single: SlabMap<u32, u64> = SlabMap::with_shards(1);
        for key in 0..2_500 {
            single.with_or_insert(key, || 0, |_| ());
        }
        single.retain(|key, _| key % 2 == 0);
        for key in 2_500..3_750 {
            single.with_or_insert(key, || 0, |_| ());
        }
        assert_eq!(single.len(), 2_500);
        assert_eq!(single.slots(), 2_500);
    }

    #[test]
    fn no_two_shards_share_a_cache_line() {
        let map: SlabMap<u32, u64> = SlabMap::with_shards(8);
        // 128: a cache line and the line the adjacent-line prefetcher pairs
        // with it.
        for pair in map.shards.windows(2) {
            let first = std::ptr::from_ref(&*pair[0]) as usize;
            let second = std::ptr::from_ref(&*pair[1]) as usize;
            assert!(
                second - first >= 128,
                "shards {} bytes apart",
                second - first
            );
            assert_eq!(first % 128, 0, "a shard starts on a line boundary");
        }
    }

    #[test]
    fn chunks_are_allocated_once_at_full_capacity() {
        let map: SlabMap<u32, u64> = SlabMap::with_shards(1);
        for key in 0..(CHUNK_SLOTS as u32 * 3 + 5) {
            map.with_or_insert(key, || 0, |_| ());
        }
        let shard = read(&map.shards[0]);
        assert_eq!(shard.slab.chunks.len(), 4);
        for chunk in &shard.slab.chunks {
            assert_eq!(chunk.capacity(), CHUNK_SLOTS);
        }
    }

    #[test]
    fn a_panicking_closure_leaves_the_map_usable() {
        let map: SlabMap<u32, u64> = SlabMap::with_shards(1);
        map.with_or_insert(1, || 1, |_| ());
        let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            map.with_mut(&1, |_| panic!("closure failed"));
        }));
        assert!(caught.is_err());
        let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            map.with_or_insert(2, || panic!("make failed"), |_| ());
        }));
        assert!(caught.is_err());
        assert_eq!(map.len(), 1);
        assert!(!map.contains_key(&2));
        assert_eq!(map.with(&1, |value| *value), Some(1));
        map.with_or_insert(2, || 2, |_| ());
        assert_eq!(contents(&map), HashMap::from([(1, 1), (2, 2)]));
    }

    #[test]
    fn concurrent_updates_are_not_lost() {
        let map: Arc<SlabMap<u32, u64>> = Arc::new(SlabMap::with_shards(4));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let map = Arc::clone(&map);
                std::thread::spawn(move || {
                    for round in 0..5_000u32 {
                        map.with_or_insert(round % 1_000, || 0, |value| *value += 1);
                    }
                })
            })
            .collect();
        for thread in threads {
            thread.join().expect("worker");
        }
        assert_eq!(map.len(), 1_000);
        let counts = contents(&map);
        assert!(counts.values().all(|count| *count == 20), "{counts:?}");
    }

    #[derive(Debug, Clone)]
    enum Op {
        Upsert(u32, u64),
        Update(u32, u64),
        Remove(u32),
        RemoveIfEven(u32),
        RetainNotMultipleOf(u32),
        Read(u32),
    }

    fn op() -> impl Strategy<Value = Op> {
        // Few keys, so operations keep hitting the same entries and slots.
        let key = 0u32..200;
        prop_oneof![
            4 => (key.clone(), any::<u64>()).prop_map(|(k, v)| Op::Upsert(k, v)),
            2 => (key.clone(), 1u64..100).prop_map(|(k, d)| Op::Update(k, d)),
            3 => key.clone().prop_map(Op::Remove),
            1 => key.clone().prop_map(Op::RemoveIfEven),
            1 => (2u32..7).prop_map(Op::RetainNotMultipleOf),
            2 => key.prop_map(Op::Read),
        ]
    }

    proptest! {
        #[test]
        fn behaves_like_a_hash_map(
            shards in prop_oneof![Just(1usize), Just(2), Just(16)],
            ops in proptest::collection::vec(op(), 1..400),
        ) {
            let map: SlabMap<u32, u64> = SlabMap::with_shards(shards);
            let mut model: HashMap<u32, u64> = HashMap::new();
            let mut high_water = 0;
            for op in ops {
                match op {
                    Op::Upsert(key, value) => {
                        let old = map.with_or_insert(key, || value, |v| std::mem::replace(v, value));
                        let expected = model.insert(key, value).unwrap_or(value);
                        prop_assert_eq!(old, expected);
                    }
                    Op::Update(key, delta) => {
                        let got = map.with_mut(&key, |v| { *v = v.wrapping_add(delta); *v });
                        let expected = model.get_mut(&key).map(|v| { *v = v.wrapping_add(delta); *v });
                        prop_assert_eq!(got, expected);
                    }
                    Op::Remove(key) => {
                        prop_assert_eq!(map.remove(&key), model.remove(&key).map(|v| (key, v)));
                    }
                    Op::RemoveIfEven(key) => {
                        let expected = match model.get(&key) {
                            Some(v) if v % 2 == 0 => model.remove(&key).map(|v| (key, v)),
                            _ => None,
                        };
                        prop_assert_eq!(map.remove_if(&key, |_, v| *v % 2 == 0), expected);
                    }
                    Op::RetainNotMultipleOf(m) => {
                        map.retain(|k, v| { *v = v.wrapping_add(1); k % m != 0 });
                        model.retain(|k, v| { *v = v.wrapping_add(1); k % m != 0 });
                    }
                    Op::Read(key) => {
                        prop_assert_eq!(map.with(&key, |v| *v), model.get(&key).copied());
                        prop_assert_eq!(map.contains_key(&key), model.contains_key(&key));
                    }
                }
                prop_assert_eq!(map.len(), model.len());
                high_water = high_water.max(model.len());
            }
            prop_assert_eq!(contents(&map), model.clone());
            let mut keys = map.keys();
            keys.sort_unstable();
            let mut expected: Vec<u32> = model.keys().copied().collect();
            expected.sort_unstable();
            prop_assert_eq!(keys, expected);
            if shards == 1 {
                // Vacated slots are reused: the slab never exceeds the most
                // entries ever held at once.
                prop_assert!(map.slots() <= high_water);
            }
        }
    }
}
