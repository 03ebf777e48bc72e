//! Serving certificates of the operator's HTTPS listeners (the admission webhook, the token
//! server), from one of two sources:
//!
//! - **self**: a CA and a serving certificate ([`crate::tls`]) in a Secret of the operator's
//!   namespace. The leader creates and renews them ([`maintain_secret`]); any replica may
//!   create them when the Secret does not exist yet ([`create_secret_if_absent`]), so that a
//!   replica never waits for a leader (say, of an older version) that would not; every
//!   replica watches the Secret and swaps new material into its listener ([`watch_secret`]).
//! - **files**: `tls.crt`/`tls.key` mounted from a Secret cert-manager keeps, re-read every
//!   minute ([`watch_files`]).
//!
//! Private keys stay in the Secret and in memory: they are never logged nor put in an error,
//! an Event or a status.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, Client};
use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::watch;

use super::{Error, MANAGER, Result, timed};
use crate::tls::{self, CertResolver, RENEW_BEFORE, Renewal, ServingCerts};

/// A certificate the operator keeps itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SelfManagedCert {
    /// The Secret of the operator's namespace that holds it.
    pub secret: &'static str,
    /// The common name of its CA.
    pub ca_name: &'static str,
    /// The DNS names (or IP addresses) clients reach the listener by.
    pub names: Vec<String>,
    /// What it serves, for logs: "webhook", "token server".
    pub what: &'static str,
}

fn parse(secret: &Secret) -> Option<ServingCerts> {
    ServingCerts::from_secret_data(secret.data.as_ref()?).ok()
}

fn secret_object(namespace: &str, cert: &SelfManagedCert, certs: &ServingCerts) -> Secret {
    Secret {
        metadata: super::own_object_meta(cert.secret, namespace),
        type_: Some("Opaque".into()),
        data: Some(certs.to_secret_data()),
        ..Secret::default()
    }
}

/// Creates the Secret; `false` when another replica created it first.
async fn create(
    secrets: &Api<Secret>,
    namespace: &str,
    cert: &SelfManagedCert,
    certs: &ServingCerts,
) -> Result<bool> {
    let created = timed(secrets.create(
        &PostParams::default(),
        &secret_object(namespace, cert, certs),
    ))
    .await;
    match created {
        Ok(_) => {
            tracing::info!(secret = cert.secret, "{} certificate created", cert.what);
            Ok(true)
        }
        Err(Error::Kube(kube::Error::Api(status))) if status.code == 409 => Ok(false),
        Err(error) => Err(error),
    }
}

fn generate(
    cert: &SelfManagedCert,
    existing: Option<&ServingCerts>,
) -> Result<(ServingCerts, Renewal)> {
    tls::ensure(
        cert.ca_name,
        existing,
        &cert.names,
        SystemTime::now(),
        RENEW_BEFORE,
    )
    .map_err(|e| Error::Invalid(format!("{} certificate: {e}", cert.what)))
}

/// One pass of the leader: keeps valid material, renews what is due (see
/// [`crate::tls::ensure`]) and writes only when something changed. Returns what the Secret
/// holds afterwards.
pub async fn maintain_secret(
    client: &Client,
    namespace: &str,
    cert: &SelfManagedCert,
) -> Result<ServingCerts> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let existing = timed(secrets.get_opt(cert.secret)).await?;
    let current = existing.as_ref().and_then(parse);
    let (certs, renewal) = generate(cert, current.as_ref())?;
    if renewal == Renewal::Kept {
        return Ok(certs);
    }
    if existing.is_none() {
        if !create(&secrets, namespace, cert, &certs).await? {
            // Another replica created it since: keep theirs, the next pass renews it if due.
            let theirs = timed(secrets.get(cert.secret)).await?;
            return parse(&theirs)
                .ok_or_else(|| Error::Invalid(format!("the Secret {} is malformed", cert.secret)));
        }
        return Ok(certs);
    }
    timed(secrets.patch(
        cert.secret,
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(&secret_object(namespace, cert, &certs)),
    ))
    .await?;
    tracing::info!(
        secret = cert.secret,
        ?renewal,
        "{} certificate renewed",
        cert.what
    );
    Ok(certs)
}

/// Creates the Secret with new material when it does not exist; never replaces one. Returns
/// the material when this call created it.
pub async fn create_secret_if_absent(
    client: &Client,
    namespace: &str,
    cert: &SelfManagedCert,
) -> Result<Option<ServingCerts>> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace);
    if timed(secrets.get_opt(cert.secret)).await?.is_some() {
        return Ok(None);
    }
    let (certs, _) = generate(cert, None)?;
    let created = create(&secrets, namespace, cert, &certs).await?;
    Ok(created.then_some(certs))
}

