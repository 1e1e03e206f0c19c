//! The policy as the engine keeps it between changes: each source's
//! identities and rules in a compact form, built once from the parsed
//! [`Policy`] and turned back into one when a refused change needs the
//! full validator's messages, or the audit log a diff.
//!
//! The parsed model is made to be read once: every identity, address, rule
//! and peer carries a [`Location`] (a shared file name and two numbers), a
//! label set is a B-tree with a node of its own, an identity named by a
//! rule is a string of its own. At 100,000 identities and rules that was
//! about 50 MB held for as long as the policy is enforced. Kept here, a
//! position is two or three numbers (the file is the fragment's), a
//! rule's one peer at each end packed into one each, an identity's
//! name is shared with its record in the engine and labels through the
//! engine's [`Interner`], and lists are boxed slices.

use std::collections::{BTreeMap, HashSet};
use std::num::NonZeroU64;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use ipnet::IpNet;

use super::Name;
use super::labels::Labels;
use crate::error::{Diagnostic, Location};
use crate::kubernetes::Namespace;
use crate::model::{
    Action, Address, Identity, Mode, Peer, PodInfo, PodPeer, Policy, PortName, PortSpec, Rule, Selector, Side,
};

/// Shares equal label keys and values (and namespace names): a label
/// thousands of identities carry is stored once.
#[derive(Debug, Default)]
pub(crate) struct Interner {
    names: HashSet<Name>,
    /// How many names were left after the last sweep.
    kept: usize,
}

impl Interner {
    pub(crate) fn intern(&mut self, name: &str) -> Name {
        if let Some(known) = self.names.get(name) {
            return Name::clone(known);
        }
        if self.names.len() >= 2 * self.kept.max(1024) {
            self.sweep();
        }
        let name = Name::from(name);
        self.names.insert(Name::clone(&name));
        name
    }

    /// Forgets names nothing else holds any more: names stay as long as the
    /// policy uses them, and the set stays within twice what it uses.
    fn sweep(&mut self) {
        self.names.retain(|name| Name::strong_count(name) > 1);
        self.names.shrink_to_fit();
        self.kept = self.names.len();
    }
}

/// Where a fragment being built finds the names it shares with the rest
/// of the policy.
pub(crate) struct Names<'n> {
    /// Label keys and values.
    pub(crate) labels: &'n mut Interner,
    /// An identity name the engine knows already, as its record holds it:
    /// a name a rule refers to is stored once, with no set of every name
    /// beside the records (1.2 MB at 100,000 identities).
    pub(crate) known: &'n dyn Fn(&str) -> Option<Name>,
    /// A rule name the engine knows already, as its record holds it: a
    /// file read again shares its rules' names with the records (100,000
    /// rules kept a second copy of each name, 3.2 MB).
    pub(crate) known_rule: &'n dyn Fn(&str) -> Option<Name>,
    /// Identity names new in this change, shared by all its fragments.
    pub(crate) fresh: &'n mut HashSet<Name>,
}

impl Names<'_> {
    fn identity(&mut self, name: &str) -> Name {
        if let Some(known) = (self.known)(name) {
            return known;
        }
        if let Some(fresh) = self.fresh.get(name) {
            return Name::clone(fresh);
        }
        let name = Name::from(name);
        self.fresh.insert(Name::clone(&name));
        name
    }

    fn rule(&mut self, name: String) -> Name {
        (self.known_rule)(&name).unwrap_or_else(|| Name::from(name))
    }
}

/// A position in one of the fragment's files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Pos {
    file: u32,
    at: LineColumn,
}

/// A position in a file known from elsewhere: an address is in its
/// identity's file and a peer in its rule's, as every parser writes them,
/// so they keep 8 bytes where a whole [`Pos`] takes 12 (and, with
/// alignment, a rule's two peers 16 more).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct LineColumn {
    line: u32,
    column: u32,
}

/// An identity, 48 bytes (an allocation of 64 with its `Arc`): its first
/// address inline, its position packed relative to the identity's
/// ([`PackedAt`]); labels, pod, more addresses and a file other than the
/// fragment's first behind one thin pointer (a plain identity has none).
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct StoredIdentity {
    pub(crate) name: Name,
    extras: Option<Box<IdentityExtras>>,
    /// In the fragment's first file, unless the extras name another.
    at: LineColumn,
    /// The first address's position, unless it does not pack (then it is
    /// in the extras).
    first_at: PackedAt,
    first: Option<IpNet>,
    pub(crate) mode: Mode,
}

