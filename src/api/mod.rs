//! Custom resource types of the `keygate.dev/v1alpha1` API.
//!
//! These types are the single source of the CRD schemas: `keygate crd` prints them and
//! `crds/` holds the committed output (a test fails when the two drift apart). Everything
//! that can be checked on one object alone is in the schema (patterns, bounds, enums and a
//! few CEL rules), so the API server and `keygate dev` ([`parse_object`]) reject the same
//! input.

// kube's `printcolumn(...)` repeats `type_ = ...` by design; clippy mistakes that for a
// duplicated attribute.
#[allow(clippy::duplicated_attributes)]
mod client;
#[allow(clippy::duplicated_attributes)]
mod policy;
#[allow(clippy::duplicated_attributes)]
mod role;
mod schema;

pub use client::*;
pub use policy::*;
pub use role::*;
pub use schema::{check_schema, crd_of, parse_object};

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

/// The API group of every keygate resource.
pub const GROUP: &str = "keygate.dev";
/// The API version of every keygate resource.
pub const VERSION: &str = "v1alpha1";
/// The `type` of the condition every keygate resource reports.
pub const READY: &str = "Ready";

/// The CRDs of every keygate resource, in a stable order, as [`crd_of`] makes them.
pub fn crds() -> Vec<CustomResourceDefinition> {
    vec![
        crd_of::<M2MRole>(),
        crd_of::<ApiClient>(),
        crd_of::<ScopePolicy>(),
    ]
}

/// All CRDs as one multi-document YAML stream, exactly as committed in `crds/`.
pub fn crds_yaml() -> Result<String, serde_yaml_ng::Error> {
    let mut out = String::new();
    for crd in crds() {
        out.push_str("---\n");
        out.push_str(&serde_yaml_ng::to_string(&crd)?);
    }
    Ok(out)
}

/// Builds a `Ready` condition for `generation`, keeping the previous transition time when
/// the status did not change so that status writes stay idempotent.
pub fn ready_condition(
    ready: bool,
    reason: &str,
    message: impl Into<String>,
    generation: Option<i64>,
    previous: &[Condition],
    now: Time,
) -> Condition {
    let status = if ready { "True" } else { "False" };
    let last_transition_time = previous
        .iter()
        .find(|c| c.type_ == READY && c.status == status)
        .map(|c| c.last_transition_time.clone())
        .unwrap_or(now);
    Condition {
        type_: READY.to_owned(),
        status: status.to_owned(),
        reason: reason.to_owned(),
        message: message.into(),
        observed_generation: generation,
        last_transition_time,
    }
}

/// Carries over `lastTransitionTime` from `stored` for conditions whose status is unchanged.
pub fn keep_transition_times(conditions: &mut [Condition], stored: &[Condition]) {
    for condition in conditions {
        if let Some(previous) = stored
            .iter()
            .find(|c| c.type_ == condition.type_ && c.status == condition.status)
        {
            condition.last_transition_time = previous.last_transition_time.clone();
        }
    }
}

/// Whether `conditions` hold a `Ready=True` condition.
pub fn is_ready(conditions: &[Condition]) -> bool {
    conditions
        .iter()
        .any(|c| c.type_ == READY && c.status == "True")
}

// Rules about one value are OpenAPI `pattern`s, `enum`s and bounds: the API server checks
// them at no CEL cost, and its error names the field and the pattern. CEL is kept for what a
// schema keyword cannot say (durations, rules across fields), and `tests/crds.rs` keeps every
// CEL rule within the API server's cost budget.

/// An absolute URI (scheme `://` authority …) without a fragment, as RFC 8707 requires.
pub(crate) const RESOURCE_URI_PATTERN: &str = r"^[a-zA-Z][a-zA-Z0-9+.-]*://[^/#\s]+[^#\s]*$";
/// One scope token: letters, digits and `_ . : / - *`, starting with a letter, digit or `*`.
pub(crate) const SCOPE_PATTERN: &str = r"^[A-Za-z0-9*][A-Za-z0-9_.:/*-]*$";
/// A DNS subdomain name (RFC 1123), as Kubernetes object names are.
pub(crate) const NAME_PATTERN: &str =
    r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?([.][a-z0-9]([-a-z0-9]*[a-z0-9])?)*$";
