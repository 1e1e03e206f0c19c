//! Update latency through the daemon: one-rule changes by file rename, by
//! `bulkhead policy push`, and by pushes on an open mutual-TLS connection,
//! each timed until the daemon's program enforces it.

use std::fmt::Write as _;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use lab::{Daemon, ThreeTier};

use crate::Error;
use crate::live::{LiveProgram, denied_before, enforced_after, syn};
use crate::results::{ms, percentile};

/// How far apart the timed changes are, as separate edits are: longer than
/// the daemon's wait for program runs still reading the slot it left at
/// the previous change (one RCU grace period, 7–45 ms here), which a change
/// coming sooner waits out first. The back-to-back row times that case.
pub const CHANGE_GAP: Duration = Duration::from_millis(50);

/// Port of the bench daemon's admin API inside its namespace.
pub const API: &str = "127.0.0.1:9443";

/// A client that stays connected to the admin API, as a controller pushing
/// policy would: each push is one HTTP request on the same mutual-TLS
/// session, so no process start or handshake is timed, only the daemon.
pub struct ApiSession {
    tls: rustls::StreamOwned<rustls::ClientConnection, std::net::TcpStream>,
}

impl ApiSession {
    /// Connects from inside `lab`'s router namespace, where the API listens.
    pub fn open(lab: &ThreeTier, ca: &Path, cert: &Path, key: &Path) -> Result<Self, Error> {
        let config = enforcer::tls::client_config(ca, cert, key)?;
        let tcp = lab.router.enter(|| std::net::TcpStream::connect(API))??;
        tcp.set_nodelay(true)?;
        tcp.set_read_timeout(Some(Duration::from_secs(10)))?;
        let connection = rustls::ClientConnection::new(config, rustls::pki_types::ServerName::try_from("127.0.0.1")?)?;
        Ok(Self { tls: rustls::StreamOwned::new(connection, tcp) })
    }

    /// Pushes one policy file (replacing the whole policy) and waits for
    /// the daemon's answer.
    fn push(&mut self, name: &str, text: &str) -> Result<(), Error> {
        let body = serde_json::json!({ "files": [{ "name": name, "text": text }] }).to_string();
        self.request("POST", "/v1/policy", "application/json", &body)
    }

    /// Changes one file of the enforced policy, leaving the others.
    pub fn put(&mut self, name: &str, text: &str) -> Result<(), Error> {
        self.request("PUT", &format!("/v1/policy/files/{name}"), "application/yaml", text)
    }

    /// Removes one file of the enforced policy.
    pub fn delete(&mut self, name: &str) -> Result<(), Error> {
        self.request("DELETE", &format!("/v1/policy/files/{name}"), "application/yaml", "")
    }

    /// One request on the open session; an answer other than 200 is an error.
    fn request(&mut self, method: &str, path: &str, content_type: &str, body: &str) -> Result<(), Error> {
        use std::io::{Read as _, Write as _};
        let request = format!(
            "{method} {path} HTTP/1.1\r\nHost: {API}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        self.tls.write_all(request.as_bytes())?;
        self.tls.flush()?;
        // Byte by byte up to the body, so nothing of a later response is
        // read ahead; then exactly Content-Length bytes.
        let mut head = Vec::new();
        let mut byte = [0u8];
        while !head.ends_with(b"\r\n\r\n") {
            self.tls.read_exact(&mut byte)?;
            head.push(byte[0]);
        }
        let head = String::from_utf8_lossy(&head).into_owned();
        let length = head
            .lines()
            .find_map(|line| line.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().to_owned()))
            .and_then(|v| v.parse::<usize>().ok())
            .ok_or("the daemon's answer has no Content-Length")?;
        let mut answer = vec![0; length];
        self.tls.read_exact(&mut answer)?;
        if !head.lines().next().is_some_and(|status| status.contains(" 200 ")) {
            return Err(format!(
                "push refused: {} {}",
                head.lines().next().unwrap_or_default(),
                String::from_utf8_lossy(&answer)
            )
            .into());
        }
        Ok(())
    }
}

