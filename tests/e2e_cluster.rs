//! End-to-end tests against a real cluster. They run only with `KEYGATE_E2E=1` and a
//! `KUBECONFIG`; otherwise each test says why it skipped. They install the CRDs from `crds/`,
//! run the operator in-process against the cluster, and use a fresh namespace per test,
//! deleted afterwards. Any conformant cluster 1.25+ works (kind, k3d, a cloud cluster, or a
//! kube-apiserver with etcd and kube-controller-manager and no kubelet: pods are only ever
//! created with dry run).

#[path = "support/operator.rs"]
mod operator;

use std::time::Duration;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::{Api, Client};

/// A client for the cluster, or `None` (after saying why) when the tests should skip.
async fn cluster() -> Option<Client> {
    if std::env::var("KEYGATE_E2E").as_deref() != Ok("1")
        || std::env::var_os("KUBECONFIG").is_none()
    {
        eprintln!(
            "skipping: set KEYGATE_E2E=1 and KUBECONFIG to run the end-to-end tests against a cluster"
        );
        return None;
    }
    // The operator's own client (keygate::kubernetes), as `keygate operator` makes it.
    let client = keygate::kubernetes::client()
        .await
        .expect("a client from KUBECONFIG");
    install_crds(&client).await;
    Some(client)
}

async fn install_crds(client: &Client) {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    for crd in keygate::api::crds() {
        let name = crd.metadata.name.clone().expect("crd name");
        crds.patch(
            &name,
            &PatchParams::apply("keygate-e2e").force(),
            &Patch::Apply(&crd),
        )
        .await
        .expect("install CRD");
        operator::eventually(
            &format!("CRD {name} established"),
            Duration::from_secs(60),
            || async {
                let crd = crds.get(&name).await.ok()?;
                crd.status?
                    .conditions?
                    .iter()
                    .any(|c| c.type_ == "Established" && c.status == "True")
                    .then_some(())
            },
        )
        .await;
    }
}

/// Runs `scenario` in a fresh namespace; dumps the namespace's objects when it fails, and
/// deletes the namespace either way.
async fn in_namespace<F, Fut>(client: Client, prefix: &str, scenario: F)
where
    F: FnOnce(Client, String) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let ns = format!("kg-e2e-{prefix}-{}", std::process::id());
    operator::create_namespace(&client, &ns).await;
    let result = tokio::spawn(scenario(client.clone(), ns.clone())).await;
    if result.is_err() {
        dump(&client, &ns).await;
    }
    let namespaces: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(client.clone());
    let _ = namespaces.delete(&ns, &DeleteParams::default()).await;
    if let Err(panic) = result {
        std::panic::resume_unwind(panic.into_panic());
    }
}

async fn dump(client: &Client, ns: &str) {
    use kube::api::ListParams;
    let clients: Api<keygate::api::ApiClient> = Api::namespaced(client.clone(), ns);
    let policies: Api<keygate::api::ScopePolicy> = Api::namespaced(client.clone(), ns);
    let events: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(client.clone(), ns);
    eprintln!("--- diagnostics for namespace {ns}");
    if let Ok(list) = clients.list(&ListParams::default()).await {
        for c in list {
            eprintln!("ApiClient {:?}: {:?}", c.metadata.name, c.status);
        }
    }
    if let Ok(list) = policies.list(&ListParams::default()).await {
        for p in list {
            eprintln!("ScopePolicy {:?}: {:?}", p.metadata.name, p.status);
        }
    }
    if let Ok(list) = events.list(&ListParams::default()).await {
        for e in list {
            eprintln!("Event {:?} {:?}: {:?}", e.type_, e.reason, e.note);
        }
    }
}

#[tokio::test]
async fn lifecycle_restart_and_regeneration() {
    let Some(client) = cluster().await else {
        return;
    };
    in_namespace(client, "life", |c, ns| async move {
        operator::scenario_lifecycle(c, &ns).await
    })
    .await;
}

#[tokio::test]
async fn rotation_with_overlap() {
    let Some(client) = cluster().await else {
        return;
    };
    in_namespace(client, "rot", |c, ns| async move {
        operator::scenario_rotation(c, &ns).await
    })
    .await;
}

#[tokio::test]
async fn role_change_and_bad_reference() {
    let Some(client) = cluster().await else {
        return;
    };
    in_namespace(client, "role", |c, ns| async move {
        operator::scenario_role_change_and_bad_reference(c, &ns).await
    })
    .await;
}

#[tokio::test]
async fn garbage_collection_of_the_secret() {
    let Some(client) = cluster().await else {
        return;
    };
    in_namespace(client, "gc", |c, ns| async move {
        operator::scenario_garbage_collection(c, &ns).await
    })
    .await;
}

#[tokio::test]
async fn token_flow_through_a_sidecar() {
    let Some(client) = cluster().await else {
        return;
    };
    in_namespace(client, "flow", |c, ns| async move {
        operator::scenario_token_flow_through_sidecar(c, &ns).await
    })
    .await;
}

