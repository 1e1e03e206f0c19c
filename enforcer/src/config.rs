//! `bulkhead run` options: flags, a YAML config file (`--config`) that can
//! set every one of them, and the defaults. Flags override the file; the file
//! overrides the defaults.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context as _, bail};
use clap::Args;
use enforcer::datapath::{IngressHook, MapSizes, XdpAttach};
use enforcer::kubernetes::ClusterConfig;
use policy::model::Enforcement;
use policy::yaml::{Node, Value};

use crate::api::{ApiConfig, Role};

const DEFAULT_METRICS_ADDR: &str = "127.0.0.1:9090";

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

/// The options `bulkhead run` works with, after merging.
#[derive(Debug, Clone, PartialEq)]
pub struct RunConfig {
    pub policy_dir: PathBuf,
    pub interfaces: Vec<String>,
    pub metrics_addr: SocketAddr,
    pub audit: bool,
    pub enforcement: Enforcement,
    /// Set with `--kubernetes`.
    pub kubernetes: Option<KubernetesSource>,
    pub sizes: MapSizes,
    pub xdp_attach: XdpAttach,
    pub ingress_hook: IngressHook,
    pub bpffs_root: PathBuf,
    pub detach_on_exit: bool,
    pub events_to: EventsTo,
    pub api: Option<ApiConfig>,
    pub identity_drops_top: usize,
    /// `--trusted-keys`: enforce only signed policy sets.
    pub trusted_keys: Option<PathBuf>,
    pub state_dir: PathBuf,
    /// `--quarantine-allow-from-host`: (protocol, port).
    pub quarantine_exempt: Vec<(u8, u16)>,
    pub lateral: enforcer::lateral::LateralConfig,
}

/// The Kubernetes API as a policy source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KubernetesSource {
    pub cluster: ClusterConfig,
    pub node_name: String,
}

/// Where drop and audit events go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventsTo {
    Stdout,
    Off,
    File(PathBuf),
}

/// Where `bulkhead run` keeps state by default.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/bulkhead";

/// Where `bulkhead run` pins by default.
pub const DEFAULT_BPFFS_ROOT: &str = "/sys/fs/bpf/bulkhead";

