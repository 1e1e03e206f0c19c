//! One probe of an upstream `NetworkPolicy` case over real packets: every
//! cell of its 9×9 matrix (but the diagonal) at once, compared with what
//! the case expects. Shared by the single-node and the multi-node case
//! tests, which place the pods differently.

use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};

use lab::Netns;
use lab::probe::{self, Outcome};
use policy::model::Protocol;

use crate::cases::{NAMESPACES, PODS, Probe, address, all_pods};

/// Probes every cell of `expected` from the pod namespaces `ns_of` gives;
/// returns the cells probed and a line for each that came out otherwise
/// (`node_of` names a pod's node in those lines, where there are nodes).
pub fn probe_matrix<'a>(
    case: &str,
    expected: &Probe,
    ns_of: impl Fn((usize, usize)) -> &'a Netns,
    node_of: impl Fn((usize, usize)) -> Option<usize>,
) -> (usize, String) {
    let pods = all_pods();
    let cells: Vec<((usize, usize), (usize, usize))> =
        pods.iter().flat_map(|&from| pods.iter().filter(move |&&to| to != from).map(move |&to| (from, to))).collect();
    let targets: Vec<(&Netns, SocketAddr)> = cells
        .iter()
        .map(|&(from, to)| (ns_of(from), SocketAddr::new(IpAddr::V4(address(to.0, to.1)), expected.number())))
        .collect();
    let outcomes = probe::all_at_once(&targets, expected.protocol == Protocol::Udp).unwrap();
    let name = |pod: (usize, usize)| match node_of(pod) {
        Some(node) => format!("{}/{} (node-{})", NAMESPACES[pod.0], PODS[pod.1], node + 1),
        None => format!("{}/{}", NAMESPACES[pod.0], PODS[pod.1]),
    };
    let mut report = String::new();
    for (&(from, to), outcome) in cells.iter().zip(outcomes) {
        let want = if expected.expects(from, to) { Outcome::Connected } else { Outcome::TimedOut };
        if outcome != want {
            let _ = writeln!(
                report,
                "{case}: {}/{} {} → {}: expected {want:?}, got {outcome:?}",
                expected.protocol,
                expected.port,
                name(from),
                name(to)
            );
        }
    }
    (cells.len(), report)
}
