//! Turns the kernel's drop and audit events into JSON lines for a SIEM:
//! one object per line with time, interface, direction, addresses, ports,
//! protocol, identities, rule, reason and verdict.

use std::io::Write;
use std::net::IpAddr;
use std::os::fd::AsRawFd as _;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use aya::maps::{MapData, RingBuf};
use enforcer_common::{Direction, DropReason, EVENT_ADMIT, EVENT_AUDIT, Event, FAMILY_IPV4};
use serde::Serialize;

/// One event as written out.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct EventRecord {
    /// RFC 3339, UTC.
    pub time: String,
    pub interface: String,
    pub direction: &'static str,
    pub src: String,
    pub dst: String,
    pub protocol: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub src_port: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dst_port: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub icmp_type: Option<u8>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub icmp_code: Option<u8>,
    pub src_identity: String,
    pub dst_identity: String,
    /// The pods (`namespace/name`) at either end, where they are pods: a
    /// pod's identity stands for every pod alike.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub src_pod: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dst_pod: Option<String>,
    /// The deciding rule, if a rule decided (a deny rule).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
    pub reason: &'static str,
    /// `drop` or `audit` (or `admit`: a connection admitted, reported only
    /// to the lateral-movement detector, never written out).
    pub verdict: &'static str,
}

fn address(family: u8, bytes: [u8; 16]) -> IpAddr {
    if family == FAMILY_IPV4 { IpAddr::from([bytes[0], bytes[1], bytes[2], bytes[3]]) } else { IpAddr::from(bytes) }
}

pub(crate) fn protocol_name(protocol: u8) -> String {
    match protocol {
        1 => "icmp".to_owned(),
        6 => "tcp".to_owned(),
        17 => "udp".to_owned(),
        58 => "icmpv6".to_owned(),
        other => other.to_string(),
    }
}

/// Nanoseconds to add to a `bpf_ktime_get_ns` value to get Unix time.
fn monotonic_to_unix_offset() -> i128 {
    let mut now = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: valid out-pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &raw mut now) };
    let monotonic = i128::from(now.tv_sec) * 1_000_000_000 + i128::from(now.tv_nsec);
    let unix = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| i128::try_from(d.as_nanos()).unwrap_or(0));
    unix - monotonic
}

/// RFC 3339 in UTC with millisecond precision.
#[must_use]
pub fn rfc3339(unix_ns: i128) -> String {
    let millis = unix_ns.max(0) / 1_000_000;
    let seconds = (millis / 1000) as i64;
    let (days, rest) = (seconds.div_euclid(86_400), seconds.rem_euclid(86_400));
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rest / 3600,
        rest % 3600 / 60,
        rest % 60,
        millis % 1000
    )
}

/// RFC 3339 in UTC with millisecond precision, for a `SystemTime` (times
/// before the epoch as the epoch).
#[must_use]
pub fn rfc3339_at(time: SystemTime) -> String {
    let nanos = time.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    rfc3339(i128::try_from(nanos).unwrap_or(i128::MAX))
}

/// One ring buffer record as the kernel's `Event`, or `None` if it is too
/// short to be one (never written by the kernel; skipped rather than read
/// past its end). Longer records are read up to an `Event`'s size.
#[must_use]
pub fn decode(item: &[u8]) -> Option<Event> {
    if item.len() < std::mem::size_of::<Event>() {
        return None;
    }
    // SAFETY: `item` holds at least a whole `Event` (checked above), a
    // plain-old-data struct every bit pattern of which is valid;
    // read_unaligned copes with the ring's 8-byte alignment.
    Some(unsafe { item.as_ptr().cast::<Event>().read_unaligned() })
}

/// What the policy says of the packet an event is about.
#[must_use]
pub fn packet_of(event: &Event) -> policy::Packet {
    let (src, dst) = (address(event.family, event.src_addr), address(event.family, event.dst_addr));
    policy::Packet { src, dst, protocol: event.protocol, port: event.dst_port }
}

