//! The policy lookup: one longest-prefix match on (source identity,
//! destination identity, protocol, port). The compiler has already resolved
//! deny-over-allow and port ranges into disjoint prefixes, so the cost does
//! not depend on how many rules exist.

use aya_ebpf::maps::lpm_trie::Key;
use enforcer_common::{
    ACTION_ALLOW, DropReason, IdentityId, POLICY_FLAG_WHOLE_PROTOCOL, POLICY_KEY_MAX_PREFIX, PolicyKeyData,
};

use aya_ebpf::maps::LpmTrie;
use enforcer_common::PolicyValue;

use crate::maps::{POLICY_0, POLICY_1};

#[inline(always)]
fn trie(slot: usize) -> &'static LpmTrie<PolicyKeyData, PolicyValue> {
    if slot == 0 { &POLICY_0 } else { &POLICY_1 }
}

pub enum Outcome {
    Allow { rule_index: u32 },
    Deny(DropReason),
}

#[inline(always)]
pub fn decide(slot: usize, src: IdentityId, dst: IdentityId, protocol: u8, port: u16) -> Outcome {
    let key = Key::new(POLICY_KEY_MAX_PREFIX, PolicyKeyData::new(src, dst, protocol, port));
    match trie(slot).get(&key) {
        None => Outcome::Deny(DropReason::DefaultDeny),
        Some(value) if value.action == ACTION_ALLOW => Outcome::Allow { rule_index: value.rule_index },
        Some(_) => Outcome::Deny(DropReason::DenyRule),
    }
}

/// For a later fragment whose ports are unknown: allowed only if the pair
/// is allowed on every port of the protocol.
#[inline(always)]
pub fn decide_any_port(slot: usize, src: IdentityId, dst: IdentityId, protocol: u8) -> Outcome {
    let key = Key::new(POLICY_KEY_MAX_PREFIX, PolicyKeyData::new(src, dst, protocol, 0));
    match trie(slot).get(&key) {
        Some(value) if value.action == ACTION_ALLOW && value.flags & POLICY_FLAG_WHOLE_PROTOCOL != 0 => {
            Outcome::Allow { rule_index: value.rule_index }
        }
        _ => Outcome::Deny(DropReason::FragmentUnknown),
    }
}