/// The token server on HTTPS with the certificate the operator keeps in its Secret and the
/// CA it publishes in keygate-ca; a renewed certificate is served without a restart.
#[tokio::test]
async fn token_server_over_https_with_the_published_ca() {
    let Some(client) = cluster().await else {
        return;
    };
    in_namespace(client, "tls", |c, ns| async move {
        operator::scenario_token_server_https(c, &ns).await
    })
    .await;
}

/// Issue #16: revocations answered by one replica are in the store before the answer, so
/// killing it at once loses none; a burst over two replicas is kept whole.
#[tokio::test]
async fn a_revocation_outlives_its_replica() {
    let Some(client) = cluster().await else {
        return;
    };
    in_namespace(client, "revoke", |c, ns| async move {
        operator::scenario_revocation_outlives_its_replica(c, &ns).await
    })
    .await;
}

/// Issue #16: a `keygate sidecar` process follows its ScopePolicy's stream with a
/// ServiceAccount token the API server issued for the audience keygate (TokenRequest, as
/// `kubectl create token ... --audience keygate` does), checked by a real TokenReview.
#[tokio::test]
async fn a_sidecar_follows_the_policy_stream() {
    let Some(client) = cluster().await else {
        return;
    };
    in_namespace(client, "stream", |client, ns| async move {
        let other = format!("{ns}-other");
        operator::create_namespace(&client, &other).await;
        let own = service_account_token(&client, &ns, "orders").await;
        let foreign = service_account_token(&client, &other, "orders").await;
        operator::scenario_policy_stream(client.clone(), &ns, own, foreign).await;
        let namespaces: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(client);
        let _ = namespaces.delete(&other, &DeleteParams::default()).await;
    })
    .await;
}

/// A token of a new ServiceAccount `namespace/name` for the audience keygate.
async fn service_account_token(client: &Client, namespace: &str, name: &str) -> String {
    use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
    use k8s_openapi::api::core::v1::ServiceAccount;
    let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), namespace);
    let account: ServiceAccount = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": name}
    }))
    .expect("ServiceAccount");
    accounts
        .create(&PostParams::default(), &account)
        .await
        .expect("create the ServiceAccount");
    let request = TokenRequest {
        spec: TokenRequestSpec {
            audiences: vec!["keygate".to_owned()],
            expiration_seconds: Some(3600),
            ..TokenRequestSpec::default()
        },
        ..TokenRequest::default()
    };
    accounts
        .create_token_request(name, &PostParams::default(), &request)
        .await
        .expect("a token")
        .status
        .expect("status")
        .token
}

/// The admission webhook against a real API server: the webhook runs here, and webhook
/// configurations scoped to the test namespace point at it with `clientConfig.url`. The API
/// server must reach this machine: set `KEYGATE_E2E_WEBHOOK_HOST` to an address of this host
/// that the API server can connect to (e.g. the Docker bridge address for kind). Pods are
/// created with dry run, so no image is pulled.
#[tokio::test]
async fn admission_webhook_injects_and_validates() {
    let Some(client) = cluster().await else {
        return;
    };
    let Ok(host) = std::env::var("KEYGATE_E2E_WEBHOOK_HOST") else {
        eprintln!(
            "skipping: set KEYGATE_E2E_WEBHOOK_HOST to this host's address as the API server sees it"
        );
        return;
    };
    in_namespace(client, "hook", move |c, ns| async move {
        webhook_scenario(c, ns, host).await
    })
    .await;
}

/// keygate's admission webhooks served by this process for a test: the injection and
/// validation webhooks, registered with `clientConfig.url` for the namespaces `scope` only,
/// reading a registry fed from the namespaces `watch` as the operator's is.
struct Webhooks {
    registry: std::sync::Arc<keygate::registry::Registry>,
    server: tokio::task::AbortHandle,
    mutating_name: String,
    validating_name: String,
}