/// Describes one kernel event, with identities and rule from `decision`
/// (the enforced policy's answer for [`packet_of`] the event).
#[must_use]
pub fn describe(event: &Event, decision: policy::Decision, unix_offset_ns: i128) -> EventRecord {
    let policy::Packet { src, dst, .. } = packet_of(event);
    let icmp = matches!(event.protocol, 1 | 58);
    let ports = matches!(event.protocol, 6 | 17);
    let reason = DropReason::from_u32(event.reason).unwrap_or(DropReason::Malformed);
    EventRecord {
        time: rfc3339(i128::from(event.time_ns) + unix_offset_ns),
        interface: crate::interfaces::interface_name(event.ifindex).unwrap_or_else(|| format!("if{}", event.ifindex)),
        direction: if event.direction == Direction::Egress as u8 { "egress" } else { "ingress" },
        src: src.to_string(),
        dst: dst.to_string(),
        protocol: protocol_name(event.protocol),
        src_port: ports.then_some(event.src_port),
        dst_port: ports.then_some(event.dst_port),
        icmp_type: icmp.then_some((event.dst_port >> 8) as u8),
        icmp_code: icmp.then_some(event.dst_port as u8),
        src_identity: decision.src_identity,
        dst_identity: decision.dst_identity,
        src_pod: decision.src_pod,
        dst_pod: decision.dst_pod,
        rule: if reason == DropReason::DenyRule && event.verdict != EVENT_ADMIT { decision.rule } else { None },
        reason: if event.verdict == EVENT_ADMIT { "admitted" } else { reason.label() },
        verdict: match event.verdict {
            EVENT_AUDIT => "audit",
            EVENT_ADMIT => "admit",
            _ => "drop",
        },
    }
}

/// Where events go.
pub enum Sink {
    Stdout,
    File(std::fs::File),
    /// Only to API subscribers.
    Off,
}

/// Events kept while there is no policy to describe them by (the daemon
/// starting or stopping), beyond which they are dropped with a warning.
const MAX_WAITING_EVENTS: usize = 1 << 16;

/// Answers the enforced policy's decisions for a batch of packets, or
/// `None` before there is a policy.
pub type DecideBatch<'a> = &'a dyn Fn(&[policy::Packet]) -> Option<Vec<policy::Decision>>;

/// Reads the ring until `stop`, writing one JSON line per event. `decide`
/// names each batch's identities and rules: a few lookups per event in the
/// daemon's incremental engine, so describing costs the same at any policy
/// size and nothing when the policy changes.
pub fn pump(
    mut ring: RingBuf<MapData>,
    mut sink: Sink,
    stop: &AtomicBool,
    decide: DecideBatch<'_>,
    publish: &dyn Fn(&[EventRecord], &[String]),
    daemon_events: &dyn Fn() -> Vec<String>,
) {
    let offset = monotonic_to_unix_offset();
    // Events read while there is no policy to name them by yet wait here.
    let mut events: Vec<Event> = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        let mut poll = libc::pollfd { fd: ring.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd.
        let ready = unsafe { libc::poll(&raw mut poll, 1, 200) };
        // The daemon's own events (quarantine, lateral movement) go where
        // the kernel's go, within one poll interval.
        let own = daemon_events();
        if !own.is_empty()
            && let Err(error) = write_to(&mut sink, &own)
        {
            log::warn!("writing events failed: {error}");
        }
        if ready <= 0 && events.is_empty() {
            continue;
        }
        while let Some(item) = ring.next() {
            events.extend(decode(&item));
        }
        let packets: Vec<policy::Packet> = events.iter().map(packet_of).collect();
        let Some(decisions) = decide(&packets) else {
            if events.len() > MAX_WAITING_EVENTS {
                log::warn!("{} drop events dropped: no policy to describe them by", events.len());
                events.clear();
            }
            std::thread::sleep(Duration::from_millis(50));
            continue;
        };
        let records: Vec<EventRecord> = std::mem::take(&mut events)
            .iter()
            .zip(decisions)
            .map(|(event, decision)| describe(event, decision, offset))
            .collect();
        // Admits are for the lateral-movement detector, not the flow log.
        let lines: Vec<String> = records
            .iter()
            .filter(|record| record.verdict != "admit")
            .filter_map(|record| serde_json::to_string(record).ok())
            .collect();
        publish(&records, &lines);
        if let Err(error) = write_to(&mut sink, &lines) {
            log::warn!("writing events failed: {error}");
        }
    }
}

