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
        Command::Policy(PolicyCommand::Push { server, keep_others, paths }) => {
            client::push(&server, &paths, keep_others)
        }
        Command::Policy(PolicyCommand::Diff { server, paths }) => client::diff(&server, &paths),
        Command::Policy(PolicyCommand::Check { paths }) => check::check(&paths),
        Command::Policy(PolicyCommand::Explain { policy_dir, from, to, audit, policy_enforcement }) => {
            check::explain(&policy_dir, &from, &to, audit, policy_enforcement.as_deref())
        }
    };
    match result {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}
