//! End to end: `keygate dev` as a child process with the quickstart example, driven with a
//! real HTTP client through the whole walkthrough, restarted, and fed broken configuration.

#[path = "support/dev.rs"]
mod dev_process;
#[path = "support/jwt.rs"]
mod jwt;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use dev_process::{Dev, ExampleCopy, credential, example, get, start, wait_for_log};
use jwt::jti_of;
use keygate::credentials::{SigningKey, sign_keypair_jwt, unix_now};

const ORDERS: &str = "https://orders.shop.svc";

async fn token(http: &reqwest::Client, dev: &Dev, id: &str, secret: &str) -> reqwest::Response {
    dev_process::token(http, dev, id, secret, ORDERS).await
}

async fn access_token(http: &reqwest::Client, dev: &Dev, id: &str, secret: &str) -> String {
    dev_process::access_token(http, dev, id, secret, ORDERS).await
}

/// Revokes `token` as client `id`; the status.
async fn revoke(http: &reqwest::Client, dev: &Dev, id: &str, secret: &str, token: &str) -> u16 {
    let response = http
        .post(dev.token_url.replace("/token", "/revoke"))
        .basic_auth(id, Some(secret))
        .form(&[("token", token)])
        .send()
        .await
        .unwrap();
    response.status().as_u16()
}