impl Webhooks {
    /// Starts the webhook server on this host (`host` as the API server sees it) and
    /// registers it; `name` prefixes the webhook configurations' names.
    async fn register(
        client: &Client,
        name: &str,
        scope: &[String],
        watch: &[String],
        host: &str,
    ) -> Webhooks {
        use std::sync::Arc;

        use base64::Engine;
        use k8s_openapi::api::admissionregistration::v1::{
            MutatingWebhookConfiguration, ValidatingWebhookConfiguration,
        };
        use serde_json::json;

        // The registry the webhook reads, fed from the cluster like the operator's.
        let config = keygate::controller::OperatorConfig {
            namespace: watch[0].clone(),
            issuer: "http://127.0.0.1".into(),
            watch_namespaces: watch.to_vec(),
            signing_key_rotation: Duration::from_secs(720 * 3600),
            max_token_lifetime: Duration::from_secs(24 * 3600),
            concurrency: 16,
            policy_stream: false,
        };
        let registry = Arc::new(keygate::registry::Registry::default());
        let mut synced = keygate::controller::watch::spawn_feeds(client, &config, &registry).synced;
        let _ = synced.wait_for(|s| *s).await;

        let certs =
            keygate::webhook::tls::generate(&[host.to_owned()], std::time::SystemTime::now())
                .expect("certificate");
        let resolver = keygate::webhook::CertResolver::from_pem(&certs.tls_crt, &certs.tls_key)
            .expect("resolver");
        let listener = tokio::net::TcpListener::bind("0.0.0.0:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let router = keygate::webhook::router(keygate::webhook::WebhookState {
            snapshot: registry.subscribe(),
            inject: Arc::new(keygate::webhook::InjectConfig {
                watch_namespaces: watch.to_vec(),
                // Not the defaults, so that the API server takes what they add.
                prometheus_annotations: true,
                audit: keygate::audit::AuditConfig {
                    audit_allowed_sample: "0.5".parse().expect("a sample rate"),
                    audit_refused_per_second: 100,
                },
                ..keygate::webhook::InjectConfig::new("ghcr.io/keygate/keygate:0.1.0", "e2e")
            }),
            native_sidecars: false,
            metrics: keygate::webhook::WebhookMetrics::register(
                &mut prometheus_client::registry::Registry::default(),
            ),
        });
        let server = tokio::spawn(keygate::webhook::serve_tls(
            listener,
            router,
            resolver,
            std::future::pending(),
        ))
        .abort_handle();

        let bundle = base64::engine::general_purpose::STANDARD.encode(&certs.ca_crt);
        let scope = json!({"matchExpressions": [{"key": "kubernetes.io/metadata.name", "operator": "In", "values": scope}]});
        let pp = PatchParams::apply("keygate-e2e").force();
        let mutating_name = format!("{name}-inject");
        let mutating: MutatingWebhookConfiguration = serde_json::from_value(json!({
            "apiVersion": "admissionregistration.k8s.io/v1", "kind": "MutatingWebhookConfiguration",
            "metadata": {"name": mutating_name},
            "webhooks": [{
                "name": "inject.keygate.dev", "admissionReviewVersions": ["v1"], "sideEffects": "None",
                "failurePolicy": "Fail", "timeoutSeconds": 5, "reinvocationPolicy": "IfNeeded",
                "namespaceSelector": scope, "objectSelector": {"matchLabels": {"keygate.dev/inject": "true"}},
                "clientConfig": {"url": format!("https://{host}:{port}/mutate-pods"), "caBundle": bundle},
                "rules": [{"apiGroups": [""], "apiVersions": ["v1"], "operations": ["CREATE"], "resources": ["pods"]}]
            }]
        }))
        .expect("mutating configuration");
        Api::<MutatingWebhookConfiguration>::all(client.clone())
            .patch(&mutating_name, &pp, &Patch::Apply(&mutating))
            .await
            .expect("register mutating");
        let validating_name = format!("{name}-validate");
        let validating: ValidatingWebhookConfiguration = serde_json::from_value(json!({
            "apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingWebhookConfiguration",
            "metadata": {"name": validating_name},
            "webhooks": [{
                "name": "validate.keygate.dev", "admissionReviewVersions": ["v1"], "sideEffects": "None",
                "failurePolicy": "Fail", "timeoutSeconds": 5, "namespaceSelector": scope,
                "clientConfig": {"url": format!("https://{host}:{port}/validate"), "caBundle": bundle},
                "rules": [{"apiGroups": ["keygate.dev"], "apiVersions": ["v1alpha1"], "operations": ["CREATE", "UPDATE"],
                           "resources": ["scopepolicies", "apiclients", "m2mroles"]}]
            }]
        }))
        .expect("validating configuration");
        Api::<ValidatingWebhookConfiguration>::all(client.clone())
            .patch(&validating_name, &pp, &Patch::Apply(&validating))
            .await
            .expect("register validating");
        Webhooks {
            registry,
            server,
            mutating_name,
            validating_name,
        }
    }

    /// Unregisters the webhooks and stops the server.
    async fn remove(self, client: &Client) {
        use k8s_openapi::api::admissionregistration::v1::{
            MutatingWebhookConfiguration, ValidatingWebhookConfiguration,
        };
        let _ = Api::<MutatingWebhookConfiguration>::all(client.clone())
            .delete(&self.mutating_name, &DeleteParams::default())
            .await;
        let _ = Api::<ValidatingWebhookConfiguration>::all(client.clone())
            .delete(&self.validating_name, &DeleteParams::default())
            .await;
        self.server.abort();
    }
}

