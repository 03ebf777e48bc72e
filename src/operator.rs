//! `keygate operator`: the controllers (leader only), the token server and the admin
//! endpoints (every replica), fed by one registry of watches.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::api::{ListParams, PartialObjectMeta};
use kube::core::DeserializeGuard;
use kube::runtime::controller::Controller;
use kube::runtime::reflector::{self, ObjectRef};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};
use tokio::sync::watch;

use crate::api::{ApiClient, M2MRole, ScopePolicy};
use crate::connections::ConnectionLimits;
use crate::controller::cached::CachedClient;
use crate::controller::pacing::{Pacer, Trigger};
use crate::controller::token_tls;
use crate::controller::webhook_tls::{self, WebhookConfigurations};
use crate::controller::{self, Context, MANAGED_BY, OperatorConfig, apis, error_policy};
use crate::registry::{Registry, Revocations, Snapshot};
use crate::token::keys::RotationPolicy;
use crate::token::{TokenConfig, TokenServer};
use crate::webhook::InjectConfig;

/// Settings of `keygate operator`.
#[derive(Debug, Clone)]
pub struct OperatorOptions {
    pub config: OperatorConfig,
    pub token_listen: SocketAddr,
    pub admin_listen: SocketAddr,
    /// The Lease and its timings.
    pub election: controller::leader::LeaderElection,
    /// This replica's identity in the lease (the pod name).
    pub identity: String,
    pub default_token_lifetime: Duration,
    /// Where the token server's certificate comes from, or plain HTTP.
    pub token_tls: TokenTls,
    /// The admission webhook; `None` runs without one.
    pub webhook: Option<WebhookOptions>,
    /// Where the policy stream for sidecars is served (HTTPS with the token server's
    /// certificate; not served when token TLS is disabled). `None`: not served.
    pub policy_listen: Option<SocketAddr>,
    /// What the token server writes to the audit trail.
    pub audit: crate::audit::AuditConfig,
}

/// How the token server is served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenTls {
    /// HTTPS with a CA and serving certificate keygate keeps in the Secret
    /// `keygate-token-tls`, for the Service `service`'s names and the issuer's host; the CA is
    /// published in the ConfigMap `keygate-ca`.
    SelfManaged { service: String },
    /// HTTPS with `tls.crt`/`tls.key` in this directory (cert-manager), reloaded when they
    /// change; its `ca.crt`, if any, is published in `keygate-ca`.
    Files(PathBuf),
    /// Plain HTTP: only where something in front (a mesh, an ingress) does TLS.
    Disabled,
}

/// Where the webhook's certificate comes from.
#[derive(Debug, Clone)]
pub enum WebhookTls {
    /// keygate keeps a CA and serving certificate in a Secret and injects the CA bundle.
    SelfManaged {
        service: String,
        configurations: WebhookConfigurations,
    },
    /// cert-manager mounts `tls.crt`/`tls.key` in this directory and injects the CA bundle.
    Files(PathBuf),
}

/// Settings of the admission webhook.
#[derive(Debug, Clone)]
pub struct WebhookOptions {
    pub listen: SocketAddr,
    pub tls: WebhookTls,
    /// The sidecar to inject; its `watch_namespaces` are replaced by the operator's.
    pub inject: InjectConfig,
}

/// What each of the operator's listeners allows its clients (see [`crate::connections`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListenerLimits {
    /// The token server.
    pub token: ConnectionLimits,
    /// `/healthz`, `/readyz` and `/metrics`.
    pub admin: ConnectionLimits,
    /// The admission webhook.
    pub webhook: ConnectionLimits,
    /// The policy stream: one long-lived connection per following sidecar.
    pub policy: ConnectionLimits,
}

impl Default for ListenerLimits {
    fn default() -> Self {
        Self {
            token: ConnectionLimits::default(),
            admin: ConnectionLimits::admin(),
            webhook: ConnectionLimits::default()
                .with_max_connections(crate::connections::DEFAULT_WEBHOOK_MAX_CONNECTIONS)
                .with_drain(crate::webhook::tls::DRAIN),
            policy: ConnectionLimits::default()
                .with_max_connections(crate::connections::DEFAULT_POLICY_MAX_CONNECTIONS),
        }
    }
}

/// Why the operator stopped.
#[derive(Debug, thiserror::Error)]
pub enum OperatorError {
    #[error(
        "the keygate CRDs are not installed in this cluster: run `kubectl apply --server-side -f crds/` (or install the Helm chart)"
    )]
    CrdsMissing,
    #[error("cannot reach the Kubernetes API: {0}")]
    Api(kube::Error),
    #[error("{0}")]
    Controller(#[from] controller::Error),
    #[error("listening: {0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Config(String),
}

