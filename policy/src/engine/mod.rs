//! The incremental policy engine: the policy's state kept between changes,
//! so a change costs what it changes, not what the policy holds.
//!
//! Every source (a policy file, an API push, the Kubernetes watcher) owns a
//! *source*: a named set of identities and rules. A [`SourceChange`] replaces
//! one source's contents; the engine re-parses only that source, validates
//! only what the change touches, and yields the [`EntryDiff`] that turns the
//! maps of the policy before into the maps of the policy after. A refused
//! change leaves the engine exactly as it was.
//!
//! What a full compile ([`crate::compile`]) computes from scratch, the
//! engine keeps and updates locally:
//!
//! - **Validation** (`check.rs`): each problem a full validation would
//!   report (reserved or duplicate names, overlapping addresses) is a
//!   counter kept in step with every declaration added or removed. A change
//!   is valid when all counters are zero; only a refused change pays for the
//!   full validator, for its exact messages. Peers that select no identity
//!   (a name not declared, labels no identity carries) are counted too, but
//!   they are valid: they select nothing until the identity appears, which
//!   then takes the rule's entries like any identity added.
//! - **The address partition** (`partition.rs`): prefixes map to atoms; a
//!   change re-derives just the prefixes it adds, removes or gives another
//!   role, and the prefixes nested in them.
//! - **Rule selections**: each active rule keeps the atoms its `from` and
//!   `to` select; a rule is re-selected only when it changed, when an atom
//!   it may select appeared or vanished, or when an identity it may select by
//!   labels was relabelled.
//! - **Identity pairs**: a pair's entries are resolved again only when the
//!   set of rules claiming it changed (a rule's selection grew or shrank by
//!   the pair, or a claiming rule changed).
//! - **Storage** (`stored.rs`): each source's identities and rules are kept
//!   compact, not as parsed (positions as numbers, names of identities and
//!   labels shared); an identity name is numbered once (`check::OwnerId`),
//!   and the partition and the indexes refer to owners by that number. At
//!   100,000 identities and rules the engine holds about 59 MB.
//!
//! Kubernetes `NetworkPolicy` rules speak for one end of a connection
//! (`Side::Ingress`, `Side::Egress`): the atoms a rule of a side selects at
//! its own end are isolated for that direction (under `default`
//! enforcement; under `always` every atom is), and a pair's entries are
//! resolved from the claims that count given which of its ends are open
//! (`compile::Ends`). An atom whose isolation changes, or a pod whose named
//! ports change, has its pairs resolved again; pod selectors are indexed
//! by one `matchLabels` pair, so a pod that appears or is relabelled is
//! checked only against the rules that may select it.
//!
//! Ids are stable: atoms keep their numbers and rules their `rule_index`
//! while they exist; a freed number is given out again only by a later
//! change, never in the change that freed it (see the daemon's map writer
//! for why that is enough for the kernel).
//!
//! A property test (`tests/engine.rs`) checks, over random sequences of
//! changes, that the engine's entries equal a full compile of the same
//! policy entry for entry (modulo numbering), and that it accepts exactly
//! what full validation accepts.

mod check;
mod labels;
mod name;
mod partition;
mod small;
pub(crate) mod stored;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::SystemTime;

use enforcer_common::{
    IDENTITY_FIRST_DYNAMIC, IDENTITY_FLAG_AUDIT, IDENTITY_HOST, IDENTITY_WORLD, IdentityId, IdentityValue,
    POLICY_KEY_IDENTITY_BITS, POLICY_KEY_MAX_PREFIX, PolicyKeyData, PolicyValue,
};
use ipnet::IpNet;

use crate::compile::{
    Claim, Ends, PolicyEntry, isolation_flags, named_port_ranges, pair_entries, rule_ranges, unreachable_from_world,
};
use crate::error::{Diagnostic, PolicyError};
use crate::kubernetes::Namespace;
use crate::model::{Action, Enforcement, HOST, Mode, PodPeer, Policy, Side, WORLD};

use self::check::{Checks, OwnerId};
use self::labels::{LabelSelectors, Labels, labels_match};
use self::partition::{Partition, Settled};
use self::small::{BothEnds, DenseMap, End, NumberMap, SmallSet};
pub use self::stored::Fragment;
use self::stored::{Interner, Names, StoredIdentity, StoredRule, StoredSelector};

/// Orders the entries that pass a pair with both ends open after every
/// rule's (see [`crate::compile`]).
const OPEN_ORDER: &str = "\u{10ffff}";

/// Identity pairs whose entries must be resolved again.
type PairSet = HashSet<(IdentityId, IdentityId), std::hash::BuildHasherDefault<small::NumberHasher>>;

/// A name shared between the model and the engine's indexes: a thin,
/// reference-counted string, so each index holding a name holds 8 bytes.
pub use self::name::Name;

/// The new contents of one source.
#[derive(Debug, Clone)]
pub enum Contents {
    /// Policy text (YAML), parsed by the engine.
    Text(String),
    /// Already parsed (the Kubernetes watcher's translation, tests).
    Parsed(Policy),
    /// The source is gone.
    Removed,
}

/// One source's new contents, named by the source (a file's path, `api`, …).
#[derive(Debug, Clone)]
pub struct SourceChange {
    pub source: String,
    pub contents: Contents,
}

/// One key's change: its value before (`old`) and after (`new`); `None`
/// means absent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delta<K, V> {
    pub key: K,
    pub old: Option<V>,
    pub new: Option<V>,
}

/// A rule as the kernel's `rule_index` refers to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleInfo {
    pub name: Name,
    pub action: Action,
}

/// Everything a change does to the maps, with the values before, so that a
/// writer that lags one change behind can compose two diffs.
#[derive(Debug, Clone, Default)]
pub struct EntryDiff {
    pub identities: Vec<Delta<IpNet, IdentityValue>>,
    /// Keyed by (prefix length, key with slot 0).
    pub policy: Vec<Delta<(u32, PolicyKeyData), PolicyValue>>,
    /// Keyed by `rule_index`.
    pub rules: Vec<Delta<u32, RuleInfo>>,
    /// Numeric identity → owner name.
    pub atoms: Vec<Delta<IdentityId, Name>>,
}

impl EntryDiff {
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.identities.is_empty() && self.policy.is_empty() && self.rules.is_empty() && self.atoms.is_empty()
    }

    /// Number of map entries (identity and policy) the diff changes.
    #[must_use]
    pub fn entries(&self) -> usize {
        self.identities.len() + self.policy.len()
    }

    /// The diff that does `self` then `then`.
    #[must_use]
    pub fn then(self, then: &EntryDiff) -> EntryDiff {
        EntryDiff {
            identities: compose(self.identities, &then.identities),
            policy: compose(self.policy, &then.policy),
            rules: compose(self.rules, &then.rules),
            atoms: compose(self.atoms, &then.atoms),
        }
    }
}

fn compose<K: Ord + Clone, V: PartialEq + Clone>(first: Vec<Delta<K, V>>, then: &[Delta<K, V>]) -> Vec<Delta<K, V>> {
    // Common and, for a large change, costly otherwise: a slot that
    // missed nothing receives the change as it is.
    if first.is_empty() {
        return then.to_vec();
    }
    if then.is_empty() {
        return first;
    }
    let mut recorder = Recorder { changes: first };
    recorder.changes.extend_from_slice(then);
    recorder.finish()
}

/// Collects changes by key, keeping the first old and the last new value.
/// Changes are kept in the order they come and brought together by key
/// once, at the end, with a sort: a full load records 200,000 entries, and
/// a hash map keyed by entry, which missed the cache on every one, took 9%
/// of the load's time; appending and sorting takes under 4% (identity
/// entries come nearly in order).
struct Recorder<K, V> {
    changes: Vec<Delta<K, V>>,
}

impl<K, V> Default for Recorder<K, V> {
    fn default() -> Self {
        Self { changes: Vec::new() }
    }
}

impl<K: Ord, V: PartialEq> Recorder<K, V> {
    fn record(&mut self, key: K, old: Option<V>, new: Option<V>) {
        self.changes.push(Delta { key, old, new });
    }

    fn finish(mut self) -> Vec<Delta<K, V>> {
        // Stable: a key's changes stay in the order they were recorded.
        self.changes.sort_by(|a, b| a.key.cmp(&b.key));
        // `dedup_by` hands each change with the earlier one it keeps.
        self.changes.dedup_by(|later, earlier| {
            let same = later.key == earlier.key;
            if same {
                earlier.new = later.new.take();
            }
            same
        });
        self.changes.retain(|delta| delta.old != delta.new);
        self.changes
    }
}

/// The recorders of one change.
#[derive(Default)]
struct Recorders {
    identities: Recorder<IpNet, IdentityValue>,
    policy: Recorder<(u32, PolicyKeyData), PolicyValue>,
    rules: Recorder<u32, RuleInfo>,
    atoms: Recorder<IdentityId, Name>,
}

impl Recorders {
    fn finish(self) -> EntryDiff {
        EntryDiff {
            identities: self.identities.finish(),
            policy: self.policy.finish(),
            rules: self.rules.finish(),
            atoms: self.atoms.finish(),
        }
    }
}

