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

use super::clients::ClientStore;
use super::server::Sidecar;
use crate::policy::PolicyDocument;
use crate::policy::document::POLICY_FILE_VERSION;
use crate::policy::stream::StreamEvent;

/// The longest line read. Clients come at most `CLIENTS_PER_LINE` a line (about 500 KiB);
/// the revocations, sent whole in a snapshot, are what can make a line long.
const MAX_LINE_BYTES: usize = 64 * 1024 * 1024;
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
        sidecar.set_stream_down();
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
    let mut state = Following::Nothing;
    loop {
        let chunk = match tokio::time::timeout(SILENCE, response.chunk()).await {
            Err(_) => return Err(Broken::Silent(SILENCE)),
            Ok(Ok(None)) => return Ok(()),
            Ok(Err(error)) => return Err(Broken::Read(error.to_string())),
            Ok(Ok(Some(chunk))) => chunk,
        };
        buffer.extend_from_slice(&chunk);
        let mut start = 0;
        while let Some(end) = buffer[start..].iter().position(|b| *b == b'\n') {
            let line = &buffer[start..start + end];
            start += end + 1;
            state = apply_line(line, state, config, sidecar)?;
        }
        buffer.drain(..start);
        if buffer.len() > MAX_LINE_BYTES {
            return Err(Broken::Invalid(format!(
                "a line longer than {MAX_LINE_BYTES} bytes"
            )));
        }
    }
}

/// Where a connection stands.
enum Following {
    /// Waiting for the first snapshot.
    Nothing,
    /// Receiving the clients of a snapshot; the policy in force stays until the last batch.
    Receiving {
        revision: u64,
        document: Box<PolicyDocument>,
        clients: ClientStore,
        batches_left: u32,
    },
    /// The policy in force is this stream's at `revision`.
    Live { revision: u64 },
}

/// Applies one line to the followed state, installing what it completes.
fn apply_line(
    line: &[u8],
    state: Following,
    config: &StreamConfig,
    sidecar: &Sidecar,
) -> Result<Following, Broken> {
    let event = StreamEvent::parse(line)
        .map_err(|e| Broken::Invalid(format!("an unreadable line: {e}")))?;
    let receiving = match (event, state) {
        (StreamEvent::Heartbeat {}, state @ Following::Live { .. }) => return Ok(state),
        (
            StreamEvent::Snapshot {
                revision,
                document,
                client_batches,
            },
            Following::Nothing | Following::Live { .. },
        ) => {
            if document.api_version != POLICY_FILE_VERSION || document.policy != config.policy {
                return Err(Broken::Invalid(format!(
                    "a snapshot of {} ({}), not of {}",
                    document.policy, document.api_version, config.policy
                )));
            }
            let mut clients = ClientStore::default();
            for client in &document.clients {
                let encoded = clients.encode(client).map_err(|e| {
                    Broken::Invalid(format!("revision {revision} does not install: {e}"))
                })?;
                clients.upsert(encoded);
            }
            Following::Receiving {
                revision,
                document,
                clients,
                batches_left: client_batches,
            }
        }
        (
            StreamEvent::Clients {
                revision,
                clients: batch,
            },
            Following::Receiving {
                revision: expected,
                document,
                mut clients,
                batches_left,
            },
        ) if revision == expected && batches_left > 0 => {
            for client in &batch {
                let encoded = clients.encode(client).map_err(|e| {
                    Broken::Invalid(format!("revision {revision} does not install: {e}"))
                })?;
                clients.upsert(encoded);
            }
            Following::Receiving {
                revision,
                document,
                clients,
                batches_left: batches_left - 1,
            }
        }
        (StreamEvent::Change { revision, delta }, Following::Live { revision: previous }) => {
            if revision != previous + 1 {
                return Err(Broken::Invalid(format!(
                    "revision {revision} after {previous}: a change was missed"
                )));
            }
            sidecar
                .apply_change(&delta)
                .map_err(|e| Broken::Invalid(format!("revision {revision} does not apply: {e}")))?;
            tracing::debug!(revision, "policy change from the stream applied");
            return Ok(Following::Live { revision });
        }
        (event, _) => {
            return Err(Broken::Invalid(format!(
                "a {} line out of order",
                event.kind()
            )));
        }
    };
    match receiving {
        Following::Receiving {
            revision,
            document,
            clients,
            batches_left: 0,
        } => {
            let count = clients.len();
            sidecar.install_snapshot(*document, clients).map_err(|e| {
                Broken::Invalid(format!("revision {revision} does not install: {e}"))
            })?;
            tracing::debug!(
                revision,
                clients = count,
                "policy from the stream installed"
            );
            Ok(Following::Live { revision })
        }
        receiving => Ok(receiving),
    }
}