/// Refuses settings under which clients could not reach the token server as told: an
/// `http://` issuer while the token server serves HTTPS (the reverse, an `https://` issuer with
/// TLS disabled, is what a mesh or an ingress that terminates TLS needs).
pub fn check_token_tls(issuer: &str, tls: &TokenTls) -> Result<(), OperatorError> {
    let https = issuer
        .get(..8)
        .is_some_and(|scheme| scheme.eq_ignore_ascii_case("https://"));
    if !https && *tls != TokenTls::Disabled {
        return Err(OperatorError::Config(format!(
            "the issuer {issuer} is not an https:// URL, but the token server serves HTTPS: \
             give an https:// issuer, or disable the token server's TLS (--token-tls=disabled) \
             where a mesh or an ingress terminates TLS in front of it"
        )));
    }
    Ok(())
}

/// Refuses to start without the CRDs, with a message that says what to do.
async fn check_crds(client: &Client, config: &OperatorConfig) -> Result<(), OperatorError> {
    // With a watch list the operator may read only those namespaces.
    let api: Api<ApiClient> = match config.watch_namespaces.first() {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    match api.list(&ListParams::default().limit(1)).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) if status.code == 404 => Err(OperatorError::CrdsMissing),
        Err(error) => Err(OperatorError::Api(error)),
    }
}

/// A stream that yields once per change of `rx`, at most every `every`.
fn changes<T: Send + Sync + 'static>(
    rx: watch::Receiver<T>,
    every: Duration,
) -> impl Stream<Item = ()> + Send {
    futures::stream::unfold(rx, move |mut rx| async move {
        rx.changed().await.ok()?;
        tokio::time::sleep(every).await;
        rx.borrow_and_update();
        Some(((), rx))
    })
}

/// ApiClients whose resolved grants differ between two snapshots.
pub fn changed_clients(
    before: &Snapshot,
    after: &Snapshot,
) -> Vec<ObjectRef<DeserializeGuard<CachedClient>>> {
    after
        .clients_by_key
        .iter()
        .filter(|(key, view)| {
            before.clients_by_key.get(*key).is_none_or(|old| {
                !Arc::ptr_eq(old, view)
                    && (old.grants != view.grants || old.ineffective != view.ineffective)
            })
        })
        .map(|(key, _)| ObjectRef::new(&key.name).within(&key.namespace))
        .collect()
}

/// How many rounds of `--concurrency` reconciles the ApiClient controller is fed ahead.
const PACE_ROUNDS: usize = 8;

/// A trigger for each ApiClient owning `secret`.
fn secret_owners(
    secret: &PartialObjectMeta<Secret>,
) -> Vec<Trigger<DeserializeGuard<CachedClient>>> {
    secret
        .owner_references()
        .iter()
        .filter_map(|owner| ObjectRef::from_owner_ref(secret.namespace().as_deref(), owner, ()))
        .map(Trigger::One)
        .collect()
}

/// Runs the operator until `shutdown` resolves or a critical task fails, with the default
/// [`ListenerLimits`].
pub async fn run(
    client: Client,
    options: OperatorOptions,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), OperatorError> {
    run_with_limits(client, options, ListenerLimits::default(), shutdown).await
}

