//! Address → identity: an exact hash lookup first (most identities are
//! single addresses, and the node's own addresses are always exact), the
//! prefix trie only when that misses, and the reserved `world` identity
//! when both miss. Reads the map slot of the packet's policy generation.

use aya_ebpf::maps::lpm_trie::Key;
use aya_ebpf::maps::{HashMap, LpmTrie};
use enforcer_common::{FAMILY_IPV4, IDENTITY_WORLD, IdentityValue};

use crate::maps::{
    IDENTITY_V4_EXACT_0, IDENTITY_V4_EXACT_1, IDENTITY_V4_PREFIX_0, IDENTITY_V4_PREFIX_1, IDENTITY_V6_EXACT_0,
    IDENTITY_V6_EXACT_1, IDENTITY_V6_PREFIX_0, IDENTITY_V6_PREFIX_1,
};

const WORLD: IdentityValue = IdentityValue { id: IDENTITY_WORLD, flags: 0 };

#[inline(always)]
pub fn lookup(slot: usize, family: u8, addr: &[u8; 16]) -> IdentityValue {
    if family == FAMILY_IPV4 {
        let v4 = [addr[0], addr[1], addr[2], addr[3]];
        if slot == 0 {
            lookup_in(&IDENTITY_V4_EXACT_0, &IDENTITY_V4_PREFIX_0, v4)
        } else {
            lookup_in(&IDENTITY_V4_EXACT_1, &IDENTITY_V4_PREFIX_1, v4)
        }
    } else if slot == 0 {
        lookup_in(&IDENTITY_V6_EXACT_0, &IDENTITY_V6_PREFIX_0, *addr)
    } else {
        lookup_in(&IDENTITY_V6_EXACT_1, &IDENTITY_V6_PREFIX_1, *addr)
    }
}

#[inline(always)]
fn lookup_in<const N: usize>(
    exact: &HashMap<[u8; N], IdentityValue>,
    prefix: &LpmTrie<[u8; N], IdentityValue>,
    addr: [u8; N],
) -> IdentityValue {
    // SAFETY: identity values are plain integers written whole by the daemon.
    if let Some(value) = unsafe { exact.get(addr) } {
        return *value;
    }
    prefix.get(Key::new((N * 8) as u32, addr)).copied().unwrap_or(WORLD)
}
