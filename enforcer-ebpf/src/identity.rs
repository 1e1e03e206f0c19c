//! Address → identity: an exact hash lookup first (most identities are
//! single addresses, and the node's own addresses are always exact), the
//! prefix trie only when that misses, and the reserved `world` identity
//! when both miss.

use aya_ebpf::maps::lpm_trie::Key;
use enforcer_common::{FAMILY_IPV4, IDENTITY_WORLD, IdentityValue};

use crate::maps::{IDENTITY_V4_EXACT, IDENTITY_V4_PREFIX, IDENTITY_V6_EXACT, IDENTITY_V6_PREFIX};

const WORLD: IdentityValue = IdentityValue { id: IDENTITY_WORLD, flags: 0 };

#[inline(always)]
pub fn lookup(family: u8, addr: &[u8; 16]) -> IdentityValue {
    if family == FAMILY_IPV4 {
        let v4 = [addr[0], addr[1], addr[2], addr[3]];
        // SAFETY: identity values are plain integers written whole by the daemon.
        if let Some(value) = unsafe { IDENTITY_V4_EXACT.get(v4) } {
            return *value;
        }
        IDENTITY_V4_PREFIX.get(Key::new(32, v4)).copied().unwrap_or(WORLD)
    } else {
        // SAFETY: as above.
        if let Some(value) = unsafe { IDENTITY_V6_EXACT.get(addr) } {
            return *value;
        }
        IDENTITY_V6_PREFIX.get(Key::new(128, *addr)).copied().unwrap_or(WORLD)
    }
}
