//! A ScopePolicy's route rules compiled for the sidecar.
//!
//! For every request the sidecar
//! 1. normalises the path with [`normalize`] and refuses the request when that fails,
//! 2. asks [`CompiledPolicy::decide`] what the request needs: the **first** rule, in the
//!    order of `spec.rules`, whose methods contain the request's method and one of whose path
//!    patterns matches decides; when none matches, `defaultAction` does,
//! 3. enforces the [`Access`]: nothing for `Public`, a valid credential for `Authenticated`,
//!    a valid credential whose scopes satisfy the [`Requirement`] for `Scopes`, a 403 for
//!    `Deny`.
//!
//! Compiling turns methods into a bitset and path patterns into segment matchers, so deciding
//! is a linear scan that never allocates. Everything here is pure: no I/O.

pub mod document;
mod matcher;
mod methods;
pub mod path;
mod pattern;
pub mod stream;

pub use document::{BuildError, PolicyDocument};
pub use matcher::{
    Access, CompiledPolicy, Decision, Requirement, RequirementMode, RuleError, RuleRef,
};
pub use methods::{MethodError, MethodSet};
pub use path::{PathError, normalize};
pub use pattern::{PathPattern, PatternError};
