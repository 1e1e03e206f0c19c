//! The OCI image of `cargo xtask image`: its configuration matches the
//! `Dockerfile`, registry tooling (skopeo) reads the archive, and the image
//! run by runc in the lab's router namespace enforces the three-tier policy
//! on real packets. Needs root, umoci, skopeo and runc, and the archive's
//! path in `BULKHEAD_IMAGE`: run through `cargo xtask test`, which builds
//! the image and installs those.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use lab::probe::{self, EchoServer, Outcome};
use lab::{ScratchDir, ThreeTier};
use serde_json::{Value, json};

/// The archive under test.
fn archive() -> PathBuf {
    let Some(path) = std::env::var_os("BULKHEAD_IMAGE") else {
        panic!(
            "BULKHEAD_IMAGE is not set: run through `cargo xtask test`, which builds the image \
             (as `cargo xtask image` does) and passes target/image/bulkhead.oci.tar"
        );
    };
    let path = PathBuf::from(path);
    assert!(path.is_file(), "BULKHEAD_IMAGE={} is not a file", path.display());
    path
}

fn run(program: &str, args: &[&str]) -> String {
    let output = Command::new(program).args(args).output().unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    assert!(
        output.status.success(),
        "`{program} {}` failed with {}: {}",
        args.join(" "),
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn read_json(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()))
}

/// The archive extracted as the plain OCI image layout it must be.
struct Layout {
    dir: ScratchDir,
}

impl Layout {
    fn extract(stem: &str) -> Self {
        let dir = ScratchDir::new(&format!("bh{}-{stem}-layout", std::process::id())).expect("scratch dir");
        run("tar", &["-xf", archive().to_str().unwrap(), "-C", dir.0.to_str().unwrap()]);
        assert_eq!(read_json(&dir.0.join("oci-layout"))["imageLayoutVersion"], "1.0.0");
        Self { dir }
    }

    fn blob(&self, digest: &Value) -> Value {
        let digest = digest.as_str().expect("a digest is a string");
        let (algorithm, hex) = digest.split_once(':').expect("algorithm:hex");
        read_json(&self.dir.0.join("blobs").join(algorithm).join(hex))
    }

    /// index.json's one manifest descriptor.
    fn descriptor(&self) -> Value {
        let index = read_json(&self.dir.0.join("index.json"));
        let manifests = index["manifests"].as_array().expect("index.json lists manifests");
        assert_eq!(manifests.len(), 1, "one image per archive: {index}");
        manifests[0].clone()
    }

    fn manifest(&self) -> Value {
        self.blob(&self.descriptor()["digest"])
    }

    /// The image configuration: index.json → manifest → config blob.
    fn config(&self) -> Value {
        self.blob(&self.manifest()["config"]["digest"])
    }
}

/// The final stage of a Dockerfile, as the image configuration fields it sets.
#[derive(Debug, Default)]
struct FinalStage {
    entrypoint: Option<Value>,
    cmd: Option<Value>,
    user: Option<String>,
    workdir: Option<String>,
    env: Vec<String>,
    labels: BTreeMap<String, String>,
}

/// Splits `key="value with spaces" other=plain` into pairs.
fn key_values(text: &str) -> Vec<(String, String)> {
    let mut pairs = Vec::new();
    let mut chars = text.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        if chars.peek().is_none() {
            return pairs;
        }
        let key: String = chars.by_ref().take_while(|c| *c != '=').collect();
        let mut value = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            while let Some(c) = chars.next() {
                match c {
                    '"' => break,
                    '\\' => value.extend(chars.next()),
                    c => value.push(c),
                }
            }
        } else {
            while let Some(c) = chars.next_if(|c| !c.is_whitespace()) {
                value.push(c);
            }
        }
        pairs.push((key, value));
    }
}

