//! Address → identity: an exact hash lookup first (most identities are
//! single addresses, and the node's own addresses are always exact), the
//! prefix trie only when that misses, and the reserved `world` identity
//! when both miss (open in both directions under `--policy-enforcement
//! default`, isolated otherwise). Keys carry the policy slot of the
//! packet's generation.

use aya_ebpf::maps::lpm_trie::Key;
use enforcer_common::{
    CONFIG_FLAG_WORLD_OPEN, Config, FAMILY_IPV4, IDENTITY_FLAG_OPEN_EGRESS, IDENTITY_FLAG_OPEN_INGRESS, IDENTITY_WORLD,
    IdentityKeyV4, IdentityKeyV6, IdentityPrefixV4, IdentityPrefixV6, IdentityValue, SLOT_BITS,
};

use crate::maps::{IDENTITY_V4_EXACT, IDENTITY_V4_PREFIX, IDENTITY_V6_EXACT, IDENTITY_V6_PREFIX};

/// `world` without its flags, where only the identity number is wanted.
pub const WORLD_ID_ONLY: IdentityValue = IdentityValue { id: IDENTITY_WORLD, flags: 0 };

/// The identity of addresses no entry covers.
#[inline(always)]
pub fn world(config: &Config) -> IdentityValue {
    let open = IDENTITY_FLAG_OPEN_INGRESS | IDENTITY_FLAG_OPEN_EGRESS;
    IdentityValue { id: IDENTITY_WORLD, flags: if config.flags & CONFIG_FLAG_WORLD_OPEN != 0 { open } else { 0 } }
}

#[inline(always)]
pub fn lookup(slot: usize, family: u8, addr: &[u8; 16], world: IdentityValue) -> IdentityValue {
    if family == FAMILY_IPV4 {
        let v4 = [addr[0], addr[1], addr[2], addr[3]];
        // SAFETY: identity values are plain integers written whole by the daemon.
        if let Some(value) = unsafe { IDENTITY_V4_EXACT.get(IdentityKeyV4 { slot: slot as u32, addr: v4 }) } {
            return *value;
        }
        let data: IdentityPrefixV4 = [slot as u8, v4[0], v4[1], v4[2], v4[3]];
        IDENTITY_V4_PREFIX.get(Key::new(SLOT_BITS + 32, data)).copied().unwrap_or(world)
    } else {
        // SAFETY: as above.
        if let Some(value) = unsafe { IDENTITY_V6_EXACT.get(IdentityKeyV6 { slot: slot as u32, addr: *addr }) } {
            return *value;
        }
        let mut data: IdentityPrefixV6 = [0; 17];
        data[0] = slot as u8;
        data[1..].copy_from_slice(addr);
        IDENTITY_V6_PREFIX.get(Key::new(SLOT_BITS + 128, data)).copied().unwrap_or(world)
    }
}
