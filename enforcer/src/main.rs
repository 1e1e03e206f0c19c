//! `bulkhead`: the Bulkhead daemon and CLI.

mod api;
mod check;
mod client;
mod cluster;
mod config;
mod run;

pub use config::RunArgs;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// mimalloc, not glibc's malloc: loading a large policy allocates and frees
/// millions of small nodes, and glibc's bookkeeping for them was a sixth of
/// a 100k-rule load; with mimalloc the load takes about a third less. Built
/// without transparent huge pages (`no_thp`): mimalloc would madvise its
/// arena for them, and where THP is madvise-only each first touch then
/// zeroes, or compacts memory for, 2 MiB: CLI calls that take 5 ms took
/// up to 40, and the idle daemon's resident size doubled.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// eBPF/XDP micro-segmentation enforcer.
#[derive(Parser)]
#[command(name = "bulkhead", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Enforce the policy in DIR on the given interfaces until SIGINT/SIGTERM.
    Run(Box<RunArgs>),
    /// Work with policy files without touching the kernel.
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Detach and remove everything `bulkhead run` pinned (the only command that detaches).
    Uninstall {
        /// The root `bulkhead run` pinned under.
        #[arg(long, value_name = "DIR", default_value = config::DEFAULT_BPFFS_ROOT)]
        bpffs_root: std::path::PathBuf,
    },
    /// Show a daemon's state through its admin API (viewer role).
    Status(client::ServerArgs),
    /// Cut workloads off at once, whatever the policy says: quarantine
    /// through a daemon's admin API (operator role; viewers may list).
    #[command(subcommand)]
    Quarantine(QuarantineCommand),
    /// Show drop and audit events through a daemon's admin API (viewer role).
    Flows {
        #[command(flatten)]
        server: client::ServerArgs,
        /// Keep streaming new events until interrupted.
        #[arg(long)]
        follow: bool,
    },
}

#[derive(Subcommand)]
enum QuarantineCommand {
    /// Isolate TARGET at its next packet, established connections included:
    /// an identity name, an address or CIDR, `pod/NAMESPACE/NAME`, or a
    /// label selector `[NAMESPACE/]KEY=VALUE[,KEY=VALUE...]`.
    Add {
        #[command(flatten)]
        server: client::ServerArgs,
        /// Why, for the list, the event and the audit log.
        #[arg(long, value_name = "TEXT")]
        reason: Option<String>,
        /// When it lapses by itself: a duration (90s, 15m, 12h, 30d) or an
        /// RFC 3339 time [default: never].
        #[arg(long, value_name = "DURATION|RFC3339")]
        expires: Option<String>,
        #[arg(value_name = "TARGET")]
        target: String,
    },
    /// List what is quarantined, with the addresses each target stands for.
    List(client::ServerArgs),
    /// Lift the quarantine of TARGET (as listed).
    Remove {
        #[command(flatten)]
        server: client::ServerArgs,
        #[arg(value_name = "TARGET")]
        target: String,
    },
}