fn parse_final_stage(dockerfile: &str) -> FinalStage {
    // Comments out, continuation lines joined.
    let mut joined = String::new();
    for line in dockerfile.lines().filter(|line| !line.trim_start().starts_with('#')) {
        if let Some(continued) = line.trim_end().strip_suffix('\\') {
            joined.push_str(continued);
            joined.push(' ');
        } else {
            joined.push_str(line);
            joined.push('\n');
        }
    }
    let mut stage = FinalStage::default();
    for line in joined.lines().map(str::trim).filter(|line| !line.is_empty()) {
        let (instruction, rest) = line.split_once(char::is_whitespace).unwrap_or((line, ""));
        let rest = rest.trim();
        let exec_form =
            || serde_json::from_str::<Value>(rest).unwrap_or_else(|e| panic!("{line}: not an exec form: {e}"));
        match instruction.to_ascii_uppercase().as_str() {
            "FROM" => stage = FinalStage::default(),
            "ENTRYPOINT" => stage.entrypoint = Some(exec_form()),
            "CMD" => stage.cmd = Some(exec_form()),
            "USER" => stage.user = Some(rest.to_owned()),
            "WORKDIR" => stage.workdir = Some(rest.to_owned()),
            "ENV" => stage.env.extend(key_values(rest).into_iter().map(|(k, v)| format!("{k}={v}"))),
            "LABEL" => stage.labels.extend(key_values(rest)),
            _ => {}
        }
    }
    stage
}

/// Every way the Dockerfile's final stage and the image configuration
/// differ. Labels whose Dockerfile value comes from a build argument
/// (`${REVISION}`) are compared by key only.
fn drift(dockerfile: &str, config: &Value) -> Vec<String> {
    let stage = parse_final_stage(dockerfile);
    let config = &config["config"];
    let mut drift = Vec::new();
    let mut compare = |what: &str, dockerfile: Value, image: &Value| {
        if dockerfile != *image {
            drift.push(format!("{what}: Dockerfile {dockerfile}, image {image}"));
        }
    };
    compare("ENTRYPOINT", stage.entrypoint.unwrap_or(Value::Null), &config["Entrypoint"]);
    compare("CMD", stage.cmd.unwrap_or(Value::Null), &config["Cmd"]);
    compare("USER", stage.user.map_or(Value::Null, Value::from), &config["User"]);
    compare("WORKDIR", stage.workdir.map_or(Value::Null, Value::from), &config["WorkingDir"]);
    compare("ENV", json!(stage.env), &config["Env"]);
    let image_labels: BTreeMap<String, String> = config["Labels"]
        .as_object()
        .map(|labels| labels.iter().map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned())).collect())
        .unwrap_or_default();
    let keys = |labels: &BTreeMap<String, String>| labels.keys().cloned().collect::<Vec<_>>();
    compare("LABEL keys", json!(keys(&stage.labels)), &json!(keys(&image_labels)));
    for (key, value) in &stage.labels {
        if !value.contains('$') {
            compare(&format!("LABEL {key}"), json!(value), &json!(image_labels.get(key)));
        }
    }
    drift
}

fn dockerfile() -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../Dockerfile");
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

#[test]
fn the_dockerfile_sets_what_the_image_has() {
    let layout = Layout::extract("dockerfile");
    let config = layout.config();
    let drift = drift(&dockerfile(), &config);
    assert!(drift.is_empty(), "the Dockerfile's final stage and cargo xtask image differ:\n{}", drift.join("\n"));

    // The comparison sees a change in any of them.
    let dockerfile = dockerfile();
    for (from, to) in [
        ("CMD [\"--help\"]", "CMD [\"run\", \"--help\"]"),
        ("ENTRYPOINT [\"/usr/bin/bulkhead\"]", "ENTRYPOINT [\"/bulkhead\"]"),
        ("USER 0:0", "USER 65532"),
        ("org.opencontainers.image.title=", "org.opencontainers.image.name="),
        ("\"Apache-2.0\"", "\"MIT\""),
    ] {
        assert!(dockerfile.contains(from), "the Dockerfile has no `{from}`");
        assert!(!drift_free(&dockerfile.replace(from, to), &config), "drift after `{from}` → `{to}` went unseen");
    }
}

fn drift_free(dockerfile: &str, config: &Value) -> bool {
    drift(dockerfile, config).is_empty()
}

