//! Shared operator scenarios: each runs the real `keygate operator` code against whatever
//! `kube::Client` it is given — the in-process API server (tests/operator.rs) or a real
//! cluster (tests/e2e_cluster.rs) — in a namespace of its own.

#![allow(dead_code)]

#[path = "jwt.rs"]
pub mod jwt;

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use keygate::api::{ApiClient, M2MRole, ScopePolicy};
use keygate::controller::OperatorConfig;
use keygate::controller::leader::LeaderElection;
use keygate::operator::{OperatorOptions, TokenTls, run};
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde_json::json;
use tokio::task::JoinHandle;

pub const ORDERS: &str = "https://orders.shop.svc";

/// A running operator.
pub struct Operator {
    task: JoinHandle<()>,
    pub token_url: String,
    /// `http://127.0.0.1:PORT` of `/healthz`, `/readyz` and `/metrics`.
    pub admin_url: String,
    token_port: u16,
    https: bool,
    /// Set to ask for a graceful shutdown (dropping it asks too).
    stop: tokio::sync::watch::Sender<bool>,
}

impl Operator {
    /// Stops it as SIGTERM would, and waits until it has.
    pub async fn shut_down(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }

    /// Stops it abruptly, as a crash or a node loss would.
    pub fn kill(self) {
        self.task.abort();
    }

    /// The text of its `/metrics`.
    pub async fn metrics(&self) -> String {
        let http = reqwest::Client::builder()
            .no_proxy()
            .build()
            .expect("client");
        http.get(format!("{}/metrics", self.admin_url))
            .send()
            .await
            .expect("a scrape")
            .text()
            .await
            .expect("the metrics text")
    }

    /// Kills it and starts a new one with the same issuer, as a rollout would.
    pub async fn restart(self, client: Client, namespace: &str) -> Operator {
        let (port, https) = (self.token_port, self.https);
        self.task.abort();
        let _ = self.task.await;
        start_operator_on(client, namespace, &[namespace], port, https).await
    }
}

/// A port free now and never handed out before in this test process: tests run in
/// parallel, and a port is bound only some time after it is chosen, so the kernel may offer
/// the same free port to two tests in between.
pub fn free_port() -> u16 {
    static HANDED_OUT: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut handed_out = HANDED_OUT.lock().unwrap_or_else(|p| p.into_inner());
    loop {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .expect("bind")
            .local_addr()
            .expect("addr")
            .port();
        if !handed_out.contains(&port) {
            handed_out.push(port);
            return port;
        }
    }
}

/// Starts the operator watching `namespace` (which also holds its keys and lease).
pub async fn start_operator(client: Client, namespace: &str) -> Operator {
    start_operator_on(client, namespace, &[namespace], free_port(), false).await
}

/// Starts the operator watching `namespace`, its token server on HTTPS with the certificate
/// it keeps itself (issuer `https://127.0.0.1:PORT`, so the certificate names 127.0.0.1).
pub async fn start_operator_https(client: Client, namespace: &str) -> Operator {
    start_operator_on(client, namespace, &[namespace], free_port(), true).await
}

/// Starts the operator with its keys and lease in `namespace`, watching `watch`.
pub async fn start_operator_watching(client: Client, namespace: &str, watch: &[&str]) -> Operator {
    start_operator_on(client, namespace, watch, free_port(), false).await
}

/// The options of an operator with its keys and lease in `namespace`, watching `watch`, its
/// token server on 127.0.0.1:`token_port` with the issuer `https://127.0.0.1:PORT` (or
/// `http://` when `token_tls` is disabled).
pub fn operator_options(
    namespace: &str,
    watch: &[&str],
    token_port: u16,
    token_tls: TokenTls,
) -> OperatorOptions {
    let scheme = if token_tls == TokenTls::Disabled {
        "http"
    } else {
        "https"
    };
    OperatorOptions {
        config: OperatorConfig {
            namespace: namespace.to_owned(),
            issuer: format!("{scheme}://127.0.0.1:{token_port}"),
            watch_namespaces: watch.iter().map(|n| (*n).to_owned()).collect(),
            signing_key_rotation: Duration::from_secs(720 * 3600),
            max_token_lifetime: Duration::from_secs(24 * 3600),
            concurrency: 16,
            policy_stream: false,
        },
        token_listen: format!("127.0.0.1:{token_port}").parse().expect("addr"),
        admin_listen: format!("127.0.0.1:{}", free_port()).parse().expect("addr"),
        election: LeaderElection {
            lease_name: format!("keygate-test-{namespace}"),
            ..LeaderElection::default()
        },
        identity: format!("test-{}", std::process::id()),
        default_token_lifetime: Duration::from_secs(3600),
        token_tls,
        webhook: None,
        policy_listen: None,
        audit: Default::default(),
    }
}

async fn start_operator_on(
    client: Client,
    namespace: &str,
    watch: &[&str],
    token_port: u16,
    https: bool,
) -> Operator {
    let token_tls = if https {
        TokenTls::SelfManaged {
            service: "keygate".to_owned(),
        }
    } else {
        TokenTls::Disabled
    };
    let options = operator_options(namespace, watch, token_port, token_tls);
    spawn_operator(client, options)
}

/// Runs the operator with `options` in a task of this process.
fn spawn_operator(client: Client, options: OperatorOptions) -> Operator {
    let token_port = options.token_listen.port();
    let https = options.token_tls != TokenTls::Disabled;
    let token_url = format!("{}/oauth2/token", options.config.issuer);
    let admin_url = format!("http://{}", options.admin_listen);
    let (stop, mut stopping) = tokio::sync::watch::channel(false);
    let shutdown = async move {
        let _ = stopping.wait_for(|s| *s).await;
    };
    let task = tokio::spawn(async move {
        if let Err(error) = run(client, options, shutdown).await {
            eprintln!("operator stopped: {error}");
        }
    });
    Operator {
        task,
        token_url,
        admin_url,
        token_port,
        https,
        stop,
    }
}

/// The token server's CA as the operator publishes it: `ca.crt` of the ConfigMap
/// `keygate-ca` in `namespace`.
pub async fn published_ca(client: &Client, namespace: &str) -> String {
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
    eventually("the CA published in keygate-ca", WAIT, || async {
        cms.get_opt("keygate-ca")
            .await
            .ok()??
            .data?
            .get("ca.crt")
            .cloned()
    })
    .await
}

/// An HTTP client that trusts only `ca_pem`, as `curl --cacert` or requests' `verify=` do,
/// and records the server's certificate (`reqwest::tls::TlsInfo`).
pub fn client_trusting(ca_pem: &str) -> reqwest::Client {
    let roots = reqwest::Certificate::from_pem_bundle(ca_pem.as_bytes()).expect("PEM CA");
    reqwest::Client::builder()
        .tls_certs_only(roots)
        .tls_info(true)
        .build()
        .expect("client")
}

