//! Micro-benchmarks of the hot paths: token signing and verification per algorithm, cached
//! verification in the sidecar, policy matching with 10/100/1,000 rules, path normalisation.
//! Keys are parsed once, outside the measured loops. Run: `cargo bench --bench keygate`.

use std::collections::HashMap;
use std::hint::black_box;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use http::{HeaderMap, HeaderValue, Method};
use keygate::api::{
    DefaultAction, KeyAlgorithm, RequireScopes, RouteRule, ScopeMatching, ScopePolicySpec,
};
use keygate::credentials::{SigningKey, VerifyingKey, generate_key_pair, unix_now};
use keygate::policy::{CompiledPolicy, PolicyDocument, normalize};
use keygate::sidecar::auth::LoadedPolicy;
use keygate::token::access_token::{AccessClaims, issue, new_jti, verify};

const ISSUER: &str = "http://127.0.0.1:8400";
const RESOURCE: &str = "https://orders.shop.svc";

fn keys(algorithm: KeyAlgorithm) -> (SigningKey, HashMap<String, VerifyingKey>) {
    let pair = generate_key_pair(algorithm).expect("key generation");
    let signing = SigningKey::from_pkcs8_pem(&pair.private_pem).expect("private key");
    let verifying = VerifyingKey::from_spki_pem(&pair.public_pem).expect("public key");
    (signing, HashMap::from([(verifying.kid.clone(), verifying)]))
}

fn claims() -> AccessClaims {
    let now = unix_now();
    AccessClaims {
        iss: ISSUER.into(),
        sub: "kgc_0123456789abcdef0123456789abcdef".into(),
        client_id: "kgc_0123456789abcdef0123456789abcdef".into(),
        aud: RESOURCE.into(),
        scope: "orders.read orders.write".into(),
        iat: now,
        exp: now + 3600,
        jti: new_jti().expect("jti"),
    }
}

fn tokens(c: &mut Criterion) {
    let algorithms = [
        KeyAlgorithm::ES256,
        KeyAlgorithm::EdDSA,
        KeyAlgorithm::RS256,
    ];
    let mut sign = c.benchmark_group("token/sign");
    for algorithm in algorithms {
        let (key, _) = keys(algorithm);
        let claims = claims();
        sign.bench_function(algorithm.as_str(), |b| {
            b.iter(|| issue(&key, black_box(&claims)))
        });
    }
    sign.finish();
    let mut check = c.benchmark_group("token/verify");
    for algorithm in algorithms {
        let (key, verifying) = keys(algorithm);
        let token = issue(&key, &claims()).expect("token");
        let now = unix_now();
        check.bench_function(algorithm.as_str(), |b| {
            b.iter(|| {
                verify(
                    black_box(&token),
                    &verifying,
                    ISSUER,
                    Some(RESOURCE),
                    Duration::from_secs(30),
                    now,
                )
            })
        });
    }
    check.finish();
}

fn mk_rules(count: usize) -> ScopePolicySpec {
    let rules = (0..count)
        .map(|i| RouteRule {
            name: format!("rule-{i}"),
            methods: vec!["GET".into()],
            paths: vec![format!("/api/v1/resource{i}/*/items/**")],
            public: false,
            authenticated: false,
            require_scopes: Some(RequireScopes {
                any_of: Some(vec!["orders.read".into()]),
                all_of: None,
            }),
        })
        .collect();
    ScopePolicySpec {
        resource: RESOURCE.into(),
        rules,
        default_action: DefaultAction::Deny,
        scope_matching: ScopeMatching::Exact,
        ..ScopePolicySpec::default()
    }
}

fn matching(c: &mut Criterion) {
    let mut group = c.benchmark_group("policy/decide");
    for count in [10, 100, 1000] {
        let policy = CompiledPolicy::compile(&mk_rules(count)).expect("rules compile");
        // The last rule: the worst case of a first-match scan.
        let path = format!("/api/v1/resource{}/42/items/7", count - 1);
        group.bench_with_input(BenchmarkId::from_parameter(count), &path, |b, path| {
            b.iter(|| {
                policy
                    .decide(&Method::GET, black_box(path))
                    .rule
                    .map(|r| r.index)
            })
        });
    }
    group.finish();
    let mut group = c.benchmark_group("path/normalize");
    for (name, path) in [
        ("clean", "/api/v1/orders/42/items"),
        ("dirty", "/api//v1/./orders/%7Euser/../42/%2e%2e/items"),
    ] {
        group.bench_function(name, |b| {
            b.iter(|| normalize(black_box(path)).map(|p| p.len()))
        });
    }
    group.finish();
}

fn cached_verification(c: &mut Criterion) {
    let (key, verifying) = keys(KeyAlgorithm::ES256);
    let claims = claims();
    let token = issue(&key, &claims).expect("token");
    let jwks = jsonwebtoken::jwk::JwkSet {
        keys: verifying.values().map(|k| k.jwk.clone()).collect(),
    };
    let document: PolicyDocument = serde_json::from_value(serde_json::json!({
        "apiVersion": "keygate.dev/policy/v1",
        "policy": "shop/orders",
        "resource": RESOURCE,
        "spec": mk_rules(10),
        "keygate": {"issuer": ISSUER, "jwks": jwks},
        "clients": [{"clientId": claims.client_id, "name": "shop/reporting", "scopes": ["orders.read"]}],
        "revocations": {"tokens": {}, "clients": {}},
    }))
    .expect("document");
    let policy = LoadedPolicy::load(document, |_| unreachable!("no external issuers"))
        .expect("policy loads");
    let mut headers = HeaderMap::new();
    headers.insert(
        http::header::AUTHORIZATION,
        HeaderValue::from_str(&format!("Bearer {token}")).expect("header"),
    );
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    let now = unix_now();
    runtime
        .block_on(policy.authenticate(&headers, Duration::from_secs(30), now))
        .expect("valid");
    c.bench_function("sidecar/authenticate_cached_es256", |b| {
        b.to_async(&runtime)
            .iter(|| policy.authenticate(black_box(&headers), Duration::from_secs(30), now))
    });
}

criterion_group!(benches, tokens, matching, cached_verification);
criterion_main!(benches);
