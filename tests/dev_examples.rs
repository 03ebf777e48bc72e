//! Every example under `examples/` run end to end with `keygate dev` as a child process and
//! a real HTTP client: what each example's README says it shows, it shows. (Their manifests
//! against a real API server and operator: `examples_are_accepted_and_made_ready` in
//! tests/e2e_cluster.rs.)

#[path = "support/dev.rs"]
mod dev_process;

use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use axum::http::HeaderMap;
use axum::routing::get as route_get;
use dev_process::{
    Dev, access_token, copy_files, credential, dev_subcommand, example, get, refused, start,
    start_with, token, wait_for_log,
};
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, Header};
use keygate::api::KeyAlgorithm;
use keygate::credentials::{
    SigningKey, VerifyingKey, generate_key_pair, sign_keypair_jwt, unix_now,
};
use serde_json::{Value, json};
use tokio::net::TcpListener;

/// Serves `app` on a free loopback port for the rest of the test.
async fn serve(app: Router) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

/// The status and OAuth error code of a token request that must be refused.
async fn refused_token(
    http: &reqwest::Client,
    dev: &Dev,
    id: &str,
    secret: &str,
    resource: &str,
) -> (u16, String) {
    let response = token(http, dev, id, secret, resource).await;
    let status = response.status().as_u16();
    let body: Value = response.json().await.unwrap();
    (
        status,
        body["error"].as_str().unwrap_or_default().to_owned(),
    )
}

