//! `bulkhead run`: validate, load, fill the maps, attach, serve, keep the
//! maps in step with the policy directory and the node's addresses.
//!
//! The order matters: everything that can fail on bad input (policy,
//! interfaces, privileges) is checked before anything touches the kernel,
//! and the programs are attached only after the maps hold the policy, so a
//! failed start never leaves a half-configured datapath behind.

use std::path::Path;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, TryRecvError};
use std::sync::{Arc, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context as _, bail};
use enforcer::datapath::Datapath;
use enforcer::interfaces::{Attacher, LinkWatcher, Selector};
use enforcer::metrics::{InterfaceStats, PolicyStats, Shared, Usage};
use enforcer::watch::{Mailbox, Wakeup};
use std::collections::{BTreeMap, BTreeSet};

use policy::PolicyError;
use policy::engine::{Contents, SourceChange};
use tokio::signal::unix::{SignalKind, signal};

use crate::RunArgs;
use crate::api::Push;
use crate::cluster;
use crate::config::Resolve as _;
use crate::config::{EventsTo, KubernetesSource, RunConfig};
use enforcer::events::Sink;

/// Capability bit numbers from `linux/capability.h`.
const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

/// How often the policy directory and the node's addresses are re-read.
const RESYNC_INTERVAL: Duration = Duration::from_secs(1);

fn has_capabilities() -> bool {
    let Ok(status) = std::fs::read_to_string("/proc/self/status") else {
        return false;
    };
    let effective = status
        .lines()
        .find_map(|line| line.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .unwrap_or(0);
    let has = |cap: u32| effective & (1 << cap) != 0;
    // CAP_PERFMON: the verifier allows the XDP program's `data_end - data`
    // (pointer arithmetic it counts as a possible leak) only with it.
    has(CAP_NET_ADMIN) && ((has(CAP_BPF) && has(CAP_PERFMON)) || has(CAP_SYS_ADMIN))
}

/// A parent may have blocked SIGINT/SIGTERM (masks are inherited across
/// exec); the daemon must still stop cleanly on them.
fn unblock_stop_signals() {
    // SAFETY: plain signal-mask calls on a stack-allocated set.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&raw mut set);
        libc::sigaddset(&raw mut set, libc::SIGINT);
        libc::sigaddset(&raw mut set, libc::SIGTERM);
        libc::sigaddset(&raw mut set, libc::SIGHUP);
        libc::pthread_sigmask(libc::SIG_UNBLOCK, &raw const set, std::ptr::null_mut());
    }
}

fn one_line(error: &PolicyError, dir: &Path) -> String {
    match error {
        PolicyError::Invalid { diagnostics } if !diagnostics.is_empty() => format!(
            "policy in {} is invalid: {} problem(s), first: {}; run `bulkhead policy check {}` to list them all",
            dir.display(),
            diagnostics.len(),
            diagnostics[0],
            dir.display()
        ),
        other => other.to_string(),
    }
}

/// Reads, verifies (with `--trusted-keys`) and compiles the policy
/// directory before anything is attached: any refusal ends the start.
fn first_policy_from_files(
    args: &RunConfig,
    engine: &mut policy::Engine,
    cluster: bool,
) -> anyhow::Result<(enforcer::sources::PolicyDir, policy::EntryDiff)> {
    let dir = &args.policy_dir;
    let trust = args.trusted_keys.as_ref().map(|keys| enforcer::signing::Trust {
        keys: keys.clone(),
        enforced: enforcer::signing::EnforcedVersion::new(&args.state_dir),
    });
    let mut policy_dir = enforcer::sources::PolicyDir::new(dir).allowing_empty(cluster).trusting(trust);
    let files = policy_dir.changes().map_err(|error| anyhow::anyhow!("{error}; nothing was attached"))?;
    let diff = engine
        .apply(files, SystemTime::now())
        .map_err(|error| anyhow::anyhow!("{}; nothing was attached", one_line(&error, dir)))?;
    policy_dir.enforced().map_err(|error| anyhow::anyhow!("{error}; nothing was attached"))?;
    Ok((policy_dir, diff))
}

pub fn run(args: &RunArgs) -> anyhow::Result<ExitCode> {
    return_freed_memory_at_once();
    unblock_stop_signals();
    let args = &args.resolve()?;
    let dir = args.policy_dir.clone();
    // The engine keeps the policy between changes: every later change
    // costs what it changes (see policy::engine).
    let mut engine = policy::Engine::with_enforcement(args.enforcement);
    // The datapath writes small changes into the slot the kernel reads and
    // says when a freed number is safe to give out again.
    engine.hold_freed_numbers(args.sizes.rules);
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime failed")?;
    let wakeup = Wakeup::new().context("creating the maintainer's eventfd failed")?;
    // The watchers list the cluster while the files are read and the
    // programs load.
    let mut cluster = match &args.kubernetes {
        Some(source) => Some(start_cluster(&runtime, source, &wakeup)?),
        None => None,
    };
    let (policy_dir, diff) = first_policy_from_files(args, &mut engine, cluster.is_some())?;
    let selector = check_host(&args.interfaces)?;

    let root = args.bpffs_root.as_path();
    let link_watcher = prepare_node(root)?;
    let fresh = !root.join("links").exists();
    // Loading the programs (the verifier's work) takes about a second and
    // needs no policy: it runs while the cluster's first lists arrive.
    let loading = {
        let (sizes, root) = (args.sizes, root.to_path_buf());
        std::thread::spawn(move || Datapath::load_pinned(sizes, Some(&root)))
    };
    let diff = match cluster.as_mut() {
        Some(cluster) => diff.then(&first_cluster_policy(&mut engine, cluster)),
        None => diff,
    };
    let loaded = loading.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic));
    let mut quarantine = None;
    let started = loaded
        .map_err(anyhow::Error::from)
        .and_then(|datapath| start_datapath(args, datapath, &diff, &engine, &selector, &mut quarantine));
    let (mut datapath, generation, interface_stats) = match started {
        Ok(started) => started,
        Err(error) => {
            // A failed first install leaves nothing behind; an adopted
            // installation keeps enforcing what it enforced.
            if fresh {
                let _ = enforcer::datapath::uninstall(root);
            }
            return Err(error);
        }
    };
    log_enforcing(&engine, args.audit, &datapath.attached().collect::<Vec<_>>().join(", "));
    drop(diff);

    let shared = Shared::new();
    publish_start(&shared, &engine, generation, args, cluster.as_ref());
    if let Some(quarantine) = quarantine {
        *shared.quarantine.lock().unwrap_or_else(PoisonError::into_inner) = quarantine;
    }
    *shared.usage.lock().unwrap_or_else(PoisonError::into_inner) =
        Usage { maps: datapath.map_usage(), conntrack: datapath.conntrack_usage() };
    *shared.interfaces.lock().unwrap_or_else(PoisonError::into_inner) = interface_stats;
    // Packed as after any large change: the first load usually is one.
    *shared.engine.write().unwrap_or_else(PoisonError::into_inner) = compacted(engine);
    return_freed_memory();
    let events = start_events(args, &mut datapath, &shared)?;
    *shared.datapath.lock().unwrap_or_else(PoisonError::into_inner) = Some(datapath);

    let stopping = Arc::new(AtomicBool::new(false));
    let (resync_tx, resync_rx) = mpsc::channel::<Resync>();
    let resync_tx = Mailbox::new(resync_tx, wakeup.clone());
    let (push_tx, push_rx) = mpsc::channel::<Push>();
    let push_tx = Mailbox::new(push_tx, wakeup.clone());
    *shared.sources.lock().unwrap_or_else(PoisonError::into_inner) = policy_dir.sources();
    let maintenance = {
        let shared = Arc::clone(&shared);
        let audit = args.audit;
        let start = InForce { policy_dir, cluster };
        std::thread::spawn(move || maintain(&shared, &dir, start, audit, (&wakeup, &resync_rx, &push_rx)))
    };

    let quarantine_expiry = enforcer::quarantine::spawn_expiry(Arc::clone(&shared), Arc::clone(&stopping));
    let interface_keeper = {
        let (shared, stop) = (Arc::clone(&shared), Arc::clone(&stopping));
        let root = args.bpffs_root.clone();
        std::thread::spawn(move || keep_interfaces(&shared, &selector, &root, link_watcher.as_ref(), &stop))
    };

    let served = runtime.block_on(serve_until_signal(args, &shared, &resync_tx, push_tx));
    let _ = resync_tx.send(Resync::Stop);
    let _ = maintenance.join();
    stopping.store(true, Ordering::Release);
    let _ = interface_keeper.join();
    let _ = quarantine_expiry.join();
    shared.ready.store(false, Ordering::Release);
    if let Some((stop, pump)) = events {
        stop.store(true, Ordering::Relaxed);
        let _ = pump.join();
    }
    shared.datapath.lock().unwrap_or_else(PoisonError::into_inner).take();
    if args.detach_on_exit {
        let removed = enforcer::datapath::uninstall(&args.bpffs_root)
            .with_context(|| format!("removing {} failed", args.bpffs_root.display()))?;
        log::info!("detached and removed {} pinned objects", removed.len());
    } else {
        log::info!(
            "programs stay attached and enforcing from {}; `bulkhead uninstall` removes them",
            args.bpffs_root.display()
        );
    }
    served?;
    Ok(ExitCode::SUCCESS)
}

