//! The in-process API server of tests/support, exercised with kube's own client and runtime.

#[path = "support/apiserver.rs"]
mod apiserver;

use std::collections::BTreeMap;
use std::time::Duration;

use apiserver::{Failure, FakeApiServer};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::ByteString;
use k8s_openapi::api::admissionregistration::v1::ValidatingWebhookConfiguration;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, ObjectReference, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use keygate::api::{ApiClient, ApiClientSpec};
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, ListParams, ObjectMeta, Patch, PatchParams,
    PostParams, WatchEvent, WatchParams,
};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::{WatchStreamExt, reflector, watcher};
use kube::{Resource, ResourceExt};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(10);

fn api_status(error: &kube::Error) -> Option<(u16, String)> {
    match error {
        kube::Error::Api(status) => Some((status.code, status.reason.clone())),
        _ => None,
    }
}

fn secret(name: &str, labels: &[(&str, &str)]) -> Secret {
    Secret {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            labels: Some(
                labels
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            ),
            ..Default::default()
        },
        string_data: None,
        data: Some(BTreeMap::from([(
            "k".to_string(),
            ByteString(b"v".to_vec()),
        )])),
        ..Default::default()
    }
}

fn config_map(name: &str, data: &[(&str, &str)]) -> ConfigMap {
    ConfigMap {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            ..Default::default()
        },
        data: Some(
            data.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        ),
        ..Default::default()
    }
}

#[tokio::test]
async fn secrets_round_trip_through_create_get_list_apply_and_delete() {
    let server = FakeApiServer::start().await;
    let secrets: Api<Secret> = Api::default_namespaced(server.client());

    let created = secrets
        .create(&PostParams::default(), &secret("a", &[("app", "x")]))
        .await
        .unwrap();
    assert_eq!(created.metadata.namespace.as_deref(), Some("default"));
    assert!(created.metadata.uid.is_some());
    assert!(created.metadata.creation_timestamp.is_some());
    assert!(created.metadata.resource_version.is_some());

    let again = secrets
        .create(&PostParams::default(), &secret("a", &[]))
        .await
        .unwrap_err();
    assert_eq!(api_status(&again), Some((409, "AlreadyExists".into())));

    let got = secrets.get("a").await.unwrap();
    assert_eq!(got.data.unwrap()["k"].0, b"v");
    assert_eq!(
        secrets
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .len(),
        1
    );

    let applied = json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "a", "labels": {"app": "x"}},
        "stringData": {"s": "t"},
        "data": {"k": "dg=="},
    });
    let params = PatchParams::apply("keygate").force();
    let after_apply = secrets
        .patch("a", &params, &Patch::Apply(&applied))
        .await
        .unwrap();
    let data = after_apply.data.clone().unwrap();
    assert_eq!(data["s"].0, b"t", "stringData is folded into data");
    assert!(after_apply.string_data.is_none());
    let managers: Vec<_> = after_apply
        .managed_fields()
        .iter()
        .filter_map(|m| m.manager.clone())
        .collect();
    assert!(managers.contains(&"keygate".to_string()), "{managers:?}");
    let rv = after_apply.resource_version();

    let effective = server.effective_writes();
    let writes = server.writes();
    let idle = secrets
        .patch("a", &params, &Patch::Apply(&applied))
        .await
        .unwrap();
    assert_eq!(
        idle.resource_version(),
        rv,
        "a no-op apply keeps the resourceVersion"
    );
    assert_eq!(server.writes(), writes + 1);
    assert_eq!(
        server.effective_writes(),
        effective,
        "a no-op apply changes nothing"
    );

    secrets.delete("a", &DeleteParams::default()).await.unwrap();
    let gone = secrets.get("a").await.unwrap_err();
    assert_eq!(api_status(&gone), Some((404, "NotFound".into())));
    assert!(server.object("secrets", "default", "a").is_none());
    assert!(secrets.get_opt("a").await.unwrap().is_none());
}