/// Runs the operator until `shutdown` resolves or a critical task fails.
pub async fn run_with_limits(
    client: Client,
    options: OperatorOptions,
    limits: ListenerLimits,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), OperatorError> {
    check_token_tls(&options.config.issuer, &options.token_tls)?;
    options.election.check().map_err(OperatorError::Config)?;
    check_crds(&client, &options.config).await?;
    let config = controller::OperatorConfig {
        policy_stream: options.policy_listen.is_some() && options.token_tls != TokenTls::Disabled,
        ..options.config.clone()
    };
    let metrics = Arc::new(RwLock::new(prometheus_client::registry::Registry::default()));
    let replica = controller::ReplicaMetrics::register(
        &mut metrics.write().unwrap_or_else(|p| p.into_inner()),
    );
    let registry = Arc::new(Registry::default());
    let revocations = Arc::new(Revocations::default());
    let controller::watch::Feeds {
        mut synced,
        clients,
    } = controller::watch::spawn_feeds(&client, &config, &registry);
    let revocation_store =
        controller::revocations::ConfigMapStore::spawn(client.clone(), config.namespace.clone());
    controller::revocations::spawn_watch(
        client.clone(),
        config.namespace.clone(),
        revocations.clone(),
        revocation_store.clone(),
    );

    let (leading_tx, leading) = watch::channel(false);
    let mut election = tokio::spawn(controller::leader::run(
        client.clone(),
        config.namespace.clone(),
        options.election.clone(),
        options.identity.clone(),
        leading_tx,
        replica.leader.clone(),
    ));
    let rotation = RotationPolicy {
        algorithm: crate::api::KeyAlgorithm::ES256,
        every_secs: config.signing_key_rotation.as_secs(),
        max_token_lifetime_secs: config.max_token_lifetime.as_secs(),
    };
    tokio::spawn(controller::signing::maintain_while_leading(
        client.clone(),
        config.namespace.clone(),
        rotation,
        leading.clone(),
    ));

    // Readiness: the token server can sign once the keys are there.
    let (ready_tx, ready_rx) = watch::channel(false);
    let admin = crate::admin::router(crate::admin::AdminState {
        metrics: metrics.clone(),
        ready: ready_rx,
    });
    let admin_listener = tokio::net::TcpListener::bind(options.admin_listen).await?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = move || {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    };
    let admin_task = tokio::spawn(crate::admin::serve(
        admin_listener,
        admin,
        limits.admin,
        stopped(),
    ));
    tracing::info!(admin = %options.admin_listen, "waiting for the signing keys");
    let keys = tokio::select! {
        keys = controller::signing::watch_keys(
            client.clone(),
            config.namespace.clone(),
            rotation.every_secs,
            replica.clone(),
        ) => keys,
        result = &mut election => {
            return Err(match result {
                Ok(Err(e)) => e.into(),
                _ => controller::Error::Invalid("leader election stopped".into()).into(),
            });
        }
    };

    let mut token_config = TokenConfig::new(&config.issuer);
    token_config.default_lifetime = options.default_token_lifetime;
    token_config.max_lifetime = config.max_token_lifetime;
    token_config.body_read_timeout = limits.token.header_read_timeout;
    token_config.audit = options.audit;
    let token_server = {
        let mut m = metrics.write().unwrap_or_else(|p| p.into_inner());
        TokenServer::new(
            token_config,
            registry.subscribe(),
            keys.clone(),
            revocations.clone(),
            revocation_store,
            &mut m,
        )
    };
    let (token_task, token_resolver) = start_token_server(
        &client,
        &config,
        &options,
        crate::token::router(token_server),
        leading.clone(),
        limits.token,
        replica.certificate("token_server"),
        stopped(),
    )
    .await?;
    let policy_task = match (options.policy_listen, token_resolver) {
        (Some(listen), Some(resolver)) => {
            let hub =
                controller::policy_stream::PolicyHub::spawn(controller::policy_stream::Inputs {
                    registry: registry.subscribe(),
                    keys: keys.clone(),
                    revocations: revocations.clone(),
                    issuer: config.issuer.clone(),
                });
            let reviewer = Arc::new(controller::policy_stream::Reviewer::new(client.clone()));
            let router = controller::policy_stream::router(hub.clone(), reviewer);
            // Streams never end by themselves: end them at shutdown, so that the server's
            // drain does not wait for them and their sidecars move to another replica now.
            let closing = stopped();
            tokio::spawn(async move {
                closing.await;
                hub.close();
            });
            let listener = tokio::net::TcpListener::bind(listen).await?;
            tracing::info!(policy = %listen, "policy stream listening");
            let (policy_limits, stop) = (limits.policy, stopped());
            Some(tokio::spawn(async move {
                if let Err(error) = crate::tls::serve_tls_with_limits(
                    listener,
                    router,
                    resolver,
                    policy_limits,
                    stop,
                )
                .await
                {
                    tracing::error!(%error, "the policy stream stopped");
                }
            }))
        }
        (Some(_), None) => {
            tracing::warn!(
                "the policy stream is served only over TLS; token TLS is disabled, so sidecars follow the policy ConfigMaps only"
            );
            None
        }
        (None, _) => None,
    };

    let webhook_task = match &options.webhook {
        Some(webhook) => Some({
            let admissions = crate::webhook::WebhookMetrics::register(
                &mut metrics.write().unwrap_or_else(|p| p.into_inner()),
            );
            start_webhook(
                &client,
                &config,
                webhook,
                &registry,
                leading.clone(),
                limits.webhook,
                replica.certificate("webhook"),
                admissions,
                stopped(),
            )
            .await?
        }),
        None => None,
    };
    // Ready once the registry has seen every watch's first list: before that an empty
    // snapshot would refuse valid clients and deny opted-in pods.
    let _ = synced.wait_for(|s| *s).await;
    ready_tx.send_replace(true);
    tracing::info!("ready");

    let ctx = {
        let mut m = metrics.write().unwrap_or_else(|p| p.into_inner());
        controller::clients::ClientStatusMetrics {
            clients: clients.iter().map(|c| c.store.clone()).collect(),
            leading: leading.clone(),
        }
        .register(&mut m);
        Context::new(
            client.clone(),
            registry.clone(),
            keys.clone(),
            revocations.clone(),
            controller::token_tls::watch_published_ca(client.clone(), &config.namespace),
            config.clone(),
            &mut m,
        )
    };
    let controllers = run_controllers_when_leading(ctx, clients, leading, stopped());
    tokio::pin!(controllers);
    tokio::pin!(shutdown);
    let outcome = tokio::select! {
        () = &mut shutdown => Ok(()),
        () = &mut controllers => Ok(()),
        result = &mut election => match result {
            Ok(Err(e)) => Err(e.into()),
            _ => Err(controller::Error::Invalid("leader election stopped".into()).into()),
        },
    };
    ready_tx.send_replace(false);
    let _ = stop_tx.send(true);
    let _ = token_task.await;
    if let Some(task) = policy_task {
        let _ = task.await;
    }
    if let Some(task) = webhook_task {
        let _ = task.await;
    }
    let _ = admin_task.await;
    outcome
}

