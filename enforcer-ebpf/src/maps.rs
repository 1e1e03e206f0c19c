//! Every map of the kernel programs, in one place. Sizes are defaults; the
//! daemon may override them at load time.

use aya_ebpf::bindings::BPF_F_NO_PREALLOC;
use aya_ebpf::macros::map;
use aya_ebpf::maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, RingBuf};
use enforcer_common::{
    Config, Counter, DEFAULT_MAX_RULES, DROP_COUNTER_ENTRIES, Direction, EVENT_BUDGET_ENTRIES, EventBudget,
    FLOW_CACHE_ENTRIES, FlowCacheEntry, FlowKey, FlowValue, FragmentKey, FragmentValue, IDENTITY_PAIRS_PER_SLOT,
    IdentityKeyV4, IdentityKeyV6, IdentityPairKey, IdentityPrefixV4, IdentityPrefixV6, IdentityValue, PolicyKeyData,
    PolicyValue, QUARANTINE_ENTRIES, QUARANTINE_EXEMPT_ENTRIES, QuarantinePrefixV4, QuarantinePrefixV6, StateError,
    VERDICT_CACHE_ENTRIES, VerdictCacheEntry,
};

// Identity and policy keys start with the policy slot (see
// `enforcer_common::slot_of`), so each map holds two generations: sizes are
// twice a policy's capacity.

/// Single addresses (/32): one hash lookup answers most identity queries.
#[map]
pub static IDENTITY_V4_EXACT: HashMap<IdentityKeyV4, IdentityValue> = HashMap::with_max_entries(2 * 131_072, 0);

/// Real prefixes only; consulted when the exact lookup misses.
#[map]
pub static IDENTITY_V4_PREFIX: LpmTrie<IdentityPrefixV4, IdentityValue> = LpmTrie::with_max_entries(2 * 65_536, 0);

/// Single addresses (/128).
#[map]
pub static IDENTITY_V6_EXACT: HashMap<IdentityKeyV6, IdentityValue> = HashMap::with_max_entries(2 * 131_072, 0);

/// Real IPv6 prefixes.
#[map]
pub static IDENTITY_V6_PREFIX: LpmTrie<IdentityPrefixV6, IdentityValue> = LpmTrie::with_max_entries(2 * 65_536, 0);

/// (slot, source identity, destination identity, protocol, port) → verdict,
/// for port ranges and whole protocols: the entries shorter than the key.
#[map]
pub static POLICY: LpmTrie<PolicyKeyData, PolicyValue> = LpmTrie::with_max_entries(2 * 524_288, 0);

/// The policy entries that name one port (or ICMP type and code): most of
/// a large policy. A hash lookup costs the same at any size, where a trie's
/// walk deepens with every entry. Allocated on insert, like the trie.
#[map]
pub static POLICY_EXACT: HashMap<PolicyKeyData, PolicyValue> =
    HashMap::with_max_entries(2 * 524_288, BPF_F_NO_PREALLOC);

/// Connection tracking, one entry per direction of a connection.
#[map]
pub static CONNTRACK: LruHashMap<FlowKey, FlowValue> = LruHashMap::with_max_entries(262_144, 0);

/// Daemon-wide settings, written by the daemon.
#[map]
pub static CONFIG: Array<Config> = Array::with_max_entries(1, 0);

/// Dropped packets and bytes per (reason, direction).
#[map]
pub static DROP_COUNTERS: PerCpuArray<Counter> = PerCpuArray::with_max_entries(DROP_COUNTER_ENTRIES, 0);

/// Forwarded packets and bytes per direction.
#[map]
pub static FORWARD_COUNTERS: PerCpuArray<Counter> = PerCpuArray::with_max_entries(Direction::COUNT, 0);

/// Packets passed by audit mode per (would-be reason, direction).
#[map]
pub static AUDIT_COUNTERS: PerCpuArray<Counter> = PerCpuArray::with_max_entries(DROP_COUNTER_ENTRIES, 0);

/// First-fragment verdicts, so a datagram's later fragments share them.
#[map]
pub static FRAGMENTS: LruHashMap<FragmentKey, FragmentValue> = LruHashMap::with_max_entries(16_384, 0);

