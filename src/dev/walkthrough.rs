//! The copy-pasteable walkthrough `keygate dev` prints on start, derived from the loaded
//! configuration: which client to use, which route it may call and which it may not.

use std::fmt::Write;
use std::path::Path;

use super::Endpoints;
use super::config::Config;
use crate::api::{RouteRule, ScopePolicySpec};
use crate::registry::Snapshot;

/// A concrete path for a pattern: `*` becomes `42`, a final `**` is dropped.
fn demo_path(pattern: &str) -> String {
    let mut path = String::new();
    for segment in pattern.split('/').filter(|s| !s.is_empty()) {
        match segment {
            "**" => break,
            "*" => path.push_str("/42"),
            literal => {
                path.push('/');
                path.push_str(literal);
            }
        }
    }
    if path.is_empty() { "/".into() } else { path }
}

fn method_of(rule: &RouteRule) -> &str {
    rule.methods.first().map(String::as_str).unwrap_or("GET")
}

fn allows(spec: &ScopePolicySpec, rule: &RouteRule, held: &[String]) -> bool {
    match &rule.require_scopes {
        None => true,
        Some(required) => {
            let satisfied = |r: &String| held.iter().any(|h| spec.scope_matching.satisfies(h, r));
            match (&required.any_of, &required.all_of) {
                (Some(any), _) => any.iter().any(satisfied),
                (None, Some(all)) => all.iter().all(satisfied),
                (None, None) => true,
            }
        }
    }
}

/// The state directory as the walkthrough's commands name it: absolute, so that they work
/// from any directory, and quoted for the shell when it needs to be.
fn state_argument(state: &Path) -> String {
    let path = std::path::absolute(state).unwrap_or_else(|_| state.to_owned());
    let text = path.display().to_string();
    let plain = |c: char| c.is_ascii_alphanumeric() || "/._-+,:@%".contains(c);
    if text.chars().all(plain) {
        text
    } else {
        format!("'{}'", text.replace('\'', r"'\''"))
    }
}

/// The walkthrough text.
pub fn walkthrough(
    endpoints: &Endpoints,
    config: &Config,
    snapshot: &Snapshot,
    state: &Path,
    exe: &str,
) -> String {
    let mut out = String::new();
    let token_url = format!("http://{}/oauth2/token", endpoints.token_addr);
    let _ = writeln!(out, "keygate dev is running");
    let _ = writeln!(
        out,
        "  token server  {}  (JWKS {}/.well-known/jwks.json)",
        endpoints.issuer, endpoints.issuer
    );
    for (key, (addr, resource)) in &endpoints.sidecars {
        let _ = writeln!(
            out,
            "  sidecar       http://{addr}  ScopePolicy {key}, resource {resource}"
        );
    }
    let _ = writeln!(out, "  upstream      http://{}", endpoints.upstream);
    let state = state_argument(state);
    let _ = writeln!(out, "  state         {state}");

    for (key, (addr, resource)) in &endpoints.sidecars {
        let Some(policy) = config.policies.get(key) else {
            continue;
        };
        let spec = &policy.spec;
        let protected = |scopes: &[String], want: bool| {
            spec.rules
                .iter()
                .filter(|r| !r.public)
                .find(|r| allows(spec, r, scopes) == want)
        };
        let candidates: Vec<(_, Vec<String>)> = config
            .clients
            .iter()
            .filter(|(_, c)| c.spec.client_secret && !c.spec.disabled)
            .filter_map(|(client_key, _)| {
                let grants = snapshot
                    .clients_by_key
                    .get(client_key)?
                    .grants
                    .get(resource)?;
                Some((client_key, grants.iter().cloned().collect::<Vec<String>>()))
            })
            .filter(|(_, scopes)| protected(scopes, true).is_some())
            .collect();
        // Prefer a client that also shows a 403: it demonstrates the most.
        let chosen = candidates
            .iter()
            .find(|(_, scopes)| protected(scopes, false).is_some())
            .or(candidates.first());
        let Some((client_key, scopes)) = chosen else {
            continue;
        };
        let Some(ok_rule) = protected(scopes, true) else {
            continue;
        };
        let _ = writeln!(
            out,
            "\nTry it with client {client_key} (scopes: {}):",
            scopes.join(" ")
        );
        let _ = writeln!(
            out,
            "  export KEYGATE_CLIENT_ID=$({exe} dev credentials {client_key} --state {state} --field client_id)"
        );
        let _ = writeln!(
            out,
            "  export KEYGATE_CLIENT_SECRET=$({exe} dev credentials {client_key} --state {state} --field client_secret)"
        );
        let _ = writeln!(
            out,
            "  TOKEN=$({exe} token --token-url {token_url} --resource {resource})"
        );
        let _ = writeln!(
            out,
            "  # or with curl: curl -u \"$KEYGATE_CLIENT_ID:$KEYGATE_CLIENT_SECRET\" -d grant_type=client_credentials -d resource={resource} {token_url}"
        );
        let ok_path = demo_path(&ok_rule.paths[0]);
        let _ = writeln!(
            out,
            "  curl -i -X {} -H \"Authorization: Bearer $TOKEN\" http://{addr}{ok_path}   # 200: rule {}",
            method_of(ok_rule),
            ok_rule.name
        );
        let _ = writeln!(
            out,
            "  curl -i -X {} http://{addr}{ok_path}   # 401: no token",
            method_of(ok_rule)
        );
        if let Some(forbidden) = protected(scopes, false) {
            let _ = writeln!(
                out,
                "  curl -i -X {} -H \"Authorization: Bearer $TOKEN\" http://{addr}{}   # 403: rule {} needs more scope",
                method_of(forbidden),
                demo_path(&forbidden.paths[0]),
                forbidden.name
            );
        }
        if let Some(public) = spec.rules.iter().find(|r| r.public) {
            let _ = writeln!(
                out,
                "  curl -i http://{addr}{}   # 200: public rule {}",
                demo_path(&public.paths[0]),
                public.name
            );
        }
        break;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::{demo_path, state_argument};
    use std::path::Path;

    #[test]
    fn the_state_directory_is_named_absolute_and_quoted() {
        let cwd = std::env::current_dir().unwrap();
        assert_eq!(
            state_argument(Path::new(".keygate-dev")),
            cwd.join(".keygate-dev").display().to_string()
        );
        assert!(state_argument(Path::new(".keygate-dev")).starts_with('/'));
        assert_eq!(state_argument(Path::new("/tmp/dev")), "/tmp/dev");
        assert_eq!(
            state_argument(Path::new("/home/o'neil/my dev")),
            r"'/home/o'\''neil/my dev'"
        );
    }

    #[test]
    fn demo_paths() {
        assert_eq!(demo_path("/orders/**"), "/orders");
        assert_eq!(demo_path("/orders/*/items"), "/orders/42/items");
        assert_eq!(demo_path("/**"), "/");
        assert_eq!(demo_path("/healthz"), "/healthz");
    }
}