/// Starts the token server: over HTTPS once its certificate is there (nothing is served
/// before, never plain HTTP instead), or over plain HTTP when TLS is disabled. `expiry`
/// follows its certificate's `notAfter`.
#[allow(clippy::too_many_arguments)]
async fn start_token_server(
    client: &Client,
    config: &OperatorConfig,
    options: &OperatorOptions,
    router: axum::Router,
    leading: watch::Receiver<bool>,
    limits: ConnectionLimits,
    expiry: prometheus_client::metrics::gauge::Gauge,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<
    (
        tokio::task::JoinHandle<()>,
        Option<Arc<crate::tls::CertResolver>>,
    ),
    OperatorError,
> {
    let resolver = match &options.token_tls {
        TokenTls::Disabled => None,
        TokenTls::SelfManaged { service } => {
            let cert = token_tls::self_managed_cert(service, &config.namespace, &config.issuer);
            if let Err(error) = token_tls::bootstrap(client, &config.namespace, &cert).await {
                tracing::warn!(%error, "cannot create the token server certificate; waiting for the leader's");
            }
            tokio::spawn(token_tls::maintain_while_leading(
                client.clone(),
                config.namespace.clone(),
                cert,
                leading,
            ));
            tracing::info!("waiting for the token server certificate");
            Some(
                controller::certs::watch_secret(
                    client.clone(),
                    config.namespace.clone(),
                    token_tls::TOKEN_TLS_SECRET,
                    "token server",
                    expiry,
                )
                .await,
            )
        }
        TokenTls::Files(dir) => {
            let resolver = controller::certs::watch_files(dir.clone(), "token server", expiry)
                .map_err(OperatorError::Config)?;
            tokio::spawn(token_tls::publish_ca_file_while_leading(
                client.clone(),
                config.namespace.clone(),
                dir.clone(),
                leading,
            ));
            Some(resolver)
        }
    };
    let listener = tokio::net::TcpListener::bind(options.token_listen).await?;
    let https = resolver.is_some();
    tracing::info!(token = %options.token_listen, https, "token server listening");
    let shared = resolver.clone();
    let task = tokio::spawn(async move {
        let served = match resolver {
            Some(resolver) => {
                crate::tls::serve_tls_with_limits(listener, router, resolver, limits, stop)
                    .await
                    .map_err(|e| e.to_string())
            }
            None => crate::admin::serve(listener, router, limits, stop)
                .await
                .map_err(|e| e.to_string()),
        };
        if let Err(error) = served {
            tracing::error!(%error, "the token server stopped");
        }
    });
    Ok((task, shared))
}

/// Starts the HTTPS admission webhook with its certificate source; `expiry` follows its
/// certificate's `notAfter`, `metrics` count its answers.
#[allow(clippy::too_many_arguments)]
async fn start_webhook(
    client: &Client,
    config: &OperatorConfig,
    options: &WebhookOptions,
    registry: &Arc<Registry>,
    leading: watch::Receiver<bool>,
    limits: ConnectionLimits,
    expiry: prometheus_client::metrics::gauge::Gauge,
    metrics: crate::webhook::WebhookMetrics,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<tokio::task::JoinHandle<()>, OperatorError> {
    let resolver = match &options.tls {
        WebhookTls::SelfManaged {
            service,
            configurations,
        } => {
            tokio::spawn(webhook_tls::maintain_while_leading(
                client.clone(),
                config.namespace.clone(),
                service.clone(),
                configurations.clone(),
                leading,
            ));
            tracing::info!("waiting for the webhook certificate");
            webhook_tls::watch_secret(client.clone(), config.namespace.clone(), expiry).await
        }
        WebhookTls::Files(dir) => {
            webhook_tls::watch_files(dir.clone(), expiry).map_err(OperatorError::Config)?
        }
    };
    let native_sidecars = match client.apiserver_version().await {
        Ok(info) => supports_native_sidecars(&info.major, &info.minor),
        Err(error) => {
            tracing::warn!(%error, "cannot read the API server version; injecting classic sidecars");
            false
        }
    };
    // Injection serves exactly the watched namespaces: the webhook configuration matches
    // opted-in Pods everywhere, and those elsewhere are refused rather than started without
    // the sidecar.
    let inject = InjectConfig {
        watch_namespaces: config.watch_namespaces.clone(),
        ..options.inject.clone()
    };
    let router = crate::webhook::router(crate::webhook::WebhookState {
        snapshot: registry.subscribe(),
        inject: Arc::new(inject),
        native_sidecars,
        metrics,
    });
    let listener = tokio::net::TcpListener::bind(options.listen).await?;
    tracing::info!(listen = %options.listen, native_sidecars, "admission webhook listening");
    Ok(tokio::spawn(async move {
        if let Err(error) =
            crate::tls::serve_tls_with_limits(listener, router, resolver, limits, stop).await
        {
            tracing::error!(%error, "the admission webhook stopped");
        }
    }))
}

/// Native sidecars (init containers with `restartPolicy: Always`) are on by default from
/// Kubernetes 1.29.
pub fn supports_native_sidecars(major: &str, minor: &str) -> bool {
    let minor: u32 = minor.trim_end_matches('+').parse().unwrap_or(0);
    major
        .parse::<u32>()
        .is_ok_and(|major| major > 1 || (major == 1 && minor >= 29))
}

/// The settings of every controller: at most `concurrency` reconciles at once.
fn controller_config(concurrency: u16) -> kube::runtime::controller::Config {
    kube::runtime::controller::Config::default().concurrency(concurrency)
}

/// A controller over `api` whose cache holds objects without managed fields, running at most
/// `concurrency` reconciles at once.
fn controller_for<K>(api: Api<K>, concurrency: u16) -> Controller<K>
where
    K: controller::Watched,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone + std::fmt::Debug + Unpin,
{
    let (reader, writer) = reflector::store();
    let objects = watcher(api, watcher::Config::default())
        .modify(controller::lean)
        .reflect(writer)
        .applied_objects();
    Controller::for_stream(objects, reader).with_config(controller_config(concurrency))
}

/// Waits for leadership, then runs the three controllers until `stop`. The ApiClient
/// controller reads the registry's cache of ApiClients (`clients`) instead of its own.
async fn run_controllers_when_leading(
    ctx: Arc<Context>,
    clients: Vec<controller::watch::ClientCache>,
    mut leading: watch::Receiver<bool>,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) {
    if leading.wait_for(|l| *l).await.is_err() {
        return;
    }
    tracing::info!("leading: starting controllers");
    let stop = futures::future::FutureExt::shared(Box::pin(stop));
    let config = ctx.config.clone();
    let client = ctx.client.clone();
    let secret_selector = format!("{}={}", MANAGED_BY.0, MANAGED_BY.1);

    // ApiClients are reconciled again when their resolved grants change in the registry.
    let (refs_tx, _) =
        tokio::sync::broadcast::channel::<ObjectRef<DeserializeGuard<CachedClient>>>(4096);
    {
        let refs_tx = refs_tx.clone();
        let mut snapshots = ctx.registry.subscribe();
        tokio::spawn(async move {
            let mut before = snapshots.borrow_and_update().clone();
            while snapshots.changed().await.is_ok() {
                tokio::time::sleep(Duration::from_millis(100)).await;
                let after = snapshots.borrow_and_update().clone();
                for r in changed_clients(&before, &after) {
                    let _ = refs_tx.send(r);
                }
                before = after;
            }
        });
    }
    let mut tasks = Vec::new();
    for cache in clients {
        // A registry change that fell behind stands for every ApiClient.
        let refs = futures::stream::unfold(refs_tx.subscribe(), |mut rx| async move {
            let trigger = match rx.recv().await {
                Ok(r) => Trigger::One(r),
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => Trigger::All,
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
            };
            Some((trigger, rx))
        });
        // The owners of each Secret keygate manages that changes or goes; after a relist of
        // the Secrets, every ApiClient (the first list is covered by the first replay).
        let secrets = apis::<PartialObjectMeta<Secret>>(&client, &config);
        let owners = futures::stream::select_all(secrets.into_iter().map(|secrets| {
            let mut listed = false;
            watcher(secrets, watcher::Config::default().labels(&secret_selector))
                .default_backoff()
                .filter_map(move |event| {
                    let triggers = match event {
                        Ok(watcher::Event::Apply(secret) | watcher::Event::Delete(secret)) => {
                            secret_owners(&secret)
                        }
                        Ok(watcher::Event::InitDone) if std::mem::replace(&mut listed, true) => {
                            vec![Trigger::All]
                        }
                        Ok(_) => Vec::new(),
                        Err(error) => {
                            tracing::warn!(%error, "Secret watch failed; retrying with backoff");
                            Vec::new()
                        }
                    };
                    std::future::ready(Some(futures::stream::iter(triggers)))
                })
                .flatten()
                .boxed()
        }));
        let resync = futures::stream::unfold((), |()| async {
            tokio::time::sleep(controller::clients::RESYNC).await;
            Some((Trigger::All, ()))
        });
        let triggers = futures::stream::select(
            futures::stream::select(cache.triggers(), resync),
            futures::stream::select(refs, owners),
        );
        let pacer = Pacer::new(usize::from(config.concurrency) * PACE_ROUNDS);
        let paced = pacer.clone().pace(triggers, cache.store.clone());
        let controller = Controller::for_shared_stream(futures::stream::pending(), cache.store)
            .with_config(controller_config(config.concurrency))
            .reconcile_on(paced)
            .graceful_shutdown_on(stop.clone());
        let ctx = ctx.clone();
        tasks.push(tokio::spawn(
            controller
                .run(
                    {
                        let pacer = pacer.clone();
                        move |client, ctx| {
                            pacer.started(&controller::pacing::object_ref(&*client));
                            controller::clients::reconcile(client, ctx)
                        }
                    },
                    |_, e, c| error_policy("apiclient", e, &c),
                    ctx,
                )
                .for_each(move |result| {
                    pacer.settled(&result);
                    async {}
                }),
        ));
    }
    for api in apis::<DeserializeGuard<ScopePolicy>>(&client, &config) {
        let trigger = futures::stream::select(
            futures::stream::select(
                changes(ctx.registry.subscribe(), Duration::from_secs(1)),
                changes(ctx.revocations.subscribe(), Duration::from_millis(200)),
            ),
            futures::stream::select(
                changes(ctx.keys.clone(), Duration::from_millis(200)),
                changes(ctx.token_ca.clone(), Duration::from_millis(200)),
            ),
        );
        let mut controller = controller_for(api, config.concurrency)
            .reconcile_all_on(trigger)
            .graceful_shutdown_on(stop.clone());
        for cms in apis::<ConfigMap>(&client, &config) {
            controller = controller.owns(cms, watcher::Config::default().labels(&secret_selector));
        }
        let ctx = ctx.clone();
        tasks.push(tokio::spawn(
            controller
                .run(
                    controller::policies::reconcile,
                    |_, e, c| error_policy("scopepolicy", e, &c),
                    ctx,
                )
                .for_each(|_| async {}),
        ));
    }
    for api in apis::<DeserializeGuard<M2MRole>>(&client, &config) {
        let controller = controller_for(api, config.concurrency)
            .reconcile_all_on(changes(ctx.registry.subscribe(), Duration::from_secs(1)))
            .graceful_shutdown_on(stop.clone());
        let ctx = ctx.clone();
        tasks.push(tokio::spawn(
            controller
                .run(
                    controller::roles::reconcile,
                    |_, e, c| error_policy("m2mrole", e, &c),
                    ctx,
                )
                .for_each(|_| async {}),
        ));
    }
    for task in tasks {
        let _ = task.await;
    }
}