/// Numbers handed out lowest-free-first; a number freed during a change is
/// free only once the change is over, or, while the pool holds freed
/// numbers, once they are released.
#[derive(Debug, Clone)]
struct IdPool {
    free: BTreeSet<u32>,
    freed_now: Vec<u32>,
    /// Freed by earlier changes, kept out of use until released.
    held: BTreeSet<u32>,
    holding: bool,
    /// Numbers at or above this are handed out only when none is held: a
    /// held number is given out early instead (the maps have no room above).
    limit: u32,
    next: u32,
}

impl IdPool {
    fn starting_at(first: u32) -> Self {
        Self {
            free: BTreeSet::new(),
            freed_now: Vec::new(),
            held: BTreeSet::new(),
            holding: false,
            limit: u32::MAX,
            next: first,
        }
    }

    fn take(&mut self) -> u32 {
        if let Some(id) = self.free.pop_first() {
            return id;
        }
        if self.next >= self.limit
            && let Some(id) = self.held.pop_first()
        {
            return id;
        }
        let id = self.next;
        self.next += 1;
        id
    }

    fn give_back(&mut self, id: u32) {
        self.freed_now.push(id);
    }

    fn end_of_change(&mut self) {
        if self.holding {
            self.held.extend(self.freed_now.drain(..));
        } else {
            self.free.extend(self.freed_now.drain(..));
        }
    }

    /// Frees those of `ids` that are held; others (never freed, or given
    /// out again since) are left alone.
    fn release(&mut self, ids: &[u32]) {
        for id in ids {
            if self.held.remove(id) {
                self.free.insert(*id);
            }
        }
    }
}

/// Entries the maps hold for the policy (the node's addresses come on top).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EntryCounts {
    pub identity_v4_exact: u32,
    pub identity_v4_prefix: u32,
    pub identity_v6_exact: u32,
    pub identity_v6_prefix: u32,
    /// Single-port policy entries (the exact hash).
    pub policy_exact: u32,
    /// Ranges and whole protocols (the trie).
    pub policy_prefix: u32,
    /// Rule counter slots needed: every `rule_index` in use is below this.
    pub rule_slots: u32,
}

impl EntryCounts {
    fn identity(&mut self, net: IpNet, delta: i64) {
        let count = match net {
            IpNet::V4(n) if n.prefix_len() == 32 => &mut self.identity_v4_exact,
            IpNet::V4(_) => &mut self.identity_v4_prefix,
            IpNet::V6(n) if n.prefix_len() == 128 => &mut self.identity_v6_exact,
            IpNet::V6(_) => &mut self.identity_v6_prefix,
        };
        *count = u32::try_from(i64::from(*count) + delta).unwrap_or(0);
    }

    fn policy(&mut self, prefix_len: u32, delta: i64) {
        let count = if prefix_len == POLICY_KEY_MAX_PREFIX { &mut self.policy_exact } else { &mut self.policy_prefix };
        *count = u32::try_from(i64::from(*count) + delta).unwrap_or(0);
    }
}

/// An active rule as compiled: what it selects now.
#[derive(Debug, Clone)]
struct ActiveRule {
    rule: Arc<StoredRule>,
    /// The atoms it selects as sources and as destinations.
    selected: BothEnds,
}

/// A CIDR peer: addresses inside `.0` and outside all of `.1`.
pub(crate) type CidrSelector = (IpNet, Box<[IpNet]>);

/// Interned CIDR selector of the active rules.
pub(crate) type SelectorId = u32;

/// The incremental engine. See the module documentation.
#[derive(Debug)]
pub struct Engine {
    sources: BTreeMap<String, Arc<Fragment>>,
    /// Declarations by name, and what is compiled of them.
    checks: Checks,
    /// Identities by one of their labels, to resolve label selectors.
    by_label: HashMap<(Name, Name), HashSet<OwnerId>>,
    active: DenseMap<ActiveRule>,
    rule_pool: IdPool,
    expiries: BTreeSet<(SystemTime, Name)>,
    /// Active rules by the selectors their peers use (naming an identity:
    /// in the identity's record in `checks`).
    world_rules: HashSet<u32>,
    label_rules: HashMap<Labels, SmallSet<u32>>,
    /// The label selectors of active rules.
    label_selectors: LabelSelectors,
    cidr_rules: NumberMap<SelectorId, SmallSet<u32>>,
    selectors: HashMap<CidrSelector, (SelectorId, u32)>,
    selector_values: NumberMap<SelectorId, CidrSelector>,
    selector_pool: IdPool,
    partition: Partition,
    /// Active rules by an atom they select, as a source or a destination.
    rules_by_atom: DenseMap<BothEnds>,
    /// Entries of each identity pair some rule claims.
    pairs: Pairs,
    counts: EntryCounts,
    /// The sources the last `apply` replaced, for [`Engine::revert`].
    undo: Vec<(String, Option<Arc<Fragment>>)>,
    /// Shares label keys and values between fragments (identity names are
    /// shared through their records in `checks`).
    names: Interner,
    /// `host` and `world`, as the atoms' owners are named.
    reserved: [Name; 2],
    enforcement: Enforcement,
    /// Active rules with a pod selector among their peers.
    pod_rules: BTreeSet<u32>,
    /// The same, by one `matchLabels` pair of each pod selector (a pod
    /// without that label cannot be selected by it), or, for selectors
    /// without one, in `pod_rules_any`: a pod is checked against the rules
    /// that may select it, not against every rule.
    pod_rules_by_label: HashMap<(Name, Name), SmallSet<u32>>,
    pod_rules_any: BTreeSet<u32>,
    /// Pod identities by namespace.
    pods_by_namespace: HashMap<Name, HashSet<OwnerId>>,
    /// Every declaration of each namespace (more than one is a conflict).
    namespaces: BTreeMap<String, Vec<Namespace>>,
    /// Namespaces declared more than once.
    namespace_conflicts: usize,
    /// Atoms whose isolation may have changed in this change.
    reisolate: BTreeSet<IdentityId>,
}

fn merge<'a>(fragments: impl Iterator<Item = &'a Arc<Fragment>>) -> Policy {
    let mut policy = Policy::default();
    for fragment in fragments {
        fragment.extend_policy(&mut policy);
    }
    policy
}

impl Default for Engine {
    fn default() -> Self {
        Self::new()
    }
}

/// What changed in identities, beyond their addresses.
#[derive(Default)]
struct IdentityChanges {
    /// Label sets before and after of relabelled identities.
    relabelled: Vec<Labels>,
    /// Identities whose mode changed.
    modes: Vec<OwnerId>,
    /// Pods before and after, of pods added, removed or moved or
    /// relabelled.
    pods: Vec<Arc<StoredIdentity>>,
    /// Pods whose named ports changed.
    ports: Vec<OwnerId>,
}

/// What a change touched, found while the model is updated: names in the
/// order found, sorted and made distinct once, before the compile.
#[derive(Default)]
struct Touched {
    identities: Vec<Name>,
    rules: Vec<Name>,
    /// Whether a namespace was declared, changed or removed.
    namespaces: bool,
}

impl Touched {
    fn sorted(mut self) -> Self {
        for names in [&mut self.identities, &mut self.rules] {
            names.sort_unstable();
            names.dedup();
        }
        self
    }
}

impl Engine {
    #[must_use]
    pub fn new() -> Self {
        Self {
            sources: BTreeMap::new(),
            checks: Checks::default(),
            by_label: HashMap::new(),
            active: DenseMap::default(),
            rule_pool: IdPool::starting_at(0),
            expiries: BTreeSet::new(),
            world_rules: HashSet::new(),
            label_rules: HashMap::new(),
            label_selectors: LabelSelectors::default(),
            cidr_rules: NumberMap::default(),
            selectors: HashMap::new(),
            selector_values: NumberMap::default(),
            selector_pool: IdPool::starting_at(0),
            partition: Partition::new(IDENTITY_FIRST_DYNAMIC),
            rules_by_atom: DenseMap::default(),
            pairs: Pairs::default(),
            counts: EntryCounts::default(),
            undo: Vec::new(),
            names: Interner::default(),
            reserved: [Name::from(HOST), Name::from(WORLD)],
            enforcement: Enforcement::Always,
            pod_rules: BTreeSet::new(),
            pod_rules_by_label: HashMap::new(),
            pod_rules_any: BTreeSet::new(),
            pods_by_namespace: HashMap::new(),
            namespaces: BTreeMap::new(),
            namespace_conflicts: 0,
            reisolate: BTreeSet::new(),
        }
    }

    /// An engine that isolates identities as `enforcement` says (see
    /// [`Enforcement`]); [`Engine::new`] isolates every one.
    #[must_use]
    pub fn with_enforcement(enforcement: Enforcement) -> Self {
        let mut engine = Self::new();
        engine.enforcement = enforcement;
        let isolation = engine.isolation(IDENTITY_WORLD);
        let flags = isolation | unreachable_from_world(isolation, false);
        engine.partition.set_flags(IDENTITY_WORLD, flags, &mut Recorder::default());
        engine
    }

    /// How the engine isolates identities.
    #[must_use]
    pub fn enforcement(&self) -> Enforcement {
        self.enforcement
    }

