//! A sorted set that stores its first elements inline: most sets the
//! engine keeps (the rules selecting an atom or naming an identity, the
//! atoms of an owner, the entries of an atom) hold one or two, and a heap
//! allocation for each of 100,000 of them is most of what such indexes cost.

/// Up to `N` elements inline (a set of numbers holds two in 16 bytes, a
/// set of prefixes one in 24), more on the heap.
#[derive(Debug, Clone)]
pub(crate) enum SmallSet<T, const N: usize = 2> {
    /// The first `len` places, sorted.
    Inline { len: u8, items: [T; N] },
    /// More than `N`, sorted. Boxed: a thin pointer keeps the enum as small
    /// as its inline places, and sets are values in maps of 100,000
    /// entries; the rare large set pays an indirection.
    #[allow(clippy::box_collection, reason = "a thin pointer, for the enum's size; see above")]
    Many(Box<Vec<T>>),
}

impl<T: Copy + Default, const N: usize> Default for SmallSet<T, N> {
    fn default() -> Self {
        Self::Inline { len: 0, items: [T::default(); N] }
    }
}

impl<T: Ord + Copy + Default, const N: usize> SmallSet<T, N> {
    /// From sorted, distinct elements.
    pub(crate) fn from_sorted(mut items: Vec<T>) -> Self {
        if items.len() <= N {
            let mut set = Self::default();
            if let Self::Inline { len, items: inline } = &mut set {
                inline[..items.len()].copy_from_slice(&items);
                *len = u8::try_from(items.len()).unwrap_or(u8::MAX);
            }
            return set;
        }
        items.shrink_to_fit();
        Self::Many(Box::new(items))
    }

    pub(crate) fn as_slice(&self) -> &[T] {
        match self {
            Self::Inline { len, items } => &items[..usize::from(*len)],
            Self::Many(many) => many,
        }
    }

    pub(crate) fn iter(&self) -> std::slice::Iter<'_, T> {
        self.as_slice().iter()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.as_slice().is_empty()
    }

    pub(crate) fn contains(&self, item: &T) -> bool {
        self.as_slice().binary_search(item).is_ok()
    }

    /// Adds `item`; false if it was there.
    pub(crate) fn insert(&mut self, item: T) -> bool {
        let Err(at) = self.as_slice().binary_search(&item) else { return false };
        match self {
            Self::Inline { len, items } if usize::from(*len) < N => {
                let used = usize::from(*len);
                items.copy_within(at..used, at + 1);
                items[at] = item;
                *len += 1;
            }
            Self::Inline { items, .. } => {
                let mut many = Vec::with_capacity(N + 1);
                many.extend_from_slice(&items[..at]);
                many.push(item);
                many.extend_from_slice(&items[at..]);
                *self = Self::Many(Box::new(many));
            }
            Self::Many(many) => many.insert(at, item),
        }
        true
    }

    /// Takes `item` out; false if it was not there.
    pub(crate) fn remove(&mut self, item: &T) -> bool {
        let Ok(at) = self.as_slice().binary_search(item) else { return false };
        match self {
            Self::Inline { len, items } => {
                let used = usize::from(*len);
                items.copy_within(at + 1..used, at);
                *len -= 1;
            }
            Self::Many(many) => {
                many.remove(at);
                if many.len() <= N {
                    *self = Self::from_sorted(std::mem::take(&mut **many));
                }
            }
        }
        true
    }
}

impl<'a, T: Ord + Copy + Default, const N: usize> IntoIterator for &'a SmallSet<T, N> {
    type Item = &'a T;
    type IntoIter = std::slice::Iter<'a, T>;

    fn into_iter(self) -> Self::IntoIter {
        self.iter()
    }
}

/// One end of a rule: its sources or its destinations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum End {
    From = 0,
    To = 1,
}

/// Numbers at both ends in one sorted set: the atoms a rule selects as
/// sources and as destinations, or the rules selecting an atom as one or
/// the other. Each is kept shifted left, its end in the low bit, so one
/// at each end (a rule of one identity to another, an identity one rule
/// lets out and another in) is two numbers inline in 16 bytes, where a set
/// for each end took 32 (3.4 MB at 100,000 rules).
///
/// The numbers are atom and rule numbers, handed out lowest first and one
/// for each atom or rule in force: they stay far below 2^31, which would
/// take billions of prefixes or rules in memory.
#[derive(Debug, Clone, Default)]
pub(crate) struct BothEnds(SmallSet<u32>);

