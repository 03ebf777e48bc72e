//! `keygate-sidecar`: the sidecar alone, the executable the admission webhook injects into
//! every opted-in pod. It runs exactly what `keygate sidecar` runs; being its own executable
//! it leaves out the operator, the Kubernetes client and the CLI tools, so each pod pays for
//! the pages of a small program instead of the whole `keygate` binary (docs/BENCHMARKS.md).

use clap::Parser;
use keygate::cli::LogArgs;
use keygate::sidecar::command::{SidecarArgs, run};

#[derive(Parser, Debug)]
#[command(
    name = "keygate-sidecar",
    version,
    about = "keygate's sidecar: authenticates requests to a workload and forwards the authorized ones"
)]
struct Cli {
    #[command(flatten)]
    log: LogArgs,
    #[command(flatten)]
    sidecar: SidecarArgs,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    cli.log.init()?;
    run(cli.sidecar).await
}
