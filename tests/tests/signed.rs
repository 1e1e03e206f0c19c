//! Signed policy sets (`bulkhead run --trusted-keys`), with real packets:
//! only the set a trusted key signed is enforced; a file changed, added or
//! removed after signing, a set signed by another key, an older version
//! (also across a restart) and an expired set are each refused with their
//! reason, counted, and the last good policy stays. Keys and signatures
//! from the stock `minisign` tool work beside Bulkhead's own.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use lab::probe::{self, EchoServer, Outcome};
use lab::{Daemon, ScratchDir, ThreeTier};

fn three_tier() -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/three-tier.yaml")).unwrap()
}

/// The example, plus a rule that lets logic reach gateway: looser.
fn looser() -> String {
    three_tier().replace(
        "  rules:\n",
        "  rules:\n    - name: logic-to-gateway\n      from: [{identity: logic}]\n      to: [{identity: gateway}]\n      ports: [\"8080/tcp\"]\n",
    )
}

fn run(program: &str, args: &[&str]) -> Output {
    Command::new(program).args(args).output().unwrap_or_else(|error| panic!("{program}: {error}"))
}

fn bulkhead(args: &[&str]) -> Output {
    let binary = lab::topology::bulkhead_binary();
    run(&binary.display().to_string(), args)
}

fn text(output: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr))
}

fn path(path: &Path) -> String {
    path.display().to_string()
}

fn metric(lab: &ThreeTier, daemon: &Daemon, sample: &str) -> Option<u64> {
    let (_, body) = probe::http_get(&lab.router, daemon.metrics_addr, "/metrics").unwrap();
    probe::metric(&body, sample)
}

