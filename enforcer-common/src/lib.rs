//! Types shared by the kernel programs and the daemon.
//!
//! Every type here crosses the user/kernel boundary through a BPF map, so each
//! is `#[repr(C)]` with explicit, named padding and a compile-time size check:
//! a layout change on one side that the other side does not see would silently
//! corrupt verdicts.
#![no_std]

/// Numeric security identity of an address, as found by the identity maps.
pub type IdentityId = u32;

/// No identity: never stored in a map.
pub const IDENTITY_NONE: IdentityId = 0;
/// Reserved identity of every address that belongs to no declared identity.
pub const IDENTITY_WORLD: IdentityId = 1;
/// Reserved identity of the node's own addresses.
pub const IDENTITY_HOST: IdentityId = 2;
/// First identity number the policy compiler hands out.
pub const IDENTITY_FIRST_DYNAMIC: IdentityId = 256;

/// Why a packet was dropped. Append-only: the discriminant is both the index
/// into the drop counter map and, through [`DropReason::label`], the
/// Prometheus `reason` label, so renumbering would corrupt dashboards.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DropReason {
    /// No allow rule admits the packet (zero-trust default).
    DefaultDeny = 0,
    /// A deny rule matches the packet.
    DenyRule = 1,
    /// The packet's headers are inconsistent or truncated.
    Malformed = 2,
    /// A later IP fragment whose first fragment was never seen.
    FragmentUnknown = 3,
    /// A packet entering the node that claims one of the node's own
    /// addresses as its source.
    HostSpoofed = 4,
    /// The source or destination address is quarantined (`bulkhead
    /// quarantine`): isolated whatever the policy or a tracked connection
    /// says.
    Quarantine = 5,
}

impl DropReason {
    /// Number of reasons; sizes the counter map.
    pub const COUNT: u32 = 6;
    /// Every reason, in discriminant order.
    pub const ALL: [DropReason; Self::COUNT as usize] = [
        DropReason::DefaultDeny,
        DropReason::DenyRule,
        DropReason::Malformed,
        DropReason::FragmentUnknown,
        DropReason::HostSpoofed,
        DropReason::Quarantine,
    ];

    /// The Prometheus `reason` label.
    #[must_use]
    pub const fn label(self) -> &'static str {
        match self {
            DropReason::DefaultDeny => "default_deny",
            DropReason::DenyRule => "deny_rule",
            DropReason::Malformed => "malformed",
            DropReason::FragmentUnknown => "fragment_unknown",
            DropReason::HostSpoofed => "host_spoofed",
            DropReason::Quarantine => "quarantine",
        }
    }

    /// The reason with this discriminant, if any.
    #[must_use]
    pub const fn from_u32(value: u32) -> Option<Self> {
        if value < Self::COUNT { Some(Self::ALL[value as usize]) } else { None }
    }

    /// Whether audit mode may turn this drop into a pass: policy decisions
    /// can be audited, broken or spoofed packets cannot.
    #[must_use]
    pub const fn is_policy(self) -> bool {
        matches!(self, DropReason::DefaultDeny | DropReason::DenyRule | DropReason::FragmentUnknown)
    }
}

/// Where a packet was judged.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Direction {
    /// Entering the node through an enforced interface (XDP).
    Ingress = 0,
    /// Leaving the node, originated by the node itself (TC egress).
    Egress = 1,
}

impl Direction {
    /// Number of directions; sizes the counter maps.
    pub const COUNT: u32 = 2;
    /// Every direction, in discriminant order.
    pub const ALL: [Direction; Self::COUNT as usize] = [Direction::Ingress, Direction::Egress];

    /// The Prometheus `direction` label.
    #[must_use]
    pub const fn label(self) -> &'static str {
        match self {
            Direction::Ingress => "ingress",
            Direction::Egress => "egress",
        }
    }
}

/// Index into the drop counter array for a (reason, direction) pair.
#[must_use]
pub const fn drop_counter_index(reason: DropReason, direction: Direction) -> u32 {
    reason as u32 * Direction::COUNT + direction as u32
}

/// Entries in the drop counter array.
pub const DROP_COUNTER_ENTRIES: u32 = DropReason::COUNT * Direction::COUNT;

/// Packets and bytes, per CPU; the daemon sums the CPUs.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counter {
    pub packets: u64,
    pub bytes: u64,
}
const _: () = assert!(core::mem::size_of::<Counter>() == 16);

/// Traffic towards this identity is audited, not dropped.
pub const IDENTITY_FLAG_AUDIT: u32 = 1;