/// Polls `check` until it yields a value, or panics with `what` after `limit`.
pub async fn eventually<T, F, Fut>(what: &str, limit: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// How long a scenario waits for a condition before it fails: generous, since a loaded CI
/// machine can be slow; a passing run never waits for it.
pub const WAIT: Duration = Duration::from_secs(120);

/// Applies the quickstart-like objects: a ScopePolicy, a reader role and a client.
pub async fn apply_basics(client: &Client, ns: &str) {
    let pp = PatchParams::apply("keygate-tests").force();
    let policies: Api<ScopePolicy> = Api::namespaced(client.clone(), ns);
    let policy: ScopePolicy = serde_json::from_value(json!({
        "apiVersion": "keygate.dev/v1alpha1", "kind": "ScopePolicy",
        "metadata": {"name": "orders", "namespace": ns},
        "spec": {
            "resource": ORDERS,
            "scopes": [{"name": "orders.read"}, {"name": "orders.write"}],
            "rules": [
                {"name": "health", "methods": ["GET"], "paths": ["/healthz"], "public": true},
                {"name": "read", "methods": ["GET"], "paths": ["/orders/**"], "requireScopes": {"anyOf": ["orders.read"]}},
                {"name": "write", "methods": ["POST"], "paths": ["/orders/**"], "requireScopes": {"allOf": ["orders.write"]}}
            ]
        }
    }))
    .expect("policy");
    policies
        .patch("orders", &pp, &Patch::Apply(&policy))
        .await
        .expect("apply policy");
    let roles: Api<M2MRole> = Api::namespaced(client.clone(), ns);
    let role: M2MRole = serde_json::from_value(json!({
        "apiVersion": "keygate.dev/v1alpha1", "kind": "M2MRole",
        "metadata": {"name": "reader", "namespace": ns},
        "spec": {"permissions": [{"resource": ORDERS, "scopes": ["orders.read"]}]}
    }))
    .expect("role");
    roles
        .patch("reader", &pp, &Patch::Apply(&role))
        .await
        .expect("apply role");
    apply_client(
        client,
        ns,
        "reporting",
        json!({"roles": ["reader"], "keyPair": {"algorithm": "ES256"}}),
    )
    .await;
}

pub async fn apply_client(client: &Client, ns: &str, name: &str, spec: serde_json::Value) {
    let clients: Api<ApiClient> = Api::namespaced(client.clone(), ns);
    let object: ApiClient = serde_json::from_value(json!({
        "apiVersion": "keygate.dev/v1alpha1", "kind": "ApiClient",
        "metadata": {"name": name, "namespace": ns}, "spec": spec
    }))
    .expect("client");
    clients
        .patch(
            name,
            &PatchParams::apply("keygate-tests").force(),
            &Patch::Apply(&object),
        )
        .await
        .expect("apply client");
}

pub fn secret_data(secret: &Secret) -> BTreeMap<String, String> {
    secret
        .data
        .iter()
        .flatten()
        .map(|(k, v)| (k.clone(), String::from_utf8(v.0.clone()).expect("utf-8")))
        .collect()
}

/// Waits until the ApiClient is Ready and its Secret exists; returns the Secret.
pub async fn ready_secret(client: &Client, ns: &str, name: &str) -> Secret {
    let clients: Api<ApiClient> = Api::namespaced(client.clone(), ns);
    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
    eventually(
        &format!("ApiClient {name} Ready with its Secret"),
        WAIT,
        || async {
            let object = clients.get_opt(name).await.ok()??;
            let status = object.status?;
            if !keygate::api::is_ready(&status.conditions) {
                return None;
            }
            secrets.get_opt(&format!("{name}-credentials")).await.ok()?
        },
    )
    .await
}

pub async fn events_with_reason(client: &Client, ns: &str, reason: &str) -> usize {
    let events: Api<Event> = Api::namespaced(client.clone(), ns);
    events
        .list(&ListParams::default())
        .await
        .map(|list| {
            list.items
                .iter()
                .filter(|e| e.reason.as_deref() == Some(reason))
                .count()
        })
        .unwrap_or(0)
}

pub async fn policy_document(client: &Client, ns: &str) -> Option<serde_json::Value> {
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
    let cm = cms.get_opt("orders-keygate-policy").await.ok()??;
    serde_json::from_str(cm.data?.get("policy.json")?).ok()
}

/// create → Secret and status, policy ConfigMap with the client; restart → the Secret is
/// byte-for-byte unchanged; delete the Secret → regenerated with an Event; another ApiClient
/// naming the Secret → refused (`SecretConflict`), the Secret untouched.
pub async fn scenario_lifecycle(client: Client, ns: &str) {
    scenario_lifecycle_as(client.clone(), client, ns).await;
}

/// [`scenario_lifecycle`] with the operator using `operator_client` (e.g. impersonating the
/// Helm chart's ServiceAccount) while the test uses `client`.
pub async fn scenario_lifecycle_as(client: Client, operator_client: Client, ns: &str) {
    apply_basics(&client, ns).await;
    let operator = start_operator(operator_client.clone(), ns).await;
    let secret = ready_secret(&client, ns, "reporting").await;
    let data = secret_data(&secret);
    for key in [
        "client_id",
        "client_secret",
        "private_key.pem",
        "public_key.pem",
        "key_fingerprint",
        "token_url",
        "issuer",
    ] {
        assert!(data.contains_key(key), "Secret lacks {key}");
    }
    assert!(!data.contains_key("api_key"), "API key not enabled");
    assert_eq!(
        secret
            .labels()
            .get("app.kubernetes.io/managed-by")
            .map(String::as_str),
        Some("keygate")
    );
    assert!(secret.metadata.owner_references.as_ref().is_some_and(|o| {
        o.iter()
            .any(|r| r.kind == "ApiClient" && r.controller == Some(true))
    }));

    let clients: Api<ApiClient> = Api::namespaced(client.clone(), ns);
    let status = clients
        .get("reporting")
        .await
        .expect("client")
        .status
        .expect("status");
    assert_eq!(
        status.client_id.as_deref(),
        Some(data["client_id"].as_str())
    );
    assert_eq!(
        status.key_fingerprint.as_deref(),
        Some(data["key_fingerprint"].as_str())
    );
    assert_eq!(status.grants.len(), 1);
    assert_eq!(status.grants[0].scopes, ["orders.read"]);

    let document = eventually("the policy ConfigMap lists the client", WAIT, || async {
        let doc = policy_document(&client, ns).await?;
        (doc["clients"].as_array()?.len() == 1).then_some(doc)
    })
    .await;
    assert_eq!(document["clients"][0]["clientId"], data["client_id"]);
    assert_eq!(
        document["clients"][0]["keys"][0]["fingerprint"],
        data["key_fingerprint"]
    );
    assert!(
        !document.to_string().contains(&data["client_secret"]),
        "no secret in the policy"
    );

    // The policy ConfigMap edited by someone else (a weaker policy for the sidecars' next
    // start): the operator notices the change and writes its policy back.
    let config_maps: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
    config_maps
        .patch(
            "orders-keygate-policy",
            &PatchParams::default(),
            &Patch::Merge(json!({"data": {"policy.json": "{}"}})),
        )
        .await
        .expect("edit the policy ConfigMap");
    let restored = eventually("the policy ConfigMap restored", WAIT, || async {
        let doc = policy_document(&client, ns).await?;
        (doc["clients"].as_array()?.len() == 1).then_some(doc)
    })
    .await;
    assert_eq!(
        restored["clients"], document["clients"],
        "the policy written back"
    );

    // Capture mode network-policy: the ScopePolicy's NetworkPolicy admits only the
    // sidecar's named ports on Pods the webhook labelled for it, and the ScopePolicy owns it.
    let network_policies: Api<NetworkPolicy> = Api::namespaced(client.clone(), ns);
    let network_policy = eventually("the ScopePolicy's NetworkPolicy", WAIT, || async {
        network_policies
            .get_opt("orders-keygate-sidecar-only")
            .await
            .ok()?
    })
    .await;
    let spec = serde_json::to_value(network_policy.spec).expect("spec");
    assert_eq!(
        spec["podSelector"],
        json!({"matchLabels": {"keygate.dev/capture": "network-policy"}})
    );
    assert_eq!(
        spec["ingress"],
        json!([{"ports": [{"port": "keygate", "protocol": "TCP"}, {"port": "keygate-admin", "protocol": "TCP"}]}])
    );
    assert_eq!(spec["policyTypes"], json!(["Ingress"]));
    assert!(
        network_policy
            .metadata
            .owner_references
            .is_some_and(|o| o.iter().any(|r| r.kind == "ScopePolicy"))
    );

    // Restart: nothing is regenerated.
    let operator = operator.restart(operator_client.clone(), ns).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
    let after = secrets.get("reporting-credentials").await.expect("secret");
    assert_eq!(secret_data(&after), data, "restart changed the credentials");
    assert_eq!(
        after.metadata.resource_version, secret.metadata.resource_version,
        "restart rewrote the Secret"
    );

    // Delete the Secret: regenerated, same client id, new secret, with a Warning Event.
    secrets
        .delete("reporting-credentials", &DeleteParams::default())
        .await
        .expect("delete");
    let regenerated = eventually("the Secret regenerated", WAIT, || async {
        let s = secrets.get_opt("reporting-credentials").await.ok()??;
        let d = secret_data(&s);
        (d.get("client_secret") != data.get("client_secret")).then_some(d)
    })
    .await;
    assert_eq!(regenerated["client_id"], data["client_id"]);
    eventually("a CredentialsRegenerated Event", WAIT, || async {
        (events_with_reason(&client, ns, "CredentialsRegenerated").await > 0).then_some(())
    })
    .await;

    // Another ApiClient pointed at this Secret: refused, the Secret untouched, and its status
    // keeps the client id and Secret it had.
    apply_client(&client, ns, "squatter", json!({"roles": ["reader"]})).await;
    let own = ready_secret(&client, ns, "squatter").await;
    let squatter_id = secret_data(&own)["client_id"].clone();
    let before = secrets.get("reporting-credentials").await.expect("secret");
    apply_client(
        &client,
        ns,
        "squatter",
        json!({"roles": ["reader"], "secretName": "reporting-credentials"}),
    )
    .await;
    let status = eventually("squatter refused with SecretConflict", WAIT, || async {
        let status = clients.get_opt("squatter").await.ok()??.status?;
        let ready = status.conditions.iter().find(|c| c.type_ == "Ready")?;
        (ready.status == "False" && ready.reason == "SecretConflict").then_some(status)
    })
    .await;
    assert_eq!(status.client_id.as_deref(), Some(squatter_id.as_str()));
    assert_eq!(
        status.secret_name.as_deref(),
        Some("squatter-credentials"),
        "the status names the Secret the credentials are in"
    );
    assert!(events_with_reason(&client, ns, "SecretConflict").await > 0);
    let after = secrets.get("reporting-credentials").await.expect("secret");
    assert_eq!(
        after.metadata.resource_version, before.metadata.resource_version,
        "a conflicting ApiClient wrote another's Secret"
    );
    operator.kill();
}

/// Rotation on demand: the previous secret stays valid for the overlap, then goes.
pub async fn scenario_rotation(client: Client, ns: &str) {
    apply_basics(&client, ns).await;
    apply_client(
        &client,
        ns,
        "rotating",
        json!({"roles": ["reader"], "rotation": {"every": "720h", "overlap": "20s"}}),
    )
    .await;
    let operator = start_operator(client.clone(), ns).await;
    let before = secret_data(&ready_secret(&client, ns, "rotating").await);
    let clients: Api<ApiClient> = Api::namespaced(client.clone(), ns);
    // The reconcile shows when the schedule rotates next (`kubectl get apiclients -o wide`).
    let (last, next) = eventually("status.nextRotationTime", WAIT, || async {
        let status = clients.get("rotating").await.ok()?.status?;
        Some((status.last_rotation_time?, status.next_rotation_time?))
    })
    .await;
    assert_eq!(
        next.0.as_second() - last.0.as_second(),
        720 * 3600,
        "rotation.every after the last rotation"
    );
    let annotate = json!({"metadata": {"annotations": {"keygate.dev/rotate": "now-1"}}});
    clients
        .patch(
            "rotating",
            &PatchParams::default(),
            &Patch::Merge(&annotate),
        )
        .await
        .expect("annotate");
    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
    let rotated = eventually("rotated credentials", WAIT, || async {
        let d = secret_data(&secrets.get_opt("rotating-credentials").await.ok()??);
        (d.get("previous_client_secret") == before.get("client_secret")).then_some(d)
    })
    .await;
    assert_ne!(rotated["client_secret"], before["client_secret"]);
    assert_eq!(rotated["client_id"], before["client_id"]);
    // The token server learns the new secret from its watch of the Secret, so it may answer
    // 401 for a moment after the Secret shows it (every replica's watch is eventually
    // consistent; the previous secret covers the gap): wait for that, then both secrets get
    // tokens while the overlap lasts. The overlap is long enough that a loaded machine
    // still checks inside it.
    let http = reqwest::Client::new();
    eventually("the token server accepts the new secret", WAIT, || async {
        (token_status(
            &http,
            &operator.token_url,
            &rotated["client_id"],
            &rotated["client_secret"],
        )
        .await
            == 200)
            .then_some(())
    })
    .await;
    let status = token_status(
        &http,
        &operator.token_url,
        &rotated["client_id"],
        &before["client_secret"],
    )
    .await;
    assert_eq!(
        status, 200,
        "the previous secret was refused during the overlap"
    );
    // After the overlap only the new one.
    eventually(
        "the previous secret removed after the overlap",
        WAIT,
        || async {
            let d = secret_data(&secrets.get_opt("rotating-credentials").await.ok()??);
            (!d.contains_key("previous_client_secret")).then_some(())
        },
    )
    .await;
    eventually("the old secret refused", WAIT, || async {
        (token_status(
            &http,
            &operator.token_url,
            &rotated["client_id"],
            &before["client_secret"],
        )
        .await
            == 401)
            .then_some(())
    })
    .await;
    assert_eq!(
        token_status(
            &http,
            &operator.token_url,
            &rotated["client_id"],
            &rotated["client_secret"]
        )
        .await,
        200
    );
    operator.kill();
}

pub async fn token_status(http: &reqwest::Client, url: &str, id: &str, secret: &str) -> u16 {
    http.post(url)
        .basic_auth(id, Some(secret))
        .form(&[("grant_type", "client_credentials"), ("resource", ORDERS)])
        .send()
        .await
        .map(|r| r.status().as_u16())
        .unwrap_or(0)
}

/// A role change updates the client's grants and the policy ConfigMap; a client naming a
/// missing role is Ready=False with a reason.
pub async fn scenario_role_change_and_bad_reference(client: Client, ns: &str) {
    apply_basics(&client, ns).await;
    apply_client(&client, ns, "orphan", json!({"roles": ["nobody"]})).await;
    let operator = start_operator(client.clone(), ns).await;
    ready_secret(&client, ns, "reporting").await;
    let roles: Api<M2MRole> = Api::namespaced(client.clone(), ns);
    let role: M2MRole = serde_json::from_value(json!({
        "apiVersion": "keygate.dev/v1alpha1", "kind": "M2MRole",
        "metadata": {"name": "reader", "namespace": ns},
        "spec": {"permissions": [{"resource": ORDERS, "scopes": ["orders.read", "orders.write"]}]}
    }))
    .expect("role");
    roles
        .patch(
            "reader",
            &PatchParams::apply("keygate-tests").force(),
            &Patch::Apply(&role),
        )
        .await
        .expect("apply");
    let clients: Api<ApiClient> = Api::namespaced(client.clone(), ns);
    eventually("grants updated", WAIT, || async {
        let status = clients.get("reporting").await.ok()?.status?;
        (status.grants.first()?.scopes == ["orders.read", "orders.write"]).then_some(())
    })
    .await;
    eventually("policy ConfigMap updated", WAIT, || async {
        let doc = policy_document(&client, ns).await?;
        let scopes = doc["clients"]
            .as_array()?
            .iter()
            .find(|c| c["name"] == format!("{ns}/reporting"))?["scopes"]
            .clone();
        (scopes == json!(["orders.read", "orders.write"])).then_some(())
    })
    .await;
    let condition = eventually("orphan Ready=False", WAIT, || async {
        let status = clients.get("orphan").await.ok()?.status?;
        let ready = status.conditions.into_iter().find(|c| c.type_ == "Ready")?;
        (ready.status == "False").then_some(ready)
    })
    .await;
    assert_eq!(condition.reason, "RoleNotFound");
    assert!(
        condition.message.contains("nobody"),
        "{}",
        condition.message
    );
    operator.kill();
}

/// The whole flow: credentials from the Secret → token from the operator's token endpoint →
/// a request through a `keygate sidecar` process running with the policy ConfigMap.
pub async fn scenario_token_flow_through_sidecar(client: Client, ns: &str) {
    apply_basics(&client, ns).await;
    apply_client(&client, ns, "billing", json!({"roles": ["reader"]})).await;
    let operator = start_operator(client.clone(), ns).await;
    let data = secret_data(&ready_secret(&client, ns, "billing").await);
    let document = eventually("the policy lists both clients", WAIT, || async {
        let doc = policy_document(&client, ns).await?;
        (doc["clients"].as_array()?.len() == 2).then_some(doc)
    })
    .await;
    let http = reqwest::Client::new();
    let response = http
        .post(&operator.token_url)
        .basic_auth(&data["client_id"], Some(&data["client_secret"]))
        .form(&[("grant_type", "client_credentials"), ("resource", ORDERS)])
        .send()
        .await
        .expect("token request");
    assert_eq!(response.status(), 200);
    let token: serde_json::Value = response.json().await.expect("json");
    let token = token["access_token"].as_str().expect("token").to_owned();

    // An upstream that answers 200 with the identity it received.
    let upstream = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let upstream_addr = upstream.local_addr().expect("addr");
    tokio::spawn(async move {
        let app = axum::Router::new().fallback(|headers: axum::http::HeaderMap| async move {
            headers
                .get("x-keygate-client-id")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_owned()
        });
        let _ = axum::serve(upstream, app).await;
    });
    let dir = tempfile::tempdir().expect("tempdir");
    let policy_path = dir.path().join("policy.json");
    std::fs::write(&policy_path, serde_json::to_vec(&document).expect("json"))
        .expect("write policy");
    let listen = format!("127.0.0.1:{}", free_port());
    // The executable the webhook injects.
    let mut sidecar = std::process::Command::new(env!("CARGO_BIN_EXE_keygate-sidecar"))
        .args([
            "--listen",
            &listen,
            "--admin",
            &format!("127.0.0.1:{}", free_port()),
        ])
        .arg("--upstream")
        .arg(upstream_addr.to_string())
        .arg("--policy")
        .arg(&policy_path)
        .spawn()
        .expect("sidecar starts");
    let url = format!("http://{listen}/orders/7");
    let status = eventually("the sidecar answers", WAIT, || async {
        let response = http.get(&url).bearer_auth(&token).send().await.ok()?;
        Some((response.status().as_u16(), response.text().await.ok()?))
    })
    .await;
    let _ = sidecar.kill();
    let _ = sidecar.wait();
    assert_eq!(status, (200, data["client_id"].clone()));
    operator.kill();
}

/// Deleting an ApiClient garbage-collects its Secret (owner reference).
pub async fn scenario_garbage_collection(client: Client, ns: &str) {
    apply_basics(&client, ns).await;
    let operator = start_operator(client.clone(), ns).await;
    ready_secret(&client, ns, "reporting").await;
    let clients: Api<ApiClient> = Api::namespaced(client.clone(), ns);
    clients
        .delete("reporting", &DeleteParams::background())
        .await
        .expect("delete client");
    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
    eventually("the Secret collected", WAIT, || async {
        matches!(secrets.get_opt("reporting-credentials").await, Ok(None)).then_some(())
    })
    .await;
    operator.kill();
}

/// Creates namespace `ns` (for real clusters; the in-process server accepts any).
pub async fn create_namespace(client: &Client, ns: &str) {
    let namespaces: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(client.clone());
    let object = serde_json::from_value(
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}),
    )
    .expect("ns");
    let _ = namespaces.create(&PostParams::default(), &object).await;
}