async fn webhook_scenario(client: Client, ns: String, host: String) {
    use k8s_openapi::api::core::v1::Pod;
    use serde_json::json;

    // The webhooks see this namespace and one the operator does not watch.
    let unwatched = format!("{ns}-unwatched");
    operator::create_namespace(&client, &unwatched).await;
    let webhooks = Webhooks::register(
        &client,
        &ns,
        &[ns.clone(), unwatched.clone()],
        std::slice::from_ref(&ns),
        &host,
    )
    .await;
    let registry = webhooks.registry.clone();

    operator::apply_basics(&client, &ns).await;
    operator::eventually(
        "the registry sees the ScopePolicy",
        Duration::from_secs(30),
        || async { (!registry.snapshot().policies.is_empty()).then_some(()) },
    )
    .await;

    // keygate check passes on the refusal of its reserved ApiClient that the API server
    // relays from this webhook (the in-process API server calls no webhooks).
    let check = keygate::check::CheckArgs {
        timeout: Duration::from_secs(60),
        interval: Duration::from_secs(1),
        namespace: ns.clone(),
        webhook_namespace: String::new(),
        webhook: true,
        webhook_name: keygate::webhook::validate::VALIDATING_WEBHOOK.to_owned(),
        metadata_url: String::new(),
        issuer: String::new(),
        ca_configmap: "keygate-ca".to_owned(),
        ca_file: None,
    };
    keygate::check::run(client.clone(), &check)
        .await
        .expect("keygate check sees the webhook's refusal");

    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let dry_run = PostParams {
        dry_run: true,
        ..PostParams::default()
    };
    let pod = |name: &str, labels: serde_json::Value, annotations: serde_json::Value| -> Pod {
        serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "labels": labels, "annotations": annotations},
            "spec": {"containers": [{"name": "app", "image": "registry.invalid/orders:1"}]}
        }))
        .expect("pod")
    };
    let injected = pods
        .create(
            &dry_run,
            &pod(
                "injected",
                json!({"keygate.dev/inject": "true"}),
                json!({"keygate.dev/policy": "orders"}),
            ),
        )
        .await
        .expect("labelled pod admitted");
    let names: Vec<String> = injected
        .spec
        .as_ref()
        .expect("spec")
        .containers
        .iter()
        .map(|c| c.name.clone())
        .collect();
    assert_eq!(
        names,
        ["keygate-sidecar", "app"],
        "the sidecar is injected first"
    );
    let annotations = injected.metadata.annotations.clone().unwrap_or_default();
    assert!(annotations.contains_key("keygate.dev/injected"));
    // Annotation-based scraping of the sidecar's admin port, and its audit sampling.
    assert_eq!(annotations["prometheus.io/scrape"], "true");
    assert_eq!(annotations["prometheus.io/port"], "8101");
    assert_eq!(annotations["prometheus.io/path"], "/metrics");
    let sidecar_env = injected.spec.as_ref().expect("spec").containers[0]
        .env
        .clone()
        .unwrap_or_default();
    assert!(
        sidecar_env
            .iter()
            .any(|e| e.name == "KEYGATE_AUDIT_ALLOWED_SAMPLE" && e.value.as_deref() == Some("0.5")),
        "{sidecar_env:?}"
    );
    // Capture mode redirect (the default): the API server takes the init container that
    // closes the app's port, with NET_ADMIN and nothing else.
    let init = injected
        .spec
        .as_ref()
        .and_then(|s| s.init_containers.clone())
        .unwrap_or_default();
    assert_eq!(
        init.iter().map(|c| c.name.as_str()).collect::<Vec<_>>(),
        ["keygate-capture"]
    );
    let capabilities = init[0]
        .security_context
        .as_ref()
        .and_then(|s| s.capabilities.clone())
        .expect("capabilities");
    assert_eq!(capabilities.add, Some(vec!["NET_ADMIN".to_owned()]));
    assert_eq!(capabilities.drop, Some(vec!["ALL".to_owned()]));
    let capture_label = |pod: &Pod| {
        pod.metadata
            .labels
            .as_ref()
            .and_then(|l| l.get("keygate.dev/capture").cloned())
    };
    assert_eq!(capture_label(&injected).as_deref(), Some("redirect"));

    // Capture mode network-policy: no NET_ADMIN, the label the operator's NetworkPolicy
    // selects.
    let by_policy = pods
        .create(
            &dry_run,
            &pod(
                "by-network-policy",
                json!({"keygate.dev/inject": "true"}),
                json!({"keygate.dev/policy": "orders", "keygate.dev/capture": "network-policy"}),
            ),
        )
        .await
        .expect("network-policy pod admitted");
    assert!(
        by_policy
            .spec
            .as_ref()
            .is_some_and(|s| s.init_containers.as_ref().is_none_or(Vec::is_empty))
    );
    assert_eq!(capture_label(&by_policy).as_deref(), Some("network-policy"));

    // A declared port the sidecar does not cover is refused unless listed as open.
    let mut metrics = pod(
        "metrics-port",
        json!({"keygate.dev/inject": "true"}),
        json!({"keygate.dev/policy": "orders"}),
    );
    metrics.spec.as_mut().expect("spec").containers[0].ports =
        Some(vec![k8s_openapi::api::core::v1::ContainerPort {
            container_port: 9100,
            ..Default::default()
        }]);
    let open = pods
        .create(&dry_run, &metrics)
        .await
        .expect_err("an undeclared open port is denied");
    assert!(
        open.to_string().contains("keygate.dev/open-ports"),
        "{open}"
    );

    let plain = pods
        .create(&dry_run, &pod("plain", json!({}), json!({})))
        .await
        .expect("plain pod admitted");
    assert_eq!(
        plain.spec.expect("spec").containers.len(),
        1,
        "an unlabelled pod is untouched"
    );

    let missing = pods
        .create(
            &dry_run,
            &pod(
                "missing",
                json!({"keygate.dev/inject": "true"}),
                json!({"keygate.dev/policy": "nope"}),
            ),
        )
        .await
        .expect_err("a pod naming a missing ScopePolicy is denied");
    assert!(missing.to_string().contains("does not exist"), "{missing}");

    let elsewhere: Api<Pod> = Api::namespaced(client.clone(), &unwatched);
    let unprotected = elsewhere
        .create(
            &dry_run,
            &pod(
                "elsewhere",
                json!({"keygate.dev/inject": "true"}),
                json!({"keygate.dev/policy": "orders"}),
            ),
        )
        .await
        .expect_err("a labelled pod in a namespace the operator does not watch is denied");
    assert!(
        unprotected.to_string().contains("is not watched"),
        "{unprotected}"
    );
    let namespaces: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(client.clone());
    let _ = namespaces
        .delete(&unwatched, &DeleteParams::default())
        .await;

    let policies: Api<keygate::api::ScopePolicy> = Api::namespaced(client.clone(), &ns);
    let invalid: keygate::api::ScopePolicy = serde_json::from_value(json!({
        "apiVersion": "keygate.dev/v1alpha1", "kind": "ScopePolicy", "metadata": {"name": "bad", "namespace": ns},
        "spec": {"resource": "https://bad.shop.svc", "rules": [{"name": "r", "paths": ["/a/**/b"], "authenticated": true}]}
    }))
    .expect("policy");
    let denied = policies
        .create(&PostParams::default(), &invalid)
        .await
        .expect_err("an invalid ScopePolicy is denied");
    assert!(denied.to_string().contains("spec.rules[0]"), "{denied}");

    webhooks.remove(&client).await;
}

