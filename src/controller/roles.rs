//! M2MRole → status: which ScopePolicy each permission resolves to, and scopes the resource
//! does not define.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Patch, PatchParams};
use kube::core::DeserializeGuard;
use kube::runtime::controller::Action;
use kube::{Api, ResourceExt};

use super::{Context, MANAGER, ReconcileLabels, Result, timed};
use crate::api::{M2MRole, M2MRoleSpec, M2MRoleStatus, ResolvedPermission, ready_condition};
use crate::registry::Snapshot;

/// How each permission of `spec` resolves against `snapshot` (pure).
pub fn resolve_permissions(spec: &M2MRoleSpec, snapshot: &Snapshot) -> Vec<ResolvedPermission> {
    spec.permissions
        .iter()
        .map(|permission| {
            let resource = snapshot.resources.get(&permission.resource);
            ResolvedPermission {
                resource: permission.resource.clone(),
                policy: resource.map(|r| r.policy.to_string()),
                undefined_scopes: match resource {
                    Some(r) => permission
                        .scopes
                        .iter()
                        .filter(|s| !r.defines(s))
                        .cloned()
                        .collect(),
                    None => permission.scopes.clone(),
                },
            }
        })
        .collect()
}

/// Reconciles one M2MRole.
pub async fn reconcile(
    object: Arc<DeserializeGuard<M2MRole>>,
    ctx: Arc<Context>,
) -> Result<Action> {
    let Ok(role) = &object.0 else {
        return Ok(Action::await_change());
    };
    ctx.metrics
        .reconciles
        .get_or_create(&ReconcileLabels {
            controller: "m2mrole",
        })
        .inc();
    let resolved = resolve_permissions(&role.spec, &ctx.registry.snapshot());
    let unresolved = resolved.iter().filter(|r| r.policy.is_none()).count();
    let undefined: usize = resolved.iter().map(|r| r.undefined_scopes.len()).sum();
    let (ready, reason, message) = match (unresolved, undefined) {
        (0, 0) => (
            true,
            "Resolved",
            "every permission resolves to a ScopePolicy that defines its scopes".to_owned(),
        ),
        (0, n) => (
            false,
            "UndefinedScopes",
            format!("{n} scope(s) are not defined by their resource's ScopePolicy"),
        ),
        (n, _) => (
            false,
            "UnknownResource",
            format!("{n} resource(s) are declared by no ScopePolicy"),
        ),
    };
    let previous = role.status.clone().unwrap_or_default();
    let status = M2MRoleStatus {
        observed_generation: role.metadata.generation,
        resolved,
        conditions: vec![ready_condition(
            ready,
            reason,
            message,
            role.metadata.generation,
            &previous.conditions,
            Time(jiff::Timestamp::now()),
        )],
    };
    if role.status.as_ref() != Some(&status) {
        let api: Api<M2MRole> =
            Api::namespaced(ctx.client.clone(), &role.namespace().unwrap_or_default());
        let patch = serde_json::json!({"apiVersion": "keygate.dev/v1alpha1", "kind": "M2MRole", "status": status});
        timed(api.patch_status(
            &role.name_any(),
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(&patch),
        ))
        .await?;
        ctx.wrote("m2mrole");
    }
    Ok(Action::requeue(Duration::from_secs(3600)))
}