/// Times one-rule changes of the three-tier policy, `gap` apart: change
/// `k` makes variant `k` (`prepare`, untimed) and hands it to the daemon
/// (`apply`), and is timed until a probe passes that only variant `k`
/// allows — a SYN from the gateway tier to the logic tier on that variant's
/// port, from a source port conntrack has not seen. (Polling /metrics
/// instead would time the scrape, and slow the daemon it measures.)
fn time_changes(
    program: &LiveProgram,
    changes: std::ops::RangeInclusive<usize>,
    gap: Duration,
    prepare: impl Fn(usize) -> Result<(), Error>,
    apply: impl Fn(usize) -> Result<(), Error>,
) -> Result<Vec<f64>, Error> {
    let (gateway, logic) = (Ipv4Addr::new(10, 0, 1, 7), Ipv4Addr::new(10, 0, 2, 7));
    changes
        .map(|k| {
            let probe = syn(gateway, logic, 20_000 + k as u16, 8080 + (k % 2) as u16);
            denied_before(program, &probe)?;
            prepare(k)?;
            std::thread::sleep(gap);
            let started = Instant::now();
            apply(k)?;
            Ok(enforced_after(program, &probe, started, Duration::from_secs(10), Duration::from_micros(20))?
                .as_secs_f64()
                * 1000.0)
        })
        .collect()
}

/// What a policy-pushing client needs: the server's CA, its certificate
/// and key, and where to write the files it pushes.
pub struct ClientFiles {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub scratch: PathBuf,
}

/// `changes` one-rule changes each by rename, by `bulkhead policy push`
/// and by a push on an open API connection, [`CHANGE_GAP`] apart; then as
/// many renames back to back, each as soon as the last is enforced. Each
/// series in ms.
pub fn timed_updates(
    lab: &ThreeTier,
    daemon: &Daemon,
    program: &LiveProgram,
    dir: &Path,
    client: &ClientFiles,
    changes: usize,
    variant: &dyn Fn(usize) -> String,
) -> Result<UpdateSeries, Error> {
    let path = |p: &Path| p.to_string_lossy().into_owned();
    let staging = dir.join(".p.yaml.new");
    let rename_in = |k: usize| Ok(std::fs::write(&staging, variant(k))?);
    let rename = |_| Ok(std::fs::rename(&staging, dir.join("p.yaml"))?);
    let renames = time_changes(program, 1..=changes, CHANGE_GAP, rename_in, rename)?;
    let push_file = client.scratch.join("pushed.yaml");
    let bulkhead = lab::topology::bulkhead_binary();
    let pushes = time_changes(
        program,
        changes + 1..=2 * changes,
        CHANGE_GAP,
        |k| Ok(std::fs::write(&push_file, variant(k))?),
        |_| {
            // Started from a thread inside the router's namespace, where the
            // API listens, as an operator's shell there would start it (not
            // through `nsenter`, whose own start would be timed too).
            let output = lab.router.enter(|| {
                Command::new(&bulkhead)
                    .args(["policy", "push", &path(&push_file), "--server", &format!("https://{API}")])
                    .args(["--cert", &path(&client.cert), "--key", &path(&client.key), "--ca", &path(&client.ca)])
                    .output()
            })??;
            if !output.status.success() {
                return Err(format!("policy push failed: {}", String::from_utf8_lossy(&output.stderr)).into());
            }
            Ok(())
        },
    )?;
    let session = std::cell::RefCell::new(ApiSession::open(lab, &client.ca, &client.cert, &client.key)?);
    let first = 2 * changes + 1;
    let texts: Vec<String> = (first..=3 * changes).map(variant).collect();
    let session_pushes = time_changes(
        program,
        first..=3 * changes,
        CHANGE_GAP,
        |_| Ok(()),
        |k| session.borrow_mut().push("pushed.yaml", &texts[k - first]),
    )?;
    let spaced_slot_waits = slot_waits(lab, daemon)?;
    // Back on the files (a pushed policy stays until the directory changes).
    let back_to_back = time_changes(program, 3 * changes + 1..=4 * changes, Duration::ZERO, rename_in, rename)?;
    let all_slot_waits = slot_waits(lab, daemon)?;
    let back_to_back_slot_waits = SlotWaits {
        applies: all_slot_waits.applies - spaced_slot_waits.applies,
        waited: all_slot_waits.waited - spaced_slot_waits.waited,
    };
    Ok(UpdateSeries { renames, pushes, session_pushes, back_to_back, spaced_slot_waits, back_to_back_slot_waits })
}