#[derive(Debug, PartialEq, Eq)]
struct IdentityExtras {
    labels: Labels,
    /// A pod's namespace, name and named ports.
    pod: Option<PodInfo>,
    /// The addresses after the first.
    more: Vec<StoredAddress>,
    /// The identity's file among the fragment's, when not the first.
    file: u32,
    /// The first address's position, when it does not pack.
    first_at: Option<LineColumn>,
}

/// The label set of an identity without labels.
static NO_LABELS: std::sync::LazyLock<Labels> = std::sync::LazyLock::new(Labels::default);

impl StoredIdentity {
    fn with(
        name: Name,
        addresses: Vec<StoredAddress>,
        mode: Mode,
        labels: Labels,
        pod: Option<PodInfo>,
        Pos { file, at }: Pos,
    ) -> Self {
        let mut addresses = addresses.into_iter();
        let first = addresses.next();
        let packed = first.as_ref().map_or(Some(PackedAt::NONE), |first| PackedAt::pack(at, first.at));
        let rest: Vec<StoredAddress> = addresses.collect();
        let plain = labels.is_empty() && pod.is_none() && rest.is_empty() && file == 0 && packed.is_some();
        let extras = (!plain).then(|| {
            let first_at = packed.is_none().then(|| first.as_ref().map(|first| first.at)).flatten();
            Box::new(IdentityExtras { labels, pod, more: rest, file, first_at })
        });
        Self { name, extras, at, first_at: packed.unwrap_or(PackedAt::NONE), first: first.map(|first| first.net), mode }
    }

    /// The identity's addresses.
    pub(crate) fn addresses(&self) -> impl Iterator<Item = IpNet> + '_ {
        let more = self.extras.as_ref().map_or(&[][..], |extras| &extras.more);
        self.first.into_iter().chain(more.iter().map(|address| address.net))
    }

    /// The identity's addresses with their positions.
    fn stored_addresses(&self) -> Vec<StoredAddress> {
        let first_at = match self.extras.as_ref().and_then(|extras| extras.first_at) {
            Some(at) => at,
            None => self.first_at.unpack(self.at),
        };
        let first = self.first.map(|net| StoredAddress { net, at: first_at });
        let more = self.extras.as_ref().map_or(&[][..], |extras| &extras.more);
        first.into_iter().chain(more.iter().map(|address| StoredAddress { net: address.net, at: address.at })).collect()
    }

    /// The identity's own position.
    fn pos(&self) -> Pos {
        Pos { file: self.extras.as_ref().map_or(0, |extras| extras.file), at: self.at }
    }

    pub(crate) fn labels(&self) -> &Labels {
        self.extras.as_ref().map_or(&NO_LABELS, |extras| &extras.labels)
    }

    /// A pod's namespace, name and named ports, when this is a pod's.
    pub(crate) fn pod(&self) -> Option<&PodInfo> {
        self.extras.as_ref()?.pod.as_ref()
    }

    /// [`Identity::is_pod_like`], kept.
    pub(crate) fn is_pod_like(&self, other: &StoredIdentity) -> bool {
        PodInfo::alike(self.pod(), other.pod()) && self.labels() == other.labels() && self.mode == other.mode
    }

    /// The one identity that pods alike (`declarations`, at least one, all
    /// [`Self::is_pod_like`] the first) are: the first with the addresses
    /// of all.
    pub(crate) fn merged(declarations: &[Arc<StoredIdentity>]) -> StoredIdentity {
        let first = &declarations[0];
        let addresses = declarations.iter().flat_map(|declared| declared.stored_addresses()).collect();
        let (labels, pod) = (first.labels().clone(), first.pod().cloned());
        StoredIdentity::with(Name::clone(&first.name), addresses, first.mode, labels, pod, first.pos())
    }

    /// The pod's own name, when this declaration is a pod's.
    pub(crate) fn pod_name(&self) -> Option<&str> {
        self.pod().map(|pod| pod.name.as_str())
    }
}

#[derive(Debug, PartialEq, Eq)]
pub(crate) struct StoredAddress {
    pub(crate) net: IpNet,
    /// In the identity's file.
    at: LineColumn,
}