/// No rule, allow or deny, names this identity as a destination for
/// sources of identity `world`: a packet from `world` to it is denied by
/// default without a policy lookup, so floods from unknown addresses are
/// the cheapest traffic to drop. Set only by the compiler; an entry without
/// it is looked up as usual.
pub const IDENTITY_FLAG_NO_RULES_FROM_WORLD: u32 = 1 << 1;

/// Nothing isolates this identity for ingress (`--policy-enforcement
/// default`): a packet towards it that no policy entry covers passes if
/// its source is open for egress too.
pub const IDENTITY_FLAG_OPEN_INGRESS: u32 = 1 << 2;

/// Nothing isolates this identity for egress (see
/// [`IDENTITY_FLAG_OPEN_INGRESS`]).
pub const IDENTITY_FLAG_OPEN_EGRESS: u32 = 1 << 3;

/// The node itself under `--policy-enforcement default`: as Kubernetes has
/// it, the node may reach its pods whatever isolates them, so a packet from
/// it that no entry covers passes.
pub const IDENTITY_FLAG_NODE: u32 = 1 << 4;

/// Whether a packet between identities flagged `src` and `dst` that no
/// policy entry covers passes: both its ends are open.
#[must_use]
pub const fn open_between(src: u32, dst: u32) -> bool {
    src & IDENTITY_FLAG_OPEN_EGRESS != 0 && (dst & IDENTITY_FLAG_OPEN_INGRESS != 0 || src & IDENTITY_FLAG_NODE != 0)
}

/// Value of the identity maps (exact-address hash and prefix trie).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IdentityValue {
    pub id: IdentityId,
    /// `IDENTITY_FLAG_*` bits.
    pub flags: u32,
}
const _: () = assert!(core::mem::size_of::<IdentityValue>() == 8);

/// Key of the exact IPv4 identity map: the policy slot, then the address.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct IdentityKeyV4 {
    pub slot: u32,
    pub addr: [u8; 4],
}
const _: () = assert!(core::mem::size_of::<IdentityKeyV4>() == 8);

/// Key of the exact IPv6 identity map: the policy slot, then the address.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct IdentityKeyV6 {
    pub slot: u32,
    pub addr: [u8; 16],
}
const _: () = assert!(core::mem::size_of::<IdentityKeyV6>() == 20);

/// Data of the IPv4 identity prefix trie key: slot byte, then the address.
pub type IdentityPrefixV4 = [u8; 5];
/// Data of the IPv6 identity prefix trie key: slot byte, then the address.
pub type IdentityPrefixV6 = [u8; 17];
/// Bits of the slot byte that lead every trie key.
pub const SLOT_BITS: u32 = 8;

/// Data part of the policy trie key. The trie matches it most significant bit
/// first, so the fields are ordered from always-exact to possibly-wildcarded:
/// the slot and both identities are always matched in full (72 bits), then
/// the protocol and port together form a 24-bit space in which the compiler
/// places aligned prefixes, so one lookup resolves any port range or
/// protocol wildcard.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PolicyKeyData {
    /// The policy slot (see [`slot_of`]).
    pub slot: u8,
    /// Source identity, big-endian bytes.
    pub src_identity: [u8; 4],
    /// Destination identity, big-endian bytes.
    pub dst_identity: [u8; 4],
    /// IP protocol number.
    pub protocol: u8,
    /// Destination port (TCP/UDP) or ICMP `type << 8 | code`, big-endian.
    pub port: [u8; 2],
}
const _: () = assert!(core::mem::size_of::<PolicyKeyData>() == 12);

/// Prefix length covering the slot and both identities.
pub const POLICY_KEY_IDENTITY_BITS: u32 = SLOT_BITS + 64;
/// Prefix length covering slot, identities, protocol and port.
pub const POLICY_KEY_MAX_PREFIX: u32 = POLICY_KEY_IDENTITY_BITS + 24;

impl PolicyKeyData {
    #[must_use]
    pub const fn new(slot: u8, src: IdentityId, dst: IdentityId, protocol: u8, port: u16) -> Self {
        Self {
            slot,
            src_identity: src.to_be_bytes(),
            dst_identity: dst.to_be_bytes(),
            protocol,
            port: port.to_be_bytes(),
        }
    }
}

/// A policy verdict stored in the trie.
pub const ACTION_ALLOW: u32 = 1;
/// A deny-rule verdict stored in the trie.
pub const ACTION_DENY: u32 = 2;

