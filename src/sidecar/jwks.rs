//! Keys of external issuers, fetched from their `jwksUri`: cached for a TTL, refetched when a
//! token names an unknown `kid` (at most once per interval), and the last good set kept when
//! a fetch fails, so an issuer's outage never turns into refusing every request.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use jsonwebtoken::jwk::JwkSet;
use tokio::sync::{Mutex, RwLock};

use crate::credentials::VerifyingKey;

/// How long fetched keys are used before a refresh.
const TTL: Duration = Duration::from_secs(300);
/// The least time between two fetches (refetch on an unknown `kid` included).
const MIN_REFETCH: Duration = Duration::from_secs(10);
/// The largest JWKS document accepted.
const MAX_JWKS_BYTES: usize = 256 * 1024;

#[derive(Default)]
struct Keys {
    by_kid: HashMap<String, VerifyingKey>,
    fetched_at: Option<Instant>,
    attempted_at: Option<Instant>,
}

/// One issuer's JWKS.
pub struct JwksCache {
    uri: String,
    http: reqwest::Client,
    keys: RwLock<Keys>,
    /// Single flight: one fetch at a time.
    fetching: Mutex<()>,
}

impl JwksCache {
    pub fn new(uri: String, http: reqwest::Client) -> Arc<Self> {
        Arc::new(Self {
            uri,
            http,
            keys: RwLock::new(Keys::default()),
            fetching: Mutex::new(()),
        })
    }

    /// The key named `kid`, fetching when the cache is stale or lacks it.
    pub async fn key(&self, kid: &str) -> Option<VerifyingKey> {
        {
            let keys = self.keys.read().await;
            let fresh = keys.fetched_at.is_some_and(|t| t.elapsed() < TTL);
            if let Some(key) = keys.by_kid.get(kid).filter(|_| fresh) {
                return Some(key.clone());
            }
        }
        self.refresh().await;
        self.keys.read().await.by_kid.get(kid).cloned()
    }

    async fn refresh(&self) {
        let _flight = self.fetching.lock().await;
        {
            let keys = self.keys.read().await;
            if keys.attempted_at.is_some_and(|t| t.elapsed() < MIN_REFETCH) {
                return;
            }
        }
        self.keys.write().await.attempted_at = Some(Instant::now());
        match self.fetch().await {
            Ok(by_kid) => {
                let mut keys = self.keys.write().await;
                keys.by_kid = by_kid;
                keys.fetched_at = Some(Instant::now());
            }
            Err(error) => {
                tracing::warn!(uri = %self.uri, %error, "JWKS fetch failed; keeping the last good keys");
            }
        }
    }

    async fn fetch(&self) -> Result<HashMap<String, VerifyingKey>, String> {
        let response = self
            .http
            .get(&self.uri)
            .timeout(Duration::from_secs(5))
            .send()
            .await
            .map_err(|e| format!("request failed: {e}"))?;
        if !response.status().is_success() {
            return Err(format!("status {}", response.status()));
        }
        let body = response
            .bytes()
            .await
            .map_err(|e| format!("reading body: {e}"))?;
        if body.len() > MAX_JWKS_BYTES {
            return Err("JWKS too large".into());
        }
        let set: JwkSet = serde_json::from_slice(&body).map_err(|e| format!("not a JWKS: {e}"))?;
        let mut keys = HashMap::new();
        for jwk in &set.keys {
            // Keys for other uses or of unsupported types are skipped, not fatal.
            if let Ok(key) = VerifyingKey::from_jwk(jwk) {
                keys.insert(key.kid.clone(), key);
            }
        }
        Ok(keys)
    }
}