/// A rule, 80 bytes (an allocation of 96 with its `Arc`): its peers
/// without their positions, which for the usual rule of one peer at each
/// end are packed beside them ([`PackedAt`]); what few rules have (more
/// peers, more ports, an expiry, ports by name, a file other than the
/// fragment's first) in a [`RuleTail`] behind one thin pointer.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct StoredRule {
    pub(crate) name: Name,
    pub(crate) from: Few<StoredSelector>,
    pub(crate) to: Few<StoredSelector>,
    ports: RulePorts,
    /// In the fragment's first file, unless the tail names another.
    at: LineColumn,
    /// The one peer's position at each end, when both ends have at most
    /// one and their positions pack; else every peer's is in the tail.
    peers_at: [PackedAt; 2],
    pub(crate) action: Action,
    pub(crate) side: Side,
}

/// A rule's ports: most name one port or range, or none (every protocol).
#[derive(Debug, PartialEq, Eq)]
enum RulePorts {
    All,
    One(PortSpec),
    Tail(Box<RuleTail>),
}

#[derive(Debug, PartialEq, Eq)]
struct RuleTail {
    /// `None` when `ports` is omitted: the rule covers every protocol.
    ports: Option<Box<[PortSpec]>>,
    /// When the rule lapses, in nanoseconds since the epoch (see
    /// [`StoredRule::expires`]).
    expires_ns: Option<NonZeroU64>,
    named_ports: Box<[PortName]>,
    /// The rule's file among the fragment's, when not the first.
    file: u32,
    /// Every peer's position, `from` then `to`, when they are not packed.
    peers_at: Option<Box<[LineColumn]>>,
}

/// A peer's position relative to its rule's: lines after the rule's in
/// the top 12 bits, the column in the low 20. [`PackedAt::NONE`] when
/// there is none, or it does not fit (a peer 4,096 lines from its rule,
/// or a column past a million, as in a policy written on one line).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct PackedAt(u32);

impl PackedAt {
    const NONE: Self = Self(u32::MAX);
    const COLUMN_BITS: u32 = 20;

    fn pack(rule: LineColumn, peer: LineColumn) -> Option<Self> {
        let lines = peer.line.checked_sub(rule.line)?;
        let fits = lines < 1 << (32 - Self::COLUMN_BITS) && peer.column < (1 << Self::COLUMN_BITS) - 1;
        fits.then_some(Self((lines << Self::COLUMN_BITS) | peer.column))
    }

    fn unpack(self, rule: LineColumn) -> LineColumn {
        LineColumn { line: rule.line + (self.0 >> Self::COLUMN_BITS), column: self.0 & ((1 << Self::COLUMN_BITS) - 1) }
    }
}

impl StoredRule {
    fn tail(&self) -> Option<&RuleTail> {
        match &self.ports {
            RulePorts::Tail(tail) => Some(tail),
            RulePorts::All | RulePorts::One(_) => None,
        }
    }

    /// The rule's ports; `None` when it covers every protocol.
    pub(crate) fn ports(&self) -> Option<&[PortSpec]> {
        match &self.ports {
            RulePorts::All => None,
            RulePorts::One(one) => Some(std::slice::from_ref(one)),
            RulePorts::Tail(tail) => tail.ports.as_deref(),
        }
    }

    /// When the rule lapses by itself, if it does.
    pub(crate) fn expires(&self) -> Option<SystemTime> {
        let ns = self.tail()?.expires_ns?;
        Some(SystemTime::UNIX_EPOCH + Duration::from_nanos(ns.get()))
    }

    /// Ports by name, each looked up among the destination pod's ports.
    pub(crate) fn named_ports(&self) -> &[PortName] {
        self.tail().map_or(&[], |tail| &tail.named_ports)
    }

    /// Whether the rule is in force at `now`.
    pub(crate) fn is_active_at(&self, now: SystemTime) -> bool {
        self.expires().is_none_or(|expires| now < expires)
    }

    /// Whether two versions of a rule compile alike (positions aside).
    pub(crate) fn compiles_like(&self, other: &StoredRule) -> bool {
        self.action == other.action
            && self.side == other.side
            && self.ports() == other.ports()
            && self.tail().and_then(|tail| tail.expires_ns) == other.tail().and_then(|tail| tail.expires_ns)
            && self.named_ports() == other.named_ports()
            && self.from == other.from
            && self.to == other.to
    }

    /// The rule's own position.
    fn pos(&self) -> Pos {
        Pos { file: self.tail().map_or(0, |tail| tail.file), at: self.at }
    }

