//! The label selectors in use, found from the labels they select: both the
//! checks (does each used selector still match some identity?) and the
//! compile (which rules may select this relabelled identity?) ask which
//! selectors a label set satisfies, and a policy may use thousands of them.

use std::collections::{BTreeMap, HashMap, HashSet};

use super::Name;

/// A label set as the engine keeps it: (key, value) pairs sorted by key,
/// names shared. A pod's handful of labels is one small allocation, where
/// a `BTreeMap` of strings takes a node of over 500 bytes and a string for
/// each key and value.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub(crate) struct Labels(Box<[(Name, Name)]>);

impl Labels {
    /// From pairs sorted by key, keys distinct.
    pub(crate) fn from_sorted(pairs: Vec<(Name, Name)>) -> Self {
        Self(pairs.into_boxed_slice())
    }

    pub(crate) fn iter(&self) -> std::slice::Iter<'_, (Name, Name)> {
        self.0.iter()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub(crate) fn get(&self, key: &str) -> Option<&Name> {
        self.0.binary_search_by(|(k, _)| (**k).cmp(key)).ok().map(|at| &self.0[at].1)
    }

    /// The parsed model's form.
    pub(crate) fn to_map(&self) -> BTreeMap<String, String> {
        self.0.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }
}

impl<'a> IntoIterator for &'a Labels {
    type Item = &'a (Name, Name);
    type IntoIter = std::slice::Iter<'a, (Name, Name)>;

    fn into_iter(self) -> Self::IntoIter {
        self.iter()
    }
}

/// Whether `labels` carries every label `wanted` names.
pub(crate) fn labels_match(wanted: &Labels, labels: &Labels) -> bool {
    wanted.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// Selectors filed under each of their (key, value) pairs; the empty
/// selector, which every label set satisfies, apart.
#[derive(Debug, Default)]
pub(crate) struct LabelSelectors {
    by_pair: HashMap<(Name, Name), HashSet<Labels>>,
    empty: Option<Labels>,
}

impl LabelSelectors {
    /// Files `wanted` (again: a no-op).
    pub(crate) fn insert(&mut self, wanted: &Labels) {
        if wanted.is_empty() {
            self.empty = Some(Labels::default());
        }
        for (key, value) in wanted {
            self.by_pair.entry((key.clone(), value.clone())).or_default().insert(wanted.clone());
        }
    }

    /// Takes `wanted` out, once it is no longer used.
    pub(crate) fn remove(&mut self, wanted: &Labels) {
        if wanted.is_empty() {
            self.empty = None;
        }
        for (key, value) in wanted {
            let pair = (key.clone(), value.clone());
            if let Some(set) = self.by_pair.get_mut(&pair) {
                set.remove(wanted);
                if set.is_empty() {
                    self.by_pair.remove(&pair);
                }
            }
        }
    }

    /// The filed selectors that `labels` satisfies.
    pub(crate) fn satisfied_by(&self, labels: &Labels) -> HashSet<&Labels> {
        let mut found: HashSet<&Labels> = self.empty.iter().collect();
        for (key, value) in labels {
            if let Some(selectors) = self.by_pair.get(&(key.clone(), value.clone())) {
                found.extend(selectors.iter().filter(|wanted| labels_match(wanted, labels)));
            }
        }
        found
    }
}
