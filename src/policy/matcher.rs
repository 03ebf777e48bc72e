//! The compiled form of a ScopePolicy's route rules, and the per-request decision.

use std::collections::{BTreeSet, HashMap};

use http::Method;

use super::methods::MethodSet;
use super::pattern::PathPattern;
use crate::api::{DefaultAction, RequireScopes, RouteRule, ScopeMatching, ScopePolicySpec};
use crate::grants::is_scope_token;

/// A problem with one rule of a ScopePolicy.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("rules[{index}] {name:?}: {message}")]
pub struct RuleError {
    /// The rule's position in `spec.rules`.
    pub index: usize,
    /// The rule's name.
    pub name: String,
    /// What is wrong, in words.
    pub message: String,
}

/// How the scopes of a [`Requirement`] combine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequirementMode {
    /// At least one of the scopes.
    AnyOf,
    /// Every one of the scopes.
    AllOf,
}

/// The scopes a rule requires, and how held scopes satisfy them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Requirement {
    mode: RequirementMode,
    scopes: Vec<String>,
    matching: ScopeMatching,
    /// `scopes` space-delimited, built once so that a 403 does not have to.
    scope_param: String,
}

impl Requirement {
    /// Whether the scopes are `anyOf` or `allOf`.
    pub fn mode(&self) -> RequirementMode {
        self.mode
    }

    /// The required scopes, in the order the rule lists them.
    pub fn scopes(&self) -> &[String] {
        &self.scopes
    }

    /// The policy's scope matching strategy.
    pub fn matching(&self) -> ScopeMatching {
        self.matching
    }

    /// Whether a credential holding `held` meets the requirement.
    pub fn is_satisfied_by(&self, held: &[impl AsRef<str>]) -> bool {
        let holds = |required: &String| {
            held.iter()
                .any(|h| self.matching.satisfies(h.as_ref(), required))
        };
        match self.mode {
            RequirementMode::AnyOf => self.scopes.iter().any(holds),
            RequirementMode::AllOf => self.scopes.iter().all(holds),
        }
    }

    /// The required scopes space-delimited, for the `scope` attribute of a
    /// `WWW-Authenticate: Bearer error="insufficient_scope"` challenge (RFC 6750 §3). Every
    /// scope is an RFC 6749 scope token, so the value needs no escaping inside quotes.
    pub fn scope_param(&self) -> &str {
        &self.scope_param
    }
}

/// What a request needs to pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access<'p> {
    /// Nothing: no credential is checked.
    Public,
    /// Any valid credential for this API.
    Authenticated,
    /// A valid credential holding the required scopes.
    Scopes(&'p Requirement),
    /// Refused whatever the credential (no rule matched and `defaultAction` is `Deny`).
    Deny,
}

/// The rule that decided a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RuleRef<'p> {
    /// The rule's position in `spec.rules`.
    pub index: usize,
    /// The rule's name, for logs and metric labels.
    pub name: &'p str,
}

/// The outcome of matching a request against the rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision<'p> {
    /// The first rule that matched, or `None` when the default action applied.
    pub rule: Option<RuleRef<'p>>,
    /// What the request needs.
    pub access: Access<'p>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum RuleAccess {
    Public,
    Authenticated,
    Scopes(Requirement),
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct CompiledRule {
    index: usize,
    name: String,
    methods: MethodSet,
    patterns: Vec<PathPattern>,
    access: RuleAccess,
}

impl CompiledRule {
    fn matches(&self, method: &Method, path: &str) -> bool {
        self.methods.contains(method) && self.patterns.iter().any(|p| p.matches(path))
    }
}

/// A ScopePolicy's rules, ready to decide requests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompiledPolicy {
    rules: Vec<CompiledRule>,
    default_action: DefaultAction,
}

