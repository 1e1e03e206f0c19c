//! `bulkhead policy check`, `explain`, and the signing commands (`keygen`, `sign`, `verify`).

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context as _, bail};
use policy::model::{Enforcement, Protocol, Side};
use policy::{Packet, PolicyError, Verdict};

pub fn check(paths: &[PathBuf]) -> anyhow::Result<ExitCode> {
    let sources = policy::read_sources(paths)?;
    match policy::parse_sources(&sources) {
        Ok(parsed) => {
            let compiled = policy::compile(&parsed);
            let warnings = policy::warnings(&parsed);
            for warning in &warnings {
                println!("{}: warning: {}", warning.location, warning.message);
            }
            // Kubernetes objects skipped, or read but partly enforced.
            for note in &parsed.notes {
                println!("{}: note: {}", note.location, note.message);
            }
            // Pods alike are declared once each, and are one identity.
            let identities: std::collections::HashSet<&str> =
                parsed.identities.iter().map(|identity| identity.name.as_str()).collect();
            let pods = parsed.identities.iter().filter(|identity| identity.pod.is_some()).count();
            println!(
                "ok: {} file(s), {} identities, {} rules, {} compiled entries ({} identity, {} policy){}{}",
                sources.len(),
                identities.len(),
                parsed.rules.len(),
                compiled.identity_entries.len() + compiled.policy_entries.len(),
                compiled.identity_entries.len(),
                compiled.policy_entries.len(),
                if pods > 0 { format!("; {pods} pods") } else { String::new() },
                match warnings.len() {
                    0 => String::new(),
                    n => format!("; {n} warning(s): peers that select no identity yet"),
                },
            );
            if !parsed.notes.is_empty() {
                println!("{} Kubernetes object(s) or part(s) of one skipped (see the notes)", parsed.notes.len());
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(PolicyError::Invalid { diagnostics }) => {
            for diagnostic in &diagnostics {
                println!("{diagnostic}");
            }
            eprintln!("{} problem(s); the policy would not be applied", diagnostics.len());
            Ok(ExitCode::FAILURE)
        }
        Err(other) => Err(other.into()),
    }
}

/// Parses `ADDR`, `ADDR/PROTO`, `ADDR/icmp/TYPE`, `ADDR:PORT/PROTO` or
/// `[V6]:PORT/PROTO` into (address, protocol number, policy port).
fn parse_destination(text: &str) -> anyhow::Result<(IpAddr, u8, u16)> {
    let mut parts = text.splitn(3, '/');
    let host_port = parts.next().unwrap_or_default();
    let protocol = match parts.next() {
        Some(name) => Some(
            Protocol::from_name(name)
                .with_context(|| format!("unknown protocol `{name}` in `{text}`; use tcp, udp, icmp or icmpv6"))?,
        ),
        None => None,
    };
    let icmp_type = parts.next();
    let (addr, port) = if let Ok(addr) = host_port.parse::<IpAddr>() {
        (addr, None)
    } else if let Some((host, port)) = host_port.rsplit_once(':') {
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let addr = host.parse::<IpAddr>().with_context(|| format!("`{host}` is not an IP address"))?;
        let port = port.parse::<u16>().with_context(|| format!("`{port}` is not a port (1-65535)"))?;
        (addr, Some(port))
    } else {
        bail!("`{text}` is not ADDR, ADDR/PROTO, ADDR/icmp/TYPE or ADDR:PORT/PROTO");
    };
    let protocol = match (protocol, port) {
        (Some(p), _) => p,
        (None, Some(_)) => bail!("`{text}` has a port but no protocol; write ADDR:PORT/tcp or ADDR:PORT/udp"),
        (None, None) if addr.is_ipv4() => Protocol::Icmp,
        (None, None) => Protocol::Icmpv6,
    };
    let port = match (protocol, port, icmp_type) {
        (p, Some(port), None) if p.has_ports() => port,
        (p, None, None) if p.has_ports() => bail!("`{text}` needs a port for {p}; write ADDR:PORT/{p}"),
        (p, None, Some(name)) if !p.has_ports() => {
            let number = p
                .icmp_types()
                .iter()
                .find(|(known, _)| *known == name)
                .map(|(_, t)| *t)
                .or_else(|| name.parse().ok())
                .with_context(|| format!("unknown {p} type `{name}`"))?;
            u16::from(number) << 8
        }
        // An ICMP destination without a type: an echo request.
        (Protocol::Icmp, None, None) => 8 << 8,
        (Protocol::Icmpv6, None, None) => 128 << 8,
        (p, _, _) => {
            bail!("`{text}` does not fit {p}; write ADDR:PORT/tcp, ADDR:PORT/udp, ADDR/icmp or ADDR/icmp/TYPE")
        }
    };
    Ok((addr, protocol.number(), port))
}

pub fn explain(
    policy_dir: &Path,
    from: &str,
    to: &str,
    audit: bool,
    enforcement: Option<&str>,
) -> anyhow::Result<ExitCode> {
    let enforcement = match enforcement {
        None => Enforcement::Always,
        Some(name) => Enforcement::from_name(name)
            .with_context(|| format!("`{name}` is not a policy enforcement mode: use always or default"))?,
    };
    let parsed = policy::load(&[policy_dir.to_path_buf()])?;
    let src: IpAddr = from.parse().with_context(|| format!("--from `{from}` is not an IP address"))?;
    let (dst, protocol, port) = parse_destination(to)?;
    let packet = Packet { src, dst, protocol, port };
    // The node's own addresses are identity `host` here as in the daemon.
    let hosts = enforcer::host::addresses().unwrap_or_default();
    let evaluator =
        policy::Evaluator::new(&parsed).with_host_addresses(hosts).with_audit(audit).with_enforcement(enforcement);
    let decision = evaluator.evaluate(&packet);
    let pod = |pod: &Option<String>| pod.as_ref().map(|pod| format!("pod {pod}, ")).unwrap_or_default();
    println!("source:      {src} ({}identity {})", pod(&decision.src_pod), decision.src_identity);
    println!("destination: {dst} ({}identity {})", pod(&decision.dst_pod), decision.dst_identity);
    let what = if protocol == 1 || protocol == 58 {
        format!("ICMP type {} code {}", port >> 8, port & 0xff)
    } else {
        format!("port {port}")
    };
    println!("protocol:    {protocol} ({what})");
    // Each end's isolation, named by the NetworkPolicies (or rules) that
    // isolate it.
    for (label, side, addr) in [("egress:      ", Side::Egress, src), ("ingress:     ", Side::Ingress, dst)] {
        let mut by: Vec<&str> = evaluator
            .isolating_rules(side, addr)
            .map(|rule| rule.split_once('#').map_or(rule, |(policy, _)| policy))
            .collect();
        by.dedup();
        let state = match (enforcement, by.is_empty()) {
            (Enforcement::Always, true) => "isolated (policy enforcement always)".to_owned(),
            (Enforcement::Always, false) => {
                format!("isolated (policy enforcement always; selected by {})", by.join(", "))
            }
            (Enforcement::Default, true) => "open (no policy selects this end for the direction)".to_owned(),
            (Enforcement::Default, false) => format!("isolated by {}", by.join(", ")),
        };
        println!("{label}{state}");
    }
    let rule = match (decision.rule, decision.verdict) {
        (Some(rule), _) => format!("rule {rule}"),
        (None, Verdict::Forward) => "both ends open, no deny rule".to_owned(),
        (None, _) => "no allow rule admits this packet".to_owned(),
    };
    match decision.verdict {
        Verdict::Forward => println!("verdict:     allow ({rule})"),
        Verdict::Drop(reason) => println!("verdict:     drop, reason {} ({rule})", reason.label()),
        Verdict::Audit(reason) => {
            println!("verdict:     audit: passed and counted, would drop for {} ({rule})", reason.label());
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `bulkhead policy keygen --out PREFIX`.
pub fn keygen(prefix: &Path) -> anyhow::Result<ExitCode> {
    let (secret, public, id) = enforcer::signing::keygen(prefix)?;
    println!("key {id}: secret key {} (keep it secret), public key {}", secret.display(), public.display());
    println!("trust it on a node by putting {} into the directory given to --trusted-keys", public.display());
    Ok(ExitCode::SUCCESS)
}

/// `bulkhead policy sign --key FILE --version N [--expires WHEN] DIR`.
pub fn sign(dir: &Path, key: &Path, version: u64, expires: Option<&str>) -> anyhow::Result<ExitCode> {
    let now = std::time::SystemTime::now();
    let expires = expires
        .map(|text| enforcer::signing::parse_time(text, now).map_err(|why| anyhow::anyhow!("--expires: {why}")))
        .transpose()?;
    if expires.is_some_and(|expires| expires <= now) {
        anyhow::bail!("--expires is in the past: the set would never be enforced");
    }
    let manifest = enforcer::signing::sign(dir, key, version, expires)?;
    println!(
        "signed {} policy file(s) of {} as version {}: {} and {}",
        manifest.files.len(),
        dir.display(),
        manifest.version,
        dir.join(enforcer::signing::MANIFEST).display(),
        dir.join(enforcer::signing::SIGNATURE).display()
    );
    Ok(ExitCode::SUCCESS)
}

/// `bulkhead policy verify --trusted-keys KEYDIR DIR`.
pub fn verify(dir: &Path, keys: &Path) -> anyhow::Result<ExitCode> {
    use enforcer::signing;
    let trusted = signing::TrustedKeys::load(keys)?;
    match signing::verify_set(dir, &signing::digests(dir)?, &trusted, std::time::SystemTime::now()) {
        Ok(verified) => {
            println!(
                "ok: {} is signed by {}, version {}{}",
                dir.display(),
                verified.key.display(),
                verified.version,
                verified
                    .expires
                    .map_or_else(String::new, |expires| format!(", expires {}", enforcer::events::rfc3339_at(expires)))
            );
            Ok(ExitCode::SUCCESS)
        }
        Err(error) => {
            println!("{error}");
            Ok(ExitCode::FAILURE)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::parse_destination;

    #[test]
    fn destinations() {
        assert_eq!(parse_destination("10.0.0.1:80/tcp").unwrap(), ("10.0.0.1".parse().unwrap(), 6, 80));
        assert_eq!(parse_destination("[fd00::1]:53/udp").unwrap(), ("fd00::1".parse().unwrap(), 17, 53));
        assert_eq!(parse_destination("10.0.0.1").unwrap(), ("10.0.0.1".parse().unwrap(), 1, 8 << 8));
        assert_eq!(
            parse_destination("10.0.0.1/icmp/time-exceeded").unwrap(),
            ("10.0.0.1".parse().unwrap(), 1, 11 << 8)
        );
        assert_eq!(parse_destination("fd00::1/icmpv6/3").unwrap(), ("fd00::1".parse().unwrap(), 58, 3 << 8));
        assert!(parse_destination("10.0.0.1/tcp").is_err());
        assert!(parse_destination("10.0.0.1/icmp/nonsense").is_err());
        assert!(parse_destination("10.0.0.1:80").is_err());
        assert!(parse_destination("10.0.0.1:80/icmp").is_err());
        assert!(parse_destination("nonsense").is_err());
    }
}
