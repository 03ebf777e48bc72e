//! The sidecar's credential parsing and verification never panics on any Authorization
//! header, and never accepts a credential it was not given keys for.
#![no_main]

use std::sync::OnceLock;
use std::time::Duration;

use libfuzzer_sys::fuzz_target;

fn policy() -> &'static keygate::sidecar::auth::LoadedPolicy {
    static POLICY: OnceLock<keygate::sidecar::auth::LoadedPolicy> = OnceLock::new();
    POLICY.get_or_init(|| {
        let document = keygate::policy::PolicyDocument::parse(include_bytes!("../../tests/fixtures/policy.json"))
            .expect("fixture policy parses");
        keygate::sidecar::auth::LoadedPolicy::load(document, |_| unreachable!()).expect("fixture policy loads")
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(value) = http::HeaderValue::from_bytes(data) else { return };
    let mut headers = http::HeaderMap::new();
    headers.insert(http::header::AUTHORIZATION, value);
    let runtime = tokio::runtime::Builder::new_current_thread().build().expect("runtime");
    let result = runtime.block_on(policy().authenticate(&headers, Duration::from_secs(30), 1_800_000_000));
    // The fixture holds no API keys and only keys whose private halves are not in this
    // program: no input can authenticate.
    assert!(result.is_err());
});
