//! Self-managed TLS for the operator's HTTPS listeners (the admission webhook and the token
//! server): a CA and a serving certificate generated with rcgen, kept as PEM in a Secret
//! (`ca.crt`, `ca.key`, `tls.crt`, `tls.key`), a rustls certificate resolver whose
//! certificate can be swapped while the server runs, and the TLS serve loop.
//!
//! The operator calls [`ensure`] on start and periodically: it keeps valid material, issues
//! a new serving certificate from the same CA when the current one nears expiry or its names
//! changed (so what clients trust, the CA, stays the same), and generates a new CA only when
//! the CA itself nears expiry or is unusable. Then it stores the result in the Secret,
//! publishes `ca.crt` (the webhook configurations' `caBundle`, the `keygate-ca` ConfigMap of
//! the token server) and every replica calls [`CertResolver::swap`]; new TLS connections get
//! the new certificate, existing ones go on.
//!
//! Only TLS 1.2 and 1.3 are offered (rustls has nothing older), with the aws-lc-rs provider.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use axum::Router;
use k8s_openapi::ByteString;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use rustls::ServerConfig;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use crate::connections::ConnectionLimits;

/// Secret key of the CA certificate (also the webhook configurations' `caBundle` and the
/// key of the token server's CA in the `keygate-ca` ConfigMap).
pub const CA_CRT: &str = "ca.crt";
/// Secret key of the CA private key.
pub const CA_KEY: &str = "ca.key";
/// Secret key of the serving certificate.
pub const TLS_CRT: &str = "tls.crt";
/// Secret key of the serving private key.
pub const TLS_KEY: &str = "tls.key";

/// How long a generated CA is valid.
pub const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// How long a serving certificate is valid.
pub const LEAF_VALIDITY: Duration = Duration::from_secs(365 * 24 * 3600);
/// Renew a serving certificate this long before it expires.
pub const RENEW_BEFORE: Duration = Duration::from_secs(30 * 24 * 3600);
/// Backdating of `notBefore`, for clocks slightly behind ours.
const BACKDATE: Duration = Duration::from_secs(3600);

/// A TLS problem.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("invalid PEM for {what}: {message}")]
    Pem { what: &'static str, message: String },
    #[error("the Secret has no {0}")]
    Missing(&'static str),
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("time out of range")]
    Time,
}

/// A CA and the serving certificate it signed, as PEM. `Debug` leaves out the private keys.
#[derive(Clone, PartialEq, Eq)]
pub struct ServingCerts {
    pub ca_crt: String,
    pub ca_key: String,
    pub tls_crt: String,
    pub tls_key: String,
}

impl std::fmt::Debug for ServingCerts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServingCerts")
            .field("ca_crt", &self.ca_crt)
            .field("tls_crt", &self.tls_crt)
            .finish_non_exhaustive()
    }
}

impl ServingCerts {
    /// The Secret `data`.
    pub fn to_secret_data(&self) -> BTreeMap<String, ByteString> {
        [
            (CA_CRT, &self.ca_crt),
            (CA_KEY, &self.ca_key),
            (TLS_CRT, &self.tls_crt),
            (TLS_KEY, &self.tls_key),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), ByteString(v.as_bytes().to_vec())))
        .collect()
    }

    /// Reads the Secret `data`.
    pub fn from_secret_data(data: &BTreeMap<String, ByteString>) -> Result<Self, TlsError> {
        let get = |key: &'static str| -> Result<String, TlsError> {
            let bytes = data.get(key).ok_or(TlsError::Missing(key))?;
            String::from_utf8(bytes.0.clone()).map_err(|_| TlsError::Pem {
                what: key,
                message: "not UTF-8".to_owned(),
            })
        };
        Ok(Self {
            ca_crt: get(CA_CRT)?,
            ca_key: get(CA_KEY)?,
            tls_crt: get(TLS_CRT)?,
            tls_key: get(TLS_KEY)?,
        })
    }
}

