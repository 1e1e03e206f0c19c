//! The `bulkhead run` options as flags and as the YAML config file
//! (`--config`) gives them: one shape for both, so the daemon merges flags
//! over the file by field. Here in the library, apart from the merging,
//! so that the fuzz targets can feed the file parser any bytes.

use std::net::{AddrParseError, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;

use clap::Args;
use policy::yaml::{Node, Value};
use policy::{Diagnostic, Location};

#[derive(Args, Debug, Default)]
pub struct RunArgs {
    /// YAML file setting any of the options below, named as the flags are
    /// (`policy-dir`, `interface` as a list, `metrics-addr`, `audit`, `*-size`).
    /// Flags given on the command line win.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Directory of policy files (*.yaml, *.yml), merged. Required here or in the config file.
    #[arg(long, value_name = "DIR")]
    pub policy_dir: Option<PathBuf>,
    /// Interface to enforce on (XDP ingress and TC egress), or a shell glob such as `eth*` or `lxc*` that also
    /// matches interfaces appearing later; repeat for several. Required here or in the config file.
    #[arg(long = "interface", value_name = "IF")]
    pub interfaces: Vec<String>,
    /// Address for the plain-HTTP /metrics, /healthz and /readyz endpoints [default: 127.0.0.1:9090].
    #[arg(long, value_name = "ADDR")]
    pub metrics_addr: Option<SocketAddr>,
    /// Audit mode for all traffic: pass what the policy would drop, and count
    /// it in `bulkhead_audit_packets_total` with the would-be reason [default: off].
    #[arg(long)]
    pub audit: bool,
    /// Which identities are isolated: `always` (zero trust: every identity,
    /// in both directions; only what rules allow passes) or `default`
    /// (Kubernetes `NetworkPolicy`: a pod is isolated for a direction only
    /// while a policy selects it for that direction; everything else is
    /// open, and `SegmentPolicy` allow rules isolate nothing). Deny rules win
    /// in both [default: always].
    #[arg(long, value_name = "always|default")]
    pub policy_enforcement: Option<String>,
    /// Learn identities and policy from the Kubernetes API as well: pods,
    /// namespaces, `NetworkPolicies` and `SegmentPolicy` custom resources,
    /// watched (the service account's in-cluster configuration, unless
    /// `--kubeconfig` is given). The policy directory may then be empty.
    #[arg(long)]
    pub kubernetes: bool,
    /// With `--kubernetes`: the kubeconfig to reach the API server with
    /// (its current context).
    #[arg(long, value_name = "FILE")]
    pub kubeconfig: Option<PathBuf>,
    /// With `--kubernetes`: this node's name, as the cluster knows it.
    #[arg(long, value_name = "NAME", env = "NODE_NAME")]
    pub node_name: Option<String>,
    /// Enforce the policy directory (and API pushes) only as a set signed
    /// by a key in KEYDIR (minisign public keys, `*.pub`): its manifest
    /// lists every file's SHA-256, a version that may not go down and an
    /// optional expiry (see `bulkhead policy sign`). Anything else is
    /// refused and the last good policy stays [default: off].
    #[arg(long, value_name = "KEYDIR")]
    pub trusted_keys: Option<PathBuf>,
    /// Where the daemon keeps what must survive restarts and reboots: the
    /// rules' usage (`bulkhead policy unused`) and, with `--trusted-keys`,
    /// the signed policy version enforced last [default: /var/lib/bulkhead].
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// Let the node itself (identity `host`) open TCP connections to
    /// quarantined addresses on this port, whatever the policy says, so an
    /// operator can still look inside: `22/tcp`; repeatable. Nothing else
    /// reaches a quarantined address, and it opens nothing [default: none].
    #[arg(long = "quarantine-allow-from-host", value_name = "PORT/PROTO")]
    pub quarantine_allow_from_host: Vec<String>,
    /// What the lateral-movement detector does about a source that probes
    /// many destinations or ports it may not reach: `off`, `alert` (a JSON
    /// event and `bulkhead_lateral_movement_suspects_total`) or
    /// `quarantine` (also quarantines the source) [default: alert].
    #[arg(long, value_name = "off|alert|quarantine")]
    pub lateral_movement: Option<String>,
    /// How long `--lateral-movement quarantine` quarantines a suspect, such
    /// as `10m` or `1h` [default: 10m].
    #[arg(long, value_name = "DURATION")]
    pub lateral_movement_quarantine_for: Option<String>,
    /// An identity the detector never flags (a scanner you run on purpose);
    /// repeatable.
    #[arg(long = "lateral-movement-exempt", value_name = "IDENTITY")]
    pub lateral_movement_exempt: Vec<String>,
    /// Tracked connection entries, two per connection [default: 262144].
    #[arg(long, value_name = "N")]
    pub conntrack_size: Option<u32>,
    /// Single-address identity entries per address family, per policy slot [default: 131072].
    #[arg(long, value_name = "N")]
    pub identity_map_size: Option<u32>,
    /// Prefix identity entries per address family, per policy slot [default: 65536].
    #[arg(long, value_name = "N")]
    pub prefix_map_size: Option<u32>,
    /// Policy entries, per policy slot: single-port entries (hash) and ranges
    /// or whole protocols (trie) may each fill this many [default: 524288].
    #[arg(long, value_name = "N")]
    pub policy_map_size: Option<u32>,
    /// Remembered first fragments [default: 16384].
    #[arg(long, value_name = "N")]
    pub fragment_map_size: Option<u32>,
    /// Rules a policy may have, per policy slot; each costs 8 bytes of
    /// verdict counter per CPU [default: 65536].
    #[arg(long, value_name = "N")]
    pub rule_map_size: Option<u32>,
    /// How XDP is attached: `native` (in the driver; fails where the driver
    /// cannot), `generic` (after the socket buffer is built; the cheaper
    /// choice on veth) or `auto` (native where supported) [default: auto].
    #[arg(long, value_name = "auto|native|generic")]
    pub xdp_mode: Option<String>,
    /// Where incoming packets are judged: `xdp` (before the socket buffer
    /// exists; the fast choice on physical NICs) or `tc` (TC ingress; the
    /// cheaper choice on veth) [default: xdp].
    #[arg(long, value_name = "xdp|tc")]
    pub ingress_hook: Option<String>,
    /// Where maps and links are pinned, so enforcement survives restarts
    /// and upgrades of the daemon [default: /sys/fs/bpf/bulkhead].
    #[arg(long, value_name = "DIR")]
    pub bpffs_root: Option<PathBuf>,
    /// Detach and remove everything pinned when the daemon exits, instead of
    /// leaving the node protected while it is down [default: off].
    #[arg(long)]
    pub detach_on_exit: bool,
    /// Where drop and audit events go as JSON lines: `stdout`, `off`, or a
    /// file path (appended to) [default: stdout].
    #[arg(long, value_name = "stdout|off|FILE")]
    pub events_to: Option<String>,
    /// Identity pairs named in `bulkhead_identity_drops_total` (the most
    /// dropped); the rest are summed under `other` [default: 20].
    #[arg(long, value_name = "N")]
    pub identity_drops_top: Option<usize>,
    /// Address of the admin API (HTTPS, client certificate required); off unless set.
    #[arg(long, value_name = "ADDR")]
    pub api_addr: Option<SocketAddr>,
    /// The API's server certificate chain (PEM); reloaded when the file changes.
    #[arg(long, value_name = "FILE")]
    pub tls_cert: Option<PathBuf>,
    /// The API's private key (PEM); reloaded when the file changes.
    #[arg(long, value_name = "FILE")]
    pub tls_key: Option<PathBuf>,
    /// CA that client certificates must chain to (PEM); reloaded when the file changes.
    #[arg(long, value_name = "FILE")]
    pub client_ca: Option<PathBuf>,
    /// Grant a role to a client certificate subject (common name): `NAME=viewer` or
    /// `NAME=operator`; repeatable. In the config file: `api-roles: {NAME: ROLE}`.
    #[arg(long = "api-role", value_name = "NAME=ROLE")]
    pub api_roles: Vec<String>,
}

/// What is wrong with a config file, at its position.
#[derive(Debug, thiserror::Error)]
pub enum ConfigFileError {
    #[error("{0}")]
    Yaml(Diagnostic),
    #[error("{at}: the config file must be a mapping of option names to values")]
    NotAMapping { at: Location },
    #[error("{at}: `{key}` must be a single value, found {found}")]
    NotAValue { at: Location, key: String, found: &'static str },
    #[error("{at}: `{key}` must be true or false, found `{found}`")]
    NotAFlag { at: Location, key: String, found: String },
    #[error("{at}: `{key}` must be a positive whole number, found `{found}`")]
    NotANumber { at: Location, key: String, found: String },
    #[error("{at}: `{text}` is not an address like {example}")]
    NotAnAddress { at: Location, text: String, example: &'static str, source: AddrParseError },
    #[error("{at}: `api-roles` must map certificate names to roles")]
    RolesNotAMapping { at: Location },
    #[error(
        "{at}: unknown option `{name}`; the config file takes policy-dir, interface, metrics-addr, audit, policy-enforcement, kubernetes, kubeconfig, node-name, trusted-keys, state-dir, quarantine-allow-from-host, lateral-movement, lateral-movement-quarantine-for, lateral-movement-exempt, conntrack-size, identity-map-size, prefix-map-size, policy-map-size, fragment-map-size, rule-map-size, xdp-mode, ingress-hook, bpffs-root, detach-on-exit, events-to, identity-drops-top, api-addr, tls-cert, tls-key, client-ca, api-roles"
    )]
    UnknownOption { at: Location, name: String },
}

/// Reads a config file into the same shape as the flags; `name` is used in
/// positions. Values are checked only as far as their type (a number, an
/// address, true or false); what they mean is checked when flags and file
/// are merged.
pub fn parse_file(name: &str, text: &str) -> Result<RunArgs, ConfigFileError> {
    let file: Arc<str> = Arc::from(name);
    let documents = policy::yaml::parse_documents(&file, text).map_err(ConfigFileError::Yaml)?;
    let mut args = RunArgs::default();
    let Some(document) = documents.first() else { return Ok(args) };
    let Value::Mapping(entries) = &document.value else {
        return Err(ConfigFileError::NotAMapping { at: document.location(&file) });
    };
    let scalar = |node: &Node, key: &str| -> Result<String, ConfigFileError> {
        match &node.value {
            Value::Scalar { text, .. } if !node.is_null() => Ok(text.clone()),
            _ => Err(ConfigFileError::NotAValue { at: node.location(&file), key: key.to_owned(), found: node.kind() }),
        }
    };
    let flag = |node: &Node, key: &str| -> Result<bool, ConfigFileError> {
        match scalar(node, key)?.as_str() {
            "true" => Ok(true),
            "false" => Ok(false),
            other => Err(ConfigFileError::NotAFlag {
                at: node.location(&file),
                key: key.to_owned(),
                found: other.to_owned(),
            }),
        }
    };
    // A list, or one value for a list of one.
    let items = |node: &Node, key: &str| -> Result<Vec<String>, ConfigFileError> {
        match &node.value {
            Value::Sequence(items) => items.iter().map(|item| scalar(item, key)).collect(),
            _ => Ok(vec![scalar(node, key)?]),
        }
    };
    let number = |node: &Node, key: &str| -> Result<u32, ConfigFileError> {
        let text = scalar(node, key)?;
        match text.parse::<u32>() {
            Ok(n) if n > 0 => Ok(n),
            _ => Err(ConfigFileError::NotANumber { at: node.location(&file), key: key.to_owned(), found: text }),
        }
    };
    let address = |node: &Node, key: &str, example: &'static str| -> Result<SocketAddr, ConfigFileError> {
        let text = scalar(node, key)?;
        text.parse().map_err(|source| ConfigFileError::NotAnAddress { at: node.location(&file), text, example, source })
    };
    for (key_node, value) in entries {
        let key = scalar(key_node, "option name")?;
        match key.as_str() {
            "policy-dir" => args.policy_dir = Some(PathBuf::from(scalar(value, &key)?)),
            "interface" | "interfaces" => args.interfaces.extend(items(value, &key)?),
            "metrics-addr" => args.metrics_addr = Some(address(value, &key, "127.0.0.1:9090")?),
            "audit" => args.audit = flag(value, &key)?,
            "policy-enforcement" => args.policy_enforcement = Some(scalar(value, &key)?),
            "kubernetes" => args.kubernetes = flag(value, &key)?,
            "kubeconfig" => args.kubeconfig = Some(PathBuf::from(scalar(value, &key)?)),
            "node-name" => args.node_name = Some(scalar(value, &key)?),
            "trusted-keys" => args.trusted_keys = Some(PathBuf::from(scalar(value, &key)?)),
            "state-dir" => args.state_dir = Some(PathBuf::from(scalar(value, &key)?)),
            "quarantine-allow-from-host" => args.quarantine_allow_from_host.extend(items(value, &key)?),
            "lateral-movement-exempt" => args.lateral_movement_exempt.extend(items(value, &key)?),
            "lateral-movement" => args.lateral_movement = Some(scalar(value, &key)?),
            "lateral-movement-quarantine-for" => args.lateral_movement_quarantine_for = Some(scalar(value, &key)?),
            "conntrack-size" => args.conntrack_size = Some(number(value, &key)?),
            "identity-map-size" => args.identity_map_size = Some(number(value, &key)?),
            "prefix-map-size" => args.prefix_map_size = Some(number(value, &key)?),
            "policy-map-size" => args.policy_map_size = Some(number(value, &key)?),
            "fragment-map-size" => args.fragment_map_size = Some(number(value, &key)?),
            "rule-map-size" => args.rule_map_size = Some(number(value, &key)?),
            "bpffs-root" => args.bpffs_root = Some(PathBuf::from(scalar(value, &key)?)),
            "events-to" => args.events_to = Some(scalar(value, &key)?),
            "xdp-mode" => args.xdp_mode = Some(scalar(value, &key)?),
            "ingress-hook" => args.ingress_hook = Some(scalar(value, &key)?),
            "identity-drops-top" => args.identity_drops_top = Some(number(value, &key)? as usize),
            "api-addr" => args.api_addr = Some(address(value, &key, "127.0.0.1:9443")?),
            "tls-cert" => args.tls_cert = Some(PathBuf::from(scalar(value, &key)?)),
            "tls-key" => args.tls_key = Some(PathBuf::from(scalar(value, &key)?)),
            "client-ca" => args.client_ca = Some(PathBuf::from(scalar(value, &key)?)),
            "api-roles" => {
                let Value::Mapping(grants) = &value.value else {
                    return Err(ConfigFileError::RolesNotAMapping { at: value.location(&file) });
                };
                for (name, role) in grants {
                    args.api_roles.push(format!("{}={}", scalar(name, &key)?, scalar(role, &key)?));
                }
            }
            "detach-on-exit" => args.detach_on_exit = flag(value, &key)?,
            other => {
                return Err(ConfigFileError::UnknownOption { at: key_node.location(&file), name: other.to_owned() });
            }
        }
    }
    Ok(args)
}
