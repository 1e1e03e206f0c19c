//! A network lab for Bulkhead: network namespaces joined by veth pairs, the
//! real `bulkhead` daemon running in one of them, and probes that send real
//! traffic between them.
//!
//! Every namespace name carries the process id and a counter, so parallel or
//! interrupted runs never collide, and everything is removed in `Drop`.
//! Traffic only ever flows between namespaces the lab created.

pub mod cluster;
pub mod fake_api;
pub mod frames;
pub mod manifests;
pub mod netns;
pub mod pki;
pub mod probe;
pub mod rng;
pub mod topology;

pub use netns::{LabError, Netns};
pub use topology::{Daemon, Host, ScratchDir, ThreeTier};