/// The DNS names of the Service `service` in `namespace`, as clients in the cluster spell
/// them.
pub fn service_names(service: &str, namespace: &str) -> Vec<String> {
    vec![
        service.to_owned(),
        format!("{service}.{namespace}"),
        format!("{service}.{namespace}.svc"),
        format!("{service}.{namespace}.svc.cluster.local"),
    ]
}

fn offset(time: SystemTime) -> Result<time::OffsetDateTime, TlsError> {
    let secs = time
        .duration_since(UNIX_EPOCH)
        .map_err(|_| TlsError::Time)?
        .as_secs();
    time::OffsetDateTime::from_unix_timestamp(i64::try_from(secs).map_err(|_| TlsError::Time)?)
        .map_err(|_| TlsError::Time)
}

/// A new self-signed CA named `common_name`, valid from `now` for `validity`: (certificate
/// PEM, key PEM).
pub fn generate_ca(
    common_name: &str,
    now: SystemTime,
    validity: Duration,
) -> Result<(String, String), TlsError> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    let mut name = DistinguishedName::new();
    name.push(DnType::OrganizationName, "keygate");
    name.push(DnType::CommonName, common_name);
    params.distinguished_name = name;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.not_before = offset(now - BACKDATE)?;
    params.not_after = offset(now + validity)?;
    let cert = params.self_signed(&key)?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// A serving certificate for `names` (DNS names or IP addresses) signed by the CA, valid from
/// `now` for `validity`: (certificate PEM, key PEM).
pub fn issue_serving_cert(
    ca_crt: &str,
    ca_key: &str,
    names: &[String],
    now: SystemTime,
    validity: Duration,
) -> Result<(String, String), TlsError> {
    let ca_key = KeyPair::from_pem(ca_key)?;
    let issuer = Issuer::from_ca_cert_pem(ca_crt, ca_key)?;
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(names.to_vec())?;
    let mut name = DistinguishedName::new();
    name.push(
        DnType::CommonName,
        names.first().map(String::as_str).unwrap_or("keygate"),
    );
    params.distinguished_name = name;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.use_authority_key_identifier_extension = true;
    params.not_before = offset(now - BACKDATE)?;
    params.not_after = offset(now + validity)?;
    let cert = params.signed_by(&key, &issuer)?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// A new CA named `ca_name` (10 years) and a serving certificate (1 year) for `names`.
pub fn generate(
    ca_name: &str,
    names: &[String],
    now: SystemTime,
) -> Result<ServingCerts, TlsError> {
    let (ca_crt, ca_key) = generate_ca(ca_name, now, CA_VALIDITY)?;
    let (tls_crt, tls_key) = issue_serving_cert(&ca_crt, &ca_key, names, now, LEAF_VALIDITY)?;
    Ok(ServingCerts {
        ca_crt,
        ca_key,
        tls_crt,
        tls_key,
    })
}

/// What [`ensure`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Renewal {
    /// The material is valid; nothing changed.
    Kept,
    /// A new serving certificate from the same CA (`caBundle` unchanged).
    NewLeaf,
    /// A new CA and serving certificate (`caBundle` must be updated).
    NewCa,
}

