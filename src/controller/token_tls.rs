//! The token server's certificate, and the CA clients verify it with.
//!
//! In self mode the operator keeps a CA of its own for the token server, apart from the
//! webhook's, with a serving certificate for the token Service's in-cluster names and the
//! issuer's host, in the Secret `keygate-token-tls` ([`super::certs`]). In cert-manager mode
//! the certificate is mounted from files. Either way the leader publishes the CA certificate
//! (`ca.crt`, the public part only) in the ConfigMap `keygate-ca` of the operator's namespace,
//! so that clients can trust the token server without reading any Secret.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Patch, PatchParams};
use kube::{Api, Client};
use tokio::sync::watch;

use super::certs::{self, SelfManagedCert};
use super::{Error, MANAGER, Result, timed};
use crate::tls::CA_CRT;

/// The Secret holding the token server's CA and serving certificate (self mode).
pub const TOKEN_TLS_SECRET: &str = "keygate-token-tls";
/// The ConfigMap in which the operator publishes the token server's CA certificate.
pub const CA_CONFIGMAP: &str = "keygate-ca";
/// The common name of the token server's CA (self mode).
pub const CA_NAME: &str = "keygate token server CA";

/// The host of `issuer` (an IP address without brackets, or a lowercase DNS name).
pub fn issuer_host(issuer: &str) -> Option<String> {
    let uri: http::Uri = issuer.parse().ok()?;
    let host = uri.host()?.trim_start_matches('[').trim_end_matches(']');
    (!host.is_empty()).then(|| host.to_ascii_lowercase())
}

/// The names the token server's certificate carries: the Service `service`'s in-cluster
/// names in `namespace`, and the issuer's host when it is another (an Ingress host, a
/// LoadBalancer's name), so that the issuer URL clients are given always verifies.
pub fn certificate_names(service: &str, namespace: &str, issuer: &str) -> Vec<String> {
    let mut names = crate::tls::service_names(service, namespace);
    if let Some(host) = issuer_host(issuer)
        && !names.contains(&host)
    {
        names.push(host);
    }
    names
}

/// The token server's self-managed certificate.
pub fn self_managed_cert(service: &str, namespace: &str, issuer: &str) -> SelfManagedCert {
    SelfManagedCert {
        secret: TOKEN_TLS_SECRET,
        ca_name: CA_NAME,
        names: certificate_names(service, namespace, issuer),
        what: "token server",
    }
}

/// Writes `ca_pem` as `ca.crt` of the ConfigMap `keygate-ca` when it differs. Refuses
/// anything but certificates, so that no private key is ever published.
pub async fn publish_ca(client: &Client, namespace: &str, ca_pem: &str) -> Result<()> {
    crate::tls::certificates_only(ca_pem)
        .map_err(|e| Error::Invalid(format!("not publishing the token server CA: {e}")))?;
    let configmaps: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
    let existing = timed(configmaps.get_opt(CA_CONFIGMAP)).await?;
    if existing
        .as_ref()
        .and_then(|cm| cm.data.as_ref()?.get(CA_CRT))
        .is_some_and(|current| current == ca_pem)
    {
        return Ok(());
    }
    let desired = ConfigMap {
        metadata: super::own_object_meta(CA_CONFIGMAP, namespace),
        data: Some(BTreeMap::from([(CA_CRT.into(), ca_pem.into())])),
        ..ConfigMap::default()
    };
    timed(configmaps.patch(
        CA_CONFIGMAP,
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(&desired),
    ))
    .await?;
    tracing::info!(configmap = CA_CONFIGMAP, "token server CA published");
    Ok(())
}

/// One pass of the leader in self mode: keeps the certificate valid and its CA published.
pub async fn maintain(client: &Client, namespace: &str, cert: &SelfManagedCert) -> Result<()> {
    let certs = certs::maintain_secret(client, namespace, cert).await?;
    publish_ca(client, namespace, &certs.ca_crt).await
}

/// Run by every replica at start in self mode: creates the certificate (and publishes its
/// CA) when no replica has yet, so that the token server can start even while the leader
/// is a replica of an older version that does not.
pub async fn bootstrap(client: &Client, namespace: &str, cert: &SelfManagedCert) -> Result<()> {
    if let Some(certs) = certs::create_secret_if_absent(client, namespace, cert).await? {
        publish_ca(client, namespace, &certs.ca_crt).await?;
    }
    Ok(())
}

