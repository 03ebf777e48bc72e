//! The `keygate` binary: one executable for every role, chosen by subcommand.

use std::io::Read;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};

#[derive(Parser, Debug)]
#[command(
    name = "keygate",
    version,
    about = "Machine-to-machine API authentication for Kubernetes"
)]
struct Cli {
    #[command(flatten)]
    log: keygate::cli::LogArgs,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Print the CustomResourceDefinitions of every keygate resource as YAML.
    Crd,

    /// Print the `SHA256:` fingerprint of a PEM public key or PKCS#8 private key, as
    /// Snowflake's RSA_PUBLIC_KEY_FP shows it.
    Fingerprint {
        /// The PEM file, or `-` for standard input.
        #[arg(default_value = "-")]
        file: PathBuf,
    },

    /// Sign a Snowflake-style key-pair JWT with a client's private key and print it.
    KeypairJwt {
        /// The client's PKCS#8 PEM private key (`private_key.pem` of its Secret).
        #[arg(long, env = "KEYGATE_PRIVATE_KEY_FILE")]
        private_key: PathBuf,
        /// The client id (`client_id` of its Secret).
        #[arg(long, env = "KEYGATE_CLIENT_ID")]
        client_id: String,
        /// Optional `aud` claim.
        #[arg(long, env = "KEYGATE_AUDIENCE")]
        audience: Option<String>,
        /// Lifetime of the JWT; at most one hour.
        #[arg(long, env = "KEYGATE_KEYPAIR_JWT_LIFETIME", default_value = "1h", value_parser = keygate::connections::positive_duration)]
        lifetime: Duration,
    },

    /// Run the operator: controllers (leader only), token server and admission webhook.
    Operator(Box<OperatorArgs>),

    /// Redirect inbound traffic to the workload's ports to the sidecar (netfilter rules in
    /// this network namespace; the injected init container). Needs NET_ADMIN.
    Capture(keygate::capture::CaptureArgs),

    /// Run the verifying proxy in front of a workload.
    Sidecar(keygate::sidecar::command::SidecarArgs),

    /// Run the token server and a sidecar per ScopePolicy from YAML files, without a cluster.
    Dev(DevArgs),

    /// Get an access token from a token endpoint (client credentials grant) and print it.
    Token(TokenArgs),

    /// Print a manifest with the sidecar added to every opted-in pod (template), with the
    /// same patch the admission webhook applies: for GitOps and clusters without the webhook.
    Inject(InjectArgs),

    /// Wait until the admission webhook (through the API server, in a dry run) and the token
    /// server answer; exit 1 naming what does not after --timeout. The Helm chart's
    /// post-install check.
    Check(keygate::check::CheckArgs),
}

#[derive(clap::Args, Debug)]
struct InjectArgs {
    /// The manifest (multi-document YAML), or `-` for standard input.
    #[arg(
        short = 'f',
        long = "filename",
        env = "KEYGATE_INJECT_FILE",
        default_value = "-"
    )]
    file: PathBuf,
    /// Add the sidecar as a regular container, for clusters older than 1.29.
    #[arg(long, env = "KEYGATE_INJECT_CLASSIC_SIDECARS", default_value_t = false)]
    classic_sidecars: bool,
    /// Upstream port for pods whose ScopePolicy is not in the manifest (otherwise they are
    /// refused, as the webhook would refuse them).
    #[arg(long, env = "KEYGATE_INJECT_UPSTREAM_PORT")]
    upstream_port: Option<u16>,
    #[command(flatten)]
    sidecar: SidecarTemplateArgs,
}

