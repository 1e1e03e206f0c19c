//! A cluster of several nodes in one machine: each node a namespace running
//! its own `bulkhead` daemon, with its pods as namespaces behind it (a
//! [`ThreeTier`] lab whose router is the node), the nodes joined by a
//! fabric (a bridge in a namespace of its own, native routing: each node
//! routes the other nodes' pod subnets to them), and every daemon watching
//! one fake API server that listens on the fabric.
//!
//! ```text
//!   pod ─┐                                              ┌─ pod
//!   pod ─┼─ node-1 (daemon) ─ fab0 ─┐      ┌─ fab0 ─ node-2 (daemon) ─┼─ pod
//!        │      192.168.77.1        │      │        192.168.77.2       │
//!                           fabric: br0 192.168.77.254 (the API server)
//! ```
//!
//! Everything is removed on drop: the daemons stop first (they detach on
//! exit), then the namespaces go.

use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};

use crate::fake_api::{FakeApiServer, Options};
use crate::netns::{LabError, Netns, unique_stem};
use crate::probe;
use crate::topology::{Daemon, ScratchDir, ThreeTier};

/// The fabric's subnet: node N is `192.168.77.N`, the API server `.254`.
const FABRIC: [u8; 3] = [192, 168, 77];

/// One node: its namespace (the lab's router), its pods, its daemon.
pub struct Node {
    pub name: String,
    /// Declared before the lab: the daemon stops before its namespace goes.
    pub daemon: Option<Daemon>,
    pub lab: ThreeTier,
    /// The node's address on the fabric.
    pub address: Ipv4Addr,
}

/// A pod of [`EmulatedCluster::new`]: its host name in the lab (a netns
/// name part), its node (0-based) and its /24 (the pod is `.10`).
#[derive(Debug, Clone, Copy)]
pub struct PodPlace {
    pub host: &'static str,
    pub node: usize,
    pub subnet: [u8; 3],
}

pub struct EmulatedCluster {
    pub nodes: Vec<Node>,
    pub api: FakeApiServer,
    pub fabric: Netns,
    pub scratch: ScratchDir,
}