impl BothEnds {
    fn tag(number: u32, end: End) -> u32 {
        debug_assert!(number < 1 << 31, "number {number} too large to tag");
        (number << 1) | end as u32
    }

    /// From the numbers at each end, each list sorted.
    pub(crate) fn from_ends(from: &[u32], to: &[u32]) -> Self {
        let mut tagged: Vec<u32> = from.iter().map(|&n| Self::tag(n, End::From)).collect();
        tagged.extend(to.iter().map(|&n| Self::tag(n, End::To)));
        tagged.sort_unstable();
        Self(SmallSet::from_sorted(tagged))
    }

    /// The numbers at `end`, in order.
    pub(crate) fn at(&self, end: End) -> impl Iterator<Item = u32> + '_ {
        let bit = end as u32;
        self.0.iter().filter(move |&&tagged| tagged & 1 == bit).map(|&tagged| tagged >> 1)
    }

    /// The numbers at `end`, in order, collected.
    pub(crate) fn list(&self, end: End) -> Vec<u32> {
        self.at(end).collect()
    }

    pub(crate) fn contains(&self, number: u32, end: End) -> bool {
        self.0.contains(&Self::tag(number, end))
    }

    pub(crate) fn insert(&mut self, number: u32, end: End) -> bool {
        self.0.insert(Self::tag(number, end))
    }

    pub(crate) fn remove(&mut self, number: u32, end: End) -> bool {
        self.0.remove(&Self::tag(number, end))
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::{BothEnds, End, SmallSet};

    #[test]
    fn both_ends_keep_their_numbers_apart() {
        let mut ends = BothEnds::from_ends(&[3, 9], &[3, 4]);
        assert_eq!(ends.list(End::From), [3, 9]);
        assert_eq!(ends.list(End::To), [3, 4]);
        assert!(ends.contains(9, End::From) && !ends.contains(9, End::To));
        assert!(ends.remove(3, End::From) && !ends.remove(3, End::From));
        assert!(ends.insert(7, End::To) && !ends.insert(7, End::To));
        assert_eq!(ends.list(End::From), [9]);
        assert_eq!(ends.list(End::To), [3, 4, 7]);
        ends.remove(9, End::From);
        for n in [3, 4, 7] {
            ends.remove(n, End::To);
        }
        assert!(ends.is_empty());
        let largest = (1 << 31) - 1;
        let ends = BothEnds::from_ends(&[largest], &[0]);
        assert_eq!((ends.list(End::From), ends.list(End::To)), (vec![largest], vec![0]));
        assert_eq!(size_of::<BothEnds>(), 16);
    }

    #[test]
    fn behaves_like_a_sorted_set() {
        let mut set: SmallSet<u32> = SmallSet::default();
        let mut model = std::collections::BTreeSet::new();
        let mut x: u32 = 7;
        for _ in 0..2000 {
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12_345);
            let item = (x >> 16) % 6;
            if (x >> 8).is_multiple_of(3) {
                assert_eq!(set.remove(&item), model.remove(&item));
            } else {
                assert_eq!(set.insert(item), model.insert(item));
            }
            assert_eq!(set.as_slice(), model.iter().copied().collect::<Vec<_>>().as_slice());
            assert_eq!(set.is_empty(), model.is_empty());
            assert!(matches!(set, SmallSet::Many(ref m) if m.len() > 2) || set.as_slice().len() <= 2);
        }
    }

    #[test]
    fn one_inline_place_behaves_alike() {
        let mut set: SmallSet<u16, 1> = SmallSet::default();
        let mut model = std::collections::BTreeSet::new();
        let mut x: u32 = 11;
        for _ in 0..2000 {
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12_345);
            let item = u16::try_from((x >> 16) % 4).unwrap_or_default();
            if (x >> 8).is_multiple_of(2) {
                assert_eq!(set.remove(&item), model.remove(&item));
            } else {
                assert_eq!(set.insert(item), model.insert(item));
            }
            assert_eq!(set.as_slice(), model.iter().copied().collect::<Vec<_>>().as_slice());
            assert!(matches!(set, SmallSet::Many(ref m) if m.len() > 1) || set.as_slice().len() <= 1);
        }
    }

    #[test]
    fn sets_stay_small() {
        assert_eq!(size_of::<SmallSet<u32>>(), 16);
        assert_eq!(size_of::<SmallSet<ipnet::IpNet, 1>>(), 24);
    }
}