/// The Helm chart installed for real: everything it renders (tests/helm/render.py, with
/// Helm's engine in the venv scripts/test.sh creates) is applied to the API server, which
/// must accept every object. The release watches only the test namespace and its webhooks
/// match only it. Then:
/// - a Pod that asks for the sidecar is refused while no replica serves the webhook (no
///   kubelet runs the Deployment here): injection fails closed;
/// - the operator runs with exactly the chart's RBAC, its client impersonating the chart's
///   ServiceAccount; any forbidden call would stop the scenario.
#[tokio::test]
async fn chart_installs_and_the_operator_runs_with_its_rbac() {
    let Some(client) = cluster().await else {
        return;
    };
    let python = std::env::var("KEYGATE_E2E_PYTHON")
        .unwrap_or_else(|_| concat!(env!("CARGO_MANIFEST_DIR"), "/.venv/bin/python").into());
    if !std::path::Path::new(&python).exists() {
        eprintln!(
            "skipping: no Python with tests/helm/requirements.txt at {python} (run scripts/test.sh once, or set KEYGATE_E2E_PYTHON)"
        );
        return;
    }
    in_namespace(client, "chart", move |c, ns| async move {
        chart_scenario(c, ns, python).await
    })
    .await;
}

async fn chart_scenario(client: Client, ns: String, python: String) {
    use k8s_openapi::api::core::v1::Pod;
    use kube::api::{ApiResource, DynamicObject, GroupVersionKind, PostParams};
    use kube::discovery::{Discovery, Scope};

    let release = format!("kg{}", std::process::id());
    let lease = format!("keygate-test-{ns}");
    let output = std::process::Command::new(&python)
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/helm/render.py"))
        .args([&release, &ns, &lease])
        .output()
        .expect("render the chart");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let text = String::from_utf8(output.stdout).expect("utf-8");
    let documents: Vec<DynamicObject> = serde_yaml_ng::Deserializer::from_str(&text)
        .map(|doc| serde::Deserialize::deserialize(doc).expect("yaml"))
        .filter(|value: &serde_json::Value| !value.is_null())
        .map(|value| serde_json::from_value(value).expect("a Kubernetes object"))
        .collect();
    let discovery = Discovery::new(client.clone())
        .run()
        .await
        .expect("discovery");
    let pp = PatchParams::apply("keygate-e2e").force();
    let mut service_account = None;
    let mut cluster_scoped: Vec<(ApiResource, String)> = Vec::new();
    for object in &documents {
        let types = object.types.as_ref().expect("apiVersion and kind");
        let gvk = GroupVersionKind::try_from(types).expect("group, version, kind");
        let (resource, capabilities) = discovery
            .resolve_gvk(&gvk)
            .unwrap_or_else(|| panic!("the API server serves {gvk:?}"));
        let name = object.metadata.name.clone().expect("name");
        let api: Api<DynamicObject> = if capabilities.scope == Scope::Cluster {
            cluster_scoped.push((resource.clone(), name.clone()));
            Api::all_with(client.clone(), &resource)
        } else {
            let namespace = object.metadata.namespace.as_deref().unwrap_or(&ns);
            Api::namespaced_with(client.clone(), namespace, &resource)
        };
        api.patch(&name, &pp, &Patch::Apply(object))
            .await
            .unwrap_or_else(|e| panic!("the API server accepts {} {name}: {e}", gvk.kind));
        // The operator's, as its Deployment names it (the startup check's hook has its own).
        if gvk.kind == "Deployment" {
            service_account = object.data["spec"]["template"]["spec"]["serviceAccountName"]
                .as_str()
                .map(str::to_owned);
        }
    }
    eprintln!(
        "applied {} objects of the chart, {} cluster-scoped",
        documents.len(),
        cluster_scoped.len()
    );

    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let pod: Pod = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "app", "labels": {"keygate.dev/inject": "true"},
                     "annotations": {"keygate.dev/policy": "orders"}},
        "spec": {"containers": [{"name": "app", "image": "registry.invalid/orders:1"}]}
    }))
    .expect("pod");
    let dry_run = PostParams {
        dry_run: true,
        ..PostParams::default()
    };
    let refused = pods
        .create(&dry_run, &pod)
        .await
        .expect_err("no sidecar webhook answers, so a Pod that asked for the sidecar is refused");
    assert!(
        refused.to_string().contains("inject.keygate.dev"),
        "{refused}"
    );

    let service_account = service_account.expect("the chart's Deployment names its ServiceAccount");
    let mut config = kube::Config::infer().await.expect("kubeconfig");
    config.auth_info.impersonate = Some(format!("system:serviceaccount:{ns}:{service_account}"));
    let operator_client = keygate::kubernetes::from_config(config).expect("impersonating client");
    operator::scenario_lifecycle_as(client.clone(), operator_client.clone(), &ns).await;
    // The chart's RBAC lets the operator keep the token server's certificate and publish its
    // CA (self mode, the chart's default).
    operator::scenario_token_server_https_as(client.clone(), operator_client.clone(), &ns).await;
    // ... and check sidecars' tokens with TokenReviews for the policy stream.
    let other = format!("{ns}-other");
    operator::create_namespace(&client, &other).await;
    let own = service_account_token(&client, &ns, "orders").await;
    let foreign = service_account_token(&client, &other, "orders").await;
    operator::scenario_policy_stream_as(client.clone(), operator_client, &ns, own, foreign).await;
    let namespaces: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(client.clone());
    let _ = namespaces.delete(&other, &DeleteParams::default()).await;
    for (resource, name) in cluster_scoped {
        let _ = Api::<DynamicObject>::all_with(client.clone(), &resource)
            .delete(&name, &DeleteParams::default())
            .await;
    }
}