    /// Applies changes to sources as one change: all of them or, if the
    /// policy they give is invalid, none. Returns what the maps must change.
    pub fn apply(&mut self, changes: Vec<SourceChange>, now: SystemTime) -> Result<EntryDiff, PolicyError> {
        let mut problems = Vec::new();
        let mut replaced: Vec<(String, Option<Arc<Fragment>>)> = Vec::new();
        let mut incoming = Vec::new();
        let checks = &self.checks;
        let known = |name: &str| checks.identity_id(name).and_then(|id| checks.identity_name(id)).cloned();
        let known_rule = |name: &str| checks.rule_name(name).cloned();
        let mut fresh = HashSet::new();
        let mut names = Names { labels: &mut self.names, known: &known, known_rule: &known_rule, fresh: &mut fresh };
        for change in changes {
            let fragment = match change.contents {
                Contents::Removed => None,
                Contents::Parsed(policy) => Some(Arc::new(Fragment::new(policy, &mut names))),
                Contents::Text(text) => {
                    let file: Arc<str> = Arc::from(change.source.as_str());
                    Some(Arc::new(Fragment::parse(&file, &text, &mut names, &mut problems)))
                }
            };
            incoming.push((change.source, fragment));
        }
        drop(fresh);
        let mut touched = Touched::default();
        for (source, fragment) in incoming {
            let old = self.replace_source(&source, fragment.as_ref(), &mut touched);
            replaced.push((source, old));
        }
        if !problems.is_empty() || !self.checks.is_clean() || self.namespace_conflicts > 0 {
            let policy = self.merged();
            crate::validate::validate(&policy, &mut problems);
            for (source, old) in replaced.into_iter().rev() {
                self.replace_source(&source, old.as_ref(), &mut Touched::default());
            }
            self.checks.forget_compiled_in_force();
            self.checks.tidy();
            problems.sort_by(|a, b| a.location.cmp(&b.location));
            problems.dedup();
            if problems.is_empty() {
                // The counters and the validator disagree: never enforce
                // what the validator would not have accepted.
                problems.push(Diagnostic::new(
                    crate::error::Location { file: Arc::from("policy"), line: 0, column: 0 },
                    "the policy engine found a problem the validator cannot name; please report this".to_owned(),
                ));
            }
            return Err(PolicyError::Invalid { diagnostics: problems });
        }
        self.undo = replaced;
        Ok(self.compile(&touched.sorted(), now))
    }

    /// Lets rules that expired by `now` lapse.
    pub fn advance(&mut self, now: SystemTime) -> EntryDiff {
        self.undo.clear();
        self.compile(&Touched::default(), now)
    }

    /// Takes back the last [`Engine::apply`] (when its diff could not be
    /// written): the sources it replaced come back. Returns the diff from
    /// the state after that apply to the state now, which equals the state
    /// before it except, possibly, for numbers given out anew.
    pub fn revert(&mut self, now: SystemTime) -> EntryDiff {
        let mut touched = Touched::default();
        for (source, old) in std::mem::take(&mut self.undo).into_iter().rev() {
            self.replace_source(&source, old.as_ref(), &mut touched);
        }
        self.compile(&touched.sorted(), now)
    }

    /// Forgets what [`Engine::revert`] would restore, once the last change
    /// is written: it holds the replaced sources (after a large file's
    /// change, a second copy of it).
    pub fn commit(&mut self) {
        self.undo = Vec::new();
    }

    /// Packs the tables a large change filled one entry at a time. A
    /// B-tree grown in address order keeps its nodes about two-thirds
    /// full; built again from its entries, they are full: at 100,000
    /// addresses the prefix table drops from 8.2 to 4.0 MB. A pass over
    /// the prefixes (4 ms at 100,000): worth it after a large change, not
    /// after each small one.
    pub fn compact(&mut self) {
        self.partition.compact();
    }

    /// What the last [`Engine::apply`] changed, by identity and rule name
    /// (for the audit log): its sources before against the same sources now.
    #[must_use]
    pub fn last_differences(&self) -> Vec<crate::diff::Difference> {
        let before = merge(self.undo.iter().filter_map(|(_, old)| old.as_ref()));
        let after = merge(self.undo.iter().filter_map(|(source, _)| self.sources.get(source)));
        crate::diff::diff(&before, &after)
    }

    /// Replaces one source's fragment in the model and the checks, noting
    /// the names it touches. Returns the fragment it replaced.
    fn replace_source(
        &mut self,
        source: &str,
        fragment: Option<&Arc<Fragment>>,
        touched: &mut Touched,
    ) -> Option<Arc<Fragment>> {
        let old = match fragment {
            Some(fragment) => self.sources.insert(source.to_owned(), Arc::clone(fragment)),
            None => self.sources.remove(source),
        };
        if let Some(old) = &old {
            for namespace in &old.namespaces {
                self.undeclare_namespace(namespace);
                touched.namespaces = true;
            }
            for identity in &old.identities {
                self.checks.remove_identity(identity, &mut self.partition);
                touched.identities.push(Name::clone(&identity.name));
            }
            for rule in &old.rules {
                self.checks.remove_rule(rule);
                touched.rules.push(Name::clone(&rule.name));
            }
        }
        if let Some(new) = fragment {
            self.checks.reserve(new.identities.len(), new.rules.len());
            for namespace in &new.namespaces {
                self.declare_namespace(namespace);
                touched.namespaces = true;
            }
            for identity in &new.identities {
                self.checks.add_identity(identity, &mut self.partition);
                touched.identities.push(Name::clone(&identity.name));
            }
            for rule in &new.rules {
                self.checks.add_rule(rule);
                touched.rules.push(Name::clone(&rule.name));
            }
        }
        old
    }

    fn declare_namespace(&mut self, namespace: &Namespace) {
        let declarations = self.namespaces.entry(namespace.name.clone()).or_default();
        declarations.push(namespace.clone());
        if declarations.len() == 2 {
            self.namespace_conflicts += 1;
        }
    }

    fn undeclare_namespace(&mut self, namespace: &Namespace) {
        let Some(declarations) = self.namespaces.get_mut(&namespace.name) else { return };
        if let Some(at) = declarations.iter().position(|declared| declared == namespace) {
            declarations.remove(at);
        }
        match declarations.len() {
            0 => {
                self.namespaces.remove(&namespace.name);
            }
            1 => self.namespace_conflicts -= 1,
            _ => {}
        }
    }