/// The verdict covers every port of its protocol, so later fragments, whose
/// ports are unknown, may pass on it.
pub const POLICY_FLAG_WHOLE_PROTOCOL: u32 = 1;

/// Value of the policy trie.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PolicyValue {
    /// [`ACTION_ALLOW`] or [`ACTION_DENY`].
    pub action: u32,
    /// Index of the deciding rule in the compiled policy's rule table.
    pub rule_index: u32,
    /// `POLICY_FLAG_*` bits.
    pub flags: u32,
}
const _: () = assert!(core::mem::size_of::<PolicyValue>() == 12);

/// Address family tag of a [`FlowKey`].
pub const FAMILY_IPV4: u8 = 4;
/// Address family tag of a [`FlowKey`].
pub const FAMILY_IPV6: u8 = 6;

/// Connection-tracking key: one per direction of a connection, as the packet
/// carries it, so an established flow costs exactly one lookup. IPv4 addresses
/// use the first four bytes; the rest are zero.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub src_addr: [u8; 16],
    pub dst_addr: [u8; 16],
    /// Source port, or ICMP echo identifier on requests (host order).
    pub src_port: u16,
    /// Destination port, or ICMP echo identifier on replies (host order).
    pub dst_port: u16,
    pub protocol: u8,
    /// [`FAMILY_IPV4`] or [`FAMILY_IPV6`].
    pub family: u8,
    pub padding: [u8; 2],
}
const _: () = assert!(core::mem::size_of::<FlowKey>() == 40);

impl FlowKey {
    /// The key the other direction of this connection carries.
    #[must_use]
    pub const fn reversed(&self) -> Self {
        Self {
            src_addr: self.dst_addr,
            dst_addr: self.src_addr,
            src_port: self.dst_port,
            dst_port: self.src_port,
            protocol: self.protocol,
            family: self.family,
            padding: [0; 2],
        }
    }
}

/// The entry was created for the connection's originator.
pub const FLOW_ORIGINAL: u32 = 0;
/// The entry was created for the connection's replies.
pub const FLOW_REPLY: u32 = 1;

/// TCP handshake seen in one direction only.
pub const TCP_STATE_OPENING: u32 = 0;
/// TCP data may flow.
pub const TCP_STATE_ESTABLISHED: u32 = 1;
/// FIN or RST seen: the entry lingers briefly for the last segments.
pub const TCP_STATE_CLOSING: u32 = 2;

/// Connection-tracking value.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowValue {
    /// When the last packet in this entry's direction was seen, on the
    /// programs' packet clock (jiffies × [`Config::clock_tick_ns`]): only
    /// differences of its readings mean anything.
    pub last_seen_ns: u64,
    /// When this entry last refreshed the other direction's entry: a
    /// one-way stream keeps its return path open without a second lookup on
    /// every packet.
    pub peer_refreshed_ns: u64,
    /// Policy generation that last admitted the originator's packets.
    pub policy_generation: u32,
    /// [`FLOW_ORIGINAL`] or [`FLOW_REPLY`].
    pub direction: u32,
    /// One of the `TCP_STATE_*` constants; 0 for other protocols.
    pub tcp_state: u32,
    /// Rule that admitted the connection.
    pub rule_index: u32,
    /// For an original entry admitted by audit mode: the drop reason the
    /// policy gave, counted again for every packet of the flow; otherwise
    /// [`NO_AUDIT`].
    pub audit_reason: u32,
    /// The [`Direction`] at which this entry's packets are expected: an entry
    /// matches only there, so a packet spoofing a tracked tuple at the other
    /// hook is judged afresh.
    pub hook: u32,
}
const _: () = assert!(core::mem::size_of::<FlowValue>() == 40);

/// [`FlowValue::audit_reason`] of a flow the policy admitted.
pub const NO_AUDIT: u32 = u32::MAX;

/// Identifies the fragments of one IP datagram.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FragmentKey {
    pub src_addr: [u8; 16],
    pub dst_addr: [u8; 16],
    /// IPv4 identification (16 bits) or IPv6 fragment identification.
    pub id: u32,
    pub protocol: u8,
    pub family: u8,
    pub padding: [u8; 2],
}
const _: () = assert!(core::mem::size_of::<FragmentKey>() == 40);

/// The first fragment passed.
pub const FRAGMENT_PASS: u32 = 0;
/// The first fragment was dropped (reason in `reason`).
pub const FRAGMENT_DROP: u32 = 1;
/// The first fragment passed in audit mode (would-be reason in `reason`).
pub const FRAGMENT_AUDIT: u32 = 2;