use kube::ResourceExt;

/// The token server over HTTPS with the certificate the operator keeps: the Secret
/// keygate-token-tls holds the CA and the serving certificate, the ConfigMap keygate-ca
/// publishes the CA (the public part only); a client that trusts only that CA gets a token
/// from the https issuer; a client that does not trust it, and plain HTTP on the same port,
/// get none; a certificate renewed in the Secret is served without a restart.
pub async fn scenario_token_server_https(client: Client, ns: &str) {
    scenario_token_server_https_as(client.clone(), client, ns).await;
}

/// [`scenario_token_server_https`] with the operator using `operator_client` (e.g.
/// impersonating the Helm chart's ServiceAccount, to check that its RBAC lets the operator
/// keep keygate-token-tls and publish keygate-ca) while the test uses `client`.
pub async fn scenario_token_server_https_as(client: Client, operator_client: Client, ns: &str) {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;

    apply_basics(&client, ns).await;
    apply_client(&client, ns, "billing", json!({"roles": ["reader"]})).await;
    let operator = start_operator_https(operator_client, ns).await;
    let data = secret_data(&ready_secret(&client, ns, "billing").await);
    assert!(operator.token_url.starts_with("https://127.0.0.1:"));
    assert_eq!(
        data["token_url"], operator.token_url,
        "clients are told the https URL"
    );

    let ca = published_ca(&client, ns).await;
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
    let published = cms.get("keygate-ca").await.expect("keygate-ca");
    assert_eq!(
        published
            .data
            .iter()
            .flatten()
            .map(|(k, _)| k.as_str())
            .collect::<Vec<_>>(),
        ["ca.crt"]
    );
    assert!(published.binary_data.is_none());
    assert!(
        !ca.contains("PRIVATE KEY"),
        "only the public CA is published"
    );
    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
    let kept = secret_data(
        &secrets
            .get("keygate-token-tls")
            .await
            .expect("keygate-token-tls"),
    );
    assert_eq!(
        kept.keys().map(String::as_str).collect::<Vec<_>>(),
        ["ca.crt", "ca.key", "tls.crt", "tls.key"]
    );
    assert_eq!(
        kept["ca.crt"], ca,
        "the published CA signs the served certificate"
    );

    let https = client_trusting(&ca);
    let get_token = |http: reqwest::Client| {
        let url = operator.token_url.clone();
        let (id, secret) = (data["client_id"].clone(), data["client_secret"].clone());
        async move {
            http.post(&url)
                .basic_auth(id, Some(secret))
                .form(&[("grant_type", "client_credentials"), ("resource", ORDERS)])
                .send()
                .await
        }
    };
    let served = |response: &reqwest::Response| {
        response
            .extensions()
            .get::<reqwest::tls::TlsInfo>()
            .and_then(|info| info.peer_certificate())
            .map(<[u8]>::to_vec)
    };
    let der = |pem: &str| {
        CertificateDer::from_pem_slice(pem.as_bytes())
            .expect("PEM")
            .to_vec()
    };
    let response = eventually("a token over HTTPS", WAIT, || async {
        let response = get_token(https.clone()).await.ok()?;
        (response.status() == 200).then_some(response)
    })
    .await;
    assert_eq!(served(&response), Some(der(&kept["tls.crt"])));
    let body: serde_json::Value = response.json().await.expect("json");
    assert!(body["access_token"].as_str().is_some_and(|t| !t.is_empty()));
    let issuer = operator
        .token_url
        .trim_end_matches("/oauth2/token")
        .to_owned();
    let metadata: serde_json::Value = https
        .get(format!("{issuer}/.well-known/oauth-authorization-server"))
        .send()
        .await
        .expect("metadata")
        .json()
        .await
        .expect("json");
    assert_eq!(metadata["issuer"], issuer);
    assert_eq!(metadata["token_endpoint"], operator.token_url);

    // A client that trusts another CA refuses the server; plain HTTP gets no token.
    let other = keygate::tls::generate(
        "another CA",
        &["127.0.0.1".to_owned()],
        std::time::SystemTime::now(),
    )
    .expect("another CA");
    let refused = get_token(client_trusting(&other.ca_crt))
        .await
        .expect_err("a server the client does not trust");
    assert!(refused.is_connect(), "{refused:?}");
    let plain = operator.token_url.replacen("https://", "http://", 1);
    let response = reqwest::Client::new()
        .post(&plain)
        .basic_auth(&data["client_id"], Some(&data["client_secret"]))
        .form(&[("grant_type", "client_credentials"), ("resource", ORDERS)])
        .send()
        .await
        .expect("an answer to plain HTTP");
    assert_eq!(response.status(), 400);
    let text = response.text().await.expect("text");
    assert!(
        text.contains("https://") && !text.contains("access_token"),
        "{text}"
    );

    // A new serving certificate from the same CA in the Secret (as the leader's renewal
    // writes it) is served by the running token server; clients notice nothing.
    let names = keygate::controller::token_tls::certificate_names("keygate", ns, &issuer);
    let (tls_crt, tls_key) = keygate::tls::issue_serving_cert(
        &kept["ca.crt"],
        &kept["ca.key"],
        &names,
        std::time::SystemTime::now(),
        keygate::tls::LEAF_VALIDITY,
    )
    .expect("a renewed certificate");
    let encode = |pem: &str| {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD.encode(pem)
    };
    let renewed = json!({"data": {"tls.crt": encode(&tls_crt), "tls.key": encode(&tls_key)}});
    secrets
        .patch(
            "keygate-token-tls",
            &PatchParams::default(),
            &Patch::Merge(&renewed),
        )
        .await
        .expect("renew");
    let new_der = der(&tls_crt);
    eventually("the renewed certificate served", WAIT, || async {
        // A new connection, so a new handshake.
        let response = get_token(client_trusting(&ca)).await.ok()?;
        (response.status() == 200 && served(&response).as_ref() == Some(&new_der)).then_some(())
    })
    .await;
    operator.kill();
}

