//! Following the policy stream of an operator replica (`controller::policy_stream`): the
//! sidecar learns a new client, a revocation or a role change as soon as the operator does,
//! instead of after the kubelet's next ConfigMap sync.
//!
//! The sidecar connects over HTTPS, trusting only `--ca-file`, with its projected
//! ServiceAccount token (`--token-file`, read again at every connection since the kubelet
//! rotates it), applies the snapshot and then every change, and installs each result. When
//! the stream breaks (no line within three heartbeats, a gap in revisions, a line it cannot
//! read, a replica going away) it reconnects with a growing, jittered back-off to whichever
//! replica the Service picks, keeping the last good policy meanwhile; the policy file takes
//! over as the fallback only while the stream is down.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use super::server::Sidecar;
use crate::policy::PolicyDocument;
use crate::policy::document::POLICY_FILE_VERSION;
use crate::policy::stream::StreamEvent;

/// The longest line read (a snapshot of 100,000 clients is about 40 MiB).
const MAX_LINE_BYTES: usize = 128 * 1024 * 1024;
/// Silence after which the stream is taken for dead (three heartbeats).
const SILENCE: Duration = Duration::from_secs(45);
const BACKOFF_MIN: Duration = Duration::from_millis(250);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// Where and how to follow the stream.
#[derive(Debug, Clone)]
pub struct StreamConfig {
    /// The operator's policy server, e.g. `https://keygate.keygate-system.svc:8443`.
    pub server: String,
    /// `namespace/name` of the ScopePolicy.
    pub policy: String,
    /// The projected ServiceAccount token (audience `keygate`).
    pub token_file: PathBuf,
    /// The CA that signed the server's certificate.
    pub ca_file: PathBuf,
    /// The TLS server name to verify, when it is not the server URL's host.
    pub server_name: Option<String>,
}

impl StreamConfig {
    fn url(&self) -> Result<reqwest::Url, String> {
        let (namespace, name) = self
            .policy
            .split_once('/')
            .ok_or_else(|| format!("--policy-name {:?} is not namespace/name", self.policy))?;
        let mut url = reqwest::Url::parse(&self.server)
            .map_err(|e| format!("--policy-server {:?}: {e}", self.server))?;
        if url.scheme() != "https" {
            return Err(format!(
                "--policy-server {:?} must be an https:// URL",
                self.server
            ));
        }
        url.set_path(&format!("/v1/policies/{namespace}/{name}"));
        Ok(url)
    }
}

/// Why one connection ended.
#[derive(Debug, thiserror::Error)]
enum Broken {
    #[error("{0}")]
    Setup(String),
    #[error("connecting: {0}")]
    Connect(String),
    #[error("the server answered {0}")]
    Status(reqwest::StatusCode),
    #[error("reading: {0}")]
    Read(String),
    #[error("no line for {0:?}")]
    Silent(Duration),
    #[error("{0}")]
    Invalid(String),
    #[error("the server closed the stream")]
    Closed,
}

