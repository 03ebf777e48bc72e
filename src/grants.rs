//! Which scopes a client may get, and which scopes a token request is granted.
//!
//! The token endpoint follows Apigee's rules: a client's allowed scopes on a resource are the
//! union of its roles' permissions there (already cut down by the trust model elsewhere); a
//! request without `scope` gets all of them, a request with `scope` gets the requested scopes
//! that some allowed scope satisfies under the resource's [`ScopeMatching`], and an empty
//! result is `invalid_scope`. Everything here is pure: no I/O, no clock, no registry.

use std::collections::{BTreeMap, BTreeSet};

use crate::api::{Permission, ScopeMatching};

/// Allowed scopes per API resource indicator, both sorted.
pub type AllowedScopes = BTreeMap<String, BTreeSet<String>>;

impl ScopeMatching {
    /// Whether a client holding scope `held` satisfies a requirement for scope `required`.
    ///
    /// - `Exact`: the strings are equal.
    /// - `Hierarchic`: equal, or `required` continues `held` after a `.` or `:` separator, so
    ///   `orders` satisfies `orders.read`, `orders:read` and `orders.read.own`, while `order`
    ///   does not satisfy `orders.read`.
    /// - `Wildcard`: both scopes are split into levels at `.` and `:`; they must have the same
    ///   number of levels and the same separator at each position (`orders.*` satisfies
    ///   `orders.read` but neither `orders:read`, `orders` nor `orders.read.own`), and each
    ///   level of `held` is either `*`, standing for exactly one non-empty level, or equal to
    ///   the level of `required`. A `*` inside a level (`ord*`) is an ordinary character.
    ///
    /// Separators must line up under `Wildcard` because `.` and `:` are chosen deliberately
    /// by API owners (`orders:read` and `orders.read` may be unrelated scopes); letting a
    /// wildcard cross from one to the other would grant more than the holder was given.
    pub fn satisfies(self, held: &str, required: &str) -> bool {
        match self {
            Self::Exact => held == required,
            Self::Hierarchic => hierarchic_satisfies(held, required),
            Self::Wildcard => wildcard_satisfies(held, required),
        }
    }
}

fn is_level_separator(c: char) -> bool {
    c == '.' || c == ':'
}

fn hierarchic_satisfies(held: &str, required: &str) -> bool {
    match required.strip_prefix(held) {
        Some("") => true,
        Some(rest) => rest.starts_with(is_level_separator),
        None => false,
    }
}

fn wildcard_satisfies(held: &str, required: &str) -> bool {
    // The common case of a held scope without any wildcard is a plain comparison.
    if !held.contains('*') {
        return held == required;
    }
    // `split_inclusive` keeps each level's trailing separator, so comparing pieces compares
    // separators too; only the level text needs the `*` treatment.
    let mut held_levels = held.split_inclusive(is_level_separator);
    let mut required_levels = required.split_inclusive(is_level_separator);
    loop {
        match (held_levels.next(), required_levels.next()) {
            (None, None) => return true,
            (Some(h), Some(r)) => {
                let (h_level, h_sep) = split_separator(h);
                let (r_level, r_sep) = split_separator(r);
                let level_ok = if h_level == "*" {
                    !r_level.is_empty()
                } else {
                    h_level == r_level
                };
                if !level_ok || h_sep != r_sep {
                    return false;
                }
            }
            _ => return false,
        }
    }
}

/// Splits one `split_inclusive` piece into its level text and its trailing separator.
fn split_separator(piece: &str) -> (&str, Option<char>) {
    match piece.chars().next_back() {
        Some(c) if is_level_separator(c) => (&piece[..piece.len() - c.len_utf8()], Some(c)),
        _ => (piece, None),
    }
}

/// Whether `token` is a scope token as RFC 6749 §3.3 defines it: one or more NQCHAR
/// (`%x21 / %x23-5B / %x5D-7E`), i.e. printable ASCII without space, `"` and `\`.
///
/// Such tokens are also safe to quote in a `WWW-Authenticate` header or an
/// `error_description`.
pub fn is_scope_token(token: &str) -> bool {
    !token.is_empty()
        && token
            .bytes()
            .all(|b| matches!(b, 0x21 | 0x23..=0x5B | 0x5D..=0x7E))
}