    /// What was read but is skipped or not enforced, source by source.
    pub fn notes(&self) -> impl Iterator<Item = &Diagnostic> + '_ {
        self.sources.values().flat_map(|fragment| fragment.notes.iter())
    }

    /// What was read of `source` but is skipped or not enforced.
    #[must_use]
    pub fn notes_of(&self, source: &str) -> &[Diagnostic] {
        self.sources.get(source).map_or(&[], |fragment| &fragment.notes)
    }

    /// The whole policy as one [`Policy`], sources in name order.
    #[must_use]
    pub fn merged(&self) -> Policy {
        merge(self.sources.values())
    }

    /// The sources and their parsed contents.
    pub fn sources(&self) -> impl Iterator<Item = (&str, &Arc<Fragment>)> {
        self.sources.iter().map(|(name, fragment)| (name.as_str(), fragment))
    }

    /// Declared identities.
    #[must_use]
    pub fn identity_count(&self) -> usize {
        self.checks.compiled_identity_count()
    }

    /// Rule peers that select no identity now: a name no identity is
    /// declared under, or labels no identity carries. Valid, and worth a
    /// warning: such a rule is likely waiting for its identities, or has a
    /// typo. [`crate::warnings`] names them.
    #[must_use]
    pub fn unmatched_peers(&self) -> usize {
        self.checks.unmatched_peers()
    }

    /// Rules in force (not expired).
    #[must_use]
    pub fn active_rule_count(&self) -> usize {
        self.active.len()
    }

    /// When the first active rule lapses, if any does.
    #[must_use]
    pub fn next_expiry(&self) -> Option<SystemTime> {
        self.expiries.first().map(|(when, _)| *when)
    }

    /// How many entries the maps need for this policy.
    #[must_use]
    pub fn counts(&self) -> EntryCounts {
        // Numbers are handed out lowest first, so every one in use is below
        // the pool's high-water mark.
        EntryCounts { rule_slots: self.rule_pool.next, ..self.counts }
    }

    /// Every identity entry: what the identity maps hold.
    pub fn identity_entries(&self) -> impl Iterator<Item = (IpNet, IdentityValue)> + '_ {
        self.partition.entries()
    }

    /// The identity entry the kernel finds for the addresses of `net` when
    /// `net` itself has none: the longest shorter prefix's, else `world`.
    #[must_use]
    pub fn enclosing_identity(&self, net: IpNet) -> IdentityValue {
        self.partition.lookup_shorter_than(net)
    }

    /// Keeps numbers freed by a change (atoms' and rules') out of use until
    /// [`Engine::release_numbers`], instead of handing them out again from
    /// the next change on. A writer that changes the maps the kernel is
    /// reading in place needs this: a number may be given to something else
    /// only once no program run can still be using it under its old
    /// meaning, and only the writer knows when that is.
    ///
    /// Rule numbers index counters in a map of `rule_slots` entries: once
    /// every number below that is in use or held, a held one is given out
    /// early rather than one the map has no room for (the writer sees a
    /// held number come back, and waits for what it waited on).
    pub fn hold_freed_numbers(&mut self, rule_slots: u32) {
        self.rule_pool.holding = true;
        self.rule_pool.limit = rule_slots;
        self.partition.hold_freed_numbers();
    }

    /// Whether freed numbers are held (see [`Engine::hold_freed_numbers`]).
    #[must_use]
    pub fn holds_freed_numbers(&self) -> bool {
        self.rule_pool.holding
    }

    /// Lets held atom and rule numbers be handed out again. A number not
    /// held (never freed, or given out again already) is left alone.
    pub fn release_numbers(&mut self, atoms: &[IdentityId], rules: &[u32]) {
        self.rule_pool.release(rules);
        self.partition.release_numbers(atoms);
    }

    /// The identity entry of exactly `net`, if it has one.
    #[must_use]
    pub fn identity_entry(&self, net: IpNet) -> Option<IdentityValue> {
        self.partition.entry(net)
    }

    /// Every policy entry.
    pub fn policy_entries(&self) -> impl Iterator<Item = PolicyEntry> + '_ {
        self.pairs.iter().flat_map(|((src, dst), entries)| entries.iter().map(move |entry| entry.entry(src, dst)))
    }

    /// Every atom: number, owner (`world` for unowned) and flags; `host`
    /// included.
    pub fn atoms(&self) -> impl Iterator<Item = (IdentityId, &Name, u32)> + '_ {
        let host_flags = self.host_flags();
        std::iter::once((IDENTITY_HOST, &self.reserved[0], host_flags))
            .chain(self.partition.atoms().map(|(id, owner, flags)| (id, self.owner_name(owner), flags)))
    }

    /// The identity entry of each of the node's own addresses: `host`,
    /// with its isolation.
    #[must_use]
    pub fn host_value(&self) -> IdentityValue {
        IdentityValue { id: IDENTITY_HOST, flags: self.isolation(IDENTITY_HOST) }
    }

    /// The flags of the node's own addresses as an atom.
    #[must_use]
    pub fn host_flags(&self) -> u32 {
        let isolation = self.isolation(IDENTITY_HOST);
        isolation | unreachable_from_world(isolation, self.pairs.contains((IDENTITY_WORLD, IDENTITY_HOST)))
    }

    /// The name of an atom's owner: `world` for none.
    fn owner_name(&self, owner: Option<OwnerId>) -> &Name {
        owner.and_then(|id| self.checks.identity_name(id)).unwrap_or(&self.reserved[1])
    }

    /// Every rule in force by `rule_index`.
    pub fn rule_table(&self) -> impl Iterator<Item = (u32, RuleInfo)> + '_ {
        self.active
            .iter()
            .map(|(id, rule)| (id, RuleInfo { name: Name::clone(&rule.rule.name), action: rule.rule.action }))
    }

    /// Brings the compiled state to the model: `touched` names what the
    /// model changed; rules that lapsed by `now` leave too.
    fn compile(&mut self, touched: &Touched, now: SystemTime) -> EntryDiff {
        let mut rec = Recorders::default();
        let mut dirty_rules: BTreeSet<u32> = BTreeSet::new();
        let mut dirty_pairs: PairSet = PairSet::default();

        // 1. Rules: the ones leaving take their claims with them; the ones
        //    entering are selected below, once the partition is final.
        self.update_rules(&touched.rules, now, &mut rec, &mut dirty_rules, &mut dirty_pairs);
        // 2. Identities: labels, modes and addresses.
        let changed = self.update_identities(&touched.identities);
        // 3. The partition: re-derive every prefix whose role changed.
        let (checks, world) = (&self.checks, &self.reserved[1]);
        let mode_of = |owner: Option<OwnerId>| mode_of_owner(checks, owner);
        let name_of =
            |owner: Option<OwnerId>| Name::clone(owner.and_then(|id| checks.identity_name(id)).unwrap_or(world));
        let outcome = self.partition.settle(&mode_of, &name_of, &mut rec.identities, &mut rec.atoms, &mut self.counts);

        // 4. Rules that may select differently now.
        dirty_rules.extend(self.rules_to_reselect(&outcome, &changed, touched.namespaces));
        for id in dirty_rules {
            self.reselect(id, &mut dirty_pairs);
        }

        // 4b. Isolation: an atom isolated or opened has every pair it is
        //     in resolved again; named ports changed likewise.
        let mut reisolated: BTreeSet<IdentityId> = BTreeSet::new();
        if self.enforcement != Enforcement::Always {
            let candidates = std::mem::take(&mut self.reisolate);
            for atom in candidates.into_iter().chain(outcome.appeared.iter().map(|(id, _, _)| *id)) {
                let wanted = self.isolation(atom);
                if atom == IDENTITY_HOST || self.partition.flags(atom) & ISOLATION_FLAGS != wanted {
                    self.mark_pairs_of(atom, &mut dirty_pairs, |_| true);
                    reisolated.insert(atom);
                }
            }
        }
        for owner in &changed.ports {
            for atom in self.partition.atoms_of(Some(*owner)).collect::<Vec<_>>() {
                self.mark_pairs_of(atom, &mut dirty_pairs, |rule| !rule.named_ports().is_empty());
            }
        }

        // 5. Pairs whose claims changed.
        let mut reach_changed: BTreeSet<IdentityId> = BTreeSet::new();
        for (src, dst) in dirty_pairs {
            self.resolve_pair(src, dst, &mut rec.policy, &mut reach_changed);
        }

        // 6. Flags: audit mode, isolation and reachability from `world`.
        let mut reflag: BTreeSet<IdentityId> = reach_changed;
        reflag.extend(reisolated);
        for owner in &changed.modes {
            reflag.extend(self.partition.atoms_of(Some(*owner)));
        }
        for id in reflag {
            let owner_flags = self.partition.owner_of(id).map(|owner| mode_of_owner(&self.checks, owner));
            let Some(mode) = owner_flags else { continue };
            let isolation = self.isolation(id);
            let flags = mode | isolation | unreachable_from_world(isolation, self.pairs.contains((IDENTITY_WORLD, id)));
            self.partition.set_flags(id, flags, &mut rec.identities);
        }

        self.rule_pool.end_of_change();
        self.selector_pool.end_of_change();
        self.partition.end_of_change();
        self.checks.tidy();
        rec.finish()
    }

    /// Activates, changes and retires rules whose declaration changed or
    /// whose time ran out; marks what must be selected and resolved again.
    fn update_rules(
        &mut self,
        touched: &[Name],
        now: SystemTime,
        rec: &mut Recorders,
        dirty_rules: &mut BTreeSet<u32>,
        dirty_pairs: &mut PairSet,
    ) {
        let expired: BTreeSet<Name> = self
            .expiries
            .iter()
            .take_while(|(when, _)| *when <= now)
            .map(|(_, name)| Name::clone(name))
            .filter(|name| touched.binary_search(name).is_err())
            .collect();
        for touched_name in touched.iter().cloned().chain(expired) {
            // The checks' copy of the name is the one kept: one per rule.
            let (declared, id) = self.checks.rule(&touched_name);
            let name = declared.as_ref().map_or(touched_name, |(name, _)| Name::clone(name));
            let wanted = declared.map(|(_, rule)| rule).filter(|rule| rule.is_active_at(now));
            let current = id.and_then(|id| self.active.get(&id)).map(|a| Arc::clone(&a.rule));
            if let (Some(current), Some(wanted)) = (&current, &wanted)
                && current.compiles_like(wanted)
            {
                if !Arc::ptr_eq(current, wanted) {
                    // Only its position moved: keep what is compiled.
                    if let Some(active) = id.and_then(|id| self.active.get_mut(&id)) {
                        active.rule = Arc::clone(wanted);
                    }
                }
                continue;
            }
            let info = |rule: &StoredRule| RuleInfo { name: Name::clone(&name), action: rule.action };
            if let Some(id) = id {
                rec.rules.record(id, current.as_deref().map(info), wanted.as_deref().map(info));
                self.deactivate(id, dirty_pairs);
                if wanted.is_none() {
                    self.checks.set_rule_number(&name, None);
                    self.rule_pool.give_back(id);
                }
            }
            if let Some(rule) = wanted {
                let id = id.unwrap_or_else(|| {
                    let id = self.rule_pool.take();
                    self.checks.set_rule_number(&name, Some(id));
                    rec.rules.record(id, None, Some(info(&rule)));
                    id
                });
                self.activate(id, rule);
                dirty_rules.insert(id);
            }
        }
    }

    /// Takes identities whose declaration changed into the compiled view:
    /// labels into the label index, addresses into the partition.
    fn update_identities(&mut self, touched: &[Name]) -> IdentityChanges {
        let mut changed = IdentityChanges::default();
        let mut released: Vec<IpNet> = Vec::new();
        let mut claimed: Vec<(IpNet, OwnerId)> = Vec::new();
        for name in touched {
            // Every name a change touches keeps its record to its end.
            let Some(id) = self.checks.identity_id(name) else { continue };
            self.checks.merge_pods(id);
            let wanted = self.checks.identity(id).cloned();
            let current = self.checks.compiled_identity(id).cloned();
            let unchanged = matches!((&current, &wanted), (Some(a), Some(b)) if Arc::ptr_eq(a, b));
            self.checks.set_compiled(id, wanted.clone());
            if unchanged {
                // Nothing to compile; what is compiled is in force again.
                continue;
            }
            let nets_of = |identity: &Option<Arc<StoredIdentity>>| {
                let mut nets: Vec<IpNet> = identity.iter().flat_map(|i| i.addresses()).collect();
                nets.sort_unstable();
                nets.dedup();
                nets
            };
            let (old_nets, new_nets) = (nets_of(&current), nets_of(&wanted));
            // All releases before all claims: an address may pass from one
            // identity to another within one change.
            released.extend(old_nets.iter().filter(|net| new_nets.binary_search(net).is_err()));
            claimed.extend(new_nets.iter().filter(|net| old_nets.binary_search(net).is_err()).map(|net| (*net, id)));
            let pod_key = |i: &Arc<StoredIdentity>| i.pod().map(|pod| (pod.namespace.clone(), i.labels().clone()));
            if current.as_ref().and_then(pod_key) != wanted.as_ref().and_then(pod_key) {
                changed.pods.extend(current.iter().chain(&wanted).filter(|i| i.pod().is_some()).cloned());
                if let Some(pod) = current.as_ref().and_then(|i| i.pod())
                    && let Some(owners) = self.pods_by_namespace.get_mut(pod.namespace.as_str())
                {
                    owners.remove(&id);
                    if owners.is_empty() {
                        self.pods_by_namespace.remove(pod.namespace.as_str());
                    }
                }
                if let Some(pod) = wanted.as_ref().and_then(|i| i.pod()) {
                    self.pods_by_namespace.entry(self.names.intern(&pod.namespace)).or_default().insert(id);
                }
            }
            let ports = |i: &Arc<StoredIdentity>| i.pod().map(|pod| pod.ports.clone());
            if current.as_ref().and_then(ports) != wanted.as_ref().and_then(ports) {
                changed.ports.push(id);
            }
            let old_labels = current.as_ref().map(|i| i.labels());
            let new_labels = wanted.as_ref().map(|i| i.labels());
            if old_labels != new_labels {
                changed.relabelled.extend(current.iter().chain(&wanted).map(|i| i.labels().clone()));
                if let Some(old) = &current {
                    for pair in old.labels() {
                        let key = (pair.0.clone(), pair.1.clone());
                        if let Some(ids) = self.by_label.get_mut(&key) {
                            ids.remove(&id);
                            if ids.is_empty() {
                                self.by_label.remove(&key);
                            }
                        }
                    }
                }
                if let Some(new) = &wanted {
                    for pair in new.labels() {
                        self.by_label.entry((pair.0.clone(), pair.1.clone())).or_default().insert(id);
                    }
                }
            }
            if current.as_ref().map(|i| i.mode) != wanted.as_ref().map(|i| i.mode) {
                changed.modes.push(id);
            }
        }

        for net in released {
            self.partition.set_owner(net, None);
        }
        for (net, owner) in claimed {
            self.partition.set_owner(net, Some(owner));
        }
        changed
    }

    /// Rules whose selection an atom's coming or going, or a relabelled
    /// identity, may change.
    fn rules_to_reselect(&self, outcome: &Settled, changed: &IdentityChanges, namespaces: bool) -> BTreeSet<u32> {
        let mut dirty_rules = BTreeSet::new();
        if namespaces {
            dirty_rules.extend(self.pod_rules.iter().copied());
        }
        for pod in &changed.pods {
            dirty_rules.extend(self.pod_rules_selecting(pod));
        }
        for (_, owner, selectors) in &outcome.appeared {
            if let Some(owner) = owner {
                dirty_rules.extend(self.checks.rules_naming(*owner));
                if let Some(identity) = self.checks.compiled_identity(*owner) {
                    let labels = identity.labels().clone();
                    dirty_rules.extend(self.label_rules_matching(&labels));
                    dirty_rules.extend(self.pod_rules_selecting(identity));
                }
            } else {
                dirty_rules.extend(self.world_rules.iter());
            }
            for selector in selectors {
                dirty_rules.extend(self.cidr_rules.get(selector).into_iter().flatten());
            }
        }
        for id in &outcome.vanished {
            if let Some(rules) = self.rules_by_atom.get(id) {
                dirty_rules.extend(rules.at(End::From).chain(rules.at(End::To)));
            }
        }
        for labels in &changed.relabelled {
            dirty_rules.extend(self.label_rules_matching(labels));
        }
        dirty_rules
    }

    /// Active rules with a pod selector that selects `identity`.
    fn pod_rules_selecting<'a>(&'a self, identity: &'a StoredIdentity) -> impl Iterator<Item = u32> + 'a {
        let mut candidates: Vec<u32> = self.pod_rules_any.iter().copied().collect();
        if identity.pod().is_some() {
            for pair in identity.labels() {
                candidates.extend(self.pod_rules_by_label.get(pair).into_iter().flatten().copied());
            }
        }
        candidates.sort_unstable();
        candidates.dedup();
        candidates.into_iter().filter(move |id| {
            self.active.get(id).is_some_and(|active| {
                active.rule.from.iter().chain(&active.rule.to).any(|peer| match peer {
                    StoredSelector::Pods(pods) => self.pod_selected(pods, identity),
                    _ => false,
                })
            })
        })
    }

    /// Whether `identity` is a pod `peer` chooses.
    fn pod_selected(&self, peer: &PodPeer, identity: &StoredIdentity) -> bool {
        let Some(pod) = identity.pod() else { return false };
        let namespace = self.namespaces.get(&pod.namespace).and_then(|declared| declared.first());
        peer.matches_by(
            &pod.namespace,
            |key| namespace.and_then(|n| n.labels.get(key)).map(String::as_str),
            |key| identity.labels().get(key).map(|value| &**value),
        )
    }

    /// The isolation flags atom `id` has now (see [`isolation_flags`]).
    fn isolation(&self, id: IdentityId) -> u32 {
        if self.enforcement == Enforcement::Always {
            return 0;
        }
        let rules = self.rules_by_atom.get(&id);
        let isolated = |end: End, side: Side| {
            let mut rules = rules.into_iter().flat_map(|rules| rules.at(end));
            rules.any(|rule| self.active.get(&rule).is_some_and(|a| a.rule.side == side))
        };
        isolation_flags(
            self.enforcement,
            id == IDENTITY_HOST,
            isolated(End::To, Side::Ingress),
            isolated(End::From, Side::Egress),
        )
    }

    /// Marks every pair `atom` is in through a rule that `wanted` keeps.
    fn mark_pairs_of(&self, atom: IdentityId, dirty_pairs: &mut PairSet, wanted: impl Fn(&StoredRule) -> bool) {
        let Some(rules) = self.rules_by_atom.get(&atom) else { return };
        for rule in rules.at(End::From) {
            if let Some(active) = self.active.get(&rule).filter(|a| wanted(&a.rule)) {
                dirty_pairs.extend(active.selected.at(End::To).map(|dst| (atom, dst)));
            }
        }
        for rule in rules.at(End::To) {
            if let Some(active) = self.active.get(&rule).filter(|a| wanted(&a.rule)) {
                dirty_pairs.extend(active.selected.at(End::From).map(|src| (src, atom)));
            }
        }
    }

    /// Files an entering rule under its selectors (interning CIDR peers,
    /// whose prefixes then take their role in the partition).
    fn activate(&mut self, id: u32, rule: Arc<StoredRule>) {
        if let Some(expires) = rule.expires() {
            self.expiries.insert((expires, Name::clone(&rule.name)));
        }
        for peer in rule.from.iter().chain(&rule.to) {
            match peer {
                StoredSelector::Identity(target) if &**target == WORLD => {
                    self.world_rules.insert(id);
                }
                StoredSelector::Identity(target) => {
                    self.checks.name_rule(target, id);
                }
                StoredSelector::Labels(wanted) => {
                    self.label_rules.entry(Labels::clone(wanted)).or_default().insert(id);
                    self.label_selectors.insert(wanted);
                }
                StoredSelector::Cidr(peer) => {
                    let (cidr, except) = (&peer.cidr, &peer.except);
                    let key = (*cidr, except.clone());
                    let selector = if let Some((selector, uses)) = self.selectors.get_mut(&key) {
                        *uses += 1;
                        *selector
                    } else {
                        {
                            let selector = self.selector_pool.take();
                            self.selectors.insert(key.clone(), (selector, 1));
                            self.selector_values.insert(selector, key);
                            self.partition.add_selector(selector, *cidr, except);
                            selector
                        }
                    };
                    self.cidr_rules.entry(selector).or_default().insert(id);
                }
                StoredSelector::Pods(pods) => {
                    self.pod_rules.insert(id);
                    match pods.pods.match_labels.iter().next() {
                        Some((key, value)) => {
                            let pair = (self.names.intern(key), self.names.intern(value));
                            self.pod_rules_by_label.entry(pair).or_default().insert(id);
                        }
                        None => {
                            self.pod_rules_any.insert(id);
                        }
                    }
                }
            }
        }
        self.active.insert(id, ActiveRule { rule, selected: BothEnds::default() });
    }

    /// Takes a leaving rule (or the old version of a changed one) off its
    /// selectors and pairs.
    fn deactivate(&mut self, id: u32, dirty_pairs: &mut PairSet) {
        let Some(active) = self.active.remove(&id) else { return };
        if let Some(expires) = active.rule.expires() {
            self.expiries.remove(&(expires, Name::clone(&active.rule.name)));
        }
        let (from, to) = (active.selected.list(End::From), active.selected.list(End::To));
        for &src in &from {
            for &dst in &to {
                dirty_pairs.insert((src, dst));
            }
        }
        for &src in &from {
            self.unfile(src, End::From, id);
        }
        for &dst in &to {
            self.unfile(dst, End::To, id);
        }
        match active.rule.side {
            _ if self.enforcement == Enforcement::Always => {}
            Side::Both => {}
            Side::Ingress => self.reisolate.extend(to),
            Side::Egress => self.reisolate.extend(from),
        }
        if self.pod_rules.remove(&id) {
            self.pod_rules_any.remove(&id);
            for peer in active.rule.from.iter().chain(&active.rule.to) {
                if let StoredSelector::Pods(pods) = peer
                    && let Some((key, value)) = pods.pods.match_labels.iter().next()
                {
                    let pair = (Name::from(key.as_str()), Name::from(value.as_str()));
                    remove_from(&mut self.pod_rules_by_label, &pair, id);
                }
            }
        }
        for peer in active.rule.from.iter().chain(&active.rule.to) {
            match peer {
                StoredSelector::Identity(target) if &**target == WORLD => {
                    self.world_rules.remove(&id);
                }
                StoredSelector::Identity(target) => self.checks.unname_rule(target, id),
                StoredSelector::Labels(wanted) => {
                    remove_from(&mut self.label_rules, wanted, id);
                    if !self.label_rules.contains_key(wanted) {
                        self.label_selectors.remove(wanted);
                    }
                }
                StoredSelector::Cidr(peer) => {
                    let (cidr, except) = (&peer.cidr, &peer.except);
                    let key = (*cidr, except.clone());
                    if let Some((selector, uses)) = self.selectors.get_mut(&key) {
                        let selector = *selector;
                        *uses -= 1;
                        remove_from(&mut self.cidr_rules, &selector, id);
                        if *uses == 0 {
                            self.selectors.remove(&key);
                            self.selector_values.remove(&selector);
                            self.partition.remove_selector(selector, *cidr, except);
                            self.selector_pool.give_back(selector);
                        }
                    }
                }
                StoredSelector::Pods(_) => {}
            }
        }
    }

    /// Active rules with a label selector that `labels` satisfies.
    fn label_rules_matching(&self, labels: &Labels) -> Vec<u32> {
        self.label_selectors
            .satisfied_by(labels)
            .into_iter()
            .flat_map(|wanted| self.label_rules.get(wanted).into_iter().flatten().copied())
            .collect()
    }

    /// The atoms `peers` select now.
    fn select(&self, peers: &[StoredSelector]) -> Vec<IdentityId> {
        let mut atoms = Vec::new();
        for peer in peers {
            match peer {
                StoredSelector::Identity(name) if &**name == WORLD => atoms.extend(self.partition.atoms_of(None)),
                StoredSelector::Identity(name) if &**name == HOST => {
                    atoms.push(IDENTITY_HOST);
                }
                StoredSelector::Identity(name) => {
                    if let Some(owner) = self.checks.identity_id(name) {
                        atoms.extend(self.partition.atoms_of(Some(owner)));
                    }
                }
                StoredSelector::Labels(wanted) => {
                    for owner in self.identities_matching(wanted) {
                        atoms.extend(self.partition.atoms_of(Some(owner)));
                    }
                }
                StoredSelector::Cidr(peer) => {
                    if let Some((selector, _)) = self.selectors.get(&(peer.cidr, peer.except.clone())) {
                        atoms.extend(self.partition.atoms_of_selector(*selector));
                    }
                }
                StoredSelector::Pods(pods) => {
                    // The candidates: the pods carrying the selector's rarest
                    // `matchLabels` pair, else every pod of the namespaces.
                    let rarest = pods
                        .pods
                        .match_labels
                        .iter()
                        .map(|(key, value)| self.by_label.get(&(Name::from(key.as_str()), Name::from(value.as_str()))))
                        .min_by_key(|found| found.map_or(0, HashSet::len));
                    let owners: Box<dyn Iterator<Item = &OwnerId>> = match (rarest, &pods.namespaces) {
                        (Some(found), _) => Box::new(found.into_iter().flatten()),
                        (None, crate::model::NamespaceScope::Named(name)) => {
                            Box::new(self.pods_by_namespace.get(name.as_str()).into_iter().flatten())
                        }
                        (None, crate::model::NamespaceScope::Matching(_)) => {
                            Box::new(self.pods_by_namespace.values().flatten())
                        }
                    };
                    for owner in owners {
                        if self
                            .checks
                            .compiled_identity(*owner)
                            .is_some_and(|identity| self.pod_selected(pods, identity))
                        {
                            atoms.extend(self.partition.atoms_of(Some(*owner)));
                        }
                    }
                }
            }
        }
        atoms.sort_unstable();
        atoms.dedup();
        atoms
    }

    /// Declared identities carrying every label of `wanted`.
    fn identities_matching(&self, wanted: &Labels) -> Vec<OwnerId> {
        let smallest = wanted
            .iter()
            .map(|(k, v)| self.by_label.get(&(k.clone(), v.clone())))
            .min_by_key(|set| set.map_or(0, HashSet::len));
        match smallest {
            None => self.checks.compiled_identities().map(|(id, _)| id).collect(),
            Some(None) => Vec::new(),
            Some(Some(ids)) => ids
                .iter()
                .copied()
                .filter(|id| self.checks.compiled_identity(*id).is_some_and(|i| labels_match(wanted, i.labels())))
                .collect(),
        }
    }

    /// Selects rule `id` again and marks the pairs it gained or lost.
    fn reselect(&mut self, id: u32, dirty_pairs: &mut PairSet) {
        let Some(active) = self.active.get(&id) else { return };
        let from = self.select(&active.rule.from);
        let to = self.select(&active.rule.to);
        let active = self.active.get_mut(&id).expect("looked up above");
        let old = std::mem::take(&mut active.selected);
        let (old_from, old_to) = (old.list(End::From), old.list(End::To));
        let (old_from, old_to) = (old_from.as_slice(), old_to.as_slice());
        let gained_from = difference(&from, old_from);
        let lost_from = difference(old_from, &from);
        let gained_to = difference(&to, old_to);
        let lost_to = difference(old_to, &to);
        let mut mark = |sources: &[IdentityId], destinations: &[IdentityId]| {
            for &src in sources {
                for &dst in destinations {
                    dirty_pairs.insert((src, dst));
                }
            }
        };
        mark(&gained_from, &to);
        mark(&from, &gained_to);
        mark(&lost_from, old_to);
        mark(old_from, &lost_to);
        // A freshly activated rule has empty old sets: all its pairs are new.
        if self.enforcement != Enforcement::Always {
            match self.active.get(&id).map(|a| a.rule.side) {
                Some(Side::Ingress) => self.reisolate.extend(gained_to.iter().chain(&lost_to).copied()),
                Some(Side::Egress) => self.reisolate.extend(gained_from.iter().chain(&lost_from).copied()),
                _ => {}
            }
        }
        for &src in &lost_from {
            self.unfile(src, End::From, id);
        }
        for &dst in &lost_to {
            self.unfile(dst, End::To, id);
        }
        for &src in &gained_from {
            self.rules_by_atom.get_or_default(src).insert(id, End::From);
        }
        for &dst in &gained_to {
            self.rules_by_atom.get_or_default(dst).insert(id, End::To);
        }
        let active = self.active.get_mut(&id).expect("looked up above");
        active.selected = BothEnds::from_ends(&from, &to);
    }

    /// Takes rule `id` off the rules selecting `atom` at `end`.
    fn unfile(&mut self, atom: IdentityId, end: End, id: u32) {
        if let Some(rules) = self.rules_by_atom.get_mut(&atom) {
            rules.remove(id, end);
            if rules.is_empty() {
                self.rules_by_atom.remove(&atom);
            }
        }
    }

    /// Resolves one pair's claims again and records what its entries became.
    fn resolve_pair(
        &mut self,
        src: IdentityId,
        dst: IdentityId,
        policy: &mut Recorder<(u32, PolicyKeyData), PolicyValue>,
        reach_changed: &mut BTreeSet<IdentityId>,
    ) {
        let mut claims: Vec<Claim<&str>> = Vec::new();
        let dst_ports = || {
            let owner = self.partition.owner_of(dst).flatten()?;
            Some(&self.checks.compiled_identity(owner)?.pod()?.ports)
        };
        for id in self.rules_by_atom.get(&src).into_iter().flat_map(|rules| rules.at(End::From)) {
            let Some(active) = self.active.get(&id) else { continue };
            if active.selected.contains(dst, End::To) {
                let rule = &active.rule;
                let named = (rule.ports().is_some() && !rule.named_ports().is_empty()).then(dst_ports).flatten();
                let named = named.into_iter().flat_map(|ports| named_port_ranges(rule.named_ports(), ports));
                claims.extend(rule_ranges(rule.ports()).chain(named).map(|(first, last)| Claim {
                    action: rule.action,
                    order: &*rule.name,
                    rule_index: id,
                    first,
                    last,
                    side: rule.side,
                }));
            }
        }
        let mut entries = Vec::new();
        if !claims.is_empty() {
            let ends = Ends::of(self.isolation(src), self.isolation(dst));
            pair_entries(src, dst, &claims, ends, OPEN_ORDER, &mut entries);
        }
        let (old_one, old_more) = self.pairs.take((src, dst));
        let had_entries = old_one.is_some() || !old_more.is_empty();
        if src == IDENTITY_WORLD && had_entries == entries.is_empty() {
            reach_changed.insert(dst);
        }
        for entry in old_one.iter().chain(&*old_more).map(|entry| entry.entry(src, dst)) {
            policy.record((entry.prefix_len, entry.key), Some(entry.value), None);
            self.counts.policy(entry.prefix_len, -1);
        }
        for entry in &entries {
            policy.record((entry.prefix_len, entry.key), None, Some(entry.value));
            self.counts.policy(entry.prefix_len, 1);
        }
        self.pairs.set((src, dst), &entries);
    }

    /// What the identity maps answer for `addr` before the node's own
    /// addresses: the longest entry containing it, else `world`.
    #[must_use]
    pub fn lookup_identity(&self, addr: IpAddr) -> IdentityValue {
        self.partition.lookup(addr)
    }

    /// What the maps of this state decide for `packet`, named: the
    /// identities owning its addresses (the node's own `hosts` first, as the
    /// map writer writes them over the policy's) and the rule whose entry
    /// covers it, or none for the zero-trust default. Audit modes aside,
    /// this is the reference evaluator's answer for the rules in force (the
    /// engine proptest holds the entries to a full compile, and the
    /// differential test holds those to the evaluator), found with a few
    /// lookups whatever the policy's size: the daemon describes kernel
    /// events with it, where an index of the whole policy would have to be
    /// rebuilt for every change.
    #[must_use]
    pub fn describe(&self, packet: &crate::eval::Packet, hosts: &[IpAddr]) -> crate::eval::Decision {
        use crate::eval::{Decision, Verdict};
        use enforcer_common::{ACTION_ALLOW, DropReason};
        let identity = |addr: IpAddr| -> (IdentityId, String, Option<String>) {
            if hosts.contains(&addr) {
                return (IDENTITY_HOST, HOST.to_owned(), None);
            }
            let id = self.partition.lookup(addr).id;
            let owner = self.partition.owner_of(id).flatten();
            let name = owner.and_then(|owner| self.checks.identity_name(owner));
            let pod = owner.and_then(|owner| self.pod_name(owner, addr));
            (id, name.map_or_else(|| WORLD.to_owned(), ToString::to_string), pod)
        };
        let ((src, src_identity, src_pod), (dst, dst_identity, dst_pod)) = (identity(packet.src), identity(packet.dst));
        let wanted = u32::from(packet.protocol) << 16 | u32::from(packet.port);
        let covering = self.pairs.get((src, dst)).iter().map(|entry| entry.entry(src, dst)).find(|entry| {
            let length = entry.prefix_len.saturating_sub(POLICY_KEY_IDENTITY_BITS).min(24);
            let bits = u32::from(entry.key.protocol) << 16 | u32::from(u16::from_be_bytes(entry.key.port));
            length == 0 || wanted >> (24 - length) == bits >> (24 - length)
        });
        let flags = |id: IdentityId| if id == IDENTITY_HOST { self.host_flags() } else { self.partition.flags(id) };
        let (verdict, rule) = match covering {
            None if enforcer_common::open_between(flags(src), flags(dst)) => (Verdict::Forward, None),
            None => (Verdict::Drop(DropReason::DefaultDeny), None),
            Some(entry) => {
                let rule = self.active.get(&entry.value.rule_index).map(|rule| rule.rule.name.to_string());
                let verdict = if entry.value.action == ACTION_ALLOW {
                    Verdict::Forward
                } else {
                    Verdict::Drop(DropReason::DenyRule)
                };
                (verdict, rule)
            }
        };
        Decision { verdict, src_identity, dst_identity, rule, src_pod, dst_pod }
    }

    /// The addresses `target` stands for in the policy in force: none for
    /// a name, pod or selector nothing matches (yet).
    #[must_use]
    pub fn resolve_target(&self, target: &crate::target::Target) -> Vec<IpNet> {
        use crate::target::Target;
        let nets = |identity: &StoredIdentity| identity.addresses().collect::<Vec<_>>();
        match target {
            Target::Net(net) => vec![*net],
            Target::Identity(name) => {
                let id = self.checks.identity_id(name);
                id.and_then(|id| self.checks.compiled_identity(id)).map(|identity| nets(identity)).unwrap_or_default()
            }
            Target::Pod { namespace, name } => self
                .checks
                .compiled_declarations()
                .flat_map(|(_, declared)| declared.iter())
                .filter(|d| d.pod().is_some_and(|pod| pod.namespace == *namespace && pod.name == *name))
                .flat_map(|d| nets(d))
                .collect(),
            Target::Selector { namespace, labels } => self
                .checks
                .compiled_declarations()
                .map(|(compiled, _)| compiled)
                .filter(|identity| {
                    namespace
                        .as_ref()
                        .is_none_or(|namespace| identity.pod().is_some_and(|pod| pod.namespace == *namespace))
                        && labels.iter().all(|(key, value)| identity.labels().get(key).is_some_and(|v| **v == **value))
                })
                .flat_map(|identity| nets(identity))
                .collect(),
        }
    }

    /// The namespace and labels of the pod identity `name`, if it is one
    /// (what a `NetworkPolicy` selects it by).
    #[must_use]
    pub fn pod_identity(&self, name: &str) -> Option<(String, std::collections::BTreeMap<String, String>)> {
        let identity = self.checks.compiled_identity(self.checks.identity_id(name)?)?;
        let namespace = identity.pod()?.namespace.clone();
        Some((namespace, identity.labels().iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()))
    }

    /// The pod (`namespace/name`) of identity `owner` at `addr`.
    fn pod_name(&self, owner: OwnerId, addr: IpAddr) -> Option<String> {
        let identity = self.checks.compiled_identity(owner)?;
        let namespace = &identity.pod()?.namespace;
        Some(format!("{namespace}/{}", self.checks.pod_at(owner, addr)?))
    }
}

