//! The audit trail (docs/audit.md): one event per sidecar decision and per outcome at the
//! token, revocation and introspection endpoints, written through `tracing` under the target
//! [`TARGET`] so that it can be routed apart from the other logs. Allowed outcomes are
//! sampled; refusals are all written, up to a rate per second for each kind of caller,
//! beyond which they are counted (and the next written refusal says how many were left out).

use std::str::FromStr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use prometheus_client::metrics::counter::Counter;

/// The `tracing` target of every audit event.
pub const TARGET: &str = "keygate::audit";

/// The share of allowed outcomes written to the audit trail, from 0 (none) to 1 (every one).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SampleRate(f64);

impl FromStr for SampleRate {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        match text.trim().parse::<f64>() {
            Ok(rate) if (0.0..=1.0).contains(&rate) => Ok(Self(rate)),
            _ => Err(format!("{text:?} is not a number from 0 to 1")),
        }
    }
}

impl std::fmt::Display for SampleRate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// What the audit trail writes: `--audit-allowed-sample` and `--audit-refused-per-second`.
#[derive(clap::Args, Debug, Clone, Copy, PartialEq)]
pub struct AuditConfig {
    /// Share of allowed outcomes (allowed requests, issued tokens, introspections) written to
    /// the audit trail (target keygate::audit): 1 every one, 0.01 one in a hundred, 0 none.
    /// Refusals and revocations are always written.
    #[arg(long, env = "KEYGATE_AUDIT_ALLOWED_SAMPLE", default_value = "1")]
    pub audit_allowed_sample: SampleRate,
    /// Most refusal events written per second, for unauthenticated callers and for
    /// authenticated ones each; beyond it they are counted in the audit_dropped metric and
    /// the next refusal written says how many were left out (`suppressed`).
    #[arg(long, env = "KEYGATE_AUDIT_REFUSED_PER_SECOND", default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..))]
    pub audit_refused_per_second: u32,
}

impl Default for AuditConfig {
    fn default() -> Self {
        Self {
            audit_allowed_sample: SampleRate(1.0),
            audit_refused_per_second: 100,
        }
    }
}

impl AuditConfig {
    /// The environment that gives a process these settings, for those that differ from the
    /// defaults (how the webhook passes them to injected sidecars).
    pub fn changed_env(&self) -> Vec<(&'static str, String)> {
        let default = Self::default();
        let mut env = Vec::new();
        if self.audit_allowed_sample != default.audit_allowed_sample {
            env.push((
                "KEYGATE_AUDIT_ALLOWED_SAMPLE",
                self.audit_allowed_sample.to_string(),
            ));
        }
        if self.audit_refused_per_second != default.audit_refused_per_second {
            env.push((
                "KEYGATE_AUDIT_REFUSED_PER_SECOND",
                self.audit_refused_per_second.to_string(),
            ));
        }
        env
    }
}

/// The most bytes of a caller-chosen text (a requested scope list, say) an event carries.
pub const MAX_CALLER_TEXT: usize = 256;

/// `text` as an event carries it: cut to [`MAX_CALLER_TEXT`] bytes at a character
/// boundary, with `…` where it was cut, so a caller cannot make one event arbitrarily long.
pub fn caller_text(text: &str) -> String {
    if text.len() <= MAX_CALLER_TEXT {
        return text.to_owned();
    }
    let end = (0..=MAX_CALLER_TEXT)
        .rev()
        .find(|&i| text.is_char_boundary(i))
        .unwrap_or(0);
    format!("{}…", &text[..end])
}

/// One in 2^32: the unit of [`AuditTrail::sample_step`].
const SAMPLE_ONE: u64 = 1 << 32;

/// Decides which audit events are written, cheaply enough for the sidecar's request path:
/// nothing is built for an event that is not written.
pub struct AuditTrail {
    /// Added to `sampled` for each allowed outcome, in units of 2^-32: an event is written
    /// each time the sum passes a multiple of 2^32, so exactly the configured share, evenly
    /// spread, with no random numbers and one atomic addition.
    sample_step: u64,
    sampled: AtomicU64,
    unauthenticated: RefusalBudget,
    authenticated: RefusalBudget,
    dropped: Counter,
}

impl AuditTrail {
    /// A trail with `config`, counting refusals left out in `dropped`.
    pub fn new(config: AuditConfig, dropped: Counter) -> Self {
        let per_second = f64::from(config.audit_refused_per_second);
        Self {
            // Within 0..=2^32: the share is at most 1.
            sample_step: (config.audit_allowed_sample.0 * SAMPLE_ONE as f64).round() as u64,
            sampled: AtomicU64::new(0),
            unauthenticated: RefusalBudget::new(per_second),
            authenticated: RefusalBudget::new(per_second),
            dropped,
        }
    }

    /// Whether the event of an allowed outcome is to be written.
    pub fn sample_allowed(&self) -> bool {
        enabled() && self.sampled()
    }

    fn sampled(&self) -> bool {
        match self.sample_step {
            0 => false,
            SAMPLE_ONE => true,
            step => {
                let before = self.sampled.fetch_add(step, Ordering::Relaxed);
                before >> 32 != before.wrapping_add(step) >> 32
            }
        }
    }

