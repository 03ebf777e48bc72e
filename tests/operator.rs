//! The real controllers against the in-process API server that speaks the Kubernetes REST
//! protocol (tests/support/apiserver.rs): the same scenarios as the cluster end-to-end
//! tests, plus what only the in-process server can show (write counts, a lost connection).

#[path = "support/apiserver.rs"]
mod apiserver;
#[path = "support/operator.rs"]
mod operator;

use std::time::Duration;

use apiserver::FakeApiServer;

const NS: &str = "shop";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lifecycle_restart_and_regeneration() {
    let server = FakeApiServer::start().await;
    operator::scenario_lifecycle(server.client(), NS).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_with_overlap() {
    let server = FakeApiServer::start().await;
    operator::scenario_rotation(server.client(), NS).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn role_change_and_bad_reference() {
    let server = FakeApiServer::start().await;
    operator::scenario_role_change_and_bad_reference(server.client(), NS).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_collection_of_the_secret() {
    let server = FakeApiServer::start().await;
    operator::scenario_garbage_collection(server.client(), NS).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_flow_through_a_sidecar() {
    let server = FakeApiServer::start().await;
    operator::scenario_token_flow_through_sidecar(server.client(), NS).await;
}

/// Once converged, the controllers write nothing more: no hot loop, even for a client that
/// names a missing role, and an idle resync after a restart changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn converged_state_has_no_writes() {
    let server = FakeApiServer::start().await;
    let client = server.client();
    operator::apply_basics(&client, NS).await;
    operator::apply_client(
        &client,
        NS,
        "orphan",
        serde_json::json!({"roles": ["nobody"]}),
    )
    .await;
    let operator = operator::start_operator(client.clone(), NS).await;
    operator::ready_secret(&client, NS, "reporting").await;
    operator::eventually("the policy ConfigMap", operator::WAIT, || async {
        operator::policy_document(&client, NS).await
    })
    .await;
    // Let the last status writes land, then count what an idle operator writes.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let changes = |server: &FakeApiServer| -> Vec<_> {
        server
            .write_log()
            .into_iter()
            .filter(|w| w.changed && w.resource != "leases")
            .collect()
    };
    server.reset_counters();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let idle = changes(&server);
    assert!(idle.is_empty(), "writes while idle: {idle:?}");
    // A restart relists and reconciles everything, and changes nothing.
    let operator = operator.restart(client.clone(), NS).await;
    server.reset_counters();
    tokio::time::sleep(Duration::from_secs(6)).await;
    let restarted = changes(&server);
    assert!(
        restarted.is_empty(),
        "a restart rewrote objects: {restarted:?}"
    );
    operator.kill();
}

/// A lost API connection is survived: the operator keeps serving and catches up afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_api_connection_is_survived() {
    let server = FakeApiServer::start().await;
    let client = server.client();
    operator::apply_basics(&client, NS).await;
    let operator = operator::start_operator(client.clone(), NS).await;
    let first = operator::secret_data(&operator::ready_secret(&client, NS, "reporting").await);
    server.stop();
    tokio::time::sleep(Duration::from_secs(2)).await;
    server.restart().await;
    operator::apply_client(
        &client,
        NS,
        "late",
        serde_json::json!({"roles": ["reader"]}),
    )
    .await;
    operator::ready_secret(&client, NS, "late").await;
    let again = operator::secret_data(&operator::ready_secret(&client, NS, "reporting").await);
    assert_eq!(again, first, "credentials survived the outage unchanged");
    operator.kill();
}

/// The token server on HTTPS with the operator's own CA (issue #15, finding 9).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_server_over_https_with_the_published_ca() {
    let server = FakeApiServer::start().await;
    operator::scenario_token_server_https(server.client(), NS).await;
}

/// cert-manager mode without its files: the operator stops at start and nothing ever listens
/// on the token port, rather than serving plain HTTP.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_token_certificate_files_fail_closed() {
    let server = FakeApiServer::start().await;
    let empty = tempfile::tempdir().expect("tempdir");
    let token_port = operator::free_port();
    let options = operator::operator_options(
        NS,
        &[NS],
        token_port,
        keygate::operator::TokenTls::Files(empty.path().to_owned()),
    );
    let error = tokio::time::timeout(
        operator::WAIT,
        keygate::operator::run(server.client(), options, std::future::pending()),
    )
    .await
    .expect("the operator stops")
    .expect_err("no certificate, no token server");
    assert!(error.to_string().contains("tls.crt"), "{error}");
    assert!(
        tokio::net::TcpStream::connect(("127.0.0.1", token_port))
            .await
            .is_err(),
        "nothing listens on the token port"
    );
}

