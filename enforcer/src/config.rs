//! `bulkhead run` options: flags, a YAML config file (`--config`) that can
//! set every one of them, and the defaults. Flags override the file; the file
//! overrides the defaults.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context as _, bail};
pub use enforcer::config_file::RunArgs;
use enforcer::datapath::{IngressHook, MapSizes, XdpAttach};
use enforcer::kubernetes::ClusterConfig;
use policy::model::Enforcement;

use crate::api::{ApiConfig, Role};

const DEFAULT_METRICS_ADDR: &str = "127.0.0.1:9090";

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

/// Merging the flags ([`RunArgs`], a library type) with the config file.
pub trait Resolve {
    /// Merges flags over the config file over the defaults.
    fn resolve(&self) -> anyhow::Result<RunConfig>;
}

impl Resolve for RunArgs {
    fn resolve(&self) -> anyhow::Result<RunConfig> {
        let file = match &self.config {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("cannot read --config {}; check the path", path.display()))?;
                enforcer::config_file::parse_file(&path.display().to_string(), &text)?
            }
            None => RunArgs::default(),
        };
        let api = api(self, &file)?;
        let kubernetes = kubernetes_source(self, &file)?;
        let quarantine_exempt = quarantine_exempt(self, &file)?;
        let lateral = lateral(self, &file)?;
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

/// `--quarantine-allow-from-host`: flags replace the file's list.
fn quarantine_exempt(args: &RunArgs, file: &RunArgs) -> anyhow::Result<Vec<(u8, u16)>> {
    let given = if args.quarantine_allow_from_host.is_empty() {
        &file.quarantine_allow_from_host
    } else {
        &args.quarantine_allow_from_host
    };
    let mut ports = Vec::new();
    for text in given {
        // TCP only: the quarantined side answers a connection the node
        // opened, and a datagram has no such direction.
        let port = text.strip_suffix("/tcp").unwrap_or(text).parse::<u16>().ok().filter(|port| *port > 0);
        let Some(port) = port.map(|port| (6, port)) else {
            bail!("--quarantine-allow-from-host `{text}` is not PORT/tcp (for example 22/tcp); only TCP can be exempt");
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
fn lateral(args: &RunArgs, file: &RunArgs) -> anyhow::Result<enforcer::lateral::LateralConfig> {
    use enforcer::lateral::{LateralConfig, LateralMode};
    let mode = match args.lateral_movement.clone().or_else(|| file.lateral_movement.clone()).as_deref() {
        None | Some("alert") => LateralMode::Alert,
        Some("off") => LateralMode::Off,
        Some("quarantine") => LateralMode::Quarantine,
        Some(other) => bail!("`{other}` is not a lateral-movement mode: use off, alert or quarantine"),
    };
    let quarantine_for =
        match args.lateral_movement_quarantine_for.clone().or_else(|| file.lateral_movement_quarantine_for.clone()) {
            None => LateralConfig::default().quarantine_for,
            Some(text) => {
                enforcer::signing::parse_duration(&text).filter(|duration| !duration.is_zero()).with_context(|| {
                    format!("--lateral-movement-quarantine-for `{text}` is not a duration such as 10m or 1h")
                })?
            }
        };
    let exempt = if args.lateral_movement_exempt.is_empty() {
        file.lateral_movement_exempt.clone()
    } else {
        args.lateral_movement_exempt.clone()
    };
    Ok(LateralConfig { mode, quarantine_for, exempt, ..LateralConfig::default() })
}

/// The Kubernetes source's settings, if `kubernetes` is set anywhere.
fn kubernetes_source(args: &RunArgs, file: &RunArgs) -> anyhow::Result<Option<KubernetesSource>> {
    let kubeconfig = args.kubeconfig.clone().or_else(|| file.kubeconfig.clone());
    let node_name = args.node_name.clone().or_else(|| file.node_name.clone());
    if !(args.kubernetes || file.kubernetes) {
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
fn api(args: &RunArgs, file: &RunArgs) -> anyhow::Result<Option<ApiConfig>> {
    let Some(addr) = args.api_addr.or(file.api_addr) else { return Ok(None) };
    let need = |flag: &Option<PathBuf>, from_file: &Option<PathBuf>, name: &str| {
        flag.clone()
            .or_else(|| from_file.clone())
            .with_context(|| format!("--api-addr needs --{name} (or `{name}` in the config file)"))
    };
    let mut roles = HashMap::new();
    for grant in file.api_roles.iter().chain(&args.api_roles) {
        let Some((name, role)) = grant.rsplit_once('=') else {
            bail!("--api-role `{grant}` is not NAME=ROLE");
        };
        let role =
            Role::parse(role).with_context(|| format!("unknown role `{role}` in `{grant}`; use viewer or operator"))?;
        roles.insert(name.to_owned(), role);
    }
    Ok(Some(ApiConfig {
        addr,
        cert: need(&args.tls_cert, &file.tls_cert, "tls-cert")?,
        key: need(&args.tls_key, &file.tls_key, "tls-key")?,
        client_ca: need(&args.client_ca, &file.client_ca, "client-ca")?,
        roles,
    }))
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