/// Keeps `existing` when it is usable for `names` for longer than `renew_before`, otherwise
/// renews what must be renewed: the serving certificate alone when the CA is still good, or
/// everything (with a new CA named `ca_name`).
pub fn ensure(
    ca_name: &str,
    existing: Option<&ServingCerts>,
    names: &[String],
    now: SystemTime,
    renew_before: Duration,
) -> Result<(ServingCerts, Renewal), TlsError> {
    let Some(existing) = existing else {
        return Ok((generate(ca_name, names, now)?, Renewal::NewCa));
    };
    // A CA that would expire before a new serving certificate is replaced with it.
    let ca_usable = !needs_renewal(&existing.ca_crt, now, renew_before.max(LEAF_VALIDITY))
        && ca_key_matches(&existing.ca_crt, &existing.ca_key);
    if !ca_usable {
        return Ok((generate(ca_name, names, now)?, Renewal::NewCa));
    }
    let leaf_ok = !needs_renewal(&existing.tls_crt, now, renew_before)
        && issued_by(&existing.tls_crt, &existing.ca_crt)
        && cert_names(&existing.tls_crt).is_some_and(|have| {
            let mut want: Vec<String> = names.to_vec();
            want.sort();
            want.dedup();
            have == want
        })
        && certified_key(&existing.tls_crt, &existing.tls_key).is_ok();
    if leaf_ok {
        return Ok((existing.clone(), Renewal::Kept));
    }
    let (tls_crt, tls_key) = issue_serving_cert(
        &existing.ca_crt,
        &existing.ca_key,
        names,
        now,
        LEAF_VALIDITY,
    )?;
    Ok((
        ServingCerts {
            tls_crt,
            tls_key,
            ..existing.clone()
        },
        Renewal::NewLeaf,
    ))
}

/// Checks that `pem` holds certificates and nothing else (no private key), as anything
/// published for clients to trust must; returns how many.
pub fn certificates_only(pem: &str) -> Result<usize, TlsError> {
    use rustls::pki_types::pem::SectionKind;
    let refuse = |message: &str| TlsError::Pem {
        what: CA_CRT,
        message: message.to_owned(),
    };
    let mut count = 0;
    for section in <(SectionKind, Vec<u8>)>::pem_slice_iter(pem.as_bytes()) {
        match section {
            Ok((SectionKind::Certificate, _)) => count += 1,
            Ok(_) => return Err(refuse("holds something other than certificates")),
            Err(_) => return Err(refuse("not valid PEM")),
        }
    }
    if count == 0 {
        return Err(refuse("no certificate"));
    }
    Ok(count)
}

fn first_der(pem: &str) -> Option<CertificateDer<'static>> {
    CertificateDer::pem_slice_iter(pem.as_bytes()).next()?.ok()
}

/// The certificates of a PEM bundle, as an HTTP client's only trusted roots; `None` when it
/// holds none.
pub fn pem_roots(pem: &[u8]) -> Option<Vec<reqwest::Certificate>> {
    reqwest::Certificate::from_pem_bundle(pem)
        .ok()
        .filter(|roots| !roots.is_empty())
}

/// The `notAfter` of the first certificate in `cert_pem`.
pub fn not_after(cert_pem: &str) -> Option<SystemTime> {
    let der = first_der(cert_pem)?;
    let (_, cert) = x509_parser::parse_x509_certificate(&der).ok()?;
    let secs = cert.validity().not_after.timestamp();
    Some(UNIX_EPOCH + Duration::from_secs(u64::try_from(secs).ok()?))
}

/// Whether the certificate expires within `before` of `now` (or cannot be read, or is not
/// valid yet by more than a day, which means a clock or material problem).
pub fn needs_renewal(cert_pem: &str, now: SystemTime, before: Duration) -> bool {
    let Some(der) = first_der(cert_pem) else {
        return true;
    };
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(&der) else {
        return true;
    };
    let Ok(now_secs) = now.duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64) else {
        return true;
    };
    let validity = cert.validity();
    let not_before = validity.not_before.timestamp();
    let not_after = validity.not_after.timestamp();
    not_before > now_secs + 24 * 3600 || not_after - (before.as_secs() as i64) <= now_secs
}