/// A replica of its own identity (so two can run side by side), its token server on plain
/// HTTP at 127.0.0.1, keys and lease in `namespace`.
async fn start_replica(client: Client, namespace: &str, identity: &str) -> Operator {
    let token_port = free_port();
    let mut options = operator_options(namespace, &[namespace], token_port, TokenTls::Disabled);
    options.identity = identity.to_owned();
    spawn_operator(client, options)
}

/// A token for `id` from the token server at `token_url`, and its `jti`.
async fn token_and_jti(
    http: &reqwest::Client,
    token_url: &str,
    id: &str,
    secret: &str,
) -> (String, String) {
    let token = access_token(http, token_url, id, secret)
        .await
        .expect("a token");
    let jti = jwt::jti_of(&token);
    (token, jti)
}

/// Revokes every `(revocation endpoint, token)` at once, as client `id`; each must get 200.
async fn revoke_all(
    http: &reqwest::Client,
    id: &str,
    secret: &str,
    revocations: &[(String, &str)],
) {
    let answers = revocations.iter().map(|(url, token)| {
        http.post(url)
            .basic_auth(id, Some(secret))
            .form(&[("token", *token)])
            .send()
    });
    for answer in futures::future::join_all(answers).await {
        assert_eq!(answer.expect("revoke").status(), 200);
    }
}

