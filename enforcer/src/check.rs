//! `bulkhead policy check` and `bulkhead policy explain`.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context as _, bail};
use policy::model::Protocol;
use policy::{Packet, PolicyError, Verdict};

pub fn check(paths: &[PathBuf]) -> anyhow::Result<ExitCode> {
    let sources = policy::read_sources(paths)?;
    match policy::parse_sources(&sources) {
        Ok(parsed) => {
            let compiled = policy::compile(&parsed);
            println!(
                "ok: {} file(s), {} identities, {} rules, {} compiled entries ({} identity, {} policy)",
                sources.len(),
                parsed.identities.len(),
                parsed.rules.len(),
                compiled.identity_entries.len() + compiled.policy_entries.len(),
                compiled.identity_entries.len(),
                compiled.policy_entries.len(),
            );
            Ok(ExitCode::SUCCESS)
        }
        Err(PolicyError::Invalid { diagnostics }) => {
            for diagnostic in &diagnostics {
                println!("{diagnostic}");
            }
            eprintln!(
                "{} problem(s); the policy would not be applied",
                diagnostics.len()
            );
            Ok(ExitCode::FAILURE)
        }
        Err(other) => Err(other.into()),
    }
}

/// Parses `ADDR`, `ADDR/PROTO`, `ADDR:PORT/PROTO` or `[V6]:PORT/PROTO`.
fn parse_destination(text: &str) -> anyhow::Result<(IpAddr, u8, u16)> {
    let (host_port, protocol) = match text.rsplit_once('/') {
        Some((rest, proto)) => {
            let protocol = Protocol::from_name(proto).with_context(|| {
                format!("unknown protocol `{proto}` in `{text}`; use tcp, udp, icmp or icmpv6")
            })?;
            (rest, Some(protocol))
        }
        None => (text, None),
    };
    let (addr, port) = if let Ok(addr) = host_port.parse::<IpAddr>() {
        (addr, None)
    } else if let Some((host, port)) = host_port.rsplit_once(':') {
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let addr = host
            .parse::<IpAddr>()
            .with_context(|| format!("`{host}` is not an IP address"))?;
        let port = port
            .parse::<u16>()
            .with_context(|| format!("`{port}` is not a port (1-65535)"))?;
        (addr, Some(port))
    } else {
        bail!("`{text}` is not ADDR, ADDR/PROTO or ADDR:PORT/PROTO");
    };
    let protocol = match (protocol, port) {
        (Some(p), _) => p,
        (None, Some(_)) => {
            bail!("`{text}` has a port but no protocol; write ADDR:PORT/tcp or ADDR:PORT/udp")
        }
        (None, None) => {
            if addr.is_ipv4() {
                Protocol::Icmp
            } else {
                Protocol::Icmpv6
            }
        }
    };
    let port = match (protocol, port) {
        (p, Some(port)) if p.has_ports() => port,
        (p, Some(_)) => bail!("{p} has no ports; write ADDR/{p}"),
        (Protocol::Icmp, None) => 8 << 8,
        (Protocol::Icmpv6, None) => 128 << 8,
        (_, None) => bail!("`{text}` needs a port for {protocol}; write ADDR:PORT/{protocol}"),
    };
    Ok((addr, protocol.number(), port))
}

pub fn explain(policy_dir: &Path, from: &str, to: &str) -> anyhow::Result<ExitCode> {
    let parsed = policy::load(&[policy_dir.to_path_buf()])?;
    let src: IpAddr = from
        .parse()
        .with_context(|| format!("--from `{from}` is not an IP address"))?;
    let (dst, protocol, port) = parse_destination(to)?;
    let packet = Packet {
        src,
        dst,
        protocol,
        port,
    };
    let decision = policy::Evaluator::new(&parsed).evaluate(&packet);
    println!("source:      {src} (identity {})", decision.src_identity);
    println!("destination: {dst} (identity {})", decision.dst_identity);
    let what = if protocol == 1 || protocol == 58 {
        format!("ICMP type {} code {}", port >> 8, port & 0xff)
    } else {
        format!("port {port}")
    };
    println!("protocol:    {protocol} ({what})");
    match (&decision.verdict, &decision.rule) {
        (Verdict::Forward, Some(rule)) => println!("verdict:     allow (rule {rule})"),
        (Verdict::Drop(reason), Some(rule)) => {
            println!("verdict:     drop, reason {} (rule {rule})", reason.label());
        }
        (Verdict::Drop(reason), None) => {
            println!(
                "verdict:     drop, reason {} (no allow rule admits this packet)",
                reason.label()
            );
        }
        (Verdict::Forward, None) => println!("verdict:     allow"),
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::parse_destination;

    #[test]
    fn destinations() {
        assert_eq!(
            parse_destination("10.0.0.1:80/tcp").unwrap(),
            ("10.0.0.1".parse().unwrap(), 6, 80)
        );
        assert_eq!(
            parse_destination("[fd00::1]:53/udp").unwrap(),
            ("fd00::1".parse().unwrap(), 17, 53)
        );
        assert_eq!(
            parse_destination("10.0.0.1").unwrap(),
            ("10.0.0.1".parse().unwrap(), 1, 8 << 8)
        );
        assert!(parse_destination("10.0.0.1:80").is_err());
        assert!(parse_destination("10.0.0.1:80/icmp").is_err());
        assert!(parse_destination("nonsense").is_err());
    }
}
