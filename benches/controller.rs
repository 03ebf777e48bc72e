//! Controller benchmark: how long N ApiClients take to get their Secrets and `Ready` against
//! the in-process API server of the tests, the API writes per object, the writes during an
//! idle period (must be zero) and the operator's peak RSS. The operator runs as a separate
//! `keygate operator` process (release build) pointed at the in-process server through a
//! kubeconfig, so its memory is measured alone.
//!
//! `cargo bench --bench controller -- [N ...]` (default 1000); `bench/controller.sh` runs
//! 1,000 and 10,000 and writes the results into docs/BENCHMARKS.md.
//!
//! Then, with the operator still running, the policy stream (issue #16): `KEYGATE_FOLLOWERS`
//! followers (default 1,000) each hold a stream of the ScopePolicy, as sidecars would; the
//! bench creates ApiClients one at a time and measures, for every follower, the time from the
//! API write to the line that brings the new client, and the bytes of that line.
//! `KEYGATE_FOLLOWERS=0` skips this part (to profile the operator's convergence alone).

#[path = "../tests/support/apiserver.rs"]
mod apiserver;
#[path = "../tests/support/operator.rs"]
mod support;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use apiserver::FakeApiServer;
use keygate::api::ApiClient;
use kube::api::{ListParams, Patch, PatchParams};
use kube::{Api, Client};
use serde_json::json;

const NS: &str = "bench";

fn kubeconfig(url: &str, path: &std::path::Path) {
    let text = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster: {{server: \"{url}\"}}\ncontexts:\n- name: fake\n  context: {{cluster: fake, user: fake, namespace: {NS}}}\ncurrent-context: fake\nusers:\n- name: fake\n  user: {{}}\n"
    );
    std::fs::write(path, text).expect("kubeconfig");
}

use support::free_port;

/// A `/proc/PID/status` field in KiB: `VmHWM` (peak resident size) or `VmRSS` (now).
fn proc_status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.strip_prefix(field).is_some_and(|r| r.starts_with(':')))
                .map(str::to_owned)
        })
        .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        .unwrap_or(0)
}

fn status_kib(child: &Child, field: &str) -> u64 {
    proc_status_kib(child.id(), field)
}

fn peak_rss_kib(child: &Child) -> u64 {
    status_kib(child, "VmHWM")
}

async fn apply_objects(client: &Client, n: usize) {
    let pp = PatchParams::apply("bench").force();
    let policies: Api<keygate::api::ScopePolicy> = Api::namespaced(client.clone(), NS);
    let policy: keygate::api::ScopePolicy = serde_json::from_value(json!({
        "apiVersion": "keygate.dev/v1alpha1", "kind": "ScopePolicy", "metadata": {"name": "orders", "namespace": NS},
        "spec": {"resource": support::ORDERS, "scopes": [{"name": "orders.read"}],
                 "rules": [{"name": "read", "methods": ["GET"], "paths": ["/orders/**"], "requireScopes": {"anyOf": ["orders.read"]}}]}
    }))
    .expect("policy");
    policies
        .patch("orders", &pp, &Patch::Apply(&policy))
        .await
        .expect("policy");
    let roles: Api<keygate::api::M2MRole> = Api::namespaced(client.clone(), NS);
    let role: keygate::api::M2MRole = serde_json::from_value(json!({
        "apiVersion": "keygate.dev/v1alpha1", "kind": "M2MRole", "metadata": {"name": "reader", "namespace": NS},
        "spec": {"permissions": [{"resource": support::ORDERS, "scopes": ["orders.read"]}]}
    }))
    .expect("role");
    roles
        .patch("reader", &pp, &Patch::Apply(&role))
        .await
        .expect("role");
    let clients: Api<ApiClient> = Api::namespaced(client.clone(), NS);
    for i in 0..n {
        let name = format!("client-{i:05}");
        let object: ApiClient = serde_json::from_value(json!({
            "apiVersion": "keygate.dev/v1alpha1", "kind": "ApiClient", "metadata": {"name": name, "namespace": NS},
            "spec": {"roles": ["reader"]}
        }))
        .expect("client");
        clients
            .patch(&name, &pp, &Patch::Apply(&object))
            .await
            .expect("client");
    }
}