/// Policy decisions per (slot, rule index): rule indexes are only
/// meaningful within their generation's rule table.
#[map]
pub static RULE_VERDICTS: PerCpuArray<u64> = PerCpuArray::with_max_entries(2 * DEFAULT_MAX_RULES, 0);

/// Failed state-table inserts, by `enforcer_common::StateError`.
#[map]
pub static STATE_ERRORS: PerCpuArray<u64> = PerCpuArray::with_max_entries(StateError::COUNT, 0);

/// Drop and audit events for the daemon (JSON lines for a SIEM).
#[map]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(256 * 1024, 0);

/// Per-CPU token buckets limiting how many events each CPU reports: drops
/// and audits, then admits (`EVENT_BUDGET_ADMITS`).
#[map]
pub static EVENT_BUDGET: PerCpuArray<EventBudget> = PerCpuArray::with_max_entries(EVENT_BUDGET_ENTRIES, 0);

/// (slot, source identity, destination identity) → index of the pair's
/// drop count in `PAIR_DROPS`, handed out on its first drop (see
/// `crate::events`). Not LRU: an evicted pair would take its count with it
/// unseen (and its Prometheus counter would go backwards); when a slot's
/// indexes are used up a new pair's drops are counted as failed inserts
/// instead. The daemon harvests and empties a slot's pairs whenever it
/// reuses the slot.
#[map]
pub static IDENTITY_PAIRS: HashMap<IdentityPairKey, u32> = HashMap::with_max_entries(2 * IDENTITY_PAIRS_PER_SLOT, 0);

/// Drops per identity pair, per CPU, at the pair's index: an array, whose
/// lookups the verifier inlines, so a pair the verdict cache knows costs
/// a few instructions to count.
#[map]
pub static PAIR_DROPS: PerCpuArray<u64> = PerCpuArray::with_max_entries(2 * IDENTITY_PAIRS_PER_SLOT, 0);

/// Per slot, how many pair indexes have been handed out.
#[map]
pub static PAIRS_ALLOCATED: Array<u64> = Array::with_max_entries(2, 0);

/// Recent identity-and-policy answers per CPU, direct-mapped (see
/// `crate::cache`): a flood of denied (or allowed, untracked) packets
/// between the same addresses and port pays one array lookup instead of two
/// identity and one or two policy lookups.
#[map]
pub static VERDICT_CACHE: PerCpuArray<VerdictCacheEntry> = PerCpuArray::with_max_entries(VERDICT_CACHE_ENTRIES, 0);

/// Tuples conntrack just passed unchanged, per CPU, direct-mapped (see
/// `crate::flow_cache`): an established flow's packets pay one array
/// lookup instead of the conntrack hash lookup.
#[map]
pub static FLOW_CACHE: PerCpuArray<FlowCacheEntry> = PerCpuArray::with_max_entries(FLOW_CACHE_ENTRIES, 0);

/// Bumped whenever the kernel forgets a connection: flow cache entries of
/// an older epoch never match.
#[map]
pub static CONNTRACK_EPOCH: Array<u64> = Array::with_max_entries(1, 0);

/// Quarantined IPv4 addresses and prefixes (value unused, 1). Read only
/// while `CONFIG_FLAG_QUARANTINE` is set.
#[map]
pub static QUARANTINE_V4: LpmTrie<QuarantinePrefixV4, u32> = LpmTrie::with_max_entries(QUARANTINE_ENTRIES, 0);

/// Quarantined IPv6 addresses and prefixes.
#[map]
pub static QUARANTINE_V6: LpmTrie<QuarantinePrefixV6, u32> = LpmTrie::with_max_entries(QUARANTINE_ENTRIES, 0);

/// `quarantine_exempt_key(protocol, port)` → 1: the node itself may still
/// reach a quarantined address on these ports (and hear its replies).
#[map]
pub static QUARANTINE_EXEMPT: HashMap<u32, u32> = HashMap::with_max_entries(QUARANTINE_EXEMPT_ENTRIES, 0);
