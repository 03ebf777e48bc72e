//! The Kubernetes API client of the `keygate` commands: kube's own service stack (base URL,
//! retries of server errors, authentication, impersonation headers, connect/read/write
//! timeouts, TLS from the kubeconfig) over a hyper client whose read buffer stays small.
//!
//! hyper grows a connection's read buffer while it reads a large response (up to about
//! 400 KiB by default, for a list page of 500 ApiClients) and keeps it for the life of the
//! connection. The operator's ~40 pooled and watch connections held 8 MB of such buffers
//! while idle at 10,000 ApiClients (heaptrack). A capped buffer only means more reads for a
//! large body; a response's head must still fit, and API server heads are a few hundred bytes.

use hyper_timeout::TimeoutConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use kube::client::retry::RetryPolicy;
use kube::client::{ClientBuilder, ConfigExt};
use kube::{Client, Config};
use tower::ServiceBuilder;
use tower::retry::RetryLayer;

/// The largest read buffer of one API connection.
pub const MAX_READ_BUFFER: usize = 32 * 1024;

/// Why no client could be made.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no Kubernetes configuration (in-cluster service account or KUBECONFIG): {0}")]
    Config(#[from] kube::config::InferConfigError),
    #[error("Kubernetes client: {0}")]
    Client(#[from] kube::Error),
    /// Holds the proxy's host only: a proxy URL can carry a user and password.
    #[error("the kubeconfig names a proxy (host {0}); keygate talks to the API server directly")]
    Proxy(String),
}

/// A client from the in-cluster configuration or `KUBECONFIG`, as `kube::Client::try_default`.
pub async fn client() -> Result<Client, Error> {
    from_config(Config::infer().await?)
}

/// A client for `config` with kube's layers over a hyper client with [`MAX_READ_BUFFER`].
pub fn from_config(config: Config) -> Result<Client, Error> {
    if let Some(proxy) = &config.proxy_url {
        return Err(Error::Proxy(proxy.host().unwrap_or_default().to_owned()));
    }
    if rustls::crypto::CryptoProvider::get_default().is_none() {
        // Only fails when another thread installed one in between, which is as good.
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    }
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    let mut connector = TimeoutConnector::new(config.rustls_https_connector_with_connector(http)?);
    connector.set_connect_timeout(config.connect_timeout);
    connector.set_read_timeout(config.read_timeout);
    connector.set_write_timeout(config.write_timeout);
    connector.set_reset_reader_on_write(config.reset_reader_on_write);
    let hyper = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
        .http1_max_buf_size(MAX_READ_BUFFER)
        .build(connector);
    let service = ServiceBuilder::new()
        .layer(config.base_uri_layer())
        .option_layer(
            config
                .default_retry
                .then(|| RetryLayer::new(RetryPolicy::server_retry())),
        )
        .option_layer(config.auth_layer()?)
        .layer(config.extra_headers_layer()?)
        .map_err(tower::BoxError::from)
        .service(hyper);
    Ok(ClientBuilder::new(service, config.default_namespace).build())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_proxy_is_refused_without_its_credentials() {
        let mut config = Config::new("https://127.0.0.1:6443".parse().unwrap());
        config.proxy_url = Some("http://user:hunter2@proxy.example:3128".parse().unwrap());
        let Err(error) = from_config(config) else {
            panic!("a client through a proxy");
        };
        let error = error.to_string();
        assert!(error.contains("proxy.example"), "{error}");
        assert!(
            !error.contains("hunter2") && !error.contains("user"),
            "{error}"
        );
    }
}
