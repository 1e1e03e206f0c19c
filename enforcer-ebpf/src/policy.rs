//! The policy lookup: a longest-prefix match on (source identity,
//! destination identity, protocol, port). The compiler has already resolved
//! deny-over-allow and port ranges into disjoint prefixes, so at most one
//! entry covers a packet: the full-length ones live in a hash (one lookup,
//! whatever the policy's size), and only a miss there walks the trie, which
//! holds just the ranges and whole protocols.

use aya_ebpf::maps::lpm_trie::Key;
use enforcer_common::{
    ACTION_ALLOW, DropReason, IDENTITY_FLAG_NO_RULES_FROM_WORLD, IDENTITY_WORLD, IdentityValue,
    POLICY_FLAG_WHOLE_PROTOCOL, POLICY_KEY_MAX_PREFIX, PolicyKeyData, PolicyValue, RULE_INDEX_OPEN, open_between,
};

use crate::maps::{POLICY, POLICY_EXACT};

/// No rule decided (the zero-trust default).
pub const NO_RULE: u32 = u32::MAX;

pub enum Outcome {
    Allow {
        rule_index: u32,
    },
    /// Dropped for `reason`; `rule_index` is the deny rule, or [`NO_RULE`]
    /// (a plain sentinel: an `Option` here lets LLVM read a register the
    /// verifier considers uninitialised).
    Deny {
        reason: DropReason,
        rule_index: u32,
    },
}

/// The one entry covering `data`, if any.
#[inline(always)]
fn lookup(data: PolicyKeyData) -> Option<&'static PolicyValue> {
    // SAFETY: policy values are plain integers written whole by the daemon.
    if let Some(value) = unsafe { POLICY_EXACT.get(&data) } {
        return Some(value);
    }
    POLICY.get(&Key::new(POLICY_KEY_MAX_PREFIX, data))
}

#[inline(always)]
pub fn decide(slot: usize, src: IdentityValue, dst: IdentityValue, protocol: u8, port: u16) -> Outcome {
    // The compiler flagged `dst` because no rule names it for `world`:
    // there is no entry to look up.
    if src.id == IDENTITY_WORLD && dst.flags & IDENTITY_FLAG_NO_RULES_FROM_WORLD != 0 {
        return Outcome::Deny { reason: DropReason::DefaultDeny, rule_index: NO_RULE };
    }
    match lookup(PolicyKeyData::new(slot as u8, src.id, dst.id, protocol, port)) {
        // No entry: both ends open (`--policy-enforcement default`) pass.
        None if open_between(src.flags, dst.flags) => Outcome::Allow { rule_index: RULE_INDEX_OPEN },
        None => Outcome::Deny { reason: DropReason::DefaultDeny, rule_index: NO_RULE },
        Some(value) if value.action == ACTION_ALLOW => Outcome::Allow { rule_index: value.rule_index },
        Some(value) => Outcome::Deny { reason: DropReason::DenyRule, rule_index: value.rule_index },
    }
}

/// For a later fragment whose ports are unknown: allowed only if the pair
/// is allowed on every port of the protocol. A pair both of whose ends are
/// open has entries for a protocol only where a deny rule carves it.
#[inline(always)]
pub fn decide_any_port(slot: usize, src: IdentityValue, dst: IdentityValue, protocol: u8) -> Outcome {
    match lookup(PolicyKeyData::new(slot as u8, src.id, dst.id, protocol, 0)) {
        None if open_between(src.flags, dst.flags) => Outcome::Allow { rule_index: RULE_INDEX_OPEN },
        Some(value) if value.action == ACTION_ALLOW && value.flags & POLICY_FLAG_WHOLE_PROTOCOL != 0 => {
            Outcome::Allow { rule_index: value.rule_index }
        }
        _ => Outcome::Deny { reason: DropReason::FragmentUnknown, rule_index: NO_RULE },
    }
}
