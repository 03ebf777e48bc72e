//! `keygate inject -f <manifest>`: the sidecar added to the Pods and pod templates of a
//! multi-document YAML manifest, with the same patch code as the admission webhook. For
//! GitOps users who commit the injected manifest and for clusters without the webhook.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Pod;
use serde::Deserialize;
use serde_json::Value as Json;
use serde_yaml_ng::Value as Yaml;

use super::inject::{InjectConfig, inject};

/// Where the pod template of each workload kind lives.
fn template_path(kind: &str) -> Option<&'static [&'static str]> {
    match kind {
        "Pod" => Some(&[]),
        "PodTemplate" => Some(&["template"]),
        "Deployment"
        | "StatefulSet"
        | "DaemonSet"
        | "ReplicaSet"
        | "Job"
        | "ReplicationController" => Some(&["spec", "template"]),
        "CronJob" => Some(&["spec", "jobTemplate", "spec", "template"]),
        _ => None,
    }
}

/// Adds the sidecar to every opted-in Pod and pod template (Deployment, StatefulSet,
/// DaemonSet, ReplicaSet, Job, CronJob, ReplicationController, PodTemplate, and the items of
/// a `List`) in `yaml_text`, a multi-document YAML stream. A document the injection does not
/// change is returned byte for byte as it came (comments, quoting, flow style and all), so
/// that a GitOps diff shows only what injection did; a changed one is re-emitted with its
/// key order kept and its leading comments, but other comments dropped.
///
/// ScopePolicies are looked up first among the documents of the stream itself, then with
/// `policy_upstream(namespace, name)`. Objects without a namespace are taken to be in
/// `default`. Every denial is reported, each prefixed with the object it concerns.
pub fn inject_manifest(
    yaml_text: &str,
    config: &InjectConfig,
    native_sidecars: bool,
    policy_upstream: impl Fn(&str, &str) -> Option<u16>,
) -> Result<String, String> {
    // Each source document with what it parses to (nothing for comments alone).
    let mut chunks: Vec<(&str, Vec<Yaml>)> = Vec::new();
    let mut number = 0;
    for chunk in split_documents(yaml_text) {
        let mut values = Vec::new();
        for document in serde_yaml_ng::Deserializer::from_str(chunk) {
            number += 1;
            let value = Yaml::deserialize(document)
                .map_err(|e| format!("document {number}: invalid YAML: {e}"))?;
            if !value.is_null() {
                values.push(value);
            }
        }
        chunks.push((chunk, values));
    }

    let mut local_policies: BTreeMap<(String, String), u16> = BTreeMap::new();
    for document in chunks.iter().flat_map(|(_, values)| values) {
        collect_policies(document, &mut local_policies);
    }
    let lookup = |namespace: &str, name: &str| {
        local_policies
            .get(&(namespace.to_owned(), name.to_owned()))
            .copied()
            .or_else(|| policy_upstream(namespace, name))
    };

    let mut errors = Vec::new();
    let mut out = String::new();
    for (chunk, mut values) in chunks {
        let before = values.clone();
        for document in &mut values {
            inject_document(document, config, native_sidecars, &lookup, &mut errors);
        }
        if values == before {
            out.push_str(chunk);
            continue;
        }
        out.push_str(&leading_comments(chunk));
        for (index, document) in values.iter().enumerate() {
            if index > 0 {
                out.push_str("---\n");
            }
            out.push_str(&serde_yaml_ng::to_string(document).map_err(|e| e.to_string())?);
        }
    }
    if !errors.is_empty() {
        return Err(errors.join("\n"));
    }
    Ok(out)
}

/// Whether `line` starts a document: `---` alone or followed by a space or tab.
fn is_document_start(line: &str) -> bool {
    line.strip_prefix("---").is_some_and(|rest| {
        rest.trim_end_matches(['\r', '\n']).is_empty() || rest.starts_with([' ', '\t'])
    })
}

/// `text` cut into its documents' source text, each from its `---` line (or the start of
/// the text) to the next; concatenated, they are `text` again. A document marker is never
/// part of a scalar at column 0 (YAML 1.2 §9.1.2), so cutting at these lines is exact;
/// directives (`%YAML`) after a `...` go with the document they precede.
fn split_documents(text: &str) -> Vec<&str> {
    let mut chunks = Vec::new();
    let mut start = 0;
    let mut offset = 0;
    // Whether the current chunk ended with `...` (or has no content yet): `%` lines then
    // are directives of the next document.
    let mut ended = true;
    let mut in_directives = false;
    for line in text.split_inclusive('\n') {
        let content = line.trim_end();
        let directive = ended && line.starts_with('%');
        if !in_directives && (directive || is_document_start(line)) {
            if offset > start {
                chunks.push(&text[start..offset]);
            }
            start = offset;
        }
        in_directives = directive || (in_directives && !is_document_start(line));
        if content == "..." {
            ended = true;
        } else if !(content.is_empty() || content.starts_with('#') || directive) {
            ended = false;
        }
        offset += line.len();
    }
    if offset > start {
        chunks.push(&text[start..]);
    }
    chunks
}

/// What is kept of a document that is re-emitted: its `---` line (a plain one if it carried
/// more than a comment) and the comment and blank lines before its content.
fn leading_comments(chunk: &str) -> String {
    let mut out = String::new();
    for (index, line) in chunk.split_inclusive('\n').enumerate() {
        let content = line.trim();
        if index == 0 && is_document_start(line) {
            let rest = content.trim_start_matches('-').trim();
            let bare = rest.is_empty() || rest.starts_with('#');
            out.push_str(if bare { line } else { "---\n" });
        } else if content.is_empty() || content.starts_with('#') {
            out.push_str(line);
        } else {
            break;
        }
    }
    if !out.is_empty() && !out.ends_with('\n') {
        out.push('\n');
    }
    out
}

