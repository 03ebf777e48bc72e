//! The policy stream's wire format: what an operator replica sends a sidecar that follows a
//! ScopePolicy, one JSON object per line (`application/x-ndjson`). Pure: the server
//! (`controller::policy_stream`) computes events with [`PolicyDelta::between`], the sidecar
//! applies them with [`PolicyDelta::apply`].
//!
//! A stream starts with a [`StreamEvent::Snapshot`] (the whole policy document) and goes on
//! with [`StreamEvent::Change`]s that carry only what changed: clients added or changed in
//! full, removed ones by id, and the other parts of the document (rules, keygate's keys,
//! disabled clients, revocations) only when they changed. An unchanged client costs no byte.
//! [`StreamEvent::Heartbeat`]s let the sidecar tell a quiet stream from a dead one.

use serde::{Deserialize, Serialize};

use super::document::{KeygateIssuer, PolicyClient, PolicyDocument, strict_json};
use crate::api::ScopePolicySpec;
use crate::registry::RevocationList;

/// The most clients one line carries: a snapshot of 100,000 clients is 100 lines of about
/// 500 KiB, not one of 50 MiB, so neither side ever holds a huge line.
pub const CLIENTS_PER_LINE: usize = 1000;

/// One line of the stream.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "camelCase")]
pub enum StreamEvent {
    /// The document at `revision`. Its clients follow in `client_batches`
    /// [`StreamEvent::Clients`] lines; the snapshot is whole after the last of them.
    Snapshot {
        revision: u64,
        document: Box<PolicyDocument>,
        #[serde(rename = "clientBatches", skip_serializing_if = "is_zero")]
        client_batches: u32,
    },
    /// Clients of the snapshot at `revision`.
    Clients {
        revision: u64,
        clients: Vec<PolicyClient>,
    },
    /// What changed from `revision - 1` to `revision`.
    Change {
        revision: u64,
        delta: Box<PolicyDelta>,
    },
    /// Nothing changed; the stream is alive.
    Heartbeat {},
}

impl StreamEvent {
    /// Parses one line, refusing any field this sidecar does not know, at any depth (the
    /// documents and clients inside included), as a policy file is refused
    /// ([`strict_json`]).
    pub fn parse(line: &[u8]) -> Result<Self, String> {
        // Read as a plain struct: an internally tagged enum buffers its content, and fields
        // unknown inside that buffer would go unnoticed.
        let Envelope {
            kind,
            revision,
            document,
            client_batches,
            clients,
            delta,
        } = strict_json(line)?;
        match (kind, revision, document, clients, delta) {
            (Kind::Snapshot, Some(revision), Some(document), None, None) => Ok(Self::Snapshot {
                revision,
                document,
                client_batches: client_batches.unwrap_or(0),
            }),
            (Kind::Clients, Some(revision), None, Some(clients), None)
                if client_batches.is_none() =>
            {
                Ok(Self::Clients { revision, clients })
            }
            (Kind::Change, Some(revision), None, None, Some(delta)) if client_batches.is_none() => {
                Ok(Self::Change { revision, delta })
            }
            (Kind::Heartbeat, None, None, None, None) if client_batches.is_none() => {
                Ok(Self::Heartbeat {})
            }
            (kind, ..) => Err(format!("a {kind:?} line with the wrong fields")),
        }
    }

    /// The lines of a snapshot of `document` at `revision`: one line while it has at most
    /// [`CLIENTS_PER_LINE`] clients (as the previous release sent it); otherwise the
    /// document without its clients, then the clients, [`CLIENTS_PER_LINE`] a line.
    pub fn snapshot_lines(revision: u64, document: &PolicyDocument) -> Vec<Self> {
        if document.clients.len() <= CLIENTS_PER_LINE {
            return vec![Self::Snapshot {
                revision,
                document: Box::new(document.clone()),
                client_batches: 0,
            }];
        }
        let batches = document.clients.chunks(CLIENTS_PER_LINE);
        let mut lines = Vec::with_capacity(batches.len() + 1);
        lines.push(Self::Snapshot {
            revision,
            document: Box::new(document.without_clients()),
            client_batches: u32::try_from(batches.len()).expect("fewer batches than clients"),
        });
        lines.extend(batches.map(|clients| Self::Clients {
            revision,
            clients: clients.to_vec(),
        }));
        lines
    }
}