/// Two replicas that start together (as after an install) both create the token server's
/// certificate if none exists: one wins, and both serve certificates of the one CA published
/// in keygate-ca.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_starting_together_share_one_token_server_ca() {
    let server = FakeApiServer::start().await;
    let ports = [operator::free_port(), operator::free_port()];
    let mut replicas = Vec::new();
    for (i, port) in ports.into_iter().enumerate() {
        let service = "keygate".to_owned();
        let mut options = operator::operator_options(
            NS,
            &[NS],
            port,
            keygate::operator::TokenTls::SelfManaged { service },
        );
        options.identity = format!("replica-{i}");
        replicas.push(tokio::spawn(keygate::operator::run(
            server.client(),
            options,
            std::future::pending(),
        )));
    }
    let ca = operator::published_ca(&server.client(), NS).await;
    let https = operator::client_trusting(&ca);
    for port in ports {
        let url = format!("https://127.0.0.1:{port}/.well-known/jwks.json");
        operator::eventually(&format!("{url} over HTTPS"), operator::WAIT, || async {
            let stopped = replicas
                .iter()
                .position(tokio::task::JoinHandle::is_finished);
            assert!(stopped.is_none(), "replica {stopped:?} stopped");
            let response = https.get(&url).send().await.ok()?;
            (response.status() == 200).then_some(())
        })
        .await;
    }
    for replica in replicas {
        replica.abort();
    }
}

/// Issue #16: a revocation is stored before it is answered, so killing the replica that
/// answered loses nothing; a burst over two replicas is kept whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_outlives_its_replica() {
    let server = FakeApiServer::start().await;
    operator::scenario_revocation_outlives_its_replica(server.client(), NS).await;
}

/// Issue #16: a sidecar process follows the policy stream (TokenReview-authenticated).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sidecar_follows_the_policy_stream() {
    let server = FakeApiServer::start().await;
    let own = server.service_account_token(NS, "orders", &["keygate"]);
    let foreign = server.service_account_token("elsewhere", "default", &["keygate"]);
    operator::scenario_policy_stream(server.client(), NS, own, foreign).await;
}

