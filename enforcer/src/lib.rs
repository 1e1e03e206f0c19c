//! The Bulkhead daemon's building blocks, shared by the `bulkhead` binary,
//! the integration tests and the benchmarks.

pub mod api_types;
pub mod batch;
pub mod config_file;
pub mod crd;
pub mod datapath;
pub mod events;
pub mod host;
pub mod interfaces;
pub mod kubernetes;
pub mod lateral;
pub mod metrics;
pub mod observed;
pub mod pins;
pub mod quarantine;
pub mod quiesce;
pub mod server;
pub mod signing;
pub mod sources;
pub mod state;
mod sys;
pub mod testrun;
pub mod tls;
pub mod usage;
pub mod watch;