    /// The positions of its peers, `from` then `to`.
    fn peer_positions(&self) -> Vec<LineColumn> {
        if let Some(all) = self.tail().and_then(|tail| tail.peers_at.as_deref()) {
            return all.to_vec();
        }
        let ends = [(self.from.len(), self.peers_at[0]), (self.to.len(), self.peers_at[1])];
        ends.iter().filter(|(peers, _)| *peers == 1).map(|(_, packed)| packed.unpack(self.at)).collect()
    }
}

/// [`Selector`], compact: all but the common peer, one naming an identity,
/// are boxed, so every peer is a thin pointer and a position.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum StoredSelector {
    Identity(Name),
    Labels(Box<Labels>),
    Cidr(Box<CidrPeer>),
    Pods(Box<PodPeer>),
}

#[derive(Debug, PartialEq, Eq)]
pub(crate) struct CidrPeer {
    pub(crate) cidr: IpNet,
    pub(crate) except: Box<[IpNet]>,
}

/// A list that is mostly of one item (an identity's addresses, a rule's
/// peers and ports): that item is kept inline, more behind a thin pointer
/// (a boxed slice's would make every list 8 bytes larger for the rare
/// long one).
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Few<T> {
    None,
    One(T),
    #[allow(clippy::box_collection, reason = "a thin pointer, for the enum's size; see above")]
    More(Box<Vec<T>>),
}

impl<T> std::ops::Deref for Few<T> {
    type Target = [T];

    fn deref(&self) -> &[T] {
        match self {
            Self::None => &[],
            Self::One(one) => std::slice::from_ref(one),
            Self::More(more) => more,
        }
    }
}

impl<T> FromIterator<T> for Few<T> {
    fn from_iter<I: IntoIterator<Item = T>>(items: I) -> Self {
        let mut items = items.into_iter();
        match (items.next(), items.next()) {
            (None, _) => Self::None,
            (Some(one), None) => Self::One(one),
            (Some(first), Some(second)) => {
                let mut more: Vec<T> = [first, second].into_iter().chain(items).collect();
                more.shrink_to_fit();
                Self::More(Box::new(more))
            }
        }
    }
}

impl<'a, T> IntoIterator for &'a Few<T> {
    type Item = &'a T;
    type IntoIter = std::slice::Iter<'a, T>;

    fn into_iter(self) -> Self::IntoIter {
        self.iter()
    }
}

/// `time` as kept in a [`StoredRule`]: times before the epoch (which no
/// policy means) as its first nanosecond, times past 2554 as the last
/// one. Exact for every time between, so the round trip through
/// [`StoredRule::expires`] gives the time back.
fn nanos_since_epoch(time: SystemTime) -> NonZeroU64 {
    let nanos = time.duration_since(SystemTime::UNIX_EPOCH).map_or(1, |since| since.as_nanos());
    NonZeroU64::new(u64::try_from(nanos).unwrap_or(u64::MAX)).unwrap_or(NonZeroU64::MIN)
}

/// What one source holds: its part of the policy.
#[derive(Debug, Default)]
pub struct Fragment {
    documents: Box<[String]>,
    /// The files positions refer to (a file source has one).
    files: Box<[Arc<str>]>,
    pub(crate) identities: Box<[Arc<StoredIdentity>]>,
    pub(crate) rules: Box<[Arc<StoredRule>]>,
    pub(crate) namespaces: Box<[Namespace]>,
    /// What was read but skipped or not enforced.
    pub(crate) notes: Box<[Diagnostic]>,
}

/// Builds a [`Fragment`] an item at a time, as the parser reads them: a
/// large file's items never exist all at once in the parsed model.
pub(crate) struct FragmentBuilder<'a, 'n> {
    names: &'a mut Names<'n>,
    documents: Vec<String>,
    files: Vec<Arc<str>>,
    identities: Vec<Arc<StoredIdentity>>,
    rules: Vec<Arc<StoredRule>>,
    namespaces: Vec<Namespace>,
    notes: Vec<Diagnostic>,
}

impl<'a, 'n> FragmentBuilder<'a, 'n> {
    pub(crate) fn new(names: &'a mut Names<'n>) -> Self {
        Self {
            names,
            documents: Vec::new(),
            files: Vec::new(),
            identities: Vec::new(),
            rules: Vec::new(),
            namespaces: Vec::new(),
            notes: Vec::new(),
        }
    }

