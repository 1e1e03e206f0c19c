//! `bulkhead run`: validate, load, fill the maps, attach, serve, wait.
//!
//! The order matters: everything that can fail on bad input (policy,
//! interfaces, privileges) is checked before anything touches the kernel,
//! and the programs are attached only after the maps hold the policy, so a
//! failed start never leaves a half-configured datapath behind.

use std::ffi::CString;
use std::process::ExitCode;
use std::sync::atomic::Ordering;

use anyhow::{Context as _, bail};
use policy::PolicyError;
use tokio::signal::unix::{SignalKind, signal};

use crate::RunArgs;
use crate::datapath::Datapath;
use crate::metrics::{PolicyStats, Shared};

/// Capability bit numbers from `linux/capability.h`.
const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_BPF: u32 = 39;

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
    has(CAP_NET_ADMIN) && (has(CAP_BPF) || has(CAP_SYS_ADMIN))
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
        libc::pthread_sigmask(libc::SIG_UNBLOCK, &raw const set, std::ptr::null_mut());
    }
}

pub fn run(args: &RunArgs) -> anyhow::Result<ExitCode> {
    unblock_stop_signals();
    let policy = match policy::load(std::slice::from_ref(&args.policy_dir)) {
        Ok(policy) => policy,
        Err(PolicyError::Invalid { diagnostics }) => bail!(
            "policy in {} is invalid, nothing was attached: {} problem(s), first: {}; run `bulkhead policy check {}` to list them all",
            args.policy_dir.display(),
            diagnostics.len(),
            diagnostics[0],
            args.policy_dir.display()
        ),
        Err(other) => return Err(other.into()),
    };
    for interface in &args.interfaces {
        let name =
            CString::new(interface.as_str()).context("interface names cannot contain NUL bytes")?;
        // SAFETY: `name` is a valid NUL-terminated string.
        if unsafe { libc::if_nametoindex(name.as_ptr()) } == 0 {
            bail!(
                "interface `{interface}` does not exist in this network namespace; check `ip link` and --interface"
            );
        }
    }
    if !has_capabilities() {
        bail!(
            "bulkhead run needs CAP_BPF (or CAP_SYS_ADMIN) and CAP_NET_ADMIN; run it as root or grant those capabilities"
        );
    }
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();

    let compiled = policy::compile(&policy);
    let mut datapath = Datapath::load()?;
    datapath.apply(&compiled, 1)?;
    for interface in &args.interfaces {
        // On error `datapath` is dropped, which detaches what was attached.
        datapath.attach(interface)?;
    }
    log::info!(
        "enforcing {} identities and {} rules ({} identity entries, {} policy entries) on {}",
        policy.identities.len(),
        policy.rules.len(),
        compiled.identity_entries.len(),
        compiled.policy_entries.len(),
        datapath.attached().collect::<Vec<_>>().join(", ")
    );

    let shared = Shared::new();
    *shared
        .stats
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner) = PolicyStats {
        identities: policy.identities.len(),
        rules: policy.rules.len(),
    };
    *shared
        .datapath
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(datapath);

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime failed")?;
    runtime.block_on(async {
        let listener = crate::server::bind(args.metrics_addr)
            .await
            .with_context(|| format!("cannot listen on --metrics-addr {}; pick a free address", args.metrics_addr))?;
        log::info!("serving /metrics, /healthz and /readyz on http://{}", args.metrics_addr);
        shared.ready.store(true, Ordering::Release);
        let server = tokio::spawn(crate::server::serve(listener, std::sync::Arc::clone(&shared)));
        let mut terminate = signal(SignalKind::terminate()).context("installing the SIGTERM handler failed")?;
        let mut interrupt = signal(SignalKind::interrupt()).context("installing the SIGINT handler failed")?;
        tokio::select! {
            _ = terminate.recv() => log::info!("SIGTERM received, shutting down"),
            _ = interrupt.recv() => log::info!("SIGINT received, shutting down"),
            result = server => match result {
                Ok(Ok(())) => bail!("the metrics server stopped unexpectedly"),
                Ok(Err(error)) => return Err(anyhow::Error::new(error).context("the metrics server failed")),
                Err(error) => return Err(anyhow::Error::new(error).context("the metrics server panicked")),
            },
        }
        Ok(())
    })?;
    shared.ready.store(false, Ordering::Release);
    // Dropping the datapath detaches the programs and frees the maps.
    shared
        .datapath
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .take();
    Ok(ExitCode::SUCCESS)
}