/// The entries of each identity pair some rule claims. Most pairs have
/// one: those are kept in a table of 20-byte buckets (the pair and the
/// entry), the others beside it, where one table of lists took 24.
#[derive(Debug, Default)]
struct Pairs {
    one: NumberMap<(IdentityId, IdentityId), PairEntry>,
    more: NumberMap<(IdentityId, IdentityId), Box<[PairEntry]>>,
}

impl Pairs {
    fn contains(&self, pair: (IdentityId, IdentityId)) -> bool {
        self.one.contains_key(&pair) || (!self.more.is_empty() && self.more.contains_key(&pair))
    }

    fn get(&self, pair: (IdentityId, IdentityId)) -> &[PairEntry] {
        match self.one.get(&pair) {
            Some(one) => std::slice::from_ref(one),
            None => self.more.get(&pair).map_or(&[], |more| more),
        }
    }

    /// Takes the pair's entries out: its one entry, or its several (an
    /// empty list allocates nothing, so the usual pair costs no
    /// allocation here).
    fn take(&mut self, pair: (IdentityId, IdentityId)) -> (Option<PairEntry>, Box<[PairEntry]>) {
        match self.one.remove(&pair) {
            Some(one) => (Some(one), Box::default()),
            None => (None, self.more.remove(&pair).unwrap_or_default()),
        }
    }