impl RunArgs {
    /// Merges flags over the config file over the defaults.
    pub fn resolve(&self) -> anyhow::Result<RunConfig> {
        let file = match &self.config {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("cannot read --config {}; check the path", path.display()))?;
                parse_file(&path.display().to_string(), &text)?
            }
            None => RunArgs::default(),
        };
        let api = self.api(&file)?;
        let kubernetes = self.kubernetes_source(&file)?;
        let quarantine_exempt = self.quarantine_exempt(&file)?;
        let lateral = self.lateral(&file)?;
        let defaults = MapSizes::default();
        let interfaces = if self.interfaces.is_empty() { file.interfaces } else { self.interfaces.clone() };
        let Some(policy_dir) = self.policy_dir.clone().or(file.policy_dir) else {
            bail!("no policy directory: pass --policy-dir DIR or set `policy-dir` in the config file");
        };
        if interfaces.is_empty() {
            bail!("no interface to enforce on: pass --interface IF (repeatable) or set `interface` in the config file");
        }
        let size = |flag: Option<u32>, file: Option<u32>, default: u32| flag.or(file).unwrap_or(default);
        let xdp_attach = match self.xdp_mode.clone().or(file.xdp_mode).as_deref() {
            None | Some("auto") => XdpAttach::Auto,
            Some("native") => XdpAttach::Native,
            Some("generic") => XdpAttach::Generic,
            Some(other) => bail!("`{other}` is not an XDP mode: use auto, native or generic"),
        };
        let ingress_hook = match self.ingress_hook.clone().or(file.ingress_hook).as_deref() {
            None | Some("xdp") => IngressHook::Xdp,
            Some("tc") => IngressHook::Tc,
            Some(other) => bail!("`{other}` is not an ingress hook: use xdp or tc"),
        };
        let enforcement = match self.policy_enforcement.clone().or(file.policy_enforcement).as_deref() {
            None => Enforcement::Always,
            Some(name) => Enforcement::from_name(name)
                .with_context(|| format!("`{name}` is not a policy enforcement mode: use always or default"))?,
        };
        Ok(RunConfig {
            policy_dir,
            quarantine_exempt,
            lateral,
            enforcement,
            kubernetes,
            interfaces,
            metrics_addr: self
                .metrics_addr
                .or(file.metrics_addr)
                .unwrap_or_else(|| DEFAULT_METRICS_ADDR.parse().expect("default address is valid")),
            audit: self.audit || file.audit,
            xdp_attach,
            ingress_hook,
            bpffs_root: self
                .bpffs_root
                .clone()
                .or(file.bpffs_root)
                .unwrap_or_else(|| PathBuf::from(DEFAULT_BPFFS_ROOT)),
            detach_on_exit: self.detach_on_exit || file.detach_on_exit,
            api,
            identity_drops_top: self.identity_drops_top.or(file.identity_drops_top).unwrap_or(20),
            trusted_keys: self.trusted_keys.clone().or(file.trusted_keys),
            state_dir: self.state_dir.clone().or(file.state_dir).unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR)),
            events_to: match self.events_to.clone().or(file.events_to.clone()).as_deref() {
                None | Some("stdout") => EventsTo::Stdout,
                Some("off") => EventsTo::Off,
                Some(path) => EventsTo::File(PathBuf::from(path)),
            },
            sizes: MapSizes {
                conntrack: size(self.conntrack_size, file.conntrack_size, defaults.conntrack),
                identities: size(self.identity_map_size, file.identity_map_size, defaults.identities),
                prefixes: size(self.prefix_map_size, file.prefix_map_size, defaults.prefixes),
                policy: size(self.policy_map_size, file.policy_map_size, defaults.policy),
                fragments: size(self.fragment_map_size, file.fragment_map_size, defaults.fragments),
                rules: size(self.rule_map_size, file.rule_map_size, defaults.rules),
            },
        })
    }
}

impl RunArgs {
    /// `--quarantine-allow-from-host`: flags replace the file's list.
    fn quarantine_exempt(&self, file: &RunArgs) -> anyhow::Result<Vec<(u8, u16)>> {
        let given = if self.quarantine_allow_from_host.is_empty() {
            &file.quarantine_allow_from_host
        } else {
            &self.quarantine_allow_from_host
        };
        let mut ports = Vec::new();
        for text in given {
            // TCP only: the quarantined side answers a connection the node
            // opened, and a datagram has no such direction.
            let port = text.strip_suffix("/tcp").unwrap_or(text).parse::<u16>().ok().filter(|port| *port > 0);
            let Some(port) = port.map(|port| (6, port)) else {
                bail!(
                    "--quarantine-allow-from-host `{text}` is not PORT/tcp (for example 22/tcp); only TCP can be exempt"
                );
            };
            if !ports.contains(&port) {
                ports.push(port);
            }
        }
        if ports.len() > enforcer::datapath::MAX_QUARANTINE_EXEMPT {
            bail!(
                "--quarantine-allow-from-host: at most {} ports; these are management exceptions, keep them few",
                enforcer::datapath::MAX_QUARANTINE_EXEMPT
            );
        }
        Ok(ports)
    }

    /// The lateral-movement detector's settings.
    fn lateral(&self, file: &RunArgs) -> anyhow::Result<enforcer::lateral::LateralConfig> {
        use enforcer::lateral::{LateralConfig, LateralMode};
        let mode = match self.lateral_movement.clone().or_else(|| file.lateral_movement.clone()).as_deref() {
            None | Some("alert") => LateralMode::Alert,
            Some("off") => LateralMode::Off,
            Some("quarantine") => LateralMode::Quarantine,
            Some(other) => bail!("`{other}` is not a lateral-movement mode: use off, alert or quarantine"),
        };
        let quarantine_for =
            match self.lateral_movement_quarantine_for.clone().or_else(|| file.lateral_movement_quarantine_for.clone())
            {
                None => LateralConfig::default().quarantine_for,
                Some(text) => {
                    enforcer::signing::parse_duration(&text).filter(|duration| !duration.is_zero()).with_context(
                        || format!("--lateral-movement-quarantine-for `{text}` is not a duration such as 10m or 1h"),
                    )?
                }
            };
        let exempt = if self.lateral_movement_exempt.is_empty() {
            file.lateral_movement_exempt.clone()
        } else {
            self.lateral_movement_exempt.clone()
        };
        Ok(LateralConfig { mode, quarantine_for, exempt, ..LateralConfig::default() })
    }