    /// Whether the event of a refusal is to be written: `Some` with the number of refusals of
    /// the same kind of caller left out since the last one written, `None` when this one is
    /// left out (and counted).
    pub fn admit_refusal(&self, authenticated: bool) -> Option<u64> {
        if !enabled() {
            return None;
        }
        let budget = if authenticated {
            &self.authenticated
        } else {
            &self.unauthenticated
        };
        let admitted = budget.take(Instant::now());
        if admitted.is_none() {
            self.dropped.inc();
        }
        admitted
    }
}

/// Whether audit events are written at all (the log filter lets `keygate::audit` through).
fn enabled() -> bool {
    tracing::enabled!(target: TARGET, tracing::Level::INFO)
}

/// A token bucket of refusal events: `per_second` a second, at most a second's worth at once.
struct RefusalBudget {
    per_second: f64,
    bucket: Mutex<Bucket>,
}

struct Bucket {
    tokens: f64,
    at: Instant,
    /// Refusals left out since the last one written.
    left_out: u64,
}

impl RefusalBudget {
    fn new(per_second: f64) -> Self {
        Self {
            per_second,
            bucket: Mutex::new(Bucket {
                tokens: per_second,
                at: Instant::now(),
                left_out: 0,
            }),
        }
    }

    fn take(&self, now: Instant) -> Option<u64> {
        let mut bucket = self.bucket.lock().unwrap_or_else(|p| p.into_inner());
        let refill = now.saturating_duration_since(bucket.at).as_secs_f64() * self.per_second;
        bucket.tokens = (bucket.tokens + refill).min(self.per_second);
        bucket.at = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            Some(std::mem::take(&mut bucket.left_out))
        } else {
            bucket.left_out += 1;
            None
        }
    }
}

/// `scopes` space-delimited, written straight into the event without a joined copy.
pub struct Scopes<'a>(pub &'a [String]);

impl std::fmt::Display for Scopes<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, scope) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(" ")?;
            }
            f.write_str(scope)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn trail(sample: &str, per_second: u32) -> AuditTrail {
        AuditTrail::new(
            AuditConfig {
                audit_allowed_sample: sample.parse().unwrap(),
                audit_refused_per_second: per_second,
            },
            Counter::default(),
        )
    }

    fn written(trail: &AuditTrail, of: usize) -> usize {
        (0..of).filter(|_| trail.sampled()).count()
    }

    #[test]
    fn sampling_writes_exactly_the_configured_share() {
        assert_eq!(written(&trail("1", 1), 1000), 1000);
        assert_eq!(written(&trail("0", 1), 1000), 0);
        assert_eq!(written(&trail("0.01", 1), 1000), 10);
        assert_eq!(written(&trail("0.5", 1), 1000), 500);
        assert_eq!(written(&trail("0.3", 1), 1000), 300);
    }

    #[test]
    fn changed_settings_are_passed_on_as_environment_that_parses_back() {
        assert!(AuditConfig::default().changed_env().is_empty());
        let config = AuditConfig {
            audit_allowed_sample: "0.001".parse().unwrap(),
            audit_refused_per_second: 5,
        };
        let env = config.changed_env();
        assert_eq!(
            env,
            [
                ("KEYGATE_AUDIT_ALLOWED_SAMPLE", "0.001".to_owned()),
                ("KEYGATE_AUDIT_REFUSED_PER_SECOND", "5".to_owned()),
            ]
        );
        assert_eq!(env[0].1.parse(), Ok(config.audit_allowed_sample));
    }

    #[test]
    fn caller_text_is_cut_at_a_character_boundary() {
        assert_eq!(caller_text("orders.read"), "orders.read");
        let long = "é".repeat(200);
        let cut = caller_text(&long);
        assert!(cut.len() <= MAX_CALLER_TEXT + "…".len(), "{}", cut.len());
        assert!(cut.ends_with('…') && long.starts_with(cut.trim_end_matches('…')));
    }

    #[test]
    fn sample_rates_outside_zero_to_one_are_refused() {
        for text in ["-0.1", "1.5", "NaN", "inf", "all"] {
            assert!(text.parse::<SampleRate>().is_err(), "{text}");
        }
        assert_eq!("0.25".parse::<SampleRate>(), Ok(SampleRate(0.25)));
    }

    #[test]
    fn refusals_beyond_the_rate_are_counted_and_reported_with_the_next_one() {
        let budget = RefusalBudget::new(3.0);
        let start = Instant::now();
        let taken: Vec<_> = (0..5).map(|_| budget.take(start)).collect();
        assert_eq!(taken, [Some(0), Some(0), Some(0), None, None]);
        // A third of a second later one more fits, and says two were left out before it.
        let later = start + Duration::from_millis(340);
        assert_eq!(budget.take(later), Some(2));
        assert_eq!(budget.take(later), None);
        // A long pause refills no more than a second's worth.
        let much_later = later + Duration::from_secs(60);
        let taken: Vec<_> = (0..4).map(|_| budget.take(much_later)).collect();
        assert_eq!(taken, [Some(1), Some(0), Some(0), None]);
    }

    #[test]
    fn scopes_are_written_space_delimited() {
        let scopes = ["a".to_owned(), "b.c".to_owned()];
        assert_eq!(Scopes(&scopes).to_string(), "a b.c");
        assert_eq!(Scopes(&[]).to_string(), "");
    }
}
