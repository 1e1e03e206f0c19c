//! The event decoder, any bytes: a ring buffer record as the kernel's
//! `Event`, the packet it is about looked up in an enforced policy, then
//! the JSON line the daemon writes. Records are not trusted to be what the
//! kernel writes (a short one, any reason, verdict, family or time).

#![no_main]

use std::sync::OnceLock;
use std::time::SystemTime;

use libfuzzer_sys::fuzz_target;
use policy::{Contents, Engine, SourceChange};

/// Identities for IPv4 and IPv6 and a deny rule, so lookups find names.
const POLICY: &str = "apiVersion: bulkhead/v1
kind: SegmentPolicy
metadata: {name: fuzz}
spec:
  identities:
    - {name: web, addresses: [\"10.1.0.0/24\", \"fd00::/64\"]}
    - {name: db, addresses: [\"10.2.0.10\", \"fd00:1::10\"]}
  rules:
    - {name: no-ssh, action: deny, from: [{identity: web}], to: [{identity: db}], ports: [\"22/tcp\"]}
    - {name: web-to-db, from: [{identity: web}], to: [{identity: db}], ports: [\"5432/tcp\", \"icmp\"]}
";

fn engine() -> &'static Engine {
    static ENGINE: OnceLock<Engine> = OnceLock::new();
    ENGINE.get_or_init(|| {
        let mut engine = Engine::new();
        let change = SourceChange { source: "fuzz.yaml".to_owned(), contents: Contents::Text(POLICY.to_owned()) };
        engine.apply(vec![change], SystemTime::now()).expect("the fuzz policy is valid");
        engine
    })
}

fuzz_target!(|data: &[u8]| {
    let size = std::mem::size_of::<enforcer_common::Event>();
    let (record, rest) = data.split_at(data.len().min(size));
    let Some(event) = enforcer::events::decode(record) else { return };
    // The clock offset (Unix time minus monotonic time, in nanoseconds) is
    // the daemon's own, but any the clocks could give must make a time.
    let offset = rest.first_chunk::<8>().map_or(0, |bytes| i128::from(i64::from_le_bytes(*bytes)));
    let packet = enforcer::events::packet_of(&event);
    let hosts = [packet.src];
    let decision = engine().describe(&packet, if rest.is_empty() { &[] } else { &hosts });
    let record = enforcer::events::describe(&event, decision, offset);
    let line = serde_json::to_string(&record).expect("a record is always JSON");
    std::hint::black_box(line);
});