#[derive(clap::Args, Debug)]
struct OperatorArgs {
    /// The operator's namespace (signing keys, revocations, leader lease).
    #[arg(long, env = "POD_NAMESPACE", default_value = "keygate-system")]
    namespace: String,
    /// This replica's name, its identity in the leader lease.
    #[arg(long, env = "POD_NAME", default_value = "keygate-operator")]
    pod_name: String,
    /// The issuer URL of the token server, as clients reach it (https:// unless
    /// --token-tls=disabled).
    #[arg(
        long,
        env = "KEYGATE_ISSUER",
        default_value = "https://keygate.keygate-system.svc"
    )]
    issuer: String,
    /// Address of the token server.
    #[arg(long, env = "KEYGATE_TOKEN_LISTEN", default_value = "0.0.0.0:8080")]
    token_listen: SocketAddr,
    /// Address of the policy stream sidecars follow (HTTPS with the token server's
    /// certificate; not served with --token-tls=disabled). Empty: not served.
    #[arg(long, env = "KEYGATE_POLICY_LISTEN", default_value = "0.0.0.0:8443")]
    policy_listen: String,
    /// Connections the policy stream keeps open at once (one per following sidecar);
    /// further ones wait in the listen backlog until one closes.
    #[arg(long, env = "KEYGATE_POLICY_MAX_CONNECTIONS", default_value_t = 16_384, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    policy_max_connections: u32,
    /// Where the token server's certificate comes from: `self` (keygate keeps a CA and
    /// certificate in the Secret keygate-token-tls and publishes the CA in the ConfigMap
    /// keygate-ca), `cert-manager` (tls.crt, tls.key and ca.crt in --token-cert-dir), or
    /// `disabled` (plain HTTP, only behind a mesh or an ingress that terminates TLS).
    #[arg(long, env = "KEYGATE_TOKEN_TLS", value_enum, default_value_t = TokenTlsMode::SelfManaged)]
    token_tls: TokenTlsMode,
    /// Directory with tls.crt, tls.key and ca.crt (cert-manager mode).
    #[arg(
        long,
        env = "KEYGATE_TOKEN_CERT_DIR",
        default_value = "/var/run/keygate/token-tls"
    )]
    token_cert_dir: PathBuf,
    /// The token server's Service, named in its certificate with the issuer's host (self
    /// mode).
    #[arg(long, env = "KEYGATE_TOKEN_SERVICE", default_value = "keygate")]
    token_service: String,
    /// Address for /healthz, /readyz and /metrics.
    #[arg(long, env = "KEYGATE_ADMIN", default_value = "0.0.0.0:8081")]
    admin: SocketAddr,
    /// Namespaces to watch, comma-separated; empty: all.
    #[arg(
        long,
        env = "KEYGATE_WATCH_NAMESPACES",
        value_delimiter = ',',
        default_value = ""
    )]
    watch_namespaces: Vec<String>,
    #[command(flatten)]
    election: keygate::controller::leader::LeaderElection,
    /// Lifetime of tokens for clients that set none.
    #[arg(long, env = "KEYGATE_DEFAULT_TOKEN_LIFETIME", default_value = "1h", value_parser = keygate::connections::positive_duration)]
    default_token_lifetime: Duration,
    /// Upper bound on every token's lifetime.
    #[arg(long, env = "KEYGATE_MAX_TOKEN_LIFETIME", default_value = "24h", value_parser = keygate::connections::positive_duration)]
    max_token_lifetime: Duration,
    /// How long a signing key stays current.
    #[arg(long, env = "KEYGATE_SIGNING_KEY_ROTATION", default_value = "720h", value_parser = keygate::connections::positive_duration)]
    signing_key_rotation: Duration,
    /// Reconciles of one kind that may run at once (each holds an API connection).
    #[arg(long, env = "KEYGATE_CONCURRENCY", default_value_t = 16, value_parser = clap::value_parser!(u16).range(1..))]
    concurrency: u16,
    /// Address of the HTTPS admission webhook.
    #[arg(long, env = "KEYGATE_WEBHOOK_LISTEN", default_value = "0.0.0.0:9443")]
    webhook_listen: SocketAddr,
    /// Where the webhook certificate comes from: `self` (keygate keeps a CA in a Secret and
    /// injects its bundle), `cert-manager` (files in --webhook-cert-dir), or `none` (no webhook).
    #[arg(long, env = "KEYGATE_WEBHOOK_TLS", value_enum, default_value_t = WebhookTlsMode::SelfManaged)]
    webhook_tls: WebhookTlsMode,
    /// Directory with tls.crt and tls.key (cert-manager mode).
    #[arg(
        long,
        env = "KEYGATE_WEBHOOK_CERT_DIR",
        default_value = "/var/run/keygate/tls"
    )]
    webhook_cert_dir: PathBuf,
    /// The webhook's Service, named in the certificate (self mode).
    #[arg(
        long,
        env = "KEYGATE_WEBHOOK_SERVICE",
        default_value = "keygate-webhook"
    )]
    webhook_service: String,
    /// The MutatingWebhookConfiguration that gets the CA bundle (self mode).
    #[arg(long, env = "KEYGATE_MUTATING_WEBHOOK_NAME")]
    mutating_webhook_name: Option<String>,
    /// The ValidatingWebhookConfiguration that gets the CA bundle (self mode).
    #[arg(long, env = "KEYGATE_VALIDATING_WEBHOOK_NAME")]
    validating_webhook_name: Option<String>,
    /// Connections the admission webhook keeps open at once; further ones wait in the listen
    /// backlog until one closes.
    #[arg(long, env = "KEYGATE_WEBHOOK_MAX_CONNECTIONS", default_value_t = 1024, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    webhook_max_connections: u32,
    #[command(flatten)]
    connections: keygate::connections::ConnectionArgs,
    #[command(flatten)]
    audit: keygate::audit::AuditConfig,
    #[command(flatten)]
    sidecar: SidecarTemplateArgs,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
enum TokenTlsMode {
    #[value(name = "self")]
    SelfManaged,
    #[value(alias = "files")]
    CertManager,
    Disabled,
}

#[derive(Copy, Clone, Debug, ValueEnum)]
enum WebhookTlsMode {
    #[value(name = "self")]
    SelfManaged,
    CertManager,
    None,
}