/// What happened to a datagram's first fragment: later fragments share it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FragmentValue {
    /// When the first fragment was seen; older entries are ignored, since
    /// identification numbers wrap.
    pub seen_ns: u64,
    /// One of the `FRAGMENT_*` constants.
    pub verdict: u32,
    /// A [`DropReason`] discriminant for drops and audits.
    pub reason: u32,
    /// Only in the test build that plays "a Bulkhead with another map
    /// layout" for the upgrade test (feature `layout-test`).
    #[cfg(feature = "layout-test")]
    pub layout_test: u64,
}
const _: () = assert!(core::mem::size_of::<FragmentValue>() == if cfg!(feature = "layout-test") { 24 } else { 16 });

/// Index of the single entry of the config array.
pub const CONFIG_INDEX: u32 = 0;

/// Daemon-wide settings the kernel reads on every packet.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config {
    /// Bumped by the daemon on every policy change; flows admitted under an
    /// older generation are judged again by the policy on their next packet.
    /// Its parity selects the map slot holding that generation ([`slot_of`]).
    pub policy_generation: u32,
    /// `CONFIG_FLAG_*` bits.
    pub flags: u32,
    /// Length of the kernel's timer tick (1/`CONFIG_HZ` s), which the
    /// programs' clock counts in; 0 until the daemon has measured it.
    pub clock_tick_ns: u32,
    /// Bumped by the daemon whenever it changes a verdict without a new
    /// policy generation (the node's own addresses): verdict cache entries
    /// of another epoch never match. (Padding, always 0, in builds before
    /// the verdict cache, which ignore it.)
    pub verdict_epoch: u32,
}
const _: () = assert!(core::mem::size_of::<Config>() == 16);

/// The longest timer tick Linux allows (`CONFIG_HZ=100`). Assumed while the
/// tick is unknown: a clock that runs fast only makes state expire early.
pub const MAX_CLOCK_TICK_NS: u32 = 10_000_000;

/// Daemon-wide audit mode: policy drops become counted passes.
pub const CONFIG_FLAG_AUDIT: u32 = 1;

/// The verdict cache is neither read nor filled: for measuring the path a
/// never-seen tuple takes.
pub const CONFIG_FLAG_NO_VERDICT_CACHE: u32 = 1 << 1;

/// The flow cache is neither read nor filled: every packet of an
/// established flow takes the conntrack lookup (for measuring).
pub const CONFIG_FLAG_NO_FLOW_CACHE: u32 = 1 << 2;

/// `--policy-enforcement default`: addresses of no identity (`world`) are
/// open in both directions (flags [`IDENTITY_FLAG_OPEN_INGRESS`] and
/// [`IDENTITY_FLAG_OPEN_EGRESS`]).
pub const CONFIG_FLAG_WORLD_OPEN: u32 = 1 << 3;

/// Some address is quarantined: every packet's addresses are looked up in
/// the quarantine tries. Clear, the lookups are skipped, so a node with no
/// quarantine pays nothing for the feature.
pub const CONFIG_FLAG_QUARANTINE: u32 = 1 << 4;

/// Report every connection the policy admits at ingress ([`EVENT_ADMIT`]):
/// set while the lateral-movement detector runs.
pub const CONFIG_FLAG_REPORT_ADMITS: u32 = 1 << 5;

/// Entries of each quarantine trie (addresses and prefixes per family).
pub const QUARANTINE_ENTRIES: u32 = 16_384;

/// A quarantine trie's key data: the address, as the packet carries it.
pub type QuarantinePrefixV4 = [u8; 4];
pub type QuarantinePrefixV6 = [u8; 16];

/// The key of a quarantine exemption: traffic between the node itself and
/// a quarantined address on this port passes (see
/// `--quarantine-allow-from-host`).
#[must_use]
pub const fn quarantine_exempt_key(protocol: u8, port: u16) -> u32 {
    (protocol as u32) << 16 | port as u32
}

/// Entries of the quarantine exemption map.
pub const QUARANTINE_EXEMPT_ENTRIES: u32 = 64;

/// The `rule_index` of the entries that pass a pair both of whose ends
/// are open, beside the rules on it: no rule's (no counter is kept).
pub const RULE_INDEX_OPEN: u32 = u32::MAX - 1;

/// Entries of the per-CPU verdict cache (a power of two: the index is the
/// top bits of a hash).
pub const VERDICT_CACHE_ENTRIES: u32 = 4096;