#[path = "support/invalid.rs"]
mod invalid;

/// Every object in tests/fixtures/invalid/ is refused by the API server itself (schema and
/// CEL rules, strict field validation of server-side apply), with an error naming each
/// problem its file lists; `keygate dev` refuses the same files (tests/crds.rs).
#[tokio::test]
async fn every_invalid_example_is_refused_by_the_api_server() {
    let Some(client) = cluster().await else {
        return;
    };
    in_namespace(client, "invalid", |client, ns| async move {
        use kube::api::{ApiResource, DynamicObject};
        let pp = PatchParams::apply("keygate-e2e");
        for example in invalid::examples() {
            let resource = match example.object["kind"].as_str().expect("kind") {
                "ApiClient" => ApiResource::erase::<keygate::api::ApiClient>(&()),
                "ScopePolicy" => ApiResource::erase::<keygate::api::ScopePolicy>(&()),
                "M2MRole" => ApiResource::erase::<keygate::api::M2MRole>(&()),
                other => panic!("{}: unexpected kind {other}", example.file),
            };
            let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), &ns, &resource);
            let name = example.object["metadata"]["name"].as_str().expect("name");
            let error = api
                .patch(name, &pp, &Patch::Apply(&example.object))
                .await
                .expect_err(&example.file)
                .to_string();
            eprintln!("{}: {error}", example.file);
            for expected in &example.refused {
                assert!(
                    error.contains(expected.as_str()),
                    "{}: {expected:?} not in {error}",
                    example.file
                );
            }
        }
    })
    .await;
}

