//! What an operator names to quarantine: an identity, an address or a
//! prefix, a pod, or the identities a label selector picks. The engine
//! turns a target into the addresses it stands for now
//! ([`crate::engine::Engine::resolve_target`]), again after every change,
//! so a quarantined identity's new pods are isolated as they appear.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;

use crate::model::{HOST, WORLD};

/// A quarantine target, in its one written form ([`fmt::Display`]).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Target {
    /// An address (as a /32 or /128) or a prefix.
    Net(IpNet),
    /// `pod/NAMESPACE/NAME`: one pod, at whatever address it has.
    Pod { namespace: String, name: String },
    /// `[NAMESPACE/]KEY=VALUE[,KEY=VALUE...]`: every identity carrying all
    /// the labels (of pods in NAMESPACE, when given).
    Selector { namespace: Option<String>, labels: BTreeMap<String, String> },
    /// An identity by name (a pod identity's name, `NS/{...}`, included).
    Identity(String),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TargetError {
    #[error("the target is empty; name an identity, an address or CIDR, pod/NAMESPACE/NAME or KEY=VALUE")]
    Empty,
    #[error(
        "`{0}` is reserved: quarantining it would isolate the node itself or every unknown address; name the addresses instead"
    )]
    Reserved(String),
    #[error("`{target}` is not a pod target: write pod/NAMESPACE/NAME")]
    Pod { target: String },
    #[error("`{target}` is not a label selector: {why}; write [NAMESPACE/]KEY=VALUE[,KEY=VALUE...]")]
    Selector { target: String, why: &'static str },
    #[error("`{0}` has control characters or spaces; a target is one word")]
    Characters(String),
}

impl Target {
    /// Reads a target as written on the command line or in the API.
    pub fn parse(text: &str) -> Result<Self, TargetError> {
        let text = text.trim();
        if text.is_empty() {
            return Err(TargetError::Empty);
        }
        if text.chars().any(|c| c.is_control() || c.is_whitespace()) {
            return Err(TargetError::Characters(text.escape_debug().to_string()));
        }
        if let Ok(net) = text.parse::<IpNet>() {
            return Ok(Self::Net(net.trunc()));
        }
        if let Ok(addr) = text.parse::<IpAddr>() {
            return Ok(Self::Net(IpNet::from(addr)));
        }
        if let Some(rest) = text.strip_prefix("pod/") {
            let pod_error = || TargetError::Pod { target: text.to_owned() };
            let (namespace, name) = rest.split_once('/').ok_or_else(pod_error)?;
            if namespace.is_empty() || name.is_empty() || name.contains('/') {
                return Err(pod_error());
            }
            return Ok(Self::Pod { namespace: namespace.to_owned(), name: name.to_owned() });
        }
        // Pod identity names hold `=` inside braces: `NS/{app=web}`.
        if text.contains('=') && !text.contains('{') {
            return Self::parse_selector(text);
        }
        if text == HOST || text == WORLD {
            return Err(TargetError::Reserved(text.to_owned()));
        }
        Ok(Self::Identity(text.to_owned()))
    }

    fn parse_selector(text: &str) -> Result<Self, TargetError> {
        let error = |why| TargetError::Selector { target: text.to_owned(), why };
        let (namespace, pairs) = match text.split_once('/') {
            // A namespace has neither `=` nor `.`; a label key's prefix
            // (`app.kubernetes.io/name`) is a DNS name with dots.
            Some((namespace, pairs)) if !namespace.contains(['=', '.']) => (Some(namespace), pairs),
            _ => (None, text),
        };
        if namespace.is_some_and(str::is_empty) {
            return Err(error("the namespace before `/` is empty"));
        }
        let mut labels = BTreeMap::new();
        for pair in pairs.split(',') {
            let (key, value) = pair.split_once('=').ok_or_else(|| error("each label is KEY=VALUE"))?;
            if key.is_empty() {
                return Err(error("a label key is empty"));
            }
            if value.contains('=') {
                return Err(error("a label is KEY=VALUE with one `=`"));
            }
            if labels.insert(key.to_owned(), value.to_owned()).is_some() {
                return Err(error("a label key is given twice"));
            }
        }
        Ok(Self::Selector { namespace: namespace.map(str::to_owned), labels })
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Net(net) if net.prefix_len() == net.max_prefix_len() => write!(f, "{}", net.addr()),
            Self::Net(net) => write!(f, "{net}"),
            Self::Pod { namespace, name } => write!(f, "pod/{namespace}/{name}"),
            Self::Selector { namespace, labels } => {
                if let Some(namespace) = namespace {
                    write!(f, "{namespace}/")?;
                }
                let pairs: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
                write!(f, "{}", pairs.join(","))
            }
            Self::Identity(name) => write!(f, "{name}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(text: &str) -> String {
        let target = Target::parse(text).unwrap();
        assert_eq!(Target::parse(&target.to_string()).unwrap(), target, "{text}");
        target.to_string()
    }

    #[test]
    fn every_kind_reads_and_writes_back() {
        assert_eq!(round_trip("10.0.0.7"), "10.0.0.7");
        assert_eq!(round_trip("10.0.0.7/32"), "10.0.0.7");
        assert_eq!(round_trip("10.0.3.9/24"), "10.0.3.0/24");
        assert_eq!(round_trip("fd00::1"), "fd00::1");
        assert_eq!(round_trip("pod/shop/web-7f9c"), "pod/shop/web-7f9c");
        assert_eq!(round_trip("tier=db,app=shop"), "app=shop,tier=db");
        assert_eq!(round_trip("shop/app=web"), "shop/app=web");
        assert_eq!(round_trip("shop/app.kubernetes.io/name=web"), "shop/app.kubernetes.io/name=web");
        assert_eq!(round_trip("app.kubernetes.io/name=web"), "app.kubernetes.io/name=web");
        assert_eq!(round_trip("web"), "web");
        assert_eq!(round_trip("shop/{app=web}[http=80/tcp]"), "shop/{app=web}[http=80/tcp]");
        assert!(matches!(Target::parse("shop/{app=web}").unwrap(), Target::Identity(_)));
        assert!(matches!(
            Target::parse("app.kubernetes.io/name=web").unwrap(),
            Target::Selector { namespace: None, .. }
        ));
    }

    #[test]
    fn bad_targets_say_what_to_write() {
        for (text, wanted) in [
            ("", "is empty"),
            ("host", "reserved"),
            ("world", "reserved"),
            ("pod/shop", "pod/NAMESPACE/NAME"),
            ("pod//web", "pod/NAMESPACE/NAME"),
            ("pod/shop/web/x", "pod/NAMESPACE/NAME"),
            ("app=web,tier", "KEY=VALUE"),
            ("=web", "key is empty"),
            ("app=web,app=db", "twice"),
            ("/app=web", "namespace"),
            ("a b", "one word"),
            ("we\tb", "one word"),
            ("app=a=b", "one `=`"),
        ] {
            let error = Target::parse(text).map(|t| t.to_string()).unwrap_err().to_string();
            assert!(error.contains(wanted), "{text:?}: {error}");
        }
    }
}