/// What the webhook injects.
#[derive(clap::Args, Debug)]
struct SidecarTemplateArgs {
    /// The image of injected sidecars (its entrypoint is the keygate binary).
    #[arg(long, env = "KEYGATE_SIDECAR_IMAGE", default_value = concat!("ghcr.io/keygate/keygate:", env!("CARGO_PKG_VERSION")))]
    sidecar_image: String,
    /// CPU request of injected sidecars.
    #[arg(long, env = "KEYGATE_SIDECAR_CPU_REQUEST")]
    sidecar_cpu_request: Option<String>,
    /// Memory request of injected sidecars.
    #[arg(long, env = "KEYGATE_SIDECAR_MEMORY_REQUEST")]
    sidecar_memory_request: Option<String>,
    /// CPU limit of injected sidecars.
    #[arg(long, env = "KEYGATE_SIDECAR_CPU_LIMIT")]
    sidecar_cpu_limit: Option<String>,
    /// Memory limit of injected sidecars.
    #[arg(long, env = "KEYGATE_SIDECAR_MEMORY_LIMIT")]
    sidecar_memory_limit: Option<String>,
    /// How an injected Pod's app port is closed to everything but the sidecar, unless the
    /// Pod's annotation keygate.dev/capture says otherwise: redirect (an init container with
    /// NET_ADMIN), network-policy (keygate's NetworkPolicy) or loopback (the app listens on
    /// 127.0.0.1 only).
    #[arg(long, env = "KEYGATE_DEFAULT_CAPTURE", value_enum, default_value_t = keygate::webhook::CaptureMode::Redirect)]
    default_capture: keygate::webhook::CaptureMode,
    /// The policy stream injected sidecars follow (https://…). `keygate operator` defaults
    /// it to its own: https://<token service>.<namespace>.svc:<policy port>, unless token TLS
    /// is disabled or --policy-listen is empty. Without it, sidecars read only the policy
    /// ConfigMap.
    #[arg(long, env = "KEYGATE_SIDECAR_POLICY_SERVER")]
    sidecar_policy_server: Option<String>,
    /// Share of allowed requests injected sidecars write to the audit trail (their
    /// --audit-allowed-sample): 1 every one, 0.01 one in a hundred, 0 none.
    #[arg(
        long,
        env = "KEYGATE_SIDECAR_AUDIT_ALLOWED_SAMPLE",
        default_value = "1"
    )]
    sidecar_audit_allowed_sample: keygate::audit::SampleRate,
    /// Most refusal events injected sidecars write per second (their
    /// --audit-refused-per-second).
    #[arg(long, env = "KEYGATE_SIDECAR_AUDIT_REFUSED_PER_SECOND", default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..))]
    sidecar_audit_refused_per_second: u32,
    /// Annotate injected Pods with prometheus.io/scrape, /port (the sidecar's admin port) and
    /// /path for Prometheus configurations that discover Pods by annotation; a Pod with a
    /// prometheus.io/ annotation of its own keeps its own.
    #[arg(long, env = "KEYGATE_SIDECAR_PROMETHEUS_ANNOTATIONS", default_value_t = false, action = clap::ArgAction::Set)]
    sidecar_prometheus_annotations: bool,
}

impl SidecarTemplateArgs {
    fn inject_config(&self) -> keygate::webhook::InjectConfig {
        use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
        let mut config =
            keygate::webhook::InjectConfig::new(&self.sidecar_image, env!("CARGO_PKG_VERSION"));
        let mut set = |section: &str, resource: &str, value: &Option<String>| {
            if let Some(value) = value {
                let map = if section == "requests" {
                    config
                        .resources
                        .requests
                        .get_or_insert_with(Default::default)
                } else {
                    config.resources.limits.get_or_insert_with(Default::default)
                };
                map.insert(resource.to_owned(), Quantity(value.clone()));
            }
        };
        set("requests", "cpu", &self.sidecar_cpu_request);
        set("requests", "memory", &self.sidecar_memory_request);
        set("limits", "cpu", &self.sidecar_cpu_limit);
        set("limits", "memory", &self.sidecar_memory_limit);
        config.capture = self.default_capture;
        config.policy_server = self.sidecar_policy_server.clone();
        config.audit = keygate::audit::AuditConfig {
            audit_allowed_sample: self.sidecar_audit_allowed_sample,
            audit_refused_per_second: self.sidecar_audit_refused_per_second,
        };
        config.prometheus_annotations = self.sidecar_prometheus_annotations;
        config
    }
}

#[derive(clap::Args, Debug)]
#[command(args_conflicts_with_subcommands = true)]
struct DevArgs {
    #[command(subcommand)]
    command: Option<DevCommand>,
    /// Directory of M2MRole, ApiClient and ScopePolicy YAML manifests.
    #[arg(long, env = "KEYGATE_DEV_CONFIG")]
    config: Option<PathBuf>,
    /// Where generated credentials, signing keys and revocations are kept.
    #[arg(long, env = "KEYGATE_DEV_STATE", default_value = ".keygate-dev")]
    state: PathBuf,
    /// Address every listener binds to.
    #[arg(long, env = "KEYGATE_DEV_BIND", default_value = "127.0.0.1")]
    bind: std::net::IpAddr,
    /// Token server port (0: any free port).
    #[arg(long, env = "KEYGATE_DEV_PORT", default_value_t = 8400)]
    port: u16,
    /// Port of the first sidecar; further ScopePolicies get the next ports (0: any).
    #[arg(long, env = "KEYGATE_DEV_SIDECAR_PORT", default_value_t = 8401)]
    sidecar_port: u16,
    /// Forward to this workload (host:port) instead of the built-in echo server.
    #[arg(long, env = "KEYGATE_DEV_UPSTREAM")]
    upstream: Option<String>,
    /// How often the configuration directory is checked for changes.
    #[arg(long, env = "KEYGATE_DEV_RELOAD_INTERVAL", default_value = "1s", value_parser = keygate::connections::positive_duration)]
    reload_interval: Duration,
    #[command(flatten)]
    connections: keygate::connections::ConnectionArgs,
    #[command(flatten)]
    audit: keygate::audit::AuditConfig,
}

