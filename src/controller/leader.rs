//! Leader election with a coordination.k8s.io Lease in the operator's namespace: only the
//! leader runs the controllers that write. Losing the lease after holding it ends the
//! process (the kubelet restarts it), the simplest way to never have two writers. The
//! timings are client-go's, with its names and defaults ([`LeaderElection`]).

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::api::PostParams;
use kube::{Api, Client};
use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::watch;

use super::{Result, timed};

/// The leader election: `--lease-name`, `--lease-duration`, `--lease-renew-deadline` and
/// `--lease-retry-period` (chart values `leaderElection.*`).
#[derive(clap::Args, Debug, Clone, PartialEq, Eq)]
pub struct LeaderElection {
    /// Name of the leader-election Lease in the operator's namespace.
    #[arg(long, env = "KEYGATE_LEASE_NAME", default_value = "keygate-operator")]
    pub lease_name: String,
    /// How long a lease holds without renewal, in whole seconds: how long the other replicas
    /// wait before taking over from a leader that stopped renewing.
    #[arg(long, env = "KEYGATE_LEASE_DURATION", default_value = "15s", value_parser = crate::connections::positive_duration)]
    pub lease_duration: Duration,
    /// How long the leader keeps trying to renew its lease before it gives up and exits; less
    /// than --lease-duration, so that it has stopped writing before another replica can take
    /// over.
    #[arg(long, env = "KEYGATE_LEASE_RENEW_DEADLINE", default_value = "10s", value_parser = crate::connections::positive_duration)]
    pub lease_renew_deadline: Duration,
    /// How often the leader renews its lease and the other replicas try to take it; less than
    /// --lease-renew-deadline.
    #[arg(long, env = "KEYGATE_LEASE_RETRY_PERIOD", default_value = "2s", value_parser = crate::connections::positive_duration)]
    pub lease_retry_period: Duration,
}

impl Default for LeaderElection {
    /// client-go's defaults (kube-controller-manager's): 15 s, 10 s, 2 s.
    fn default() -> Self {
        Self {
            lease_name: "keygate-operator".into(),
            lease_duration: Duration::from_secs(15),
            lease_renew_deadline: Duration::from_secs(10),
            lease_retry_period: Duration::from_secs(2),
        }
    }
}

impl LeaderElection {
    /// Refuses timings with which two replicas could both believe they lead: the retry
    /// period must be shorter than the renew deadline, and that shorter than the lease.
    pub fn check(&self) -> std::result::Result<(), String> {
        if self.lease_duration.subsec_nanos() != 0 {
            return Err(format!(
                "--lease-duration must be whole seconds (a Lease holds seconds), not {:?}",
                self.lease_duration
            ));
        }
        if self.lease_renew_deadline >= self.lease_duration {
            return Err(format!(
                "--lease-renew-deadline ({:?}) must be shorter than --lease-duration ({:?}): a \
                 leader that cannot renew must stop before another replica may take over",
                self.lease_renew_deadline, self.lease_duration
            ));
        }
        if self.lease_retry_period >= self.lease_renew_deadline {
            return Err(format!(
                "--lease-retry-period ({:?}) must be shorter than --lease-renew-deadline ({:?}), \
                 or the leader gives up after one failed renewal",
                self.lease_retry_period, self.lease_renew_deadline
            ));
        }
        Ok(())
    }

    fn lease_seconds(&self) -> i32 {
        i32::try_from(self.lease_duration.as_secs()).unwrap_or(i32::MAX)
    }
}

/// Whether `lease` may be taken by `identity` at `now`, judged by the holder's own
/// `leaseDurationSeconds` (`default_seconds` when it names none).
fn available(lease: &Lease, identity: &str, now: jiff::Timestamp, default_seconds: i32) -> bool {
    let Some(spec) = &lease.spec else { return true };
    match spec.holder_identity.as_deref() {
        None | Some("") => true,
        Some(holder) if holder == identity => true,
        Some(_) => {
            let duration = i64::from(spec.lease_duration_seconds.unwrap_or(default_seconds));
            spec.renew_time
                .as_ref()
                .is_none_or(|t| t.0.as_second() + duration < now.as_second())
        }
    }
}