impl CompiledPolicy {
    /// Compiles `spec.rules`, reporting every problem rather than the first.
    ///
    /// Besides malformed rules (which the CRD schema should already have refused, but the
    /// spec may come from a file or an older schema), it reports:
    /// - a rule that can never match because earlier rules, each with the same or more
    ///   methods, together match every path pattern of it (exact for path patterns, but it
    ///   does not combine several earlier rules' methods, so it only reports what it is sure
    ///   of);
    /// - a required scope missing from the policy's `scopes` when that list is non-empty.
    ///   The check is exact string membership under every matching strategy: a rule should
    ///   require scopes the API defines, not patterns of them.
    pub fn compile(spec: &ScopePolicySpec) -> Result<Self, Vec<RuleError>> {
        let defined: BTreeSet<&str> = spec.scopes.iter().map(|s| s.name.as_str()).collect();
        let mut first_index_of_name: HashMap<&str, usize> = HashMap::new();
        let mut rules: Vec<CompiledRule> = Vec::with_capacity(spec.rules.len());
        let mut errors = Vec::new();

        for (index, rule) in spec.rules.iter().enumerate() {
            let mut report = |message: String| {
                errors.push(RuleError {
                    index,
                    name: rule.name.clone(),
                    message,
                })
            };
            match first_index_of_name.get(rule.name.as_str()) {
                Some(first) => report(format!("the name is already used by rules[{first}]")),
                None => {
                    first_index_of_name.insert(&rule.name, index);
                }
            }
            match compile_rule(index, rule, &defined, spec.scope_matching) {
                Ok(compiled) => {
                    if let Some(message) = unreachable_message(&compiled, &rules) {
                        report(message);
                    }
                    rules.push(compiled);
                }
                Err(messages) => messages.into_iter().for_each(report),
            }
        }

        if errors.is_empty() {
            Ok(Self {
                rules,
                default_action: spec.default_action,
            })
        } else {
            Err(errors)
        }
    }

    /// Decides what a request needs: the first rule whose methods contain `method` and one of
    /// whose patterns matches `normalized_path` (the output of [`super::path::normalize`]),
    /// otherwise the default action. Does not allocate.
    pub fn decide(&self, method: &Method, normalized_path: &str) -> Decision<'_> {
        match self
            .rules
            .iter()
            .find(|rule| rule.matches(method, normalized_path))
        {
            Some(rule) => Decision {
                rule: Some(RuleRef {
                    index: rule.index,
                    name: &rule.name,
                }),
                access: match &rule.access {
                    RuleAccess::Public => Access::Public,
                    RuleAccess::Authenticated => Access::Authenticated,
                    RuleAccess::Scopes(requirement) => Access::Scopes(requirement),
                },
            },
            None => Decision {
                rule: None,
                access: match self.default_action {
                    DefaultAction::Deny => Access::Deny,
                    DefaultAction::Authenticated => Access::Authenticated,
                },
            },
        }
    }

    /// The number of rules.
    pub fn len(&self) -> usize {
        self.rules.len()
    }

    /// Whether there are no rules, so the default action decides every request.
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }
}

fn compile_rule(
    index: usize,
    rule: &RouteRule,
    defined: &BTreeSet<&str>,
    matching: ScopeMatching,
) -> Result<CompiledRule, Vec<String>> {
    let mut messages = Vec::new();

    let methods = MethodSet::parse(&rule.methods).unwrap_or_else(|e| {
        messages.push(e.to_string());
        MethodSet::ANY
    });

    if rule.paths.is_empty() {
        messages.push("a rule needs at least one path".to_owned());
    }
    let mut patterns = Vec::with_capacity(rule.paths.len());
    for path in &rule.paths {
        match PathPattern::parse(path) {
            Ok(pattern) => patterns.push(pattern),
            Err(e) => messages.push(format!("path {path:?}: {e}")),
        }
    }

    let access = match (rule.public, rule.authenticated, &rule.require_scopes) {
        (true, false, None) => Some(RuleAccess::Public),
        (false, true, None) => Some(RuleAccess::Authenticated),
        (false, false, Some(require)) => compile_requirement(require, defined, matching)
            .map_err(|mut e| messages.append(&mut e))
            .ok()
            .map(RuleAccess::Scopes),
        (false, false, None) => {
            messages.push(
                "the rule states no requirement; set requireScopes, or authenticated: true for any client with a grant on this API, or public: true"
                    .to_owned(),
            );
            None
        }
        _ => {
            messages.push(
                "a rule states exactly one requirement: public: true, authenticated: true or requireScopes"
                    .to_owned(),
            );
            None
        }
    };

    match access {
        Some(access) if messages.is_empty() => Ok(CompiledRule {
            index,
            name: rule.name.clone(),
            methods,
            patterns,
            access,
        }),
        _ => Err(messages),
    }
}

