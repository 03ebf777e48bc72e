//! The decision functions on AdmissionReview fixtures shaped exactly as the API server sends
//! them (tests/fixtures/admission), asserting the Pod that results from applying the patch.

use k8s_openapi::api::core::v1::Pod;
use kube::core::admission::AdmissionResponse;
use serde_json::{Value, json};

use super::inject::*;
use super::manifest::inject_manifest;
use super::server::{mutate_review, review_json, validate_review};

const IMAGE: &str = "ghcr.io/keygate/keygate:0.1.0";

fn config() -> InjectConfig {
    InjectConfig::new(IMAGE, "0.1.0")
}

/// The cluster of the fixtures: ScopePolicy shop/orders with upstream port 8080.
fn lookup(namespace: &str, name: &str) -> Option<u16> {
    (namespace == "shop" && name == "orders").then_some(8080)
}

fn fixture(name: &str) -> String {
    let path = format!(
        "{}/tests/fixtures/admission/{name}",
        env!("CARGO_MANIFEST_DIR")
    );
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn mutate(body: &str, native: bool) -> AdmissionResponse {
    mutate_review(body.as_bytes(), &config(), native, lookup)
        .response
        .expect("a response")
}

/// The fixture's Pod after applying the patch of the response.
fn apply(body: &str, response: &AdmissionResponse) -> Value {
    let review: Value = serde_json::from_str(body).expect("fixture JSON");
    let mut pod = review["request"]["object"].clone();
    let patch: json_patch::Patch =
        serde_json::from_slice(response.patch.as_deref().expect("a patch")).expect("patch JSON");
    json_patch::patch(&mut pod, &patch.0).expect("the patch applies");
    // The result is still a valid Pod.
    serde_json::from_value::<Pod>(pod.clone()).expect("a Pod");
    pod
}

fn with_object(body: &str, object: &Value) -> String {
    let mut review: Value = serde_json::from_str(body).expect("fixture JSON");
    review["request"]["object"] = object.clone();
    review.to_string()
}

fn sidecars(pod: &Value) -> Vec<(&'static str, usize, Value)> {
    let mut found = Vec::new();
    for list in ["initContainers", "containers"] {
        for (i, c) in pod["spec"][list]
            .as_array()
            .into_iter()
            .flatten()
            .enumerate()
        {
            if c["name"] == SIDECAR_NAME {
                found.push((list, i, c.clone()));
            }
        }
    }
    found
}

fn assert_hardened(sidecar: &Value) {
    let sc = &sidecar["securityContext"];
    assert_eq!(sc["runAsNonRoot"], true);
    assert_eq!(sc["runAsUser"], 65532);
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(sc["capabilities"]["drop"], json!(["ALL"]));
    assert_eq!(sc["seccompProfile"]["type"], "RuntimeDefault");
    assert_eq!(
        sidecar["readinessProbe"]["httpGet"],
        json!({"path": "/readyz", "port": 8101, "scheme": "HTTP"})
    );
    assert_eq!(sidecar["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(sidecar["livenessProbe"]["httpGet"]["port"], 8101);
    assert_eq!(
        sidecar["volumeMounts"],
        json!([{"name": "keygate-policy", "mountPath": "/etc/keygate", "readOnly": true}])
    );
    assert_eq!(
        sidecar["ports"],
        json!([
            {"name": "keygate", "containerPort": 8100, "protocol": "TCP"},
            {"name": "keygate-admin", "containerPort": 8101, "protocol": "TCP"}
        ])
    );
    assert_eq!(sidecar["image"], IMAGE);
    assert_eq!(sidecar["resources"]["requests"]["cpu"], "10m");
    assert_eq!(sidecar["resources"]["limits"]["memory"], "128Mi");
}

/// The capture init container: `keygate-sidecar capture` for `ports` to `to`, as root with
/// NET_ADMIN and nothing else.
fn assert_capture(container: &Value, ports: &str, to: &str) {
    assert_eq!(container["name"], CAPTURE_NAME);
    assert_eq!(container["command"], json!(["/keygate-sidecar"]));
    assert_eq!(
        container["args"],
        json!(["capture", "--ports", ports, "--to", to])
    );
    assert!(
        container.get("restartPolicy").is_none(),
        "runs to completion"
    );
    let sc = &container["securityContext"];
    assert_eq!(sc["runAsUser"], 0);
    assert_eq!(sc["capabilities"]["add"], json!(["NET_ADMIN"]));
    assert_eq!(sc["capabilities"]["drop"], json!(["ALL"]));
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(sc["privileged"], false);
    assert_eq!(sc["readOnlyRootFilesystem"], true);
}

fn assert_policy_volume(pod: &Value) {
    let volumes = pod["spec"]["volumes"].as_array().expect("volumes");
    assert_eq!(
        volumes[0]["name"], "kube-api-access-7x2kq",
        "existing volumes stay"
    );
    let policy: Vec<_> = volumes
        .iter()
        .filter(|v| v["name"] == POLICY_VOLUME)
        .collect();
    assert_eq!(policy.len(), 1);
    assert_eq!(policy[0]["configMap"]["name"], "orders-keygate-policy");
}

#[test]
fn labelled_pod_gets_a_native_sidecar() {
    let body = fixture("pod-inject.json");
    let response = mutate(&body, true);
    assert!(response.allowed);
    assert_eq!(response.uid, "705ab4f5-6393-11e8-b7cc-42010a800002");
    let pod = apply(&body, &response);

    let found = sidecars(&pod);
    assert_eq!(found.len(), 1, "exactly one sidecar");
    let (list, index, sidecar) = &found[0];
    assert_eq!((*list, *index), ("initContainers", 1));
    assert_capture(&pod["spec"]["initContainers"][0], "8080", "8100");
    assert_eq!(sidecar["restartPolicy"], "Always");
    assert_eq!(sidecar["command"], json!(["/keygate-sidecar"]));
    assert_eq!(
        sidecar["args"],
        json!([
            "--policy",
            "/etc/keygate/policy.json",
            "--listen",
            "0.0.0.0:8100",
            "--upstream",
            "127.0.0.1:8080",
            "--admin",
            "0.0.0.0:8101"
        ])
    );
    assert!(sidecar["startupProbe"]["httpGet"].is_object());
    assert_hardened(sidecar);
    assert_policy_volume(&pod);
    assert_eq!(pod["spec"]["containers"][0]["name"], "app");
    assert_eq!(pod["spec"]["containers"].as_array().map(Vec::len), Some(1));
    let annotations = &pod["metadata"]["annotations"];
    assert_eq!(annotations[INJECTED_ANNOTATION], "0.1.0");
    assert_eq!(annotations[POLICY_ANNOTATION], "orders");
    assert!(annotations.get(DEFAULT_CONTAINER_ANNOTATION).is_none());
    assert_eq!(pod["metadata"]["labels"][CAPTURE_LABEL], "redirect");

    // Reinvocation (reinvocationPolicy: IfNeeded) on the injected Pod changes nothing.
    let again = mutate(&with_object(&body, &pod), true);
    assert!(again.allowed);
    assert!(again.patch.is_none());
}

#[test]
fn labelled_pod_gets_a_first_container_without_native_sidecars() {
    let body = fixture("pod-inject.json");
    let response = mutate(&body, false);
    let pod = apply(&body, &response);
    let found = sidecars(&pod);
    assert_eq!(found.len(), 1);
    let (list, index, sidecar) = &found[0];
    assert_eq!((*list, *index), ("containers", 0));
    assert!(sidecar.get("restartPolicy").is_none());
    assert_hardened(sidecar);
    assert_policy_volume(&pod);
    assert_eq!(pod["spec"]["containers"][1]["name"], "app");
    // Only the capture init container: it runs before every container.
    let init = pod["spec"]["initContainers"].as_array().expect("init");
    assert_eq!(init.len(), 1);
    assert_capture(&init[0], "8080", "8100");
    assert_eq!(
        pod["metadata"]["annotations"][DEFAULT_CONTAINER_ANNOTATION],
        "app"
    );
    assert!(mutate(&with_object(&body, &pod), false).patch.is_none());
}

#[test]
fn existing_native_sidecar_stays_after_ours() {
    let body = fixture("pod-native-sidecar.json");
    let response = mutate(&body, true);
    let pod = apply(&body, &response);
    let names: Vec<_> = pod["spec"]["initContainers"]
        .as_array()
        .expect("init containers")
        .iter()
        .map(|c| c["name"].as_str().unwrap_or_default().to_owned())
        .collect();
    assert_eq!(
        names,
        [
            "keygate-capture",
            "keygate-sidecar",
            "log-shipper",
            "migrate"
        ]
    );
    // The upstream port annotation wins over the ScopePolicy's port.
    let args = pod["spec"]["initContainers"][1]["args"].to_string();
    assert!(args.contains("127.0.0.1:9090"), "{args}");
    assert_capture(&pod["spec"]["initContainers"][0], "9090", "8100");
}

#[test]
fn unlabelled_and_injected_pods_are_left_alone() {
    for name in ["pod-no-label.json", "pod-already-injected.json"] {
        for native in [true, false] {
            let response = mutate(&fixture(name), native);
            assert!(response.allowed, "{name}");
            assert!(response.patch.is_none(), "{name}");
        }
    }
}

#[test]
fn missing_policy_annotation_is_denied_with_the_fix() {
    let response = mutate(&fixture("pod-no-policy-annotation.json"), true);
    assert!(!response.allowed);
    assert_eq!(response.uid, "9a1c2e3f-4b5d-4f60-8a7b-9c0d1e2f3a4b");
    assert!(response.patch.is_none());
    assert!(
        response.result.message.contains(
            "add the annotation keygate.dev/policy: <ScopePolicy name> to the pod (template) or remove the label keygate.dev/inject"
        ),
        "{}",
        response.result.message
    );
}

#[test]
fn missing_scope_policy_is_denied_naming_it() {
    let response = mutate(&fixture("pod-missing-policy.json"), true);
    assert!(!response.allowed);
    let message = &response.result.message;
    assert!(message.contains("ScopePolicy shop/payments"), "{message}");
    assert!(message.contains("does not exist"), "{message}");
}

#[test]
fn labelled_pod_in_an_unwatched_namespace_is_denied_with_the_fix() {
    // The operator watches billing and payments; the fixtures' Pods are in shop.
    let config = InjectConfig {
        watch_namespaces: vec!["billing".to_owned(), "payments".to_owned()],
        ..config()
    };
    let mutate = |name: &str| {
        mutate_review(fixture(name).as_bytes(), &config, true, lookup)
            .response
            .expect("a response")
    };
    let response = mutate("pod-inject.json");
    assert!(
        !response.allowed,
        "an opted-in pod must not start without the sidecar"
    );
    assert_eq!(response.uid, "705ab4f5-6393-11e8-b7cc-42010a800002");
    assert!(response.patch.is_none());
    let message = &response.result.message;
    for part in [
        "namespace shop is not watched by this keygate operator (it watches billing, payments)",
        "add shop to the operator's watched namespaces (Helm value watchNamespaces",
        "or remove the label keygate.dev/inject",
    ] {
        assert!(message.contains(part), "{message}");
    }
    // Pods that did not opt in, or already carry the sidecar, are left alone there.
    for name in ["pod-no-label.json", "pod-already-injected.json"] {
        let response = mutate(name);
        assert!(response.allowed, "{name}");
        assert!(response.patch.is_none(), "{name}");
    }
    // Once shop is watched, the same Pod gets its sidecar.
    let config = InjectConfig {
        watch_namespaces: vec!["billing".to_owned(), "shop".to_owned()],
        ..config
    };
    let body = fixture("pod-inject.json");
    let response = mutate_review(body.as_bytes(), &config, true, lookup)
        .response
        .expect("a response");
    assert!(response.allowed, "{}", response.result.message);
    assert_eq!(sidecars(&apply(&body, &response)).len(), 1);
}

#[test]
fn malformed_body_is_invalid_not_a_panic() {
    for body in [
        fixture("malformed.json"),
        String::new(),
        "[]".to_owned(),
        "{\"request\":{\"uid\":\"u1\"}}".to_owned(),
    ] {
        let review = mutate_review(body.as_bytes(), &config(), true, lookup);
        let response = review.response.expect("a response");
        assert!(!response.allowed);
        assert_eq!(response.result.reason, "InvalidRequest");
        let review = validate_review(body.as_bytes());
        assert!(!review.response.expect("a response").allowed);
    }
    // The uid is echoed when it can be read.
    let review = validate_review(br#"{"request":{"uid":"u1"}}"#);
    assert_eq!(review.response.expect("a response").uid, "u1");
}

#[test]
fn patch_goes_out_base64_encoded() {
    let body = fixture("pod-inject.json");
    let review = mutate_review(body.as_bytes(), &config(), true, lookup);
    let wire: Value = serde_json::from_slice(&review_json(&review).expect("json")).expect("json");
    assert_eq!(wire["apiVersion"], "admission.k8s.io/v1");
    assert_eq!(wire["kind"], "AdmissionReview");
    assert_eq!(wire["response"]["patchType"], "JSONPatch");
    assert!(wire["response"]["patch"].is_string());
}

fn pod_with(annotations: Value, ports: Value) -> Pod {
    serde_json::from_value(json!({
        "metadata": {"name": "p", "labels": {"keygate.dev/inject": "true"}, "annotations": annotations},
        "spec": {"containers": [{"name": "app", "image": "app", "ports": ports}]}
    }))
    .expect("pod")
}

#[test]
fn port_and_resource_annotations() {
    let ann = |extra: Value| {
        let mut a = json!({"keygate.dev/policy": "orders"});
        if let (Some(a), Some(e)) = (a.as_object_mut(), extra.as_object()) {
            a.extend(e.clone());
        }
        a
    };
    // The app already uses the sidecar's port.
    let pod = pod_with(ann(json!({})), json!([{"containerPort": 8100}]));
    let deny = inject(&pod, "shop", &config(), true, lookup).expect_err("denied");
    assert!(deny.0.contains("keygate.dev/listen-port"), "{deny}");
    // Moved away with the annotation; the app's own 8100 is then a port around the sidecar,
    // so it must be declared open on purpose.
    let pod = pod_with(
        ann(json!({"keygate.dev/listen-port": "8200", "keygate.dev/open-ports": "8100"})),
        json!([{"containerPort": 8100}]),
    );
    assert!(
        inject(&pod, "shop", &config(), true, lookup)
            .expect("ok")
            .is_some()
    );
    // Not a port.
    let pod = pod_with(ann(json!({"keygate.dev/upstream-port": "http"})), json!([]));
    assert!(inject(&pod, "shop", &config(), true, lookup).is_err());
    // Upstream equal to the listen port would loop.
    let pod = pod_with(ann(json!({"keygate.dev/upstream-port": "8100"})), json!([]));
    assert!(inject(&pod, "shop", &config(), true, lookup).is_err());
    // Resource overrides set the request and the configured limit.
    let pod = pod_with(
        ann(json!({"keygate.dev/sidecar-cpu": "50m", "keygate.dev/sidecar-memory": "64Mi"})),
        json!([]),
    );
    let patch = inject(&pod, "shop", &config(), true, lookup)
        .expect("ok")
        .expect("patch");
    let patch = serde_json::to_value(&patch).expect("json");
    // The first op adds the init containers: capture, then the sidecar.
    let resources = &patch[0]["value"][1]["resources"];
    assert_eq!(
        resources["requests"],
        json!({"cpu": "50m", "memory": "64Mi"})
    );
    assert_eq!(resources["limits"], json!({"memory": "64Mi"}));
    let pod = pod_with(
        ann(json!({"keygate.dev/sidecar-memory": "lots"})),
        json!([]),
    );
    assert!(inject(&pod, "shop", &config(), true, lookup).is_err());
}

/// The Pod that results from injecting `pod` with `config`.
fn injected(pod: &Pod, config: &InjectConfig) -> Value {
    let patch = inject(pod, "shop", config, true, lookup)
        .expect("injected")
        .expect("a patch");
    let mut value = serde_json::to_value(pod).expect("json");
    json_patch::patch(&mut value, &patch.0).expect("the patch applies");
    value
}

#[test]
fn prometheus_annotations_only_when_asked_and_never_over_the_pods_own() {
    let annotations = json!({"keygate.dev/policy": "orders"});
    let pod = pod_with(annotations.clone(), json!([]));
    let plain = injected(&pod, &config());
    assert!(
        plain["metadata"]["annotations"]
            .get("prometheus.io/scrape")
            .is_none()
    );

    let config = InjectConfig {
        prometheus_annotations: true,
        ..config()
    };
    let annotated = injected(&pod, &config);
    let got = &annotated["metadata"]["annotations"];
    assert_eq!(got["prometheus.io/scrape"], "true");
    assert_eq!(got["prometheus.io/port"], "8101");
    assert_eq!(got["prometheus.io/path"], "/metrics");

    // The app's own scraping is left as the Pod asked.
    let own = pod_with(
        json!({"keygate.dev/policy": "orders", "prometheus.io/port": "9090"}),
        json!([]),
    );
    let got = &injected(&own, &config)["metadata"]["annotations"];
    assert_eq!(got["prometheus.io/port"], "9090");
    assert!(got.get("prometheus.io/scrape").is_none());
}

#[test]
fn audit_settings_reach_the_sidecar_only_when_changed() {
    let pod = pod_with(json!({"keygate.dev/policy": "orders"}), json!([]));
    let env_of = |pod: &Value| {
        let (_, _, sidecar) = sidecars(pod).remove(0);
        sidecar["env"]
            .as_array()
            .expect("env")
            .iter()
            .filter(|e| {
                e["name"]
                    .as_str()
                    .is_some_and(|n| n.starts_with("KEYGATE_AUDIT_"))
            })
            .map(|e| (e["name"].as_str().unwrap().to_owned(), e["value"].clone()))
            .collect::<Vec<_>>()
    };
    assert!(env_of(&injected(&pod, &config())).is_empty());
    let config = InjectConfig {
        audit: crate::audit::AuditConfig {
            audit_allowed_sample: "0.05".parse().unwrap(),
            audit_refused_per_second: 100,
        },
        ..config()
    };
    assert_eq!(
        env_of(&injected(&pod, &config)),
        [("KEYGATE_AUDIT_ALLOWED_SAMPLE".to_owned(), json!("0.05"))]
    );
}

#[test]
fn capture_modes_and_ports_left_open() {
    let pod = |annotations: Value, ports: Value| {
        let mut a = json!({"keygate.dev/policy": "orders"});
        if let (Some(a), Some(e)) = (a.as_object_mut(), annotations.as_object()) {
            a.extend(e.clone());
        }
        pod_with(a, ports)
    };
    let injected = |pod: &Pod, config: &InjectConfig| -> Result<Value, Deny> {
        let patch = inject(pod, "shop", config, true, lookup)?.expect("patch");
        let mut value = serde_json::to_value(pod).expect("json");
        json_patch::patch(&mut value, &patch.0).expect("applies");
        Ok(value)
    };
    let init_names = |pod: &Value| -> Vec<String> {
        pod["spec"]["initContainers"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|c| c["name"].as_str().unwrap_or_default().to_owned())
            .collect()
    };

    // Default (redirect): the app's port is captured; a second declared port is refused
    // unless the Pod says it is open on purpose.
    let app_and_metrics = json!([{"containerPort": 8080}, {"containerPort": 9100}]);
    let deny = injected(&pod(json!({}), app_and_metrics.clone()), &config()).expect_err("denied");
    assert!(deny.0.contains("port 9100"), "{deny}");
    assert!(
        deny.0.contains("keygate.dev/open-ports: \"9100\""),
        "{deny}"
    );
    let open = injected(
        &pod(json!({"keygate.dev/open-ports": "9100"}), app_and_metrics),
        &config(),
    )
    .expect("allowed");
    assert_eq!(init_names(&open), [CAPTURE_NAME, SIDECAR_NAME]);
    for bad in ["metrics", "0", "9100,x", "70000"] {
        let deny = injected(
            &pod(json!({"keygate.dev/open-ports": bad}), json!([])),
            &config(),
        )
        .expect_err(bad);
        assert!(deny.0.contains(OPEN_PORTS_ANNOTATION), "{deny}");
    }

    // network-policy: no init container with NET_ADMIN; the label the operator's
    // NetworkPolicy selects; other declared ports are blocked by that policy.
    let np = injected(
        &pod(
            json!({"keygate.dev/capture": "network-policy"}),
            json!([{"containerPort": 8080}, {"containerPort": 9100}]),
        ),
        &config(),
    )
    .expect("allowed");
    assert_eq!(init_names(&np), [SIDECAR_NAME]);
    assert_eq!(np["metadata"]["labels"][CAPTURE_LABEL], "network-policy");

    // loopback: nothing added, but an app that publishes its port contradicts it.
    let lo = injected(
        &pod(json!({"keygate.dev/capture": "loopback"}), json!([])),
        &config(),
    )
    .expect("allowed");
    assert_eq!(init_names(&lo), [SIDECAR_NAME]);
    assert_eq!(lo["metadata"]["labels"][CAPTURE_LABEL], "loopback");
    let deny = injected(
        &pod(
            json!({"keygate.dev/capture": "loopback"}),
            json!([{"containerPort": 8080}]),
        ),
        &config(),
    )
    .expect_err("published app port");
    assert!(deny.0.contains("127.0.0.1"), "{deny}");

    // The cluster default applies to Pods without the annotation; a Pod cannot get a
    // mode keygate does not know, and a Pod's own label does not survive injection.
    let mut cluster = config();
    cluster.capture = CaptureMode::NetworkPolicy;
    let mut labelled = pod(json!({}), json!([]));
    labelled
        .metadata
        .labels
        .get_or_insert_default()
        .insert(CAPTURE_LABEL.to_owned(), "loopback".to_owned());
    let defaulted = injected(&labelled, &cluster).expect("allowed");
    assert_eq!(
        defaulted["metadata"]["labels"][CAPTURE_LABEL],
        "network-policy"
    );
    let deny = injected(
        &pod(json!({"keygate.dev/capture": "none"}), json!([])),
        &config(),
    )
    .expect_err("unknown mode");
    assert!(deny.0.contains("redirect"), "{deny}");

    // A container of the Pod's own named keygate-capture would be mistaken for ours.
    let mut clash = pod(json!({}), json!([]));
    clash.spec.as_mut().expect("spec").containers[0].name = CAPTURE_NAME.to_owned();
    assert!(injected(&clash, &config()).is_err());
}

#[test]
fn pod_without_init_containers_or_volumes_gets_whole_arrays() {
    let pod = pod_with(json!({"keygate.dev/policy": "orders"}), json!([]));
    let patch = inject(&pod, "shop", &config(), true, lookup)
        .expect("ok")
        .expect("patch");
    let ops = serde_json::to_value(&patch).expect("json");
    let paths: Vec<_> = ops
        .as_array()
        .expect("ops")
        .iter()
        .map(|op| op["path"].as_str().unwrap_or_default().to_owned())
        .collect();
    assert_eq!(
        paths,
        [
            "/spec/initContainers",
            "/spec/volumes",
            "/metadata/annotations/keygate.dev~1injected",
            "/metadata/labels/keygate.dev~1capture"
        ]
    );
    let mut value = serde_json::to_value(&pod).expect("json");
    json_patch::patch(&mut value, &patch.0).expect("applies");
}

#[test]
fn invalid_scope_policy_is_denied_naming_each_rule() {
    let response = validate_review(fixture("scopepolicy-invalid-rule.json").as_bytes())
        .response
        .expect("a response");
    assert!(!response.allowed);
    assert_eq!(response.uid, "7c5b3a19-e8d6-4f42-b0a9-8e7d6c5b4a39");
    let message = &response.result.message;
    assert!(
        message.starts_with("keygate: ScopePolicy shop/orders is invalid: "),
        "{message}"
    );
    assert!(
        message.contains("spec.rules[2] (name \"read-one\")"),
        "{message}"
    );
    assert!(
        message.contains("spec.rules[3] (name \"write\")"),
        "{message}"
    );
    assert!(message.contains("orders.admin"), "{message}");
    assert!(!message.contains("spec.rules[0]") && !message.contains("spec.rules[1]"));
}

#[test]
fn valid_scope_policy_and_unchanged_updates_are_allowed() {
    let response = validate_review(fixture("scopepolicy-valid.json").as_bytes())
        .response
        .expect("a response");
    assert!(response.allowed, "{}", response.result.message);

    // An UPDATE that does not touch an (old, invalid) spec, e.g. removing a finalizer.
    let mut review: Value =
        serde_json::from_str(&fixture("scopepolicy-invalid-rule.json")).expect("json");
    review["request"]["operation"] = json!("UPDATE");
    review["request"]["oldObject"] = review["request"]["object"].clone();
    review["request"]["object"]["metadata"]["finalizers"] = json!([]);
    let response = validate_review(review.to_string().as_bytes())
        .response
        .expect("a response");
    assert!(response.allowed);
}

const MANIFEST: &str = r#"# the orders API
apiVersion: keygate.dev/v1alpha1
kind: ScopePolicy
metadata:
  name: orders-api
  namespace: shop
spec:
  resource: https://orders.shop.svc
  upstream:
    port: 3000
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: orders
  namespace: shop
spec:
  replicas: 2
  selector:
    matchLabels:
      app: orders
  template:
    metadata:
      labels:
        app: orders
        keygate.dev/inject: "true"
      annotations:
        keygate.dev/policy: orders-api
    spec:
      containers:
        - name: app
          image: ghcr.io/example/orders:1.4.2
          ports:
            - containerPort: 3000
---
apiVersion: batch/v1
kind: CronJob
metadata:
  name: report
  namespace: shop
spec:
  schedule: "0 * * * *"
  jobTemplate:
    spec:
      template:
        metadata:
          labels:
            keygate.dev/inject: "true"
          annotations:
            keygate.dev/policy: orders
        spec:
          restartPolicy: OnFailure
          containers:
            - name: report
              image: ghcr.io/example/report:1
---
apiVersion: v1
kind: Service
metadata:
  name: orders
  namespace: shop
spec:
  ports:
    - port: 80
      targetPort: keygate
"#;

#[test]
fn manifest_workloads_get_the_sidecar_once() {
    let out = inject_manifest(MANIFEST, &config(), true, lookup).expect("injected");
    let docs: Vec<Value> = serde_yaml_ng::Deserializer::from_str(&out)
        .map(|d| serde::Deserialize::deserialize(d).expect("yaml"))
        .collect();
    assert_eq!(docs.len(), 4);
    assert_eq!(docs[0]["kind"], "ScopePolicy");
    let deployment = &docs[1]["spec"]["template"];
    assert_eq!(
        deployment["spec"]["initContainers"][1]["name"],
        SIDECAR_NAME
    );
    // The ScopePolicy of the same stream gives the upstream port.
    assert!(
        deployment["spec"]["initContainers"][1]["args"]
            .to_string()
            .contains("127.0.0.1:3000")
    );
    assert_eq!(
        deployment["metadata"]["annotations"][INJECTED_ANNOTATION],
        "0.1.0"
    );
    assert_eq!(docs[1]["spec"]["replicas"], 2);
    let cron = &docs[2]["spec"]["jobTemplate"]["spec"]["template"];
    assert_eq!(cron["spec"]["initContainers"][0]["name"], CAPTURE_NAME);
    assert_eq!(cron["spec"]["initContainers"][1]["name"], SIDECAR_NAME);
    assert_eq!(
        cron["spec"]["volumes"][0]["configMap"]["name"],
        "orders-keygate-policy"
    );
    assert_eq!(docs[3]["kind"], "Service");
    // Key order of the input is kept: apiVersion, kind, metadata, spec.
    let deployment_text = out.split("---\n").nth(1).expect("deployment");
    assert!(deployment_text.starts_with("apiVersion: apps/v1\nkind: Deployment\n"));

    // Injecting the output again changes nothing.
    let again = inject_manifest(&out, &config(), true, lookup).expect("injected");
    assert_eq!(again, out);
}

#[test]
fn manifest_documents_injection_leaves_alone_are_echoed_byte_for_byte() {
    // Flow style, quoting, comments, a document end marker and directives: nothing of it
    // survives a YAML round trip, all of it must survive `keygate inject`.
    let untouched = "# shop services\n\
        apiVersion: v1\n\
        kind: Service\n\
        metadata: {name: orders, namespace: shop, labels: {'app': \"orders\"}}   # flow\n\
        spec:\n  ports: [{port: 80, targetPort: 8080}]\n\
        ---   # a ConfigMap\n\
        apiVersion: v1\nkind: ConfigMap\nmetadata: {name: c}\n\
        data:\n  text: |\n    --- not a marker: indented\n  quoted: 'yes'\n\
        ...\n\
        %YAML 1.2\n\
        ---\n\
        apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: plain, namespace: shop}\n\
        spec:\n  template:\n    metadata: {labels: {app: plain}}\n\
        \x20   spec: {containers: [{name: app, image: \"nginx:1\"}]}\n";
    let out = inject_manifest(untouched, &config(), true, lookup).expect("nothing to inject");
    assert_eq!(out, untouched);

    // With a ScopePolicy and an opted-in workload: only the workload's document changes.
    let mut manifest = MANIFEST.split("---\n");
    let (policy, deployment) = (manifest.next().unwrap(), manifest.next().unwrap());
    let head = format!("{untouched}---\n{policy}");
    let text = format!("{head}---  # injected below\n{deployment}");
    let out = inject_manifest(&text, &config(), true, lookup).expect("injected");
    let injected = out
        .strip_prefix(&head)
        .expect("the documents before are echoed");
    assert!(
        injected.starts_with("---  # injected below\napiVersion: apps/v1\n"),
        "{injected}"
    );
    assert!(injected.contains(SIDECAR_NAME), "{injected}");
    assert_eq!(serde_yaml_ng::Deserializer::from_str(&out).count(), 5);
}

#[test]
fn manifest_denials_name_the_object() {
    let text = MANIFEST.replace(
        "keygate.dev/policy: orders\n",
        "keygate.dev/policy: billing\n",
    );
    let error = inject_manifest(&text, &config(), false, lookup).expect_err("denied");
    assert!(error.starts_with("CronJob shop/report: "), "{error}");
    assert!(error.contains("ScopePolicy shop/billing"), "{error}");
    assert!(inject_manifest("a: [", &config(), false, lookup).is_err());
}

#[test]
fn with_a_policy_server_the_sidecar_follows_the_stream_with_a_projected_token() {
    let pod = pod_with(json!({"keygate.dev/policy": "orders"}), json!([]));
    let mut streaming = config();
    streaming.policy_server = Some("https://keygate.keygate-system.svc:8443".to_owned());
    let patch = inject(&pod, "shop", &streaming, true, lookup)
        .expect("ok")
        .expect("patch");
    let mut value = serde_json::to_value(&pod).expect("json");
    json_patch::patch(&mut value, &patch.0).expect("applies");
    let sidecar = &sidecars(&value)[0].2;
    let args = sidecar["args"].as_array().expect("args");
    let flag = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .map(|i| args[i + 1].clone())
    };
    assert_eq!(
        flag("--policy-server"),
        Some(json!("https://keygate.keygate-system.svc:8443"))
    );
    assert_eq!(
        flag("--token-file"),
        Some(json!("/var/run/secrets/keygate/token"))
    );
    assert_eq!(flag("--ca-file"), Some(json!("/etc/keygate/ca.crt")));
    let mounts = sidecar["volumeMounts"].as_array().expect("mounts");
    assert!(mounts.iter().any(|m| m["name"] == TOKEN_VOLUME
        && m["mountPath"] == "/var/run/secrets/keygate"
        && m["readOnly"] == true));
    let volume = value["spec"]["volumes"]
        .as_array()
        .expect("volumes")
        .iter()
        .find(|v| v["name"] == TOKEN_VOLUME)
        .expect("the token volume")
        .clone();
    assert_eq!(
        volume["projected"]["sources"],
        json!([{"serviceAccountToken": {"audience": "keygate", "expirationSeconds": 3600, "path": "token"}}])
    );
    // Without a policy server (the default), neither the flags nor the volume.
    let plain = inject(&pod, "shop", &config(), true, lookup)
        .expect("ok")
        .expect("patch");
    assert!(
        !serde_json::to_string(&plain)
            .expect("json")
            .contains(TOKEN_VOLUME)
    );
    // A pod's own volume of that name is refused, not shadowed.
    let mut clash = serde_json::to_value(&pod).expect("json");
    clash["spec"]["volumes"] = json!([{"name": TOKEN_VOLUME, "emptyDir": {}}]);
    let clash: Pod = serde_json::from_value(clash).expect("pod");
    assert!(inject(&clash, "shop", &streaming, true, lookup).is_err());
}