#[test]
fn labels_name_this_build() {
    let layout = Layout::extract("labels");
    let config = layout.config();
    let labels = &config["config"]["Labels"];
    assert_eq!(labels["org.opencontainers.image.version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(labels["org.opencontainers.image.licenses"], env!("CARGO_PKG_LICENSE"));
    let revision = labels["org.opencontainers.image.revision"].as_str().expect("a revision label");
    assert!(revision.len() == 40 && revision.bytes().all(|b| b.is_ascii_hexdigit()), "revision {revision}");
    let created = labels["org.opencontainers.image.created"].as_str().expect("a created label");
    assert_eq!(config["created"], created, "the image's creation time is the label's");
    assert!(created.len() == 20 && created.ends_with('Z'), "created {created} is not RFC 3339 UTC");
    // The same labels are the manifest's annotations.
    let manifest = layout.manifest();
    for (key, value) in labels.as_object().expect("labels") {
        assert_eq!(&manifest["annotations"][key], value, "manifest annotation {key}");
    }
    // podman load names the image after this.
    let name = &layout.descriptor()["annotations"]["org.opencontainers.image.ref.name"];
    assert_eq!(name, &json!(format!("bulkhead:{}", env!("CARGO_PKG_VERSION"))));
    assert_eq!((config["os"].as_str(), config["architecture"].as_str()), (Some("linux"), Some("amd64")));
}

#[test]
fn skopeo_reads_the_archive() {
    let layout = Layout::extract("skopeo");
    let path = format!("oci-archive:{}", archive().display());
    let inspected: Value = serde_json::from_str(&run("skopeo", &["inspect", &path])).expect("skopeo prints JSON");
    assert_eq!(inspected["Digest"], layout.descriptor()["digest"]);
    assert_eq!(inspected["Labels"], layout.config()["config"]["Labels"]);
}

/// Every capability up to `CAP_CHECKPOINT_RESTORE` (40), by number.
const ALL_CAPABILITIES: [&str; 41] = [
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_DAC_READ_SEARCH",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST",
    "CAP_NET_ADMIN",
    "CAP_NET_RAW",
    "CAP_IPC_LOCK",
    "CAP_IPC_OWNER",
    "CAP_SYS_MODULE",
    "CAP_SYS_RAWIO",
    "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE",
    "CAP_SYS_PACCT",
    "CAP_SYS_ADMIN",
    "CAP_SYS_BOOT",
    "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE",
    "CAP_SYS_TIME",
    "CAP_SYS_TTY_CONFIG",
    "CAP_MKNOD",
    "CAP_LEASE",
    "CAP_AUDIT_WRITE",
    "CAP_AUDIT_CONTROL",
    "CAP_SETFCAP",
    "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN",
    "CAP_SYSLOG",
    "CAP_WAKE_ALARM",
    "CAP_BLOCK_SUSPEND",
    "CAP_AUDIT_READ",
    "CAP_PERFMON",
    "CAP_BPF",
    "CAP_CHECKPOINT_RESTORE",
];

/// What a privileged container gets: every capability in this process's
/// bounding set (as `docker run --privileged` gives every capability the
/// engine has; a sandbox may withhold some, and runc fails on those).
fn privileged_capabilities() -> Vec<&'static str> {
    let status = std::fs::read_to_string("/proc/self/status").expect("read /proc/self/status");
    let bounding = status
        .lines()
        .find_map(|line| line.strip_prefix("CapBnd:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .expect("CapBnd in /proc/self/status");
    ALL_CAPABILITIES.iter().enumerate().filter(|(bit, _)| bounding & (1 << bit) != 0).map(|(_, cap)| *cap).collect()
}

/// Makes the bundle's runtime config a container in the router's network
/// namespace as a `DaemonSet` with `hostNetwork` and `privileged` would run
/// it, but with only `capabilities`: no seccomp filter, no masked or
/// read-only paths, every device, a writable /sys with the host's bpffs
/// bound over /sys/fs/bpf, and the policy directory mounted read-only.
/// `args` follow the image's entrypoint.
fn privileged(spec: &mut Value, netns: &str, policy_dir: &Path, args: &[String], capabilities: &[&str]) {
    let process = &mut spec["process"];
    let entrypoint = process["args"][0].clone();
    assert_eq!(entrypoint, "/usr/bin/bulkhead", "umoci made the process from the image's entrypoint");
    let mut full = vec![entrypoint];
    full.extend(args.iter().map(|a| json!(a)));
    process["args"] = json!(full);
    process["terminal"] = json!(false);
    process["noNewPrivileges"] = json!(false);
    process["user"] = json!({"uid": 0, "gid": 0});
    let caps = json!(capabilities);
    process["capabilities"] = json!({
        "bounding": caps, "effective": caps, "inheritable": caps, "permitted": caps, "ambient": caps,
    });
    let linux = &mut spec["linux"];
    for namespace in linux["namespaces"].as_array_mut().expect("namespaces") {
        if namespace["type"] == "network" {
            namespace["path"] = json!(format!("/run/netns/{netns}"));
        }
    }
    linux["maskedPaths"] = json!([]);
    linux["readonlyPaths"] = json!([]);
    linux["resources"]["devices"] = json!([{"allow": true, "access": "rwm"}]);
    if let Some(linux) = linux.as_object_mut() {
        linux.remove("seccomp");
    }
    let mounts = spec["mounts"].as_array_mut().expect("mounts");
    for mount in mounts.iter_mut() {
        if mount["destination"] == "/sys" {
            mount["options"] = json!(["nosuid", "noexec", "nodev"]);
        }
    }
    mounts.push(json!({
        "destination": "/sys/fs/bpf", "type": "bind", "source": "/sys/fs/bpf", "options": ["rbind", "rw"],
    }));
    mounts.push(json!({
        "destination": "/etc/bulkhead/policy", "type": "bind", "source": policy_dir, "options": ["rbind", "ro"],
    }));
}

/// A container run in the foreground by `runc run`; SIGTERM, then
/// SIGKILL, then `runc delete` on drop.
struct Container {
    id: String,
    runc: Child,
    log: PathBuf,
}

impl Container {
    fn run(id: &str, bundle: &Path, log: &Path) -> Self {
        let log_file = std::fs::File::create(log).expect("container log");
        let runc = Command::new("runc")
            .args(["run", "--bundle", bundle.to_str().unwrap(), id])
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().unwrap())
            .stderr(log_file)
            .spawn()
            .expect("start runc (Debian package runc)");
        Self { id: id.to_owned(), runc, log: log.to_path_buf() }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The container's init process on the host, from `runc state`.
    fn pid(&self) -> u32 {
        let state: Value = serde_json::from_str(&run("runc", &["state", &self.id])).expect("runc state is JSON");
        u32::try_from(state["pid"].as_u64().expect("a running container has a pid")).expect("pid fits")
    }

    fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(status) = self.runc.try_wait().expect("wait for runc") {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// `runc kill ID TERM` and the exit status runc reports for the daemon.
    fn stop(&mut self) -> Option<ExitStatus> {
        if let Some(status) = self.runc.try_wait().expect("wait for runc") {
            return Some(status);
        }
        let _ = Command::new("runc").args(["kill", &self.id, "TERM"]).output();
        self.wait_exit(Duration::from_secs(10))
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        if self.stop().is_none() {
            let _ = Command::new("runc").args(["kill", &self.id, "KILL"]).output();
            let _ = self.wait_exit(Duration::from_secs(5));
            let _ = self.runc.kill();
            let _ = self.runc.wait();
        }
        let _ = Command::new("runc").args(["delete", "--force", &self.id]).output();
    }
}

fn drops(lab: &ThreeTier, reason: &str) -> u64 {
    let metrics: SocketAddr = "127.0.0.1:9090".parse().unwrap();
    let (status, body) = probe::http_get(&lab.router, metrics, "/metrics").expect("scrape");
    assert_eq!(status, 200, "{body}");
    let sample = format!("bulkhead_drop_packets_total{{direction=\"ingress\",reason=\"{reason}\"}}");
    probe::metric(&body, &sample).unwrap_or_else(|| panic!("no sample {sample}"))
}

fn tcp(lab: &ThreeTier, from: &str, to: &str, port: u16) -> Outcome {
    let target = SocketAddr::new(IpAddr::V4(lab.host(to).addr), port);
    probe::tcp(&lab.host(from).ns, target).expect("tcp probe")
}

#[test]
fn the_image_run_by_runc_enforces_the_policy() {
    enforce_in_runc("image", &privileged_capabilities());
}

/// The least docs/image.md names: without `CAP_PERFMON` the verifier
/// rejects the XDP program.
#[test]
fn the_image_needs_only_bpf_net_admin_and_perfmon() {
    enforce_in_runc("imagecaps", &["CAP_BPF", "CAP_NET_ADMIN", "CAP_PERFMON"]);
}

/// Runs the image with `capabilities` in a lab's router and probes it.
fn enforce_in_runc(label: &str, capabilities: &[&str]) {
    // Fields drop in order: servers, the container, the lab, the files.
    let lab = ThreeTier::new(label).expect("create lab namespaces");
    let scratch = ScratchDir::new(&lab.stem).expect("scratch dir");
    let _servers: Vec<EchoServer> = lab
        .hosts
        .iter()
        .map(|host| EchoServer::start(&host.ns, &host.addrs(), &[5432, 8080], &[]).expect("echo server"))
        .collect();

    // The archive as a registry client sees it, unpacked into a runtime bundle.
    let layout = scratch.0.join("layout");
    let bundle = scratch.0.join("bundle");
    let source = format!("oci-archive:{}", archive().display());
    run("skopeo", &["copy", "--quiet", &source, &format!("oci:{}:bulkhead", layout.display())]);
    run("umoci", &["unpack", "--image", &format!("{}:bulkhead", layout.display()), bundle.to_str().unwrap()]);
    let rootfs = bundle.join("rootfs");
    let passwd = std::fs::read_to_string(rootfs.join("etc/passwd")).expect("the image has /etc/passwd");
    assert!(passwd.starts_with("root:x:0:0:"), "{passwd}");
    assert_eq!(std::fs::metadata(rootfs.join("tmp")).unwrap().permissions().mode() & 0o7777, 0o1777);

    let policy_dir = scratch.0.join("policy");
    std::fs::create_dir_all(&policy_dir).unwrap();
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/three-tier.yaml");
    std::fs::copy(&example, policy_dir.join("three-tier.yaml")).unwrap();
    let mut args: Vec<String> =
        ["run", "--policy-dir", "/etc/bulkhead/policy", "--detach-on-exit", "--bpffs-root"].map(str::to_owned).to_vec();
    args.push(lab.bpffs_root().display().to_string());
    for interface in lab.router_interfaces() {
        args.extend(["--interface".to_owned(), interface]);
    }
    let config_path = bundle.join("config.json");
    let mut spec = read_json(&config_path);
    privileged(&mut spec, lab.router.name(), &policy_dir, &args, capabilities);
    std::fs::write(&config_path, serde_json::to_vec_pretty(&spec).unwrap()).unwrap();

    let mut container = Container::run(&lab.stem, &bundle, &scratch.0.join("container.log"));
    let metrics: SocketAddr = "127.0.0.1:9090".parse().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = container.runc.try_wait().unwrap() {
            panic!("the container exited with {status}: {}", container.log_text());
        }
        if let Ok((200, _)) = probe::http_get(&lab.router, metrics, "/readyz") {
            break;
        }
        assert!(Instant::now() < deadline, "no 200 from /readyz within 30 s: {}", container.log_text());
        std::thread::sleep(Duration::from_millis(50));
    }

    // The daemon is the image's binary, in the router's network namespace.
    let pid = container.pid();
    assert_eq!(std::fs::read_link(format!("/proc/{pid}/exe")).unwrap(), Path::new("/usr/bin/bulkhead"));
    let netns = |path: &str| std::fs::metadata(path).unwrap_or_else(|e| panic!("{path}: {e}")).ino();
    assert_eq!(netns(&format!("/proc/{pid}/ns/net")), netns(&format!("/run/netns/{}", lab.router.name())));
    assert!(lab.any_xdp_attached().unwrap(), "no XDP program on the router's interfaces");

    let before = drops(&lab, "default_deny");
    assert_eq!(tcp(&lab, "gateway", "logic", 8080), Outcome::Connected);
    assert_eq!(tcp(&lab, "logic", "db", 5432), Outcome::Connected);
    assert_eq!(tcp(&lab, "logic", "gateway", 8080), Outcome::TimedOut);
    assert_eq!(tcp(&lab, "outsider", "db", 5432), Outcome::TimedOut);
    assert_eq!(drops(&lab, "default_deny") - before, 2, "each denied SYN is one default_deny drop");

    // SIGTERM reaches the daemon as the container's PID 1: it exits
    // cleanly and, with --detach-on-exit, takes its programs with it.
    let status = container.stop().unwrap_or_else(|| panic!("no exit within 10 s of SIGTERM: {}", container.log_text()));
    assert!(status.success(), "the container exited with {status}: {}", container.log_text());
    assert!(!lab.any_xdp_attached().unwrap(), "XDP still attached after the daemon exited");
    assert_eq!(tcp(&lab, "logic", "gateway", 8080), Outcome::Connected, "nothing enforces any more");
}