#[tokio::test]
async fn apply_creates_drops_unowned_fields_and_reports_conflicts() {
    let server = FakeApiServer::start().await;
    let maps: Api<ConfigMap> = Api::default_namespaced(server.client());
    let apply = |data: serde_json::Value| json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}, "data": data});

    maps.patch(
        "c",
        &PatchParams::apply("one"),
        &Patch::Apply(apply(json!({"a": "1", "b": "2"}))),
    )
    .await
    .unwrap();
    let stored = server.object("configmaps", "default", "c").unwrap();
    assert_eq!(stored["metadata"]["managedFields"][0]["operation"], "Apply");
    assert_eq!(
        stored["metadata"]["managedFields"][0]["fieldsV1"],
        json!({"f:data": {"f:a": {}, "f:b": {}}})
    );

    let dropped = maps
        .patch(
            "c",
            &PatchParams::apply("one"),
            &Patch::Apply(apply(json!({"a": "1"}))),
        )
        .await
        .unwrap();
    assert_eq!(dropped.data.unwrap().keys().collect::<Vec<_>>(), ["a"]);

    let conflict = maps
        .patch(
            "c",
            &PatchParams::apply("two"),
            &Patch::Apply(apply(json!({"a": "other"}))),
        )
        .await
        .unwrap_err();
    assert_eq!(api_status(&conflict), Some((409, "Conflict".into())));

    let shared = maps
        .patch(
            "c",
            &PatchParams::apply("two"),
            &Patch::Apply(apply(json!({"a": "1", "z": "9"}))),
        )
        .await
        .unwrap();
    assert_eq!(shared.data.as_ref().unwrap()["z"], "9");

    let forced = maps
        .patch(
            "c",
            &PatchParams::apply("two").force(),
            &Patch::Apply(apply(json!({"a": "forced"}))),
        )
        .await
        .unwrap();
    assert_eq!(forced.data.as_ref().unwrap()["a"], "forced");
    assert!(
        !forced.data.as_ref().unwrap().contains_key("z"),
        "two dropped z which only it owned"
    );

    let missing_manager = maps
        .patch(
            "c",
            &PatchParams::default(),
            &Patch::Apply(apply(json!({}))),
        )
        .await;
    assert!(missing_manager.is_err());
}

#[tokio::test]
async fn merge_json_and_strategic_patches_apply() {
    let server = FakeApiServer::start().await;
    let maps: Api<ConfigMap> = Api::default_namespaced(server.client());
    maps.create(
        &PostParams::default(),
        &config_map("p", &[("a", "1"), ("b", "2")]),
    )
    .await
    .unwrap();

    let merged = maps
        .patch(
            "p",
            &PatchParams::default(),
            &Patch::Merge(json!({"data": {"a": null, "c": "3"}})),
        )
        .await
        .unwrap();
    assert_eq!(
        merged.data.unwrap(),
        BTreeMap::from([("b".into(), "2".into()), ("c".into(), "3".into())])
    );

    let ops = json!([
        {"op": "test", "path": "/data/b", "value": "2"},
        {"op": "replace", "path": "/data/b", "value": "two"},
        {"op": "add", "path": "/metadata/labels", "value": {"x": "y"}},
    ]);
    let request = http::Request::patch("/api/v1/namespaces/default/configmaps/p")
        .header(http::header::CONTENT_TYPE, "application/json-patch+json")
        .body(serde_json::to_vec(&ops).unwrap())
        .unwrap();
    let patched: ConfigMap = server.client().request(request).await.unwrap();
    assert_eq!(patched.data.as_ref().unwrap()["b"], "two");
    assert_eq!(patched.labels()["x"], "y");

    let strategic = maps
        .patch(
            "p",
            &PatchParams::default(),
            &Patch::Strategic(json!({"data": {"d": "4"}})),
        )
        .await
        .unwrap();
    assert_eq!(strategic.data.unwrap()["d"], "4");

    let rv = strategic.metadata.resource_version.clone();
    let same = maps
        .patch(
            "p",
            &PatchParams::default(),
            &Patch::Merge(json!({"data": {"d": "4"}})),
        )
        .await
        .unwrap();
    assert_eq!(
        same.metadata.resource_version, rv,
        "a merge patch that changes nothing is a no-op"
    );

    let stale = maps
        .patch(
            "p",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"resourceVersion": "1"}, "data": {"e": "5"}})),
        )
        .await
        .unwrap_err();
    assert_eq!(api_status(&stale), Some((409, "Conflict".into())));
}