/// The sorted DNS names and IP addresses of a certificate.
fn cert_names(cert_pem: &str) -> Option<Vec<String>> {
    use x509_parser::extensions::GeneralName;
    let der = first_der(cert_pem)?;
    let (_, cert) = x509_parser::parse_x509_certificate(&der).ok()?;
    let san = cert.subject_alternative_name().ok()??;
    let mut names: Vec<String> = san
        .value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::DNSName(dns) => Some((*dns).to_owned()),
            GeneralName::IPAddress(bytes) => match bytes.len() {
                4 => <[u8; 4]>::try_from(*bytes)
                    .ok()
                    .map(|b| IpAddr::from(b).to_string()),
                16 => <[u8; 16]>::try_from(*bytes)
                    .ok()
                    .map(|b| IpAddr::from(b).to_string()),
                _ => None,
            },
            _ => None,
        })
        .collect();
    names.sort();
    names.dedup();
    Some(names)
}

/// Whether `leaf_pem` names `ca_pem`'s subject as issuer and carries a valid signature of it.
fn issued_by(leaf_pem: &str, ca_pem: &str) -> bool {
    let (Some(leaf), Some(ca)) = (first_der(leaf_pem), first_der(ca_pem)) else {
        return false;
    };
    let (Ok((_, leaf)), Ok((_, ca))) = (
        x509_parser::parse_x509_certificate(&leaf),
        x509_parser::parse_x509_certificate(&ca),
    ) else {
        return false;
    };
    leaf.issuer().as_raw() == ca.subject().as_raw()
        && leaf.verify_signature(Some(ca.public_key())).is_ok()
}

/// Whether `ca_key` is the private key of `ca_crt`.
fn ca_key_matches(ca_crt: &str, ca_key: &str) -> bool {
    use rcgen::PublicKeyData;
    let Ok(key) = KeyPair::from_pem(ca_key) else {
        return false;
    };
    let Some(der) = first_der(ca_crt) else {
        return false;
    };
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(&der) else {
        return false;
    };
    cert.public_key().raw == key.subject_public_key_info().as_slice()
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// A rustls `CertifiedKey` from a certificate chain PEM and a private key PEM; fails when the
/// key does not match the certificate.
pub fn certified_key(cert_pem: &str, key_pem: &str) -> Result<CertifiedKey, TlsError> {
    let chain = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem {
            what: TLS_CRT,
            message: e.to_string(),
        })?;
    if chain.is_empty() {
        return Err(TlsError::Pem {
            what: TLS_CRT,
            message: "no certificate".to_owned(),
        });
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|e| TlsError::Pem {
        what: TLS_KEY,
        message: e.to_string(),
    })?;
    Ok(CertifiedKey::from_der(chain, key, &provider())?)
}

/// Serves whatever certificate was last installed; [`Self::swap`] changes it for new
/// handshakes without restarting anything.
#[derive(Debug)]
pub struct CertResolver {
    current: ArcSwap<CertifiedKey>,
}

impl CertResolver {
    /// A resolver serving `cert_pem` (the serving certificate, optionally followed by
    /// intermediates) with `key_pem`.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Arc<Self>, TlsError> {
        Ok(Arc::new(Self {
            current: ArcSwap::from_pointee(certified_key(cert_pem, key_pem)?),
        }))
    }

    /// Installs a new certificate; a malformed one is refused and the current one stays.
    pub fn swap(&self, cert_pem: &str, key_pem: &str) -> Result<(), TlsError> {
        self.current
            .store(Arc::new(certified_key(cert_pem, key_pem)?));
        Ok(())
    }

    /// The certificate now served (DER of the end-entity certificate).
    pub fn current_der(&self) -> Option<CertificateDer<'static>> {
        self.current.load().cert.first().cloned()
    }

    /// A rustls server configuration using this resolver, with ALPN h2 and http/1.1.
    pub fn server_config(self: &Arc<Self>) -> Result<ServerConfig, TlsError> {
        let mut config = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_cert_resolver(self.clone());
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(config)
    }
}

