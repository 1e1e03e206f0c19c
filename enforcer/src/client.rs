//! The CLI side of the admin API: `bulkhead status`, `policy push`,
//! `policy diff` and `flows`, over HTTPS with a client certificate.

use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::Args;
use enforcer::tls;
use rustls::pki_types::ServerName;
use rustls::{ClientConnection, StreamOwned};

use crate::api::{PolicyFile, PolicyFiles};

/// How to reach and authenticate to a daemon's admin API.
#[derive(Args, Debug, Clone)]
pub struct ServerArgs {
    /// The daemon's admin API, e.g. `https://10.0.0.5:9443`.
    #[arg(long, value_name = "URL")]
    pub server: String,
    /// Client certificate (PEM) whose subject has a role on the daemon.
    #[arg(long, value_name = "FILE")]
    pub cert: PathBuf,
    /// The client certificate's private key (PEM).
    #[arg(long, value_name = "FILE")]
    pub key: PathBuf,
    /// CA that signed the daemon's server certificate (PEM).
    #[arg(long, value_name = "FILE")]
    pub ca: PathBuf,
}

type Tls = StreamOwned<ClientConnection, TcpStream>;

struct Response {
    status: u16,
    reader: BufReader<Tls>,
    chunked: bool,
    length: Option<usize>,
}

impl ServerArgs {
    fn connect(&self) -> anyhow::Result<(Tls, String)> {
        let address = self
            .server
            .strip_prefix("https://")
            .with_context(|| format!("--server `{}` must start with https://", self.server))?
            .trim_end_matches('/');
        let host =
            address.rsplit_once(':').map_or(address, |(host, _)| host).trim_start_matches('[').trim_end_matches(']');
        let config = tls::client_config(&self.ca, &self.cert, &self.key)?;
        let name = ServerName::try_from(host.to_owned()).with_context(|| format!("`{host}` is not a host name"))?;
        let connection = ClientConnection::new(config, name)?;
        let tcp = TcpStream::connect(address).with_context(|| format!("cannot connect to {}", self.server))?;
        tcp.set_read_timeout(Some(Duration::from_secs(30)))?;
        // One request, one response: Nagle's algorithm would only hold the
        // last segment back for the peer's delayed acknowledgement (40 ms).
        tcp.set_nodelay(true)?;
        Ok((StreamOwned::new(connection, tcp), address.to_owned()))
    }

    fn request(&self, method: &str, path: &str, body: Option<&str>) -> anyhow::Result<Response> {
        let (mut tls, address) = self.connect()?;
        let body = body.unwrap_or_default();
        // Written whole: `write!` would send each formatted piece as its own TLS record.
        let request = format!(
            "{method} {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        tls.write_all(request.as_bytes())
            .and_then(|()| tls.flush())
            .map_err(|error| anyhow::anyhow!("the daemon refused the TLS session or the request: {error}"))?;
        let mut reader = BufReader::new(tls);
        let mut line = String::new();
        reader.read_line(&mut line).map_err(|error| anyhow::anyhow!("the daemon refused the connection: {error}"))?;
        let status =
            line.split_whitespace().nth(1).and_then(|code| code.parse().ok()).context("not an HTTP response")?;
        let (mut chunked, mut length) = (false, None);
        loop {
            line.clear();
            reader.read_line(&mut line)?;
            let header = line.trim_end();
            if header.is_empty() {
                break;
            }
            let lower = header.to_ascii_lowercase();
            if lower == "transfer-encoding: chunked" {
                chunked = true;
            } else if let Some(value) = lower.strip_prefix("content-length:") {
                length = value.trim().parse().ok();
            }
        }
        Ok(Response { status, reader, chunked, length })
    }
}

impl Response {
    /// Calls `each` with every piece of the body as it arrives.
    fn stream(mut self, mut each: impl FnMut(&[u8]) -> anyhow::Result<()>) -> anyhow::Result<()> {
        if !self.chunked {
            let mut body = Vec::new();
            match self.length {
                Some(length) => {
                    body.resize(length, 0);
                    self.reader.read_exact(&mut body)?;
                }
                None => {
                    self.reader.read_to_end(&mut body)?;
                }
            }
            return each(&body);
        }
        let mut line = String::new();
        loop {
            line.clear();
            if self.reader.read_line(&mut line)? == 0 {
                return Ok(());
            }
            let size = usize::from_str_radix(line.trim(), 16).context("bad chunked encoding from the daemon")?;
            if size == 0 {
                return Ok(());
            }
            let mut chunk = vec![0u8; size + 2];
            self.reader.read_exact(&mut chunk)?;
            each(&chunk[..size])?;
        }
    }

