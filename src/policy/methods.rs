//! The HTTP methods a route rule applies to, as a bitset.

use http::Method;

/// The methods a rule may name, in bit order. Extension methods cannot be named; a rule
/// without methods applies to them too.
const KNOWN: [&str; 9] = [
    "GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "CONNECT", "TRACE",
];

/// Set when the rule names no methods: every method, extension methods included.
const ANY_BIT: u16 = 1 << 15;

/// Why a rule's method list was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MethodError {
    /// Not one of the nine upper-case standard methods.
    #[error(
        "method {0:?} is not one of GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS, CONNECT, TRACE (upper case)"
    )]
    Unknown(String),
    /// Listed twice.
    #[error("method {0:?} is listed twice")]
    Duplicate(String),
}

/// A set of HTTP methods.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MethodSet(u16);

impl MethodSet {
    /// Every method, including extension methods.
    pub const ANY: Self = Self(ANY_BIT);

    /// The set a rule's `methods` list names; an empty list is [`MethodSet::ANY`].
    ///
    /// Method names are case-sensitive (RFC 9110 §9.1), so `get` is refused rather than
    /// silently never matching.
    pub fn parse(methods: &[impl AsRef<str>]) -> Result<Self, MethodError> {
        if methods.is_empty() {
            return Ok(Self::ANY);
        }
        let mut bits = 0;
        for method in methods {
            let method = method.as_ref();
            let bit = bit_of(method).ok_or_else(|| MethodError::Unknown(method.to_owned()))?;
            if bits & bit != 0 {
                return Err(MethodError::Duplicate(method.to_owned()));
            }
            bits |= bit;
        }
        Ok(Self(bits))
    }

    /// Whether `method` is in the set.
    pub fn contains(self, method: &Method) -> bool {
        self.0 & ANY_BIT != 0 || bit_of(method.as_str()).is_some_and(|bit| self.0 & bit != 0)
    }

    /// Whether every method in `other` is in `self`.
    pub fn covers(self, other: Self) -> bool {
        self.0 & ANY_BIT != 0 || (other.0 & ANY_BIT == 0 && other.0 & !self.0 == 0)
    }
}

fn bit_of(method: &str) -> Option<u16> {
    KNOWN
        .iter()
        .position(|known| *known == method)
        .map(|index| 1 << index)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mk_set(methods: &[&str]) -> MethodSet {
        match MethodSet::parse(methods) {
            Ok(set) => set,
            Err(e) => panic!("{methods:?}: {e}"),
        }
    }

    #[test]
    fn empty_list_is_every_method() {
        let any = mk_set(&[]);
        assert_eq!(any, MethodSet::ANY);
        for method in [
            Method::GET,
            Method::DELETE,
            Method::from_bytes(b"PROPFIND").unwrap(),
        ] {
            assert!(any.contains(&method), "{method}");
        }
    }

    #[test]
    fn listed_methods_only() {
        let set = mk_set(&["GET", "HEAD"]);
        assert!(set.contains(&Method::GET));
        assert!(set.contains(&Method::HEAD));
        assert!(!set.contains(&Method::POST));
        assert!(!set.contains(&Method::from_bytes(b"PROPFIND").unwrap()));
        assert!(!set.contains(&Method::from_bytes(b"get").unwrap()));
    }

    #[test]
    fn unknown_lower_case_and_duplicate_methods_are_refused() {
        assert_eq!(
            MethodSet::parse(&["get"]),
            Err(MethodError::Unknown("get".to_owned()))
        );
        assert_eq!(
            MethodSet::parse(&["PROPFIND"]),
            Err(MethodError::Unknown("PROPFIND".to_owned()))
        );
        assert_eq!(
            MethodSet::parse(&["GET", "POST", "GET"]),
            Err(MethodError::Duplicate("GET".to_owned()))
        );
    }

    #[test]
    fn covers() {
        let get = mk_set(&["GET"]);
        let get_post = mk_set(&["GET", "POST"]);
        assert!(MethodSet::ANY.covers(MethodSet::ANY));
        assert!(MethodSet::ANY.covers(get));
        assert!(get_post.covers(get));
        assert!(get_post.covers(get_post));
        assert!(!get.covers(get_post));
        // Extension methods are in ANY but in no listed set.
        assert!(
            !mk_set(&[
                "GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "CONNECT", "TRACE"
            ])
            .covers(MethodSet::ANY)
        );
    }
}
