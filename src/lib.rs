//! keygate: machine-to-machine API authentication for Kubernetes.
#![forbid(unsafe_code)]

pub mod admin;
pub mod api;
pub mod audit;
pub mod capture;
pub mod check;
pub mod cli;
pub mod connections;
pub mod controller;
pub mod credentials;
pub mod dev;
pub mod grants;
pub mod kubernetes;
pub mod operator;
pub mod policy;
pub mod registry;
pub mod sidecar;
pub mod tls;
pub mod token;
pub mod webhook;