/// Sets `expiry` (`keygate_certificate_expiration_timestamp_seconds`) to the `notAfter` of
/// the certificate now served.
fn record_expiry(expiry: &Gauge, cert_pem: &str) {
    if let Some(seconds) = tls::not_after(cert_pem)
        .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
        .and_then(|d| i64::try_from(d.as_secs()).ok())
    {
        expiry.set(seconds);
    }
}

/// Watches the certificate Secret: resolves with a resolver once the first valid pair
/// arrives, and swaps every later one into it. Until then nothing is served: a listener
/// that waits for this never falls back to plain HTTP. `expiry` follows the served
/// certificate's `notAfter`.
pub async fn watch_secret(
    client: Client,
    namespace: String,
    secret: &'static str,
    what: &'static str,
    expiry: Gauge,
) -> Arc<CertResolver> {
    let mut events = super::watch_named::<Secret>(client, &namespace, secret);
    let resolver = loop {
        match events.next().await {
            Some(Ok(object)) => {
                if let Some(certs) = parse(&object)
                    && let Ok(resolver) = CertResolver::from_pem(&certs.tls_crt, &certs.tls_key)
                {
                    record_expiry(&expiry, &certs.tls_crt);
                    break resolver;
                }
                tracing::warn!(
                    secret,
                    "the {what} certificate Secret is malformed; waiting for a valid one"
                );
            }
            Some(Err(error)) => {
                tracing::warn!(%error, secret, "watching the {what} certificate failed; retrying")
            }
            None => std::future::pending().await,
        }
    };
    let swapper = resolver.clone();
    tokio::spawn(async move {
        while let Some(event) = events.next().await {
            if let Ok(object) = event {
                match parse(&object).map(|c| (swapper.swap(&c.tls_crt, &c.tls_key), c)) {
                    Some((Ok(()), certs)) => {
                        record_expiry(&expiry, &certs.tls_crt);
                        tracing::info!(secret, "{what} certificate swapped")
                    }
                    _ => tracing::error!(
                        secret,
                        "invalid {what} certificate; keeping the current one"
                    ),
                }
            }
        }
    });
    resolver
}

/// Reads `name` from the mounted directory `dir`.
pub fn read_mounted(dir: &Path, name: &str) -> std::result::Result<String, String> {
    let path = dir.join(name);
    std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))
}

/// Loads `tls.crt`/`tls.key` from `dir` (a cert-manager Secret mount) and reloads them every
/// minute, so a renewed certificate is served without a restart. Fails when they are missing
/// or unusable: the listener then does not start. `expiry` follows the served certificate's
/// `notAfter`.
pub fn watch_files(
    dir: PathBuf,
    what: &'static str,
    expiry: Gauge,
) -> std::result::Result<Arc<CertResolver>, String> {
    let read = |dir: &Path| -> std::result::Result<(String, String), String> {
        Ok((
            read_mounted(dir, tls::TLS_CRT)?,
            read_mounted(dir, tls::TLS_KEY)?,
        ))
    };
    let (cert, key) = read(&dir).map_err(|e| format!("{what} certificate: {e}"))?;
    let resolver = CertResolver::from_pem(&cert, &key)
        .map_err(|e| format!("{what} certificate in {}: {e}", dir.display()))?;
    record_expiry(&expiry, &cert);
    let swapper = resolver.clone();
    tokio::spawn(async move {
        let mut last = (cert, key);
        let mut ticker = tokio::time::interval(Duration::from_secs(60));
        loop {
            ticker.tick().await;
            match read(&dir) {
                Ok(current) if current != last => match swapper.swap(&current.0, &current.1) {
                    Ok(()) => {
                        tracing::info!("{what} certificate reloaded from files");
                        record_expiry(&expiry, &current.0);
                        last = current;
                    }
                    Err(error) => {
                        tracing::error!(%error, "invalid {what} certificate files; keeping the current one")
                    }
                },
                Ok(_) => {}
                Err(error) => tracing::warn!(%error, "cannot read the {what} certificate files"),
            }
        }
    });
    Ok(resolver)
}

/// Runs `pass` every `period` while this replica leads (and at once when it becomes leader);
/// a failed pass is logged and retried on the next tick.
pub async fn every_while_leading<F, Fut>(
    period: Duration,
    mut leading: watch::Receiver<bool>,
    what: &'static str,
    mut pass: F,
) where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<()>>,
{
    let mut ticker = tokio::time::interval(period);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            changed = leading.changed() => if changed.is_err() { return },
        }
        if *leading.borrow()
            && let Err(error) = pass().await
        {
            tracing::warn!(%error, "cannot maintain the {what}; retrying");
        }
    }
}