    pub(crate) fn finish(self) -> Fragment {
        Fragment {
            documents: self.documents.into_boxed_slice(),
            files: self.files.into_boxed_slice(),
            identities: self.identities.into_boxed_slice(),
            rules: self.rules.into_boxed_slice(),
            namespaces: self.namespaces.into_boxed_slice(),
            notes: self.notes.into_boxed_slice(),
        }
    }

    fn line_column(location: &Location) -> LineColumn {
        LineColumn { line: location.line, column: location.column }
    }

    fn pos(&mut self, location: &Location) -> Pos {
        let known = self.files.iter().position(|file| Arc::ptr_eq(file, &location.file) || *file == location.file);
        let file = known.unwrap_or_else(|| {
            self.files.push(Arc::clone(&location.file));
            self.files.len() - 1
        });
        Pos { file: u32::try_from(file).unwrap_or(u32::MAX), at: Self::line_column(location) }
    }

    /// The peers' selectors; their positions are appended to `positions`.
    fn peers(&mut self, peers: Vec<Peer>, positions: &mut Vec<LineColumn>) -> Few<StoredSelector> {
        peers
            .into_iter()
            .map(|peer| {
                positions.push(Self::line_column(&peer.location));
                match peer.selector {
                    Selector::Identity(name) => StoredSelector::Identity(self.names.identity(&name)),
                    Selector::Labels(labels) => {
                        StoredSelector::Labels(Box::new(Labels::new(&labels, self.names.labels)))
                    }
                    Selector::Cidr { cidr, except } => {
                        StoredSelector::Cidr(Box::new(CidrPeer { cidr, except: except.into_boxed_slice() }))
                    }
                    Selector::Pods(pods) => StoredSelector::Pods(Box::new(pods)),
                }
            })
            .collect()
    }
}

impl crate::parse::Collect for FragmentBuilder<'_, '_> {
    type Identity = Arc<StoredIdentity>;
    type Rule = Arc<StoredRule>;

    fn identity(&mut self, identity: Identity) -> Arc<StoredIdentity> {
        let addresses = identity
            .addresses
            .iter()
            .map(|address| StoredAddress { net: address.net, at: Self::line_column(&address.location) })
            .collect();
        let name = self.names.identity(&identity.name);
        let labels = Labels::new(&identity.labels, self.names.labels);
        let at = self.pos(&identity.location);
        Arc::new(StoredIdentity::with(name, addresses, identity.mode, labels, identity.pod, at))
    }

    fn rule(&mut self, rule: Rule) -> Arc<StoredRule> {
        let mut positions = Vec::new();
        let from = self.peers(rule.from, &mut positions);
        let to = self.peers(rule.to, &mut positions);
        let Pos { file, at } = self.pos(&rule.location);
        // The one peer at each end, packed, when that is what there is.
        let packed = (from.len() <= 1 && to.len() <= 1).then(|| {
            let mut at_each = positions.iter();
            let mut end = |peers: usize| match peers {
                0 => Some(PackedAt::NONE),
                _ => at_each.next().and_then(|peer| PackedAt::pack(at, *peer)),
            };
            Some([end(from.len())?, end(to.len())?])
        });
        let peers_at = packed.flatten();
        let one_port = match rule.ports.as_deref() {
            None => Some(RulePorts::All),
            Some([one]) => Some(RulePorts::One(*one)),
            Some(_) => None,
        };
        let ports = match one_port {
            Some(ports) if file == 0 && peers_at.is_some() && rule.expires.is_none() && rule.named_ports.is_empty() => {
                ports
            }
            _ => RulePorts::Tail(Box::new(RuleTail {
                ports: rule.ports.map(Vec::into_boxed_slice),
                expires_ns: rule.expires.map(nanos_since_epoch),
                named_ports: rule.named_ports.into_boxed_slice(),
                file,
                peers_at: peers_at.is_none().then(|| positions.into_boxed_slice()),
            })),
        };
        Arc::new(StoredRule {
            name: self.names.rule(rule.name),
            from,
            to,
            ports,
            at,
            peers_at: peers_at.unwrap_or([PackedAt::NONE; 2]),
            action: rule.action,
            side: rule.side,
        })
    }

    fn push_document(&mut self, name: String) {
        self.documents.push(name);
    }

    fn push_identity(&mut self, identity: Arc<StoredIdentity>) {
        self.identities.push(identity);
    }