/// One entry of the per-CPU verdict cache: what the identity and policy
/// lookups answered for one (source address, destination address,
/// protocol, policy port) under one policy generation. The policy depends
/// on nothing else, so the entry stands for those lookups until the
/// generation changes; the daemon bumps the generation with every write
/// that can change a verdict (policy changes), or the verdict epoch (the
/// node's own addresses).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VerdictCacheEntry {
    /// Source then destination address, as in [`FlowKey`].
    pub addrs: [u64; 4],
    /// `generation | policy port << 32 | protocol << 48 | family << 56`;
    /// never 0 for a filled entry (the family is 4 or 6).
    pub tag: u64,
    pub src: IdentityValue,
    pub dst: IdentityValue,
    /// 1 if the policy allows, 0 if it denies.
    pub allow: u32,
    /// The [`DropReason`] of a denial.
    pub reason: u32,
    /// The deciding rule, or `u32::MAX` for none.
    pub rule_index: u32,
    /// [`Config::verdict_epoch`] when the entry was filled.
    pub epoch: u32,
    /// Where drops between the entry's identities are counted (see
    /// [`IDENTITY_PAIRS_PER_SLOT`]), once known; else [`NO_PAIR_INDEX`].
    pub pair_index: u32,
    pub padding: u32,
}
const _: () = assert!(core::mem::size_of::<VerdictCacheEntry>() == 80);

/// Entries of the per-CPU flow cache (a power of two: the index is the top
/// bits of a hash).
pub const FLOW_CACHE_ENTRIES: u32 = 4096;

/// One entry of the per-CPU flow cache: a tuple whose conntrack entry, at
/// the ingress hook, passed the packet without changing anything but its
/// clock, under one policy generation, verdict epoch and conntrack epoch.
/// Until any of those changes, or [`timeouts::FLOW_CACHE_REVALIDATE_NS`]
/// passes, the conntrack lookup would pass the tuple again; the entry lets
/// the next packets skip it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowCacheEntry {
    /// The tuple, as the packet carries it.
    pub flow: FlowKey,
    /// When the conntrack entry was last looked up (and refreshed), on the
    /// packet clock.
    pub verified_ns: u64,
    /// [`Config::policy_generation`] then; never matched while 0 and the
    /// entry blank, since a blank entry's flow has family 0.
    pub generation: u32,
    /// [`Config::verdict_epoch`] then.
    pub verdict_epoch: u32,
    /// The conntrack epoch then: bumped whenever the kernel forgets a
    /// connection.
    pub conntrack_epoch: u64,
}
const _: () = assert!(core::mem::size_of::<FlowCacheEntry>() == 64);

/// Connection-tracking timeouts, in nanoseconds.
pub mod timeouts {
    /// How often an entry refreshes its peer entry.
    pub const PEER_REFRESH_NS: u64 = 1_000_000_000;
    pub const TCP_OPENING_NS: u64 = 60 * 1_000_000_000;
    pub const TCP_ESTABLISHED_NS: u64 = 2 * 60 * 60 * 1_000_000_000;
    pub const TCP_CLOSING_NS: u64 = 10 * 1_000_000_000;
    pub const UDP_NS: u64 = 60 * 1_000_000_000;
    pub const ICMP_NS: u64 = 30 * 1_000_000_000;
    /// How long a flow cache entry stands for its conntrack entry before
    /// the packet looks conntrack up again (refreshing the entry's clock):
    /// far below every conntrack timeout, so a flow passed by the cache is
    /// one conntrack would pass.
    pub const FLOW_CACHE_REVALIDATE_NS: u64 = 1_000_000_000;
    /// How long a datagram's first-fragment verdict is remembered.
    pub const FRAGMENT_NS: u64 = 30 * 1_000_000_000;
}

/// Which of the two policy slots a generation lives in. Every identity and
/// policy key starts with its slot; the daemon writes a new generation's
/// entries under the slot the kernel is not reading, then publishes it with
/// one 4-byte write of the generation: identities and policy switch
/// together, so no packet is judged by a mix of two policies.
#[must_use]
pub const fn slot_of(generation: u32) -> usize {
    (generation & 1) as usize
}

/// Rules a policy may have unless the daemon is told otherwise
/// (`--rule-map-size`): the per-slot size of the per-rule verdict counters.
pub const DEFAULT_MAX_RULES: u32 = 65_536;

