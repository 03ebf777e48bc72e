//! Reading a JWT's claims in tests, without verifying it (the code under test verifies).

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

/// The claims of a compact JWT.
pub fn claims_of(token: &str) -> serde_json::Value {
    let payload = token.split('.').nth(1).expect("a JWT");
    let json = URL_SAFE_NO_PAD.decode(payload).expect("base64url claims");
    serde_json::from_slice(&json).expect("JSON claims")
}

/// The `jti` claim of a compact JWT.
pub fn jti_of(token: &str) -> String {
    claims_of(token)["jti"].as_str().expect("a jti").to_owned()
}