#[derive(Subcommand)]
enum PolicyCommand {
    /// Validate policy files or directories; exit 1 with one `file:line:col: message` line per problem.
    Check {
        #[arg(value_name = "PATH", required = true)]
        paths: Vec<PathBuf>,
    },
    /// Push policy files to a daemon through its admin API (operator role);
    /// validated like files, and a rejected push changes nothing.
    Push {
        #[command(flatten)]
        server: client::ServerArgs,
        /// Change only these files of the enforced policy (by name) and keep
        /// its other files, in one change; without it the files replace the
        /// whole policy.
        #[arg(long)]
        keep_others: bool,
        #[arg(value_name = "PATH", required = true)]
        paths: Vec<PathBuf>,
    },
    /// Compare policy files with what a daemon enforces (viewer role).
    Diff {
        #[command(flatten)]
        server: client::ServerArgs,
        #[arg(value_name = "PATH", required = true)]
        paths: Vec<PathBuf>,
    },
    /// Show which identities, rule and verdict the policy gives a packet.
    Explain {
        /// Directory (or file) of policy files.
        #[arg(long, value_name = "DIR")]
        policy_dir: PathBuf,
        /// Source address.
        #[arg(long, value_name = "ADDR")]
        from: String,
        /// Destination: ADDR:PORT/PROTO (IPv6 as [ADDR]:PORT/PROTO), ADDR/icmp[/TYPE], or ADDR alone for an echo request.
        #[arg(long, value_name = "ADDR[:PORT/PROTO]")]
        to: String,
        /// Evaluate as a daemon running with --audit would.
        #[arg(long)]
        audit: bool,
        /// Evaluate as a daemon running with this --policy-enforcement would
        /// (`always` or `default`) [default: always].
        #[arg(long, value_name = "always|default")]
        policy_enforcement: Option<String>,
    },
    /// List the allow rules that decided nothing in a window (viewer role),
    /// from the daemon's per-rule counters kept across restarts.
    Unused {
        #[command(flatten)]
        server: client::ServerArgs,
        /// The window: a duration back from now (30d, 12h) or an RFC 3339 time.
        #[arg(long, value_name = "DURATION|RFC3339", default_value = "30d")]
        since: String,
    },
    /// Print the policy that would allow exactly the flows a daemon's audit
    /// mode passed (viewer role), for review: the safe path from audit to
    /// enforce.
    Suggest {
        #[command(flatten)]
        server: client::ServerArgs,
        /// `segment` (a `SegmentPolicy` by identity and port) or
        /// `networkpolicy` (`NetworkPolicies` between pods).
        #[arg(long, value_name = "segment|networkpolicy", default_value = "segment")]
        format: String,
    },
    /// Make a key pair for signing policy sets: PREFIX.key (secret,
    /// unencrypted, mode 0600) and PREFIX.pub, in minisign's formats.
    Keygen {
        #[arg(long, value_name = "PREFIX")]
        out: PathBuf,
    },
    /// Sign the policy set of DIR: write its manifest (every policy file's
    /// SHA-256, the version, the expiry) and the manifest's minisign
    /// signature into DIR, as hidden files.
    Sign {
        /// Unencrypted minisign secret key (`policy keygen`, `minisign -G -W`).
        #[arg(long, value_name = "FILE")]
        key: PathBuf,
        /// The set's version: a node refuses a set older than one it enforced.
        #[arg(long, value_name = "N")]
        version: u64,
        /// When the set stops being enforceable: a duration (30d, 12h) or an RFC 3339 time.
        #[arg(long, value_name = "DURATION|RFC3339")]
        expires: Option<String>,
        #[arg(value_name = "DIR")]
        dir: PathBuf,
    },
    /// Check that DIR is a policy set signed by a key in KEYDIR, unchanged
    /// and unexpired; exit 1 naming the file and the reason if not.
    Verify {
        /// Directory of trusted minisign public keys (`*.pub`).
        #[arg(long, value_name = "KEYDIR")]
        trusted_keys: PathBuf,
        #[arg(value_name = "DIR")]
        dir: PathBuf,
    },
}

fn uninstall(root: &std::path::Path) -> anyhow::Result<ExitCode> {
    let removed = enforcer::datapath::uninstall(root)
        .map_err(|error| anyhow::anyhow!("removing {} failed: {error}; are you root?", root.display()))?;
    if removed.is_empty() {
        println!("nothing pinned under {}: nothing to remove", root.display());
    } else {
        for path in &removed {
            println!("removed {}", path.display());
        }
        println!("Bulkhead is detached from every interface it was attached to");
    }
    Ok(ExitCode::SUCCESS)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => run::run(&args),
        Command::Uninstall { bpffs_root } => uninstall(&bpffs_root),
        Command::Status(server) => client::status(&server),
        Command::Flows { server, follow } => client::flows(&server, follow),
        Command::Quarantine(QuarantineCommand::Add { server, reason, expires, target }) => {
            client::quarantine_add(&server, &target, reason.as_deref(), expires.as_deref())
        }
        Command::Quarantine(QuarantineCommand::List(server)) => client::quarantine_list(&server),
        Command::Quarantine(QuarantineCommand::Remove { server, target }) => {
            client::quarantine_remove(&server, &target)
        }
        Command::Policy(PolicyCommand::Push { server, keep_others, paths }) => {
            client::push(&server, &paths, keep_others)
        }
        Command::Policy(PolicyCommand::Diff { server, paths }) => client::diff(&server, &paths),
        Command::Policy(PolicyCommand::Check { paths }) => check::check(&paths),
        Command::Policy(PolicyCommand::Explain { policy_dir, from, to, audit, policy_enforcement }) => {
            check::explain(&policy_dir, &from, &to, audit, policy_enforcement.as_deref())
        }
        Command::Policy(PolicyCommand::Suggest { server, format }) => client::suggest(&server, &format),
        Command::Policy(PolicyCommand::Unused { server, since }) => client::unused(&server, &since),
        Command::Policy(PolicyCommand::Keygen { out }) => check::keygen(&out),
        Command::Policy(PolicyCommand::Sign { key, version, expires, dir }) => {
            check::sign(&dir, &key, version, expires.as_deref())
        }
        Command::Policy(PolicyCommand::Verify { trusted_keys, dir }) => check::verify(&dir, &trusted_keys),
    };
    match result {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}