/// Every token id in the revocation shards of `namespace`, as stored right now.
async fn stored_revocations(
    client: &Client,
    namespace: &str,
) -> std::collections::BTreeSet<String> {
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
    let shards = cms
        .list(&ListParams::default().labels("keygate.dev/store=revocations"))
        .await
        .expect("list shards");
    let mut jtis = std::collections::BTreeSet::new();
    for shard in shards {
        let list: serde_json::Value = shard
            .data
            .as_ref()
            .and_then(|d| d.get("revocations.json"))
            .and_then(|j| serde_json::from_str(j).ok())
            .unwrap_or_default();
        if let Some(tokens) = list["tokens"].as_object() {
            jtis.extend(tokens.keys().cloned());
        }
    }
    jtis
}

/// A revocation answered is a revocation kept (issue #16): 20 tokens revoked on replica A are
/// all in the store the moment the last answer arrives, A is then killed at once, and
/// replica B refuses every one of them. Then a burst over two replicas at once is kept whole.
pub async fn scenario_revocation_outlives_its_replica(client: Client, ns: &str) {
    apply_basics(&client, ns).await;
    let replica_a = start_replica(client.clone(), ns, "replica-a").await;
    let replica_b = start_replica(client.clone(), ns, "replica-b").await;
    let data = secret_data(&ready_secret(&client, ns, "reporting").await);
    let (id, secret) = (data["client_id"].clone(), data["client_secret"].clone());
    let http = reqwest::Client::new();
    for replica in [&replica_a, &replica_b] {
        eventually("both replicas issue tokens", WAIT, || async {
            (token_status(&http, &replica.token_url, &id, &secret).await == 200).then_some(())
        })
        .await;
    }

    let revoke_url =
        |replica: &Operator| replica.token_url.replace("/oauth2/token", "/oauth2/revoke");
    let introspect_url = |replica: &Operator| {
        replica
            .token_url
            .replace("/oauth2/token", "/oauth2/introspect")
    };
    let mut tokens = Vec::new();
    for _ in 0..20 {
        tokens.push(token_and_jti(&http, &replica_a.token_url, &id, &secret).await);
    }
    let at_a: Vec<_> = tokens
        .iter()
        .map(|(token, _)| (revoke_url(&replica_a), token.as_str()))
        .collect();
    revoke_all(&http, &id, &secret, &at_a).await;
    // No waiting: answered means stored.
    let stored = stored_revocations(&client, ns).await;
    let missing: Vec<_> = tokens
        .iter()
        .filter(|(_, jti)| !stored.contains(jti))
        .collect();
    assert!(
        missing.is_empty(),
        "{} of 20 answered revocations were not stored",
        missing.len()
    );
    replica_a.kill();

    for (token, jti) in &tokens {
        eventually(&format!("replica B refusing {jti}"), WAIT, || async {
            let answer: serde_json::Value = http
                .post(introspect_url(&replica_b))
                .basic_auth(&id, Some(&secret))
                .form(&[("token", token.as_str())])
                .send()
                .await
                .ok()?
                .json()
                .await
                .ok()?;
            (answer["active"] == false).then_some(())
        })
        .await;
    }

    // A burst spread over two replicas at once: every shard write that meets the other
    // replica's is read again and merged, so none is lost.
    let replica_c = start_replica(client.clone(), ns, "replica-c").await;
    eventually("replica C issues tokens", WAIT, || async {
        (token_status(&http, &replica_c.token_url, &id, &secret).await == 200).then_some(())
    })
    .await;
    let mut burst = Vec::new();
    for i in 0..200 {
        let replica = if i % 2 == 0 { &replica_b } else { &replica_c };
        burst.push((
            replica,
            token_and_jti(&http, &replica.token_url, &id, &secret).await,
        ));
    }
    let spread: Vec<_> = burst
        .iter()
        .map(|(replica, (token, _))| (revoke_url(replica), token.as_str()))
        .collect();
    revoke_all(&http, &id, &secret, &spread).await;
    let stored = stored_revocations(&client, ns).await;
    let lost = burst
        .iter()
        .filter(|(_, (_, jti))| !stored.contains(jti))
        .count();
    assert_eq!(
        lost, 0,
        "{lost} of 200 answered revocations were not stored"
    );
    replica_b.kill();
    replica_c.kill();
}

