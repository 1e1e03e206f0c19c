//! Empty library target: lets `enforcer` depend on this crate at build time
//! so cargo rebuilds the daemon when the kernel programs change.
#![no_std]