#[tokio::test]
async fn a_watcher_sees_applied_and_deleted_config_maps() {
    let server = FakeApiServer::start().await;
    server.set_bookmark_interval(Duration::from_millis(50));
    let maps: Api<ConfigMap> = Api::default_namespaced(server.client());
    maps.create(&PostParams::default(), &config_map("before", &[]))
        .await
        .unwrap();

    let mut events = watcher(maps.clone(), watcher::Config::default())
        .default_backoff()
        .boxed();
    let mut seen = Vec::new();
    let writer = maps.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(200)).await;
        writer
            .create(&PostParams::default(), &config_map("after", &[]))
            .await
            .unwrap();
        writer
            .patch(
                "after",
                &PatchParams::default(),
                &Patch::Merge(json!({"data": {"x": "1"}})),
            )
            .await
            .unwrap();
        writer
            .delete("before", &DeleteParams::default())
            .await
            .unwrap();
    });
    tokio::time::timeout(WAIT, async {
        while let Some(event) = events.try_next().await.unwrap() {
            match event {
                watcher::Event::InitApply(cm) => seen.push(format!("init {}", cm.name_any())),
                watcher::Event::Apply(cm) => {
                    seen.push(format!("apply {} {:?}", cm.name_any(), cm.data))
                }
                watcher::Event::Delete(cm) => {
                    seen.push(format!("delete {}", cm.name_any()));
                    break;
                }
                _ => {}
            }
        }
    })
    .await
    .unwrap();
    assert_eq!(
        seen,
        [
            "init before",
            "apply after Some({})",
            "apply after Some({\"x\": \"1\"})",
            "delete before"
        ]
    );

    let applied = watcher(maps.clone(), watcher::Config::default())
        .default_backoff()
        .applied_objects();
    let names: Vec<String> = tokio::time::timeout(
        WAIT,
        applied.take(1).map(|r| r.unwrap().name_any()).collect(),
    )
    .await
    .unwrap();
    assert_eq!(names, ["after"]);
}