    fn text(self) -> anyhow::Result<(u16, String)> {
        let status = self.status;
        let mut body = Vec::new();
        self.stream(|piece| {
            body.extend_from_slice(piece);
            Ok(())
        })?;
        Ok((status, String::from_utf8_lossy(&body).into_owned()))
    }
}

fn expect_ok(status: u16, body: &str) -> anyhow::Result<()> {
    match status {
        200 => Ok(()),
        403 => bail!("refused (403): {}", body.trim()),
        other => bail!("the daemon answered {other}: {}", body.trim()),
    }
}

pub fn status(server: &ServerArgs) -> anyhow::Result<ExitCode> {
    let (status, body) = server.request("GET", "/v1/status", None)?.text()?;
    expect_ok(status, &body)?;
    let value: serde_json::Value = serde_json::from_str(&body)?;
    println!("{}", serde_json::to_string_pretty(&value)?);
    Ok(ExitCode::SUCCESS)
}

fn read_files(paths: &[PathBuf]) -> anyhow::Result<PolicyFiles> {
    let sources = policy::read_sources(paths)?;
    Ok(PolicyFiles {
        files: sources.into_iter().map(|s| PolicyFile { name: s.name, text: s.text }).collect(),
        keep_others: false,
        signed: None,
    })
}

/// The signed manifest of a directory pushed alone, if it has one.
fn signed_set(paths: &[PathBuf]) -> anyhow::Result<Option<crate::api::SignedSet>> {
    let [dir] = paths else { return Ok(None) };
    let manifest = dir.join(enforcer::signing::MANIFEST);
    if !dir.is_dir() || !manifest.exists() {
        return Ok(None);
    }
    let read = |path: &std::path::Path| {
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))
    };
    Ok(Some(crate::api::SignedSet {
        manifest: read(&manifest)?,
        signature: read(&dir.join(enforcer::signing::SIGNATURE))?,
    }))
}

pub fn push(server: &ServerArgs, paths: &[PathBuf], keep_others: bool) -> anyhow::Result<ExitCode> {
    // A signed directory goes with its manifest and signature.
    let files = PolicyFiles { keep_others, signed: signed_set(paths)?, ..read_files(paths)? };
    let body = serde_json::to_string(&files)?;
    let (status, body) = server.request("POST", "/v1/policy", Some(&body))?.text()?;
    if status == 422 {
        let value: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        for problem in value["errors"].as_array().into_iter().flatten() {
            println!("{}", problem.as_str().unwrap_or_default());
        }
        eprintln!("the daemon rejected the policy; nothing changed");
        return Ok(ExitCode::FAILURE);
    }
    expect_ok(status, &body)?;
    let value: serde_json::Value = serde_json::from_str(&body)?;
    println!("applied as policy generation {}", value["generation"]);
    Ok(ExitCode::SUCCESS)
}

pub fn diff(server: &ServerArgs, paths: &[PathBuf]) -> anyhow::Result<ExitCode> {
    let (status, body) = server.request("GET", "/v1/policy", None)?.text()?;
    expect_ok(status, &body)?;
    let current: PolicyFiles = serde_json::from_str(&body)?;
    let to_sources = |files: Vec<PolicyFile>| {
        files.into_iter().map(|f| policy::Source { name: f.name, text: f.text }).collect::<Vec<_>>()
    };
    let running =
        policy::parse_sources(&to_sources(current.files)).context("the daemon's policy does not parse here")?;
    let local = policy::parse_sources(&to_sources(read_files(paths)?.files))?;
    let lines = policy_diff(&running, &local);
    if lines.is_empty() {
        println!("no difference: the daemon enforces this policy");
    }
    for line in &lines {
        println!("{line}");
    }
    Ok(ExitCode::SUCCESS)
}