/// A DNS label (RFC 1123), as namespace names are.
pub(crate) const LABEL_PATTERN: &str = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$";
/// A route rule's name.
pub(crate) const RULE_NAME_PATTERN: &str = r"^[A-Za-z0-9][A-Za-z0-9_-]*$";
/// CEL: an access-token lifetime between one minute and one day.
pub(crate) const TOKEN_LIFETIME_RULE: &str =
    "duration(self) >= duration('1m') && duration(self) <= duration('24h')";

/// Parses a duration in the one syntax the CRDs accept (their CEL rules call `duration()`,
/// which is Go's `time.ParseDuration`): numbers with a unit each, `ns`, `us`, `ms`, `s`, `m`
/// or `h`, e.g. `90s`, `15m`, `1h30m`, `1.5h`, `720h`; `0` alone is zero. Every keygate
/// duration, in objects and on the command line, goes through here, so what one accepts the
/// other does too. Negative durations are refused.
pub fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
    let refuse =
        |why: &str| format!("{text:?} is not a duration such as 90s, 15m, 1h30m or 720h ({why})");
    let rest = match text.strip_prefix('-') {
        Some(_) => return Err(format!("{text:?}: a duration must not be negative")),
        None => text.strip_prefix('+').unwrap_or(text),
    };
    if rest == "0" {
        return Ok(std::time::Duration::ZERO);
    }
    if rest.is_empty() {
        return Err(refuse("empty"));
    }
    let mut nanos: u128 = 0;
    let mut rest = rest;
    while !rest.is_empty() {
        let number_end = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(|| refuse("a number without a unit; units are ns, us, ms, s, m and h"))?;
        let (number, tail) = rest.split_at(number_end);
        let unit_end = tail
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(tail.len());
        let (unit, tail) = tail.split_at(unit_end);
        let scale: u128 = match unit {
            "ns" => 1,
            "us" | "\u{b5}s" | "\u{3bc}s" => 1_000,
            "ms" => 1_000_000,
            "s" => 1_000_000_000,
            "m" => 60_000_000_000,
            "h" => 3_600_000_000_000,
            "" => {
                return Err(refuse(
                    "a number without a unit; units are ns, us, ms, s, m and h",
                ));
            }
            other => {
                return Err(refuse(&format!(
                    "unknown unit {other:?}; units are ns, us, ms, s, m and h"
                )));
            }
        };
        let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
        if (whole.is_empty() && fraction.is_empty()) || fraction.contains('.') {
            return Err(refuse(&format!("{number:?} is not a number")));
        }
        let whole: u128 = if whole.is_empty() {
            0
        } else {
            whole.parse().map_err(|_| refuse("too long"))?
        };
        // Digits beyond nanoseconds do not count, as in Go.
        let mut part = whole.checked_mul(scale).ok_or_else(|| refuse("too long"))?;
        let mut divisor = 1u128;
        for digit in fraction.bytes().take(30) {
            divisor *= 10;
            part += u128::from(digit - b'0') * scale / divisor;
        }
        nanos = nanos.checked_add(part).ok_or_else(|| refuse("too long"))?;
        rest = tail;
    }
    let nanos = u64::try_from(nanos).map_err(|_| refuse("too long"))?;
    Ok(std::time::Duration::from_nanos(nanos))
}

#[cfg(test)]
mod tests {
    use super::parse_duration;
    use std::time::Duration;

    #[test]
    fn durations_are_go_durations_as_the_crds_cel_rules_parse_them() {
        let secs = Duration::from_secs;
        for (text, expected) in [
            ("90s", secs(90)),
            ("15m", secs(900)),
            ("1h30m", secs(5400)),
            ("720h", secs(720 * 3600)),
            ("1.5h", secs(5400)),
            (".5s", Duration::from_millis(500)),
            ("1h0m0s", secs(3600)),
            ("300ms", Duration::from_millis(300)),
            ("2us", Duration::from_micros(2)),
            ("+5s", secs(5)),
            ("0", Duration::ZERO),
            ("0s", Duration::ZERO),
        ] {
            assert_eq!(parse_duration(text), Ok(expected), "{text}");
        }
        for text in [
            "",
            "1",
            "1d",
            "15 minutes",
            "1h 30m",
            "15min",
            "h",
            "1.2.3s",
            "s",
            "-1s",
            "1e3s",
            "99999999999999999999h",
        ] {
            assert!(parse_duration(text).is_err(), "{text:?} accepted");
        }
        assert!(
            parse_duration("1d")
                .unwrap_err()
                .contains("unknown unit \"d\"")
        );
        assert!(parse_duration("-5m").unwrap_err().contains("negative"));
    }
}
