//! The sidecar process: `keygate sidecar` and the `keygate-sidecar` executable (the one the
//! webhook injects) share these arguments and this entry point.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;

use super::forward::{ForwardConfig, Forwarder};
use super::server::{Sidecar, serve_with_limits, watch_policy_file};
use crate::api::parse_duration;
use crate::policy::PolicyDocument;

/// Settings of the sidecar process.
#[derive(clap::Args, Debug)]
pub struct SidecarArgs {
    /// The policy file (the ScopePolicy's ConfigMap mount).
    #[arg(
        long,
        env = "KEYGATE_POLICY",
        default_value = "/etc/keygate/policy.json"
    )]
    pub policy: PathBuf,
    /// Address for requests to the workload.
    #[arg(long, env = "KEYGATE_LISTEN", default_value = "0.0.0.0:8100")]
    pub listen: SocketAddr,
    /// The workload. Defaults to 127.0.0.1 and the policy's upstream port.
    #[arg(long, env = "KEYGATE_UPSTREAM")]
    pub upstream: Option<SocketAddr>,
    /// Speak HTTP/2 without negotiation (h2c) to the workload, e.g. for gRPC.
    #[arg(long, env = "KEYGATE_UPSTREAM_H2C", default_value_t = false)]
    pub upstream_h2c: bool,
    /// Address for /healthz, /readyz and /metrics.
    #[arg(long, env = "KEYGATE_ADMIN", default_value = "0.0.0.0:8101")]
    pub admin: SocketAddr,
    /// Clock skew tolerated on token times.
    #[arg(long, env = "KEYGATE_LEEWAY", default_value = "30s", value_parser = parse_duration)]
    pub leeway: Duration,
    /// How often the policy file is checked for changes.
    #[arg(long, env = "KEYGATE_RELOAD_INTERVAL", default_value = "1s", value_parser = crate::connections::positive_duration)]
    pub reload_interval: Duration,
    /// How long in-flight requests may take to finish on shutdown.
    #[arg(long, env = "KEYGATE_DRAIN", default_value = "20s", value_parser = parse_duration)]
    pub drain: Duration,
    /// Follow the policy stream of this operator policy server (https://…) for changes
    /// within a second; the policy file stays the bootstrap and the fallback.
    #[arg(long, env = "KEYGATE_POLICY_SERVER")]
    pub policy_server: Option<String>,
    /// The ScopePolicy to follow, namespace/name. Default: the policy file's.
    #[arg(long, env = "KEYGATE_POLICY_NAME", requires = "policy_server")]
    pub policy_name: Option<String>,
    /// The projected ServiceAccount token (audience keygate) shown to the policy server.
    #[arg(
        long,
        env = "KEYGATE_TOKEN_FILE",
        default_value = "/var/run/secrets/keygate/token"
    )]
    pub token_file: PathBuf,
    /// The CA of the policy server's certificate.
    #[arg(long, env = "KEYGATE_CA_FILE", default_value = "/etc/keygate/ca.crt")]
    pub ca_file: PathBuf,
    /// The TLS server name to verify, when it is not the policy server URL's host.
    #[arg(long, env = "KEYGATE_POLICY_SERVER_NAME", requires = "policy_server")]
    pub policy_server_name: Option<String>,
    #[command(flatten)]
    pub connections: crate::connections::ConnectionArgs,
    #[command(flatten)]
    pub audit: crate::audit::AuditConfig,
}

/// Runs the sidecar until SIGTERM or Ctrl-C, then drains.
pub async fn run(args: SidecarArgs) -> anyhow::Result<()> {
    // Read once up front to learn the upstream port and to refuse to start without a policy.
    let document = std::fs::read(&args.policy)
        .with_context(|| format!("reading the policy file {}", args.policy.display()))?;
    let document = PolicyDocument::parse(&document).with_context(|| {
        format!(
            "the policy file {} is invalid; refusing to start",
            args.policy.display()
        )
    })?;
    let upstream = args
        .upstream
        .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], document.spec.upstream.port)));
    let mut forward = ForwardConfig::new(upstream);
    forward.http2_prior_knowledge = args.upstream_h2c;
    let mut metrics = prometheus_client::registry::Registry::default();
    let sidecar = Sidecar::new(
        Forwarder::new(forward),
        args.leeway,
        args.audit,
        &mut metrics,
    );
    let reload = watch_policy_file(args.policy.clone(), sidecar.clone(), args.reload_interval)
        .await
        .map_err(anyhow::Error::msg)?;
    let reload = tokio::spawn(reload);
    let stream = args.policy_server.clone().map(|server| {
        tokio::spawn(super::stream::follow(
            super::stream::StreamConfig {
                server,
                policy: args
                    .policy_name
                    .clone()
                    .unwrap_or_else(|| document.policy.clone()),
                token_file: args.token_file.clone(),
                ca_file: args.ca_file.clone(),
                server_name: args.policy_server_name.clone(),
            },
            sidecar.clone(),
        ))
    });
    let admin = crate::admin::router(crate::admin::AdminState {
        metrics: std::sync::Arc::new(std::sync::RwLock::new(metrics)),
        ready: sidecar.ready(),
    });
    let admin_listener = tokio::net::TcpListener::bind(args.admin)
        .await
        .with_context(|| format!("binding the admin address {}", args.admin))?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    tracing::info!(listen = %args.listen, %upstream, admin = %args.admin, policy = %document.policy, "sidecar started");
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let limits = args.connections.admin_limits();
    let admin_stop = async move {
        let mut rx = stop_rx;
        let _ = rx.wait_for(|s| *s).await;
    };
    let admin_serve = crate::admin::serve(admin_listener, admin, limits, admin_stop);
    let admin_task = tokio::spawn(admin_serve);
    let shutdown = async move {
        crate::admin::shutdown_signal().await;
        let _ = stop_tx.send(true);
    };
    let limits = args.connections.limits().with_drain(args.drain);
    serve_with_limits(listener, sidecar, shutdown, limits).await?;
    reload.abort();
    if let Some(stream) = stream {
        stream.abort();
    }
    admin_task.await??;
    Ok(())
}