impl StreamEvent {
    /// The line's `type`, for messages.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Snapshot { .. } => "snapshot",
            Self::Clients { .. } => "clients",
            Self::Change { .. } => "change",
            Self::Heartbeat {} => "heartbeat",
        }
    }
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// A line as read, before it is checked to be one [`StreamEvent`].
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Envelope {
    #[serde(rename = "type")]
    kind: Kind,
    revision: Option<u64>,
    document: Option<Box<PolicyDocument>>,
    client_batches: Option<u32>,
    clients: Option<Vec<PolicyClient>>,
    delta: Option<Box<PolicyDelta>>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
enum Kind {
    Snapshot,
    Clients,
    Change,
    Heartbeat,
}

/// The difference between two documents of the same ScopePolicy.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PolicyDelta {
    /// Clients added or changed, whole.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub upsert_clients: Vec<PolicyClient>,
    /// Client ids no longer in the document.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub remove_clients: Vec<String>,
    /// The new spec, when it changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spec: Option<ScopePolicySpec>,
    /// keygate's issuer and keys, when they changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keygate: Option<KeygateIssuer>,
    /// The disabled clients, when they changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disabled_clients: Option<Vec<String>>,
    /// Revocations added.
    #[serde(default, skip_serializing_if = "RevocationList::is_empty")]
    pub revoke: RevocationList,
    /// Revocations that expired and were dropped.
    #[serde(default, skip_serializing_if = "RevocationList::is_empty")]
    pub unrevoke: RevocationList,
}

impl PolicyDelta {
    /// What turns `old` into `new`, or `None` when they are equal. Both documents have their
    /// clients sorted by id, as [`PolicyDocument::build`] makes them.
    pub fn between(old: &PolicyDocument, new: &PolicyDocument) -> Option<Self> {
        let mut delta = Self::default();
        let (mut a, mut b) = (old.clients.iter().peekable(), new.clients.iter().peekable());
        loop {
            match (a.peek(), b.peek()) {
                (Some(x), Some(y)) if x.client_id == y.client_id => {
                    if x != y {
                        delta.upsert_clients.push((*y).clone());
                    }
                    a.next();
                    b.next();
                }
                (Some(x), Some(y)) if x.client_id < y.client_id => {
                    delta.remove_clients.push(x.client_id.clone());
                    a.next();
                }
                (Some(_), Some(y)) => {
                    delta.upsert_clients.push((*y).clone());
                    b.next();
                }
                (Some(x), None) => {
                    delta.remove_clients.push(x.client_id.clone());
                    a.next();
                }
                (None, Some(y)) => {
                    delta.upsert_clients.push((*y).clone());
                    b.next();
                }
                (None, None) => break,
            }
        }
        if old.spec != new.spec {
            delta.spec = Some(new.spec.clone());
        }
        if old.keygate != new.keygate {
            delta.keygate = Some(new.keygate.clone());
        }
        if old.disabled_clients != new.disabled_clients {
            delta.disabled_clients = Some(new.disabled_clients.clone());
        }
        let (was, is) = (&old.revocations, &new.revocations);
        for (jti, exp) in &is.tokens {
            if was.tokens.get(jti) != Some(exp) {
                delta.revoke.tokens.insert(jti.clone(), *exp);
            }
        }
        for (client, nb) in &is.clients {
            if was.clients.get(client) != Some(nb) {
                delta.revoke.clients.insert(client.clone(), *nb);
            }
        }
        for (jti, exp) in &was.tokens {
            if !is.tokens.contains_key(jti) {
                delta.unrevoke.tokens.insert(jti.clone(), *exp);
            }
        }
        for (client, nb) in &was.clients {
            if !is.clients.contains_key(client) {
                delta.unrevoke.clients.insert(client.clone(), *nb);
            }
        }
        (delta != Self::default()).then_some(delta)
    }