/// Follows the stream until the process ends. Never returns an error: every failure is
/// logged and retried.
pub async fn follow(config: StreamConfig, sidecar: Arc<Sidecar>) {
    let mut backoff = BACKOFF_MIN;
    loop {
        let connected_at = std::time::Instant::now();
        let error = follow_once(&config, &sidecar).await;
        sidecar.set_stream_live(false);
        if connected_at.elapsed() > BACKOFF_MAX {
            backoff = BACKOFF_MIN;
        }
        let pause = crate::connections::jittered(backoff, backoff / 2);
        tracing::warn!(%error, retry_in = ?pause, "policy stream broken; keeping the last good policy");
        tokio::time::sleep(pause).await;
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

async fn client(config: &StreamConfig, url: &reqwest::Url) -> Result<reqwest::Client, Broken> {
    let ca = std::fs::read(&config.ca_file)
        .map_err(|e| Broken::Setup(format!("reading {}: {e}", config.ca_file.display())))?;
    let roots = reqwest::Certificate::from_pem_bundle(&ca)
        .map_err(|e| Broken::Setup(format!("{}: {e}", config.ca_file.display())))?;
    let mut builder = reqwest::Client::builder()
        .tls_certs_only(roots)
        .connect_timeout(Duration::from_secs(5))
        .http2_keep_alive_interval(Duration::from_secs(15));
    if let Some(name) = &config.server_name {
        // Verify `name` while connecting to the URL's host: resolve it here and pin it.
        let host = url.host_str().unwrap_or_default();
        let port = url.port_or_known_default().unwrap_or(443);
        let addrs: Vec<_> = tokio::net::lookup_host((host, port))
            .await
            .map_err(|e| Broken::Connect(format!("resolving {host}: {e}")))?
            .collect();
        builder = builder.resolve_to_addrs(name, &addrs);
    }
    builder
        .build()
        .map_err(|e| Broken::Setup(format!("the HTTP client: {e}")))
}

async fn follow_once(config: &StreamConfig, sidecar: &Sidecar) -> Broken {
    match try_follow(config, sidecar).await {
        Ok(()) => Broken::Closed,
        Err(broken) => broken,
    }
}

async fn try_follow(config: &StreamConfig, sidecar: &Sidecar) -> Result<(), Broken> {
    let mut url = config.url().map_err(Broken::Setup)?;
    let http = client(config, &url).await?;
    if let Some(name) = &config.server_name {
        url.set_host(Some(name))
            .map_err(|e| Broken::Setup(format!("--policy-server-name {name:?}: {e}")))?;
    }
    let token = std::fs::read_to_string(&config.token_file)
        .map_err(|e| Broken::Setup(format!("reading {}: {e}", config.token_file.display())))?;
    let response = http
        .get(url)
        .bearer_auth(token.trim())
        .send()
        .await
        .map_err(|e| Broken::Connect(e.to_string()))?;
    if !response.status().is_success() {
        return Err(Broken::Status(response.status()));
    }
    let mut response = response;
    let mut buffer: Vec<u8> = Vec::new();
    let mut state: Option<(u64, PolicyDocument)> = None;
    loop {
        let chunk = match tokio::time::timeout(SILENCE, response.chunk()).await {
            Err(_) => return Err(Broken::Silent(SILENCE)),
            Ok(Ok(None)) => return Ok(()),
            Ok(Err(error)) => return Err(Broken::Read(error.to_string())),
            Ok(Ok(Some(chunk))) => chunk,
        };
        buffer.extend_from_slice(&chunk);
        while let Some(end) = buffer.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = buffer.drain(..=end).collect();
            state = Some(apply_line(&line, state.take(), config, sidecar)?);
        }
        if buffer.len() > MAX_LINE_BYTES {
            return Err(Broken::Invalid(format!(
                "a line longer than {MAX_LINE_BYTES} bytes"
            )));
        }
    }
}

/// Applies one line to the followed state and installs the result.
fn apply_line(
    line: &[u8],
    state: Option<(u64, PolicyDocument)>,
    config: &StreamConfig,
    sidecar: &Sidecar,
) -> Result<(u64, PolicyDocument), Broken> {
    let event = StreamEvent::parse(line)
        .map_err(|e| Broken::Invalid(format!("an unreadable line: {e}")))?;
    let (revision, document) = match (event, state) {
        (StreamEvent::Heartbeat {}, Some(state)) => return Ok(state),
        (StreamEvent::Heartbeat {}, None) => {
            return Err(Broken::Invalid("a heartbeat before the snapshot".into()));
        }
        (StreamEvent::Snapshot { revision, document }, _) => {
            let mut document = *document;
            if document.api_version != POLICY_FILE_VERSION || document.policy != config.policy {
                return Err(Broken::Invalid(format!(
                    "a snapshot of {} ({}), not of {}",
                    document.policy, document.api_version, config.policy
                )));
            }
            document
                .clients
                .sort_by(|a, b| a.client_id.cmp(&b.client_id));
            (revision, document)
        }
        (StreamEvent::Change { .. }, None) => {
            return Err(Broken::Invalid("a change before the snapshot".into()));
        }
        (StreamEvent::Change { revision, delta }, Some((previous, mut document))) => {
            if revision != previous + 1 {
                return Err(Broken::Invalid(format!(
                    "revision {revision} after {previous}: a change was missed"
                )));
            }
            delta.apply(&mut document);
            (revision, document)
        }
    };
    sidecar
        .install(document.clone())
        .map_err(|e| Broken::Invalid(format!("revision {revision} does not install: {e}")))?;
    sidecar.set_stream_live(true);
    tracing::debug!(
        revision,
        clients = document.clients.len(),
        "policy from the stream installed"
    );
    Ok((revision, document))
}
