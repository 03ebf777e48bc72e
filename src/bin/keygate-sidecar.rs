//! `keygate-sidecar`: the sidecar alone, the executable the admission webhook injects into
//! every opted-in pod. It runs exactly what `keygate sidecar` runs; being its own executable
//! it leaves out the operator, the Kubernetes client and the CLI tools, so each pod pays for
//! the pages of a small program instead of the whole `keygate` binary (docs/BENCHMARKS.md).
//! `keygate-sidecar capture` is the injected init container that sends the workload's
//! inbound traffic through the sidecar (`keygate capture`).

use clap::{Parser, Subcommand};
use keygate::capture::CaptureArgs;
use keygate::cli::LogArgs;
use keygate::sidecar::command::{SidecarArgs, run};

#[derive(Parser, Debug)]
#[command(
    name = "keygate-sidecar",
    version,
    about = "keygate's sidecar: authenticates requests to a workload and forwards the authorized ones",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(flatten)]
    log: LogArgs,
    #[command(subcommand)]
    command: Option<SidecarCommand>,
    #[command(flatten)]
    sidecar: SidecarArgs,
}

#[derive(Subcommand, Debug)]
enum SidecarCommand {
    /// Redirect inbound traffic to the workload's ports to the sidecar (netfilter rules in
    /// this network namespace; the injected init container). Needs NET_ADMIN.
    Capture(CaptureArgs),
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    cli.log.init()?;
    match cli.command {
        Some(SidecarCommand::Capture(args)) => keygate::capture::run(&args),
        None => run(cli.sidecar).await,
    }
}