/// One pass of the leader in cert-manager mode: publishes the mounted `ca.crt` when there is
/// one (issuers whose certificates chain to public roots may leave it out).
pub async fn publish_ca_file(client: &Client, namespace: &str, dir: &Path) -> Result<()> {
    match certs::read_mounted(dir, CA_CRT) {
        Ok(ca) if !ca.trim().is_empty() => publish_ca(client, namespace, &ca).await,
        _ => {
            tracing::debug!(dir = %dir.display(), "no ca.crt in the token server certificate files; nothing to publish");
            Ok(())
        }
    }
}

/// Keeps the self-managed certificate and the published CA while this replica leads
/// (every ten minutes, as for the webhook).
pub async fn maintain_while_leading(
    client: Client,
    namespace: String,
    cert: SelfManagedCert,
    leading: watch::Receiver<bool>,
) {
    certs::every_while_leading(
        Duration::from_secs(600),
        leading,
        "token server certificate",
        || maintain(&client, &namespace, &cert),
    )
    .await;
}

/// Publishes the mounted CA every minute (the kubelet refreshes the files) while this
/// replica leads.
pub async fn publish_ca_file_while_leading(
    client: Client,
    namespace: String,
    dir: PathBuf,
    leading: watch::Receiver<bool>,
) {
    certs::every_while_leading(Duration::from_secs(60), leading, "token server CA", || {
        publish_ca_file(&client, &namespace, &dir)
    })
    .await;
}

/// The CA published in [`CA_CONFIGMAP`] of `namespace`, kept current by a watch: `None` until
/// it is there.
pub fn watch_published_ca(
    client: kube::Client,
    namespace: &str,
) -> tokio::sync::watch::Receiver<Option<String>> {
    use futures::StreamExt;
    let (tx, rx) = tokio::sync::watch::channel(None);
    let mut events = super::watch_named::<ConfigMap>(client, namespace, CA_CONFIGMAP);
    tokio::spawn(async move {
        while let Some(event) = events.next().await {
            match event {
                Ok(cm) => {
                    let ca = cm.data.and_then(|mut d| d.remove(CA_CRT));
                    tx.send_if_modified(|current| {
                        let changed = *current != ca;
                        *current = ca;
                        changed
                    });
                }
                Err(error) => tracing::warn!(%error, "watching {CA_CONFIGMAP} failed; retrying"),
            }
        }
    });
    rx
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_certificate_covers_the_service_and_the_issuer_host() {
        let service = crate::tls::service_names("keygate", "keygate-system");
        assert_eq!(
            certificate_names(
                "keygate",
                "keygate-system",
                "https://keygate.keygate-system.svc"
            ),
            service
        );
        let mut with_host = service.clone();
        with_host.push("auth.example.com".into());
        assert_eq!(
            certificate_names(
                "keygate",
                "keygate-system",
                "https://Auth.Example.com:8443/x"
            ),
            with_host
        );
        assert_eq!(
            issuer_host("https://127.0.0.1:8443"),
            Some("127.0.0.1".into())
        );
        assert_eq!(issuer_host("https://[::1]:8443"), Some("::1".into()));
        assert_eq!(issuer_host("not a url"), None);
    }

    #[test]
    fn only_certificates_are_published() {
        let certs = crate::tls::generate(
            CA_NAME,
            &["keygate".to_owned()],
            std::time::SystemTime::now(),
        )
        .expect("generate");
        assert_eq!(
            crate::tls::certificates_only(&certs.ca_crt).expect("a CA"),
            1
        );
        let bundle = format!("{}{}", certs.ca_crt, certs.tls_crt);
        assert_eq!(crate::tls::certificates_only(&bundle).expect("two"), 2);
        for bad in [
            certs.ca_key.clone(),
            format!("{}{}", certs.ca_crt, certs.ca_key),
            String::new(),
            "-----BEGIN CERTIFICATE-----\n!!\n-----END CERTIFICATE-----\n".to_owned(),
        ] {
            let error = crate::tls::certificates_only(&bad).expect_err("refused");
            assert!(!error.to_string().contains("PRIVATE"), "{error}");
            assert!(!error.to_string().contains(&certs.ca_key), "{error}");
        }
    }
}