/// `+ identity x`, `- rule y`, `~ rule z` lines from `running` to `local`.
fn policy_diff(running: &policy::Policy, local: &policy::Policy) -> Vec<String> {
    policy::diff::diff(running, local)
        .into_iter()
        .map(|d| {
            let sign = match d.change {
                policy::diff::Change::Added => '+',
                policy::diff::Change::Removed => '-',
                policy::diff::Change::Changed => '~',
            };
            format!("{sign} {} {}", d.kind, d.name)
        })
        .collect()
}

/// `bulkhead policy suggest`: the policy that allows exactly what the
/// daemon's audit mode passed, printed for review.
pub fn suggest(server: &ServerArgs, format: &str) -> anyhow::Result<ExitCode> {
    let render = match format {
        "segment" => enforcer::observed::segment_policy,
        "networkpolicy" => enforcer::observed::network_policies,
        other => bail!("`{other}` is not a format: use segment or networkpolicy"),
    };
    let (status, body) = server.request("GET", "/v1/observed", None)?.text()?;
    expect_ok(status, &body)?;
    let report: enforcer::observed::ObservedReport =
        serde_json::from_str(&body).context("the daemon's answer is not a list of observed flows")?;
    print!("{}", render(&report));
    Ok(ExitCode::SUCCESS)
}

/// `bulkhead policy unused [--since WHEN]`: the allow rules that decided
/// nothing since then, from the daemon's record (kept across restarts).
pub fn unused(server: &ServerArgs, since: &str) -> anyhow::Result<ExitCode> {
    let now = std::time::SystemTime::now();
    // A time as given; a duration counts back from now (`30d`: the last 30 days).
    let since_time = policy::parse_rfc3339(since)
        .or_else(|| enforcer::signing::parse_duration(since).and_then(|back| now.checked_sub(back)))
        .with_context(|| {
            format!("--since: `{since}` is neither a duration (such as 12h or 30d) nor an RFC 3339 time")
        })?;
    let (status, body) = server.request("GET", "/v1/rules/usage", None)?.text()?;
    expect_ok(status, &body)?;
    let report: std::collections::BTreeMap<String, enforcer::usage::RuleUse> =
        serde_json::from_str(&body).context("the daemon's answer is not a rule usage record")?;
    let time =
        |seconds: u64| enforcer::events::rfc3339_at(std::time::UNIX_EPOCH + std::time::Duration::from_secs(seconds));
    let window = since_time.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let unused = enforcer::usage::unused(&report, since_time);
    for (name, rule) in &unused {
        let used = rule.last_used.map_or_else(|| "never used".to_owned(), |used| format!("last used {}", time(used)));
        let young = if rule.since > window { "; in force for less than the window" } else { "" };
        println!("{name}: {used} (in force on this node since {}{young})", time(rule.since));
    }
    println!(
        "{} of {} allow rule(s) decided nothing since {}",
        unused.len(),
        report.values().filter(|r| r.action == "allow").count(),
        time(window)
    );
    Ok(ExitCode::SUCCESS)
}

/// A query parameter's value, percent-encoded (targets hold `/`, `{`, `=`).
fn query_value(text: &str) -> String {
    text.bytes().fold(String::new(), |mut out, byte| {
        if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) {
            out.push(char::from(byte));
        } else {
            let _ = write!(out, "%{byte:02X}");
        }
        out
    })
}

