//! The daemon part: one lab with a running daemon, its admin API on mutual
//! TLS, in which update latency, the large policy's load and the footprint
//! are measured, in that order.

use std::path::Path;
use std::time::Duration;

use lab::pki::Ca;
use lab::{Daemon, ScratchDir, ThreeTier};

use crate::Error;
use crate::footprint::{self, Footprint};
use crate::live::LiveProgram;
use crate::load::{self, Large};
use crate::update::{self, API, ClientFiles, UpdateSeries};

/// What the daemon part measures.
pub struct DaemonFigures {
    /// Rename, `bulkhead policy push` started, or push request sent on an
    /// open API connection → new generation enforced.
    updates: UpdateSeries,
    /// The large policy: rename → enforced, and a one-rule change to it.
    large: Large,
    footprint: Footprint,
}

/// Update latency through the real daemon (file renames and API pushes),
/// the large policy's load and one-rule change, and the footprint.
pub fn figures(changes: usize, big: usize) -> Result<DaemonFigures, Error> {
    let lab = ThreeTier::new("bench")?;
    let scratch = ScratchDir::new(&lab.stem)?;
    let dir = scratch.0.join("policy");
    let pki = scratch.0.join("pki");
    std::fs::create_dir_all(&dir)?;
    std::fs::create_dir_all(&pki)?;
    let example = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/three-tier.yaml"))?;
    let variant = |k: usize| example.replace("8080/tcp", &format!("{}/tcp", 8080 + k % 2));
    std::fs::write(dir.join("p.yaml"), variant(0))?;
    let (server_ca, client_ca) = (Ca::new("bench server CA"), Ca::new("bench client CA"));
    let ca_pem = server_ca.write_pem(&pki, "server-ca.pem")?;
    let client_ca_pem = client_ca.write_pem(&pki, "client-ca.pem")?;
    let (cert, key) = server_ca.issue(&pki, "server", "server", false)?;
    let (client_cert, client_key) = client_ca.issue(&pki, "operator", "bench-operator", false)?;
    let path = |p: &Path| p.to_string_lossy().into_owned();
    let rule_room = (big + 16).to_string();
    let args = [
        "--events-to",
        "off",
        "--rule-map-size",
        &rule_room,
        "--api-addr",
        API,
        "--tls-cert",
        &path(&cert),
        "--tls-key",
        &path(&key),
        "--client-ca",
        &path(&client_ca_pem),
        "--api-role",
        "bench-operator=operator",
    ];
    let mut daemon = Daemon::start_with(&lab, &dir, &scratch.0.join("log"), &args)?;
    std::thread::sleep(Duration::from_secs(1));
    let pid = daemon.pid();
    let idle_kib = footprint::rss_kib(pid);
    let program = LiveProgram::attached_under(&lab.bpffs_root())?;
    let client = ClientFiles { ca: ca_pem, cert: client_cert, key: client_key, scratch: scratch.0.clone() };
    let updates = update::timed_updates(&lab, &daemon, &program, &dir, &client, changes, &variant)?;
    let large = load::through_daemon(&daemon, &program, &dir, big)?;
    let loaded_kib = footprint::settled_rss_kib(pid);
    let maps = footprint::memlock(&lab.bpffs_root());
    daemon.stop()?;
    Ok(DaemonFigures { updates, large, footprint: Footprint { idle_kib, loaded_kib, loaded_size: big, maps } })
}

pub fn markdown(md: &mut String, figures: &DaemonFigures) {
    update::markdown(md, &figures.updates);
    load::large_markdown(md, &figures.large);
    footprint::markdown(md, &figures.footprint);
}

pub fn json(json: &mut serde_json::Map<String, serde_json::Value>, figures: &DaemonFigures) {
    json.insert("update_latency_ms".into(), update::json(&figures.updates));
    json.insert("large_policy".into(), load::large_json(&figures.large));
    json.insert("footprint".into(), footprint::json(&figures.footprint));
}