/// A fast hash for the engine's maps keyed by numbers it gives out itself
/// (atom and rule numbers, identity pairs, prefixes): the multiply-rotate
/// hash rustc uses. Maps keyed by names from the policy keep std's keyed
/// hash, so crafted names cannot flood them.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct NumberHasher(u64);

impl NumberHasher {
    fn add(&mut self, word: u64) {
        self.0 = (self.0.rotate_left(5) ^ word).wrapping_mul(0x517c_c1b7_2722_0a95);
    }
}

impl std::hash::Hasher for NumberHasher {
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for chunk in &mut chunks {
            self.add(u64::from_le_bytes(chunk.try_into().unwrap_or_default()));
        }
        let mut last = [0u8; 8];
        let rest = chunks.remainder();
        last[..rest.len()].copy_from_slice(rest);
        self.add(u64::from_le_bytes(last));
    }

    fn write_u8(&mut self, n: u8) {
        self.add(u64::from(n));
    }

    fn write_u16(&mut self, n: u16) {
        self.add(u64::from(n));
    }

    fn write_u32(&mut self, n: u32) {
        self.add(u64::from(n));
    }

    fn write_u64(&mut self, n: u64) {
        self.add(n);
    }

    fn write_usize(&mut self, n: usize) {
        self.add(n as u64);
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

/// A map keyed by engine-given numbers.
pub(crate) type NumberMap<K, V> = std::collections::HashMap<K, V, std::hash::BuildHasherDefault<NumberHasher>>;

/// A map keyed by numbers the engine hands out lowest first (rule and
/// atom numbers): a vector indexed by number. At 100,000 keys it holds
/// the values alone, where a hash map adds a key and a control byte to
/// each and keeps an eighth of its buckets empty.
#[derive(Debug)]
pub(crate) struct DenseMap<V> {
    slots: Vec<Option<V>>,
    len: usize,
}

impl<V> Default for DenseMap<V> {
    fn default() -> Self {
        Self { slots: Vec::new(), len: 0 }
    }
}

#[allow(clippy::trivially_copy_pass_by_ref, reason = "called as the hash maps it replaced are")]
impl<V> DenseMap<V> {
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    pub(crate) fn get(&self, key: &u32) -> Option<&V> {
        self.slots.get(*key as usize).and_then(Option::as_ref)
    }

    pub(crate) fn get_mut(&mut self, key: &u32) -> Option<&mut V> {
        self.slots.get_mut(*key as usize).and_then(Option::as_mut)
    }

    pub(crate) fn contains_key(&self, key: &u32) -> bool {
        self.get(key).is_some()
    }

    pub(crate) fn insert(&mut self, key: u32, value: V) -> Option<V> {
        let at = key as usize;
        if at >= self.slots.len() {
            if at >= self.slots.capacity() {
                // By an eighth, not double: a doubled vector of 100,000
                // numbers is a third empty.
                let room = (at + 1).max(self.slots.capacity() + self.slots.capacity() / 8);
                self.slots.reserve_exact(room - self.slots.len());
            }
            self.slots.resize_with(at + 1, || None);
        }
        let old = self.slots[at].replace(value);
        if old.is_none() {
            self.len += 1;
        }
        old
    }

    pub(crate) fn remove(&mut self, key: &u32) -> Option<V> {
        let old = self.slots.get_mut(*key as usize).and_then(Option::take);
        if old.is_some() {
            self.len -= 1;
            // Numbers come back lowest first: trailing free slots stay free.
            while self.slots.last().is_some_and(Option::is_none) {
                self.slots.pop();
            }
        }
        old
    }

    /// The value of `key`, inserted as the default when absent.
    pub(crate) fn get_or_default(&mut self, key: u32) -> &mut V
    where
        V: Default,
    {
        if !self.contains_key(&key) {
            self.insert(key, V::default());
        }
        self.get_mut(&key).expect("inserted above")
    }

    /// Entries in number order.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (u32, &V)> + '_ {
        #[allow(clippy::cast_possible_truncation, reason = "keys are u32, so every index is one")]
        self.slots.iter().enumerate().filter_map(|(at, slot)| slot.as_ref().map(|value| (at as u32, value)))
    }
}