    /// Keeps `entries` for the pair, which has none now.
    fn set(&mut self, pair: (IdentityId, IdentityId), entries: &[PolicyEntry]) {
        match entries {
            [] => {}
            [one] => {
                self.one.insert(pair, PairEntry::of(one));
            }
            _ => {
                self.more.insert(pair, entries.iter().map(PairEntry::of).collect());
            }
        }
    }

    fn iter(&self) -> impl Iterator<Item = ((IdentityId, IdentityId), &[PairEntry])> + '_ {
        let one = self.one.iter().map(|(pair, entry)| (*pair, std::slice::from_ref(entry)));
        one.chain(self.more.iter().map(|(pair, entries)| (*pair, &**entries)))
    }
}

/// A policy entry without its pair (the key it is kept under) and slot:
/// 12 bytes where a [`PolicyEntry`] takes 28, in a map of 100,000 pairs.
#[derive(Debug, Clone, Copy)]
struct PairEntry {
    rule_index: u32,
    port: u16,
    protocol: u8,
    /// Prefix bits in the 24-bit protocol and port space.
    bits: u8,
    action: u8,
    flags: u8,
}

// Actions and flags are kept in a byte each.
const _: () = assert!(
    enforcer_common::ACTION_ALLOW <= 0xff
        && enforcer_common::ACTION_DENY <= 0xff
        && enforcer_common::POLICY_FLAG_WHOLE_PROTOCOL <= 0xff
);