#[derive(Subcommand, Debug)]
enum DevCommand {
    /// Print a client's credentials as its Secret would hold them (JSON), or one field.
    Credentials {
        /// The ApiClient, as namespace/name or a name unique across namespaces.
        client: String,
        /// The state directory of `keygate dev`.
        #[arg(long, env = "KEYGATE_DEV_STATE", default_value = ".keygate-dev")]
        state: PathBuf,
        /// Print only this key, e.g. client_secret or private_key.pem.
        #[arg(long, env = "KEYGATE_DEV_FIELD")]
        field: Option<String>,
    },
    /// Rotate a client's credentials, as the annotation keygate.dev/rotate does in a cluster:
    /// new ones now, the current ones valid for the client's rotation.overlap (default 24h).
    /// A running `keygate dev` serves them within its reload interval.
    Rotate {
        /// The ApiClient, as namespace/name or a name unique across namespaces.
        client: String,
        /// Directory of M2MRole, ApiClient and ScopePolicy YAML manifests.
        #[arg(long, env = "KEYGATE_DEV_CONFIG")]
        config: PathBuf,
        /// The state directory of `keygate dev`.
        #[arg(long, env = "KEYGATE_DEV_STATE", default_value = ".keygate-dev")]
        state: PathBuf,
    },
}

#[derive(clap::Args, Debug)]
struct TokenArgs {
    /// The token endpoint.
    #[arg(
        long,
        env = "KEYGATE_TOKEN_URL",
        default_value = "http://127.0.0.1:8400/oauth2/token"
    )]
    token_url: String,
    /// The client id.
    #[arg(long, env = "KEYGATE_CLIENT_ID")]
    client_id: String,
    /// The client secret (client_secret_basic). Prefer the environment variable.
    #[arg(long, env = "KEYGATE_CLIENT_SECRET", hide_env_values = true)]
    client_secret: Option<String>,
    /// The client's PKCS#8 private key (private_key_jwt); wins over a client secret.
    #[arg(long, env = "KEYGATE_PRIVATE_KEY_FILE")]
    private_key: Option<PathBuf>,
    /// Space-delimited scopes to request; all allowed scopes when absent.
    #[arg(long, env = "KEYGATE_SCOPE")]
    scope: Option<String>,
    /// The resource (API) the token is for.
    #[arg(long, env = "KEYGATE_RESOURCE")]
    resource: Option<String>,
    /// Print the whole JSON response instead of only the access token.
    #[arg(long, env = "KEYGATE_TOKEN_JSON", default_value_t = false)]
    json: bool,
    /// Trust only the CA certificates in this PEM file for an https:// token URL, as
    /// curl's --cacert does (in a cluster: `ca.crt` of the ConfigMap keygate-ca). Without it,
    /// the system's trusted roots.
    #[arg(long, env = "KEYGATE_CA_FILE")]
    ca_file: Option<PathBuf>,
}

/// Prints `text` and a newline; a reader that closed the pipe early (`| head`) is not an error.
fn print_line(text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match writeln!(out, "{text}").and_then(|()| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
        _ => Ok(()),
    }
}

fn read_input(path: &PathBuf) -> anyhow::Result<String> {
    if path.as_os_str() == "-" {
        let mut text = String::new();
        std::io::stdin()
            .read_to_string(&mut text)
            .context("reading standard input")?;
        Ok(text)
    } else {
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if matches!(cli.command, Command::Operator(_)) {
        limit_allocator_slack();
    }
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?
        .block_on(run(cli))
}

/// glibc's malloc gives threads arenas of their own (up to eight per core) and, as large
/// blocks are freed, raises the size above which a block gets a mapping of its own up to
/// 32 MiB, so each burst of the operator (a list page of hundreds of objects, thousands of
/// reconciles) leaves freed memory resident in several arenas. One arena per core, and blocks
/// of 128 KiB or more always mapped on their own and returned when freed: the operator's peak
/// RSS at 10,000 ApiClients fell from 85.3 to 78.6 MiB, and after the burst from 85.3 to 71.1
/// (medians of three, bench/NOTES.md). `GLIBC_TUNABLES` that set malloc tunables win.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn limit_allocator_slack() {
    if std::env::var("GLIBC_TUNABLES").is_ok_and(|t| t.contains("glibc.malloc.")) {
        return;
    }
    let arenas = std::thread::available_parallelism().map_or(2, std::num::NonZero::get);
    let arenas = libc::c_int::try_from(arenas).unwrap_or(libc::c_int::MAX);
    // SAFETY: mallopt only sets malloc's parameters, and it runs before the async runtime
    // starts any other thread. A refused value (it returns 0) leaves glibc's default.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, arenas);
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024);
    }
}