/// An operator with its token server on HTTPS at 127.0.0.1:`token_port` and the policy
/// stream at 127.0.0.1:`policy_port`.
async fn start_streaming_operator(
    client: Client,
    namespace: &str,
    token_port: u16,
    policy_port: u16,
) -> Operator {
    let mut options = operator_options(
        namespace,
        &[namespace],
        token_port,
        TokenTls::SelfManaged {
            service: "keygate".to_owned(),
        },
    );
    options.policy_listen = Some(format!("127.0.0.1:{policy_port}").parse().expect("addr"));
    spawn_operator(client, options)
}

/// What a sidecar that follows the policy stream needs besides its flags: its policy file,
/// the CA and its ServiceAccount token as files (in `_dir`, removed on drop), and an app
/// answering "app" to every request.
pub struct FollowerSetup {
    _dir: tempfile::TempDir,
    pub policy: std::path::PathBuf,
    pub ca: std::path::PathBuf,
    pub token: std::path::PathBuf,
    pub upstream: std::net::SocketAddr,
}

impl FollowerSetup {
    pub async fn new(policy: &str, ca: &str, token: &str) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let write = |name: &str, text: &str| {
            let path = dir.path().join(name);
            std::fs::write(&path, text).expect("write");
            path
        };
        let (policy, ca, token) = (
            write("policy.json", policy),
            write("ca.crt", ca),
            write("token", token),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let upstream = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            let app = axum::Router::new().fallback(|| async { "app" });
            let _ = axum::serve(listener, app).await;
        });
        Self {
            _dir: dir,
            policy,
            ca,
            token,
            upstream,
        }
    }
}

/// A `keygate sidecar` process, killed on drop.
pub struct SidecarProcess(pub std::process::Child);

impl Drop for SidecarProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// An access token for `id` from the token server at `token_url`.
pub async fn access_token(
    http: &reqwest::Client,
    token_url: &str,
    id: &str,
    secret: &str,
) -> Option<String> {
    let response = http
        .post(token_url)
        .basic_auth(id, Some(secret))
        .form(&[("grant_type", "client_credentials"), ("resource", ORDERS)])
        .send()
        .await
        .ok()?;
    if response.status() != 200 {
        return None;
    }
    let body: serde_json::Value = response.json().await.ok()?;
    Some(body["access_token"].as_str()?.to_owned())
}

/// Issue #16: a `keygate sidecar` process follows its ScopePolicy's stream, authenticated by
/// a ServiceAccount token with the audience keygate. Its policy file is written once and
/// never again, so every change it enforces came through the stream: a new client's first
/// token passes, a revoked token is refused; with the operator stopped it keeps its last good
/// policy, and it catches up when a replica returns. The policy server refuses no token, a
/// token it cannot vouch for, and a ServiceAccount of another namespace.
pub async fn scenario_policy_stream(
    client: Client,
    ns: &str,
    own_token: String,
    foreign_token: String,
) {
    scenario_policy_stream_as(client.clone(), client, ns, own_token, foreign_token).await;
}

