//! End to end: `keygate dev` as a child process with the quickstart example, driven with a
//! real HTTP client through the whole walkthrough, restarted, and fed broken configuration.

#[path = "support/dev.rs"]
mod dev_process;

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use dev_process::{Dev, copy_files, credential, example, get, start, wait_for_log};
use keygate::credentials::{SigningKey, sign_keypair_jwt, unix_now};

const ORDERS: &str = "https://orders.shop.svc";

async fn token(http: &reqwest::Client, dev: &Dev, id: &str, secret: &str) -> reqwest::Response {
    dev_process::token(http, dev, id, secret, ORDERS).await
}

async fn access_token(http: &reqwest::Client, dev: &Dev, id: &str, secret: &str) -> String {
    dev_process::access_token(http, dev, id, secret, ORDERS).await
}

#[tokio::test]
async fn quickstart_walkthrough_survives_restart_and_bad_config() {
    let config = tempfile::tempdir().unwrap();
    let state_dir = tempfile::tempdir().unwrap();
    let state: PathBuf = state_dir.path().join("state");
    copy_files(&example("quickstart"), config.path());
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
    let warehouse_id = credential(&state, "shop/warehouse", "client_id");
    let key = SigningKey::from_pkcs8_pem(&credential(&state, "shop/warehouse", "private_key.pem"))
        .unwrap();
    let jwt = sign_keypair_jwt(
        &key,
        &warehouse_id,
        None,
        Duration::from_secs(300),
        unix_now(),
    )
    .unwrap();
    assert_eq!(get(&http, &orders, Some(&jwt)).await, 200);

    // API key in X-API-Key → allowed.
    let api_key = credential(&state, "shop/partner", "api_key");
    let status = http
        .get(&orders)
        .header("X-API-Key", &api_key)
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(status, 200);

    // Revoke ("logout") → refused.
    let revoked = http
        .post(dev.token_url.replace("/token", "/revoke"))
        .basic_auth(&id, Some(&secret))
        .form(&[("token", read_token.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(revoked.status(), 200);
    let deadline = Instant::now() + Duration::from_secs(10);
    while get(&http, &orders, Some(&read_token)).await != 401 {
        assert!(Instant::now() < deadline, "revoked token still accepted");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

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
    let config = tempfile::tempdir().unwrap();
    copy_files(&example("quickstart"), config.path());
    let state_dir = tempfile::tempdir().unwrap();
    let state = state_dir.path().join("state");
    let dev = start(config.path(), &state);
    let http = reqwest::Client::new();
    let id = credential(&state, "shop/reporting", "client_id");
    let before = credential(&state, "shop/reporting", "client_secret");

    let output = Command::new(env!("CARGO_BIN_EXE_keygate"))
        .args(["dev", "rotate", "reporting", "--config"])
        .arg(config.path())
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
