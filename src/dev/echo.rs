//! The built-in upstream of `keygate dev`: answers every request with what it received, so
//! the walkthrough shows which identity the sidecar passed on.

use axum::Router;
use axum::extract::Request;
use axum::response::Json;
use serde_json::{Map, Value, json};

/// A router that echoes method, path, query and the `X-Keygate-*` headers as JSON.
pub fn router() -> Router {
    Router::new().fallback(echo)
}

async fn echo(request: Request) -> Json<Value> {
    let identity: Map<String, Value> = request
        .headers()
        .iter()
        .filter(|(name, _)| name.as_str().starts_with("x-keygate-"))
        .map(|(name, value)| {
            (
                name.as_str().to_owned(),
                Value::from(value.to_str().unwrap_or_default()),
            )
        })
        .collect();
    Json(json!({
        "upstream": "keygate dev echo",
        "method": request.method().as_str(),
        "path": request.uri().path(),
        "query": request.uri().query(),
        "identity": identity,
    }))
}