/// [`scenario_policy_stream`] with the operator using `operator_client` (e.g. impersonating
/// the Helm chart's ServiceAccount, whose RBAC must allow the TokenReviews).
pub async fn scenario_policy_stream_as(
    client: Client,
    operator_client: Client,
    ns: &str,
    own_token: String,
    foreign_token: String,
) {
    apply_basics(&client, ns).await;
    let (token_port, policy_port) = (free_port(), free_port());
    let operator =
        start_streaming_operator(operator_client.clone(), ns, token_port, policy_port).await;
    let ca = published_ca(&client, ns).await;
    let https = client_trusting(&ca);
    let document = eventually("the policy ConfigMap", WAIT, || async {
        let document = policy_document(&client, ns).await?;
        (!document["clients"].as_array()?.is_empty()).then_some(document)
    })
    .await;
    // The policy ConfigMap carries the CA beside the policy, where an injected sidecar
    // finds it (/etc/keygate/ca.crt).
    let config_maps: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
    let ca = eventually("ca.crt in the policy ConfigMap", WAIT, || async {
        let data = config_maps
            .get_opt("orders-keygate-policy")
            .await
            .ok()??
            .data?;
        data.get("ca.crt").filter(|c| **c == ca).cloned()
    })
    .await;

    // The policy server's refusals.
    let server = format!("https://127.0.0.1:{policy_port}");
    let own_url = format!("{server}/v1/policies/{ns}/orders");
    eventually("the policy server", WAIT, || async {
        https.get(&own_url).send().await.ok().map(|_| ())
    })
    .await;
    for (what, url, token, status) in [
        ("no token", own_url.clone(), None, 401),
        (
            "not a token",
            own_url.clone(),
            Some("not-a-token".to_owned()),
            401,
        ),
        (
            "a JWT-shaped token nobody issued",
            own_url.clone(),
            Some("eyJhbGciOiJSUzI1NiJ9.eyJhdWQiOlsia2V5Z2F0ZSJdfQ.c2ln".to_owned()),
            401,
        ),
        (
            "another namespace's ServiceAccount",
            own_url.clone(),
            Some(foreign_token.clone()),
            403,
        ),
        (
            "another namespace's policy",
            format!("{server}/v1/policies/kube-system/orders"),
            Some(own_token.clone()),
            403,
        ),
    ] {
        let mut request = https.get(&url);
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        let answer = request.send().await.expect("policy server");
        assert_eq!(answer.status().as_u16(), status, "{what}");
    }

    // The sidecar: its policy file is the ConfigMap's document as it is now.
    let files = FollowerSetup::new(&document.to_string(), &ca, &own_token).await;
    let (listen, admin) = (free_port(), free_port());
    let _sidecar = SidecarProcess(
        std::process::Command::new(env!("CARGO_BIN_EXE_keygate"))
            .args(["sidecar", "--policy"])
            .arg(&files.policy)
            .args(["--listen", &format!("127.0.0.1:{listen}")])
            .args(["--upstream", &files.upstream.to_string()])
            .args(["--admin", &format!("127.0.0.1:{admin}")])
            .args(["--policy-server", &server])
            .arg("--token-file")
            .arg(&files.token)
            .arg("--ca-file")
            .arg(&files.ca)
            .spawn()
            .expect("keygate sidecar"),
    );
    let http = reqwest::Client::new();
    let orders = format!("http://127.0.0.1:{listen}/orders/1");
    let status_with = |token: String| {
        let request = http.get(&orders).bearer_auth(token);
        async move {
            request
                .send()
                .await
                .map(|r| r.status().as_u16())
                .unwrap_or(0)
        }
    };

    // A new client: its first token passes as soon as the stream brings the client.
    apply_client(&client, ns, "newcomer", json!({"roles": ["reader"]})).await;
    let newcomer = secret_data(&ready_secret(&client, ns, "newcomer").await);
    let token = eventually("the newcomer's first token", WAIT, || {
        access_token(
            &https,
            &operator.token_url,
            &newcomer["client_id"],
            &newcomer["client_secret"],
        )
    })
    .await;
    let issued = Instant::now();
    eventually(
        "the sidecar accepting the newcomer's first token",
        WAIT,
        || async { (status_with(token.clone()).await == 200).then_some(()) },
    )
    .await;
    eprintln!(
        "policy stream: a new client's first token passed {:?} after it was issued",
        issued.elapsed()
    );

    // A revoked token is refused as soon as the stream brings the revocation.
    let revoke_url = operator
        .token_url
        .replace("/oauth2/token", "/oauth2/revoke");
    let revoked = https
        .post(&revoke_url)
        .basic_auth(&newcomer["client_id"], Some(&newcomer["client_secret"]))
        .form(&[("token", token.as_str())])
        .send()
        .await
        .expect("revoke");
    assert_eq!(revoked.status(), 200);
    let answered = Instant::now();
    eventually("the sidecar refusing the revoked token", WAIT, || async {
        (status_with(token.clone()).await == 401).then_some(())
    })
    .await;
    eprintln!(
        "policy stream: a revoked token was refused {:?} after the revocation was answered",
        answered.elapsed()
    );

    // The operator goes away: the sidecar keeps its last good policy.
    let reporting = secret_data(&ready_secret(&client, ns, "reporting").await);
    let still_valid = access_token(
        &https,
        &operator.token_url,
        &reporting["client_id"],
        &reporting["client_secret"],
    )
    .await
    .expect("a token");
    operator.kill();
    for _ in 0..3 {
        assert_eq!(
            status_with(still_valid.clone()).await,
            200,
            "a valid token with the operator down"
        );
        assert_eq!(
            status_with(token.clone()).await,
            401,
            "the revoked token with the operator down"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    // A replica returns: the sidecar reconnects and catches up.
    let operator = start_streaming_operator(operator_client, ns, token_port, policy_port).await;
    apply_client(&client, ns, "latecomer", json!({"roles": ["reader"]})).await;
    let latecomer = secret_data(&ready_secret(&client, ns, "latecomer").await);
    let late_token = eventually("the latecomer's first token", WAIT, || {
        access_token(
            &https,
            &operator.token_url,
            &latecomer["client_id"],
            &latecomer["client_secret"],
        )
    })
    .await;
    eventually(
        "the sidecar accepting the latecomer after the operator returned",
        WAIT,
        || async { (status_with(late_token.clone()).await == 200).then_some(()) },
    )
    .await;

    // A replica that shuts down ends its streams (so its followers move to another replica
    // now, and its drain does not wait for them) rather than having them cut.
    let mut follower = https
        .get(&own_url)
        .bearer_auth(&own_token)
        .send()
        .await
        .expect("the policy stream");
    assert_eq!(follower.status(), 200);
    follower.chunk().await.expect("the snapshot");
    let stopping = tokio::spawn(operator.shut_down());
    loop {
        match follower.chunk().await {
            Ok(Some(_)) => continue,
            Ok(None) => break,
            Err(error) => panic!("the stream was cut at shutdown, not ended: {error}"),
        }
    }
    stopping.await.expect("the operator stopped");
}

/// The `*.yaml` files under `dir`, in subdirectories too, sorted.
pub fn yaml_files(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).expect("read the directory") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            files.extend(yaml_files(&path));
        } else if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
            files.push(path);
        }
    }
    files.sort();
    files
}

/// Every document under examples/ as `(file, object)`, each namespace `ns` it names renamed
/// `{prefix}-{ns}`; and those namespaces.
pub fn example_objects(prefix: &str) -> (Vec<(String, serde_json::Value)>, BTreeSet<String>) {
    let root = std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/examples"));
    let mut objects = Vec::new();
    let mut namespaces = BTreeSet::new();
    let mut rename = |ns: &serde_json::Value| {
        let renamed = format!("{prefix}-{}", ns.as_str().expect("a namespace name"));
        namespaces.insert(renamed.clone());
        serde_json::Value::String(renamed)
    };
    for path in yaml_files(root) {
        let file = path
            .strip_prefix(root)
            .expect("under examples/")
            .display()
            .to_string();
        let text = std::fs::read_to_string(&path).expect("read the example");
        for document in serde_yaml_ng::Deserializer::from_str(&text) {
            let mut object: serde_json::Value =
                serde::Deserialize::deserialize(document).expect("yaml");
            if object.is_null() {
                continue;
            }
            let ns = &mut object["metadata"]["namespace"];
            assert!(ns.is_string(), "{file}: every example names its namespace");
            *ns = rename(ns);
            // `pointer_mut`: indexing a missing field mutably would insert it as null.
            let names = object.pointer_mut("/spec/clientNamespaces/names");
            if let Some(names) = names.and_then(serde_json::Value::as_array_mut) {
                for name in names {
                    *name = rename(name);
                }
            }
            objects.push((file.clone(), object));
        }
    }
    (objects, namespaces)
}