#[tokio::test]
async fn a_reflector_store_fills_and_follows() {
    let server = FakeApiServer::start().await;
    let secrets: Api<Secret> = Api::default_namespaced(server.client());
    for name in ["s1", "s2"] {
        secrets
            .create(&PostParams::default(), &secret(name, &[]))
            .await
            .unwrap();
    }
    let (reader, writer) = reflector::store::<Secret>();
    let stream = reflector(
        writer,
        watcher(secrets.clone(), watcher::Config::default()).default_backoff(),
    );
    tokio::spawn(stream.for_each(|_| async {}));
    tokio::time::timeout(WAIT, reader.wait_until_ready())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(reader.state().len(), 2);

    secrets
        .create(&PostParams::default(), &secret("s3", &[]))
        .await
        .unwrap();
    secrets
        .delete("s1", &DeleteParams::default())
        .await
        .unwrap();
    tokio::time::timeout(WAIT, async {
        loop {
            let mut names: Vec<String> = reader.state().iter().map(|s| s.name_any()).collect();
            names.sort();
            if names == ["s2", "s3"] {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn streaming_list_watches_send_initial_events() {
    let server = FakeApiServer::start().await;
    let maps: Api<ConfigMap> = Api::default_namespaced(server.client());
    maps.create(&PostParams::default(), &config_map("one", &[]))
        .await
        .unwrap();
    let config = watcher::Config::default().streaming_lists();
    let first = tokio::time::timeout(
        WAIT,
        watcher(maps, config)
            .default_backoff()
            .applied_objects()
            .take(1)
            .collect::<Vec<_>>(),
    )
    .await
    .unwrap();
    assert_eq!(first[0].as_ref().unwrap().name_any(), "one");
}

#[tokio::test]
async fn custom_resources_keep_spec_and_status_apart() {
    let server = FakeApiServer::start().await;
    let clients: Api<ApiClient> = Api::default_namespaced(server.client());
    let mut client = ApiClient::new(
        "c1",
        ApiClientSpec {
            roles: vec!["reader".into()],
            ..Default::default()
        },
    );
    client.metadata.labels = Some(BTreeMap::from([("team".into(), "a".into())]));

    let created = clients
        .create(&PostParams::default(), &client)
        .await
        .unwrap();
    assert_eq!(created.metadata.generation, Some(1));
    assert!(created.status.is_none());

    let status_apply = json!({
        "apiVersion": "keygate.dev/v1alpha1", "kind": "ApiClient",
        "status": {"clientId": "id-1", "observedGeneration": 1},
    });
    let params = PatchParams::apply("keygate").force();
    let with_status = clients
        .patch_status("c1", &params, &Patch::Apply(&status_apply))
        .await
        .unwrap();
    assert_eq!(
        with_status.status.as_ref().unwrap().client_id.as_deref(),
        Some("id-1")
    );
    assert_eq!(
        with_status.metadata.generation,
        Some(1),
        "status writes leave the generation"
    );
    let entry = with_status
        .managed_fields()
        .iter()
        .find(|m| m.subresource.as_deref() == Some("status"))
        .cloned();
    assert_eq!(entry.and_then(|e| e.manager), Some("keygate".into()));

    let rv = with_status.resource_version();
    let idle = clients
        .patch_status("c1", &params, &Patch::Apply(&status_apply))
        .await
        .unwrap();
    assert_eq!(idle.resource_version(), rv);

    let merged = clients
        .patch_status(
            "c1",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"secretName": "s"}, "spec": {"roles": ["ignored"]}})),
        )
        .await
        .unwrap();
    assert_eq!(
        merged.status.as_ref().unwrap().secret_name.as_deref(),
        Some("s")
    );
    assert_eq!(
        merged.spec.roles,
        ["reader"],
        "status writes ignore the spec"
    );

    let main_write = clients
        .patch(
            "c1",
            &PatchParams::default(),
            &Patch::Merge(
                json!({"status": {"clientId": "ignored"}, "metadata": {"labels": {"team": "b"}}}),
            ),
        )
        .await
        .unwrap();
    assert_eq!(
        main_write.status.as_ref().unwrap().client_id.as_deref(),
        Some("id-1"),
        "main writes ignore the status"
    );
    assert_eq!(
        main_write.metadata.generation,
        Some(1),
        "metadata changes leave the generation"
    );

    let spec_change = clients
        .patch("c1", &PatchParams::apply("test").force(), &Patch::Apply(json!({
            "apiVersion": "keygate.dev/v1alpha1", "kind": "ApiClient", "metadata": {"name": "c1"},
            "spec": {"roles": ["writer"]},
        })))
        .await
        .unwrap();
    assert_eq!(spec_change.metadata.generation, Some(2));
    assert_eq!(spec_change.spec.roles, ["writer"]);

    let mut replaced = spec_change.clone();
    replaced.spec.disabled = true;
    let replaced = clients
        .replace("c1", &PostParams::default(), &replaced)
        .await
        .unwrap();
    assert_eq!(replaced.metadata.generation, Some(3));

    let dynamic: Api<DynamicObject> = Api::namespaced_with(
        server.client(),
        "default",
        &ApiResource::erase::<ApiClient>(&()),
    );
    let listed = dynamic
        .list(&ListParams::default().labels("team=b"))
        .await
        .unwrap();
    assert_eq!(listed.items.len(), 1);
    assert_eq!(
        server
            .object("apiclients.keygate.dev", "default", "c1")
            .unwrap()["spec"]["disabled"],
        true
    );
}

#[tokio::test]
async fn deleting_an_owner_deletes_what_it_owns() {
    let server = FakeApiServer::start().await;
    let client = server.client();
    let clients: Api<ApiClient> = Api::default_namespaced(client.clone());
    let secrets: Api<Secret> = Api::default_namespaced(client.clone());
    let owner = clients
        .create(
            &PostParams::default(),
            &ApiClient::new("owner", ApiClientSpec::default()),
        )
        .await
        .unwrap();
    let owner_ref: OwnerReference = owner.controller_owner_ref(&()).unwrap();

    let mut owned = secret("owned", &[]);
    owned.metadata.owner_references = Some(vec![owner_ref.clone()]);
    secrets
        .create(&PostParams::default(), &owned)
        .await
        .unwrap();
    let mut finalized = secret("finalized", &[]);
    finalized.metadata.owner_references = Some(vec![owner_ref]);
    finalized.metadata.finalizers = Some(vec!["keygate.dev/test".into()]);
    secrets
        .create(&PostParams::default(), &finalized)
        .await
        .unwrap();
    secrets
        .create(&PostParams::default(), &secret("unrelated", &[]))
        .await
        .unwrap();

    clients
        .delete("owner", &DeleteParams::background())
        .await
        .unwrap();
    assert!(secrets.get_opt("owned").await.unwrap().is_none());
    assert!(secrets.get_opt("unrelated").await.unwrap().is_some());
    let pending = secrets.get("finalized").await.unwrap();
    assert!(
        pending.metadata.deletion_timestamp.is_some(),
        "finalizers hold the deletion"
    );

    secrets
        .patch(
            "finalized",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"finalizers": null}})),
        )
        .await
        .unwrap();
    assert!(secrets.get_opt("finalized").await.unwrap().is_none());

    let namespaces: Api<Namespace> = Api::all(client.clone());
    namespaces
        .create(
            &PostParams::default(),
            &Namespace {
                metadata: ObjectMeta {
                    name: Some("gone".into()),
                    ..Default::default()
                },
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let in_ns: Api<Secret> = Api::namespaced(client.clone(), "gone");
    in_ns
        .create(&PostParams::default(), &secret("inside", &[]))
        .await
        .unwrap();
    namespaces
        .delete("gone", &DeleteParams::default())
        .await
        .unwrap();
    assert!(in_ns.get_opt("inside").await.unwrap().is_none());
}

#[tokio::test]
async fn leases_replace_with_optimistic_concurrency() {
    let server = FakeApiServer::start().await;
    let leases: Api<Lease> = Api::namespaced(server.client(), "kube-system");
    let lease = Lease {
        metadata: ObjectMeta {
            name: Some("leader".into()),
            ..Default::default()
        },
        spec: Some(LeaseSpec {
            holder_identity: Some("a".into()),
            lease_duration_seconds: Some(15),
            ..Default::default()
        }),
    };
    let created = leases.create(&PostParams::default(), &lease).await.unwrap();

    let mut taken = created.clone();
    taken.spec.as_mut().unwrap().holder_identity = Some("b".into());
    let taken = leases
        .replace("leader", &PostParams::default(), &taken)
        .await
        .unwrap();
    assert_ne!(taken.resource_version(), created.resource_version());

    let mut stale = created.clone();
    stale.spec.as_mut().unwrap().holder_identity = Some("c".into());
    let conflict = leases
        .replace("leader", &PostParams::default(), &stale)
        .await
        .unwrap_err();
    assert_eq!(api_status(&conflict), Some((409, "Conflict".into())));
    assert_eq!(
        leases
            .get("leader")
            .await
            .unwrap()
            .spec
            .unwrap()
            .holder_identity
            .as_deref(),
        Some("b")
    );

    let mut nobody = lease.clone();
    nobody.metadata.name = Some("nobody".into());
    let missing = leases
        .replace("nobody", &PostParams::default(), &nobody)
        .await
        .unwrap_err();
    assert_eq!(api_status(&missing).map(|s| s.0), Some(404));
    let mismatch = leases
        .replace("nobody", &PostParams::default(), &lease)
        .await
        .unwrap_err();
    assert_eq!(api_status(&mismatch).map(|s| s.0), Some(400));
}

#[tokio::test]
async fn label_and_field_selectors_filter_lists() {
    let server = FakeApiServer::start().await;
    let client = server.client();
    let secrets: Api<Secret> = Api::default_namespaced(client.clone());
    secrets
        .create(
            &PostParams::default(),
            &secret("web", &[("app", "web"), ("tier", "front")]),
        )
        .await
        .unwrap();
    secrets
        .create(&PostParams::default(), &secret("db", &[("app", "db")]))
        .await
        .unwrap();
    secrets
        .create(&PostParams::default(), &secret("bare", &[]))
        .await
        .unwrap();
    Api::<Secret>::namespaced(client.clone(), "other")
        .create(&PostParams::default(), &secret("web", &[("app", "web")]))
        .await
        .unwrap();

    let names = |list: kube::core::ObjectList<Secret>| {
        let mut names: Vec<String> = list
            .items
            .iter()
            .map(|s| format!("{}/{}", s.namespace().unwrap(), s.name_any()))
            .collect();
        names.sort();
        names
    };
    let query = |selector: &str| ListParams::default().labels(selector);
    assert_eq!(
        names(secrets.list(&query("app=web")).await.unwrap()),
        ["default/web"]
    );
    assert_eq!(
        names(secrets.list(&query("app!=web")).await.unwrap()),
        ["default/bare", "default/db"]
    );
    assert_eq!(
        names(secrets.list(&query("app")).await.unwrap()),
        ["default/db", "default/web"]
    );
    assert_eq!(
        names(secrets.list(&query("!app")).await.unwrap()),
        ["default/bare"]
    );
    assert_eq!(
        names(secrets.list(&query("app in (web,db),tier")).await.unwrap()),
        ["default/web"]
    );

    let all: Api<Secret> = Api::all(client.clone());
    assert_eq!(
        names(all.list(&query("app=web")).await.unwrap()),
        ["default/web", "other/web"]
    );
    let by_field = all
        .list(&ListParams::default().fields("metadata.namespace=other"))
        .await
        .unwrap();
    assert_eq!(names(by_field), ["other/web"]);
    let by_name = secrets
        .list(&ListParams::default().fields("metadata.name=db"))
        .await
        .unwrap();
    assert_eq!(names(by_name), ["default/db"]);

    let paged = secrets.list(&ListParams::default().limit(2)).await.unwrap();
    assert_eq!(paged.items.len(), 2);
    let token = paged.metadata.continue_.clone().unwrap();
    let rest = secrets
        .list(&ListParams::default().limit(2).continue_token(&token))
        .await
        .unwrap();
    assert_eq!(rest.items.len(), 1);
    assert!(rest.metadata.continue_.is_none_or(|c| c.is_empty()));
}

#[tokio::test]
async fn watches_from_a_compacted_version_expire() {
    let server = FakeApiServer::start().await;
    let maps: Api<ConfigMap> = Api::default_namespaced(server.client());
    let first = maps
        .create(&PostParams::default(), &config_map("x", &[]))
        .await
        .unwrap();
    maps.patch(
        "x",
        &PatchParams::default(),
        &Patch::Merge(json!({"data": {"a": "b"}})),
    )
    .await
    .unwrap();

    let mut stream = maps
        .watch(
            &WatchParams::default().timeout(5),
            &first.resource_version().unwrap(),
        )
        .await
        .unwrap()
        .boxed();
    match tokio::time::timeout(WAIT, stream.try_next())
        .await
        .unwrap()
        .unwrap()
    {
        Some(WatchEvent::Modified(cm)) => assert_eq!(cm.data.unwrap()["a"], "b"),
        other => panic!("expected the modification, got {other:?}"),
    }

    server.compact_history();
    let mut stream = maps
        .watch(
            &WatchParams::default().timeout(5),
            &first.resource_version().unwrap(),
        )
        .await
        .unwrap()
        .boxed();
    match tokio::time::timeout(WAIT, stream.try_next())
        .await
        .unwrap()
        .unwrap()
    {
        Some(WatchEvent::Error(status)) => assert_eq!(status.code, 410),
        other => panic!("expected 410 Expired, got {other:?}"),
    }

    server.set_bookmark_interval(Duration::from_millis(50));
    let mut bookmarks = maps
        .watch(
            &WatchParams::default().timeout(1),
            &server.resource_version().to_string(),
        )
        .await
        .unwrap()
        .boxed();
    let mut saw_bookmark = false;
    while let Some(event) = tokio::time::timeout(WAIT, bookmarks.try_next())
        .await
        .unwrap()
        .unwrap()
    {
        saw_bookmark |= matches!(event, WatchEvent::Bookmark(_));
    }
    assert!(
        saw_bookmark,
        "bookmarks arrive, and the stream ends at timeoutSeconds"
    );
}

#[tokio::test]
async fn injected_failures_and_restarts_are_survived() {
    let server = FakeApiServer::start().await;
    let mut config = server.config();
    config.default_retry = false;
    let client = kube::Client::try_from(config).unwrap();
    let maps: Api<ConfigMap> = Api::default_namespaced(client.clone());

    server.set_fail_next(1);
    let failed = maps.get_opt("x").await.unwrap_err();
    assert_eq!(api_status(&failed).map(|s| s.0), Some(503));
    assert!(maps.get_opt("x").await.unwrap().is_none());

    server.set_failure(Failure::Internal);
    server.set_fail_next(1);
    assert_eq!(
        api_status(&maps.get_opt("x").await.unwrap_err()).map(|s| s.0),
        Some(500)
    );

    server.set_failure(Failure::Disconnect);
    server.set_fail_next(1);
    assert!(
        api_status(&maps.get_opt("x").await.unwrap_err()).is_none(),
        "a dropped connection is no API error"
    );
    server.set_failure(Failure::Unavailable);

    // A watcher keeps going through an outage and a restart.
    let watched: Api<ConfigMap> = Api::default_namespaced(server.client());
    let mut applied = watcher(watched.clone(), watcher::Config::default())
        .default_backoff()
        .applied_objects()
        .boxed();
    maps.create(&PostParams::default(), &config_map("one", &[]))
        .await
        .unwrap();
    assert_eq!(next_name(&mut applied).await, "one");

    server.fail_requests(true);
    let outage = maps
        .create(&PostParams::default(), &config_map("lost", &[]))
        .await;
    assert!(outage.is_err());
    tokio::time::sleep(Duration::from_millis(300)).await;
    server.fail_requests(false);
    maps.create(&PostParams::default(), &config_map("two", &[]))
        .await
        .unwrap();
    assert_eq!(next_name(&mut applied).await, "two");

    server.stop();
    assert!(maps.get_opt("two").await.is_err());
    server.restart().await;
    let fresh: Api<ConfigMap> = Api::default_namespaced(server.client());
    fresh
        .create(&PostParams::default(), &config_map("three", &[]))
        .await
        .unwrap();
    assert_eq!(next_name(&mut applied).await, "three");
    assert!(server.object("configmaps", "default", "lost").is_none());
}

async fn next_name(
    applied: &mut futures::stream::BoxStream<'static, Result<ConfigMap, watcher::Error>>,
) -> String {
    tokio::time::timeout(WAIT, applied.try_next())
        .await
        .unwrap()
        .unwrap()
        .unwrap()
        .name_any()
}

#[tokio::test]
async fn recorder_events_and_webhook_configurations_are_served() {
    let server = FakeApiServer::start().await;
    let client = server.client();
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: "keygate".into(),
            instance: None,
        },
    );
    let maps: Api<ConfigMap> = Api::default_namespaced(client.clone());
    let cm = maps
        .create(&PostParams::default(), &config_map("subject", &[]))
        .await
        .unwrap();
    let reference: ObjectReference = cm.object_ref(&());
    let event = Event {
        type_: EventType::Normal,
        reason: "Tested".into(),
        note: Some("hello".into()),
        action: "Test".into(),
        secondary: None,
    };
    recorder.publish(&event, &reference).await.unwrap();
    recorder.publish(&event, &reference).await.unwrap();
    let events = server.objects("events.events.k8s.io", Some("default"));
    assert_eq!(events.len(), 1);
    assert_eq!(events[0]["series"]["count"], 2);

    let webhooks: Api<ValidatingWebhookConfiguration> = Api::all(client.clone());
    let desired = json!({
        "apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingWebhookConfiguration",
        "metadata": {"name": "keygate"},
        "webhooks": [{"name": "a.keygate.dev", "sideEffects": "None", "admissionReviewVersions": ["v1"],
                      "clientConfig": {"service": {"name": "keygate", "namespace": "keygate"}}}],
    });
    let params = PatchParams::apply("keygate").force();
    webhooks
        .patch("keygate", &params, &Patch::Apply(&desired))
        .await
        .unwrap();
    webhooks
        .patch("keygate", &PatchParams::default(), &Patch::Merge(json!({"webhooks": [{"name": "a.keygate.dev", "sideEffects": "None", "admissionReviewVersions": ["v1"], "clientConfig": {"caBundle": "Y2E="}}]})))
        .await
        .unwrap();
    let got = webhooks.get("keygate").await.unwrap();
    assert_eq!(
        got.webhooks.unwrap()[0]
            .client_config
            .ca_bundle
            .as_ref()
            .unwrap()
            .0,
        b"ca"
    );

    let unknown: Api<DynamicObject> = Api::all_with(
        client.clone(),
        &ApiResource {
            group: "nope.dev".into(),
            version: "v1".into(),
            api_version: "nope.dev/v1".into(),
            kind: "Nope".into(),
            plural: "nopes".into(),
        },
    );
    assert_eq!(
        api_status(&unknown.list(&ListParams::default()).await.unwrap_err()).map(|s| s.0),
        Some(404)
    );
    assert!(client.apiserver_version().await.is_ok());
}