async fn post(http: &reqwest::Client, url: &str, bearer: &str) -> u16 {
    http.post(url)
        .bearer_auth(bearer)
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

/// examples/two-teams: the billing team's client gets tokens for the orders team's API and
/// passes its sidecar; a client of a namespace the ScopePolicy does not admit gets none.
#[tokio::test]
async fn two_teams_a_client_of_an_admitted_namespace_passes_the_other_teams_sidecar() {
    const ORDERS: &str = "https://orders.orders.svc";
    let config = tempfile::tempdir().unwrap();
    copy_files(&example("two-teams"), config.path());
    let state = tempfile::tempdir().unwrap();
    let dev = start(config.path(), state.path());
    let http = reqwest::Client::new();
    let orders = format!("{}/orders/7", dev.sidecar("orders/orders"));

    let id = credential(state.path(), "billing/invoicer", "client_id");
    let secret = credential(state.path(), "billing/invoicer", "client_secret");
    let bearer = access_token(&http, &dev, &id, &secret, ORDERS).await;
    assert_eq!(get(&http, &orders, Some(&bearer)).await, 200);
    assert_eq!(post(&http, &orders, &bearer).await, 200, "orders.write");
    assert_eq!(get(&http, &orders, None).await, 401);

    // A third team whose namespace the orders ScopePolicy does not list: the same role
    // grants it nothing.
    let from = dev.log_len();
    let marketing = std::fs::read_to_string(config.path().join("billing-client.yaml"))
        .unwrap()
        .replace("namespace: billing", "namespace: marketing");
    std::fs::write(config.path().join("marketing-client.yaml"), marketing).unwrap();
    assert!(
        wait_for_log(&dev, "configuration reloaded", from),
        "{}",
        dev.stderr.lock().unwrap()
    );
    let other_id = credential(state.path(), "marketing/invoicer", "client_id");
    let other_secret = credential(state.path(), "marketing/invoicer", "client_secret");
    assert_ne!(other_id, id);
    let (status, error) = refused_token(&http, &dev, &other_id, &other_secret, ORDERS).await;
    assert_eq!(
        (status, error.as_str()),
        (400, "invalid_target"),
        "a namespace the policy does not admit"
    );
    // Billing's token still passes.
    assert_eq!(get(&http, &orders, Some(&bearer)).await, 200);
}

/// examples/rotation: `keygate dev rotate` gives new credentials; the previous client secret
/// and key pair keep working for the example's overlap (24h), the client id stays.
#[tokio::test]
async fn rotation_on_demand_keeps_the_previous_credentials_for_the_overlap() {
    const LEDGER: &str = "https://ledger.payments.svc";
    let config = example("rotation");
    let state = tempfile::tempdir().unwrap();
    let dev = start(&config, state.path());
    let http = reqwest::Client::new();
    let entries = format!("{}/entries/2026-11", dev.sidecar("payments/ledger"));
    let client = "payments/settlement";
    let id = credential(state.path(), client, "client_id");
    let old_secret = credential(state.path(), client, "client_secret");
    let old_key =
        SigningKey::from_pkcs8_pem(&credential(state.path(), client, "private_key.pem")).unwrap();
    let keypair_jwt = |key: &SigningKey| {
        sign_keypair_jwt(key, &id, None, Duration::from_secs(300), unix_now()).unwrap()
    };
    let bearer = access_token(&http, &dev, &id, &old_secret, LEDGER).await;
    assert_eq!(get(&http, &entries, Some(&bearer)).await, 200);
    assert_eq!(
        get(&http, &entries, Some(&keypair_jwt(&old_key))).await,
        200
    );

    let printed = dev_subcommand(
        &["rotate", "settlement"],
        &[("--config", config.as_path()), ("--state", state.path())],
    );
    let until = printed
        .strip_prefix(
            "rotated the credentials of payments/settlement; the previous ones stay valid until ",
        )
        .unwrap_or_else(|| panic!("{printed}"));
    let until: jiff::Timestamp = until.parse().unwrap();
    let overlap = until.as_second() - i64::try_from(unix_now()).unwrap();
    assert!(
        (24 * 3600 - 60..=24 * 3600).contains(&overlap),
        "the example's overlap is 24h, not {overlap}s"
    );
    let new_secret = credential(state.path(), client, "client_secret");
    let new_key =
        SigningKey::from_pkcs8_pem(&credential(state.path(), client, "private_key.pem")).unwrap();
    assert_ne!(new_secret, old_secret);
    assert_ne!(new_key.kid, old_key.kid);
    assert_eq!(credential(state.path(), client, "client_id"), id);

    // The running keygate dev serves the rotation within its reload interval.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while token(&http, &dev, &id, &new_secret, LEDGER).await.status() != 200
        || get(&http, &entries, Some(&keypair_jwt(&new_key))).await != 200
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the new credentials are refused:\n{}",
            dev.stderr.lock().unwrap()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // During the overlap the previous ones still work, and so do tokens issued before.
    let with_old = access_token(&http, &dev, &id, &old_secret, LEDGER).await;
    assert_eq!(get(&http, &entries, Some(&with_old)).await, 200);
    assert_eq!(
        get(&http, &entries, Some(&keypair_jwt(&old_key))).await,
        200
    );
    assert_eq!(get(&http, &entries, Some(&bearer)).await, 200);
    // A secret that was never this client's is refused all along.
    let (status, _) = refused_token(&http, &dev, &id, "not-the-secret", LEDGER).await;
    assert_eq!(status, 401);
}

/// examples/external-issuer: a JWT of the external issuer, signed with a key its JWKS serves
/// (here a JWKS server of the test, which the copied policy's jwksUri points at), passes the
/// sidecar with the audience the policy lists; keygate's own tokens pass too.
#[tokio::test]
async fn external_issuer_tokens_signed_by_its_jwks_pass_the_sidecar() {
    const ISSUER: &str = "https://login.example.com/";
    const JWKS_URI: &str = "https://login.example.com/.well-known/jwks.json";
    let idp =
        SigningKey::from_pkcs8_pem(&generate_key_pair(KeyAlgorithm::ES256).unwrap().private_pem)
            .unwrap();
    let stranger =
        SigningKey::from_pkcs8_pem(&generate_key_pair(KeyAlgorithm::ES256).unwrap().private_pem)
            .unwrap();
    let jwks = JwkSet {
        keys: vec![VerifyingKey::from_spki_pem(&idp.public_pem).unwrap().jwk],
    };
    let jwks_addr = serve(Router::new().route(
        "/jwks",
        route_get(move || {
            let jwks = jwks.clone();
            async move { axum::Json(jwks) }
        }),
    ))
    .await;

    let config = tempfile::tempdir().unwrap();
    copy_files(&example("external-issuer"), config.path());
    let policy = config.path().join("inventory-policy.yaml");
    let text = std::fs::read_to_string(&policy).unwrap();
    assert!(text.contains(JWKS_URI), "the example's jwksUri changed");
    std::fs::write(
        &policy,
        text.replace(JWKS_URI, &format!("http://{jwks_addr}/jwks")),
    )
    .unwrap();
    let state = tempfile::tempdir().unwrap();
    let dev = start(config.path(), state.path());
    let http = reqwest::Client::new();
    let stock = format!("{}/stock/sku-1", dev.sidecar("warehouse/inventory"));

    let now = unix_now();
    let jwt = |key: &SigningKey, patch: Value| {
        let mut claims = json!({"iss": ISSUER, "sub": "erp-sync", "aud": "api://inventory",
                                "scope": "inventory.read", "iat": now, "exp": now + 300});
        for (k, v) in patch.as_object().unwrap() {
            claims[k] = v.clone();
        }
        key.sign(Header::new(Algorithm::ES256), &claims).unwrap()
    };
    let external = jwt(&idp, json!({}));
    assert_eq!(get(&http, &stock, Some(&external)).await, 200);
    assert_eq!(post(&http, &stock, &external).await, 403, "inventory.write");
    let writer = jwt(&idp, json!({"scope": "inventory.read inventory.write"}));
    assert_eq!(post(&http, &stock, &writer).await, 200);
    for (what, refused) in [
        (
            "an audience the policy does not list",
            jwt(&idp, json!({"aud": "api://billing"})),
        ),
        (
            "another issuer",
            jwt(&idp, json!({"iss": "https://evil.example/"})),
        ),
        ("a key the JWKS does not serve", jwt(&stranger, json!({}))),
        (
            "an expired token",
            jwt(&idp, json!({"iat": now - 7200, "exp": now - 3600})),
        ),
    ] {
        assert_eq!(get(&http, &stock, Some(&refused)).await, 401, "{what}");
    }

    // keygate's own client of the same API.
    let id = credential(state.path(), "warehouse/scanner", "client_id");
    let secret = credential(state.path(), "warehouse/scanner", "client_secret");
    let own = access_token(&http, &dev, &id, &secret, "https://inventory.warehouse.svc").await;
    assert_eq!(get(&http, &stock, Some(&own)).await, 200);
}

/// examples/secret-template: the client works in dev mode (where there is no Secret, so
/// `secretName` and `secretTemplate` change nothing; tests/e2e_cluster.rs checks them).
#[tokio::test]
async fn secret_template_client_gets_tokens_in_dev_mode() {
    let config = example("secret-template");
    let state = tempfile::tempdir().unwrap();
    let dev = start(&config, state.path());
    let http = reqwest::Client::new();
    let id = credential(state.path(), "analytics/exporter", "client_id");
    let secret = credential(state.path(), "analytics/exporter", "client_secret");
    let bearer = access_token(&http, &dev, &id, &secret, "https://metrics.analytics.svc").await;
    let series = format!("{}/series/cpu", dev.sidecar("analytics/metrics"));
    assert_eq!(get(&http, &series, Some(&bearer)).await, 200);
    assert_eq!(get(&http, &series, None).await, 401);
}

/// examples/injected-deployment: `keygate dev` refuses the Deployment and Service with an
/// error naming the file and the kind it cannot run; on the keygate/ subdirectory it runs
/// the sidecar in front of an app listening on its own port, as injection does in a pod.
#[tokio::test]
async fn injected_deployment_runs_its_policy_in_dev_mode_and_refuses_the_workload() {
    let state = tempfile::tempdir().unwrap();
    let error = refused(&example("injected-deployment"), state.path());
    for expected in [
        "invalid configuration",
        "workload.yaml (document 1): apiVersion must be keygate.dev/v1alpha1, found \"apps/v1\"",
        "workload.yaml (document 2): apiVersion must be keygate.dev/v1alpha1, found \"v1\"",
    ] {
        assert!(error.contains(expected), "{expected:?} not in:\n{error}");
    }

    // The app: answers on its own port with the identity the sidecar forwards.
    let app = serve(Router::new().fallback(|headers: HeaderMap| async move {
        let client = headers
            .get("x-keygate-client-id")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("nobody")
            .to_owned();
        format!("catalog for {client}")
    }))
    .await;
    let dev = start_with(
        &example("injected-deployment/keygate"),
        state.path(),
        &["--upstream", &app.to_string()],
    );
    let http = reqwest::Client::new();
    let sidecar = dev.sidecar("catalog/catalog");
    let id = credential(state.path(), "catalog/storefront", "client_id");
    let secret = credential(state.path(), "catalog/storefront", "client_secret");
    let bearer = access_token(&http, &dev, &id, &secret, "https://catalog.catalog.svc").await;
    let response = http
        .get(format!("{sidecar}/products/42"))
        .bearer_auth(&bearer)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.text().await.unwrap(), format!("catalog for {id}"));
    let products = format!("{sidecar}/products/42");
    assert_eq!(post(&http, &products, &bearer).await, 403, "catalog.write");
    assert_eq!(get(&http, &products, None).await, 401);
    assert_eq!(get(&http, &format!("{sidecar}/healthz"), None).await, 200);
}