    fn push_rule(&mut self, rule: Arc<StoredRule>) {
        self.rules.push(rule);
    }

    fn push_namespace(&mut self, namespace: Namespace) {
        self.namespaces.push(namespace);
    }

    fn push_note(&mut self, note: Diagnostic) {
        self.notes.push(note);
    }
}

impl Fragment {
    /// Stores a parsed policy, sharing names through `names`.
    pub(crate) fn new(policy: Policy, names: &mut Names<'_>) -> Self {
        use crate::parse::Collect as _;
        let mut builder = FragmentBuilder::new(names);
        for name in policy.documents {
            builder.push_document(name);
        }
        for identity in policy.identities {
            let kept = builder.identity(identity);
            builder.push_identity(kept);
        }
        for rule in policy.rules {
            let kept = builder.rule(rule);
            builder.push_rule(kept);
        }
        for namespace in policy.namespaces {
            builder.push_namespace(namespace);
        }
        for note in policy.notes {
            builder.push_note(note);
        }
        builder.finish()
    }

    /// Reads one file's text straight into a fragment, an item at a time.
    pub(crate) fn parse(file: &Arc<str>, text: &str, names: &mut Names<'_>, problems: &mut Vec<Diagnostic>) -> Self {
        let mut builder = FragmentBuilder::new(names);
        crate::parse::parse_file_into(file, text, &mut builder, problems);
        builder.finish()
    }

    /// Appends this fragment's part of the policy, as parsed, to `policy`.
    pub(crate) fn extend_policy(&self, policy: &mut Policy) {
        let location = |within: Pos, at: LineColumn| Location {
            file: self.files.get(within.file as usize).map_or_else(|| Arc::from(""), Arc::clone),
            line: at.line,
            column: at.column,
        };
        policy.documents.extend(self.documents.iter().cloned());
        policy.identities.extend(self.identities.iter().map(|identity| {
            Identity {
                name: identity.name.to_string(),
                labels: identity.labels().to_map(),
                addresses: identity
                    .stored_addresses()
                    .into_iter()
                    .map(|address| Address { net: address.net, location: location(identity.pos(), address.at) })
                    .collect(),
                mode: identity.mode,
                pod: identity.pod().cloned(),
                location: location(identity.pos(), identity.at),
            }
        }));
        let peers = |rule: Pos, peers: &[StoredSelector], at: &mut dyn Iterator<Item = LineColumn>| -> Vec<Peer> {
            peers
                .iter()
                .map(|peer| Peer {
                    selector: match peer {
                        StoredSelector::Identity(name) => Selector::Identity(name.to_string()),
                        StoredSelector::Labels(labels) => Selector::Labels(labels.to_map()),
                        StoredSelector::Cidr(peer) => Selector::Cidr { cidr: peer.cidr, except: peer.except.to_vec() },
                        StoredSelector::Pods(pods) => Selector::Pods(PodPeer::clone(pods)),
                    },
                    location: location(rule, at.next().unwrap_or(rule.at)),
                })
                .collect()
        };
        policy.rules.extend(self.rules.iter().map(|rule| {
            let pos = rule.pos();
            let mut at = rule.peer_positions().into_iter();
            Rule {
                name: rule.name.to_string(),
                action: rule.action,
                from: peers(pos, &rule.from, &mut at),
                to: peers(pos, &rule.to, &mut at),
                ports: rule.ports().map(<[PortSpec]>::to_vec),
                named_ports: rule.named_ports().to_vec(),
                expires: rule.expires(),
                side: rule.side,
                location: location(pos, rule.at),
            }
        }));
        policy.namespaces.extend(self.namespaces.iter().cloned());
        policy.notes.extend(self.notes.iter().cloned());
    }
}