async fn ready_count(client: &Client) -> usize {
    let clients: Api<ApiClient> = Api::namespaced(client.clone(), NS);
    clients
        .list(&ListParams::default())
        .await
        .map(|l| {
            l.items
                .iter()
                .filter(|c| {
                    c.status
                        .as_ref()
                        .is_some_and(|s| keygate::api::is_ready(&s.conditions))
                })
                .count()
        })
        .unwrap_or(0)
}

/// Where the ScopePolicy stands: its policy file published for all `n` clients (with the
/// ConfigMap's size), refused as too large for a ConfigMap, or not there yet.
async fn policy_state(client: &Client, server: &FakeApiServer, n: usize) -> Option<String> {
    let policies: Api<keygate::api::ScopePolicy> = Api::namespaced(client.clone(), NS);
    let status = policies.get("orders").await.ok()?.status?;
    let reason = status.conditions.first().map(|c| c.reason.clone())?;
    if reason == "PolicyTooLarge" {
        return Some("over the 1 MiB ConfigMap limit: refused (`PolicyTooLarge`)".into());
    }
    if usize::try_from(status.clients).ok()? != n {
        return None;
    }
    let map = server.object("configmaps", NS, "orders-keygate-policy")?;
    let bytes = map["data"]["policy.json"].as_str()?.len();
    Some(format!("{:.0} KiB", bytes as f64 / 1024.0))
}