/// examples/injected-deployment without a cluster: `keygate inject` (the webhook's patch)
/// adds the sidecar to the Deployment's template, on the port its Service targets, with the
/// capture init container first; the Service passes through unchanged.
#[test]
fn injected_deployment_gets_the_sidecar_on_the_port_its_service_targets() {
    let workload = example("injected-deployment/workload.yaml");
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_keygate"))
        .args(["inject", "--upstream-port", "8080", "-f"])
        .arg(&workload)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let text = String::from_utf8(output.stdout).unwrap();
    let documents: Vec<Value> = serde_yaml_ng::Deserializer::from_str(&text)
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .collect();
    let [deployment, service] = documents.as_slice() else {
        panic!("two documents expected:\n{text}");
    };
    let pod = &deployment["spec"]["template"]["spec"];
    let init: Vec<&str> = pod["initContainers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(init, ["keygate-capture", "keygate-sidecar"], "{text}");
    let sidecar = &pod["initContainers"][1];
    assert_eq!(sidecar["restartPolicy"], "Always", "a native sidecar");
    let port = sidecar["ports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "keygate")
        .unwrap_or_else(|| panic!("no port named keygate:\n{text}"));
    assert_eq!(port["containerPort"], 8100);
    assert_eq!(
        service["spec"]["ports"][0]["targetPort"],
        port["containerPort"]
    );
    assert_eq!(pod["containers"][0]["name"], "app");
    assert_eq!(
        deployment["spec"]["template"]["metadata"]["labels"]["keygate.dev/capture"],
        "redirect"
    );
    let original = std::fs::read_to_string(&workload).unwrap();
    let service_text = original.split("\n---\n").nth(1).unwrap();
    assert!(
        text.contains(service_text.trim_end()),
        "the Service is printed as it came:\n{text}"
    );
}