fn write_to(sink: &mut Sink, lines: &[String]) -> std::io::Result<()> {
    match sink {
        Sink::Stdout => write_lines(&mut std::io::stdout().lock(), lines),
        Sink::File(file) => write_lines(file, lines),
        Sink::Off => Ok(()),
    }
}

fn write_lines(out: &mut dyn Write, lines: &[String]) -> std::io::Result<()> {
    for line in lines {
        writeln!(out, "{line}")?;
    }
    out.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_whole_records_and_skips_short_ones() {
        let mut event = Event { time_ns: 7, dst_port: 22, protocol: 6, family: FAMILY_IPV4, ..Event::default() };
        event.src_addr[..4].copy_from_slice(&[10, 1, 0, 5]);
        // SAFETY: `Event` is plain old data; its bytes are what the kernel writes.
        let bytes: [u8; 64] = unsafe { std::mem::transmute(event) };
        assert_eq!(decode(&bytes), Some(event));
        // The ring's records may be padded beyond the struct.
        assert_eq!(decode(&[&bytes[..], &[0xff; 8]].concat()), Some(event));
        assert_eq!(decode(&bytes[..63]), None);
        assert_eq!(decode(&[]), None);
    }

    #[test]
    fn describes_a_deny_rule_drop() {
        let text = "apiVersion: bulkhead/v1\nkind: SegmentPolicy\nmetadata: {name: t}\nspec:\n  identities:\n    - {name: web, addresses: [\"10.1.0.0/24\"]}\n    - {name: db, addresses: [\"10.2.0.10\"]}\n  rules:\n    - {name: no-ssh, action: deny, from: [{identity: web}], to: [{identity: db}], ports: [\"22/tcp\"]}\n";
        let mut engine = policy::Engine::new();
        let change = policy::engine::SourceChange {
            source: "t.yaml".to_owned(),
            contents: policy::engine::Contents::Text(text.to_owned()),
        };
        engine.apply(vec![change], SystemTime::now()).unwrap();
        let mut event = Event {
            time_ns: 1_000_000_000,
            src_port: 40000,
            dst_port: 22,
            ifindex: 0,
            reason: DropReason::DenyRule as u32,
            verdict: enforcer_common::EVENT_DROP,
            direction: Direction::Ingress as u8,
            protocol: 6,
            family: FAMILY_IPV4,
            ..Event::default()
        };
        event.src_addr[..4].copy_from_slice(&[10, 1, 0, 5]);
        event.dst_addr[..4].copy_from_slice(&[10, 2, 0, 10]);
        let record = describe(&event, engine.describe(&packet_of(&event), &[]), 1_795_609_799_000_000_000);
        assert_eq!(record.time, "2026-11-25T12:30:00.000Z");
        assert_eq!((record.src.as_str(), record.dst.as_str()), ("10.1.0.5", "10.2.0.10"));
        assert_eq!((record.src_identity.as_str(), record.dst_identity.as_str()), ("web", "db"));
        assert_eq!(record.rule.as_deref(), Some("no-ssh"));
        assert_eq!((record.reason, record.verdict, record.direction), ("deny_rule", "drop", "ingress"));
        assert_eq!((record.src_port, record.dst_port, record.icmp_type), (Some(40000), Some(22), None));
        let json = serde_json::to_string(&record).unwrap();
        assert!(json.contains("\"protocol\":\"tcp\"") && !json.contains("icmp_type"), "{json}");
        // The node's own addresses are `host`, whatever the policy says.
        let from_node = engine.describe(&packet_of(&event), &["10.1.0.5".parse().unwrap()]);
        assert_eq!((from_node.src_identity.as_str(), from_node.rule), ("host", None));
    }
}