/// Of the daemon's applies so far, how many waited over a millisecond for
/// program runs still reading the slot they rewrote, from its metrics.
#[derive(Clone, Copy)]
struct SlotWaits {
    applies: u64,
    waited: u64,
}

fn slot_waits(lab: &ThreeTier, daemon: &Daemon) -> Result<SlotWaits, Error> {
    let (_, text) = lab::probe::http_get(&lab.router, daemon.metrics_addr, "/metrics")?;
    let value = |series: &str| -> Result<u64, Error> {
        let line = text
            .lines()
            .find(|line| line.starts_with(series))
            .ok_or_else(|| format!("no {series} in the daemon's metrics"))?;
        Ok(line.rsplit(' ').next().unwrap_or_default().parse()?)
    };
    let applies = value("bulkhead_policy_slot_wait_seconds_count ")?;
    let within = value("bulkhead_policy_slot_wait_seconds_bucket{le=\"0.001\"} ")?;
    Ok(SlotWaits { applies, waited: applies - within })
}

/// One-rule change latencies through the daemon, ms.
pub struct UpdateSeries {
    renames: Vec<f64>,
    pushes: Vec<f64>,
    session_pushes: Vec<f64>,
    back_to_back: Vec<f64>,
    /// Over the three spaced series.
    spaced_slot_waits: SlotWaits,
    back_to_back_slot_waits: SlotWaits,
}

pub fn markdown(md: &mut String, updates: &UpdateSeries) {
    let _ = writeln!(
        md,
        "\n### Policy update through the daemon (one-rule change → new generation enforced; changes {} ms apart unless back to back)\n\n| how | changes | p50 | p99 | max |\n|---|---:|---:|---:|---:|",
        CHANGE_GAP.as_millis()
    );
    for (how, samples) in [
        ("atomic rename of the policy file", &updates.renames),
        ("`bulkhead policy push` (mTLS API, CLI start included)", &updates.pushes),
        ("API push on an open mTLS connection (a controller's client)", &updates.session_pushes),
        ("renames back to back (each as soon as the last is enforced)", &updates.back_to_back),
    ] {
        let _ = writeln!(
            md,
            "| {how} | {} | {:.2} ms | {:.2} ms | {:.2} ms |",
            samples.len(),
            percentile(samples, 0.5),
            percentile(samples, 0.99),
            percentile(samples, 1.0)
        );
    }
    let (spaced, back_to_back) = (updates.spaced_slot_waits, updates.back_to_back_slot_waits);
    let _ = writeln!(
        md,
        "\nApplies that waited over 1 ms for program runs still reading the slot they rewrote (`bulkhead_policy_slot_wait_seconds`): {} of {} changes in the three spaced series, {} of {} back to back.",
        spaced.waited, spaced.applies, back_to_back.waited, back_to_back.applies
    );
}

pub fn json(updates: &UpdateSeries) -> serde_json::Value {
    let series = |samples: &[f64]| serde_json::json!({"p50": percentile(samples, 0.5), "p99": percentile(samples, 0.99), "samples": samples});
    serde_json::json!({
        "change_gap_ms": ms(CHANGE_GAP),
        "rename": series(&updates.renames),
        "push": series(&updates.pushes),
        "push_open_connection": series(&updates.session_pushes),
        "rename_back_to_back": series(&updates.back_to_back),
        "slot_waits_over_1ms": {
            "spaced": {"applies": updates.spaced_slot_waits.applies, "waited": updates.spaced_slot_waits.waited},
            "back_to_back": {"applies": updates.back_to_back_slot_waits.applies, "waited": updates.back_to_back_slot_waits.waited},
        },
    })
}