impl ResolvesServerCert for CertResolver {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

/// The first byte a TLS client sends: the content type of a handshake record.
const TLS_HANDSHAKE_RECORD: u8 = 0x16;
/// What a client that speaks plain HTTP to a TLS port gets (as from Go's `net/http`): a
/// reason instead of a closed connection. Nothing it sent is read as a request.
const PLAIN_HTTP_ANSWER: &[u8] = b"HTTP/1.0 400 Bad Request\r\nContent-Type: text/plain; charset=utf-8\r\nConnection: close\r\n\r\nThis port serves HTTPS only: use an https:// URL.\n";
/// At most this much of a plain HTTP request is read and dropped before closing, so that
/// the client reads the answer rather than a reset.
const PLAIN_HTTP_DRAIN: u64 = 64 * 1024;

/// Serves `router` over TLS (HTTP/1.1 and HTTP/2 by ALPN) on `listener` with the certificate
/// `resolver` holds at each handshake, within `limits`, until `shutdown` resolves; then
/// drains in-flight requests for up to `limits.drain`. Handlers can extract
/// `ConnectInfo<SocketAddr>`, as with [`crate::admin::serve`].
///
/// The TLS handshake must be done within the header-read timeout. A connection that starts
/// with anything but a TLS handshake (plain HTTP) gets a 400 that says to use `https://`
/// and is closed: nothing is ever served without TLS.
pub async fn serve_tls_with_limits(
    listener: tokio::net::TcpListener,
    router: Router,
    resolver: Arc<CertResolver>,
    limits: ConnectionLimits,
    shutdown: impl Future<Output = ()>,
) -> Result<(), TlsError> {
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(resolver.server_config()?));
    let builder = crate::connections::http_builder(&limits);
    let handshake_timeout = limits.header_read_timeout;
    crate::connections::serve_connections(listener, shutdown, limits, |stream, peer, watcher| {
        let acceptor = acceptor.clone();
        let builder = builder.clone();
        let router = router.clone();
        async move {
            let handshake = async {
                let mut first = [0u8; 1];
                match stream.get_ref().peek(&mut first).await {
                    Ok(1) if first[0] == TLS_HANDSHAKE_RECORD => {}
                    Ok(1) => {
                        tracing::debug!(%peer, "plain HTTP on a TLS port; refused");
                        refuse_plain_http(stream).await;
                        return None;
                    }
                    _ => return None,
                }
                match acceptor.accept(stream).await {
                    Ok(tls) => Some(tls),
                    Err(error) => {
                        tracing::debug!(%error, %peer, "TLS handshake failed");
                        None
                    }
                }
            };
            let tls = match tokio::time::timeout(handshake_timeout, handshake).await {
                Ok(Some(tls)) => tls,
                Ok(None) => return,
                Err(_) => {
                    tracing::debug!(%peer, "TLS handshake timed out");
                    return;
                }
            };
            crate::admin::serve_connection(tls, peer, router, &builder, watcher).await;
        }
    })
    .await;
    Ok(())
}