fn compile_requirement(
    require: &RequireScopes,
    defined: &BTreeSet<&str>,
    matching: ScopeMatching,
) -> Result<Requirement, Vec<String>> {
    let (mode, field, scopes) = match (&require.any_of, &require.all_of) {
        (Some(scopes), None) => (RequirementMode::AnyOf, "anyOf", scopes),
        (None, Some(scopes)) => (RequirementMode::AllOf, "allOf", scopes),
        _ => {
            return Err(vec![
                "set exactly one of requireScopes.anyOf and requireScopes.allOf".to_owned(),
            ]);
        }
    };
    let mut messages = Vec::new();
    if scopes.is_empty() {
        messages.push(format!("requireScopes.{field} must not be empty"));
    }
    for scope in scopes {
        if !is_scope_token(scope) {
            messages.push(format!(
                "requireScopes.{field}: {scope:?} is not a scope token (printable ASCII without space, \" or \\)"
            ));
        } else if !defined.is_empty() && !defined.contains(scope.as_str()) {
            messages.push(format!(
                "requireScopes.{field}: scope {scope:?} is not defined in this policy's scopes"
            ));
        }
    }
    if !messages.is_empty() {
        return Err(messages);
    }
    Ok(Requirement {
        mode,
        scopes: scopes.clone(),
        matching,
        scope_param: scopes.join(" "),
    })
}