    /// The Kubernetes source's settings, if `kubernetes` is set anywhere.
    fn kubernetes_source(&self, file: &RunArgs) -> anyhow::Result<Option<KubernetesSource>> {
        let kubeconfig = self.kubeconfig.clone().or_else(|| file.kubeconfig.clone());
        let node_name = self.node_name.clone().or_else(|| file.node_name.clone());
        if !(self.kubernetes || file.kubernetes) {
            // (A node name alone is fine: NODE_NAME may be set for anything.)
            if kubeconfig.is_some() {
                bail!(
                    "--kubeconfig is for the Kubernetes source: add --kubernetes (or `kubernetes: true` in the config file)"
                );
            }
            return Ok(None);
        }
        let Some(node_name) = node_name.filter(|name| !name.is_empty()) else {
            bail!(
                "--kubernetes needs this node's name: pass --node-name NAME or set NODE_NAME (the DaemonSet sets it from spec.nodeName)"
            );
        };
        let cluster = kubeconfig.map_or(ClusterConfig::Infer, ClusterConfig::Kubeconfig);
        Ok(Some(KubernetesSource { cluster, node_name }))
    }

    /// The admin API settings, if `api-addr` is set anywhere.
    fn api(&self, file: &RunArgs) -> anyhow::Result<Option<ApiConfig>> {
        let Some(addr) = self.api_addr.or(file.api_addr) else { return Ok(None) };
        let need = |flag: &Option<PathBuf>, from_file: &Option<PathBuf>, name: &str| {
            flag.clone()
                .or_else(|| from_file.clone())
                .with_context(|| format!("--api-addr needs --{name} (or `{name}` in the config file)"))
        };
        let mut roles = HashMap::new();
        for grant in file.api_roles.iter().chain(&self.api_roles) {
            let Some((name, role)) = grant.rsplit_once('=') else {
                bail!("--api-role `{grant}` is not NAME=ROLE");
            };
            let role = Role::parse(role)
                .with_context(|| format!("unknown role `{role}` in `{grant}`; use viewer or operator"))?;
            roles.insert(name.to_owned(), role);
        }
        Ok(Some(ApiConfig {
            addr,
            cert: need(&self.tls_cert, &file.tls_cert, "tls-cert")?,
            key: need(&self.tls_key, &file.tls_key, "tls-key")?,
            client_ca: need(&self.client_ca, &file.client_ca, "client-ca")?,
            roles,
        }))
    }
}