/// Other allocators keep their own defaults.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn limit_allocator_slack() {}

async fn run(cli: Cli) -> anyhow::Result<()> {
    cli.log.init()?;
    match cli.command {
        Command::Operator(args) => run_operator(*args).await?,
        Command::Sidecar(args) => keygate::sidecar::command::run(args).await?,
        Command::Capture(args) => keygate::capture::run(&args)?,
        Command::Dev(args) => run_dev(args).await?,
        Command::Token(args) => fetch_token(args).await?,
        Command::Check(args) => {
            let client = keygate::kubernetes::client()
                .await
                .context("connecting to the Kubernetes API")?;
            keygate::check::run(client, &args).await?;
            print_line("keygate answers: the admission webhook and the token server are up")?;
        }
        Command::Inject(args) => {
            let manifest = read_input(&args.file)?;
            let injected = keygate::webhook::inject_manifest(
                &manifest,
                &args.sidecar.inject_config(),
                !args.classic_sidecars,
                |_, _| args.upstream_port,
            )
            .map_err(anyhow::Error::msg)?;
            print_line(injected.trim_end())?;
        }
        Command::Crd => print_line(keygate::api::crds_yaml()?.trim_end())?,
        Command::Fingerprint { file } => {
            print_line(&keygate::credentials::fingerprint_pem(&read_input(&file)?)?)?;
        }
        Command::KeypairJwt {
            private_key,
            client_id,
            audience,
            lifetime,
        } => {
            use keygate::credentials::{
                MAX_KEYPAIR_JWT_LIFETIME, SigningKey, sign_keypair_jwt, unix_now,
            };
            if lifetime > MAX_KEYPAIR_JWT_LIFETIME {
                tracing::warn!(requested = ?lifetime, "key-pair JWT lifetime capped at one hour");
            }
            let key = SigningKey::from_pkcs8_pem(&read_input(&private_key)?)?;
            let jwt =
                sign_keypair_jwt(&key, &client_id, audience.as_deref(), lifetime, unix_now())?;
            print_line(&jwt)?;
        }
    }
    Ok(())
}

fn webhook_options(args: &OperatorArgs) -> Option<keygate::operator::WebhookOptions> {
    use keygate::operator::{WebhookOptions, WebhookTls};
    let tls = match args.webhook_tls {
        WebhookTlsMode::None => return None,
        WebhookTlsMode::CertManager => WebhookTls::Files(args.webhook_cert_dir.clone()),
        WebhookTlsMode::SelfManaged => WebhookTls::SelfManaged {
            service: args.webhook_service.clone(),
            configurations: keygate::controller::webhook_tls::WebhookConfigurations {
                mutating: args.mutating_webhook_name.clone(),
                validating: args.validating_webhook_name.clone(),
            },
        },
    };
    let mut inject = args.sidecar.inject_config();
    if inject.policy_server.is_none() && !matches!(args.token_tls, TokenTlsMode::Disabled) {
        // The operator's own policy stream, through its token Service.
        let port = args
            .policy_listen
            .trim()
            .parse::<SocketAddr>()
            .ok()
            .map(|a| a.port());
        inject.policy_server = port.map(|port| {
            format!(
                "https://{}.{}.svc:{port}",
                args.token_service, args.namespace
            )
        });
    }
    Some(WebhookOptions {
        listen: args.webhook_listen,
        tls,
        inject,
    })
}

fn token_tls(args: &OperatorArgs) -> keygate::operator::TokenTls {
    use keygate::operator::TokenTls;
    match args.token_tls {
        TokenTlsMode::SelfManaged => TokenTls::SelfManaged {
            service: args.token_service.clone(),
        },
        TokenTlsMode::CertManager => TokenTls::Files(args.token_cert_dir.clone()),
        TokenTlsMode::Disabled => TokenTls::Disabled,
    }
}

fn listener_limits(args: &OperatorArgs) -> keygate::operator::ListenerLimits {
    keygate::operator::ListenerLimits {
        token: args.connections.limits(),
        admin: args.connections.admin_limits(),
        webhook: args
            .connections
            .limits()
            .with_max_connections(args.webhook_max_connections as usize)
            .with_drain(keygate::webhook::tls::DRAIN),
        policy: args
            .connections
            .limits()
            .with_max_connections(args.policy_max_connections as usize),
    }
}

