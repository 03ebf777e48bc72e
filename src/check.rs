//! `keygate check`: waits until the admission webhook and the token server answer, for the
//! Helm chart's post-install and post-upgrade hook (docs/decisions/0002).
//!
//! - The webhook: a server-side dry-run create, through the API server, of the ApiClient
//!   [`STARTUP_CHECK_CLIENT`], which the validating webhook always refuses. The API server
//!   relays the refusal as `admission webhook "validate.keygate.dev" denied the request`:
//!   that proves it reaches the webhook and trusts its certificate, whatever the failure
//!   policy. A dry run persists nothing.
//! - The token server: `GET` of its metadata document over TLS, trusting `ca.crt` of the
//!   ConfigMap `keygate-ca` (or a CA file), answered with 200 and the expected `issuer`.
//!
//! Each check is retried every `--interval` until it passes; all must pass within
//! `--timeout`, or the last error of each failing one is reported.

use std::path::PathBuf;
use std::time::Duration;

use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::PostParams;
use kube::{Api, Client};

use crate::api::{ApiClient, ApiClientSpec};
use crate::sidecar::forward::error_chain;
use crate::webhook::validate::{STARTUP_CHECK_CLIENT, VALIDATING_WEBHOOK};

/// How long one attempt of one check may take.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);

/// Settings of `keygate check`.
#[derive(clap::Args, Debug, Clone)]
pub struct CheckArgs {
    /// Give up after this long.
    #[arg(long, env = "KEYGATE_CHECK_TIMEOUT", default_value = "5m", value_parser = crate::connections::positive_duration)]
    pub timeout: Duration,
    /// Wait this long between attempts.
    #[arg(long, env = "KEYGATE_CHECK_INTERVAL", default_value = "2s", value_parser = crate::connections::positive_duration)]
    pub interval: Duration,
    /// The namespace of the CA ConfigMap (the release's).
    #[arg(long, env = "POD_NAMESPACE", default_value = "keygate-system")]
    pub namespace: String,
    /// The namespace of the dry-run ApiClient: one the validating webhook sees. Empty:
    /// --namespace.
    #[arg(long, env = "KEYGATE_CHECK_WEBHOOK_NAMESPACE", default_value = "")]
    pub webhook_namespace: String,
    /// Check the validating webhook (false: when the chart installs none).
    #[arg(long, env = "KEYGATE_CHECK_WEBHOOK", default_value_t = true, action = clap::ArgAction::Set)]
    pub webhook: bool,
    /// The webhook the refusal must come from, as the ValidatingWebhookConfiguration names it.
    #[arg(long, env = "KEYGATE_CHECK_WEBHOOK_NAME", default_value = VALIDATING_WEBHOOK)]
    pub webhook_name: String,
    /// The token server's metadata document, as reachable from here (e.g. the Service).
    /// Empty: the token server is not checked.
    #[arg(
        long,
        env = "KEYGATE_CHECK_METADATA_URL",
        default_value = "https://keygate.keygate-system.svc/.well-known/openid-configuration"
    )]
    pub metadata_url: String,
    /// The `issuer` the metadata document must name.
    #[arg(
        long,
        env = "KEYGATE_ISSUER",
        default_value = "https://keygate.keygate-system.svc"
    )]
    pub issuer: String,
    /// The ConfigMap in --namespace whose `ca.crt` the token server's certificate must chain
    /// to (https:// only).
    #[arg(long, env = "KEYGATE_CHECK_CA_CONFIGMAP", default_value = "keygate-ca")]
    pub ca_configmap: String,
    /// A PEM file to trust instead of the ConfigMap.
    #[arg(long, env = "KEYGATE_CA_FILE")]
    pub ca_file: Option<PathBuf>,
}

/// Why `keygate check` failed: each check still failing at the timeout, with its last error.
#[derive(Debug, thiserror::Error)]
#[error("not answering after {timeout:?}:\n{}", failing.iter().map(|(what, error)| format!("  {what}: {error}")).collect::<Vec<_>>().join("\n"))]
pub struct CheckFailed {
    pub timeout: Duration,
    pub failing: Vec<(&'static str, String)>,
}

/// One of the checks.
#[derive(Debug, Clone, Copy)]
enum Check {
    Webhook,
    TokenServer,
}

impl Check {
    fn what(self) -> &'static str {
        match self {
            Self::Webhook => "the admission webhook",
            Self::TokenServer => "the token server",
        }
    }

    async fn attempt(self, client: &Client, args: &CheckArgs) -> Result<(), String> {
        let attempt = async {
            match self {
                Self::Webhook => check_webhook(client, args).await,
                Self::TokenServer => check_token_server(client, args).await,
            }
        };
        tokio::time::timeout(ATTEMPT_TIMEOUT, attempt)
            .await
            .unwrap_or_else(|_| Err(format!("no answer within {ATTEMPT_TIMEOUT:?}")))
    }
}

/// Runs the checks until all pass (`Ok`) or `args.timeout` passes.
pub async fn run(client: Client, args: &CheckArgs) -> Result<(), CheckFailed> {
    let deadline = tokio::time::Instant::now() + args.timeout;
    let mut pending = Vec::new();
    if args.webhook {
        pending.push(Check::Webhook);
    }
    if !args.metadata_url.is_empty() {
        pending.push(Check::TokenServer);
    }
    let mut errors = Vec::new();
    loop {
        errors.clear();
        for check in std::mem::take(&mut pending) {
            let what = check.what();
            match check.attempt(&client, args).await {
                Ok(()) => tracing::info!("{what} answers"),
                Err(error) => {
                    tracing::info!(%error, "{what} does not answer yet");
                    pending.push(check);
                    errors.push((what, error));
                }
            }
        }
        if pending.is_empty() {
            return Ok(());
        }
        if tokio::time::Instant::now() + args.interval > deadline {
            return Err(CheckFailed {
                timeout: args.timeout,
                failing: errors,
            });
        }
        tokio::time::sleep(args.interval).await;
    }
}