async fn run(n: usize, binary: &str) {
    let server = FakeApiServer::start().await;
    let client = server.client();
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("kubeconfig");
    kubeconfig(&server.url(), &config);
    let applying = Instant::now();
    apply_objects(&client, n).await;
    eprintln!(
        "applied {n} ApiClients in {:.1} s",
        applying.elapsed().as_secs_f64()
    );
    server.reset_counters();
    let started = Instant::now();
    let (policy_port, token_port) = (free_port(), free_port());
    let mut operator = Command::new(binary)
        .args([
            "operator",
            "--namespace",
            NS,
            "--watch-namespaces",
            NS,
            "--webhook-tls",
            "none",
        ])
        .arg(format!("--token-listen=127.0.0.1:{token_port}"))
        // Tokens are asked for at this address, so it is the issuer (and in the certificate).
        .arg(format!("--issuer=https://127.0.0.1:{token_port}"))
        .arg(format!("--policy-listen=127.0.0.1:{policy_port}"))
        .arg(format!("--admin=127.0.0.1:{}", free_port()))
        .env("KUBECONFIG", &config)
        .env("KEYGATE_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .expect("keygate operator starts");
    let mut peak = 0;
    let mut reported = Instant::now();
    let policy = loop {
        peak = peak.max(peak_rss_kib(&operator));
        let ready = ready_count(&client).await;
        if ready == n
            && let Some(state) = policy_state(&client, &server, n).await
        {
            break state;
        }
        if reported.elapsed() >= Duration::from_secs(10) {
            reported = Instant::now();
            eprintln!(
                "{:>5.0} s: {ready}/{n} Ready, RSS {:.1} MiB",
                started.elapsed().as_secs_f64(),
                peak_rss_kib(&operator) as f64 / 1024.0
            );
        }
        if started.elapsed() > Duration::from_secs(1800) {
            let _ = operator.kill();
            panic!("{n} ApiClients did not converge in 30 minutes");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let converged = started.elapsed();
    let writes = server.effective_writes();
    let secrets = server.objects("secrets", Some(NS)).len();
    server.reset_counters();
    tokio::time::sleep(Duration::from_secs(10)).await;
    let idle: Vec<_> = server
        .write_log()
        .into_iter()
        .filter(|w| w.changed && w.resource != "leases")
        .collect();
    if !idle.is_empty() {
        let mut kinds = std::collections::BTreeMap::new();
        for w in &idle {
            *kinds
                .entry(format!(
                    "{} {}{}",
                    w.method,
                    w.resource,
                    if w.subresource.is_empty() {
                        String::new()
                    } else {
                        format!("/{}", w.subresource)
                    }
                ))
                .or_insert(0) += 1;
        }
        eprintln!("writes while idle: {kinds:?}");
    }
    peak = peak.max(peak_rss_kib(&operator));
    let settled = status_kib(&operator, "VmRSS");
    let stream = follow_stream(
        &server,
        &client,
        policy_port,
        token_port,
        n,
        &operator,
        binary,
    )
    .await;
    let _ = operator.kill();
    let _ = operator.wait();
    println!(
        "| {n} | {:.1} s | {secrets} | {:.2} | {} | {:.1} MiB | {:.1} MiB | {policy} |",
        converged.as_secs_f64(),
        writes as f64 / n as f64,
        idle.len(),
        peak as f64 / 1024.0,
        settled as f64 / 1024.0
    );
    STREAM_ROWS.lock().expect("rows").push(stream);
}

static STREAM_ROWS: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());
static SIDECAR_ROWS: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());

/// How many ApiClients the stream measurement creates, uses, revokes a token of and takes
/// the role of, one at a time.
const CHANGES: usize = 5;

/// The latency quantiles of `samples` in milliseconds: p50, p99, max.
fn quantiles(samples: &mut [Duration]) -> [f64; 3] {
    samples.sort();
    [0.5, 0.99, 1.0].map(|q| {
        let i = ((samples.len() as f64 * q).ceil() as usize).clamp(1, samples.len()) - 1;
        samples[i].as_secs_f64() * 1000.0
    })
}

/// A line a follower read: which follower, when, and the line.
type Read = (usize, Instant, String);

/// Waits until every follower has read a line containing `wanted`; returns, for each, the
/// time from `since` to that line, and the line's length.
async fn followers_read(
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<Read>,
    followers: usize,
    wanted: &str,
    since: Instant,
) -> Vec<(Duration, usize)> {
    let mut seen = vec![false; followers];
    let mut found = Vec::with_capacity(followers);
    while found.len() < followers {
        let (follower, at, line) = tokio::time::timeout(Duration::from_secs(120), rx.recv())
            .await
            .unwrap_or_else(|_| panic!("every follower reads {wanted} within 2 minutes"))
            .expect("followers");
        if !seen[follower] && line.contains(wanted) {
            seen[follower] = true;
            found.push((at.duration_since(since), line.len()));
        }
    }
    found
}

/// A `keygate-sidecar` process following the stream, with an upstream that answers 200.
struct Sidecar {
    _process: support::SidecarProcess,
    pid: u32,
    url: String,
    metrics: String,
    http: reqwest::Client,
    _files: support::FollowerSetup,
}

impl Sidecar {
    /// Starts a sidecar whose policy file is `policy` (the ConfigMap as the kubelet would
    /// mount it), following the stream at 127.0.0.1:`policy_port` under the TLS name
    /// `server_name`.
    async fn start(
        binary: &str,
        policy: &str,
        policy_port: u16,
        server_name: &str,
        token: &str,
        ca: &str,
    ) -> Self {
        let files = support::FollowerSetup::new(policy, ca, token).await;
        let (listen, admin) = (free_port(), free_port());
        // The executable the webhook injects, built beside `keygate` (`keygate sidecar` runs
        // the same code from the whole CLI's larger binary).
        let executable = std::path::Path::new(binary).with_file_name("keygate-sidecar");
        assert!(
            executable.exists(),
            "{} is missing: cargo build --release",
            executable.display()
        );
        let process = Command::new(executable)
            .arg("--policy")
            .arg(&files.policy)
            .args(["--listen", &format!("127.0.0.1:{listen}")])
            .args(["--upstream", &files.upstream.to_string()])
            .args(["--admin", &format!("127.0.0.1:{admin}")])
            .args([
                "--policy-server",
                &format!("https://127.0.0.1:{policy_port}"),
            ])
            .args(["--policy-server-name", server_name])
            .arg("--token-file")
            .arg(&files.token)
            .arg("--ca-file")
            .arg(&files.ca)
            .env("KEYGATE_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .expect("keygate sidecar starts");
        Self {
            pid: process.id(),
            _process: support::SidecarProcess(process),
            url: format!("http://127.0.0.1:{listen}/orders/1"),
            metrics: format!("http://127.0.0.1:{admin}/metrics"),
            http: reqwest::Client::new(),
            _files: files,
        }
    }

    /// Waits until the stream's snapshot with `n` clients is in force.
    async fn live_with(&self, n: usize) {
        let wanted = format!("keygate_sidecar_policy_clients {n}\n");
        loop {
            if let Ok(response) = self.http.get(&self.metrics).send().await
                && let Ok(text) = response.text().await
                && text.contains("keygate_sidecar_policy_stream_up 1\n")
                && text.contains(&wanted)
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn status_kib(&self, field: &str) -> u64 {
        proc_status_kib(self.pid, field)
    }

    async fn status_with(&self, token: &str) -> u16 {
        self.http
            .get(&self.url)
            .bearer_auth(token)
            .send()
            .await
            .map(|r| r.status().as_u16())
            .unwrap_or(0)
    }

    /// Asks every 5 ms until the answer to `token` is `status`; returns when it was.
    async fn until(&self, token: &str, status: u16) -> Instant {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if self.status_with(token).await == status {
                return Instant::now();
            }
            assert!(
                Instant::now() < deadline,
                "the sidecar never answered {status}"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

/// The policy stream with many followers and one real sidecar. Followers are plain HTTPS
/// readers, as many as sidecars would be; for each of [`CHANGES`] ApiClients: the time from
/// creating it to each follower's line that brings it and to the sidecar's first 200 for its
/// first token; from a revocation's answer to each follower's line and to the sidecar's 401;
/// from taking its role away to each follower's line and to the sidecar's 401. Also the
/// bytes per change, the snapshot, and the sidecar's RSS with every client.
async fn follow_stream(
    server: &FakeApiServer,
    client: &Client,
    policy_port: u16,
    token_port: u16,
    n: usize,
    operator: &Child,
    binary: &str,
) -> String {
    let followers: usize = std::env::var("KEYGATE_FOLLOWERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    if followers == 0 {
        return format!("| {n} | 0 | not measured (`KEYGATE_FOLLOWERS=0`) | | | | |");
    }
    let token = server.service_account_token(NS, "bench", &["keygate"]);
    let ca = loop {
        if let Some(ca) = server
            .object("configmaps", NS, "keygate-ca")
            .and_then(|cm| cm["data"]["ca.crt"].as_str().map(str::to_owned))
        {
            break ca;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };

    // The sidecar first, alone: its time to install every client and its memory.
    let starting = Instant::now();
    // The bootstrap: the ConfigMap (without its clients when there are too many for one).
    let map = server
        .object("configmaps", NS, "orders-keygate-policy")
        .expect("the policy ConfigMap");
    let policy = map["data"]["policy.json"].as_str().expect("policy");
    let server_name = format!("keygate.{NS}.svc");
    let sidecar = Sidecar::start(binary, policy, policy_port, &server_name, &token, &ca).await;
    sidecar.live_with(n).await;
    let installed = starting.elapsed();
    tokio::time::sleep(Duration::from_secs(1)).await;
    SIDECAR_ROWS.lock().expect("rows").push(format!(
        "| {n} | {:.1} s | {:.1} MiB | {:.1} MiB |",
        installed.as_secs_f64(),
        sidecar.status_kib("VmRSS") as f64 / 1024.0,
        sidecar.status_kib("VmHWM") as f64 / 1024.0,
    ));

    // The certificate names the token Service, as in a cluster: connect to 127.0.0.1 under
    // that name (what `keygate-sidecar --policy-server-name` does).
    let host = format!("keygate.{NS}.svc");
    let address = std::net::SocketAddr::from(([127, 0, 0, 1], policy_port));
    let url = format!("https://{host}:{policy_port}/v1/policies/{NS}/orders");
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Read>();
    for follower in 0..followers {
        let (tx, url, token, ca, host) = (
            tx.clone(),
            url.clone(),
            token.clone(),
            ca.clone(),
            host.clone(),
        );
        tokio::spawn(async move {
            let roots = reqwest::Certificate::from_pem_bundle(ca.as_bytes()).expect("CA");
            // One connection per follower, as one per sidecar.
            let http = reqwest::Client::builder()
                .tls_certs_only(roots)
                .http1_only()
                .resolve(&host, address)
                .build()
                .expect("client");
            // Retried like a sidecar would, if the server is busy checking tokens.
            let mut response = loop {
                let response = http
                    .get(&url)
                    .bearer_auth(&token)
                    .send()
                    .await
                    .expect("the policy stream");
                if response.status() != 503 {
                    break response;
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            };
            assert_eq!(response.status(), 200, "follower {follower}");
            let mut buffer = Vec::new();
            while let Ok(Some(chunk)) = response.chunk().await {
                let now = Instant::now();
                buffer.extend_from_slice(&chunk);
                while let Some(end) = buffer.iter().position(|b| *b == b'\n') {
                    let line: Vec<u8> = buffer.drain(..=end).collect();
                    let _ = tx.send((follower, now, String::from_utf8_lossy(&line).into_owned()));
                }
            }
        });
    }
    drop(tx);
    // Subscribed once each has read the snapshot's last line (its document, or the last
    // batch of its clients).
    let mut snapshot_bytes = 0;
    let mut subscribed = 0;
    let mut batches_left = vec![None::<usize>; followers];
    while subscribed < followers {
        let (follower, _, line) = rx.recv().await.expect("followers");
        let event: serde_json::Value = serde_json::from_str(&line).expect("a JSON line");
        let left = match event["type"].as_str() {
            Some("snapshot") => event["clientBatches"].as_u64().unwrap_or(0) as usize,
            Some("clients") => batches_left[follower].expect("a snapshot first") - 1,
            _ => continue,
        };
        if follower == 0 {
            snapshot_bytes += line.len();
        }
        batches_left[follower] = Some(left);
        if left == 0 {
            subscribed += 1;
        }
    }
    let rss_streaming = status_kib(operator, "VmRSS");

    let https = support::client_trusting(&ca);
    let token_url = format!("https://127.0.0.1:{token_port}/oauth2/token");
    let revoke_url = format!("https://127.0.0.1:{token_port}/oauth2/revoke");
    let pp = PatchParams::apply("bench").force();
    let clients: Api<ApiClient> = Api::namespaced(client.clone(), NS);
    let secrets: Api<k8s_openapi::api::core::v1::Secret> = Api::namespaced(client.clone(), NS);
    let (mut created, mut revoked, mut unroled) = (Vec::new(), Vec::new(), Vec::new());
    let (mut sidecar_created, mut sidecar_revoked, mut sidecar_unroled) =
        (Vec::new(), Vec::new(), Vec::new());
    let mut bytes = Vec::new();
    let apply = |name: String, roles: &'static [&'static str]| {
        let object: ApiClient = serde_json::from_value(json!({
            "apiVersion": "keygate.dev/v1alpha1", "kind": "ApiClient", "metadata": {"name": name, "namespace": NS},
            "spec": {"roles": roles}
        }))
        .expect("client");
        let (clients, pp) = (clients.clone(), pp.clone());
        async move {
            clients
                .patch(&name, &pp, &Patch::Apply(&object))
                .await
                .expect("client")
        }
    };
    for k in 0..CHANGES {
        let name = format!("stream-{k}");
        // 1. A new ApiClient: its first token is asked for as soon as its Secret is there.
        let written = Instant::now();
        apply(name.clone(), &["reader"]).await;
        let deadline = written + Duration::from_secs(120);
        let (id, first) = loop {
            assert!(
                Instant::now() < deadline,
                "no token for {name} within 2 minutes"
            );
            if let Ok(Some(secret)) = secrets.get_opt(&format!("{name}-credentials")).await {
                let data = support::secret_data(&secret);
                if let Some(token) = support::access_token(
                    &https,
                    &token_url,
                    &data["client_id"],
                    &data["client_secret"],
                )
                .await
                {
                    break (
                        (data["client_id"].clone(), data["client_secret"].clone()),
                        token,
                    );
                }
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        sidecar_created.push(sidecar.until(&first, 200).await.duration_since(written));
        let seen = followers_read(
            &mut rx,
            followers,
            &format!("\"name\":\"{NS}/{name}\""),
            written,
        )
        .await;
        bytes.extend(seen.iter().map(|(_, b)| *b));
        created.extend(seen.into_iter().map(|(d, _)| d));
        let second = support::access_token(&https, &token_url, &id.0, &id.1)
            .await
            .expect("a second token");

        // 2. The first token revoked.
        let answer = https
            .post(&revoke_url)
            .basic_auth(&id.0, Some(&id.1))
            .form(&[("token", first.as_str())])
            .send()
            .await
            .expect("revoke");
        assert_eq!(answer.status(), 200);
        let answered = Instant::now();
        sidecar_revoked.push(sidecar.until(&first, 401).await.duration_since(answered));
        let jti = support::jwt::jti_of(&first);
        let seen = followers_read(&mut rx, followers, &jti, answered).await;
        revoked.extend(seen.into_iter().map(|(d, _)| d));

        // 3. Its role taken away: the second token is refused too.
        let written = Instant::now();
        apply(name.clone(), &[]).await;
        sidecar_unroled.push(sidecar.until(&second, 401).await.duration_since(written));
        let seen = followers_read(
            &mut rx,
            followers,
            &format!("\"removeClients\":[\"{}\"", id.0),
            written,
        )
        .await;
        unroled.extend(seen.into_iter().map(|(d, _)| d));
    }
    let row = |what: &str, followed: &mut Vec<Duration>, at_sidecar: &mut Vec<Duration>| {
        let [p50, p99, max] = quantiles(followed);
        let [s50, _, smax] = quantiles(at_sidecar);
        format!(
            "| {n} | {followers} | {what} | {p50:.0} ms | {p99:.0} ms | {max:.0} ms | {s50:.0} ms (max {smax:.0} ms) |"
        )
    };
    bytes.sort();
    [
        row("ApiClient created (API write →)", &mut created, &mut sidecar_created),
        row("token revoked (200 answered →)", &mut revoked, &mut sidecar_revoked),
        row("role taken away (API write →)", &mut unroled, &mut sidecar_unroled),
        format!(
            "| {n} | {followers} | bytes per new client {} B; snapshot {:.0} KiB; operator RSS while streaming {:.1} MiB | | | | |",
            bytes[bytes.len() / 2],
            snapshot_bytes as f64 / 1024.0,
            rss_streaming as f64 / 1024.0,
        ),
    ]
    .join("\n")
}

/// The sidecar alone at `n` clients (issue #16 asks for 100,000, more than the in-process
/// API server can make an operator generate in reasonable time): a stream server in this
/// process serves one snapshot of `n` clients, each with its own P-256 public key (drawn
/// from 1,000 generated ones: the sidecar keeps each client's copy, so memory is the same as
/// with `n` distinct keys), in the stream's wire format; a `keygate sidecar` process starts
/// from the client-less policy file and follows it. Its time until every client is in force
/// and its RSS are measured.
async fn sidecar_memory(n: usize, binary: &str) -> String {
    use keygate::policy::PolicyDocument;
    use keygate::policy::document::{PolicyClient, PolicyKey};
    use keygate::policy::stream::StreamEvent;
    let mut document =
        PolicyDocument::parse(include_bytes!("../tests/fixtures/policy.json")).expect("fixture");
    let keys: Vec<_> = (0..1000)
        .map(|_| {
            keygate::credentials::generate_key_pair(keygate::api::KeyAlgorithm::ES256)
                .expect("a key pair")
        })
        .collect();
    let scopes = document.clients[0].scopes.clone();
    document.clients = (0..n)
        .map(|i| {
            let key = &keys[i % keys.len()];
            PolicyClient {
                client_id: format!("kgc_{i:032x}"),
                name: format!("bench/client-{i:06}"),
                scopes: scopes.clone(),
                keys: vec![PolicyKey {
                    fingerprint: key.fingerprint.clone(),
                    public_key: key.public_pem.clone(),
                    not_after: None,
                }],
                api_keys: Vec::new(),
            }
        })
        .collect();
    let mut cold_start = document.without_clients();
    cold_start.clients_omitted = true;
    let file = serde_json::to_string(&cold_start).expect("policy file");
    let mut snapshot = Vec::new();
    for line in StreamEvent::snapshot_lines(1, &document) {
        serde_json::to_writer(&mut snapshot, &line).expect("a line");
        snapshot.push(b'\n');
    }
    let snapshot = axum::body::Bytes::from(snapshot);
    let snapshot_bytes = snapshot.len();
    drop(document);

    let name = "policy.bench.svc".to_owned();
    let certs = keygate::tls::generate(
        "bench CA",
        std::slice::from_ref(&name),
        std::time::SystemTime::now(),
    )
    .expect("certificates");
    let resolver =
        keygate::tls::CertResolver::from_pem(&certs.tls_crt, &certs.tls_key).expect("resolver");
    // The snapshot, then nothing: the stream stays open, as a quiet one does.
    let router = axum::Router::new().fallback(move || {
        let first = futures::stream::once(std::future::ready(Ok::<_, std::convert::Infallible>(
            snapshot.clone(),
        )));
        async move {
            use futures::StreamExt;
            axum::body::Body::from_stream(first.chain(futures::stream::pending()))
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    tokio::spawn(keygate::tls::serve_tls_with_limits(
        listener,
        router,
        resolver,
        keygate::connections::ConnectionLimits::default(),
        std::future::pending(),
    ));
    let starting = Instant::now();
    let sidecar = Sidecar::start(binary, &file, port, &name, "a.b.c", &certs.ca_crt).await;
    sidecar.live_with(n).await;
    let installed = starting.elapsed();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mib = |field: &str| sidecar.status_kib(field) as f64 / 1024.0;
    format!(
        "| {n} | {:.0} KiB | {:.1} s | {:.1} MiB ({:.1} MiB anonymous, {:.1} MiB of mapped files) | {:.1} MiB |",
        snapshot_bytes as f64 / 1024.0,
        installed.as_secs_f64(),
        mib("VmRSS"),
        mib("RssAnon"),
        mib("RssFile"),
        mib("VmHWM"),
    )
}

fn main() {
    // `cargo test --all-targets` runs bench targets without `--bench`: nothing to measure then.
    if !std::env::args().any(|a| a == "--bench") {
        println!(
            "controller benchmark: run with `cargo bench --bench controller` or bench/controller.sh"
        );
        return;
    }
    let counts: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let counts = if counts.is_empty() {
        vec![1000]
    } else {
        counts
    };
    let binary = std::env::var("KEYGATE_BIN")
        .unwrap_or_else(|_| concat!(env!("CARGO_MANIFEST_DIR"), "/target/release/keygate").into());
    assert!(
        std::path::Path::new(&binary).exists(),
        "build the operator first: cargo build --release (or set KEYGATE_BIN)"
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    if std::env::args().any(|a| a == "--sidecar-memory") {
        println!(
            "| clients | snapshot | sidecar start → every client in force | sidecar RSS | sidecar peak RSS |"
        );
        println!("|---|---|---|---|---|");
        for n in counts {
            println!("{}", runtime.block_on(sidecar_memory(n, &binary)));
        }
        return;
    }
    println!(
        "| ApiClients | to all Ready | Secrets | writes per ApiClient | writes while idle (10 s) | operator peak RSS | operator RSS after the idle 10 s | policy file |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for n in counts {
        runtime.block_on(run(n, &binary));
    }
    println!();
    println!(
        "| ApiClients | policy stream followers | change | → follower p50 | p99 | max | → sidecar decision p50 |"
    );
    println!("|---|---|---|---|---|---|---|");
    for row in STREAM_ROWS.lock().expect("rows").iter() {
        println!("{row}");
    }
    println!();
    println!(
        "| ApiClients | sidecar start → every client installed from the stream | sidecar RSS | sidecar peak RSS |"
    );
    println!("|---|---|---|---|");
    for row in SIDECAR_ROWS.lock().expect("rows").iter() {
        println!("{row}");
    }
}