/// Two teams' namespaces declare the same API resource: the first ScopePolicy keeps it, the
/// second is Ready=False with ResourceConflict and an Event; once the first is deleted, the
/// second takes over. Then the first namespace is deleted for real (the namespace controller
/// removes its objects): it goes away, its client can no longer get tokens, and the
/// operator goes on serving the other namespace.
#[tokio::test]
async fn policy_conflict_across_namespaces_and_namespace_deletion() {
    let Some(client) = cluster().await else {
        return;
    };
    in_namespace(client, "two", |client, home| async move {
        let team_a = format!("{home}-a");
        let team_b = format!("{home}-b");
        for ns in [&team_a, &team_b] {
            operator::create_namespace(&client, ns).await;
        }
        let result = tokio::spawn(two_namespaces_scenario(
            client.clone(),
            home.clone(),
            team_a.clone(),
            team_b.clone(),
        ))
        .await;
        let namespaces: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(client.clone());
        for ns in [&team_a, &team_b] {
            let _ = namespaces.delete(ns, &DeleteParams::default()).await;
        }
        if let Err(panic) = result {
            std::panic::resume_unwind(panic.into_panic());
        }
    })
    .await;
}

async fn two_namespaces_scenario(client: Client, home: String, team_a: String, team_b: String) {
    use k8s_openapi::api::core::v1::Namespace;
    use keygate::api::ScopePolicy;

    let policy_status = |ns: String| {
        let api: Api<ScopePolicy> = Api::namespaced(client.clone(), &ns);
        async move {
            let policy = api.get_opt("orders").await.ok()??;
            let condition = policy
                .status?
                .conditions
                .into_iter()
                .find(|c| c.type_ == keygate::api::READY)?;
            Some((condition.status, condition.reason))
        }
    };
    operator::apply_basics(&client, &team_a).await;
    let operator = operator::start_operator_watching(
        client.clone(),
        &home,
        &[home.as_str(), team_a.as_str(), team_b.as_str()],
    )
    .await;
    operator::ready_secret(&client, &team_a, "reporting").await;
    operator::eventually("team A's policy Ready", operator::WAIT, || async {
        (policy_status(team_a.clone()).await? == ("True".into(), "PolicyPublished".into()))
            .then_some(())
    })
    .await;

    operator::apply_basics(&client, &team_b).await;
    operator::eventually(
        "team B's policy refused with ResourceConflict",
        operator::WAIT,
        || async {
            let (status, reason) = policy_status(team_b.clone()).await?;
            (status == "False" && reason == "ResourceConflict").then_some(())
        },
    )
    .await;
    assert!(operator::events_with_reason(&client, &team_b, "ResourceConflict").await > 0);
    assert_eq!(
        policy_status(team_a.clone()).await,
        Some(("True".into(), "PolicyPublished".into())),
        "the first declaration keeps the resource"
    );

    let http = reqwest::Client::new();
    let secret_a =
        operator::secret_data(&operator::ready_secret(&client, &team_a, "reporting").await);
    assert_eq!(
        operator::token_status(
            &http,
            &operator.token_url,
            &secret_a["client_id"],
            &secret_a["client_secret"]
        )
        .await,
        200
    );

    let policies_a: Api<ScopePolicy> = Api::namespaced(client.clone(), &team_a);
    policies_a
        .delete("orders", &DeleteParams::default())
        .await
        .expect("delete team A's policy");
    operator::eventually(
        "team B's policy takes over the resource",
        operator::WAIT,
        || async {
            (policy_status(team_b.clone()).await? == ("True".into(), "PolicyPublished".into()))
                .then_some(())
        },
    )
    .await;

    let namespaces: Api<Namespace> = Api::all(client.clone());
    namespaces
        .delete(&team_a, &DeleteParams::default())
        .await
        .expect("delete team A's namespace");
    operator::eventually("team A's namespace is gone", operator::WAIT, || async {
        namespaces
            .get_opt(&team_a)
            .await
            .ok()
            .and_then(|ns| ns.is_none().then_some(()))
    })
    .await;
    operator::eventually(
        "team A's client gets no more tokens",
        operator::WAIT,
        || async {
            let status = operator::token_status(
                &http,
                &operator.token_url,
                &secret_a["client_id"],
                &secret_a["client_secret"],
            )
            .await;
            (status == 401).then_some(())
        },
    )
    .await;
    let secret_b =
        operator::secret_data(&operator::ready_secret(&client, &team_b, "reporting").await);
    assert_eq!(
        operator::token_status(
            &http,
            &operator.token_url,
            &secret_b["client_id"],
            &secret_b["client_secret"]
        )
        .await,
        200,
        "the other namespace is served on"
    );
    operator.kill();
}

