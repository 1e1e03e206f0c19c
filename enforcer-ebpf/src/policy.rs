//! The policy lookup: one longest-prefix match on (source identity,
//! destination identity, protocol, port). The compiler has already resolved
//! deny-over-allow and port ranges into disjoint prefixes, so the cost does
//! not depend on how many rules exist.

use aya_ebpf::maps::lpm_trie::Key;
use enforcer_common::{
    ACTION_ALLOW, DropReason, IdentityId, POLICY_FLAG_WHOLE_PROTOCOL, POLICY_KEY_MAX_PREFIX, PolicyKeyData,
};

use crate::maps::POLICY;

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

#[inline(always)]
pub fn decide(slot: usize, src: IdentityId, dst: IdentityId, protocol: u8, port: u16) -> Outcome {
    let key = Key::new(POLICY_KEY_MAX_PREFIX, PolicyKeyData::new(slot as u8, src, dst, protocol, port));
    match POLICY.get(&key) {
        None => Outcome::Deny { reason: DropReason::DefaultDeny, rule_index: NO_RULE },
        Some(value) if value.action == ACTION_ALLOW => Outcome::Allow { rule_index: value.rule_index },
        Some(value) => Outcome::Deny { reason: DropReason::DenyRule, rule_index: value.rule_index },
    }
}

/// For a later fragment whose ports are unknown: allowed only if the pair
/// is allowed on every port of the protocol.
#[inline(always)]
pub fn decide_any_port(slot: usize, src: IdentityId, dst: IdentityId, protocol: u8) -> Outcome {
    let key = Key::new(POLICY_KEY_MAX_PREFIX, PolicyKeyData::new(slot as u8, src, dst, protocol, 0));
    match POLICY.get(&key) {
        Some(value) if value.action == ACTION_ALLOW && value.flags & POLICY_FLAG_WHOLE_PROTOCOL != 0 => {
            Outcome::Allow { rule_index: value.rule_index }
        }
        _ => Outcome::Deny { reason: DropReason::FragmentUnknown, rule_index: NO_RULE },
    }
}