/// Answers [`PLAIN_HTTP_ANSWER`], then reads and drops what the client sent (bounded) until
/// it closes, so that closing does not reset the connection before it read the answer.
async fn refuse_plain_http(mut stream: crate::connections::ClientStream) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    if stream.write_all(PLAIN_HTTP_ANSWER).await.is_err() || stream.shutdown().await.is_err() {
        return;
    }
    let _ = tokio::io::copy(
        &mut (&mut stream).take(PLAIN_HTTP_DRAIN),
        &mut tokio::io::sink(),
    )
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    const CA: &str = "keygate test CA";

    fn names() -> Vec<String> {
        let mut names = service_names("keygate-webhook", "keygate-system");
        names.push("127.0.0.1".to_owned());
        names
    }

    #[test]
    fn generated_material_round_trips_and_is_kept() {
        let now = SystemTime::now();
        let certs = generate(CA, &names(), now).expect("generate");
        let data = certs.to_secret_data();
        assert_eq!(
            data.keys().collect::<Vec<_>>(),
            vec![CA_CRT, CA_KEY, TLS_CRT, TLS_KEY]
        );
        let read = ServingCerts::from_secret_data(&data).expect("read");
        assert_eq!(read, certs);
        assert!(issued_by(&certs.tls_crt, &certs.ca_crt));
        let mut want = names();
        want.sort();
        assert_eq!(cert_names(&certs.tls_crt), Some(want));
        let (kept, renewal) = ensure(CA, Some(&read), &names(), now, RENEW_BEFORE).expect("ensure");
        assert_eq!(renewal, Renewal::Kept);
        assert_eq!(kept, certs);
    }

    #[test]
    fn renewal_window() {
        let now = SystemTime::now();
        let certs = generate(CA, &names(), now).expect("generate");
        let expiry = not_after(&certs.tls_crt).expect("not after");
        let lifetime = expiry.duration_since(now).expect("future");
        assert!(lifetime > LEAF_VALIDITY - Duration::from_secs(5) && lifetime <= LEAF_VALIDITY);
        assert!(!needs_renewal(&certs.tls_crt, now, RENEW_BEFORE));
        let late = expiry - RENEW_BEFORE + Duration::from_secs(1);
        assert!(needs_renewal(&certs.tls_crt, late, RENEW_BEFORE));
        assert!(needs_renewal("not a certificate", now, RENEW_BEFORE));
    }

    #[test]
    fn near_expiry_renews_the_leaf_only() {
        let now = SystemTime::now();
        let certs = generate(CA, &names(), now).expect("generate");
        let later = now + LEAF_VALIDITY - Duration::from_secs(24 * 3600);
        let (renewed, renewal) =
            ensure(CA, Some(&certs), &names(), later, RENEW_BEFORE).expect("ensure");
        assert_eq!(renewal, Renewal::NewLeaf);
        assert_eq!(renewed.ca_crt, certs.ca_crt);
        assert_ne!(renewed.tls_crt, certs.tls_crt);
        assert!(issued_by(&renewed.tls_crt, &certs.ca_crt));
        assert!(!needs_renewal(&renewed.tls_crt, later, RENEW_BEFORE));
    }

    #[test]
    fn changed_names_or_foreign_leaf_renew() {
        let now = SystemTime::now();
        let certs = generate(CA, &names(), now).expect("generate");
        let other = service_names("other", "ns");
        assert_eq!(
            ensure(CA, Some(&certs), &other, now, RENEW_BEFORE)
                .expect("ensure")
                .1,
            Renewal::NewLeaf
        );
        let foreign = generate(CA, &names(), now).expect("generate");
        let mixed = ServingCerts {
            tls_crt: foreign.tls_crt.clone(),
            tls_key: foreign.tls_key.clone(),
            ..certs.clone()
        };
        assert_eq!(
            ensure(CA, Some(&mixed), &names(), now, RENEW_BEFORE)
                .expect("ensure")
                .1,
            Renewal::NewLeaf
        );
        let broken_ca = ServingCerts {
            ca_key: "garbage".to_owned(),
            ..certs
        };
        assert_eq!(
            ensure(CA, Some(&broken_ca), &names(), now, RENEW_BEFORE)
                .expect("ensure")
                .1,
            Renewal::NewCa
        );
    }

    #[test]
    fn resolver_refuses_mismatched_key_and_keeps_current() {
        let now = SystemTime::now();
        let a = generate(CA, &names(), now).expect("generate");
        let b = generate(CA, &names(), now).expect("generate");
        let resolver = CertResolver::from_pem(&a.tls_crt, &a.tls_key).expect("resolver");
        let before = resolver.current_der();
        assert!(resolver.swap(&a.tls_crt, &b.tls_key).is_err());
        assert_eq!(resolver.current_der(), before);
        resolver.swap(&b.tls_crt, &b.tls_key).expect("swap");
        assert_ne!(resolver.current_der(), before);
    }
}