/// Checks what the start needs of the host before touching the kernel:
/// interfaces named (not patterns) exist, and the privileges are there.
fn check_host(interfaces: &[String]) -> anyhow::Result<Selector> {
    let selector = Selector::new(interfaces)?;
    for interface in selector.names() {
        if enforcer::interfaces::interface_index(interface).is_none() {
            bail!(
                "interface `{interface}` does not exist in this network namespace; check `ip link` and --interface (a pattern such as `{interface}*` also matches interfaces that appear later)"
            );
        }
    }
    if !has_capabilities() {
        bail!(
            "bulkhead run needs CAP_BPF, CAP_PERFMON and CAP_NET_ADMIN (CAP_SYS_ADMIN stands in for the first two); run it as root or grant those capabilities"
        );
    }
    Ok(selector)
}

/// Makes sure there is a bpffs to pin in, and subscribes to link
/// notifications before the interfaces are listed, so none appears unseen.
fn prepare_node(root: &Path) -> anyhow::Result<Option<LinkWatcher>> {
    if let Some(mounted) = enforcer::pins::ensure_bpffs(root)? {
        log::info!(
            "mounted a bpffs at {} (none was mounted there); pins in it last only as long as this mount namespace",
            mounted.display()
        );
    }
    Ok(LinkWatcher::new().map_or_else(
        |error| {
            log::warn!("{error}; looking for new interfaces every second instead");
            None
        },
        Some,
    ))
}

/// A running event pump: its stop flag and thread.
type EventPump = (Arc<AtomicBool>, std::thread::JoinHandle<()>);

/// Starts writing drop and audit events as JSON lines, unless turned off.
fn start_events(args: &RunConfig, datapath: &mut Datapath, shared: &Arc<Shared>) -> anyhow::Result<Option<EventPump>> {
    let sink =
        match &args.events_to {
            EventsTo::Off => Sink::Off,
            EventsTo::Stdout => Sink::Stdout,
            EventsTo::File(path) => {
                Sink::File(std::fs::OpenOptions::new().create(true).append(true).open(path).with_context(|| {
                    format!("cannot open --events-to {}; check the directory exists", path.display())
                })?)
            }
        };
    let Some(ring) = datapath.take_events() else { return Ok(None) };
    let stop = Arc::new(AtomicBool::new(false));
    let pump = {
        let (stop, shared) = (Arc::clone(&stop), Arc::clone(shared));
        std::thread::spawn(move || {
            let decide = |packets: &[policy::Packet]| {
                // The addresses first, and no lock held while the other is
                // taken: the maintainer takes the engine, then the datapath.
                let hosts: Vec<std::net::IpAddr> = shared
                    .datapath
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .as_ref()?
                    .host_addresses()
                    .iter()
                    .copied()
                    .collect();
                let engine = shared.engine.read().unwrap_or_else(PoisonError::into_inner);
                Some(packets.iter().map(|packet| engine.describe(packet, &hosts)).collect())
            };
            let publish = |records: &[enforcer::events::EventRecord], lines: &[String]| {
                {
                    let mut observed = shared.observed.lock().unwrap_or_else(PoisonError::into_inner);
                    for record in records {
                        observed.record(record);
                    }
                }
                for line in lines {
                    let _ = shared.events.send(line.clone());
                    shared.remember_event(line.clone());
                }
                enforcer::lateral::observe_events(&shared, records);
            };
            let daemon_events = || shared.take_daemon_events();
            enforcer::events::pump(ring, sink, &stop, &decide, &publish, &daemon_events);
        })
    };
    Ok(Some((stop, pump)))
}

