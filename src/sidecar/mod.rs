//! The keygate sidecar: authenticates requests in front of a workload and forwards the
//! authorized ones to it.

pub mod auth;
pub mod clients;
pub mod command;
pub mod forward;
pub mod jwks;
pub mod lane;
pub mod server;
pub mod stream;