mod controller {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};

    use super::*;
    use kube::runtime::controller::{Action, Controller};

    struct Ctx {
        client: kube::Client,
        reconciles: AtomicU64,
    }

    async fn reconcile(obj: Arc<ApiClient>, ctx: Arc<Ctx>) -> Result<Action, kube::Error> {
        ctx.reconciles.fetch_add(1, Ordering::SeqCst);
        let ns = obj.namespace().unwrap_or_default();
        let secret = json!({
            "apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": format!("{}-credentials", obj.name_any()), "ownerReferences": [obj.controller_owner_ref(&())]},
            "stringData": {"roles": obj.spec.roles.join(",")},
        });
        let params = PatchParams::apply("keygate").force();
        Api::<Secret>::namespaced(ctx.client.clone(), &ns)
            .patch(
                &format!("{}-credentials", obj.name_any()),
                &params,
                &Patch::Apply(&secret),
            )
            .await?;
        let status = json!({
            "apiVersion": "keygate.dev/v1alpha1", "kind": "ApiClient",
            "status": {"observedGeneration": obj.metadata.generation, "secretName": format!("{}-credentials", obj.name_any())},
        });
        Api::<ApiClient>::namespaced(ctx.client.clone(), &ns)
            .patch_status(&obj.name_any(), &params, &Patch::Apply(&status))
            .await?;
        Ok(Action::requeue(Duration::from_millis(50)))
    }

    fn error_policy(_: Arc<ApiClient>, _: &kube::Error, _: Arc<Ctx>) -> Action {
        Action::requeue(Duration::from_millis(50))
    }

    async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
        let deadline = tokio::time::Instant::now() + WAIT;
        while !check() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting for {what}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test]
    async fn a_controller_converges_and_then_writes_nothing() {
        let server = FakeApiServer::start().await;
        let client = server.client();
        let ctx = Arc::new(Ctx {
            client: client.clone(),
            reconciles: AtomicU64::new(0),
        });
        let clients: Api<ApiClient> = Api::default_namespaced(client.clone());
        let controller = Controller::new(clients.clone(), watcher::Config::default())
            .owns(
                Api::<Secret>::default_namespaced(client.clone()),
                watcher::Config::default(),
            )
            .run(reconcile, error_policy, ctx.clone())
            .for_each(|_| async {});
        tokio::spawn(controller);

        clients
            .create(
                &PostParams::default(),
                &ApiClient::new(
                    "app",
                    ApiClientSpec {
                        roles: vec!["r".into()],
                        ..Default::default()
                    },
                ),
            )
            .await
            .unwrap();
        eventually("status", || {
            server
                .object("apiclients", "default", "app")
                .is_some_and(|o| o["status"]["observedGeneration"] == 1)
        })
        .await;
        let secret = server
            .object("secrets", "default", "app-credentials")
            .unwrap();
        assert_eq!(
            secret["metadata"]["ownerReferences"][0]["kind"],
            "ApiClient"
        );

        // Idle resyncs: reconciles keep coming, but nothing changes.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let (effective, reconciles) = (
            server.effective_writes(),
            ctx.reconciles.load(Ordering::SeqCst),
        );
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert!(ctx.reconciles.load(Ordering::SeqCst) > reconciles + 2);
        assert_eq!(
            server.effective_writes(),
            effective,
            "idle reconciles write nothing"
        );

        clients
            .patch(
                "app",
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"roles": ["r", "w"]}})),
            )
            .await
            .unwrap();
        eventually("the new generation", || {
            server
                .object("apiclients", "default", "app")
                .is_some_and(|o| o["status"]["observedGeneration"] == 2)
        })
        .await;

        clients
            .delete("app", &DeleteParams::default())
            .await
            .unwrap();
        assert!(
            server
                .object("secrets", "default", "app-credentials")
                .is_none()
        );
    }
}
