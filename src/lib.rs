//! keygate: machine-to-machine API authentication for Kubernetes.
#![forbid(unsafe_code)]

pub mod api;
pub mod credentials;
