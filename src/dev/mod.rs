//! `keygate dev`: the token server and one sidecar per ScopePolicy on one machine, fed from
//! YAML files instead of Kubernetes watches. The same registry, token server, policy builder
//! and sidecar as in a cluster; only the source of objects and the credential store differ.

pub mod config;
mod echo;
pub mod state;
mod walkthrough;

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use prometheus_client::registry::Registry as MetricsRegistry;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::api::KeyAlgorithm;
use crate::audit::AuditConfig;
use crate::connections::ConnectionLimits;
use crate::credentials::{
    self, CredentialData, derive_client_id, ensure_material, key, prune_expired_previous, unix_now,
};
use crate::policy::PolicyDocument;
use crate::registry::{
    ClientInput, Inputs, ObjectKey, PolicyInput, Registry, Revocations, read_credentials,
};
use crate::sidecar::forward::{ForwardConfig, Forwarder};
use crate::sidecar::server::Sidecar;
use crate::token::keys::{IssuerKeys, RotationPolicy};
use crate::token::{TokenConfig, TokenServer};
use config::{Config, ConfigError, load_dir};
use state::StateDir;

/// Settings of `keygate dev`.
#[derive(Debug, Clone)]
pub struct DevOptions {
    /// The directory of YAML manifests.
    pub config: PathBuf,
    /// Where credentials, signing keys and revocations are kept.
    pub state: PathBuf,
    /// Address every listener binds to.
    pub bind: IpAddr,
    /// Token server port (0: any free port).
    pub port: u16,
    /// Port of the first sidecar; the next policies get the following ports (0: any).
    pub sidecar_port: u16,
    /// Forward to this upstream instead of the built-in echo server.
    pub upstream: Option<SocketAddr>,
    /// How often the configuration directory is checked for changes.
    pub reload_interval: Duration,
    /// Clock skew tolerated by the sidecars.
    pub leeway: Duration,
    /// How the walkthrough invokes keygate (the running executable, or `cargo run --`).
    pub command: String,
    /// What the token server and each sidecar allow their clients.
    pub connections: ConnectionLimits,
    /// What the token server and each sidecar write to the audit trail.
    pub audit: AuditConfig,
}