async fn run_operator(args: OperatorArgs) -> anyhow::Result<()> {
    let client = keygate::kubernetes::client().await?;
    let webhook = webhook_options(&args);
    let limits = listener_limits(&args);
    let token_tls = token_tls(&args);
    let policy_listen = match args.policy_listen.trim() {
        "" => None,
        listen => Some(
            listen
                .parse()
                .with_context(|| format!("--policy-listen {listen:?} is not an address"))?,
        ),
    };
    let options = keygate::operator::OperatorOptions {
        config: keygate::controller::OperatorConfig {
            namespace: args.namespace,
            issuer: args.issuer,
            watch_namespaces: args
                .watch_namespaces
                .into_iter()
                .filter(|n| !n.is_empty())
                .collect(),
            signing_key_rotation: args.signing_key_rotation,
            max_token_lifetime: args.max_token_lifetime,
            concurrency: args.concurrency,
            // Set by operator::run from --policy-listen and --token-tls.
            policy_stream: false,
        },
        token_listen: args.token_listen,
        admin_listen: args.admin,
        election: args.election,
        identity: args.pod_name,
        default_token_lifetime: args.default_token_lifetime,
        token_tls,
        webhook,
        policy_listen,
        audit: args.audit,
    };
    keygate::operator::run_with_limits(client, options, limits, keygate::admin::shutdown_signal())
        .await?;
    Ok(())
}

async fn run_dev(args: DevArgs) -> anyhow::Result<()> {
    match args.command {
        Some(DevCommand::Credentials {
            client,
            state,
            field,
        }) => {
            let data = keygate::dev::credentials_of(&state, &client).map_err(anyhow::Error::msg)?;
            match field {
                Some(field) => {
                    let value = data
                        .get(&field)
                        .with_context(|| format!("{client} has no {field:?} credential"))?;
                    print_line(value)?;
                }
                None => print_line(&serde_json::to_string_pretty(&data)?)?,
            }
            return Ok(());
        }
        Some(DevCommand::Rotate {
            client,
            config,
            state,
        }) => {
            let (key, expires) = keygate::dev::rotate_credentials(&config, &state, &client)
                .map_err(anyhow::Error::msg)?;
            let until = i64::try_from(expires)
                .ok()
                .and_then(|s| jiff::Timestamp::from_second(s).ok())
                .map_or_else(|| expires.to_string(), |t| t.to_string());
            print_line(&format!(
                "rotated the credentials of {key}; the previous ones stay valid until {until}"
            ))?;
            return Ok(());
        }
        None => {}
    }
    let config = args
        .config
        .context("--config DIR is required to run keygate dev")?;
    let upstream = match args.upstream {
        Some(text) => {
            let text = text.trim_start_matches("http://").trim_end_matches('/');
            let addr = tokio::net::lookup_host(text)
                .await
                .with_context(|| format!("resolving the upstream {text}"))?
                .next()
                .with_context(|| format!("the upstream {text} resolves to nothing"))?;
            Some(addr)
        }
        None => None,
    };
    let options = keygate::dev::DevOptions {
        config,
        state: args.state,
        bind: args.bind,
        port: args.port,
        sidecar_port: args.sidecar_port,
        upstream,
        reload_interval: args.reload_interval,
        leeway: Duration::from_secs(30),
        command: std::env::current_exe()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|_| "keygate".into()),
        connections: args.connections.limits(),
        audit: args.audit,
    };
    keygate::dev::run(options, keygate::admin::shutdown_signal(), |endpoints| {
        println!("{}", endpoints.walkthrough);
    })
    .await?;
    Ok(())
}

async fn fetch_token(args: TokenArgs) -> anyhow::Result<()> {
    use keygate::credentials::{SigningKey, unix_now};
    let mut form: Vec<(&str, String)> = vec![("grant_type", "client_credentials".into())];
    if let Some(scope) = &args.scope {
        form.push(("scope", scope.clone()));
    }
    if let Some(resource) = &args.resource {
        form.push(("resource", resource.clone()));
    }
    let mut http = reqwest::Client::builder();
    if let Some(path) = &args.ca_file {
        let pem = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        let roots = keygate::tls::pem_roots(&pem)
            .with_context(|| format!("{}: no PEM certificate", path.display()))?;
        http = http.tls_certs_only(roots);
    }
    let http = http.build().context("building the HTTP client")?;
    let mut request = http.post(&args.token_url).timeout(Duration::from_secs(10));
    match (&args.client_secret, &args.private_key) {
        (Some(secret), None) => {
            // RFC 6749 section 2.3.1: form-encode both parts before Basic encoding.
            let encode =
                |s: &str| form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
            request = request.basic_auth(encode(&args.client_id), Some(encode(secret)));
        }
        (_, Some(path)) => {
            let key = SigningKey::from_pkcs8_pem(&read_input(path)?)?;
            let now = unix_now();
            let claims = serde_json::json!({
                "iss": args.client_id, "sub": args.client_id, "aud": args.token_url,
                "iat": now, "exp": now + 60, "jti": keygate::token::access_token::new_jti()?,
            });
            let assertion = key.sign(jsonwebtoken::Header::default(), &claims)?;
            form.push(("client_id", args.client_id.clone()));
            form.push((
                "client_assertion_type",
                "urn:ietf:params:oauth:client-assertion-type:jwt-bearer".into(),
            ));
            form.push(("client_assertion", assertion));
        }
        _ => anyhow::bail!("give --client-secret (or KEYGATE_CLIENT_SECRET) or --private-key"),
    }
    let response = request
        .form(&form)
        .send()
        .await
        .with_context(|| format!("calling {}", args.token_url))?;
    let status = response.status();
    let text = response
        .text()
        .await
        .with_context(|| format!("reading the answer of {} ({status})", args.token_url))?;
    let body = token_response(&args.token_url, status, &text)?;
    if args.json {
        print_line(&body.to_string())?;
    } else {
        let token = body["access_token"]
            .as_str()
            .context("no access_token in the response")?;
        print_line(token)?;
    }
    Ok(())
}