impl PairEntry {
    fn of(entry: &PolicyEntry) -> Self {
        let byte = |n: u32| u8::try_from(n).unwrap_or(u8::MAX);
        Self {
            rule_index: entry.value.rule_index,
            port: u16::from_be_bytes(entry.key.port),
            protocol: entry.key.protocol,
            bits: byte(entry.prefix_len.saturating_sub(POLICY_KEY_IDENTITY_BITS)),
            action: byte(entry.value.action),
            flags: byte(entry.value.flags),
        }
    }

    fn entry(self, src: IdentityId, dst: IdentityId) -> PolicyEntry {
        PolicyEntry {
            prefix_len: POLICY_KEY_IDENTITY_BITS + u32::from(self.bits),
            key: PolicyKeyData::new(0, src, dst, self.protocol, self.port),
            value: PolicyValue {
                action: u32::from(self.action),
                rule_index: self.rule_index,
                flags: u32::from(self.flags),
            },
        }
    }
}

/// The flags [`isolation_flags`] sets.
const ISOLATION_FLAGS: u32 = enforcer_common::IDENTITY_FLAG_OPEN_INGRESS
    | enforcer_common::IDENTITY_FLAG_OPEN_EGRESS
    | enforcer_common::IDENTITY_FLAG_NODE;