/// Issue #18: every manifest under examples/ is accepted by the API server (server-side
/// apply, strict field validation, CEL rules, and keygate's validating webhook when
/// `KEYGATE_E2E_WEBHOOK_HOST` is set), and the operator makes every ApiClient, M2MRole and
/// ScopePolicy Ready. Each namespace an example names (`orders`, `billing`, ...) becomes
/// `<test namespace>-<name>`, in its objects and in `clientNamespaces`, so runs never
/// collide. Then what each example is about: two-teams' client holds and gets tokens for the
/// other team's API, rotation's client has a schedule, secret-template's Secret carries the
/// template, and (with the webhook) a Pod from injected-deployment's template gets the
/// sidecar on the port its Service targets.
#[tokio::test]
async fn examples_are_accepted_and_made_ready() {
    let Some(client) = cluster().await else {
        return;
    };
    let webhook_host = std::env::var("KEYGATE_E2E_WEBHOOK_HOST").ok();
    in_namespace(client, "examples", move |client, home| async move {
        let (objects, namespaces) = operator::example_objects(&home);
        for ns in &namespaces {
            operator::create_namespace(&client, ns).await;
        }
        let result = tokio::spawn(examples_scenario(
            client.clone(),
            home.clone(),
            objects,
            namespaces.clone(),
            webhook_host,
        ))
        .await;
        let api: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(client.clone());
        for ns in &namespaces {
            if result.is_err() {
                dump(&client, ns).await;
            }
            let _ = api.delete(ns, &DeleteParams::default()).await;
        }
        if let Err(panic) = result {
            std::panic::resume_unwind(panic.into_panic());
        }
    })
    .await;
}

async fn examples_scenario(
    client: Client,
    home: String,
    objects: Vec<(String, serde_json::Value)>,
    namespaces: std::collections::BTreeSet<String>,
    webhook_host: Option<String>,
) {
    use k8s_openapi::api::core::v1::Pod;
    use serde_json::json;

    let example_namespaces: Vec<String> = namespaces.iter().cloned().collect();
    let mut watch = vec![home.clone()];
    watch.extend(example_namespaces.iter().cloned());
    // Registered before anything is applied, so the validating webhook checks every object.
    let webhooks = match &webhook_host {
        Some(host) => {
            Some(Webhooks::register(&client, &home, &example_namespaces, &watch, host).await)
        }
        None => {
            eprintln!(
                "not checking injection nor keygate's validating webhook: set KEYGATE_E2E_WEBHOOK_HOST to this host's address as the API server sees it"
            );
            None
        }
    };
    operator::scenario_examples(client.clone(), &home, &objects, &namespaces).await;

    // injected-deployment: a Pod of the Deployment's template gets the sidecar on the port
    // the Service targets.
    if let Some(webhooks) = webhooks {
        let (_, deployment) = objects
            .iter()
            .find(|(_, o)| o["kind"] == "Deployment")
            .expect("the example Deployment");
        let (_, service) = objects
            .iter()
            .find(|(_, o)| o["kind"] == "Service")
            .expect("the example Service");
        let ns = deployment["metadata"]["namespace"]
            .as_str()
            .expect("namespace");
        let template = &deployment["spec"]["template"];
        let policy = template["metadata"]["annotations"]["keygate.dev/policy"]
            .as_str()
            .expect("the policy annotation");
        let key = keygate::registry::ObjectKey::new(ns, policy);
        operator::eventually(
            "the webhook's registry sees the ScopePolicy",
            operator::WAIT,
            || async {
                webhooks
                    .registry
                    .snapshot()
                    .policies
                    .contains_key(&key)
                    .then_some(())
            },
        )
        .await;
        let pod: Pod = serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "catalog-from-template", "labels": template["metadata"]["labels"],
                         "annotations": template["metadata"]["annotations"]},
            "spec": template["spec"]
        }))
        .expect("a Pod from the template");
        let dry_run = PostParams {
            dry_run: true,
            ..PostParams::default()
        };
        let injected = Api::<Pod>::namespaced(client.clone(), ns)
            .create(&dry_run, &pod)
            .await
            .expect("the Pod of the template is admitted");
        let spec = injected.spec.expect("spec");
        let sidecar = spec
            .containers
            .iter()
            .find(|c| c.name == "keygate-sidecar")
            .expect("the sidecar is injected");
        let sidecar_port = sidecar
            .ports
            .iter()
            .flatten()
            .find(|p| p.name.as_deref() == Some("keygate"))
            .expect("the sidecar's port named keygate")
            .container_port;
        assert_eq!(
            service["spec"]["ports"][0]["targetPort"],
            json!(sidecar_port),
            "the Service targets the sidecar"
        );
        assert_eq!(
            spec.init_containers
                .unwrap_or_default()
                .iter()
                .map(|c| c.name.as_str())
                .collect::<Vec<_>>(),
            ["keygate-capture"],
            "capture mode redirect closes the app's port"
        );
        eprintln!("a Pod of the example Deployment gets the sidecar on port {sidecar_port}");
        webhooks.remove(&client).await;
    }
}