/// The JSON of a successful token response. Anything else is an error that says what came
/// back: the OAuth error of a refusal, or the HTTP status and the start of a body that is
/// not a token response (a wrong URL, a proxy's error page).
fn token_response(
    url: &str,
    status: reqwest::StatusCode,
    text: &str,
) -> anyhow::Result<serde_json::Value> {
    let json = serde_json::from_str::<serde_json::Value>(text).ok();
    match json {
        Some(body) if status.is_success() && body.is_object() => Ok(body),
        Some(body) if body["error"].is_string() => anyhow::bail!(
            "token request refused ({status}): {} {}",
            body["error"].as_str().unwrap_or_default(),
            body["error_description"].as_str().unwrap_or_default()
        ),
        _ => {
            const EXCERPT: usize = 200;
            let flat = text.split_whitespace().collect::<Vec<_>>().join(" ");
            let mut excerpt: String = flat.chars().take(EXCERPT).collect();
            if flat.chars().count() > EXCERPT {
                excerpt.push('…');
            }
            let body = if excerpt.is_empty() {
                "an empty body".to_owned()
            } else {
                format!("{excerpt:?}")
            };
            anyhow::bail!(
                "{url} answered {status} with {body}, not a token response: is it the token \
                 endpoint (…/oauth2/token of the issuer)?"
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_well_formed() {
        Cli::command().debug_assert();
    }

    /// The README promises it: every option of every subcommand can come from the
    /// environment (for containers and CI).
    #[test]
    fn every_flag_has_an_environment_variable() {
        fn walk(command: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for arg in command.get_arguments() {
                let builtin = matches!(arg.get_id().as_str(), "help" | "version");
                if arg.is_positional() || builtin {
                    continue;
                }
                if arg.get_env().is_none() {
                    missing.push(format!("{path} --{}", arg.get_id()));
                }
            }
            for sub in command.get_subcommands() {
                walk(sub, &format!("{path} {}", sub.get_name()), missing);
            }
        }
        let mut missing = Vec::new();
        walk(&Cli::command(), "keygate", &mut missing);
        assert!(missing.is_empty(), "options without `env`: {missing:#?}");
    }

    #[test]
    fn a_wrong_token_url_is_reported_with_its_status_and_body() {
        use reqwest::StatusCode;
        let url = "http://127.0.0.1:8400/oauth/token";
        let error = token_response(url, StatusCode::NOT_FOUND, "<html>\n  <h1>Not Found</h1>")
            .unwrap_err()
            .to_string();
        assert!(
            error.starts_with(&format!(
                "{url} answered 404 Not Found with \"<html> <h1>Not Found</h1>\", not a token"
            )),
            "{error}"
        );
        let error = token_response(url, StatusCode::NOT_FOUND, "").unwrap_err();
        assert!(
            error
                .to_string()
                .contains("404 Not Found with an empty body")
        );
        let long = "x".repeat(1000);
        let error = token_response(url, StatusCode::BAD_GATEWAY, &long).unwrap_err();
        assert!(error.to_string().contains(&format!("{}…", "x".repeat(200))));
        // JSON that is not a token response is no better than HTML.
        let error = token_response(url, StatusCode::OK, "[1]").unwrap_err();
        assert!(error.to_string().contains("200 OK with \"[1]\""), "{error}");
        // An OAuth refusal keeps its error code.
        let refused = r#"{"error":"invalid_client","error_description":"unknown client"}"#;
        let error = token_response(url, StatusCode::UNAUTHORIZED, refused).unwrap_err();
        assert_eq!(
            error.to_string(),
            "token request refused (401 Unauthorized): invalid_client unknown client"
        );
        let ok = token_response(url, StatusCode::OK, r#"{"access_token":"t"}"#).unwrap();
        assert_eq!(ok["access_token"], "t");
    }

    #[test]
    fn durations_are_the_crds_durations_and_never_zero() {
        let lifetime = |value: &str| {
            Cli::try_parse_from([
                "keygate",
                "keypair-jwt",
                "--private-key=key.pem",
                "--client-id=kgc_1",
                &format!("--lifetime={value}"),
            ])
            .map(|cli| match cli.command {
                Command::KeypairJwt { lifetime, .. } => lifetime,
                _ => panic!("not keypair-jwt"),
            })
            .map_err(|e| e.to_string())
        };
        assert_eq!(lifetime("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(lifetime("1h30m"), Ok(Duration::from_secs(5400)));
        for refused in ["0s", "0", "-5m", "15 minutes", "1d"] {
            let error = lifetime(refused).expect_err(refused);
            assert!(error.contains("--lifetime"), "{error}");
        }
        assert!(lifetime("0s").unwrap_err().contains("longer than zero"));
        assert!(lifetime("-5m").unwrap_err().contains("negative"));
        assert!(lifetime("1d").unwrap_err().contains("unknown unit"));
    }

    #[test]
    fn a_zero_sidecar_reload_interval_is_refused() {
        let reload = |value: &str| {
            Cli::try_parse_from(["keygate", "sidecar", &format!("--reload-interval={value}")])
                .map(|cli| match cli.command {
                    Command::Sidecar(args) => args.reload_interval,
                    _ => panic!("not the sidecar"),
                })
                .map_err(|e| e.to_string())
        };
        assert_eq!(reload("500ms"), Ok(Duration::from_millis(500)));
        assert!(reload("0s").unwrap_err().contains("longer than zero"));
    }

    #[test]
    fn the_helm_charts_check_arguments_parse() {
        let cli = Cli::try_parse_from([
            "keygate",
            "check",
            "--timeout=5m",
            "--interval=2s",
            "--namespace=keygate-system",
            "--webhook=false",
            "--webhook-namespace=shop",
            "--metadata-url=https://keygate.keygate-system.svc/.well-known/openid-configuration",
            "--issuer=https://keygate.example.com",
            "--ca-configmap=keygate-ca",
            "--log-format=json",
        ])
        .expect("the chart's arguments parse");
        let Command::Check(args) = cli.command else {
            panic!("not check")
        };
        assert_eq!(args.timeout, Duration::from_secs(300));
        assert!(!args.webhook);
        assert_eq!(args.webhook_name, "validate.keygate.dev");
        assert_eq!(args.issuer, "https://keygate.example.com");
        assert!(Cli::try_parse_from(["keygate", "check", "--timeout=0s"]).is_err());
    }

    #[test]
    fn the_helm_charts_operator_arguments_parse() {
        let cli = Cli::try_parse_from([
            "keygate",
            "operator",
            "--issuer=https://keygate.keygate-system.svc",
            "--token-listen=0.0.0.0:8080",
            "--token-tls=self",
            "--token-service=keygate",
            "--webhook-listen=0.0.0.0:9443",
            "--admin=0.0.0.0:8081",
            "--watch-namespaces=a,b",
            "--lease-name=keygate-operator",
            "--webhook-tls=self",
            "--webhook-service=keygate-webhook",
            "--mutating-webhook-name=keygate-inject",
            "--validating-webhook-name=keygate-validate",
            "--sidecar-image=ghcr.io/keygate/keygate:0.1.0",
            "--sidecar-cpu-request=10m",
            "--sidecar-memory-request=32Mi",
            "--sidecar-memory-limit=128Mi",
            "--concurrency=16",
            "--default-token-lifetime=1h",
            "--max-token-lifetime=24h",
            "--signing-key-rotation=720h",
            "--log-format=json",
            "--log=info",
        ])
        .expect("the chart's arguments parse");
        let Command::Operator(args) = cli.command else {
            panic!("not the operator")
        };
        assert_eq!(args.watch_namespaces, ["a", "b"]);
        assert_eq!(args.concurrency, 16);
        assert_eq!(
            listener_limits(&args),
            keygate::operator::ListenerLimits::default()
        );
        let webhook = webhook_options(&args).expect("webhook enabled");
        let limits = webhook.inject.resources.limits.expect("limits");
        assert_eq!(limits["memory"].0, "128Mi");
        assert_eq!(
            token_tls(&args),
            keygate::operator::TokenTls::SelfManaged {
                service: "keygate".into()
            }
        );
        let cert_manager = Cli::try_parse_from([
            "keygate",
            "operator",
            "--webhook-tls=cert-manager",
            "--webhook-cert-dir=/tls",
            "--token-tls=cert-manager",
            "--token-cert-dir=/token-tls",
        ]);
        let Command::Operator(args) = cert_manager.expect("cert-manager mode").command else {
            panic!("not the operator")
        };
        assert_eq!(
            token_tls(&args),
            keygate::operator::TokenTls::Files("/token-tls".into())
        );
    }

    #[test]
    fn the_operator_serves_https_unless_told_otherwise() {
        let parse = |extra: &[&str]| {
            let cli = Cli::try_parse_from([&["keygate", "operator"], extra].concat())
                .expect("arguments parse");
            let Command::Operator(args) = cli.command else {
                panic!("not the operator")
            };
            args
        };
        let defaults = parse(&[]);
        assert_eq!(defaults.issuer, "https://keygate.keygate-system.svc");
        assert_eq!(defaults.token_tls, TokenTlsMode::SelfManaged);
        keygate::operator::check_token_tls(&defaults.issuer, &token_tls(&defaults))
            .expect("the defaults agree");
        let disabled = parse(&["--token-tls=disabled", "--issuer=http://keygate.x.svc"]);
        assert_eq!(token_tls(&disabled), keygate::operator::TokenTls::Disabled);
        keygate::operator::check_token_tls(&disabled.issuer, &token_tls(&disabled))
            .expect("plain HTTP when asked for");
        let mismatch = parse(&["--issuer=http://keygate.x.svc"]);
        let error = keygate::operator::check_token_tls(&mismatch.issuer, &token_tls(&mismatch))
            .expect_err("an http issuer for an HTTPS token server");
        assert!(
            error.to_string().contains("--token-tls=disabled"),
            "{error}"
        );
    }
}
