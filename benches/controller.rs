//! Controller benchmark: how long N ApiClients take to get their Secrets and `Ready` against
//! the in-process API server of the tests, the API writes per object, the writes during an
//! idle period (must be zero) and the operator's peak RSS. The operator runs as a separate
//! `keygate operator` process (release build) pointed at the in-process server through a
//! kubeconfig, so its memory is measured alone.
//!
//! `cargo bench --bench controller -- [N ...]` (default 1000); `bench/controller.sh` runs
//! 1,000 and 10,000 and writes the results into docs/BENCHMARKS.md.

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
}