/// Loads (adopting what an earlier daemon pinned), applies the policy as a
/// new generation, repairs the pinned links the node made stale while no
/// daemon watched, then attaches — replacing pinned programs atomically.
/// An interface named on the command line that cannot be attached fails
/// the start; one matched by a pattern is reported and retried.
fn start_datapath(
    args: &RunConfig,
    mut datapath: Datapath,
    diff: &policy::EntryDiff,
    engine: &policy::Engine,
    selector: &Selector,
    quarantine: &mut Option<enforcer::quarantine::Quarantine>,
) -> anyhow::Result<(Datapath, u32, InterfaceStats)> {
    let root = args.bpffs_root.as_path();
    let adopted = datapath.adopt_state()?;
    if adopted > 0 {
        log::info!("adopted enforcement state (policy generation {adopted}) pinned under {}", root.display());
    }
    let hosts = enforcer::host::addresses().context("listing the node's addresses failed")?;
    datapath.set_host_addresses(&hosts, engine)?;
    let generation = datapath.apply(diff, engine, args.audit)?;
    // After the first write: an adopted config is only ever replaced whole.
    datapath.set_report_admits(args.lateral.mode != enforcer::lateral::LateralMode::Off)?;
    // The other slot too, so that the first change writes only itself.
    datapath.prefill_standby(engine)?;
    // Quarantines hold from the first packet the programs judge.
    let mut list = enforcer::quarantine::Quarantine::load(
        Some(&args.state_dir),
        &datapath.quarantined_nets()?,
        args.quarantine_exempt.clone(),
        SystemTime::now(),
    );
    list.install(engine, &mut datapath)?;
    if !list.is_empty() {
        log::info!(
            "quarantine: {} targets in force ({} addresses and prefixes)",
            list.len(),
            datapath.quarantined_nets().map_or(0, |nets| nets.len())
        );
    }
    *quarantine = Some(list);
    datapath.set_xdp_attach(args.xdp_attach);
    datapath.set_ingress_hook(args.ingress_hook);
    let mut stats = InterfaceStats::default();
    for repair in enforcer::pins::repair_links(root, &|name| selector.matches(name))? {
        log::warn!("{repair}");
        *stats.repairs.entry(repair.label()).or_default() += 1;
    }
    for (_, interface) in selector.selected()? {
        match datapath.attach_pinned(&interface, Some(root)) {
            Ok(true) => log::info!("took over the programs attached to {interface} (replaced atomically)"),
            Ok(false) => log::info!("attached to {interface}"),
            Err(error) if selector.names().any(|name| name == interface) => return Err(error.into()),
            Err(error) => {
                log::error!("{error}; retrying when the interface changes");
                *stats.changes.entry("attach_failed").or_default() += 1;
                stats.unenforced.insert(interface, error.to_string());
            }
        }
    }
    *stats.repairs.entry("defunct").or_default() += datapath.link_repairs();
    // The programs now read this build's maps everywhere: maps another
    // layout's build pinned are unread and can go.
    match enforcer::datapath::retire_maps(root) {
        Ok(retired) => {
            for name in retired {
                log::warn!(
                    "removed map {name}, pinned by a Bulkhead with another map layout; this build's map replaced it"
                );
                *stats.repairs.entry("map_rebuilt").or_default() += 1;
            }
        }
        Err(error) => log::warn!("removing maps pinned by another Bulkhead build failed: {error}"),
    }
    stats.hooks = datapath.hook_counts().to_vec();
    Ok((datapath, generation, stats))
}

/// The datapath with its pin root, as a reconcile sees it.
struct PinnedAttacher<'a> {
    datapath: &'a mut Datapath,
    root: &'a Path,
}

impl Attacher for PinnedAttacher<'_> {
    fn attached(&self) -> Vec<(u32, String)> {
        self.datapath.attached_indexes().map(|(index, name)| (index, name.to_owned())).collect()
    }

    fn attach(&mut self, name: &str) -> Result<(), String> {
        self.datapath.attach_pinned(name, Some(self.root)).map(drop).map_err(|error| error.to_string())
    }

    fn detach(&mut self, index: u32) {
        self.datapath.detach(index, Some(self.root));
    }

    fn rename(&mut self, index: u32, name: &str) {
        self.datapath.renamed(index, name, Some(self.root));
    }
}

/// How long the interface keeper waits for a notification before it
/// reconciles anyway (the backstop for a lost one).
const INTERFACE_RESYNC: Duration = Duration::from_secs(1);

/// Attaches interfaces that appear and match, forgets those that go, and
/// follows renames, on every link notification and every second.
fn keep_interfaces(
    shared: &Shared,
    selector: &Selector,
    root: &Path,
    watcher: Option<&LinkWatcher>,
    stop: &AtomicBool,
) {
    let mut last = Instant::now();
    while !stop.load(Ordering::Acquire) {
        let notified = if let Some(watcher) = watcher {
            watcher.wait(WAIT_SLICE)
        } else {
            std::thread::sleep(WAIT_SLICE);
            false
        };
        if !notified && last.elapsed() < INTERFACE_RESYNC {
            continue;
        }
        last = Instant::now();
        let present = match enforcer::interfaces::list() {
            Ok(present) => present,
            Err(error) => {
                log::warn!("{error}");
                continue;
            }
        };
        let (changes, hooks) = {
            let mut guard = shared.datapath.lock().unwrap_or_else(PoisonError::into_inner);
            let Some(datapath) = guard.as_mut() else { return };
            let changes = enforcer::interfaces::reconcile(selector, &present, &mut PinnedAttacher { datapath, root });
            (changes, datapath.hook_counts().to_vec())
        };
        let mut stats = shared.interfaces.lock().unwrap_or_else(PoisonError::into_inner);
        stats.hooks = hooks;
        for (index, name) in &changes.attached {
            log::info!("interface {name} (index {index}) appeared: attached");
            stats.unenforced.remove(name);
        }
        for (index, name) in &changes.removed {
            log::info!("interface {name} (index {index}) is gone or no longer selected: forgotten");
            stats.unenforced.remove(name);
        }
        for (index, old, new) in &changes.renamed {
            log::info!("interface {old} (index {index}) was renamed to {new}: its links follow");
        }
        for (name, why) in &changes.failed {
            if stats.unenforced.get(name) != Some(why) {
                log::error!("{why}; retrying when the interface changes");
                *stats.changes.entry("attach_failed").or_default() += 1;
            }
            stats.unenforced.insert(name.clone(), why.clone());
        }
        // Interfaces that failed before and are gone now are no longer owed.
        stats.unenforced.retain(|name, _| present.values().any(|n| n == name));
        for (label, count) in [
            ("attached", changes.attached.len()),
            ("removed", changes.removed.len()),
            ("renamed", changes.renamed.len()),
        ] {
            *stats.changes.entry(label).or_default() += count as u64;
        }
    }
}

