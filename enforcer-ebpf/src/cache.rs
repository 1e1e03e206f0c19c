//! The verdict cache: per CPU, direct-mapped, what the identity and policy
//! lookups answered for recent (source address, destination address,
//! protocol, policy port) tuples, tagged with the policy generation and the
//! verdict epoch. The policy's answer depends on nothing else, and every
//! map write that can change it comes with a new generation (a policy
//! change) or epoch (the node's own addresses), so an entry is exact until
//! then, and afterwards simply stops matching. A hit replaces two
//! identity lookups and one or two policy lookups with one array lookup and
//! a compare: a flood between the same addresses and port (whatever its
//! source ports) costs that. A never-seen tuple pays for the hash and the
//! store on top of the lookups.

use enforcer_common::{
    Config, DropReason, FlowKey, IdentityValue, NO_PAIR_INDEX, VERDICT_CACHE_ENTRIES, VerdictCacheEntry,
};

use crate::maps::VERDICT_CACHE;
use crate::parse::Packet;
use crate::policy::Outcome;

/// Where a tuple's entry lives, and the tag that says it is that tuple's.
pub struct Slot {
    index: u32,
    tag: u64,
    epoch: u32,
    words: [u64; 4],
}

/// The tuple's slot in the cache.
#[inline(always)]
pub fn slot(packet: &Packet, config: &Config) -> Slot {
    // The two 16-byte addresses.
    let words = flow_words::<4>(&packet.flow);
    let tag = u64::from(config.policy_generation)
        | u64::from(packet.policy_port) << 32
        | u64::from(packet.flow.protocol) << 48
        | u64::from(packet.flow.family) << 56;
    let mixed = (words[0] ^ words[1].rotate_left(13) ^ words[2].rotate_left(29) ^ words[3].rotate_left(41) ^ tag)
        .wrapping_mul(0x9E37_79B9_7F4A_7C15);
    let index = (mixed >> (64 - VERDICT_CACHE_ENTRIES.trailing_zeros())) as u32;
    Slot { index, tag, epoch: config.verdict_epoch, words }
}

/// The first `N` (at most 5) eight-byte words of a flow key, for hashing
/// and comparing: the addresses are its first four.
#[inline(always)]
pub fn flow_words<const N: usize>(flow: &FlowKey) -> [u64; N] {
    const { assert!(N * 8 <= core::mem::size_of::<FlowKey>()) };
    // SAFETY: a flow key is 40 bytes of plain integers (`N` words fit, as
    // checked above), and every flow key the programs read this way lives
    // 8-aligned, in `Packet` or in the flow cache.
    unsafe { *core::ptr::from_ref(flow).cast::<[u64; N]>() }
}

/// Whether two keys are equal, word by word: comparing the arrays with `==`
/// compiles to a call of a byte-wise `memcmp` subprogram, which cost an
/// established packet a third of its time.
#[inline(always)]
pub fn same_words<const N: usize>(a: &[u64; N], b: &[u64; N]) -> bool {
    let mut differ = 0;
    for i in 0..N {
        differ |= a[i] ^ b[i];
    }
    differ == 0
}

impl Slot {
    /// The entry's index in the cache.
    #[inline(always)]
    pub fn index(&self) -> u32 {
        self.index
    }
}

/// What the cache holds for a tuple: the identities, the policy's answer,
/// and where drops between the identities are counted (or
/// [`NO_PAIR_INDEX`]).
pub struct Cached {
    pub src: IdentityValue,
    pub dst: IdentityValue,
    pub outcome: Outcome,
    pub pair_index: u32,
}

/// The cached answer for the tuple, if this CPU has it.
#[inline(always)]
pub fn lookup(slot: &Slot) -> Option<Cached> {
    let entry = VERDICT_CACHE.get(slot.index)?;
    if entry.tag != slot.tag || entry.epoch != slot.epoch || !same_words(&entry.addrs, &slot.words) {
        return None;
    }
    let outcome = if entry.allow != 0 {
        Outcome::Allow { rule_index: entry.rule_index }
    } else {
        Outcome::Deny {
            reason: DropReason::from_u32(entry.reason).unwrap_or(DropReason::DefaultDeny),
            rule_index: entry.rule_index,
        }
    };
    Some(Cached { src: entry.src, dst: entry.dst, outcome, pair_index: entry.pair_index })
}

/// Remembers the answer for the tuple on this CPU.
#[inline(always)]
pub fn store(slot: &Slot, src: IdentityValue, dst: IdentityValue, outcome: &Outcome) {
    let Some(entry) = VERDICT_CACHE.get_ptr_mut(slot.index) else { return };
    let (allow, reason, rule_index) = match *outcome {
        Outcome::Allow { rule_index } => (1, 0, rule_index),
        Outcome::Deny { reason, rule_index } => (0, reason as u32, rule_index),
    };
    // SAFETY: this CPU's own entry; programs do not migrate while they run.
    unsafe {
        *entry = VerdictCacheEntry {
            addrs: slot.words,
            tag: slot.tag,
            src,
            dst,
            allow,
            reason,
            rule_index,
            epoch: slot.epoch,
            pair_index: NO_PAIR_INDEX,
            padding: 0,
        };
    }
}

/// Remembers, in the entry at `cache_index` (filled by this program run),
/// where its identity pair's drops are counted.
#[inline(always)]
pub fn remember_pair_index(cache_index: u32, pair_index: u32) {
    if let Some(entry) = VERDICT_CACHE.get_ptr_mut(cache_index) {
        // SAFETY: this CPU's own entry; programs do not migrate while they run.
        unsafe { (*entry).pair_index = pair_index };
    }
}