/// Prints a refusal's errors and fails; passes anything else on.
fn refused_change(status: u16, body: &str) -> anyhow::Result<Option<ExitCode>> {
    if matches!(status, 404 | 422) {
        let value: serde_json::Value = serde_json::from_str(body).unwrap_or_default();
        for problem in value["errors"].as_array().into_iter().flatten() {
            eprintln!("error: {}", problem.as_str().unwrap_or_default());
        }
        return Ok(Some(ExitCode::FAILURE));
    }
    expect_ok(status, body)?;
    Ok(None)
}

fn describe_entry(entry: &enforcer::quarantine::Entry) -> String {
    let addresses = if entry.addresses.is_empty() { "no address now".to_owned() } else { entry.addresses.join(", ") };
    let expires = entry.expires.as_deref().map_or_else(|| "until removed".to_owned(), |at| format!("until {at}"));
    let reason = if entry.reason.is_empty() { String::new() } else { format!("; reason: {}", entry.reason) };
    format!("{} ({addresses}) by {} since {}, {expires}{reason}", entry.target, entry.by, entry.since)
}

pub fn quarantine_add(
    server: &ServerArgs,
    target: &str,
    reason: Option<&str>,
    expires: Option<&str>,
) -> anyhow::Result<ExitCode> {
    if let Some(expires) = expires {
        // Checked here too, so a typo fails before anything is sent.
        enforcer::signing::parse_time(expires, std::time::SystemTime::now())
            .map_err(|why| anyhow::anyhow!("--expires: {why}"))?;
    }
    let request = crate::api::QuarantineRequest {
        target: target.to_owned(),
        reason: reason.unwrap_or_default().to_owned(),
        expires: expires.map(str::to_owned),
    };
    let (status, body) = server.request("POST", "/v1/quarantine", Some(&serde_json::to_string(&request)?))?.text()?;
    if let Some(code) = refused_change(status, &body)? {
        return Ok(code);
    }
    let change: serde_json::Value = serde_json::from_str(&body).context("the daemon's answer is not a quarantine")?;
    let entry: enforcer::quarantine::Entry = serde_json::from_value(change["entry"].clone())?;
    println!("quarantined {}", describe_entry(&entry));
    if entry.addresses.is_empty() {
        println!("(nothing has this name now: its addresses are isolated as soon as they appear)");
    }
    println!("{} tracked connection entries cut", change["flows_cut"]);
    Ok(ExitCode::SUCCESS)
}

pub fn quarantine_list(server: &ServerArgs) -> anyhow::Result<ExitCode> {
    let (status, body) = server.request("GET", "/v1/quarantine", None)?.text()?;
    expect_ok(status, &body)?;
    let list: crate::api::QuarantineList =
        serde_json::from_str(&body).context("the daemon's answer is not a quarantine list")?;
    for entry in &list.quarantined {
        println!("{}", describe_entry(entry));
    }
    println!("{} target(s) quarantined", list.quarantined.len());
    Ok(ExitCode::SUCCESS)
}

pub fn quarantine_remove(server: &ServerArgs, target: &str) -> anyhow::Result<ExitCode> {
    let path = format!("/v1/quarantine?target={}", query_value(target));
    let (status, body) = server.request("DELETE", &path, None)?.text()?;
    if let Some(code) = refused_change(status, &body)? {
        return Ok(code);
    }
    let entry: enforcer::quarantine::Entry =
        serde_json::from_str(&body).context("the daemon's answer is not a quarantine")?;
    println!("released {}", describe_entry(&entry));
    Ok(ExitCode::SUCCESS)
}

pub fn flows(server: &ServerArgs, follow: bool) -> anyhow::Result<ExitCode> {
    let path = if follow { "/v1/flows?follow=true" } else { "/v1/flows" };
    let response = server.request("GET", path, None)?;
    if response.status != 200 {
        let (status, body) = response.text()?;
        expect_ok(status, &body)?;
        return Ok(ExitCode::FAILURE);
    }
    let stdout = std::io::stdout();
    response.stream(|piece| {
        let mut out = stdout.lock();
        out.write_all(piece)?;
        out.flush()?;
        Ok(())
    })?;
    Ok(ExitCode::SUCCESS)
}
