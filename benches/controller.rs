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

#[path = "../tests/support/apiserver.rs"]
mod apiserver;

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

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

/// A `/proc/PID/status` field in KiB: `VmHWM` (peak resident size) or `VmRSS` (now).
fn status_kib(child: &Child, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{}/status", child.id()))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.strip_prefix(field).is_some_and(|r| r.starts_with(':')))
                .map(str::to_owned)
        })
        .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        .unwrap_or(0)
}

fn peak_rss_kib(child: &Child) -> u64 {
    status_kib(child, "VmHWM")
}

async fn apply_objects(client: &Client, n: usize) {
    let pp = PatchParams::apply("bench").force();
    let policies: Api<keygate::api::ScopePolicy> = Api::namespaced(client.clone(), NS);
    let policy: keygate::api::ScopePolicy = serde_json::from_value(json!({
        "apiVersion": "keygate.dev/v1alpha1", "kind": "ScopePolicy", "metadata": {"name": "orders", "namespace": NS},
        "spec": {"resource": "https://orders.bench.svc", "scopes": [{"name": "orders.read"}],
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
        "spec": {"permissions": [{"resource": "https://orders.bench.svc", "scopes": ["orders.read"]}]}
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
    let policy_port = free_port();
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
        .arg(format!("--token-listen=127.0.0.1:{}", free_port()))
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
    let stream = follow_stream(&server, &client, policy_port, n, &operator).await;
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

/// How many new ApiClients the stream measurement creates, one at a time.
const CHANGES: usize = 5;

/// The policy stream with many followers: the time from creating an ApiClient to each
/// follower's line that brings it (p50, p99, max over every follower and change), the bytes
/// of that line, of the snapshot, and the operator's RSS while serving them all.
async fn follow_stream(
    server: &FakeApiServer,
    client: &Client,
    policy_port: u16,
    n: usize,
    operator: &Child,
) -> String {
    let followers: usize = std::env::var("KEYGATE_FOLLOWERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
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
    // The certificate names the token Service, as in a cluster: connect to 127.0.0.1 under
    // that name (what `keygate-sidecar --policy-server-name` does).
    let host = format!("keygate.{NS}.svc");
    let address = std::net::SocketAddr::from(([127, 0, 0, 1], policy_port));
    let url = format!("https://{host}:{policy_port}/v1/policies/{NS}/orders");
    // Each follower sends what it reads, with when it read it: (follower, time, line).
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(usize, Instant, String)>();
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
    let mut snapshot_bytes = 0;
    let mut subscribed = 0;
    while subscribed < followers {
        let (_, _, line) = rx.recv().await.expect("followers");
        if line.starts_with(r#"{"type":"snapshot""#) {
            snapshot_bytes = line.len();
            subscribed += 1;
        }
    }
    let rss_streaming = status_kib(operator, "VmRSS");
    let pp = PatchParams::apply("bench").force();
    let clients: Api<ApiClient> = Api::namespaced(client.clone(), NS);
    let mut latencies = Vec::new();
    let mut change_bytes = Vec::new();
    for k in 0..CHANGES {
        let name = format!("stream-{k}");
        let object: ApiClient = serde_json::from_value(json!({
            "apiVersion": "keygate.dev/v1alpha1", "kind": "ApiClient", "metadata": {"name": name, "namespace": NS},
            "spec": {"roles": ["reader"]}
        }))
        .expect("client");
        let written = Instant::now();
        clients
            .patch(&name, &pp, &Patch::Apply(&object))
            .await
            .expect("client");
        let wanted = format!("\"name\":\"{NS}/{name}\"");
        let mut seen = vec![false; followers];
        let mut left = followers;
        while left > 0 {
            let (follower, at, line) = tokio::time::timeout(Duration::from_secs(120), rx.recv())
                .await
                .expect("every follower sees the new client within 2 minutes")
                .expect("followers");
            if !seen[follower] && line.contains(&wanted) {
                seen[follower] = true;
                left -= 1;
                latencies.push(at.duration_since(written));
                change_bytes.push(line.len());
            }
        }
    }
    latencies.sort();
    let quantile = |q: f64| {
        let i = ((latencies.len() as f64 * q).ceil() as usize).clamp(1, latencies.len()) - 1;
        latencies[i].as_secs_f64() * 1000.0
    };
    change_bytes.sort();
    format!(
        "| {n} | {followers} | {CHANGES} new ApiClients | {:.0} ms | {:.0} ms | {:.0} ms | {} B | {:.0} KiB | {:.1} MiB |",
        quantile(0.5),
        quantile(0.99),
        quantile(1.0),
        change_bytes[change_bytes.len() / 2],
        snapshot_bytes as f64 / 1024.0,
        rss_streaming as f64 / 1024.0,
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
    println!(
        "| ApiClients | to all Ready | Secrets | writes per ApiClient | writes while idle (10 s) | operator peak RSS | operator RSS after the idle 10 s | policy file |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for n in counts {
        runtime.block_on(run(n, &binary));
    }
    println!();
    println!(
        "| ApiClients | policy stream followers | changes | API write → follower p50 | p99 | max | bytes per change | snapshot | operator RSS while streaming |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for row in STREAM_ROWS.lock().expect("rows").iter() {
        println!("{row}");
    }
}