async fn serve_until_signal(
    args: &RunConfig,
    shared: &Arc<Shared>,
    resync: &Mailbox<Resync>,
    push: Mailbox<Push>,
) -> anyhow::Result<()> {
    let mut api = match &args.api {
        Some(config) => tokio::spawn(crate::api::serve(config.clone(), Arc::clone(shared), push)),
        None => tokio::spawn(std::future::pending()),
    };
    let listener = enforcer::server::bind(args.metrics_addr)
        .await
        .with_context(|| format!("cannot listen on --metrics-addr {}; pick a free address", args.metrics_addr))?;
    log::info!("serving /metrics, /healthz and /readyz on http://{}", args.metrics_addr);
    shared.ready.store(true, Ordering::Release);
    let mut server = tokio::spawn(enforcer::server::serve(listener, Arc::clone(shared)));
    let mut terminate = signal(SignalKind::terminate()).context("installing the SIGTERM handler failed")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("installing the SIGINT handler failed")?;
    let mut hangup = signal(SignalKind::hangup()).context("installing the SIGHUP handler failed")?;
    loop {
        tokio::select! {
            _ = terminate.recv() => { log::info!("SIGTERM received, shutting down"); return Ok(()); }
            _ = interrupt.recv() => { log::info!("SIGINT received, shutting down"); return Ok(()); }
            _ = hangup.recv() => { let _ = resync.send(Resync::Now); }
            result = &mut api => return match result {
                Ok(Ok(())) => Err(anyhow::anyhow!("the admin API stopped unexpectedly")),
                Ok(Err(error)) => Err(error.context("the admin API failed")),
                Err(error) => Err(anyhow::Error::new(error).context("the admin API panicked")),
            },
            result = &mut server => return match result {
                Ok(Ok(())) => Err(anyhow::anyhow!("the metrics server stopped unexpectedly")),
                Ok(Err(error)) => Err(anyhow::Error::new(error).context("the metrics server failed")),
                Err(error) => Err(anyhow::Error::new(error).context("the metrics server panicked")),
            },
        }
    }
}

enum Resync {
    /// Re-read now (SIGHUP).
    Now,
    Stop,
}

/// How often map usage (which walks the conntrack table) is refreshed.
const USAGE_INTERVAL: Duration = Duration::from_secs(5);
/// How long one wait for a change lasts before the loop looks at its other duties.
const WAIT_SLICE: Duration = Duration::from_millis(100);

/// Keeps the maps in step with the policy directory and the node's
/// addresses: a change seen by inotify is applied at once, the directory is
/// looked at every second and on SIGHUP as a backstop, and rules lapse the
/// moment they expire. An invalid change is rejected whole and logged with
/// its positions; the enforced policy stays.
struct Maintainer<'a> {
    shared: &'a Shared,
    audit: bool,
    policy_dir: enforcer::sources::PolicyDir,
    /// A push replaced the directory's files; the next change to the
    /// directory brings them back whole.
    pushed: bool,
    /// A change the engine made could not be written: written with the
    /// next pass, whatever triggers it.
    unwritten: bool,
    /// Files whose change was refused, by name: tried again with the next
    /// change to the directory, as the directory is always taken as a
    /// whole (their text as last read, from the policy directory's copy).
    held_back: Vec<String>,
    /// With `--kubernetes`.
    cluster: Option<cluster::Cluster>,
}

/// What the daemon started enforcing, handed to the maintainer (the engine
/// is in [`Shared`]).
struct InForce {
    policy_dir: enforcer::sources::PolicyDir,
    /// With `--kubernetes`.
    cluster: Option<cluster::Cluster>,
}

/// Where a policy change came from. Every source (the policy directory,
/// API pushes, rule expiry; the Kubernetes watcher next) hands its change
/// to [`Maintainer::apply`], the one path that validates, compiles and
/// writes.
enum Origin {
    Files,
    Push {
        who: String,
        digest: String,
    },
    /// Rules of the enforced policy lapsed.
    Expiry,
    /// Writing the last change failed; trying again.
    Retry,
    /// Objects of the cluster changed (this many).
    Cluster {
        objects: usize,
    },
}

impl Origin {
    fn why(&self) -> &'static str {
        match self {
            Self::Files => "the policy files changed",
            Self::Push { .. } => "pushed through the API",
            Self::Expiry => "a rule expired",
            Self::Retry => "retrying a change that could not be written",
            Self::Cluster { .. } => "the cluster changed",
        }
    }
}

/// How long the daemon waits, at start, for the cluster's first lists, so
/// that its first policy holds the whole cluster. After that it starts
/// with what it has (not ready, and `bulkhead_source_up{source="kubernetes"}`
/// 0, until the lists arrive).
const FIRST_LIST_TIMEOUT: Duration = Duration::from_secs(20);

/// Records the first policy enforced everywhere the daemon reports it.
fn publish_start(
    shared: &Shared,
    engine: &policy::Engine,
    generation: u32,
    args: &RunConfig,
    cluster: Option<&cluster::Cluster>,
) {
    *shared.rule_usage.lock().unwrap_or_else(PoisonError::into_inner) =
        enforcer::usage::RuleUsage::load(&args.state_dir);
    *shared.lateral.lock().unwrap_or_else(PoisonError::into_inner) =
        enforcer::lateral::Detector::new(args.lateral.clone());
    *shared.stats.lock().unwrap_or_else(PoisonError::into_inner) = PolicyStats {
        identities: engine.identity_count(),
        rules: engine.active_rule_count(),
        generation,
        load_errors: enforcer::metrics::LoadErrors::default(),
        identity_drops_top: args.identity_drops_top,
        unmatched_peers: engine.unmatched_peers(),
        files_up: true, // filled in at each scrape from `Shared::source_down`
        // Likewise from `Shared::kubernetes_down`.
        kubernetes_up: cluster.map(|_| false),
        kubernetes_rejected: cluster.map_or(0, cluster::Cluster::refused),
        // From `Shared::quarantine` and `Shared::lateral` at each scrape.
        quarantined: 0,
        lateral_suspects: 0,
        lateral_tracked: 0,
    };
    if let Some(cluster) = cluster {
        *shared.kubernetes_down.lock().unwrap_or_else(PoisonError::into_inner) = cluster.why_not_up();
        *shared.kubernetes_versions.lock().unwrap_or_else(PoisonError::into_inner) =
            cluster.versions().iter().map(|(kind, version)| (kind.plural(), *version)).collect();
    }
}

/// Starts the Kubernetes watchers on `runtime`.
fn start_cluster(
    runtime: &tokio::runtime::Runtime,
    source: &KubernetesSource,
    wakeup: &Wakeup,
) -> anyhow::Result<cluster::Cluster> {
    let client = runtime.block_on(enforcer::kubernetes::client(&source.cluster))?;
    log::info!("kubernetes: watching the cluster as node {}", source.node_name);
    let (sender, receiver) = mpsc::channel();
    let mailbox = Mailbox::new(sender, wakeup.clone());
    let (stores, writers) = enforcer::kubernetes::reflectors();
    runtime.spawn(enforcer::kubernetes::watch_all(client.clone(), writers, move |report| mailbox.send(report).is_ok()));
    let (refused, refusals) = tokio::sync::mpsc::unbounded_channel();
    runtime.spawn(enforcer::kubernetes::report_refusals(client, source.node_name.clone(), stores, refusals));
    Ok(cluster::Cluster::new(receiver, refused))
}