/// The dry-run create of the reserved ApiClient, passing when `webhook_name` refuses it.
async fn check_webhook(client: &Client, args: &CheckArgs) -> Result<(), String> {
    let namespace = if args.webhook_namespace.is_empty() {
        &args.namespace
    } else {
        &args.webhook_namespace
    };
    let api: Api<ApiClient> = Api::namespaced(client.clone(), namespace);
    let object = ApiClient::new(STARTUP_CHECK_CLIENT, ApiClientSpec::default());
    let params = PostParams {
        dry_run: true,
        ..PostParams::default()
    };
    webhook_verdict(
        api.create(&params, &object).await.map(|_| ()),
        &args.webhook_name,
        namespace,
    )
}

/// Whether the answer to the dry run shows that the API server called `webhook` and got its
/// refusal.
pub fn webhook_verdict(
    answer: kube::Result<()>,
    webhook: &str,
    namespace: &str,
) -> Result<(), String> {
    let denied = format!("admission webhook \"{webhook}\" denied the request");
    match answer {
        Err(kube::Error::Api(status)) if status.message.contains(&denied) => Ok(()),
        Err(kube::Error::Api(status)) if status.message.contains(&format!("\"{webhook}\"")) => {
            Err(format!(
                "the API server cannot call the webhook {webhook}: {}",
                status.message
            ))
        }
        Err(error) => Err(format!(
            "the dry-run create of ApiClient {namespace}/{STARTUP_CHECK_CLIENT} failed before the webhook {webhook} refused it: {error}"
        )),
        Ok(()) => Err(format!(
            "the API server admitted the dry-run create of ApiClient {namespace}/{STARTUP_CHECK_CLIENT} without calling the webhook {webhook}: is its ValidatingWebhookConfiguration installed, and does its namespaceSelector select {namespace}?"
        )),
    }
}

/// `GET` of the metadata document, trusting the CA of the ConfigMap or file for https://.
async fn check_token_server(client: &Client, args: &CheckArgs) -> Result<(), String> {
    let mut http = reqwest::Client::builder().no_proxy();
    if args.metadata_url.starts_with("https://") {
        let pem = match &args.ca_file {
            Some(path) => {
                std::fs::read(path).map_err(|e| format!("reading {}: {e}", path.display()))?
            }
            None => published_ca(client, &args.namespace, &args.ca_configmap)
                .await?
                .into_bytes(),
        };
        let roots =
            crate::tls::pem_roots(&pem).ok_or_else(|| "the CA holds no certificate".to_owned())?;
        http = http.tls_certs_only(roots);
    }
    let http = http
        .build()
        .map_err(|e| format!("building the HTTP client: {e}"))?;
    let response = http
        .get(&args.metadata_url)
        .send()
        .await
        .map_err(|e| format!("GET {}: {}", args.metadata_url, error_chain(&e)))?;
    let status = response.status();
    if !status.is_success() {
        return Err(format!("GET {}: HTTP {status}", args.metadata_url));
    }
    let document: serde_json::Value = response
        .json()
        .await
        .map_err(|e| format!("GET {}: not a metadata document: {e}", args.metadata_url))?;
    match document.get("issuer").and_then(|i| i.as_str()) {
        Some(issuer) if issuer == args.issuer => Ok(()),
        other => Err(format!(
            "GET {}: the issuer is {other:?}, not {:?}",
            args.metadata_url, args.issuer
        )),
    }
}

/// `ca.crt` of the ConfigMap `name` in `namespace`.
async fn published_ca(client: &Client, namespace: &str, name: &str) -> Result<String, String> {
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
    let config_map = api
        .get_opt(name)
        .await
        .map_err(|e| format!("reading the ConfigMap {namespace}/{name}: {e}"))?
        .ok_or_else(|| format!("the ConfigMap {namespace}/{name} does not exist yet"))?;
    config_map
        .data
        .and_then(|mut data| data.remove("ca.crt"))
        .ok_or_else(|| format!("the ConfigMap {namespace}/{name} has no ca.crt"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refusal(message: &str) -> kube::Result<()> {
        Err(kube::Error::Api(
            kube::core::Status::failure(message, "BadRequest")
                .with_code(400)
                .boxed(),
        ))
    }

    #[test]
    fn only_the_webhooks_own_refusal_passes() {
        let verdict = |answer| webhook_verdict(answer, VALIDATING_WEBHOOK, "keygate-system");
        // What kube-apiserver relays from a denying webhook.
        assert_eq!(
            verdict(refusal(
                "admission webhook \"validate.keygate.dev\" denied the request: keygate: ApiClient keygate-system/keygate-startupcheck is invalid: metadata.name: reserved"
            )),
            Ok(())
        );
        // A webhook that cannot be called (failurePolicy Fail).
        let error = verdict(refusal(
            "Internal error occurred: failed calling webhook \"validate.keygate.dev\": tls: failed to verify certificate",
        ))
        .unwrap_err();
        assert!(
            error.starts_with("the API server cannot call the webhook"),
            "{error}"
        );
        // No webhook called (failurePolicy Ignore, or none installed).
        let error = verdict(Ok(())).unwrap_err();
        assert!(error.contains("without calling the webhook"), "{error}");
        // Refused before admission (RBAC, a missing CRD).
        let error = verdict(refusal("apiclients.keygate.dev is forbidden")).unwrap_err();
        assert!(error.contains("failed before the webhook"), "{error}");
    }
}