    /// Applies the delta to `document` (the one it was computed from).
    pub fn apply(&self, document: &mut PolicyDocument) {
        self.apply_to_all_but_clients(document);
        for id in &self.remove_clients {
            if let Ok(at) = document
                .clients
                .binary_search_by(|c| c.client_id.as_str().cmp(id))
            {
                document.clients.remove(at);
            }
        }
        for client in &self.upsert_clients {
            match document
                .clients
                .binary_search_by(|c| c.client_id.cmp(&client.client_id))
            {
                Ok(at) => document.clients[at] = client.clone(),
                Err(at) => document.clients.insert(at, client.clone()),
            }
        }
    }

    /// Applies everything but the clients (which a sidecar keeps elsewhere).
    pub fn apply_to_all_but_clients(&self, document: &mut PolicyDocument) {
        if let Some(spec) = &self.spec {
            document.spec = spec.clone();
        }
        if let Some(keygate) = &self.keygate {
            document.keygate = keygate.clone();
        }
        if let Some(disabled) = &self.disabled_clients {
            document.disabled_clients = disabled.clone();
        }
        let revocations = &mut document.revocations;
        for jti in self.unrevoke.tokens.keys() {
            revocations.tokens.remove(jti);
        }
        for client in self.unrevoke.clients.keys() {
            revocations.clients.remove(client);
        }
        for (jti, exp) in &self.revoke.tokens {
            revocations.tokens.insert(jti.clone(), *exp);
        }
        for (client, nb) in &self.revoke.clients {
            revocations.clients.insert(client.clone(), *nb);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::document::PolicyKey;

    const FIXTURE: &str = include_str!("../../tests/fixtures/policy.json");

    fn client(id: &str, scopes: &[&str]) -> PolicyClient {
        PolicyClient {
            client_id: id.to_owned(),
            name: format!("shop/{id}"),
            scopes: scopes.iter().map(|s| (*s).to_owned()).collect(),
            keys: Vec::new(),
            api_keys: Vec::new(),
        }
    }

    fn document(clients: Vec<PolicyClient>) -> PolicyDocument {
        let mut document = PolicyDocument::parse(FIXTURE.as_bytes()).unwrap();
        document.clients = clients;
        document
    }

    #[test]
    fn only_what_changed_travels_and_applying_it_gives_the_new_document() {
        let old = document(vec![
            client("kgc_a", &["orders.read"]),
            client("kgc_b", &["orders.read"]),
            client("kgc_c", &["orders.read"]),
        ]);
        let mut new = document(vec![
            client("kgc_a", &["orders.read"]),
            client("kgc_b", &["orders.read", "orders.write"]),
            client("kgc_d", &["orders.read"]),
        ]);
        new.clients[2].keys.push(PolicyKey {
            fingerprint: "SHA256:x".into(),
            public_key: "pem".into(),
            not_after: None,
        });
        new.revocations.tokens.insert("jti-1".into(), 99);
        new.disabled_clients = vec!["kgc_z".into()];

        let delta = PolicyDelta::between(&old, &new).expect("a delta");
        let ids: Vec<_> = delta
            .upsert_clients
            .iter()
            .map(|c| c.client_id.as_str())
            .collect();
        assert_eq!(ids, ["kgc_b", "kgc_d"], "kgc_a is unchanged and not sent");
        assert_eq!(delta.remove_clients, ["kgc_c"]);
        assert!(delta.spec.is_none() && delta.keygate.is_none());
        assert_eq!(delta.revoke.tokens.len(), 1);
        let mut applied = old.clone();
        delta.apply(&mut applied);
        assert_eq!(applied, new);

        // Back again: the revocation expires, kgc_c returns.
        let back = PolicyDelta::between(&new, &old).expect("a delta");
        assert_eq!(back.unrevoke.tokens.len(), 1);
        let mut applied = new.clone();
        back.apply(&mut applied);
        assert_eq!(applied, old);

        assert_eq!(PolicyDelta::between(&old, &old), None);
    }

    #[test]
    fn a_snapshot_travels_in_lines_of_bounded_size() {
        let clients: Vec<_> = (0..2500)
            .map(|i| client(&format!("kgc_{i:05}"), &["orders.read"]))
            .collect();
        let whole = document(clients.clone());
        let lines = StreamEvent::snapshot_lines(9, &whole);
        assert_eq!(
            lines.len(),
            4,
            "the document, then 1,000 + 1,000 + 500 clients"
        );
        let mut received = Vec::new();
        for (i, event) in lines.iter().enumerate() {
            let line = serde_json::to_string(event).unwrap();
            match (i, StreamEvent::parse(line.as_bytes()).unwrap()) {
                (
                    0,
                    StreamEvent::Snapshot {
                        revision: 9,
                        document,
                        client_batches: 3,
                    },
                ) => {
                    assert!(document.clients.is_empty());
                    assert_eq!(document.spec, whole.spec);
                }
                (
                    _,
                    StreamEvent::Clients {
                        revision: 9,
                        clients,
                    },
                ) => {
                    assert!(clients.len() <= CLIENTS_PER_LINE);
                    received.extend(clients);
                }
                (i, other) => panic!("line {i}: {other:?}"),
            }
        }
        assert_eq!(received, clients);
        // A small document is one line, as a sidecar of the previous release reads it.
        let small = document(vec![client("kgc_a", &["orders.read"])]);
        let lines = StreamEvent::snapshot_lines(1, &small);
        assert_eq!(lines.len(), 1);
        let first = serde_json::to_string(&lines[0]).unwrap();
        assert!(!first.contains("clientBatches"), "{first}");
        match StreamEvent::parse(first.as_bytes()).unwrap() {
            StreamEvent::Snapshot { document, .. } => assert_eq!(*document, small),
            other => panic!("{other:?}"),
        }
        assert!(StreamEvent::parse(br#"{"type":"clients","revision":1}"#).is_err());
        assert!(
            StreamEvent::parse(br#"{"type":"change","revision":1,"clientBatches":2,"delta":{}}"#)
                .is_err()
        );
    }

    #[test]
    fn events_round_trip_as_one_json_line_and_refuse_unknown_fields() {
        let delta = PolicyDelta {
            remove_clients: vec!["kgc_c".into()],
            ..PolicyDelta::default()
        };
        let event = StreamEvent::Change {
            revision: 7,
            delta: Box::new(delta),
        };
        let line = serde_json::to_string(&event).unwrap();
        assert!(!line.contains('\n'));
        assert_eq!(
            line,
            r#"{"type":"change","revision":7,"delta":{"removeClients":["kgc_c"]}}"#
        );
        assert_eq!(StreamEvent::parse(line.as_bytes()).unwrap(), event);
        assert!(StreamEvent::parse(br#"{"type":"heartbeat","x":1}"#).is_err());
        let unknown = r#"{"type":"change","revision":7,"delta":{"removedClients":["kgc_c"]}}"#;
        assert!(StreamEvent::parse(unknown.as_bytes()).is_err());
        assert!(StreamEvent::parse(br#"{"type":"change","revision":7}"#).is_err());
        // Deep inside a snapshot too: a misspelt rule field is refused, not skipped.
        let mut document: serde_json::Value = serde_json::from_str(FIXTURE).unwrap();
        let rule = document["spec"]["rules"][0].as_object_mut().unwrap();
        let require = rule.remove("requireScopes").unwrap();
        rule.insert("requiredScopes".into(), require);
        let snapshot = serde_json::json!({"type": "snapshot", "revision": 1, "document": document});
        let error = StreamEvent::parse(snapshot.to_string().as_bytes()).unwrap_err();
        assert!(
            error.contains("document.spec.rules.0.requiredScopes"),
            "{error}"
        );
        let heartbeat = serde_json::to_string(&StreamEvent::Heartbeat {}).unwrap();
        assert_eq!(
            StreamEvent::parse(heartbeat.as_bytes()).unwrap(),
            StreamEvent::Heartbeat {}
        );
    }
}