/// Whether `object`'s `Ready` condition is true.
pub fn ready(object: &serde_json::Value) -> bool {
    object["status"]["conditions"]
        .as_array()
        .is_some_and(|conditions| {
            conditions
                .iter()
                .any(|c| c["type"] == keygate::api::READY && c["status"] == "True")
        })
}

/// Issue #18: applies every example (from [`example_objects`]) with server-side apply, as
/// `kubectl apply --server-side` would, each object into the namespace it names (which must
/// exist); runs the operator with its keys in `home`, watching `home` and those namespaces;
/// waits until every ApiClient, M2MRole and ScopePolicy is Ready and every ApiClient's
/// Secret exists; then checks what each example is about: two-teams' client holds and gets
/// tokens for the other team's API, rotation's client has its schedule, secret-template's
/// Secret carries the template.
pub async fn scenario_examples(
    client: Client,
    home: &str,
    objects: &[(String, serde_json::Value)],
    namespaces: &BTreeSet<String>,
) {
    use kube::api::{DynamicObject, GroupVersionKind};
    use kube::discovery::Discovery;
    use serde_json::Value;

    let mut watch = vec![home];
    watch.extend(namespaces.iter().map(String::as_str));
    let operator = start_operator_watching(client.clone(), home, &watch).await;

    let discovery = Discovery::new(client.clone())
        .run()
        .await
        .expect("discovery");
    // Strict, as `kubectl apply --server-side` is: an unknown field is an error.
    let pp = PatchParams::apply("keygate-e2e")
        .force()
        .validation_strict();
    let api_of = |object: &Value| {
        let types: kube::core::TypeMeta = serde_json::from_value(json!({
            "apiVersion": object["apiVersion"], "kind": object["kind"]
        }))
        .expect("apiVersion and kind");
        let gvk = GroupVersionKind::try_from(&types).expect("group, version, kind");
        let (resource, _) = discovery
            .resolve_gvk(&gvk)
            .unwrap_or_else(|| panic!("the API server serves {gvk:?}"));
        let ns = object["metadata"]["namespace"].as_str().expect("namespace");
        Api::<DynamicObject>::namespaced_with(client.clone(), ns, &resource)
    };
    let name_of = |object: &Value| {
        object["metadata"]["name"]
            .as_str()
            .expect("name")
            .to_owned()
    };
    for (file, object) in objects {
        let name = name_of(object);
        let dynamic: DynamicObject = serde_json::from_value(object.clone()).expect("an object");
        api_of(object)
            .patch(&name, &pp, &Patch::Apply(&dynamic))
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "the API server accepts {file}: {} {name}: {e}",
                    object["kind"]
                )
            });
    }
    eprintln!(
        "applied {} objects of the examples in {} namespaces",
        objects.len(),
        namespaces.len()
    );

    // Every keygate object Ready; every ApiClient's Secret in place.
    let mut statuses = BTreeMap::new();
    for (file, object) in objects
        .iter()
        .filter(|(_, o)| o["apiVersion"] == "keygate.dev/v1alpha1")
    {
        let name = name_of(object);
        let ns = object["metadata"]["namespace"].as_str().expect("namespace");
        let api = api_of(object);
        // Waited for here rather than with `eventually`, to show the last status
        // when it never comes.
        let deadline = std::time::Instant::now() + WAIT;
        let status = loop {
            let current = match api.get(&name).await {
                Ok(object) => serde_json::to_value(object).expect("json"),
                Err(error) => json!({"error": error.to_string()}),
            };
            if ready(&current) {
                break current["status"].clone();
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{file}: {} {ns}/{name} is not Ready: {}",
                object["kind"],
                current["status"]
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        if object["kind"] == "ApiClient" {
            let secret_name = status["secretName"].as_str().expect("status.secretName");
            Api::<Secret>::namespaced(client.clone(), ns)
                .get(secret_name)
                .await
                .unwrap_or_else(|e| panic!("{file}: the Secret {ns}/{secret_name}: {e}"));
        }
        statuses.insert(
            format!("{}/{name}", object["kind"].as_str().expect("kind")),
            status,
        );
    }
    eprintln!("{} keygate objects Ready", statuses.len());

    // two-teams: billing's client holds both scopes on the orders team's API, and gets a token.
    let invoicer = &statuses["ApiClient/invoicer"];
    assert_eq!(
        invoicer["grants"],
        json!([{"resource": "https://orders.orders.svc", "scopes": ["orders.read", "orders.write"]}]),
        "{invoicer}"
    );
    let billing = format!("{home}-billing");
    let credentials = secret_data(
        &Api::<Secret>::namespaced(client.clone(), &billing)
            .get("invoicer-credentials")
            .await
            .expect("the invoicer's Secret"),
    );
    let http = reqwest::Client::new();
    let status = eventually("a token for billing's client", WAIT, || async {
        let response = http
            .post(&operator.token_url)
            .basic_auth(
                &credentials["client_id"],
                Some(&credentials["client_secret"]),
            )
            .form(&[
                ("grant_type", "client_credentials"),
                ("resource", "https://orders.orders.svc"),
            ])
            .send()
            .await
            .ok()?;
        Some(response.status().as_u16())
    })
    .await;
    assert_eq!(status, 200, "billing's client gets a token for orders");

    // rotation: the schedule is in the status.
    let settlement = &statuses["ApiClient/settlement"];
    let at = |field: &str| {
        settlement[field]
            .as_str()
            .and_then(|t| t.parse::<jiff::Timestamp>().ok())
            .unwrap_or_else(|| panic!("status.{field} in {settlement}"))
    };
    assert_eq!(
        at("nextRotationTime").as_second() - at("lastRotationTime").as_second(),
        720 * 3600
    );

    // secret-template: the Secret has the chosen name, labels and annotations.
    let analytics = format!("{home}-analytics");
    let exporter = Api::<Secret>::namespaced(client.clone(), &analytics)
        .get("exporter-oauth")
        .await
        .expect("the Secret named by secretName");
    let labels = exporter.metadata.labels.unwrap_or_default();
    let annotations = exporter.metadata.annotations.unwrap_or_default();
    assert_eq!(labels["app.kubernetes.io/part-of"], "analytics");
    assert_eq!(labels["secrets.example.com/push"], "true");
    assert_eq!(
        annotations["reflector.v1.k8s.emberstack.com/reflection-allowed"],
        "true"
    );
    assert_eq!(
        annotations["reflector.v1.k8s.emberstack.com/reflection-auto-enabled"],
        "true"
    );
    operator.kill();
}