/// Says why `rule` can never match, if every request it matches is matched by one of
/// `earlier`: each of its patterns is covered by a pattern of an earlier rule whose methods
/// include all of its methods.
fn unreachable_message(rule: &CompiledRule, earlier: &[CompiledRule]) -> Option<String> {
    let mut shadowing: BTreeSet<usize> = BTreeSet::new();
    for pattern in &rule.patterns {
        let shadow = earlier.iter().find(|e| {
            e.methods.covers(rule.methods) && e.patterns.iter().any(|p| p.covers(pattern))
        })?;
        shadowing.insert(shadow.index);
    }
    let names: Vec<String> = earlier
        .iter()
        .filter(|e| shadowing.contains(&e.index))
        .map(|e| format!("rules[{}] {:?}", e.index, e.name))
        .collect();
    let verb = if names.len() == 1 { "matches" } else { "match" };
    Some(format!(
        "can never match: {} already {verb} every request it would",
        names.join(", ")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::ScopeDefinition;

    fn mk_rule(name: &str, methods: &[&str], paths: &[&str]) -> RouteRule {
        RouteRule {
            name: name.to_owned(),
            methods: methods.iter().map(|m| (*m).to_owned()).collect(),
            paths: paths.iter().map(|p| (*p).to_owned()).collect(),
            public: false,
            authenticated: true,
            require_scopes: None,
        }
    }

    fn mk_public(name: &str, methods: &[&str], paths: &[&str]) -> RouteRule {
        RouteRule {
            public: true,
            authenticated: false,
            ..mk_rule(name, methods, paths)
        }
    }

    fn strings(scopes: &[&str]) -> Vec<String> {
        scopes.iter().map(|s| (*s).to_owned()).collect()
    }

    fn mk_any_of(name: &str, methods: &[&str], paths: &[&str], scopes: &[&str]) -> RouteRule {
        RouteRule {
            require_scopes: Some(RequireScopes {
                any_of: Some(strings(scopes)),
                all_of: None,
            }),
            authenticated: false,
            ..mk_rule(name, methods, paths)
        }
    }

    fn mk_all_of(name: &str, methods: &[&str], paths: &[&str], scopes: &[&str]) -> RouteRule {
        RouteRule {
            require_scopes: Some(RequireScopes {
                any_of: None,
                all_of: Some(strings(scopes)),
            }),
            authenticated: false,
            ..mk_rule(name, methods, paths)
        }
    }

    fn mk_spec(rules: Vec<RouteRule>) -> ScopePolicySpec {
        ScopePolicySpec {
            resource: "https://orders.shop.svc".to_owned(),
            rules,
            ..ScopePolicySpec::default()
        }
    }

    fn compile(spec: &ScopePolicySpec) -> CompiledPolicy {
        match CompiledPolicy::compile(spec) {
            Ok(policy) => policy,
            Err(errors) => panic!("{errors:#?}"),
        }
    }

    fn compile_errors(spec: &ScopePolicySpec) -> Vec<String> {
        match CompiledPolicy::compile(spec) {
            Ok(_) => panic!("expected errors"),
            Err(errors) => errors.iter().map(ToString::to_string).collect(),
        }
    }

    fn requirement(decision: Decision<'_>) -> &Requirement {
        match decision.access {
            Access::Scopes(requirement) => requirement,
            other => panic!("expected scopes, got {other:?}"),
        }
    }

    fn rule_name<'p>(decision: &Decision<'p>) -> Option<&'p str> {
        decision.rule.map(|r| r.name)
    }

    #[test]
    fn first_matching_rule_wins() {
        let policy = compile(&mk_spec(vec![
            mk_public("health", &["GET"], &["/healthz"]),
            mk_any_of("read", &["GET", "HEAD"], &["/orders/**"], &["orders.read"]),
            mk_any_of(
                "write",
                &["POST"],
                &["/orders", "/orders/*"],
                &["orders.write"],
            ),
            mk_rule("rest", &[], &["/**"]),
        ]));
        let decide = |method: Method, path: &str| policy.decide(&method, path);

        let health = decide(Method::GET, "/healthz");
        assert_eq!(health.access, Access::Public);
        assert_eq!(
            health.rule,
            Some(RuleRef {
                index: 0,
                name: "health"
            })
        );

        assert_eq!(
            rule_name(&decide(Method::GET, "/orders/1/items")),
            Some("read")
        );
        assert_eq!(rule_name(&decide(Method::HEAD, "/orders")), Some("read"));
        assert_eq!(rule_name(&decide(Method::POST, "/orders/")), Some("write"));
        assert_eq!(rule_name(&decide(Method::POST, "/orders/1")), Some("write"));
        let rest = decide(Method::POST, "/orders/1/items");
        assert_eq!(
            rest.rule,
            Some(RuleRef {
                index: 3,
                name: "rest"
            })
        );
        assert_eq!(rest.access, Access::Authenticated);
        assert_eq!(rule_name(&decide(Method::POST, "/healthz")), Some("rest"));
    }

    #[test]
    fn matching_is_case_sensitive() {
        let policy = compile(&mk_spec(vec![mk_public("health", &[], &["/healthz"])]));
        assert_eq!(policy.decide(&Method::GET, "/HEALTHZ").access, Access::Deny);
    }

    #[test]
    fn encoding_a_literal_s_sub_delims_does_not_bypass_it() {
        let policy = compile(&mk_spec(vec![
            mk_any_of(
                "search",
                &["POST"],
                &["/v1/orders:search"],
                &["orders.admin"],
            ),
            mk_any_of("me", &[], &["/users/a@b.com/**"], &["users.admin"]),
            mk_public("rest", &[], &["/**"]),
        ]));
        for path in [
            "/v1/orders:search",
            "/v1/orders%3Asearch",
            "/v1/orders%3asearch/",
        ] {
            let normalized = crate::policy::normalize(path).unwrap();
            let decision = policy.decide(&Method::POST, &normalized);
            assert_eq!(rule_name(&decision), Some("search"), "{path:?}");
            assert_eq!(requirement(decision).scopes(), ["orders.admin"]);
        }
        for path in ["/users/a%40b.com", "/users/a%40b.com/keys"] {
            let normalized = crate::policy::normalize(path).unwrap();
            let decision = policy.decide(&Method::GET, &normalized);
            assert_eq!(rule_name(&decision), Some("me"), "{path:?}");
        }
        // Other escapes still fall through.
        assert_eq!(
            rule_name(&policy.decide(&Method::POST, "/v1/orders%3Bsearch")),
            Some("rest")
        );
    }

    #[test]
    fn default_action_applies_when_no_rule_matches() {
        let mut spec = mk_spec(vec![mk_public("health", &["GET"], &["/healthz"])]);
        let deny_policy = compile(&spec);
        assert_eq!(
            deny_policy.decide(&Method::GET, "/other"),
            Decision {
                rule: None,
                access: Access::Deny
            }
        );

        spec.default_action = DefaultAction::Authenticated;
        let authenticated_policy = compile(&spec);
        assert_eq!(
            authenticated_policy.decide(&Method::GET, "/other"),
            Decision {
                rule: None,
                access: Access::Authenticated
            }
        );
    }

    #[test]
    fn a_policy_without_rules_uses_the_default_action() {
        let policy = compile(&mk_spec(Vec::new()));
        assert!(policy.is_empty());
        assert_eq!(policy.decide(&Method::GET, "/").access, Access::Deny);
    }

    #[test]
    fn extension_methods_match_only_rules_without_methods() {
        let policy = compile(&mk_spec(vec![
            mk_public("get", &["GET"], &["/**"]),
            mk_rule("any", &[], &["/dav/**"]),
        ]));
        let propfind = Method::from_bytes(b"PROPFIND").unwrap();
        assert_eq!(rule_name(&policy.decide(&propfind, "/dav/x")), Some("any"));
        assert_eq!(policy.decide(&propfind, "/x").access, Access::Deny);
    }

    #[test]
    fn any_of_needs_one_scope_and_all_of_needs_every_scope() {
        let policy = compile(&mk_spec(vec![
            mk_any_of("any", &[], &["/any"], &["orders.read", "orders.admin"]),
            mk_all_of("all", &[], &["/all"], &["orders.read", "orders.write"]),
        ]));
        let any = requirement(policy.decide(&Method::GET, "/any"));
        assert_eq!(any.mode(), RequirementMode::AnyOf);
        assert!(any.is_satisfied_by(&["orders.admin"]));
        assert!(any.is_satisfied_by(&["x", "orders.read"]));
        assert!(!any.is_satisfied_by(&["orders.write"]));
        assert!(!any.is_satisfied_by(&[] as &[&str]));

        let all = requirement(policy.decide(&Method::GET, "/all"));
        assert_eq!(all.mode(), RequirementMode::AllOf);
        assert!(all.is_satisfied_by(&["orders.write", "orders.read"]));
        assert!(all.is_satisfied_by(&strings(&["orders.read", "orders.write"])));
        assert!(!all.is_satisfied_by(&["orders.read"]));
    }

    #[test]
    fn requirements_use_the_policy_s_scope_matching() {
        let rules = vec![
            mk_any_of("any", &[], &["/any"], &["orders.read", "billing:read"]),
            mk_all_of("all", &[], &["/all"], &["orders.read", "orders.write"]),
        ];
        let cases: [(ScopeMatching, &[&str], bool, bool); 6] = [
            (ScopeMatching::Exact, &["orders"], false, false),
            (
                ScopeMatching::Exact,
                &["orders.read", "orders.write"],
                true,
                true,
            ),
            (ScopeMatching::Hierarchic, &["orders"], true, true),
            (ScopeMatching::Hierarchic, &["billing"], true, false),
            (ScopeMatching::Wildcard, &["orders.*"], true, true),
            (
                ScopeMatching::Wildcard,
                &["billing.*", "orders:*"],
                false,
                false,
            ),
        ];
        for (matching, held, any_ok, all_ok) in cases {
            let spec = ScopePolicySpec {
                scope_matching: matching,
                ..mk_spec(rules.clone())
            };
            let policy = compile(&spec);
            let any = requirement(policy.decide(&Method::GET, "/any"));
            let all = requirement(policy.decide(&Method::GET, "/all"));
            assert_eq!(any.matching(), matching);
            assert_eq!(
                any.is_satisfied_by(held),
                any_ok,
                "{matching:?} anyOf {held:?}"
            );
            assert_eq!(
                all.is_satisfied_by(held),
                all_ok,
                "{matching:?} allOf {held:?}"
            );
        }
    }

    #[test]
    fn scope_param_is_space_delimited() {
        let policy = compile(&mk_spec(vec![mk_all_of(
            "all",
            &[],
            &["/**"],
            &["orders.read", "orders.write"],
        )]));
        let required = requirement(policy.decide(&Method::GET, "/"));
        assert_eq!(required.scope_param(), "orders.read orders.write");
        assert_eq!(required.scopes(), ["orders.read", "orders.write"]);
    }

    #[test]
    fn pattern_errors_name_rule_and_pattern() {
        let errors = compile_errors(&mk_spec(vec![
            mk_public("ok", &[], &["/ok"]),
            mk_public("bad", &[], &["/fine", "/a/**/b", "ord*"]),
        ]));
        assert_eq!(
            errors,
            [
                r#"rules[1] "bad": path "/a/**/b": ** may only be the last segment"#,
                r#"rules[1] "bad": path "ord*": a path pattern must start with /"#,
            ]
        );
    }

    #[test]
    fn malformed_rules_are_refused_even_if_the_schema_let_them_through() {
        let both = RequireScopes {
            any_of: Some(strings(&["a"])),
            all_of: Some(strings(&["b"])),
        };
        let errors = compile_errors(&mk_spec(vec![
            mk_rule("lower", &["get"], &["/a"]),
            mk_rule("unknown", &["PROPFIND"], &["/b"]),
            mk_rule("twice", &["GET", "GET"], &["/c"]),
            mk_rule("no-paths", &[], &[]),
            RouteRule {
                require_scopes: Some(RequireScopes::default()),
                ..mk_public("public-scoped", &[], &["/d"])
            },
            RouteRule {
                require_scopes: Some(both),
                authenticated: false,
                ..mk_rule("both", &[], &["/e"])
            },
            mk_any_of("empty", &[], &["/f"], &[]),
            mk_all_of("quote", &[], &["/g"], &["a\"b"]),
            mk_rule("lower", &[], &["/h"]),
            RouteRule {
                authenticated: false,
                ..mk_rule("nothing", &[], &["/i"])
            },
            RouteRule {
                public: true,
                ..mk_rule("public-and-authenticated", &[], &["/j"])
            },
        ]));
        let expected = [
            r#"rules[0] "lower": method "get" is not one of"#,
            r#"rules[1] "unknown": method "PROPFIND" is not one of"#,
            r#"rules[2] "twice": method "GET" is listed twice"#,
            r#"rules[3] "no-paths": a rule needs at least one path"#,
            r#"rules[4] "public-scoped": a rule states exactly one requirement: public: true, authenticated: true or requireScopes"#,
            r#"rules[5] "both": set exactly one of requireScopes.anyOf and requireScopes.allOf"#,
            r#"rules[6] "empty": requireScopes.anyOf must not be empty"#,
            r#"rules[7] "quote": requireScopes.allOf: "a\"b" is not a scope token"#,
            r#"rules[8] "lower": the name is already used by rules[0]"#,
            r#"rules[9] "nothing": the rule states no requirement; set requireScopes, or authenticated: true"#,
            r#"rules[10] "public-and-authenticated": a rule states exactly one requirement"#,
        ];
        assert_eq!(errors.len(), expected.len(), "{errors:#?}");
        for (error, expected) in errors.iter().zip(expected) {
            assert!(
                error.starts_with(expected),
                "{error:?} should start with {expected:?}"
            );
        }
    }

    #[test]
    fn undefined_required_scopes_are_reported() {
        let mut spec = mk_spec(vec![
            mk_any_of("read", &[], &["/r"], &["orders.read"]),
            mk_all_of(
                "write",
                &[],
                &["/w"],
                &["orders.read", "orders.write", "orders.*"],
            ),
        ]);
        spec.scope_matching = ScopeMatching::Wildcard;
        // Without a `scopes` list nothing is checked.
        compile(&spec);

        spec.scopes = ["orders.read", "orders"]
            .into_iter()
            .map(|name| ScopeDefinition {
                name: name.to_owned(),
                description: None,
            })
            .collect();
        assert_eq!(
            compile_errors(&spec),
            [
                r#"rules[1] "write": requireScopes.allOf: scope "orders.write" is not defined in this policy's scopes"#,
                r#"rules[1] "write": requireScopes.allOf: scope "orders.*" is not defined in this policy's scopes"#,
            ]
        );
    }

    #[test]
    fn shadowed_rules_are_reported() {
        let errors = compile_errors(&mk_spec(vec![
            mk_public("reads", &["GET", "HEAD"], &["/orders/**"]),
            mk_rule("items", &["POST"], &["/items/*"]),
            mk_any_of("one-order", &["GET"], &["/orders/*"], &["orders.read"]),
            mk_rule("two-rules", &["POST"], &["/items/new", "/orders/x"]),
            mk_rule("everything", &[], &["/**"]),
            mk_rule("after-everything", &["DELETE"], &["/"]),
        ]));
        assert_eq!(
            errors,
            [
                r#"rules[2] "one-order": can never match: rules[0] "reads" already matches every request it would"#,
                r#"rules[5] "after-everything": can never match: rules[4] "everything" already matches every request it would"#,
            ]
        );
    }

    #[test]
    fn shadowing_may_combine_earlier_rules() {
        let errors = compile_errors(&mk_spec(vec![
            mk_rule("a", &[], &["/a/**"]),
            mk_rule("b", &["GET", "POST"], &["/b/*"]),
            mk_rule("both", &["GET"], &["/a/x", "/b/y"]),
        ]));
        assert_eq!(
            errors,
            [
                r#"rules[2] "both": can never match: rules[0] "a", rules[1] "b" already match every request it would"#,
            ]
        );
    }

    #[test]
    fn partly_shadowed_rules_are_fine() {
        compile(&mk_spec(vec![
            mk_public("get-orders", &["GET"], &["/orders/**"]),
            // POST is not covered.
            mk_rule("orders", &["GET", "POST"], &["/orders/*"]),
            // Extension methods are not covered by a method list.
            mk_rule("all-methods", &[], &["/orders/**"]),
            // `/orders/*` does not cover `/orders/**`.
            mk_rule("narrow-first", &["PUT"], &["/items/*"]),
            mk_rule("wide-later", &["PUT"], &["/items/**"]),
        ]));
    }
}