/// Waits until `reason` has been counted `count` times.
fn refused(lab: &ThreeTier, daemon: &Daemon, reason: &str, count: u64) {
    let sample = format!("bulkhead_policy_load_errors_total{{reason=\"{reason}\"}}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while metric(lab, daemon, &sample) != Some(count) {
        assert!(Instant::now() < deadline, "{sample} never reached {count}: {}", daemon.log_text());
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn write(dir: &Path, name: &str, text: &str) {
    let temporary = dir.join(format!(".{name}.new"));
    std::fs::write(&temporary, text).unwrap();
    std::fs::rename(&temporary, dir.join(name)).unwrap();
}

fn sign(dir: &Path, key: &Path, version: u64) {
    let signed = bulkhead(&["policy", "sign", "--key", &path(key), "--version", &version.to_string(), &path(dir)]);
    assert!(signed.status.success(), "{}", text(&signed));
}

struct Setup {
    lab: ThreeTier,
    scratch: ScratchDir,
    dir: PathBuf,
    keys: PathBuf,
    /// Made by the stock tool (`minisign -G -W`), trusted.
    key: PathBuf,
    _servers: Vec<EchoServer>,
}

impl Setup {
    fn new(label: &str) -> Self {
        let lab = ThreeTier::new(label).unwrap();
        let scratch = ScratchDir::new(&lab.stem).unwrap();
        let (dir, keys) = (scratch.0.join("policy"), scratch.0.join("keys"));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::create_dir_all(&keys).unwrap();
        let key = scratch.0.join("ops.key");
        let made = run("minisign", &["-G", "-W", "-p", &path(&keys.join("ops.pub")), "-s", &path(&key)]);
        assert!(made.status.success(), "{}", text(&made));
        std::fs::write(dir.join("p.yaml"), three_tier()).unwrap();
        let servers = lab.hosts.iter().map(|h| EchoServer::start(&h.ns, &h.addrs(), &[8080], &[]).unwrap()).collect();
        Self { lab, scratch, dir, keys, key, _servers: servers }
    }

    fn args(&self) -> Vec<String> {
        vec!["--trusted-keys".into(), path(&self.keys), "--state-dir".into(), path(&self.scratch.0.join("state"))]
    }

    fn start(&self, log: &str) -> Daemon {
        let args = self.args();
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        Daemon::start_with(&self.lab, &self.dir, &self.scratch.0.join(log), &args).unwrap()
    }

    /// Starts a daemon that must refuse the directory: its log.
    fn refused_start(&self, log: &str) -> String {
        let mut args = vec!["--detach-on-exit".to_owned(), "--policy-dir".to_owned(), path(&self.dir)];
        args.extend(self.args());
        for interface in self.lab.router_interfaces() {
            args.extend(["--interface".to_owned(), interface]);
        }
        let mut daemon = Daemon::spawn(&self.lab, &args, &self.scratch.0.join(log)).unwrap();
        let status = daemon.wait_exit(Duration::from_secs(20)).unwrap().expect("exits by itself");
        assert!(!status.success());
        assert!(!self.lab.any_xdp_attached().unwrap(), "nothing attached");
        daemon.log_text()
    }

    fn logic_to_gateway(&self) -> Outcome {
        let gateway = SocketAddr::new(IpAddr::V4(self.lab.host("gateway").addr), 8080);
        probe::tcp(&self.lab.host("logic").ns, gateway).unwrap()
    }
}

#[test]
fn only_the_signed_policy_set_is_enforced() {
    let setup = Setup::new("signed");
    let (lab, dir) = (&setup.lab, &setup.dir);
    // Unsigned: refused at start, nothing attached.
    let log = setup.refused_start("unsigned.log");
    assert!(log.contains("no policy manifest"), "{log}");

    sign(dir, &setup.key, 2);
    let verified = bulkhead(&["policy", "verify", "--trusted-keys", &path(&setup.keys), &path(dir)]);
    assert!(verified.status.success() && text(&verified).contains("version 2"), "{}", text(&verified));
    let daemon = setup.start("log");
    assert_eq!(setup.logic_to_gateway(), Outcome::TimedOut, "the signed example: logic may not reach gateway");

    // A looser file, unsigned: refused, counted, named; the signed policy stays.
    write(dir, "p.yaml", &looser());
    refused(lab, &daemon, "files_differ", 1);
    assert!(daemon.log_text().contains("p.yaml: the policy file's SHA-256 is not the one"), "{}", daemon.log_text());
    assert!(
        daemon.log_text().contains("who=policy-dir action=load result=rejected reason=files_differ"),
        "audited: {}",
        daemon.log_text()
    );
    assert_eq!(setup.logic_to_gateway(), Outcome::TimedOut);
    let verify = bulkhead(&["policy", "verify", "--trusted-keys", &path(&setup.keys), &path(dir)]);
    assert!(!verify.status.success() && text(&verify).contains("p.yaml"), "{}", text(&verify));

    // Signed, but by a key the node does not trust.
    let other = setup.scratch.0.join("intruder");
    let made = bulkhead(&["policy", "keygen", "--out", &path(&other)]);
    assert!(made.status.success(), "{}", text(&made));
    sign(dir, &other.with_extension("key"), 9);
    refused(lab, &daemon, "untrusted_key", 1);
    assert_eq!(setup.logic_to_gateway(), Outcome::TimedOut);

    // The looser set signed with the trusted key, as version 3, by the
    // stock tools: a manifest from sha256sum, signed by minisign.
    let listed = Command::new("sha256sum").arg("p.yaml").current_dir(dir).output().unwrap();
    let manifest = format!("bulkhead-policy-manifest v1\nversion: 3\n{}", String::from_utf8_lossy(&listed.stdout));
    std::fs::write(dir.join(".bulkhead-manifest"), manifest).unwrap();
    let signed = run("minisign", &["-S", "-s", &path(&setup.key), "-m", &path(&dir.join(".bulkhead-manifest"))]);
    assert!(signed.status.success(), "{}", text(&signed));
    let deadline = Instant::now() + Duration::from_secs(10);
    while setup.logic_to_gateway() != Outcome::Connected {
        assert!(Instant::now() < deadline, "version 3 not enforced: {}", daemon.log_text());
    }

    // Back to the stricter version 2 (a rollback): refused; version 3 stays.
    write(dir, "p.yaml", &three_tier());
    sign(dir, &setup.key, 2);
    refused(lab, &daemon, "rollback", 1);
    assert!(daemon.log_text().contains("version 2 is older than version 3"), "{}", daemon.log_text());
    assert_eq!(setup.logic_to_gateway(), Outcome::Connected);

    // A key made by `bulkhead policy keygen`, added to the trusted keys
    // (rotation): its version 4 is enforced; the stock tool verifies it.
    let next = setup.scratch.0.join("next");
    assert!(bulkhead(&["policy", "keygen", "--out", &path(&next)]).status.success());
    std::fs::copy(next.with_extension("pub"), setup.keys.join("next.pub")).unwrap();
    sign(dir, &next.with_extension("key"), 4);
    let checked = run(
        "minisign",
        &["-V", "-p", &path(&next.with_extension("pub")), "-m", &path(&dir.join(".bulkhead-manifest"))],
    );
    assert!(checked.status.success(), "the stock tool verifies Bulkhead's signature: {}", text(&checked));
    let deadline = Instant::now() + Duration::from_secs(10);
    while setup.logic_to_gateway() != Outcome::TimedOut {
        assert!(Instant::now() < deadline, "version 4 not enforced: {}", daemon.log_text());
    }

    // Signed but invalid (the engine refuses it): never enforced, so its
    // version is not the floor.
    write(dir, "p.yaml", &three_tier().replace("ports: [\"8080/tcp\"]", "ports: [\"80800/tcp\"]"));
    sign(dir, &next.with_extension("key"), 7);
    refused(lab, &daemon, "invalid", 1);
    // Passes over the unchanged directory (one a second) must not record it either.
    std::thread::sleep(Duration::from_millis(2500));
    drop(daemon);

    // The node remembers version 4: after a restart, version 3 is refused.
    write(dir, "p.yaml", &looser());
    sign(dir, &setup.key, 3);
    let log = setup.refused_start("restarted.log");
    assert!(log.contains("version 3 is older than version 4"), "{log}");

    // An expired set (its manifest written by hand) is refused too.
    let listed = Command::new("sha256sum").arg("p.yaml").current_dir(dir).output().unwrap();
    let manifest = format!(
        "bulkhead-policy-manifest v1\nversion: 5\nexpires: 2026-01-01T00:00:00Z\n{}",
        String::from_utf8_lossy(&listed.stdout)
    );
    std::fs::write(dir.join(".bulkhead-manifest"), manifest).unwrap();
    let signed = run("minisign", &["-S", "-s", &path(&setup.key), "-m", &path(&dir.join(".bulkhead-manifest"))]);
    assert!(signed.status.success(), "{}", text(&signed));
    let expired = bulkhead(&["policy", "verify", "--trusted-keys", &path(&setup.keys), &path(dir)]);
    assert!(!expired.status.success() && text(&expired).contains("expired"), "{}", text(&expired));
}