/// Where rule `rule_index` of the policy in `slot` is counted. Slots
/// interleave, so the map's size alone bounds the rule count and the
/// kernel side needs no capacity constant.
#[must_use]
pub const fn rule_counter_index(slot: usize, rule_index: u32) -> u32 {
    rule_index.wrapping_mul(2) | (slot as u32 & 1)
}

/// A state-table insert the kernel could not make. Append-only: the
/// discriminant indexes the error counter and names the `map` label.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum StateError {
    /// A connection could not be tracked; its replies will be judged by policy.
    Conntrack = 0,
    /// A first fragment's verdict could not be remembered; its later
    /// fragments will be judged as orphans.
    Fragments = 1,
    /// An event was not reported: over the per-CPU rate.
    EventsRateLimited = 2,
    /// An event was not reported: the ring was full (the daemon is behind).
    EventsRingFull = 3,
    /// A drop could not be counted against its identity pair.
    IdentityDrops = 4,
    /// An admitted connection was not reported to the lateral-movement
    /// detector: over the per-CPU rate of its own bucket.
    AdmitsRateLimited = 5,
}

impl StateError {
    pub const COUNT: u32 = 6;
    pub const ALL: [StateError; Self::COUNT as usize] = [
        StateError::Conntrack,
        StateError::Fragments,
        StateError::EventsRateLimited,
        StateError::EventsRingFull,
        StateError::IdentityDrops,
        StateError::AdmitsRateLimited,
    ];

    /// The Prometheus `map` label.
    #[must_use]
    pub const fn label(self) -> &'static str {
        match self {
            StateError::Conntrack => "conntrack",
            StateError::Fragments => "fragments",
            StateError::EventsRateLimited => "rate_limit",
            StateError::EventsRingFull => "ring_full",
            StateError::IdentityDrops => "identity_drops",
            StateError::AdmitsRateLimited => "admit_rate_limit",
        }
    }
}

/// A drop or audit, as the kernel reports it through the event ring.
/// Identities and the deciding rule are resolved by the daemon, which
/// keeps the kernel's side of this as cheap as possible.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Event {
    /// `bpf_ktime_get_coarse_ns` (`CLOCK_MONOTONIC`) when the packet was judged.
    pub time_ns: u64,
    pub src_addr: [u8; 16],
    pub dst_addr: [u8; 16],
    pub src_port: u16,
    /// Destination port, or ICMP `type << 8 | code`.
    pub dst_port: u16,
    pub ifindex: u32,
    /// A [`DropReason`] discriminant.
    pub reason: u32,
    /// [`EVENT_DROP`] or [`EVENT_AUDIT`].
    pub verdict: u8,
    /// A [`Direction`] discriminant.
    pub direction: u8,
    pub protocol: u8,
    /// [`FAMILY_IPV4`] or [`FAMILY_IPV6`].
    pub family: u8,
    pub padding: u32,
}
const _: () = assert!(core::mem::size_of::<Event>() == 64);

/// Key of the per-identity-pair drop counters: the policy slot whose
/// identity numbers the pair uses, then source and destination.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct IdentityPairKey {
    pub slot: u32,
    pub src: IdentityId,
    pub dst: IdentityId,
}
const _: () = assert!(core::mem::size_of::<IdentityPairKey>() == 12);

/// Identity pairs whose drops each policy slot can count. A pair's count
/// lives at an index the kernel hands out the first time the pair drops
/// (slot `s` uses `s * IDENTITY_PAIRS_PER_SLOT ..` onwards), so a packet
/// whose pair is known (from the verdict cache) counts with one array
/// increment; the daemon harvests and resets a slot's indexes whenever it
/// reuses the slot.
pub const IDENTITY_PAIRS_PER_SLOT: u32 = 16_384;

/// [`VerdictCacheEntry::pair_index`] before the pair's first counted drop.
pub const NO_PAIR_INDEX: u32 = u32::MAX;

/// [`Event::verdict`] of a dropped packet.
pub const EVENT_DROP: u8 = 1;
/// [`Event::verdict`] of a packet passed by audit mode.
pub const EVENT_AUDIT: u8 = 2;
/// [`Event::verdict`] of a connection the policy admitted: reported only
/// while [`CONFIG_FLAG_REPORT_ADMITS`] is set, for the daemon's
/// lateral-movement detector (an allowed first contact is evidence that
/// its source is benign), from a budget of its own.
pub const EVENT_ADMIT: u8 = 3;

/// Token buckets per CPU: drops and audits, then admits.
pub const EVENT_BUDGET_ENTRIES: u32 = 2;
/// The admits' bucket in `EVENT_BUDGET`.
pub const EVENT_BUDGET_ADMITS: u32 = 1;