fn str_at<'v>(value: &'v Yaml, path: &[&str]) -> Option<&'v str> {
    path.iter()
        .try_fold(value, |v, key| v.get(*key))
        .and_then(Yaml::as_str)
}

fn namespace_of(document: &Yaml) -> String {
    str_at(document, &["metadata", "namespace"])
        .unwrap_or("default")
        .to_owned()
}

fn collect_policies(document: &Yaml, out: &mut BTreeMap<(String, String), u16>) {
    if str_at(document, &["kind"]) == Some("List") {
        for item in document
            .get("items")
            .and_then(Yaml::as_sequence)
            .into_iter()
            .flatten()
        {
            collect_policies(item, out);
        }
        return;
    }
    let is_policy = str_at(document, &["kind"]) == Some("ScopePolicy")
        && str_at(document, &["apiVersion"]).is_some_and(|v| v.starts_with("keygate.dev/"));
    if !is_policy {
        return;
    }
    if let Some(name) = str_at(document, &["metadata", "name"]) {
        let port = document
            .get("spec")
            .and_then(|s| s.get("upstream"))
            .and_then(|u| u.get("port"))
            .and_then(Yaml::as_u64)
            .and_then(|p| u16::try_from(p).ok())
            .unwrap_or(8080);
        out.insert((namespace_of(document), name.to_owned()), port);
    }
}

fn inject_document(
    document: &mut Yaml,
    config: &InjectConfig,
    native_sidecars: bool,
    lookup: &dyn Fn(&str, &str) -> Option<u16>,
    errors: &mut Vec<String>,
) {
    let kind = str_at(document, &["kind"]).unwrap_or_default().to_owned();
    if kind == "List" {
        if let Some(items) = document.get_mut("items").and_then(Yaml::as_sequence_mut) {
            for item in items {
                inject_document(item, config, native_sidecars, lookup, errors);
            }
        }
        return;
    }
    let Some(path) = template_path(&kind) else {
        return;
    };
    let namespace = namespace_of(document);
    let label = format!(
        "{kind} {namespace}/{}",
        str_at(document, &["metadata", "name"]).unwrap_or("<unnamed>")
    );
    let Some(template) = path
        .iter()
        .try_fold(&mut *document, |v, key| v.get_mut(*key))
    else {
        errors.push(format!("{label}: no pod template at .{}", path.join(".")));
        return;
    };
    match inject_template(template, &namespace, config, native_sidecars, lookup) {
        Ok(()) => {}
        Err(message) => errors.push(format!("{label}: {message}")),
    }
}

/// Injects into one Pod or pod template (`metadata` + `spec`) in place.
fn inject_template(
    template: &mut Yaml,
    namespace: &str,
    config: &InjectConfig,
    native_sidecars: bool,
    lookup: &dyn Fn(&str, &str) -> Option<u16>,
) -> Result<(), String> {
    let json: Json = serde_json::to_value(&*template).map_err(|e| e.to_string())?;
    let mut pod_json = serde_json::json!({
        "metadata": json.get("metadata").cloned().unwrap_or_else(|| serde_json::json!({})),
        "spec": json.get("spec").cloned().unwrap_or(Json::Null),
    });
    let pod: Pod = serde_json::from_value(pod_json.clone())
        .map_err(|e| format!("not a valid pod template: {e}"))?;
    let Some(patch) =
        inject(&pod, namespace, config, native_sidecars, lookup).map_err(|deny| deny.0)?
    else {
        return Ok(());
    };
    json_patch::patch(&mut pod_json, &patch.0).map_err(|e| format!("applying the patch: {e}"))?;
    let Some(map) = template.as_mapping_mut() else {
        return Err("the pod template is not a mapping".to_owned());
    };
    for key in ["metadata", "spec"] {
        let patched = pod_json.get(key).cloned().unwrap_or(Json::Null);
        let original = map.get(key).cloned();
        map.insert(Yaml::from(key), to_yaml(&patched, original.as_ref()));
    }
    Ok(())
}

/// `value` as YAML, keeping the key order of `original` for the keys it already had (serde_json
/// sorts keys) and matching list items by `name`, then by position.
fn to_yaml(value: &Json, original: Option<&Yaml>) -> Yaml {
    match value {
        Json::Object(map) => {
            let mut out = serde_yaml_ng::Mapping::new();
            if let Some(Yaml::Mapping(original)) = original {
                for (key, old) in original {
                    if let Some(new) = key.as_str().and_then(|k| map.get(k)) {
                        out.insert(key.clone(), to_yaml(new, Some(old)));
                    }
                }
            }
            for (key, new) in map {
                let key_yaml = Yaml::from(key.as_str());
                if !out.contains_key(&key_yaml) {
                    out.insert(key_yaml, to_yaml(new, None));
                }
            }
            Yaml::Mapping(out)
        }
        Json::Array(items) => {
            let originals = match original {
                Some(Yaml::Sequence(seq)) => seq.as_slice(),
                _ => &[],
            };
            let by_name = |name: &str| {
                originals
                    .iter()
                    .find(|o| o.get("name").and_then(Yaml::as_str) == Some(name))
            };
            Yaml::Sequence(
                items
                    .iter()
                    .enumerate()
                    .map(|(index, item)| {
                        let old = match item.get("name").and_then(Json::as_str) {
                            Some(name) => by_name(name),
                            None => originals.get(index),
                        };
                        to_yaml(item, old)
                    })
                    .collect(),
            )
        }
        other => serde_yaml_ng::to_value(other).unwrap_or(Yaml::Null),
    }
}
