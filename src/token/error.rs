//! OAuth 2.0 error responses (RFC 6749 §5.2, RFC 8707 §2, RFC 7009, RFC 7662).

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

/// An OAuth error code with the HTTP status it travels with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    InvalidRequest,
    InvalidClient,
    InvalidGrant,
    UnauthorizedClient,
    UnsupportedGrantType,
    InvalidScope,
    InvalidTarget,
    /// Too many failed authentications from this address for this client.
    SlowDown,
    PayloadTooLarge,
    /// The request body did not arrive in time.
    RequestTimeout,
    /// The revocation could not be stored yet (RFC 7009 §2.2.1: retry later).
    Unavailable,
    ServerError,
}

impl ErrorCode {
    /// The `error` value; also the metrics label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::InvalidRequest | Self::PayloadTooLarge | Self::RequestTimeout => {
                "invalid_request"
            }
            Self::InvalidClient => "invalid_client",
            Self::InvalidGrant => "invalid_grant",
            Self::UnauthorizedClient => "unauthorized_client",
            Self::UnsupportedGrantType => "unsupported_grant_type",
            Self::InvalidScope => "invalid_scope",
            Self::InvalidTarget => "invalid_target",
            Self::SlowDown => "slow_down",
            Self::Unavailable => "temporarily_unavailable",
            Self::ServerError => "server_error",
        }
    }

    fn status(self) -> StatusCode {
        match self {
            Self::InvalidClient => StatusCode::UNAUTHORIZED,
            Self::SlowDown => StatusCode::TOO_MANY_REQUESTS,
            Self::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Self::RequestTimeout => StatusCode::REQUEST_TIMEOUT,
            Self::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            Self::ServerError => StatusCode::INTERNAL_SERVER_ERROR,
            _ => StatusCode::BAD_REQUEST,
        }
    }
}

/// An error response. The description is fixed text chosen by keygate: never request
/// contents, never a secret, never an internal error chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OAuthError {
    pub code: ErrorCode,
    pub description: String,
}

impl OAuthError {
    pub fn new(code: ErrorCode, description: impl Into<String>) -> Self {
        Self {
            code,
            description: description.into(),
        }
    }
}

#[derive(Serialize)]
struct Body<'a> {
    error: &'static str,
    error_description: &'a str,
}

impl IntoResponse for OAuthError {
    fn into_response(self) -> Response {
        let mut response = (
            self.code.status(),
            Json(Body {
                error: self.code.as_str(),
                error_description: &self.description,
            }),
        )
            .into_response();
        let headers = response.headers_mut();
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        headers.insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
        match self.code {
            // RFC 6749 §5.2: a 401 names the scheme the client may authenticate with.
            ErrorCode::InvalidClient => {
                headers.insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Basic realm=\"keygate\", charset=\"UTF-8\""),
                );
            }
            ErrorCode::SlowDown => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from_static("60"));
            }
            ErrorCode::Unavailable => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            }
            _ => {}
        }
        response
    }
}