/// The cluster's part of the first policy: waits for the watchers' first
/// lists (see [`FIRST_LIST_TIMEOUT`]), then takes every object known, as
/// one change if the policy takes them all, else one by one: an object the
/// policy refuses is left out and reported, never the others.
fn first_cluster_policy(engine: &mut policy::Engine, cluster: &mut cluster::Cluster) -> policy::EntryDiff {
    cluster.wait_listed(FIRST_LIST_TIMEOUT);
    if let Some(why) = cluster.why_not_up() {
        log::warn!("{why}; starting with what is known, and taking the rest as it comes");
    }
    let now = SystemTime::now();
    let objects = cluster.take_pending();
    if let Ok(diff) = engine.apply(objects.clone(), now) {
        cluster.taken(&objects);
        return diff;
    }
    let mut diff = policy::EntryDiff::default();
    for object in objects {
        match engine.apply(vec![object.clone()], now) {
            Ok(more) => {
                diff = diff.then(&more);
                cluster.taken(std::slice::from_ref(&object));
            }
            Err(error) => cluster.refuse(&object, &problems_of(&error)),
        }
    }
    diff
}

/// A refusal's problems, one line each.
fn problems_of(error: &PolicyError) -> Vec<String> {
    match error {
        PolicyError::Invalid { diagnostics } => diagnostics.iter().map(ToString::to_string).collect(),
        other => vec![other.to_string()],
    }
}

/// The log's account of one change applied: how long it took, and how.
fn log_applied(
    origin: &Origin,
    generation: u32,
    engine: &policy::Engine,
    entries: usize,
    (total, compiled_in): (Duration, Duration),
) {
    // Pod churn is many small changes: each is at debug level.
    let level = match origin {
        Origin::Cluster { objects } if *objects < 10 => log::Level::Debug,
        _ => log::Level::Info,
    };
    log::log!(
        level,
        "applied policy generation {generation} ({}): {} identities, {} rules in force; {entries} entries changed; took {} µs (parse, validate and compile {} µs, write and switch {} µs){}",
        origin.why(),
        engine.identity_count(),
        engine.active_rule_count(),
        total.as_micros(),
        compiled_in.as_micros(),
        total.saturating_sub(compiled_in).as_micros(),
        unmatched_note(engine.unmatched_peers()),
    );
}

/// The startup log's account of what is enforced, with what was read of
/// the policy but skipped.
fn log_enforcing(engine: &policy::Engine, audit: bool, attached: &str) {
    for note in engine.notes() {
        log::warn!("{note}");
    }
    let counts = engine.counts();
    log::info!(
        "enforcing {} identities and {} rules ({} identity entries, {} policy entries){}, policy enforcement {}, on {attached}{}",
        engine.identity_count(),
        engine.active_rule_count(),
        counts.identity_v4_exact + counts.identity_v4_prefix + counts.identity_v6_exact + counts.identity_v6_prefix,
        counts.policy_exact + counts.policy_prefix,
        if audit { " in audit mode" } else { "" },
        engine.enforcement().name(),
        unmatched_note(engine.unmatched_peers()),
    );
}

/// The log's note on rule peers that select no identity yet: valid (the
/// identities may come later), but named by `policy check` in case of a typo.
fn unmatched_note(unmatched: usize) -> String {
    match unmatched {
        0 => String::new(),
        n => format!("; {n} rule peer(s) select no identity yet (`bulkhead policy check` names them)"),
    }
}

/// A change at least this large (text parsed, or entries written) hands
/// the memory it freed back to the kernel; smaller ones leave nothing worth
/// the walk over the heap, which costs milliseconds at 100k identities.
const BIG_CHANGE_BYTES: usize = 1 << 20;
const BIG_CHANGE_ENTRIES: usize = 10_000;

/// `engine`, its tables packed after a large change.
fn compacted(mut engine: policy::Engine) -> policy::Engine {
    engine.compact();
    engine
}

/// Hands memory freed after a policy load back to the kernel. Loading a
/// large policy peaks at nearly twice what it leaves (100,000 identities
/// and rules: about 121 MiB resident at the peak, 60 MiB after), and the
/// allocator keeps freed pages for reuse, so without this the daemon's
/// resident size would stay near the peak on every node. Call it once the
/// change's own buffers (its text, its entry diff) are dropped: what is
/// still allocated then stays resident.
///
/// Two passes, because mimalloc hands freed memory back after a delay
/// (10 ms): a forced collection returns what its arenas hold, but only
/// while the delay is positive (with none, it assumes nothing waits
/// there); a second one with the delay set to none returns at once the
/// pages it frees itself, which otherwise wait for the allocator's next
/// call. At 100k, when the daemon held 97 MiB after a load, one forced
/// pass left 123 MiB until the idle daemon next allocated, and 108 MiB
/// after; the two passes left about 8 MiB less than that, at once.
fn return_freed_memory() {
    // SAFETY: mi_collect only frees pages the allocator holds unused.
    unsafe {
        libmimalloc_sys::mi_collect(true);
        let delay = purge_delay();
        set_purge_delay(0);
        libmimalloc_sys::mi_collect(true);
        set_purge_delay(delay);
    }
}

/// `mi_option_purge_delay` in mimalloc v2's `mimalloc.h` (the crate does
/// not name it), and its default in milliseconds.
const PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
const BUSY_PURGE_DELAY_MS: std::ffi::c_long = 10;

fn purge_delay() -> std::ffi::c_long {
    // SAFETY: options are plain integers.
    unsafe { libmimalloc_sys::mi_option_get(PURGE_DELAY) }
}

fn set_purge_delay(ms: std::ffi::c_long) {
    // SAFETY: options are plain integers mimalloc reads when it purges.
    unsafe { libmimalloc_sys::mi_option_set(PURGE_DELAY, ms) };
}

/// From the start, freed pages go back to the kernel at once, except while
/// the maintainer applies a change ([`Busy`]). With mimalloc's default
/// delay (10 ms) a freed page waits for its thread's next call into the
/// allocator, and what the daemon frees while it sets up (the programs'
/// loading, the first policy) was still resident when it sat idle: 10 MiB
/// of heap with the example policy, where 2.5 is in use: the idle daemon
/// was 21 MiB resident, and is 13. At 100,000 identities and rules it
/// holds about 2.5 MiB less. A large policy read at start-up is read with
/// no delay (loads with none took 10–20% longer; start-up's was not
/// measured apart).
fn return_freed_memory_at_once() {
    set_purge_delay(0);
}

/// The allocator's delay before it hands freed pages back, while a change
/// is applied: a load frees and reuses millions of blocks, and with no
/// delay a 100k load took 10–20% longer (in three pairs of runs).
struct Busy;

impl Busy {
    fn start() -> Self {
        set_purge_delay(BUSY_PURGE_DELAY_MS);
        Self
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        set_purge_delay(0);
    }
}