/// Events each CPU may emit per second, and in one burst: a flood of drops
/// must not flood the ring or the SIEM behind it. Excess is counted.
pub const EVENTS_PER_SECOND: u64 = 1000;

/// Per-CPU token bucket state for event rate limiting.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EventBudget {
    pub tokens: u64,
    pub refilled_ns: u64,
}
const _: () = assert!(core::mem::size_of::<EventBudget>() == 16);

/// Map names, shared so the daemon never misspells one.
pub mod maps {
    pub const IDENTITY_V4_EXACT: &str = "IDENTITY_V4_EXACT";
    pub const IDENTITY_V4_PREFIX: &str = "IDENTITY_V4_PREFIX";
    pub const IDENTITY_V6_EXACT: &str = "IDENTITY_V6_EXACT";
    pub const IDENTITY_V6_PREFIX: &str = "IDENTITY_V6_PREFIX";
    pub const POLICY: &str = "POLICY";
    pub const POLICY_EXACT: &str = "POLICY_EXACT";
    pub const CONNTRACK: &str = "CONNTRACK";
    pub const CONFIG: &str = "CONFIG";
    pub const DROP_COUNTERS: &str = "DROP_COUNTERS";
    pub const AUDIT_COUNTERS: &str = "AUDIT_COUNTERS";
    pub const RULE_VERDICTS: &str = "RULE_VERDICTS";
    pub const STATE_ERRORS: &str = "STATE_ERRORS";

    pub const EVENTS: &str = "EVENTS";
    /// Identity pair → index of its drop count in `PAIR_DROPS`.
    pub const IDENTITY_PAIRS: &str = "IDENTITY_PAIRS";
    pub const PAIR_DROPS: &str = "PAIR_DROPS";
    /// Per slot: indexes handed out.
    pub const PAIRS_ALLOCATED: &str = "PAIRS_ALLOCATED";
    pub const EVENT_BUDGET: &str = "EVENT_BUDGET";

    /// Every map, for pinning.
    pub const ALL: [&str; 25] = [
        EVENTS,
        IDENTITY_PAIRS,
        PAIR_DROPS,
        PAIRS_ALLOCATED,
        EVENT_BUDGET,
        IDENTITY_V4_EXACT,
        IDENTITY_V4_PREFIX,
        IDENTITY_V6_EXACT,
        IDENTITY_V6_PREFIX,
        POLICY,
        POLICY_EXACT,
        CONNTRACK,
        CONFIG,
        DROP_COUNTERS,
        FORWARD_COUNTERS,
        AUDIT_COUNTERS,
        RULE_VERDICTS,
        STATE_ERRORS,
        FRAGMENTS,
        VERDICT_CACHE,
        FLOW_CACHE,
        CONNTRACK_EPOCH,
        QUARANTINE_V4,
        QUARANTINE_V6,
        QUARANTINE_EXEMPT,
    ];
    pub const FRAGMENTS: &str = "FRAGMENTS";
    pub const FORWARD_COUNTERS: &str = "FORWARD_COUNTERS";
    pub const VERDICT_CACHE: &str = "VERDICT_CACHE";
    pub const FLOW_CACHE: &str = "FLOW_CACHE";
    /// Shared with the programs of a daemon being replaced, like `CONNTRACK`
    /// itself: a connection either build forgets stales both builds' flow caches.
    pub const CONNTRACK_EPOCH: &str = "CONNTRACK_EPOCH";
    /// Quarantined addresses and prefixes: pinned, so a quarantine holds
    /// while the daemon restarts.
    pub const QUARANTINE_V4: &str = "QUARANTINE_V4";
    pub const QUARANTINE_V6: &str = "QUARANTINE_V6";
    /// (protocol, port) the node may use with a quarantined address.
    pub const QUARANTINE_EXEMPT: &str = "QUARANTINE_EXEMPT";

    use core::mem::size_of;

    use super::{
        Config, Counter, EventBudget, FlowCacheEntry, FlowKey, FlowValue, FragmentKey, FragmentValue, IdentityKeyV4,
        IdentityKeyV6, IdentityPairKey, IdentityPrefixV4, IdentityPrefixV6, IdentityValue, PolicyKeyData, PolicyValue,
        QuarantinePrefixV4, QuarantinePrefixV6, VerdictCacheEntry,
    };

    /// An LPM trie key: the prefix length, then the data.
    const fn trie_key(data: usize) -> u32 {
        (4 + data) as u32
    }