fn mode_of_owner(checks: &Checks, owner: Option<OwnerId>) -> u32 {
    match owner.and_then(|id| checks.compiled_identity(id)).map(|i| i.mode) {
        Some(Mode::Audit) => IDENTITY_FLAG_AUDIT,
        _ => 0,
    }
}

fn difference(a: &[IdentityId], b: &[IdentityId]) -> Vec<IdentityId> {
    a.iter().filter(|x| b.binary_search(x).is_err()).copied().collect()
}

fn remove_from<K, Q, S: std::hash::BuildHasher>(map: &mut HashMap<Q, SmallSet<u32>, S>, key: &K, id: u32)
where
    K: Eq + Hash + ?Sized,
    Q: Eq + Hash + std::borrow::Borrow<K>,
{
    if let Some(set) = map.get_mut(key) {
        set.remove(&id);
        if set.is_empty() {
            map.remove(key);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use super::{ActiveRule, Contents, Delta, Engine, Name, Recorder, SourceChange, compose};

    /// Per key, the first old value and the last new one; a key back where
    /// it started is no change. Keys come out in order.
    #[test]
    fn recorded_changes_keep_the_first_old_and_the_last_new_value() {
        let mut recorder = Recorder::default();
        recorder.record(7_u32, None, Some('a'));
        recorder.record(3, Some('x'), Some('y'));
        recorder.record(7, Some('a'), Some('b'));
        recorder.record(5, Some('p'), Some('q'));
        recorder.record(3, Some('y'), None);
        recorder.record(5, Some('q'), Some('p'));
        recorder.record(7, Some('b'), Some('c'));
        let delta = |key, old, new| Delta { key, old, new };
        assert_eq!(recorder.finish(), vec![delta(3, Some('x'), None), delta(7, None, Some('c'))]);
        let first = vec![delta(1, None, Some('a')), delta(2, Some('b'), None)];
        let then = [delta(2, None, Some('b')), delta(1, Some('a'), Some('c')), delta(0, Some('z'), None)];
        assert_eq!(compose(first, &then), vec![delta(0, Some('z'), None), delta(1, None, Some('c'))]);
    }

    /// One per active rule, 100,000 at scale: the rule and, for one atom
    /// at each end, both atoms inline.
    #[test]
    fn active_rules_stay_compact() {
        assert_eq!(size_of::<Option<ActiveRule>>(), 24);
        // A pair of one entry, 100,000 at scale: a 20-byte bucket.
        assert_eq!(size_of::<((u32, u32), super::PairEntry)>(), 20);
    }

    /// A file read again (the usual edit of a large policy) shares its
    /// names with what the engine holds: at 100,000 rules a second copy
    /// of each name was 3.2 MB, kept for as long as the policy.
    #[test]
    fn a_file_read_again_shares_its_names() {
        let text = |port: u16| {
            format!(
                "apiVersion: bulkhead/v1\nkind: SegmentPolicy\nmetadata: {{name: p}}\nspec:\n  identities:\n    - {{name: a, addresses: [\"10.0.0.1\"]}}\n    - {{name: b, addresses: [\"10.0.0.2\"]}}\n  rules:\n    - {{name: a-to-b, from: [{{identity: a}}], to: [{{identity: b}}], ports: [\"{port}/tcp\"]}}\n"
            )
        };
        let change = |port| vec![SourceChange { source: "p.yaml".into(), contents: Contents::Text(text(port)) }];
        let mut engine = Engine::new();
        engine.apply(change(80), SystemTime::now()).unwrap();
        engine.commit();
        engine.apply(change(81), SystemTime::now()).unwrap();
        engine.commit();
        let fragment = &engine.sources["p.yaml"];
        let rule = &fragment.rules[0];
        assert!(Name::ptr_eq(&rule.name, engine.checks.rule_name("a-to-b").unwrap()), "the rule's name");
        for identity in &fragment.identities {
            let id = engine.checks.identity_id(&identity.name).unwrap();
            assert!(Name::ptr_eq(&identity.name, engine.checks.identity_name(id).unwrap()), "{}", identity.name);
        }
        let super::StoredSelector::Identity(to) = &rule.to[0] else { panic!("a peer naming b") };
        assert!(Name::ptr_eq(to, &fragment.identities[1].name), "the peer's name is the declaration's");
    }

    /// A large file is given room for its records at once, and read again
    /// it finds room enough: the tables do not grow.
    #[test]
    fn a_file_read_again_keeps_the_room_it_was_given() {
        use std::fmt::Write as _;
        let text = |port: u16| {
            let mut text =
                "apiVersion: bulkhead/v1\nkind: SegmentPolicy\nmetadata: {name: p}\nspec:\n  identities:\n".to_owned();
            for i in 0..2000 {
                let _ = writeln!(text, "    - {{name: id{i}, addresses: [\"10.0.{}.{}\"]}}", i / 256, i % 256);
            }
            text += "  rules:\n";
            for i in 0..2000 {
                let _ = writeln!(
                    text,
                    "    - {{name: r{i}, from: [{{identity: id{i}}}], to: [{{identity: id{}}}], ports: [\"{port}/tcp\"]}}",
                    (i + 1) % 2000
                );
            }
            text
        };
        let change = |port| vec![SourceChange { source: "p.yaml".into(), contents: Contents::Text(text(port)) }];
        let mut engine = Engine::new();
        engine.apply(change(80), SystemTime::now()).unwrap();
        engine.commit();
        let (records, index, rules) = engine.checks.capacities();
        assert!((2000..2250).contains(&records), "{records}");
        assert!(index >= 2000 && rules >= 2000, "{index} {rules}");
        engine.apply(change(81), SystemTime::now()).unwrap();
        engine.commit();
        assert_eq!(engine.checks.capacities(), (records, index, rules));
    }

    /// Between changes every identity has its declaration in force
    /// compiled, so nothing is kept apart; a refused change leaves the
    /// same.
    #[test]
    fn compiled_declarations_are_kept_apart_only_within_a_change() {
        let text = |address: &str, second: &str| {
            format!(
                "apiVersion: bulkhead/v1\nkind: SegmentPolicy\nmetadata: {{name: p}}\nspec:\n  identities:\n    - {{name: a, addresses: [\"{address}\"]}}\n    - {{name: {second}, addresses: [\"10.0.0.2\"]}}\n"
            )
        };
        let change = |address: &str, second: &str| {
            vec![SourceChange { source: "p.yaml".into(), contents: Contents::Text(text(address, second)) }]
        };
        let mut engine = Engine::new();
        engine.apply(change("10.0.0.1", "b"), SystemTime::now()).unwrap();
        engine.commit();
        assert_eq!(engine.checks.compiled_apart(), 0);
        let a = engine.checks.identity_id("a").unwrap();
        let before = std::sync::Arc::clone(engine.checks.compiled_identity(a).unwrap());
        engine.apply(change("10.0.0.3", "b"), SystemTime::now()).unwrap();
        engine.commit();
        assert_eq!(engine.checks.compiled_apart(), 0);
        assert!(!std::sync::Arc::ptr_eq(&before, engine.checks.compiled_identity(a).unwrap()));
        // A duplicate name is refused, and the last good state compiled.
        assert!(engine.apply(change("10.0.0.4", "a"), SystemTime::now()).is_err());
        assert_eq!(engine.checks.compiled_apart(), 0);
        assert_eq!(engine.checks.compiled_identity_count(), 2);
    }
}