/// The value of the series `series` (name and labels) in the metrics `text`.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// `/metrics` of an operator: its build, leadership, signing key and certificate, and each
/// ApiClient's readiness and next rotation, removed when the ApiClient is deleted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_of_the_replica_and_of_each_client() {
    let server = FakeApiServer::start().await;
    let client = server.client();
    operator::apply_basics(&client, NS).await;
    operator::apply_client(
        &client,
        NS,
        "rotating",
        serde_json::json!({"roles": ["reader"], "rotation": {"every": "720h", "overlap": "24h"}}),
    )
    .await;
    let operator = operator::start_operator_https(client.clone(), NS).await;
    operator::ready_secret(&client, NS, "rotating").await;
    let ready =
        r#"keygate_apiclient_ready_status{namespace="shop",name="rotating",condition="True"}"#;
    let text = operator::eventually("the ApiClient's metrics", operator::WAIT, || async {
        let text = operator.metrics().await;
        (sample(&text, ready) == Some(1.0)).then_some(text)
    })
    .await;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let version = format!(
        r#"keygate_build_info{{version="{}"}}"#,
        env!("CARGO_PKG_VERSION")
    );
    assert_eq!(sample(&text, &version), Some(1.0), "{text}");
    assert_eq!(sample(&text, "keygate_controller_leader"), Some(1.0));
    let created = sample(&text, "keygate_signing_key_created_timestamp_seconds").unwrap();
    assert!((now - 120.0..=now).contains(&created), "{created}");
    assert_eq!(
        sample(&text, "keygate_signing_key_next_rotation_timestamp_seconds"),
        Some(created + 720.0 * 3600.0)
    );
    let expiry = sample(
        &text,
        r#"keygate_certificate_expiration_timestamp_seconds{certificate="token_server"}"#,
    )
    .unwrap();
    assert!(expiry > now + 24.0 * 3600.0, "{expiry}");
    for condition in ["False", "Unknown"] {
        let series = format!(
            r#"keygate_apiclient_ready_status{{namespace="shop",name="rotating",condition="{condition}"}}"#
        );
        assert_eq!(sample(&text, &series), Some(0.0), "{series}");
    }
    let next_rotation = sample(
        &text,
        r#"keygate_apiclient_next_rotation_timestamp_seconds{namespace="shop",name="rotating"}"#,
    )
    .unwrap();
    assert!((now + 719.0 * 3600.0..=now + 720.0 * 3600.0).contains(&next_rotation));
    // Without scheduled rotation, there is no next rotation.
    assert_eq!(
        sample(
            &text,
            r#"keygate_apiclient_next_rotation_timestamp_seconds{namespace="shop",name="reporting"}"#
        ),
        None
    );

    let clients: kube::Api<keygate::api::ApiClient> = kube::Api::namespaced(client.clone(), NS);
    clients
        .delete("rotating", &Default::default())
        .await
        .expect("delete");
    operator::eventually(
        "the deleted ApiClient's series gone",
        operator::WAIT,
        || async {
            let text = operator.metrics().await;
            (!text.contains(r#"name="rotating""#)).then_some(())
        },
    )
    .await;
    operator.kill();
}

/// `keygate check` against the in-process API server. The token server check retries until
/// the operator serves its metadata with the CA it publishes in `keygate-ca`. This API server
/// calls no admission webhooks, so the webhook check can only be seen failing here, naming
/// what does not answer; the refusal it passes on is tested in `keygate::check`'s unit tests
/// and against a real cluster.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_waits_for_the_token_server_and_names_what_does_not_answer() {
    use keygate::check::{CheckArgs, run};
    let server = FakeApiServer::start().await;
    let client = server.client();
    operator::create_namespace(&client, NS).await;
    let operator = operator::start_operator_https(client.clone(), NS).await;
    let issuer = operator
        .token_url
        .trim_end_matches("/oauth2/token")
        .to_owned();
    let args = CheckArgs {
        timeout: Duration::from_secs(90),
        interval: Duration::from_millis(200),
        namespace: NS.to_owned(),
        webhook_namespace: String::new(),
        webhook: false,
        webhook_name: keygate::webhook::validate::VALIDATING_WEBHOOK.to_owned(),
        metadata_url: format!("{issuer}/.well-known/openid-configuration"),
        issuer: issuer.clone(),
        ca_configmap: "keygate-ca".to_owned(),
        ca_file: None,
    };
    run(client.clone(), &args)
        .await
        .expect("the token server answers");

    // Another issuer: refused, naming both.
    let wrong = CheckArgs {
        timeout: Duration::from_millis(500),
        issuer: "https://elsewhere.example".to_owned(),
        ..args.clone()
    };
    let failed = run(client.clone(), &wrong).await.unwrap_err();
    assert_eq!(failed.failing.len(), 1);
    assert_eq!(failed.failing[0].0, "the token server");
    assert!(
        failed.failing[0].1.contains("https://elsewhere.example"),
        "{failed}"
    );

    // The dry run is admitted without a webhook: the check fails and says why.
    let webhook = CheckArgs {
        timeout: Duration::from_millis(500),
        webhook: true,
        metadata_url: String::new(),
        ..args
    };
    let failed = run(client.clone(), &webhook).await.unwrap_err();
    let message = failed.to_string();
    assert!(message.contains("the admission webhook: "), "{message}");
    assert!(
        message.contains("without calling the webhook validate.keygate.dev"),
        "{message}"
    );
    assert!(
        server.objects("apiclients", Some(NS)).is_empty(),
        "a dry run persists nothing"
    );
    operator.kill();
}

/// Issue #18: every example under examples/ applied, Ready, and doing what its README says
/// (tests/e2e_cluster.rs runs the same against a real API server, with injection).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn examples_are_accepted_and_made_ready() {
    let server = FakeApiServer::start().await;
    let client = server.client();
    let home = "examples";
    let (objects, namespaces) = operator::example_objects(home);
    for ns in namespaces.iter().map(String::as_str).chain([home]) {
        operator::create_namespace(&client, ns).await;
    }
    operator::scenario_examples(client, home, &objects, &namespaces).await;
}