/// Reads a config file into the same shape as the flags.
fn parse_file(name: &str, text: &str) -> anyhow::Result<RunArgs> {
    let file: Arc<str> = Arc::from(name);
    let documents = policy::yaml::parse_documents(&file, text).map_err(|d| anyhow::anyhow!("{d}"))?;
    let mut args = RunArgs::default();
    let Some(document) = documents.first() else { return Ok(args) };
    let Value::Mapping(entries) = &document.value else {
        bail!("{}: the config file must be a mapping of option names to values", document.location(&file));
    };
    let scalar = |node: &Node, key: &str| -> anyhow::Result<String> {
        match &node.value {
            Value::Scalar { text, .. } if !node.is_null() => Ok(text.clone()),
            _ => bail!("{}: `{key}` must be a single value, found {}", node.location(&file), node.kind()),
        }
    };
    let flag = |node: &Node, key: &str| -> anyhow::Result<bool> {
        match scalar(node, key)?.as_str() {
            "true" => Ok(true),
            "false" => Ok(false),
            other => bail!("{}: `{key}` must be true or false, found `{other}`", node.location(&file)),
        }
    };
    // A list, or one value for a list of one.
    let items = |node: &Node, key: &str| -> anyhow::Result<Vec<String>> {
        match &node.value {
            Value::Sequence(items) => items.iter().map(|item| scalar(item, key)).collect(),
            _ => Ok(vec![scalar(node, key)?]),
        }
    };
    let number = |node: &Node, key: &str| -> anyhow::Result<u32> {
        let text = scalar(node, key)?;
        match text.parse::<u32>() {
            Ok(n) if n > 0 => Ok(n),
            _ => bail!("{}: `{key}` must be a positive whole number, found `{text}`", node.location(&file)),
        }
    };
    for (key_node, value) in entries {
        let key = scalar(key_node, "option name")?;
        let at = &value.location(&file);
        match key.as_str() {
            "policy-dir" => args.policy_dir = Some(PathBuf::from(scalar(value, &key)?)),
            "interface" | "interfaces" => args.interfaces.extend(items(value, &key)?),
            "metrics-addr" => {
                let text = scalar(value, &key)?;
                args.metrics_addr = Some(
                    text.parse().with_context(|| format!("{at}: `{text}` is not an address like 127.0.0.1:9090"))?,
                );
            }
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
            "api-addr" => {
                let text = scalar(value, &key)?;
                args.api_addr = Some(
                    text.parse().with_context(|| format!("{at}: `{text}` is not an address like 127.0.0.1:9443"))?,
                );
            }
            "tls-cert" => args.tls_cert = Some(PathBuf::from(scalar(value, &key)?)),
            "tls-key" => args.tls_key = Some(PathBuf::from(scalar(value, &key)?)),
            "client-ca" => args.client_ca = Some(PathBuf::from(scalar(value, &key)?)),
            "api-roles" => {
                let Value::Mapping(grants) = &value.value else {
                    bail!("{at}: `api-roles` must map certificate names to roles");
                };
                for (name, role) in grants {
                    args.api_roles.push(format!("{}={}", scalar(name, &key)?, scalar(role, &key)?));
                }
            }
            "detach-on-exit" => args.detach_on_exit = flag(value, &key)?,
            other => bail!(
                "{}: unknown option `{other}`; the config file takes policy-dir, interface, metrics-addr, audit, policy-enforcement, kubernetes, kubeconfig, node-name, trusted-keys, state-dir, quarantine-allow-from-host, lateral-movement, lateral-movement-quarantine-for, lateral-movement-exempt, conntrack-size, identity-map-size, prefix-map-size, policy-map-size, fragment-map-size, rule-map-size, xdp-mode, ingress-hook, bpffs-root, detach-on-exit, events-to, identity-drops-top, api-addr, tls-cert, tls-key, client-ca, api-roles",
                key_node.location(&file)
            ),
        }
    }
    Ok(args)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn file(text: &str) -> PathBuf {
        let path = std::env::temp_dir().join(format!("bulkhead-config-{}-{}.yaml", std::process::id(), text.len()));
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn flags_override_the_file_which_overrides_defaults() {
        let path = file(
            "policy-dir: /etc/bulkhead/policy\ninterface: [eth0, eth1]\nmetrics-addr: 0.0.0.0:9100\nconntrack-size: 1000\naudit: true\n",
        );
        let args = RunArgs { config: Some(path.clone()), conntrack_size: Some(2000), ..RunArgs::default() };
        let config = args.resolve().unwrap();
        std::fs::remove_file(path).unwrap();
        assert_eq!(config.policy_dir, PathBuf::from("/etc/bulkhead/policy"));
        assert_eq!(config.interfaces, ["eth0", "eth1"]);
        assert_eq!(config.metrics_addr, "0.0.0.0:9100".parse().unwrap());
        assert!(config.audit);
        assert_eq!(config.sizes.conntrack, 2000, "the flag wins");
        assert_eq!(config.sizes.policy, MapSizes::default().policy, "default kept");
    }

    #[test]
    fn file_errors_name_their_position() {
        let path = file("policy-dir: /p\ninterface: eth0\nconntrack-sise: 5\n");
        let error = RunArgs { config: Some(path.clone()), ..RunArgs::default() }.resolve().unwrap_err();
        std::fs::remove_file(path).unwrap();
        assert!(error.to_string().contains(":3:1: unknown option `conntrack-sise`"), "{error}");
        let path = file("policy-dir: /p\ninterface: eth0\nconntrack-size: lots\n");
        let error = RunArgs { config: Some(path.clone()), ..RunArgs::default() }.resolve().unwrap_err();
        std::fs::remove_file(path).unwrap();
        assert!(error.to_string().contains(":3:17: `conntrack-size` must be a positive whole number"), "{error}");
    }

    #[test]
    fn the_kubernetes_source_needs_the_node_name() {
        let base = || RunArgs { policy_dir: Some("/p".into()), interfaces: vec!["eth0".into()], ..RunArgs::default() };
        assert_eq!(base().resolve().unwrap().kubernetes, None);
        let error = RunArgs { kubernetes: true, ..base() }.resolve().unwrap_err();
        assert!(error.to_string().contains("pass --node-name NAME or set NODE_NAME"), "{error}");
        let path =
            file("policy-dir: /p\ninterface: eth0\nkubernetes: true\nkubeconfig: /etc/kube.conf\nnode-name: n1\n");
        let config = RunArgs { config: Some(path.clone()), ..RunArgs::default() }.resolve().unwrap();
        std::fs::remove_file(path).unwrap();
        let expected =
            KubernetesSource { cluster: ClusterConfig::Kubeconfig("/etc/kube.conf".into()), node_name: "n1".into() };
        assert_eq!(config.kubernetes, Some(expected));
        let stray = RunArgs { kubeconfig: Some("/k".into()), ..base() }.resolve().unwrap_err();
        assert!(stray.to_string().contains("add --kubernetes"), "{stray}");
    }

    #[test]
    fn quarantine_and_lateral_movement_from_flag_or_file() {
        use enforcer::lateral::LateralMode;
        let base = || RunArgs { policy_dir: Some("/p".into()), interfaces: vec!["eth0".into()], ..RunArgs::default() };
        let defaults = base().resolve().unwrap();
        assert_eq!(
            (defaults.lateral.mode, defaults.lateral.quarantine_for),
            (LateralMode::Alert, Duration::from_mins(10))
        );
        assert!(defaults.quarantine_exempt.is_empty() && defaults.lateral.exempt.is_empty());
        let path = file(
            "policy-dir: /p\ninterface: eth0\nquarantine-allow-from-host: [22/tcp, \"2222\"]\nlateral-movement: quarantine\nlateral-movement-quarantine-for: 1h\nlateral-movement-exempt: nmap\n",
        );
        let config = RunArgs { config: Some(path.clone()), ..RunArgs::default() }.resolve().unwrap();
        assert_eq!(config.quarantine_exempt, [(6, 22), (6, 2222)]);
        assert_eq!(
            (config.lateral.mode, config.lateral.quarantine_for),
            (LateralMode::Quarantine, Duration::from_hours(1))
        );
        assert_eq!(config.lateral.exempt, ["nmap"]);
        let flagged =
            RunArgs { config: Some(path.clone()), lateral_movement: Some("off".into()), ..RunArgs::default() };
        assert_eq!(flagged.resolve().unwrap().lateral.mode, LateralMode::Off, "the flag wins");
        std::fs::remove_file(path).unwrap();
        for (args, wanted) in [
            (RunArgs { quarantine_allow_from_host: vec!["53/udp".into()], ..base() }, "only TCP can be exempt"),
            (RunArgs { quarantine_allow_from_host: vec!["0".into()], ..base() }, "is not PORT/tcp"),
            (RunArgs { lateral_movement: Some("block".into()), ..base() }, "use off, alert or quarantine"),
            (RunArgs { lateral_movement_quarantine_for: Some("0s".into()), ..base() }, "not a duration"),
            (RunArgs { lateral_movement_quarantine_for: Some("soon".into()), ..base() }, "not a duration"),
        ] {
            let error = args.resolve().unwrap_err().to_string();
            assert!(error.contains(wanted), "{error}");
        }
    }

    #[test]
    fn policy_enforcement_from_flag_or_file() {
        let path = file("policy-dir: /p\ninterface: eth0\npolicy-enforcement: default\n");
        let config = RunArgs { config: Some(path.clone()), ..RunArgs::default() }.resolve().unwrap();
        assert_eq!(config.enforcement, Enforcement::Default);
        let flagged =
            RunArgs { config: Some(path.clone()), policy_enforcement: Some("always".into()), ..RunArgs::default() };
        assert_eq!(flagged.resolve().unwrap().enforcement, Enforcement::Always, "the flag wins");
        let wrong =
            RunArgs { config: Some(path.clone()), policy_enforcement: Some("never".into()), ..RunArgs::default() };
        let error = wrong.resolve().unwrap_err();
        std::fs::remove_file(path).unwrap();
        assert!(
            error.to_string().contains("`never` is not a policy enforcement mode: use always or default"),
            "{error}"
        );
        let default = RunArgs { policy_dir: Some("/p".into()), interfaces: vec!["eth0".into()], ..RunArgs::default() };
        assert_eq!(default.resolve().unwrap().enforcement, Enforcement::Always, "zero trust unless told");
    }

    #[test]
    fn xdp_mode_from_flag_or_file() {
        let path = file("policy-dir: /p\ninterface: eth0\nxdp-mode: generic\n");
        let config = RunArgs { config: Some(path.clone()), ..RunArgs::default() }.resolve().unwrap();
        assert_eq!(config.xdp_attach, XdpAttach::Generic);
        let flagged = RunArgs { config: Some(path.clone()), xdp_mode: Some("native".into()), ..RunArgs::default() };
        assert_eq!(flagged.resolve().unwrap().xdp_attach, XdpAttach::Native, "the flag wins");
        let wrong = RunArgs { config: Some(path.clone()), xdp_mode: Some("sideways".into()), ..RunArgs::default() };
        let error = wrong.resolve().unwrap_err();
        std::fs::remove_file(path).unwrap();
        assert!(error.to_string().contains("`sideways` is not an XDP mode: use auto, native or generic"), "{error}");
        let default = RunArgs { policy_dir: Some("/p".into()), interfaces: vec!["eth0".into()], ..RunArgs::default() };
        assert_eq!(default.resolve().unwrap().xdp_attach, XdpAttach::Auto);
    }

    #[test]
    fn ingress_hook_from_flag_or_file() {
        let path = file("policy-dir: /p\ninterface: eth0\ningress-hook: tc\n");
        let config = RunArgs { config: Some(path.clone()), ..RunArgs::default() }.resolve().unwrap();
        assert_eq!(config.ingress_hook, IngressHook::Tc);
        let flagged = RunArgs { config: Some(path.clone()), ingress_hook: Some("xdp".into()), ..RunArgs::default() };
        assert_eq!(flagged.resolve().unwrap().ingress_hook, IngressHook::Xdp, "the flag wins");
        let wrong =
            RunArgs { config: Some(path.clone()), ingress_hook: Some("netfilter".into()), ..RunArgs::default() };
        let error = wrong.resolve().unwrap_err();
        std::fs::remove_file(path).unwrap();
        assert!(error.to_string().contains("`netfilter` is not an ingress hook: use xdp or tc"), "{error}");
    }

    #[test]
    fn required_options() {
        let error = RunArgs { interfaces: vec!["eth0".into()], ..RunArgs::default() }.resolve().unwrap_err();
        assert!(error.to_string().contains("--policy-dir"), "{error}");
        let error = RunArgs { policy_dir: Some("/p".into()), ..RunArgs::default() }.resolve().unwrap_err();
        assert!(error.to_string().contains("--interface"), "{error}");
    }
}