impl Labels {
    /// A label set from the parsed model's map, names shared.
    pub(crate) fn new(labels: &BTreeMap<String, String>, names: &mut Interner) -> Self {
        Self::from_sorted(labels.iter().map(|(key, value)| (names.intern(key), names.intern(value))).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::{Few, LineColumn, PackedAt, StoredIdentity, StoredRule, StoredSelector};

    #[test]
    fn few_keeps_order_and_items() {
        for n in 0..5u32 {
            let few: Few<u32> = (0..n).collect();
            assert_eq!(&*few, (0..n).collect::<Vec<_>>().as_slice());
            assert_eq!(matches!(few, Few::More(_)), n > 1);
        }
    }

    /// The sizes the module's compactness rests on: a rule is one
    /// allocation of 96 bytes with its `Arc` (the allocator's size class;
    /// 81 bytes would take 112).
    #[test]
    fn records_stay_compact() {
        assert_eq!(size_of::<Few<StoredSelector>>(), 16);
        assert_eq!(size_of::<super::RulePorts>(), 16);
        assert!(size_of::<StoredRule>() <= 80);
    }

    #[test]
    fn packed_positions_come_back_or_do_not_pack() {
        let rule = LineColumn { line: 7, column: 5 };
        for (line, column) in [(7, 1), (7, 900), (8, 3), (7 + 4095, (1 << 20) - 2)] {
            let peer = LineColumn { line, column };
            let packed = PackedAt::pack(rule, peer).expect("fits");
            assert_ne!(packed, PackedAt::NONE);
            assert_eq!(packed.unpack(rule), peer);
        }
        for (line, column) in [(6, 1), (7 + 4096, 1), (7, (1 << 20) - 1), (7, 5_000_000)] {
            assert_eq!(PackedAt::pack(rule, LineColumn { line, column }), None);
        }
    }

    /// Every identity and rule comes back as parsed, positions included,
    /// whether they were packed or kept whole.
    #[test]
    fn items_come_back_with_their_positions() {
        use std::collections::HashSet;

        let wide = " ".repeat(1_100_000);
        let text = format!(
            "apiVersion: bulkhead/v1\nkind: SegmentPolicy\nmetadata: {{name: p}}\nspec:\n  identities:\n    \
             - {{name: a, addresses: [\"10.0.0.1\"]}}\n    - {{name: b, addresses: [\"10.0.0.2\"]}}\n    \
             - name: c\n      addresses:\n        - 10.0.0.3\n        - 10.0.3.0/24\n    \
             - {{name: d, addresses: [{wide}\"10.0.0.4\"]}}\n  rules:\n    \
             - {{name: flow, from: [{{identity: a}}], to: [{{identity: b}}], ports: [\"80/tcp\"]}}\n    \
             - name: block\n      from:\n        - identity: a\n        - identity: b\n      to:\n        \
             - identity: b\n      ports: [\"80/tcp\", \"443/tcp\"]\n    \
             - name: open\n      from: [{{identity: a}}]\n      to: [{{cidr: 10.1.0.0/16}}]\n    \
             - {{name: wide, from: [{{identity: b}}], to: [{wide}{{identity: a}}], ports: [\"53/udp\"]}}\n"
        );
        let parsed = crate::parse_str("p.yaml", &text).expect("a valid policy");
        let (mut labels, mut fresh) = (super::Interner::default(), HashSet::new());
        let mut names =
            super::Names { labels: &mut labels, known: &|_| None, known_rule: &|_| None, fresh: &mut fresh };
        let fragment = super::Fragment::new(parsed.clone(), &mut names);
        let inline = |name: &str| fragment.rules.iter().find(|r| &*r.name == name).map(|r| r.tail().is_none());
        assert_eq!(inline("flow"), Some(true));
        assert_eq!(inline("open"), Some(true));
        assert_eq!(inline("block"), Some(false));
        assert_eq!(inline("wide"), Some(false));
        let plain = |name: &str| fragment.identities.iter().find(|i| &*i.name == name).map(|i| i.extras.is_none());
        assert_eq!((plain("a"), plain("c"), plain("d")), (Some(true), Some(false), Some(false)));
        let mut back = crate::model::Policy::default();
        fragment.extend_policy(&mut back);
        assert_eq!(format!("{:?}", back.rules), format!("{:?}", parsed.rules));
        assert_eq!(format!("{:?}", back.identities), format!("{:?}", parsed.identities));
    }

    #[test]
    fn expiry_times_come_back_exactly() {
        use std::time::{Duration, SystemTime};
        for since in
            [Duration::from_nanos(1), Duration::new(1_800_000_000, 123_456_789), Duration::from_secs(4_000_000_000)]
        {
            let time = SystemTime::UNIX_EPOCH + since;
            let ns = super::nanos_since_epoch(time);
            assert_eq!(SystemTime::UNIX_EPOCH + Duration::from_nanos(ns.get()), time);
        }
        // 48: with its `Arc`, an allocation of 64 bytes.
        assert!(size_of::<StoredIdentity>() <= 48);
    }
}
