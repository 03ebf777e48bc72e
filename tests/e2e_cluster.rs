//! End-to-end tests against a real cluster. They run only with `KEYGATE_E2E=1` and a
//! `KUBECONFIG`; otherwise each test says why it skipped. They install the CRDs from `crds/`,
//! run the operator in-process against the cluster, and use a fresh namespace per test,
//! deleted afterwards. Any conformant cluster 1.24+ works (kind, k3d, a cloud cluster).

#[path = "support/operator.rs"]
mod operator;

use std::time::Duration;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{DeleteParams, Patch, PatchParams};
use kube::{Api, Client};

/// A client for the cluster, or `None` (after saying why) when the tests should skip.
async fn cluster() -> Option<Client> {
    if std::env::var("KEYGATE_E2E").as_deref() != Ok("1")
        || std::env::var_os("KUBECONFIG").is_none()
    {
        eprintln!(
            "skipping: set KEYGATE_E2E=1 and KUBECONFIG to run the end-to-end tests against a cluster"
        );
        return None;
    }
    let client = Client::try_default()
        .await
        .expect("a client from KUBECONFIG");
    install_crds(&client).await;
    Some(client)
}

async fn install_crds(client: &Client) {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    for crd in keygate::api::crds() {
        let name = crd.metadata.name.clone().expect("crd name");
        crds.patch(
            &name,
            &PatchParams::apply("keygate-e2e").force(),
            &Patch::Apply(&crd),
        )
        .await
        .expect("install CRD");
        operator::eventually(
            &format!("CRD {name} established"),
            Duration::from_secs(60),
            || async {
                let crd = crds.get(&name).await.ok()?;
                crd.status?
                    .conditions?
                    .iter()
                    .any(|c| c.type_ == "Established" && c.status == "True")
                    .then_some(())
            },
        )
        .await;
    }
}

/// Runs `scenario` in a fresh namespace; dumps the namespace's objects when it fails, and
/// deletes the namespace either way.
async fn in_namespace<F, Fut>(client: Client, prefix: &str, scenario: F)
where
    F: FnOnce(Client, String) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let ns = format!("kg-e2e-{prefix}-{}", std::process::id());
    operator::create_namespace(&client, &ns).await;
    let result = tokio::spawn(scenario(client.clone(), ns.clone())).await;
    if result.is_err() {
        dump(&client, &ns).await;
    }
    let namespaces: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(client.clone());
    let _ = namespaces.delete(&ns, &DeleteParams::default()).await;
    if let Err(panic) = result {
        std::panic::resume_unwind(panic.into_panic());
    }
}

async fn dump(client: &Client, ns: &str) {
    use kube::api::ListParams;
    let clients: Api<keygate::api::ApiClient> = Api::namespaced(client.clone(), ns);
    let policies: Api<keygate::api::ScopePolicy> = Api::namespaced(client.clone(), ns);
    let events: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(client.clone(), ns);
    eprintln!("--- diagnostics for namespace {ns}");
    if let Ok(list) = clients.list(&ListParams::default()).await {
        for c in list {
            eprintln!("ApiClient {:?}: {:?}", c.metadata.name, c.status);
        }
    }
    if let Ok(list) = policies.list(&ListParams::default()).await {
        for p in list {
            eprintln!("ScopePolicy {:?}: {:?}", p.metadata.name, p.status);
        }
    }
    if let Ok(list) = events.list(&ListParams::default()).await {
        for e in list {
            eprintln!("Event {:?} {:?}: {:?}", e.type_, e.reason, e.note);
        }
    }
}

#[tokio::test]
async fn lifecycle_restart_and_regeneration() {
    let Some(client) = cluster().await else {
        return;
    };
    in_namespace(client, "life", |c, ns| async move {
        operator::scenario_lifecycle(c, &ns).await
    })
    .await;
}

#[tokio::test]
async fn rotation_with_overlap() {
    let Some(client) = cluster().await else {
        return;
    };
    in_namespace(client, "rot", |c, ns| async move {
        operator::scenario_rotation(c, &ns).await
    })
    .await;
}

#[tokio::test]
async fn role_change_and_bad_reference() {
    let Some(client) = cluster().await else {
        return;
    };
    in_namespace(client, "role", |c, ns| async move {
        operator::scenario_role_change_and_bad_reference(c, &ns).await
    })
    .await;
}

#[tokio::test]
async fn garbage_collection_of_the_secret() {
    let Some(client) = cluster().await else {
        return;
    };
    in_namespace(client, "gc", |c, ns| async move {
        operator::scenario_garbage_collection(c, &ns).await
    })
    .await;
}

#[tokio::test]
async fn token_flow_through_a_sidecar() {
    let Some(client) = cluster().await else {
        return;
    };
    in_namespace(client, "flow", |c, ns| async move {
        operator::scenario_token_flow_through_sidecar(c, &ns).await
    })
    .await;
}