    /// How a map is laid out: what its pin is stamped with, so a daemon
    /// never reads a map pinned by a Bulkhead that laid it out otherwise.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct Layout {
        pub name: &'static str,
        /// Key and value sizes as the kernel object declares them.
        pub key: u32,
        pub value: u32,
        /// Bumped whenever the meaning of the key or value changes while
        /// their sizes stay the same (a field reordered or reinterpreted).
        pub version: u32,
    }

    const fn layout(name: &'static str, key: usize, value: usize) -> Layout {
        Layout { name, key: key as u32, value: value as u32, version: 1 }
    }

    const fn versioned(layout: Layout, version: u32) -> Layout {
        Layout { version, ..layout }
    }

    /// Every map's layout. A test checks the sizes against the object.
    pub const LAYOUT: [Layout; ALL.len()] = [
        // A ring buffer has no keys or values.
        layout(EVENTS, 0, 0),
        layout(IDENTITY_PAIRS, size_of::<IdentityPairKey>(), 4),
        layout(PAIR_DROPS, 4, 8),
        layout(PAIRS_ALLOCATED, 4, 8),
        // 2: a second bucket, for admits.
        versioned(layout(EVENT_BUDGET, 4, size_of::<EventBudget>()), 2),
        layout(IDENTITY_V4_EXACT, size_of::<IdentityKeyV4>(), size_of::<IdentityValue>()),
        layout(IDENTITY_V4_PREFIX, trie_key(size_of::<IdentityPrefixV4>()) as usize, size_of::<IdentityValue>()),
        layout(IDENTITY_V6_EXACT, size_of::<IdentityKeyV6>(), size_of::<IdentityValue>()),
        layout(IDENTITY_V6_PREFIX, trie_key(size_of::<IdentityPrefixV6>()) as usize, size_of::<IdentityValue>()),
        layout(POLICY, trie_key(size_of::<PolicyKeyData>()) as usize, size_of::<PolicyValue>()),
        layout(POLICY_EXACT, size_of::<PolicyKeyData>(), size_of::<PolicyValue>()),
        layout(CONNTRACK, size_of::<FlowKey>(), size_of::<FlowValue>()),
        layout(CONFIG, 4, size_of::<Config>()),
        // 2: the reason `quarantine` added an entry per direction; a map
        // with fewer entries would leave its drops uncounted.
        versioned(layout(DROP_COUNTERS, 4, size_of::<Counter>()), 2),
        layout(FORWARD_COUNTERS, 4, size_of::<Counter>()),
        versioned(layout(AUDIT_COUNTERS, 4, size_of::<Counter>()), 2),
        layout(RULE_VERDICTS, 4, 8),
        // 2: admits over their rate are counted too.
        versioned(layout(STATE_ERRORS, 4, 8), 2),
        layout(FRAGMENTS, size_of::<FragmentKey>(), size_of::<FragmentValue>()),
        layout(VERDICT_CACHE, 4, size_of::<VerdictCacheEntry>()),
        layout(FLOW_CACHE, 4, size_of::<FlowCacheEntry>()),
        layout(CONNTRACK_EPOCH, 4, 8),
        layout(QUARANTINE_V4, trie_key(size_of::<QuarantinePrefixV4>()) as usize, 4),
        layout(QUARANTINE_V6, trie_key(size_of::<QuarantinePrefixV6>()) as usize, 4),
        layout(QUARANTINE_EXEMPT, 4, 4),
    ];
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all of these are #[repr(C)] plain integers and byte arrays with
    // explicit padding fields, so every bit pattern is a valid value.
    unsafe impl aya::Pod for super::Counter {}
    unsafe impl aya::Pod for super::IdentityValue {}
    unsafe impl aya::Pod for super::PolicyKeyData {}
    unsafe impl aya::Pod for super::IdentityKeyV4 {}
    unsafe impl aya::Pod for super::Event {}
    unsafe impl aya::Pod for super::IdentityPairKey {}
    unsafe impl aya::Pod for super::EventBudget {}
    unsafe impl aya::Pod for super::IdentityKeyV6 {}
    unsafe impl aya::Pod for super::PolicyValue {}
    unsafe impl aya::Pod for super::FlowKey {}
    unsafe impl aya::Pod for super::FlowValue {}
    unsafe impl aya::Pod for super::Config {}
    unsafe impl aya::Pod for super::FragmentKey {}
    unsafe impl aya::Pod for super::FragmentValue {}
    unsafe impl aya::Pod for super::VerdictCacheEntry {}
}
