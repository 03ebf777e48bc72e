//! The admission webhook served over HTTPS with its self-generated certificate, called by a
//! client that trusts only the generated CA; and certificate rotation while clients keep
//! connecting, without restarting the server.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

use base64::Engine;
use keygate::api::{ScopePolicySpec, UpstreamSpec};
use keygate::registry::{ObjectKey, PolicyInput, Snapshot};
use keygate::webhook::tls::{self, CertResolver, Renewal, WebhookCerts};
use keygate::webhook::{InjectConfig, WebhookMetrics, WebhookState, router, serve_tls};
use serde_json::Value;
use tokio::sync::{oneshot, watch};

fn fixture(name: &str) -> String {
    let path = format!(
        "{}/tests/fixtures/admission/{name}",
        env!("CARGO_MANIFEST_DIR")
    );
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn names() -> Vec<String> {
    let mut names = tls::service_names("keygate-webhook", "keygate-system");
    names.extend(["localhost".to_owned(), "127.0.0.1".to_owned()]);
    names
}

struct Server {
    url: String,
    resolver: Arc<CertResolver>,
    certs: WebhookCerts,
    metrics: prometheus_client::registry::Registry,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Server {
    async fn start() -> Self {
        let certs = tls::generate(&names(), SystemTime::now()).unwrap();
        let resolver = CertResolver::from_pem(&certs.tls_crt, &certs.tls_key).unwrap();
        let mut snapshot = Snapshot::default();
        snapshot.policies.insert(
            ObjectKey::new("shop", "orders"),
            PolicyInput {
                spec: ScopePolicySpec {
                    resource: "https://orders.shop.svc".to_owned(),
                    upstream: UpstreamSpec {
                        port: 8080,
                        forward_authorization: false,
                    },
                    ..Default::default()
                },
                created: None,
            },
        );
        let (_tx, rx) = watch::channel(Arc::new(snapshot));
        let mut metrics = prometheus_client::registry::Registry::default();
        let state = WebhookState {
            snapshot: rx,
            inject: Arc::new(InjectConfig::new("ghcr.io/keygate/keygate:0.1.0", "0.1.0")),
            native_sidecars: true,
            metrics: WebhookMetrics::register(&mut metrics),
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn({
            let resolver = resolver.clone();
            async move {
                serve_tls(listener, router(state), resolver, async {
                    let _ = stopped.await;
                })
                .await
                .unwrap();
            }
        });
        Self {
            url: format!("https://localhost:{port}"),
            resolver,
            certs,
            metrics,
            stop: Some(stop),
            task,
        }
    }

    /// The count of admissions by `webhook` and `outcome`, as `/metrics` shows it.
    fn admissions(&self, webhook: &str, outcome: &str) -> u64 {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.metrics).unwrap();
        let series = format!(
            "keygate_webhook_admissions_total{{webhook=\"{webhook}\",outcome=\"{outcome}\"}} "
        );
        text.lines()
            .find_map(|line| line.strip_prefix(&series)?.parse().ok())
            .unwrap_or(0)
    }

    async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        tokio::time::timeout(Duration::from_secs(15), self.task)
            .await
            .expect("the server stops")
            .unwrap();
    }
}

/// A client that trusts only `ca_pem`.
fn client(ca_pem: &str, pooled: bool) -> reqwest::Client {
    let mut builder = reqwest::Client::builder()
        .no_proxy()
        .tls_info(true)
        .tls_certs_only([reqwest::Certificate::from_pem(ca_pem.as_bytes()).unwrap()]);
    if !pooled {
        builder = builder.pool_max_idle_per_host(0);
    }
    builder.build().unwrap()
}

async fn post(http: &reqwest::Client, url: &str, body: String) -> (u16, Value, Vec<u8>) {
    let response = http
        .post(url)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let peer = response
        .extensions()
        .get::<reqwest::tls::TlsInfo>()
        .and_then(|info| info.peer_certificate())
        .map(<[u8]>::to_vec)
        .unwrap_or_default();
    let review: Value = response.json().await.unwrap();
    (status, review, peer)
}

fn der(pem_text: &str) -> Vec<u8> {
    pem::parse(pem_text).unwrap().contents().to_vec()
}

#[tokio::test]
async fn injects_and_validates_over_https_trusting_only_the_generated_ca() {
    let server = Server::start().await;
    let http = client(&server.certs.ca_crt, true);

    let body = fixture("pod-inject.json");
    let (status, review, peer) =
        post(&http, &format!("{}/mutate-pods", server.url), body.clone()).await;
    assert_eq!(status, 200);
    assert_eq!(peer, der(&server.certs.tls_crt));
    assert_eq!(review["apiVersion"], "admission.k8s.io/v1");
    assert_eq!(review["kind"], "AdmissionReview");
    let response = &review["response"];
    assert_eq!(response["uid"], "705ab4f5-6393-11e8-b7cc-42010a800002");
    assert_eq!(response["allowed"], true);
    assert_eq!(response["patchType"], "JSONPatch");
    let patch = base64::engine::general_purpose::STANDARD
        .decode(response["patch"].as_str().expect("a base64 patch"))
        .unwrap();
    let patch: json_patch::Patch = serde_json::from_slice(&patch).unwrap();
    let request: Value = serde_json::from_str(&body).unwrap();
    let mut pod = request["request"]["object"].clone();
    json_patch::patch(&mut pod, &patch.0).unwrap();
    assert_eq!(pod["spec"]["initContainers"][0]["name"], "keygate-capture");
    assert_eq!(pod["spec"]["initContainers"][1]["name"], "keygate-sidecar");
    assert_eq!(pod["spec"]["initContainers"][1]["restartPolicy"], "Always");
    assert_eq!(
        pod["metadata"]["annotations"]["keygate.dev/injected"],
        "0.1.0"
    );

    // Unlabelled: allowed, no patch.
    let (status, review, _) = post(
        &http,
        &format!("{}/mutate-pods", server.url),
        fixture("pod-no-label.json"),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(review["response"]["allowed"], true);
    assert!(review["response"].get("patch").is_none());

    // A missing ScopePolicy: denied with the message.
    let (_, review, _) = post(
        &http,
        &format!("{}/mutate-pods", server.url),
        fixture("pod-missing-policy.json"),
    )
    .await;
    assert_eq!(review["response"]["allowed"], false);
    let message = review["response"]["status"]["message"].as_str().unwrap();
    assert!(message.contains("ScopePolicy shop/payments"), "{message}");

    // An invalid ScopePolicy: denied naming the rules.
    let (status, review, _) = post(
        &http,
        &format!("{}/validate", server.url),
        fixture("scopepolicy-invalid-rule.json"),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(
        review["response"]["uid"],
        "7c5b3a19-e8d6-4f42-b0a9-8e7d6c5b4a39"
    );
    assert_eq!(review["response"]["allowed"], false);
    let message = review["response"]["status"]["message"].as_str().unwrap();
    assert!(
        message.contains("spec.rules[2]") && message.contains("spec.rules[3]"),
        "{message}"
    );

    // A client that trusts another CA (or the public roots) cannot connect.
    let other = tls::generate(&names(), SystemTime::now()).unwrap();
    let stranger = client(&other.ca_crt, false);
    assert!(
        stranger
            .post(format!("{}/validate", server.url))
            .body("{}")
            .send()
            .await
            .is_err()
    );
    let public = reqwest::Client::builder().no_proxy().build().unwrap();
    assert!(
        public
            .post(format!("{}/validate", server.url))
            .body("{}")
            .send()
            .await
            .is_err()
    );

    // keygate_webhook_admissions_total counts each answer once; refused handshakes none.
    assert_eq!(server.admissions("mutating", "allowed"), 2);
    assert_eq!(server.admissions("mutating", "denied"), 1);
    assert_eq!(server.admissions("validating", "denied"), 1);
    assert_eq!(server.admissions("validating", "allowed"), 0);
    assert_eq!(server.admissions("mutating", "error"), 0);

    server.stop().await;
}

#[tokio::test]
async fn malformed_bodies_get_200_and_an_invalid_review() {
    let server = Server::start().await;
    let http = client(&server.certs.ca_crt, true);
    for path in ["/mutate-pods", "/validate"] {
        for body in [
            fixture("malformed.json"),
            String::new(),
            "not json".to_owned(),
            "{\"apiVersion\":\"v1\"}".to_owned(),
        ] {
            let (status, review, _) = post(&http, &format!("{}{path}", server.url), body).await;
            assert_eq!(status, 200, "{path}");
            assert_eq!(review["kind"], "AdmissionReview");
            assert_eq!(review["response"]["allowed"], false);
            assert_eq!(review["response"]["status"]["reason"], "InvalidRequest");
        }
    }
    assert_eq!(server.admissions("mutating", "error"), 4);
    assert_eq!(server.admissions("validating", "error"), 4);
    assert_eq!(server.admissions("validating", "denied"), 0);
    server.stop().await;
}

#[tokio::test]
async fn certificates_rotate_while_clients_keep_connecting() {
    let server = Server::start().await;
    let url = format!("{}/validate", server.url);
    let body = fixture("scopepolicy-valid.json");

    // A pooled client keeps one connection open across every swap.
    let pooled = client(&server.certs.ca_crt, true);
    let (_, review, first_peer) = post(&pooled, &url, body.clone()).await;
    assert_eq!(review["response"]["allowed"], true);
    assert_eq!(first_peer, der(&server.certs.tls_crt));

    // Fresh connections (no pooling) in a loop while the leaf is renewed from the same CA.
    let running = Arc::new(AtomicBool::new(true));
    let successes = Arc::new(AtomicUsize::new(0));
    let background = tokio::spawn({
        let (running, successes) = (running.clone(), successes.clone());
        let (url, body, ca) = (url.clone(), body.clone(), server.certs.ca_crt.clone());
        async move {
            let mut peers = std::collections::BTreeSet::new();
            while running.load(Ordering::SeqCst) {
                // A new client each time: a new TCP connection and TLS handshake.
                let (status, review, peer) = post(&client(&ca, false), &url, body.clone()).await;
                assert_eq!(status, 200);
                assert_eq!(review["response"]["allowed"], true);
                peers.insert(peer);
                successes.fetch_add(1, Ordering::SeqCst);
            }
            peers
        }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    // Renewal (forced now by a renewal window as long as the leaf's life): same CA, new leaf.
    let (renewed, renewal) = tls::ensure(
        Some(&server.certs),
        &names(),
        SystemTime::now(),
        tls::LEAF_VALIDITY,
    )
    .unwrap();
    assert_eq!(renewal, Renewal::NewLeaf);
    server
        .resolver
        .swap(&renewed.tls_crt, &renewed.tls_key)
        .unwrap();
    let before_swap = successes.load(Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(300)).await;
    running.store(false, Ordering::SeqCst);
    let peers = background.await.unwrap();
    assert!(before_swap > 0 && successes.load(Ordering::SeqCst) > before_swap);
    assert!(
        peers.contains(&der(&server.certs.tls_crt)),
        "the old leaf was served"
    );
    assert!(
        peers.contains(&der(&renewed.tls_crt)),
        "the new leaf was served"
    );

    // A new connection now gets the new leaf.
    let (_, _, peer) = post(&client(&server.certs.ca_crt, false), &url, body.clone()).await;
    assert_eq!(peer, der(&renewed.tls_crt));

    // A whole new CA: clients that trust only the old CA cannot make new connections, clients
    // given the new CA can, and the connection opened before every swap still works.
    let fresh_ca = tls::generate(&names(), SystemTime::now()).unwrap();
    server
        .resolver
        .swap(&fresh_ca.tls_crt, &fresh_ca.tls_key)
        .unwrap();
    assert!(
        client(&server.certs.ca_crt, false)
            .post(&url)
            .body(body.clone())
            .send()
            .await
            .is_err()
    );
    let (status, _, peer) = post(&client(&fresh_ca.ca_crt, false), &url, body.clone()).await;
    assert_eq!(status, 200);
    assert_eq!(peer, der(&fresh_ca.tls_crt));
    let (status, review, peer) = post(&pooled, &url, body.clone()).await;
    assert_eq!(status, 200, "the existing connection survives the swaps");
    assert_eq!(review["response"]["allowed"], true);
    assert_eq!(peer, first_peer);

    // A bad certificate is refused and the current one stays.
    assert!(
        server
            .resolver
            .swap(&fresh_ca.tls_crt, &server.certs.tls_key)
            .is_err()
    );
    let (_, _, peer) = post(&client(&fresh_ca.ca_crt, false), &url, body).await;
    assert_eq!(peer, der(&fresh_ca.tls_crt));

    server.stop().await;
}