/// The union of `permissions` per resource: the scopes a client may get through all of its
/// roles. Permissions without scopes add no entry, so every resource in the result has at
/// least one scope.
pub fn allowed_scopes<'a>(permissions: impl IntoIterator<Item = &'a Permission>) -> AllowedScopes {
    let mut allowed = AllowedScopes::new();
    for permission in permissions {
        if permission.scopes.is_empty() {
            continue;
        }
        allowed
            .entry(permission.resource.clone())
            .or_default()
            .extend(permission.scopes.iter().cloned());
    }
    allowed
}

/// What a token request is granted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Granted {
    /// The resource indicator, the `aud` of the token.
    pub resource: String,
    /// The granted scopes, sorted and without duplicates; never empty.
    pub scopes: Vec<String>,
}

impl Granted {
    /// The scopes space-delimited, as the `scope` claim and response field carry them.
    pub fn scope_string(&self) -> String {
        self.scopes.join(" ")
    }
}

/// Why a token request is refused. The messages never echo the request's resource and never
/// say whether a resource exists, so they are safe to return as `error_description`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GrantError {
    /// The resource is missing, unknown, or not one this client may get tokens for
    /// (RFC 8707 `invalid_target`).
    #[error("{0}")]
    InvalidTarget(String),
    /// The scope parameter is malformed or nothing requested is allowed
    /// (RFC 6749 `invalid_scope`).
    #[error("{0}")]
    InvalidScope(String),
}

impl GrantError {
    /// The OAuth 2.0 `error` code for the token response.
    pub fn error_code(&self) -> &'static str {
        match self {
            Self::InvalidTarget(_) => "invalid_target",
            Self::InvalidScope(_) => "invalid_scope",
        }
    }
}

/// Decides the resource and scopes of a client credentials token request.
///
/// - `allowed`: the client's allowed scopes per resource, already limited to what each
///   resource's ScopePolicy defines and to the namespaces it lets in.
/// - `resource`: the request's `resource` parameter. When it is absent and the client may get
///   tokens for exactly one resource, that one is used; when it may get tokens for several,
///   the request is `invalid_target`, as it is when the client may get tokens for none (a
///   missing resource that cannot be inferred is what RFC 8707 calls an invalid target).
/// - `scope`: the request's `scope` parameter, space-delimited. Runs of spaces are tolerated;
///   a parameter with no tokens counts as absent and grants every allowed scope. A character
///   outside RFC 6749's NQCHAR makes the request `invalid_scope`.
/// - `matching_of`: the [`ScopeMatching`] of a resource's ScopePolicy, or `None` when no
///   ScopePolicy declares the resource; such a resource is `invalid_target` even if a role
///   names it.
///
/// A resource that is declared but on which the client has no scopes gets the same
/// `invalid_target` as an undeclared one, so a client cannot probe which APIs exist.
pub fn grant(
    allowed: &AllowedScopes,
    resource: Option<&str>,
    scope: Option<&str>,
    matching_of: impl Fn(&str) -> Option<ScopeMatching>,
) -> Result<Granted, GrantError> {
    let requested = parse_scope_param(scope.unwrap_or(""))?;

    let (resource, allowed_here) = match resource {
        Some(resource) => {
            let scopes = allowed
                .get_key_value(resource)
                .filter(|(_, scopes)| !scopes.is_empty());
            scopes.ok_or_else(|| {
                GrantError::InvalidTarget(
                    "this client may not get tokens for the requested resource".to_owned(),
                )
            })?
        }
        None => infer_resource(allowed)?,
    };
    let matching = matching_of(resource).ok_or_else(|| {
        GrantError::InvalidTarget(
            "this client may not get tokens for the requested resource".to_owned(),
        )
    })?;

    let scopes: Vec<String> = if requested.is_empty() {
        allowed_here.iter().cloned().collect()
    } else {
        requested
            .into_iter()
            .filter(|wanted| {
                allowed_here
                    .iter()
                    .any(|held| matching.satisfies(held, wanted))
            })
            .map(str::to_owned)
            .collect()
    };
    if scopes.is_empty() {
        return Err(GrantError::InvalidScope(
            "none of the requested scopes is allowed for this client on the resource".to_owned(),
        ));
    }
    Ok(Granted {
        resource: resource.clone(),
        scopes,
    })
}