impl EmulatedCluster {
    /// `nodes` nodes named `node-1`…, with `pods` behind them; no daemon
    /// runs yet ([`EmulatedCluster::start_daemons`]).
    pub fn new(label: &str, nodes: usize, pods: &[PodPlace]) -> Result<Self, LabError> {
        let stem = unique_stem(label);
        let fabric = Netns::new(&format!("{stem}-fabric"))?;
        fabric.ip(&["link", "add", "br0", "type", "bridge"])?;
        fabric.ip(&["addr", "add", &format!("{}/24", fabric_address(254)), "dev", "br0"])?;
        fabric.ip(&["link", "set", "br0", "up"])?;
        let mut built = Vec::new();
        for index in 0..nodes {
            let hosts: Vec<(&'static str, [u8; 3])> =
                pods.iter().filter(|pod| pod.node == index).map(|pod| (pod.host, pod.subnet)).collect();
            let lab = ThreeTier::with_hosts(&format!("{label}-n{}", index + 1), &hosts)?;
            let number = u8::try_from(index + 1).unwrap_or(u8::MAX);
            let port = format!("n{number}");
            fabric.ip(&["link", "add", &port, "type", "veth", "peer", "name", "fab0", "netns", lab.router.name()])?;
            fabric.ip(&["link", "set", &port, "master", "br0"])?;
            fabric.ip(&["link", "set", &port, "up"])?;
            let address = fabric_address(number);
            lab.router.ip(&["addr", "add", &format!("{address}/24"), "dev", "fab0"])?;
            lab.router.ip(&["link", "set", "fab0", "up"])?;
            built.push(Node { name: format!("node-{number}"), daemon: None, lab, address });
        }
        // Native routing: each node reaches the others' pods through them.
        for node in &built {
            for pod in pods {
                let owner = &built[pod.node];
                if owner.name != node.name {
                    let [a, b, c] = pod.subnet;
                    node.lab.router.ip(&[
                        "route",
                        "add",
                        &format!("{a}.{b}.{c}.0/24"),
                        "via",
                        &owner.address.to_string(),
                    ])?;
                }
            }
        }
        let listener = fabric.enter(|| TcpListener::bind(SocketAddr::from((fabric_address(254), 0))))??;
        let api = FakeApiServer::start_on(listener, Options::default())
            .map_err(|error| LabError::Daemon(format!("the fake API server did not start: {error}")))?;
        let scratch = ScratchDir::new(&stem)?;
        Ok(Self { nodes: built, api, fabric, scratch })
    }

    /// Starts every node's daemon: the cluster as its policy (and an empty
    /// policy directory), enforcing on its pods' veths and its fabric link,
    /// with `extra` arguments; waits until each is ready.
    pub fn start_daemons(&mut self, extra: &[&str]) -> Result<(), LabError> {
        for node in 0..self.nodes.len() {
            self.start_node(node, extra)?;
        }
        Ok(())
    }

    /// Starts node `index`'s daemon (see [`EmulatedCluster::start_daemons`]).
    pub fn start_node(&mut self, index: usize, extra: &[&str]) -> Result<(), LabError> {
        let kubeconfig = self.scratch.0.join("kubeconfig");
        self.api
            .write_kubeconfig(&kubeconfig)
            .map_err(|error| LabError::Daemon(format!("cannot write the kubeconfig: {error}")))?;
        let policy_dir = self.scratch.0.join("policy");
        std::fs::create_dir_all(&policy_dir)?;
        let node = &mut self.nodes[index];
        let kubeconfig = kubeconfig.display().to_string();
        let mut args = vec!["--kubernetes", "--kubeconfig", &kubeconfig, "--node-name", &node.name];
        args.extend(["--interface", "fab0"]);
        args.extend_from_slice(extra);
        let log = self.scratch.0.join(format!("{}.log", node.name));
        node.daemon = Some(Daemon::start_with(&node.lab, &policy_dir, &log, &args)?);
        Ok(())
    }

    /// A sample of a node's metrics, if it has it.
    #[must_use]
    pub fn metric(&self, node: usize, sample: &str) -> Option<u64> {
        let node = &self.nodes[node];
        let daemon = node.daemon.as_ref()?;
        let (_, text) = probe::http_get(&node.lab.router, daemon.metrics_addr, "/metrics").ok()?;
        probe::metric(&text, sample)
    }

    /// Whether every daemon's view of `resource` includes resourceVersion
    /// `version` (`bulkhead_kubernetes_resource_version`).
    #[must_use]
    pub fn all_include(&self, resource: &str, version: u64) -> bool {
        let sample = format!("bulkhead_kubernetes_resource_version{{resource=\"{resource}\"}}");
        (0..self.nodes.len()).all(|node| self.metric(node, &sample).is_some_and(|seen| seen >= version))
    }

    /// The pod host called `host`, whichever node it is behind.
    ///
    /// # Panics
    /// If there is none: a typo in the caller.
    #[must_use]
    pub fn pod(&self, host: &str) -> &crate::topology::Host {
        self.nodes
            .iter()
            .flat_map(|node| &node.lab.hosts)
            .find(|h| h.name == host)
            .unwrap_or_else(|| panic!("no pod host {host}"))
    }

    /// Every daemon's log, for a failure message.
    #[must_use]
    pub fn logs(&self) -> String {
        self.nodes
            .iter()
            .filter_map(|node| node.daemon.as_ref().map(|daemon| format!("--- {}\n{}", node.name, daemon.log_text())))
            .collect()
    }

    /// Where the daemons' logs are.
    #[must_use]
    pub fn log_dir(&self) -> &Path {
        &self.scratch.0
    }

    /// The kubeconfig the daemons use (once started).
    #[must_use]
    pub fn kubeconfig(&self) -> PathBuf {
        self.scratch.0.join("kubeconfig")
    }
}

fn fabric_address(last: u8) -> Ipv4Addr {
    Ipv4Addr::new(FABRIC[0], FABRIC[1], FABRIC[2], last)
}