fn maintain(
    shared: &Shared,
    dir: &Path,
    start: InForce,
    audit: bool,
    (wakeup, resync, pushes): (&Wakeup, &mpsc::Receiver<Resync>, &mpsc::Receiver<Push>),
) {
    let watcher = match enforcer::watch::Watcher::new(dir) {
        Ok(watcher) => Some(watcher),
        Err(error) => {
            log::warn!("cannot watch {} ({error}); re-reading it every second instead", dir.display());
            None
        }
    };
    let InForce { policy_dir, cluster } = start;
    let mut maintainer =
        Maintainer { shared, audit, policy_dir, pushed: false, unwritten: false, held_back: Vec::new(), cluster };
    let mut last_resync = Instant::now();
    let mut last_usage: Option<Instant> = None;
    let mut last_rule_usage = Instant::now();
    loop {
        let changed = wakeup.wait(watcher.as_ref(), WAIT_SLICE);
        while let Ok(push) = pushes.try_recv() {
            maintainer.push(push);
        }
        let forced = match resync.try_recv() {
            Ok(Resync::Stop) | Err(TryRecvError::Disconnected) => {
                enforcer::usage::refresh(shared);
                return;
            }
            Ok(Resync::Now) => true,
            Err(TryRecvError::Empty) => false,
        };
        let periodic = last_resync.elapsed() >= RESYNC_INTERVAL;
        if periodic {
            last_resync = Instant::now();
            maintainer.sync_host_addresses();
        }
        if last_usage.is_none_or(|t| t.elapsed() >= USAGE_INTERVAL) {
            last_usage = Some(Instant::now());
            maintainer.refresh_usage();
        }
        if last_rule_usage.elapsed() >= enforcer::usage::REFRESH {
            last_rule_usage = Instant::now();
            enforcer::usage::refresh(shared);
            // Its buffers (every rule's counters, the record's file text)
            // are megabytes for a large policy, freed but resident until
            // handed back: at 100,000 rules the idle daemon grew by 13 MiB
            // at the first refresh.
            if maintainer.engine().counts().rule_slots as usize > BIG_CHANGE_ENTRIES {
                return_freed_memory();
            }
        }
        if maintainer.engine().next_expiry().is_some_and(|t| SystemTime::now() >= t) {
            let _ = maintainer.apply(&Origin::Expiry, None);
        } else if maintainer.unwritten && periodic {
            let _ = maintainer.apply(&Origin::Retry, None);
        }
        if changed || forced || periodic {
            maintainer.reload();
        }
        maintainer.take_cluster_changes();
        // After the changes, not before: a change waiting to be applied
        // never waits for this.
        maintainer.settle_changes_in_place();
    }
}

