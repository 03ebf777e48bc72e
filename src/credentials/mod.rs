//! Credential material: client ids, secrets and API keys, key pairs, fingerprints, JWKs and
//! Snowflake-style key-pair JWTs. Pure functions over bytes and PEM; no I/O but the OS RNG.

mod keypair_jwt;
mod keys;
mod material;
mod secret;

pub use keypair_jwt::*;
pub use keys::*;
pub use material::*;
pub use secret::*;

/// Why credential material could not be made or used. Messages never contain key material.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("not a PEM document: {0}")]
    Pem(String),
    /// A PEM document of a key format keygate does not read; the message says how to convert.
    #[error("{0}")]
    KeyFormat(String),
    #[error("unsupported key: {0}")]
    UnsupportedKey(String),
    #[error("key generation failed: {0}")]
    Generate(String),
    #[error("signing failed: {0}")]
    Sign(String),
    #[error("the operating system random number generator failed: {0}")]
    Random(String),
    #[error("invalid key-pair JWT: {0}")]
    InvalidJwt(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