/// Why `keygate dev` could not start.
#[derive(Debug, thiserror::Error)]
pub enum DevError {
    #[error("invalid configuration:\n{}", .0.iter().map(|e| format!("  {e}")).collect::<Vec<_>>().join("\n"))]
    Config(Vec<ConfigError>),
    #[error("state directory: {0}")]
    State(#[from] std::io::Error),
    #[error("{0}")]
    Listen(String),
    #[error("credentials: {0}")]
    Credentials(#[from] credentials::Error),
}

/// What a running `keygate dev` listens on, for the walkthrough and for tests.
#[derive(Debug, Clone)]
pub struct Endpoints {
    pub issuer: String,
    pub token_addr: SocketAddr,
    /// Each ScopePolicy's sidecar address and resource.
    pub sidecars: BTreeMap<ObjectKey, (SocketAddr, String)>,
    pub upstream: SocketAddr,
    /// The copy-pasteable walkthrough printed on start.
    pub walkthrough: String,
}

/// Loads the configuration and brings the stored credentials in line with it: keeps what
/// exists, generates what is missing, saves what changed. Returns the registry inputs.
fn build_inputs(config: &Config, state: &StateDir, issuer: &str) -> Result<Inputs, DevError> {
    let token_url = format!("{issuer}/oauth2/token");
    let now = unix_now();
    let mut inputs = Inputs::default();
    for (key, role) in &config.roles {
        inputs.roles.insert(key.clone(), role.spec.clone());
    }
    for (key, policy) in &config.policies {
        inputs.policies.insert(
            key.clone(),
            PolicyInput {
                spec: policy.spec.clone(),
                created: None,
            },
        );
    }
    for (key, client) in &config.clients {
        let existing = state.client(key)?.unwrap_or_default();
        let client_id = existing
            .get(key::CLIENT_ID)
            .cloned()
            .unwrap_or_else(|| derive_client_id(&format!("dev:{key}")));
        let (mut data, generated) =
            ensure_material(&client.spec, &client_id, &token_url, issuer, &existing)?;
        prune_expired_previous(&mut data, now);
        if data != existing {
            state.save_client(key, &data)?;
        }
        if !generated.0.is_empty() {
            tracing::info!(client = %key, generated = ?generated.0, "generated credentials");
        }
        inputs.clients.insert(
            key.clone(),
            ClientInput {
                spec: client.spec.clone().into(),
                credentials: Some(read_credentials(&data)),
            },
        );
    }
    Ok(inputs)
}

/// The signing keys from the state directory, created on first start.
fn signing_keys(state: &StateDir) -> Result<Arc<IssuerKeys>, DevError> {
    let mut stored = state.signing_keys()?.unwrap_or_default();
    let policy = RotationPolicy {
        algorithm: KeyAlgorithm::ES256,
        every_secs: 30 * 24 * 3600,
        max_token_lifetime_secs: 24 * 3600,
    };
    if stored.maintain(policy, unix_now())? {
        state.save_signing_keys(&stored)?;
    }
    Ok(IssuerKeys::from_stored(&stored)?)
}

/// Listens on `bind:port`. An address in use is reported with the address and with `flag`,
/// the option that moves it.
async fn listen(bind: IpAddr, port: u16, flag: &str) -> Result<TcpListener, DevError> {
    let addr = SocketAddr::new(bind, port);
    TcpListener::bind(addr).await.map_err(|e| {
        DevError::Listen(if e.kind() == std::io::ErrorKind::AddrInUse {
            format!(
                "{addr} is already in use (is another keygate dev running?): stop what listens \
                 there, or choose another port with {flag} (0: any free port)"
            )
        } else {
            format!("cannot listen on {addr}: {e}")
        })
    })
}

/// A fingerprint of the configuration directory's files and of the stored credentials (which
/// `keygate dev rotate` writes), to notice edits cheaply.
fn dir_fingerprint(dir: &Path, state: &StateDir) -> Vec<(PathBuf, Option<SystemTime>, u64)> {
    config::manifest_files(dir)
        .unwrap_or_default()
        .into_iter()
        .chain(state.client_files())
        .map(|p| {
            let meta = std::fs::metadata(&p).ok();
            let modified = meta.as_ref().and_then(|m| m.modified().ok());
            let len = meta.map(|m| m.len()).unwrap_or(0);
            (p, modified, len)
        })
        .collect()
}

struct RunningSidecar {
    sidecar: Arc<Sidecar>,
    addr: SocketAddr,
    task: JoinHandle<()>,
}

/// Runs until `shutdown` resolves. `started` receives the endpoints once everything listens.
pub async fn run(
    options: DevOptions,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    started: impl FnOnce(&Endpoints),
) -> Result<(), DevError> {
    let config = load_dir(&options.config).map_err(DevError::Config)?;
    let state = StateDir::open(&options.state)?;

    let token_listener = listen(options.bind, options.port, "--port").await?;
    let token_addr = token_listener.local_addr()?;
    let issuer = format!("http://{token_addr}");

    let registry = Arc::new(Registry::new(build_inputs(&config, &state, &issuer)?));
    let (keys_tx, keys_rx) = watch::channel(signing_keys(&state)?);
    let revocations = Arc::new(Revocations::new(state.revocations()?.unwrap_or_default()));
    let metrics = Arc::new(RwLock::new(MetricsRegistry::default()));

    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let wait_shutdown = move || {
        let mut rx = shutdown_rx.clone();
        async move {
            let _ = rx.wait_for(|stop| *stop).await;
        }
    };

    // The built-in echo upstream, unless one was given.
    let upstream = match options.upstream {
        Some(addr) => addr,
        None => {
            let listener = listen(options.bind, 0, "--upstream").await?;
            let addr = listener.local_addr()?;
            let stop = wait_shutdown();
            tokio::spawn(async move {
                let _ = axum::serve(listener, echo::router())
                    .with_graceful_shutdown(stop)
                    .await;
            });
            addr
        }
    };

    let token_server = {
        let mut m = metrics.write().unwrap_or_else(|p| p.into_inner());
        let mut config = TokenConfig::new(&issuer);
        config.body_read_timeout = options.connections.header_read_timeout;
        config.audit = options.audit;
        TokenServer::new(
            config,
            registry.subscribe(),
            keys_rx.clone(),
            revocations.clone(),
            Arc::new(state::RevocationFile::new(
                state.clone(),
                revocations.clone(),
            )),
            &mut m,
        )
    };
    let (ready_tx, ready_rx) = watch::channel(true);
    let router =
        crate::token::router(token_server).merge(crate::admin::router(crate::admin::AdminState {
            metrics: metrics.clone(),
            ready: ready_rx,
        }));
    let token_task = tokio::spawn(crate::admin::serve(
        token_listener,
        router,
        options.connections,
        wait_shutdown(),
    ));

    // Sidecars: one per ScopePolicy, each fed the policy document the operator would write.
    let mut sidecars: BTreeMap<ObjectKey, RunningSidecar> = BTreeMap::new();
    let mut next_port = options.sidecar_port;
    let leeway = options.leeway;
    let audit = options.audit;
    let limits = options.connections;
    let mut start_sidecar = async |key: &ObjectKey| -> Result<RunningSidecar, DevError> {
        let port = next_port;
        if next_port != 0 {
            next_port += 1;
        }
        let listener = listen(options.bind, port, "--sidecar-port").await?;
        let addr = listener.local_addr()?;
        let sidecar = {
            let mut m = metrics.write().unwrap_or_else(|p| p.into_inner());
            let sub = m.sub_registry_with_label(("policy".into(), key.to_string().into()));
            let forwarder = Forwarder::new(ForwardConfig::new(upstream));
            Sidecar::new(forwarder, leeway, audit, sub)
        };
        let task = tokio::spawn({
            let sidecar = sidecar.clone();
            let stop = wait_shutdown();
            async move {
                let limits = limits.with_drain(Duration::from_secs(10));
                let _ = crate::sidecar::server::serve_with_limits(listener, sidecar, stop, limits)
                    .await;
            }
        });
        Ok(RunningSidecar {
            sidecar,
            addr,
            task,
        })
    };
    let publish = |sidecars: &BTreeMap<ObjectKey, RunningSidecar>| {
        let snapshot = registry.snapshot();
        let keys = keys_rx.borrow().clone();
        let list = revocations.current();
        for (key, running) in sidecars {
            match PolicyDocument::build(&snapshot, key, &issuer, &keys.jwks, &list) {
                Ok(document) => {
                    if let Err(error) = running.sidecar.install(document) {
                        tracing::error!(policy = %key, %error, "policy not installed");
                    }
                }
                Err(error) => tracing::error!(policy = %key, %error, "policy not built"),
            }
        }
    };
    for key in config.policies.keys() {
        let running = start_sidecar(key).await?;
        sidecars.insert(key.clone(), running);
    }
    publish(&sidecars);

    let endpoints = |sidecars: &BTreeMap<ObjectKey, RunningSidecar>| Endpoints {
        issuer: issuer.clone(),
        token_addr,
        sidecars: sidecars
            .iter()
            .map(|(k, r)| {
                let resource = registry
                    .snapshot()
                    .policies
                    .get(k)
                    .map(|p| p.spec.resource.clone())
                    .unwrap_or_default();
                (k.clone(), (r.addr, resource))
            })
            .collect(),
        upstream,
        walkthrough: String::new(),
    };
    let mut first = endpoints(&sidecars);
    first.walkthrough = walkthrough::walkthrough(
        &first,
        &config,
        &registry.snapshot(),
        &options.state,
        &options.command,
    );
    started(&first);

    let mut snapshots = registry.subscribe();
    let mut revoked = revocations.subscribe();
    let mut fingerprint = dir_fingerprint(&options.config, &state);
    let mut ticker = tokio::time::interval(options.reload_interval);
    let mut shutdown = Box::pin(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            _ = snapshots.changed() => {
                snapshots.borrow_and_update();
                publish(&sidecars);
            }
            _ = revoked.changed() => {
                revoked.borrow_and_update();
                publish(&sidecars);
            }
            _ = ticker.tick() => {
                let now = dir_fingerprint(&options.config, &state);
                if now == fingerprint {
                    continue;
                }
                fingerprint = now;
                match load_dir(&options.config).map_err(DevError::Config).and_then(|c| Ok((build_inputs(&c, &state, &issuer)?, c))) {
                    Ok((inputs, config)) => {
                        sidecars.retain(|key, running| {
                            let keep = config.policies.contains_key(key);
                            if !keep {
                                running.task.abort();
                                tracing::info!(policy = %key, "ScopePolicy removed; its sidecar stopped");
                            }
                            keep
                        });
                        for key in config.policies.keys() {
                            if !sidecars.contains_key(key) {
                                match start_sidecar(key).await {
                                    Ok(running) => {
                                        tracing::info!(policy = %key, addr = %running.addr, "sidecar started");
                                        sidecars.insert(key.clone(), running);
                                    }
                                    Err(error) => tracing::error!(policy = %key, %error, "cannot start sidecar"),
                                }
                            }
                        }
                        registry.replace(inputs);
                        tracing::info!("configuration reloaded");
                    }
                    Err(error) => {
                        tracing::error!("{error}; keeping the last good configuration");
                    }
                }
            }
        }
    }
    let _ = ready_tx.send(false);
    let _ = shutdown_tx.send(true);
    let _ = keys_tx;
    let _ = token_task.await;
    for running in sidecars.into_values() {
        let _ = running.task.await;
    }
    Ok(())
}

/// Rotates `client`'s stored credentials (`namespace/name` or a unique `name`), as the
/// annotation `keygate.dev/rotate` does in a cluster: new ones are generated and the current
/// ones stay valid as `previous_*` for the ApiClient's `rotation.overlap` (a day without
/// one). A running `keygate dev` serves them within its reload interval. Returns the client
/// and when its previous credentials expire (Unix seconds).
pub fn rotate_credentials(
    config: &Path,
    state: &Path,
    client: &str,
) -> Result<(ObjectKey, u64), String> {
    let config = load_dir(config).map_err(|errors| DevError::Config(errors).to_string())?;
    let state =
        StateDir::open(state).map_err(|e| format!("cannot open {}: {e}", state.display()))?;
    let key = state.resolve(client)?;
    let spec = &config
        .clients
        .get(&key)
        .ok_or_else(|| format!("{key} is not an ApiClient of the configuration"))?
        .spec;
    let data = state
        .client(&key)
        .map_err(|e| e.to_string())?
        .ok_or_else(|| format!("{key} has no credentials yet: start keygate dev first"))?;
    let expires = unix_now() + credentials::rotation_overlap_secs(spec);
    let rotated = credentials::rotate(spec, &data, expires).map_err(|e| e.to_string())?;
    state
        .save_client(&key, &rotated)
        .map_err(|e| e.to_string())?;
    Ok((key, expires))
}

/// The stored credentials of `client` (`namespace/name` or a unique `name`).
pub fn credentials_of(state: &Path, client: &str) -> Result<CredentialData, String> {
    StateDir::open(state)
        .map_err(|e| format!("cannot open {}: {e}", state.display()))?
        .find_client(client)
}