impl Maintainer<'_> {
    /// Applies a policy pushed through the API, validated exactly like
    /// files; a rejected push changes nothing. It replaces every source and
    /// stays enforced until the policy directory changes.
    fn push(&mut self, push: Push) {
        let digest = crate::api::digest(&push.sources);
        let signed_version = match self.verify_push(&push) {
            Ok(version) => version,
            Err(error) => {
                let why = format!("push by `{}`: {error}", push.who);
                log::warn!(target: "audit", "who={} action=push result=rejected digest=sha256:{digest} reason={}", push.who, error.reason());
                self.reject(&why, error.reason());
                let _ = push.reply.send(Err(vec![error.to_string()]));
                return;
            }
        };
        let origin = Origin::Push { who: push.who, digest };
        let pushed: BTreeSet<&str> = push.sources.iter().map(|s| s.name.as_str()).collect();
        let engine = self.engine();
        let mut changes: Vec<SourceChange> = if push.whole {
            engine
                .sources()
                .filter(|(name, _)| !pushed.contains(name) && !enforcer::kubernetes::is_cluster_source(name))
                .map(|(name, _)| SourceChange { source: name.to_owned(), contents: Contents::Removed })
                .collect()
        } else {
            push.removed.iter().map(|name| SourceChange { source: name.clone(), contents: Contents::Removed }).collect()
        };
        if !push.whole
            && let Some(unknown) = push.removed.iter().find(|name| !engine.sources().any(|(s, _)| s == name.as_str()))
        {
            drop(engine);
            let problem = format!("the enforced policy has no file `{unknown}`; `GET /v1/policy` lists its files");
            self.refused(&origin, &problem, 1);
            let _ = push.reply.send(Err(vec![problem]));
            return;
        }
        drop(engine);
        changes.extend(
            push.sources
                .iter()
                .map(|s| SourceChange { source: s.name.clone(), contents: Contents::Text(s.text.clone()) }),
        );
        let answer = self.apply(&origin, Some(changes));
        if answer.is_ok() {
            self.pushed = true;
            if let (Some(version), Some(trust)) = (signed_version, self.policy_dir.trust())
                && let Err(error) = trust.enforced.set(version)
            {
                log::error!("{error}: a restart could not refuse an older signed policy until this is fixed");
            }
            let mut sources = self.shared.sources.lock().unwrap_or_else(PoisonError::into_inner);
            if push.whole {
                sources.clear();
            }
            sources.retain(|s| !pushed.contains(s.name.as_str()) && !push.removed.contains(&s.name));
            sources
                .extend(push.sources.iter().map(|s| Arc::new(enforcer::sources::StoredSource::new(&s.name, &s.text))));
            sources.sort_by(|a, b| a.name.cmp(&b.name));
        }
        let _ = push.reply.send(answer);
    }

    /// With `--trusted-keys`, a push must be a whole set with its signed
    /// manifest, verified as a directory would be (names are the files'
    /// names): its version, or `None` without trust.
    fn verify_push(&self, push: &Push) -> Result<Option<u64>, enforcer::signing::SigningError> {
        use enforcer::signing::{self, SigningError};
        let Some(trust) = self.policy_dir.trust() else { return Ok(None) };
        let here = Path::new("push");
        let unsigned = || SigningError::NoManifest { path: here.join(signing::MANIFEST) };
        let Some(signed) = push.signed.as_ref().filter(|_| push.whole) else { return Err(unsigned()) };
        let mut files = BTreeMap::new();
        for source in &push.sources {
            let name =
                Path::new(&source.name).file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            let digest: [u8; 32] = <sha2::Sha256 as sha2::Digest>::digest(source.text.as_bytes()).into();
            if files.insert(name.clone(), digest).is_some() {
                return Err(SigningError::Extra { path: here.join(name) });
            }
        }
        let signed = (signed.manifest.as_bytes(), signed.signature.as_str());
        Ok(Some(trust.check(here, signed, &files, SystemTime::now())?.version))
    }

    /// The one path every policy change takes, whatever its source: the
    /// engine validates and compiles the change into an entry diff (or,
    /// with `None`, lets lapsed rules go), the datapath writes and switches,
    /// then everything reported is updated. A change refused at any step
    /// leaves the enforced policy and everything reported about it as they
    /// were. Returns the new generation, or the problems.
    fn apply(&mut self, origin: &Origin, changes: Option<Vec<SourceChange>>) -> Result<u32, Vec<String>> {
        let _busy = Busy::start();
        let started = Instant::now();
        let now = SystemTime::now();
        let revertible = changes.is_some();
        // Parsing a large text is what leaves much freed memory behind.
        let parsed_bytes: usize = changes
            .iter()
            .flatten()
            .map(|change| match &change.contents {
                Contents::Text(text) => text.len(),
                Contents::Parsed(_) | Contents::Removed => 0,
            })
            .sum();
        let sources_changed: Vec<String> = changes.iter().flatten().map(|change| change.source.clone()).collect();
        let mut engine = self.shared.engine.write().unwrap_or_else(PoisonError::into_inner);
        let diff = match changes {
            None => engine.advance(now),
            Some(changes) => match engine.apply(changes, now) {
                Ok(diff) => diff,
                Err(error) => {
                    let problems: Vec<String> = match &error {
                        PolicyError::Invalid { diagnostics } => diagnostics.iter().map(ToString::to_string).collect(),
                        other => vec![other.to_string()],
                    };
                    self.refused(origin, &error.to_string(), problems.len());
                    return Err(problems);
                }
            },
        };
        let compiled_in = started.elapsed();
        let applied = {
            let mut guard = self.shared.datapath.lock().unwrap_or_else(PoisonError::into_inner);
            let Some(datapath) = guard.as_mut() else { return Err(vec!["the daemon is shutting down".to_owned()]) };
            let applied = datapath.apply(&diff, &engine, self.audit);
            let (atoms, rules) = datapath.take_released_numbers();
            engine.release_numbers(&atoms, &rules);
            match applied {
                Ok(generation) => Ok((generation, datapath.last_slot_wait())),
                Err(error) => {
                    // Step the engine back to what the kernel enforces; a
                    // lapse cannot be taken back, so it is written later.
                    if revertible {
                        let back = engine.revert(now);
                        datapath.missed(&diff.clone().then(&back));
                    } else {
                        datapath.missed(&diff);
                        self.unwritten = true;
                    }
                    Err(error)
                }
            }
        };
        let (generation, slot_wait) = match applied {
            Ok(applied) => applied,
            Err(error) => {
                self.refused(origin, &error.to_string(), 1);
                return Err(vec![error.to_string()]);
            }
        };
        self.unwritten = false;
        self.observe_apply(started, slot_wait);
        let total = started.elapsed();
        log_applied(origin, generation, &engine, diff.entries(), (total, compiled_in));
        if let Origin::Push { who, digest } = origin {
            log::info!(
                target: "audit",
                "who={who} action=push result=applied generation={generation} digest=sha256:{digest} {}",
                policy::diff::summary(&engine.last_differences())
            );
        }
        for note in sources_changed.iter().flat_map(|source| engine.notes_of(source)) {
            log::warn!("{note}");
        }
        engine.commit();
        self.enforced_now(origin, generation, &engine);
        let big = parsed_bytes > BIG_CHANGE_BYTES || diff.entries() > BIG_CHANGE_ENTRIES;
        if big {
            engine.compact();
        }
        if diff.entries() > BIG_CHANGE_ENTRIES {
            // Catch the other slot up now, while nothing waits, rather
            // than in the next change.
            let mut guard = self.shared.datapath.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some(datapath) = guard.as_mut()
                && let Err(error) = datapath.prefill_standby(&engine)
            {
                log::warn!("catching the standby policy slot up failed ({error}); the next change will");
            }
        }
        drop(engine);
        // A quarantined identity's new addresses are isolated with the
        // change that brought them.
        enforcer::quarantine::enforce(self.shared);
        // The diff goes first: a large one is itself tens of megabytes.
        drop(diff);
        if big {
            return_freed_memory();
        }
        Ok(generation)
    }

    /// Finishes what changes written into the live policy slot left for
    /// one grace period later, and lets the engine reuse what that frees.
    fn settle_changes_in_place(&self) {
        let (atoms, rules) = {
            let mut guard = self.shared.datapath.lock().unwrap_or_else(PoisonError::into_inner);
            let Some(datapath) = guard.as_mut() else { return };
            datapath.settle_changes_in_place();
            datapath.take_released_numbers()
        };
        if !atoms.is_empty() || !rules.is_empty() {
            self.shared.engine.write().unwrap_or_else(PoisonError::into_inner).release_numbers(&atoms, &rules);
        }
    }

    /// Records a refused change: counted, shown in status, logged (pushes
    /// also to the audit log).
    fn refused(&self, origin: &Origin, why: &str, problems: usize) {
        match origin {
            Origin::Push { who, digest } => {
                self.reject(&format!("push by `{who}`: {why}"), "invalid");
                log::warn!(target: "audit", "who={who} action=push result=rejected digest=sha256:{digest} problems={problems}");
            }
            // A batch refused is tried again object by object, and what is
            // refused alone is reported by the cluster source (once per
            // reason, in bulkhead_kubernetes_objects_rejected and an event
            // on the object), however often it is tried again.
            Origin::Cluster { objects } => {
                log::debug!("{objects} cluster object(s) refused ({why})");
            }
            Origin::Files | Origin::Expiry | Origin::Retry => self.reject(why, "invalid"),
        }
    }

    /// Records a rejected candidate: counted under `reason` (see
    /// `metrics::LOAD_ERROR_REASONS`), shown in status, logged.
    fn reject(&self, why: &str, reason: &str) {
        log::error!("rejected policy change, previous policy stays enforced: {why}");
        self.shared.stats.lock().unwrap_or_else(PoisonError::into_inner).load_errors.count(reason);
        *self.shared.last_error.lock().unwrap_or_else(PoisonError::into_inner) = Some(why.to_owned());
    }

    /// Records a newly enforced policy everywhere the daemon reports it.
    /// The directory's files are what it enforces unless a push replaced
    /// them, and again once a directory change replaces the push (`pushed`
    /// is cleared only after this change is applied).
    fn enforced_now(&mut self, origin: &Origin, generation: u32, engine: &policy::Engine) {
        {
            let mut stats = self.shared.stats.lock().unwrap_or_else(PoisonError::into_inner);
            stats.generation = generation;
            stats.identities = engine.identity_count();
            stats.rules = engine.active_rule_count();
            stats.unmatched_peers = engine.unmatched_peers();
        }
        if !self.pushed || matches!(origin, Origin::Files) {
            *self.shared.sources.lock().unwrap_or_else(PoisonError::into_inner) = self.policy_dir.sources();
        }
        *self.shared.last_error.lock().unwrap_or_else(PoisonError::into_inner) = None;
    }

    fn sync_host_addresses(&self) {
        let mut guard = self.shared.datapath.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(datapath) = guard.as_mut() else { return };
        match enforcer::host::addresses() {
            Ok(addresses) if &addresses != datapath.host_addresses() => {
                log::info!("node addresses changed: {addresses:?}");
                if let Err(error) = datapath.set_host_addresses(&addresses, &self.engine()) {
                    log::error!("updating the node's addresses failed: {error}");
                }
            }
            Ok(_) => {}
            Err(error) => log::warn!("listing the node's addresses failed: {error}"),
        }
    }

    /// The engine, to read (the maintainer is its only writer).
    fn engine(&self) -> std::sync::RwLockReadGuard<'_, policy::Engine> {
        self.shared.engine.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn refresh_usage(&self) {
        let usage = {
            let guard = self.shared.datapath.lock().unwrap_or_else(PoisonError::into_inner);
            let Some(datapath) = guard.as_ref() else { return };
            Usage { maps: datapath.map_usage(), conntrack: datapath.conntrack_usage() }
        };
        *self.shared.usage.lock().unwrap_or_else(PoisonError::into_inner) = usage;
    }

    fn observe_apply(&self, started: Instant, slot_wait: Duration) {
        self.shared.apply_duration.observe(started.elapsed().as_secs_f64());
        self.shared.slot_wait.observe(slot_wait.as_secs_f64());
    }

    /// Applies what changed in the policy directory: only the files whose
    /// content changed are read and parsed. After a push, any change brings
    /// the directory's files back whole.
    fn reload(&mut self) {
        let changes = match self.policy_dir.changes() {
            Ok(changes) => changes,
            Err(error) => {
                // Reported once, not every second. What was seen stays: the
                // next good pass reports every change since the last one.
                if self.last_dir_error_differs(&error.to_string()) {
                    self.reject(&error.to_string(), error.reason());
                    if let enforcer::sources::DirError::Signing(_) = &error {
                        log::warn!(target: "audit", "who=policy-dir action=load result=rejected reason={} {error}", error.reason());
                    }
                }
                self.files_up(Some(&error.to_string()));
                return_freed_memory();
                return;
            }
        };
        self.files_up(None);
        if changes.is_empty() {
            // A signed set re-signed with the same files: nothing to
            // apply, and its version is the one enforced now.
            self.record_signed_version();
            return;
        }
        if self.pushed {
            self.held_back.clear();
        }
        let mut changes = if self.pushed {
            // The directory replaces the push: every source goes, every file comes.
            self.policy_dir.forget();
            let mut all: Vec<SourceChange> = self
                .engine()
                .sources()
                .filter(|(name, _)| !enforcer::kubernetes::is_cluster_source(name))
                .map(|(name, _)| SourceChange { source: name.to_owned(), contents: Contents::Removed })
                .collect();
            match self.policy_dir.changes() {
                Ok(files) => all.extend(files),
                Err(error) => {
                    self.reject(&error.to_string(), error.reason());
                    self.files_up(Some(&error.to_string()));
                    return;
                }
            }
            all
        } else {
            changes
        };
        for held in std::mem::take(&mut self.held_back) {
            if !changes.iter().any(|change| change.source == held) {
                changes.push(self.policy_dir.change_for(&held));
            }
        }
        let names = changes.iter().map(|change| change.source.clone()).collect();
        if self.apply(&Origin::Files, Some(changes)).is_ok() {
            self.pushed = false;
            self.record_signed_version();
        } else {
            self.policy_dir.refused();
            self.held_back = names;
        }
    }

    /// With `--trusted-keys`: the verified set's version is enforced now,
    /// and the floor from here on (across restarts).
    fn record_signed_version(&mut self) {
        if let Err(error) = self.policy_dir.enforced() {
            log::error!("{error}: a restart could not refuse an older signed policy until this is fixed");
        }
    }

    /// Applies what the cluster's watchers reported since the last look, as
    /// one change. If the policy refuses it, each object is tried alone:
    /// an object the policy refuses (an invalid `SegmentPolicy`, a pod
    /// claiming another's address) is reported and left out, never the
    /// others, and what it gave before stays enforced.
    fn take_cluster_changes(&mut self) {
        let Some(cluster) = self.cluster.as_mut() else { return };
        if !cluster.drain() {
            log::error!("kubernetes: the watchers stopped; what the cluster gave last stays enforced");
        }
        let changes = cluster.take_pending();
        let retries = cluster.retries(&changes);
        let versions = cluster.versions().clone();
        let why_not_up = cluster.why_not_up();
        *self.shared.kubernetes_down.lock().unwrap_or_else(PoisonError::into_inner) = why_not_up;
        if changes.is_empty() && retries.is_empty() {
            self.publish_versions(versions);
            return;
        }
        // What changed, as one change; what was refused before, alone, so
        // that an object the policy still refuses never holds back others.
        let mut each = match changes.len() {
            0 => Vec::new(),
            objects => match self.apply(&Origin::Cluster { objects }, Some(changes.clone())) {
                Ok(_) => {
                    self.cluster.as_mut().expect("checked above").taken(&changes);
                    Vec::new()
                }
                Err(_) if objects > 1 => changes,
                Err(problems) => {
                    self.cluster.as_mut().expect("checked above").refuse(&changes[0], &problems);
                    Vec::new()
                }
            },
        };
        each.extend(retries);
        for change in each {
            let origin = Origin::Cluster { objects: 1 };
            match self.apply(&origin, Some(vec![change.clone()])) {
                Ok(_) => self.cluster.as_mut().expect("checked above").taken(&[change]),
                Err(problems) => self.cluster.as_mut().expect("checked above").refuse(&change, &problems),
            }
        }
        let refused = self.cluster.as_ref().map_or(0, cluster::Cluster::refused);
        self.shared.stats.lock().unwrap_or_else(PoisonError::into_inner).kubernetes_rejected = refused;
        self.publish_versions(versions);
    }

    /// Exports how current this node's view of the cluster is, once what
    /// those versions include is applied (or refused).
    fn publish_versions(&self, versions: BTreeMap<enforcer::kubernetes::Kind, u64>) {
        let mut published = self.shared.kubernetes_versions.lock().unwrap_or_else(PoisonError::into_inner);
        for (kind, version) in versions {
            published.insert(kind.plural(), version);
        }
    }

    /// Records whether the policy directory can be read: `bulkhead_source_up`
    /// and `/readyz` say so (with `why`), and the log says when it changes.
    fn files_up(&self, why: Option<&str>) {
        let up = why.is_none();
        let was = std::mem::replace(
            &mut *self.shared.source_down.lock().unwrap_or_else(PoisonError::into_inner),
            why.map(|why| format!("source files: {why}")),
        )
        .is_none();
        if was && !up {
            log::warn!("the policy directory cannot be read; the last policy read from it stays enforced");
        } else if up && !was {
            log::info!("the policy directory can be read again");
        }
    }

    /// Whether `error` differs from the last reported rejection (so an
    /// unreadable directory is reported once, not every second).
    fn last_dir_error_differs(&self, error: &str) -> bool {
        self.shared.last_error.lock().unwrap_or_else(PoisonError::into_inner).as_deref() != Some(error)
    }
}