async fn try_acquire(
    api: &Api<Lease>,
    name: &str,
    identity: &str,
    lease_seconds: i32,
) -> Result<bool> {
    let now = jiff::Timestamp::now();
    let existing = timed(api.get_opt(name)).await?;
    let Some(mut lease) = existing else {
        let lease = Lease {
            metadata: ObjectMeta {
                name: Some(name.into()),
                ..ObjectMeta::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(identity.into()),
                lease_duration_seconds: Some(lease_seconds),
                acquire_time: Some(MicroTime(now)),
                renew_time: Some(MicroTime(now)),
                lease_transitions: Some(0),
                ..LeaseSpec::default()
            }),
        };
        return match timed(api.create(&PostParams::default(), &lease)).await {
            Ok(_) => Ok(true),
            Err(super::Error::Kube(kube::Error::Api(s))) if s.code == 409 => Ok(false),
            Err(e) => Err(e),
        };
    };
    if !available(&lease, identity, now, lease_seconds) {
        return Ok(false);
    }
    let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
    if spec.holder_identity.as_deref() != Some(identity) {
        spec.holder_identity = Some(identity.into());
        spec.acquire_time = Some(MicroTime(now));
        spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
    }
    spec.lease_duration_seconds = Some(lease_seconds);
    spec.renew_time = Some(MicroTime(now));
    // The resourceVersion in `lease` makes this a compare-and-swap.
    match timed(api.replace(name, &PostParams::default(), &lease)).await {
        Ok(_) => Ok(true),
        Err(super::Error::Kube(kube::Error::Api(s))) if s.code == 409 => Ok(false),
        Err(e) => Err(e),
    }
}

/// Campaigns for and renews the lease forever, publishing whether this replica leads (and
/// in the `keygate_controller_leader` gauge `leader`). Returns an error when a held lease
/// could not be renewed within the renew deadline: an attempt still running at the deadline
/// counts as failed.
pub async fn run(
    client: Client,
    namespace: String,
    election: LeaderElection,
    identity: String,
    leading: watch::Sender<bool>,
    leader: Gauge,
) -> Result<()> {
    let api: Api<Lease> = Api::namespaced(client, &namespace);
    let name = &election.lease_name;
    let lease_seconds = election.lease_seconds();
    let mut last_renewal = tokio::time::Instant::now();
    loop {
        let held = *leading.borrow();
        let attempt = try_acquire(&api, name, &identity, lease_seconds);
        let outcome = if held {
            let deadline = last_renewal + election.lease_renew_deadline;
            tokio::time::timeout_at(deadline, attempt)
                .await
                .unwrap_or(Err(super::Error::Timeout))
        } else {
            attempt.await
        };
        match outcome {
            Ok(true) => {
                last_renewal = tokio::time::Instant::now();
                if !held {
                    tracing::info!(%identity, "became the leader");
                    leading.send_replace(true);
                    leader.set(1);
                }
            }
            Ok(false) if held => {
                leader.set(0);
                return Err(super::Error::Invalid(
                    "lost the leader lease to another replica".into(),
                ));
            }
            Ok(false) => {}
            Err(error) => {
                tracing::warn!(%error, "lease renewal failed");
                if held && last_renewal.elapsed() >= election.lease_renew_deadline {
                    leader.set(0);
                    return Err(super::Error::Invalid(
                        "could not renew the leader lease in time".into(),
                    ));
                }
            }
        }
        tokio::time::sleep(election.lease_retry_period).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mk_lease(holder: &str, renewed: i64) -> Lease {
        Lease {
            metadata: ObjectMeta::default(),
            spec: Some(LeaseSpec {
                holder_identity: Some(holder.into()),
                lease_duration_seconds: Some(15),
                renew_time: Some(MicroTime(jiff::Timestamp::from_second(renewed).unwrap())),
                ..LeaseSpec::default()
            }),
        }
    }

    #[test]
    fn lease_availability() {
        let now = jiff::Timestamp::from_second(1000).unwrap();
        assert!(available(&mk_lease("me", 999), "me", now, 15));
        assert!(!available(&mk_lease("other", 990), "me", now, 15));
        assert!(available(&mk_lease("other", 984), "me", now, 15));
        assert!(available(&mk_lease("", 999), "me", now, 15));
        // The holder's duration counts, not this replica's.
        assert!(!available(&mk_lease("other", 990), "me", now, 5));
    }

    #[test]
    fn timings_that_allow_two_leaders_are_refused() {
        assert_eq!(LeaderElection::default().check(), Ok(()));
        let with = |duration: u64, deadline: u64, retry: u64| LeaderElection {
            lease_duration: Duration::from_secs(duration),
            lease_renew_deadline: Duration::from_secs(deadline),
            lease_retry_period: Duration::from_secs(retry),
            ..LeaderElection::default()
        };
        assert_eq!(with(60, 40, 15).check(), Ok(()));
        let error = with(15, 15, 2).check().unwrap_err();
        assert!(error.contains("--lease-renew-deadline"), "{error}");
        let error = with(15, 10, 10).check().unwrap_err();
        assert!(error.contains("--lease-retry-period"), "{error}");
        let error = LeaderElection {
            lease_duration: Duration::from_millis(15_500),
            ..LeaderElection::default()
        }
        .check()
        .unwrap_err();
        assert!(error.contains("whole seconds"), "{error}");
    }
}
