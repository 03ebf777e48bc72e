//! Property tests with random inputs: the same properties the cargo-fuzz targets in `fuzz/`
//! check, run on every `cargo test` so they hold even where no nightly toolchain exists.

use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use keygate::policy::{PolicyDocument, normalize};
use keygate::sidecar::auth::LoadedPolicy;
use proptest::prelude::*;

fn policy() -> LoadedPolicy {
    let document =
        PolicyDocument::parse(include_bytes!("fixtures/policy.json")).expect("fixture parses");
    LoadedPolicy::load(document, |_| unreachable!("no external issuers")).expect("fixture loads")
}

fn authenticate(policy: &LoadedPolicy, header: &str) -> bool {
    let Ok(value) = http::HeaderValue::from_str(header) else {
        return false;
    };
    let mut headers = http::HeaderMap::new();
    headers.insert(http::header::AUTHORIZATION, value);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    runtime
        .block_on(policy.authenticate(&headers, Duration::from_secs(30), 1_800_000_000))
        .is_ok()
}

/// Path-like strings: segments of dots, escapes, letters and slashes.
fn path_like() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        Just("/".to_owned()),
        Just(".".to_owned()),
        Just("..".to_owned()),
        Just("%2e".to_owned()),
        Just("%2E%2e".to_owned()),
        Just("%2f".to_owned()),
        Just("%7e".to_owned()),
        Just("%".to_owned()),
        Just("\\".to_owned()),
        "[a-zA-Z0-9:@;=_~-]{1,4}",
        "%[0-9a-fA-F]{2}",
    ];
    prop::collection::vec(piece, 0..16).prop_map(|pieces| format!("/{}", pieces.concat()))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn normalized_paths_are_canonical(path in path_like()) {
        if let Ok(normalized) = normalize(&path) {
            prop_assert!(normalized.starts_with('/'));
            prop_assert!(!normalized.contains("//"));
            prop_assert!(!normalized.split('/').any(|s| s == "." || s == ".."));
            prop_assert!(!normalized.to_ascii_lowercase().contains("%2f"));
            let again = normalize(&normalized).expect("a normalized path normalizes");
            prop_assert_eq!(again.as_ref(), normalized.as_ref());
        }
    }

    #[test]
    fn arbitrary_strings_never_panic_the_normaliser(path in any::<String>()) {
        let _ = normalize(&path);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(500))]

    #[test]
    fn arbitrary_credentials_are_refused(header in "[ -~]{0,300}") {
        prop_assert!(!authenticate(&policy(), &header));
    }

    #[test]
    fn jwt_shaped_garbage_is_refused(
        header in prop::collection::vec(any::<u8>(), 0..64),
        claims in prop::collection::vec(any::<u8>(), 0..128),
        signature in prop::collection::vec(any::<u8>(), 0..96),
    ) {
        let token = format!("{}.{}.{}", URL_SAFE_NO_PAD.encode(header), URL_SAFE_NO_PAD.encode(claims), URL_SAFE_NO_PAD.encode(signature));
        let bearer = format!("Bearer {}", token);
        prop_assert!(!authenticate(&policy(), &bearer));
    }

    #[test]
    fn forged_tokens_with_plausible_headers_are_refused(
        alg in prop_oneof![Just("none"), Just("HS256"), Just("ES256"), Just("RS256"), Just("EdDSA")],
        kid in "[ -~]{0,40}",
        iss in prop_oneof![Just("http://127.0.0.1:8400".to_owned()), "[a-z:/.]{0,30}".prop_map(|s| s), Just("kgc_0123456789abcdef0123456789abcdef.SHA256:AAAA".to_owned())],
        signature in prop::collection::vec(any::<u8>(), 0..96),
    ) {
        let header = serde_json::json!({"alg": alg, "typ": "at+jwt", "kid": kid});
        let claims = serde_json::json!({"iss": iss, "sub": "kgc_0123456789abcdef0123456789abcdef", "aud": "https://orders.shop.svc",
            "client_id": "kgc_0123456789abcdef0123456789abcdef", "scope": "orders.read", "iat": 1_800_000_000u64, "exp": 1_800_000_600u64, "jti": "j"});
        let token = format!(
            "{}.{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string()),
            URL_SAFE_NO_PAD.encode(signature)
        );
        let bearer = format!("Bearer {}", token);
        prop_assert!(!authenticate(&policy(), &bearer));
    }
}