/// Waits (bounded) until the sidecar refuses the revoked `token` at `url`.
async fn wait_until_refused(http: &reqwest::Client, url: &str, token: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while get(http, url, Some(token)).await != 401 {
        assert!(Instant::now() < deadline, "revoked token still accepted");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn get_with_api_key(http: &reqwest::Client, url: &str, api_key: &str) -> u16 {
    let response = http.get(url).header("X-API-Key", api_key).send().await;
    response.unwrap().status().as_u16()
}

/// The warehouse's client id and key, and a key-pair JWT it signed.
fn warehouse_jwt(state: &Path) -> (String, SigningKey, String) {
    let client_id = credential(state, "shop/warehouse", "client_id");
    let key = SigningKey::from_pkcs8_pem(&credential(state, "shop/warehouse", "private_key.pem"))
        .unwrap();
    let jwt =
        sign_keypair_jwt(&key, &client_id, None, Duration::from_secs(300), unix_now()).unwrap();
    (client_id, key, jwt)
}

#[tokio::test]
async fn quickstart_walkthrough_survives_restart_and_bad_config() {
    let quickstart = ExampleCopy::new("quickstart");
    let config = &quickstart.config;
    let state: PathBuf = quickstart.state();
    let http = reqwest::Client::new();

    let dev = start(config.path(), &state);
    let orders = format!("{}/orders/42", dev.sidecar("shop/orders"));
    let id = credential(&state, "shop/reporting", "client_id");
    let secret = credential(&state, "shop/reporting", "client_secret");

    // Client credentials token → allowed read; no token → 401; too little scope → 403.
    let read_token = access_token(&http, &dev, &id, &secret).await;
    assert_eq!(get(&http, &orders, Some(&read_token)).await, 200);
    let unauthenticated = http.get(&orders).send().await.unwrap();
    assert_eq!(unauthenticated.status(), 401);
    assert_eq!(
        unauthenticated.headers()["www-authenticate"],
        "Bearer realm=\"https://orders.shop.svc\""
    );
    let forbidden = http
        .post(&orders)
        .bearer_auth(&read_token)
        .send()
        .await
        .unwrap();
    assert_eq!(forbidden.status(), 403);
    assert_eq!(
        forbidden.headers()["www-authenticate"],
        "Bearer realm=\"https://orders.shop.svc\", error=\"insufficient_scope\", scope=\"orders.write\""
    );
    assert_eq!(
        get(
            &http,
            &format!("{}/healthz", dev.sidecar("shop/orders")),
            None
        )
        .await,
        200
    );

    // Key-pair JWT signed by the warehouse's own key → allowed.
    let (_, _, jwt) = warehouse_jwt(&state);
    assert_eq!(get(&http, &orders, Some(&jwt)).await, 200);

    // API key in X-API-Key → allowed.
    let api_key = credential(&state, "shop/partner", "api_key");
    assert_eq!(get_with_api_key(&http, &orders, &api_key).await, 200);

    // Revoke ("logout") → refused.
    assert_eq!(revoke(&http, &dev, &id, &secret, &read_token).await, 200);
    wait_until_refused(&http, &orders, &read_token).await;

    // Restart: the same credentials still work, the revocation is still in force.
    drop(dev);
    let dev = start(config.path(), &state);
    let orders = format!("{}/orders/42", dev.sidecar("shop/orders"));
    assert_eq!(
        credential(&state, "shop/reporting", "client_secret"),
        secret
    );
    let fresh = access_token(&http, &dev, &id, &secret).await;
    assert_eq!(get(&http, &orders, Some(&fresh)).await, 200);
    assert_eq!(get(&http, &orders, Some(&jwt)).await, 200);
    assert_eq!(get(&http, &orders, Some(&read_token)).await, 401);

    // Broken configuration is refused on reload; the running configuration keeps serving.
    let broken: [(&str, &str, &str); 4] = [
        (
            "broken.yaml",
            "apiVersion: keygate.dev/v1alpha1\nkind: [oops\n",
            "not valid YAML",
        ),
        (
            "unknown-role.yaml",
            "apiVersion: keygate.dev/v1alpha1\nkind: ApiClient\nmetadata: {name: ghost, namespace: shop}\nspec: {roles: [nobody]}\n",
            "unknown role \"nobody\"",
        ),
        (
            "duplicate.yaml",
            "apiVersion: keygate.dev/v1alpha1\nkind: M2MRole\nmetadata: {name: orders-reader, namespace: shop}\nspec:\n  permissions: [{resource: https://orders.shop.svc, scopes: [orders.read]}]\n",
            "duplicate name",
        ),
        (
            "bad-pattern.yaml",
            "apiVersion: keygate.dev/v1alpha1\nkind: ScopePolicy\nmetadata: {name: bad, namespace: shop}\nspec:\n  resource: https://bad.shop.svc\n  rules: [{name: r, paths: [\"/a/**/b\"]}]\n",
            "spec.rules[0]",
        ),
    ];
    for (file, text, expected) in broken {
        let from = dev.stderr.lock().unwrap().len();
        std::fs::write(config.path().join(file), text).unwrap();
        assert!(
            wait_for_log(&dev, "keeping the last good configuration", from),
            "{file}: no reload error logged:\n{}",
            dev.stderr.lock().unwrap()
        );
        let log = dev.stderr.lock().unwrap()[from..].to_owned();
        assert!(
            log.contains(expected),
            "{file}: expected {expected:?} in:\n{log}"
        );
        assert!(
            log.contains(file),
            "{file}: the error names the file:\n{log}"
        );
        let token = access_token(&http, &dev, &id, &secret).await;
        assert_eq!(
            get(&http, &orders, Some(&token)).await,
            200,
            "{file}: still serving"
        );
        std::fs::remove_file(config.path().join(file)).unwrap();
    }

    // A good change applies: a new client gets credentials and a token.
    let from = dev.stderr.lock().unwrap().len();
    std::fs::write(
        config.path().join("new-client.yaml"),
        "apiVersion: keygate.dev/v1alpha1\nkind: ApiClient\nmetadata: {name: auditor, namespace: shop}\nspec: {roles: [orders-reader]}\n",
    )
    .unwrap();
    assert!(wait_for_log(&dev, "configuration reloaded", from));
    let auditor_id = credential(&state, "shop/auditor", "client_id");
    let auditor_secret = credential(&state, "shop/auditor", "client_secret");
    let token = access_token(&http, &dev, &auditor_id, &auditor_secret).await;
    assert_eq!(get(&http, &orders, Some(&token)).await, 200);

    // No secret ever reaches the log.
    let log = dev.stderr.lock().unwrap().clone();
    for value in [&secret, &api_key, &auditor_secret, &fresh] {
        assert!(
            !log.contains(value.as_str()),
            "a credential reached the log"
        );
    }
}

/// The audit events (docs/audit.md) in a JSON log: the `fields` of each `keygate::audit` line.
fn audit_events(log: &str) -> Vec<serde_json::Value> {
    log.lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|line| line["target"] == "keygate::audit")
        .map(|line| {
            assert!(line["timestamp"].is_string(), "no time: {line}");
            line["fields"].clone()
        })
        .collect()
}

/// Waits until the log holds `count` audit events (bounded), then returns the last one.
fn next_audit_event(dev: &Dev, count: usize) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let events = audit_events(&dev.stderr.lock().unwrap());
        if events.len() >= count {
            assert_eq!(
                events.len(),
                count,
                "more audit events than requests: {events:#?}"
            );
            return events[count - 1].clone();
        }
        assert!(
            Instant::now() < deadline,
            "{count} audit events expected, {} written:\n{}",
            events.len(),
            dev.stderr.lock().unwrap()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Asserts that `event` has exactly the `expected` fields and values.
fn assert_fields(event: &serde_json::Value, expected: serde_json::Value) {
    assert_eq!(event, &expected, "audit event");
}

#[tokio::test]
async fn every_decision_and_token_outcome_writes_one_audit_event_without_secrets() {
    use serde_json::json;
    let quickstart = ExampleCopy::new("quickstart");
    let state = quickstart.state();
    // A quiet log keeps the audit trail unless the filter names it.
    let dev = quickstart.start(&["--log", "warn", "--log-format", "json"]);
    let http = reqwest::Client::new();
    let id = credential(&state, "shop/reporting", "client_id");
    let secret = credential(&state, "shop/reporting", "client_secret");
    let peer_of = |event: &serde_json::Value| {
        let peer = event["peer"].as_str().expect("peer").to_owned();
        assert!(peer.starts_with("127.0.0.1:"), "{peer}");
        peer
    };

    // A token issued.
    let issued = access_token(&http, &dev, &id, &secret).await;
    let event = next_audit_event(&dev, 1);
    assert_fields(
        &event,
        json!({
            "kind": "token.issue",
            "outcome": "issued",
            "client_id": id,
            "client": "shop/reporting",
            "credential": "client_secret_basic",
            "jti": jti_of(&issued),
            "resource": ORDERS,
            "scopes": "orders.read",
            "peer": peer_of(&event),
        }),
    );

    // A token refused: wrong secret.
    let wrong_secret = "not-the-secret-of-reporting";
    assert_eq!(token(&http, &dev, &id, wrong_secret).await.status(), 401);
    let event = next_audit_event(&dev, 2);
    assert_fields(
        &event,
        json!({
            "kind": "token.issue",
            "outcome": "refused",
            "error": "invalid_client",
            "reason": "unknown client or wrong secret",
            "claimed_client_id": id,
            "peer": peer_of(&event),
        }),
    );

    // Allowed, with a query string that never reaches the audit trail.
    let query_secret = "query-value-that-stays-out";
    let orders = format!("{}/orders/42", dev.sidecar("shop/orders"));
    let with_query = format!("{orders}?sig={query_secret}");
    assert_eq!(get(&http, &with_query, Some(&issued)).await, 200);
    let event = next_audit_event(&dev, 3);
    assert_fields(
        &event,
        json!({
            "kind": "sidecar.decision",
            "outcome": "allowed",
            "client_id": id,
            "credential": "access_token",
            "jti": jti_of(&issued),
            "method": "GET",
            "path": "/orders/42",
            "rule": "read-orders",
            "scopes": "orders.read",
            "peer": peer_of(&event),
            "policy": "shop/orders",
            "resource": ORDERS,
        }),
    );

    // No credential: 401.
    assert_eq!(get(&http, &orders, None).await, 401);
    let event = next_audit_event(&dev, 4);
    assert_fields(
        &event,
        json!({
            "kind": "sidecar.decision",
            "outcome": "unauthenticated",
            "status": 401,
            "reason": "a credential is required",
            "method": "GET",
            "path": "/orders/42",
            "rule": "read-orders",
            "peer": peer_of(&event),
            "policy": "shop/orders",
            "resource": ORDERS,
        }),
    );

    // Too little scope: 403 insufficient_scope, with the scopes the caller holds.
    let forbidden = http
        .post(&orders)
        .bearer_auth(&issued)
        .send()
        .await
        .unwrap();
    assert_eq!(forbidden.status(), 403);
    let event = next_audit_event(&dev, 5);
    assert_fields(
        &event,
        json!({
            "kind": "sidecar.decision",
            "outcome": "forbidden",
            "status": 403,
            "reason": "the credential lacks a required scope",
            "client_id": id,
            "credential": "access_token",
            "jti": jti_of(&issued),
            "method": "POST",
            "path": "/orders/42",
            "rule": "write-orders",
            "scopes": "orders.read",
            "peer": peer_of(&event),
            "policy": "shop/orders",
            "resource": ORDERS,
        }),
    );

    // A key-pair JWT is named by its key's fingerprint, an API key by its client alone.
    let (warehouse_id, key, jwt) = warehouse_jwt(&state);
    assert_eq!(get(&http, &orders, Some(&jwt)).await, 200);
    let event = next_audit_event(&dev, 6);
    assert_eq!(event["credential"], "keypair_jwt");
    assert_eq!(event["client_id"], warehouse_id.as_str());
    assert_eq!(event["key_fingerprint"], key.fingerprint.as_str());
    assert_eq!(event.get("jti"), None);
    let api_key = credential(&state, "shop/partner", "api_key");
    assert_eq!(get_with_api_key(&http, &orders, &api_key).await, 200);
    let event = next_audit_event(&dev, 7);
    assert_eq!(event["credential"], "api_key");
    assert_eq!(event["outcome"], "allowed");

    // private_key_jwt at the token endpoint (`keygate token`) names the key that verified it.
    let key_file = state.with_file_name("warehouse.pem");
    std::fs::write(
        &key_file,
        credential(&state, "shop/warehouse", "private_key.pem"),
    )
    .unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_keygate"))
        .args(["token", "--token-url", &dev.token_url, "--resource", ORDERS])
        .args(["--client-id", &warehouse_id, "--private-key"])
        .arg(&key_file)
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    let warehouse_token = String::from_utf8(output.stdout).unwrap().trim().to_owned();
    let event = next_audit_event(&dev, 8);
    assert_fields(
        &event,
        json!({
            "kind": "token.issue",
            "outcome": "issued",
            "client_id": warehouse_id,
            "client": "shop/warehouse",
            "credential": "private_key_jwt",
            "key_fingerprint": key.fingerprint,
            "jti": jti_of(&warehouse_token),
            "resource": ORDERS,
            "scopes": "orders.read",
            "peer": peer_of(&event),
        }),
    );

    // A revocation is audited with the token's jti; the revoked token, refused, still names
    // its client.
    assert_eq!(revoke(&http, &dev, &id, &secret, &issued).await, 200);
    let event = next_audit_event(&dev, 9);
    assert_fields(
        &event,
        json!({
            "kind": "token.revoke",
            "outcome": "revoked",
            "client_id": id,
            "client": "shop/reporting",
            "credential": "client_secret_basic",
            "jti": jti_of(&issued),
            "peer": peer_of(&event),
        }),
    );
    wait_until_refused(&http, &orders, &issued).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    let refused = loop {
        let events = audit_events(&dev.stderr.lock().unwrap());
        if let Some(last) = events.last().filter(|e| e["status"] == 401) {
            break last.clone();
        }
        assert!(Instant::now() < deadline, "the refusal is not audited");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(refused["outcome"], "invalid_credential");
    assert_eq!(refused["reason"], "token revoked");
    assert_eq!(refused["client_id"], id.as_str());
    assert_eq!(refused["jti"], jti_of(&issued).as_str());

    // A refused token request of an authenticated client names what it asked for.
    let too_much = http
        .post(&dev.token_url)
        .basic_auth(&id, Some(&secret))
        .form(&[
            ("grant_type", "client_credentials"),
            ("resource", ORDERS),
            ("scope", "orders.write"),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(too_much.status(), 400);
    let deadline = Instant::now() + Duration::from_secs(10);
    let event = loop {
        let events = audit_events(&dev.stderr.lock().unwrap());
        if let Some(last) = events.last().filter(|e| e["kind"] == "token.issue") {
            break last.clone();
        }
        assert!(
            Instant::now() < deadline,
            "the token refusal is not audited"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(event["outcome"], "refused");
    assert_eq!(event["error"], "invalid_scope");
    assert_eq!(event["client_id"], id.as_str());
    assert_eq!(event["requested_resource"], ORDERS);
    assert_eq!(event["requested_scopes"], "orders.write");
    assert_eq!(event.get("scopes"), None);

    // Nothing secret anywhere in the log: not the token, the secrets, the keys, the query.
    let log = dev.stderr.lock().unwrap().clone();
    let private_key = credential(&state, "shop/warehouse", "private_key.pem");
    let secrets = [&issued, &secret, wrong_secret, &jwt, &api_key, query_secret];
    for value in secrets
        .into_iter()
        .chain([&warehouse_token, private_key.trim()])
    {
        assert!(!log.contains(value), "a credential reached the log:\n{log}");
    }
}

#[tokio::test]
async fn allowed_decisions_are_sampled_and_refusals_bounded_but_counted() {
    let quickstart = ExampleCopy::new("quickstart");
    let state = quickstart.state();
    let dev = quickstart.start(&[
        "--log-format",
        "json",
        "--audit-allowed-sample",
        "0.25",
        "--audit-refused-per-second",
        "1",
    ]);
    let http = reqwest::Client::new();
    let api_key = credential(&state, "shop/partner", "api_key");
    let orders = format!("{}/orders/42", dev.sidecar("shop/orders"));
    for _ in 0..8 {
        assert_eq!(get_with_api_key(&http, &orders, &api_key).await, 200);
    }
    // Every refusal is written, and after it nothing more: two of the eight allowed ones.
    assert_eq!(get(&http, &orders, None).await, 401);
    let refusal = next_audit_event(&dev, 3);
    assert_eq!(refusal["outcome"], "unauthenticated");

    // Over the refusal rate (one a second here) refusals are counted, not written, and the
    // next one written says how many were left out before it.
    let deadline = Instant::now() + Duration::from_secs(10);
    let suppressed = loop {
        assert_eq!(get(&http, &orders, None).await, 401);
        let events = audit_events(&dev.stderr.lock().unwrap());
        if let Some(n) = events[3..].iter().find_map(|e| e["suppressed"].as_u64()) {
            break n;
        }
        assert!(
            Instant::now() < deadline,
            "no refusal written after the rate"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(suppressed >= 1);
    let metrics = http
        .get(dev.token_url.replace("/oauth2/token", "/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let dropped: u64 = metrics
        .lines()
        .find(|line| line.starts_with("keygate_sidecar_audit_dropped_total{"))
        .and_then(|line| line.rsplit(' ').next()?.parse().ok())
        .unwrap_or_else(|| panic!("no dropped counter in:\n{metrics}"));
    assert!(
        dropped >= suppressed,
        "{dropped} dropped, {suppressed} suppressed"
    );
}

#[test]
fn a_port_in_use_is_named_with_the_option_that_moves_it() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let state = tempfile::tempdir().unwrap();
    let config = example("quickstart");
    let output = Command::new(env!("CARGO_BIN_EXE_keygate"))
        .args(["dev", "--port", &port.to_string(), "--sidecar-port", "0"])
        .arg("--config")
        .arg(&config)
        .arg("--state")
        .arg(state.path())
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(&format!("127.0.0.1:{port} is already in use")),
        "{stderr}"
    );
    assert!(stderr.contains("another port with --port"), "{stderr}");
    assert!(!stderr.contains("state directory"), "{stderr}");
}

#[tokio::test]
async fn dev_rotate_gives_new_credentials_and_keeps_the_old_ones_for_the_overlap() {
    let quickstart = ExampleCopy::new("quickstart");
    let state = quickstart.state();
    let dev = quickstart.start(&[]);
    let http = reqwest::Client::new();
    let id = credential(&state, "shop/reporting", "client_id");
    let before = credential(&state, "shop/reporting", "client_secret");

    let output = Command::new(env!("CARGO_BIN_EXE_keygate"))
        .args(["dev", "rotate", "reporting", "--config"])
        .arg(quickstart.config.path())
        .arg("--state")
        .arg(&state)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        stdout.starts_with(
            "rotated the credentials of shop/reporting; the previous ones stay valid until "
        ),
        "{stdout}"
    );
    let after = credential(&state, "shop/reporting", "client_secret");
    assert_ne!(after, before);
    assert_eq!(credential(&state, "shop/reporting", "client_id"), id);
    assert_eq!(
        credential(&state, "shop/reporting", "previous_client_secret"),
        before
    );

    // The running keygate dev picks the rotation up within its reload interval.
    let deadline = Instant::now() + Duration::from_secs(10);
    while token(&http, &dev, &id, &after).await.status() != 200 {
        assert!(
            Instant::now() < deadline,
            "the new secret is refused:\n{}",
            dev.stderr.lock().unwrap()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        token(&http, &dev, &id, &before).await.status(),
        200,
        "the previous secret is refused during the overlap"
    );
}