/// The distinct scope tokens of a `scope` parameter, sorted.
fn parse_scope_param(scope: &str) -> Result<BTreeSet<&str>, GrantError> {
    let mut tokens = BTreeSet::new();
    for token in scope.split(' ').filter(|t| !t.is_empty()) {
        if !is_scope_token(token) {
            return Err(GrantError::InvalidScope(
                "scope must be space-separated tokens of printable ASCII characters other than \" and \\"
                    .to_owned(),
            ));
        }
        tokens.insert(token);
    }
    Ok(tokens)
}

/// The only resource the client may get tokens for, used when the request names none.
fn infer_resource(allowed: &AllowedScopes) -> Result<(&String, &BTreeSet<String>), GrantError> {
    let mut candidates = allowed.iter().filter(|(_, scopes)| !scopes.is_empty());
    match (candidates.next(), candidates.next()) {
        (Some(only), None) => Ok(only),
        (Some(_), Some(_)) => Err(GrantError::InvalidTarget(
            "resource is required: this client may get tokens for several resources".to_owned(),
        )),
        (None, _) => Err(GrantError::InvalidTarget(
            "resource is required: this client may not get tokens for any resource".to_owned(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ORDERS: &str = "https://orders.shop.svc";
    const BILLING: &str = "https://billing.shop.svc";
    const UNDECLARED: &str = "https://undeclared.shop.svc";

    fn mk_permission(resource: &str, scopes: &[&str]) -> Permission {
        Permission {
            resource: resource.to_owned(),
            scopes: scopes.iter().map(|s| (*s).to_owned()).collect(),
        }
    }

    fn mk_allowed(permissions: &[(&str, &[&str])]) -> AllowedScopes {
        let permissions: Vec<Permission> = permissions
            .iter()
            .map(|(resource, scopes)| mk_permission(resource, scopes))
            .collect();
        allowed_scopes(&permissions)
    }

    /// ORDERS and BILLING are declared with the given matching; UNDECLARED is not.
    fn mk_matching(matching: ScopeMatching) -> impl Fn(&str) -> Option<ScopeMatching> {
        move |resource| (resource == ORDERS || resource == BILLING).then_some(matching)
    }

    fn granted(resource: &str, scopes: &[&str]) -> Result<Granted, GrantError> {
        Ok(Granted {
            resource: resource.to_owned(),
            scopes: scopes.iter().map(|s| (*s).to_owned()).collect(),
        })
    }

    fn error_code(result: Result<Granted, GrantError>) -> &'static str {
        match result {
            Ok(granted) => panic!("expected an error, got {granted:?}"),
            Err(e) => e.error_code(),
        }
    }

    #[test]
    fn exact_matching_needs_equal_strings() {
        let m = ScopeMatching::Exact;
        assert!(m.satisfies("orders.read", "orders.read"));
        assert!(!m.satisfies("orders", "orders.read"));
        assert!(!m.satisfies("orders.*", "orders.read"));
        assert!(!m.satisfies("Orders.read", "orders.read"));
    }

    #[test]
    fn hierarchic_matching_covers_lower_levels_after_a_separator() {
        let m = ScopeMatching::Hierarchic;
        assert!(m.satisfies("orders", "orders"));
        assert!(m.satisfies("orders", "orders.read"));
        assert!(m.satisfies("orders", "orders:read"));
        assert!(m.satisfies("orders", "orders.read.own"));
        assert!(m.satisfies("orders.read", "orders.read.own"));
        assert!(!m.satisfies("order", "orders.read"));
        assert!(!m.satisfies("orders.read", "orders"));
        assert!(!m.satisfies("orders.read", "orders.write"));
        assert!(!m.satisfies("orders", "ordersread"));
        assert!(!m.satisfies("orders", "billing.orders"));
    }

    #[test]
    fn wildcard_matching_stands_for_exactly_one_level() {
        let m = ScopeMatching::Wildcard;
        assert!(m.satisfies("orders.*", "orders.read"));
        assert!(m.satisfies("orders:*", "orders:read"));
        assert!(m.satisfies("*.read", "orders.read"));
        assert!(m.satisfies("orders.*.own", "orders.read.own"));
        assert!(m.satisfies("*", "orders"));
        assert!(m.satisfies("orders.read", "orders.read"));
        assert!(!m.satisfies("orders.*", "orders"));
        assert!(!m.satisfies("orders.*", "orders.read.own"));
        assert!(!m.satisfies("orders.*", "billing.read"));
        assert!(!m.satisfies("*", "orders.read"));
        assert!(!m.satisfies("orders.*", "orders."));
    }

    #[test]
    fn wildcard_separators_must_line_up() {
        let m = ScopeMatching::Wildcard;
        assert!(!m.satisfies("orders.*", "orders:read"));
        assert!(!m.satisfies("orders:*", "orders.read"));
        assert!(!m.satisfies("*.read", "orders:read"));
    }

    #[test]
    fn wildcard_without_a_star_level_is_exact() {
        let m = ScopeMatching::Wildcard;
        assert!(!m.satisfies("orders", "orders.read"));
        assert!(!m.satisfies("ord*", "orders"));
        assert!(m.satisfies("ord*", "ord*"));
    }

    #[test]
    fn scope_tokens_are_rfc6749_nqchar() {
        assert!(is_scope_token("orders.read"));
        assert!(is_scope_token("https://x/y:z!#$%&'()*+,-~"));
        assert!(!is_scope_token(""));
        assert!(!is_scope_token("a b"));
        assert!(!is_scope_token("a\"b"));
        assert!(!is_scope_token("a\\b"));
        assert!(!is_scope_token("a\tb"));
        assert!(!is_scope_token("bestellungen.lesen.ä"));
    }

    #[test]
    fn allowed_scopes_unions_roles_per_resource() {
        let role_a = [
            mk_permission(ORDERS, &["orders.read"]),
            mk_permission(BILLING, &["invoices.read"]),
        ];
        let role_b = [
            mk_permission(ORDERS, &["orders.write", "orders.read"]),
            mk_permission(UNDECLARED, &[]),
        ];
        let allowed = allowed_scopes(role_a.iter().chain(&role_b));
        let expected: AllowedScopes = [
            (ORDERS, vec!["orders.read", "orders.write"]),
            (BILLING, vec!["invoices.read"]),
        ]
        .into_iter()
        .map(|(r, s)| (r.to_owned(), s.into_iter().map(str::to_owned).collect()))
        .collect();
        assert_eq!(allowed, expected);
    }

    #[test]
    fn no_scope_requested_grants_every_allowed_scope() {
        let allowed = mk_allowed(&[(ORDERS, &["orders.write", "orders.read"])]);
        let matching = mk_matching(ScopeMatching::Exact);
        assert_eq!(
            grant(&allowed, Some(ORDERS), None, &matching),
            granted(ORDERS, &["orders.read", "orders.write"])
        );
        assert_eq!(
            grant(&allowed, Some(ORDERS), Some("   "), &matching),
            granted(ORDERS, &["orders.read", "orders.write"])
        );
    }

    #[test]
    fn requested_scopes_are_intersected_with_allowed() {
        let allowed = mk_allowed(&[(ORDERS, &["orders.read", "orders.write"])]);
        let result = grant(
            &allowed,
            Some(ORDERS),
            Some("orders.read admin orders.read"),
            mk_matching(ScopeMatching::Exact),
        );
        assert_eq!(result, granted(ORDERS, &["orders.read"]));
    }

    #[test]
    fn requested_scopes_are_deduplicated_sorted_and_tolerate_extra_spaces() {
        let allowed = mk_allowed(&[(ORDERS, &["orders.read", "orders.write"])]);
        let result = grant(
            &allowed,
            Some(ORDERS),
            Some("  orders.write  orders.read orders.write "),
            mk_matching(ScopeMatching::Exact),
        );
        assert_eq!(result, granted(ORDERS, &["orders.read", "orders.write"]));
    }

    #[test]
    fn empty_intersection_is_invalid_scope() {
        let allowed = mk_allowed(&[(ORDERS, &["orders.read"])]);
        let result = grant(
            &allowed,
            Some(ORDERS),
            Some("orders.write admin"),
            mk_matching(ScopeMatching::Exact),
        );
        assert_eq!(error_code(result), "invalid_scope");
    }

    #[test]
    fn malformed_scope_is_invalid_scope() {
        let allowed = mk_allowed(&[(ORDERS, &["orders.read"])]);
        for scope in [
            "orders.read\torders.write",
            "orders\"read",
            "a\\b",
            "é",
            "a\nb",
        ] {
            let result = grant(
                &allowed,
                Some(ORDERS),
                Some(scope),
                mk_matching(ScopeMatching::Exact),
            );
            assert_eq!(error_code(result), "invalid_scope", "{scope:?}");
        }
    }

    #[test]
    fn hierarchic_grants_the_requested_narrower_scope() {
        let allowed = mk_allowed(&[(ORDERS, &["orders"])]);
        let result = grant(
            &allowed,
            Some(ORDERS),
            Some("orders.read orders:write billing.read"),
            mk_matching(ScopeMatching::Hierarchic),
        );
        assert_eq!(result, granted(ORDERS, &["orders.read", "orders:write"]));
    }

    #[test]
    fn wildcard_grants_the_requested_matching_scope() {
        let allowed = mk_allowed(&[(ORDERS, &["orders.*"])]);
        let result = grant(
            &allowed,
            Some(ORDERS),
            Some("orders.read orders orders.read.own"),
            mk_matching(ScopeMatching::Wildcard),
        );
        assert_eq!(result, granted(ORDERS, &["orders.read"]));
    }

    #[test]
    fn the_resource_s_matching_strategy_is_used() {
        let allowed = mk_allowed(&[(ORDERS, &["orders"])]);
        let result = grant(
            &allowed,
            Some(ORDERS),
            Some("orders.read"),
            mk_matching(ScopeMatching::Exact),
        );
        assert_eq!(error_code(result), "invalid_scope");
    }

    #[test]
    fn omitted_resource_with_one_allowed_resource_uses_it() {
        let allowed = mk_allowed(&[(ORDERS, &["orders.read"])]);
        let result = grant(&allowed, None, None, mk_matching(ScopeMatching::Exact));
        assert_eq!(result, granted(ORDERS, &["orders.read"]));
    }

    #[test]
    fn omitted_resource_with_several_allowed_resources_is_invalid_target() {
        let allowed = mk_allowed(&[(ORDERS, &["orders.read"]), (BILLING, &["invoices.read"])]);
        let result = grant(
            &allowed,
            None,
            Some("orders.read"),
            mk_matching(ScopeMatching::Exact),
        );
        assert_eq!(
            result,
            Err(GrantError::InvalidTarget(
                "resource is required: this client may get tokens for several resources".to_owned()
            ))
        );
    }

    #[test]
    fn omitted_resource_without_any_allowed_resource_is_invalid_target() {
        let allowed = mk_allowed(&[]);
        let result = grant(&allowed, None, None, mk_matching(ScopeMatching::Exact));
        assert_eq!(error_code(result), "invalid_target");
    }

    #[test]
    fn undeclared_resource_is_invalid_target_even_if_a_role_names_it() {
        let allowed = mk_allowed(&[(UNDECLARED, &["x.read"])]);
        let named = grant(
            &allowed,
            Some(UNDECLARED),
            None,
            mk_matching(ScopeMatching::Exact),
        );
        let inferred = grant(&allowed, None, None, mk_matching(ScopeMatching::Exact));
        assert_eq!(error_code(named), "invalid_target");
        assert_eq!(error_code(inferred), "invalid_target");
    }

    #[test]
    fn declared_resource_without_allowed_scopes_looks_like_an_unknown_one() {
        let allowed = mk_allowed(&[(ORDERS, &["orders.read"])]);
        let matching = mk_matching(ScopeMatching::Exact);
        let declared = grant(&allowed, Some(BILLING), None, &matching);
        let unknown = grant(&allowed, Some("https://nowhere.example"), None, &matching);
        assert_eq!(error_code(declared.clone()), "invalid_target");
        assert_eq!(declared, unknown);
    }

    #[test]
    fn several_resources_are_kept_apart() {
        let allowed = mk_allowed(&[
            (ORDERS, &["orders.read"]),
            (BILLING, &["invoices.read", "orders.write"]),
        ]);
        let result = grant(
            &allowed,
            Some(ORDERS),
            Some("orders.read orders.write invoices.read"),
            mk_matching(ScopeMatching::Exact),
        );
        assert_eq!(result, granted(ORDERS, &["orders.read"]));
    }

    #[test]
    fn granted_scope_string_is_space_delimited() {
        let granted = Granted {
            resource: ORDERS.to_owned(),
            scopes: vec!["a".to_owned(), "b".to_owned()],
        };
        assert_eq!(granted.scope_string(), "a b");
    }
}
