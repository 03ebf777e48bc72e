//! Leader election with a coordination.k8s.io Lease in the operator's namespace: only the
//! leader runs the controllers that write. Losing the lease after holding it ends the
//! process (the kubelet restarts it), the simplest way to never have two writers.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::api::PostParams;
use kube::{Api, Client};
use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::watch;

use super::{Result, timed};

/// How long a lease is valid without renewal.
const LEASE_SECONDS: i32 = 15;
/// How often the holder renews and others retry.
const RETRY: Duration = Duration::from_secs(5);

/// Whether `lease` may be taken by `identity` at `now`.
fn available(lease: &Lease, identity: &str, now: jiff::Timestamp) -> bool {
    let Some(spec) = &lease.spec else { return true };
    match spec.holder_identity.as_deref() {
        None | Some("") => true,
        Some(holder) if holder == identity => true,
        Some(_) => {
            let duration = i64::from(spec.lease_duration_seconds.unwrap_or(LEASE_SECONDS));
            spec.renew_time
                .as_ref()
                .is_none_or(|t| t.0.as_second() + duration < now.as_second())
        }
    }
}

async fn try_acquire(api: &Api<Lease>, name: &str, identity: &str) -> Result<bool> {
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
                lease_duration_seconds: Some(LEASE_SECONDS),
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
    if !available(&lease, identity, now) {
        return Ok(false);
    }
    let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
    if spec.holder_identity.as_deref() != Some(identity) {
        spec.holder_identity = Some(identity.into());
        spec.acquire_time = Some(MicroTime(now));
        spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
    }
    spec.lease_duration_seconds = Some(LEASE_SECONDS);
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
/// could not be renewed in time.
pub async fn run(
    client: Client,
    namespace: String,
    name: String,
    identity: String,
    leading: watch::Sender<bool>,
    leader: Gauge,
) -> Result<()> {
    let api: Api<Lease> = Api::namespaced(client, &namespace);
    let mut last_renewal = tokio::time::Instant::now();
    loop {
        let held = *leading.borrow();
        match try_acquire(&api, &name, &identity).await {
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
                if held && last_renewal.elapsed() > Duration::from_secs(LEASE_SECONDS as u64) {
                    leader.set(0);
                    return Err(super::Error::Invalid(
                        "could not renew the leader lease in time".into(),
                    ));
                }
            }
        }
        tokio::time::sleep(RETRY).await;
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
        assert!(available(&mk_lease("me", 999), "me", now));
        assert!(!available(&mk_lease("other", 990), "me", now));
        assert!(available(&mk_lease("other", 984), "me", now));
        assert!(available(&mk_lease("", 999), "me", now));
    }
}
