//! Path patterns of route rules.
//!
//! A pattern is `/` followed by segments separated by `/`:
//!
//! - a literal segment matches the same text, case-sensitively;
//! - `*` matches exactly one non-empty segment;
//! - a final `**` matches any number of further segments, including none, so `/orders/**`
//!   matches `/orders`, `/orders/` and `/orders/1/items`, and `/**` matches every path;
//! - `/` alone matches only the root.
//!
//! Patterns are matched against normalised paths (see [`super::path`]); a trailing `/` in the
//! request is ignored. Literal segments may use the characters RFC 3986 allows unencoded in a
//! path segment; percent-encoding is refused in patterns.
//!
//! The normaliser decodes only unreserved characters, so `/a%3Ab` stays encoded although
//! nearly every application decodes it to `/a:b`. A literal segment therefore also matches a
//! request segment that spells any of its sub-delims, `:` or `@` as a percent-escape (hex
//! in either case): `/a:b` matches `/a%3Ab` and `/a%3ab`. Otherwise a restrictive rule for
//! `/a:b` followed by a broader one could be bypassed by encoding. Escapes of other
//! characters never match a literal (a literal holds no `%`, and unreserved escapes are
//! decoded by the normaliser before matching).

/// Why a path pattern was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PatternError {
    /// The pattern does not start with `/`.
    #[error("a path pattern must start with /")]
    NotAbsolute,
    /// `//` or a trailing `/`.
    #[error(
        "empty segment: a path pattern must not contain // or end with / (a trailing / in a request is ignored anyway)"
    )]
    EmptySegment,
    /// `**` somewhere but last.
    #[error("** may only be the last segment")]
    DoubleStarNotLast,
    /// A `.` or `..` segment, which normalised paths never contain.
    #[error(". and .. segments are not allowed")]
    DotSegment,
    /// `*` next to other text in one segment.
    #[error("* and ** must be a whole segment (e.g. /orders/*), not part of one")]
    PartialWildcard,
    /// A `%` escape.
    #[error("percent-encoding is not allowed in a path pattern")]
    PercentEncoding,
    /// Space, tab or another control character.
    #[error("whitespace and control characters are not allowed in a path pattern")]
    Whitespace,
    /// Any other character a path segment cannot hold unencoded.
    #[error("character {0:?} is not allowed in a path pattern")]
    InvalidCharacter(char),
}

/// One compiled path pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathPattern {
    segments: Vec<Segment>,
    /// The pattern ends with `**`.
    any_suffix: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Literal(Box<str>),
    /// `*`: one non-empty segment.
    Any,
}

impl PathPattern {
    /// Parses a pattern as the module doc describes.
    pub fn parse(pattern: &str) -> Result<Self, PatternError> {
        let rest = pattern.strip_prefix('/').ok_or(PatternError::NotAbsolute)?;
        if rest.is_empty() {
            return Ok(Self {
                segments: Vec::new(),
                any_suffix: false,
            });
        }
        let mut segments = Vec::new();
        let mut any_suffix = false;
        for segment in rest.split('/') {
            if any_suffix {
                return Err(PatternError::DoubleStarNotLast);
            }
            match segment {
                "" => return Err(PatternError::EmptySegment),
                "." | ".." => return Err(PatternError::DotSegment),
                "*" => segments.push(Segment::Any),
                "**" => any_suffix = true,
                literal => {
                    check_literal(literal)?;
                    segments.push(Segment::Literal(literal.into()));
                }
            }
        }
        Ok(Self {
            segments,
            any_suffix,
        })
    }

    /// Whether the normalised request path `path` matches. Does not allocate.
    pub fn matches(&self, path: &str) -> bool {
        let Some(rest) = path.strip_prefix('/') else {
            return false;
        };
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        // The root has no segments, not one empty one.
        let mut path_segments = (!rest.is_empty())
            .then(|| rest.split('/'))
            .into_iter()
            .flatten();
        for segment in &self.segments {
            let Some(actual) = path_segments.next() else {
                return false;
            };
            let segment_ok = match segment {
                Segment::Literal(literal) => literal_matches(literal, actual),
                Segment::Any => !actual.is_empty(),
            };
            if !segment_ok {
                return false;
            }
        }
        self.any_suffix || path_segments.next().is_none()
    }

    /// Whether every path `other` matches is also matched by `self`.
    ///
    /// This is exact, not just sound: a path of `other` has at least (or, without `**`,
    /// exactly) as many segments as `other` has, and position by position a `*` in `self`
    /// takes any segment, while a literal in `self` only takes the same literal, since a
    /// `*` in `other` stands for segments `self`'s literal would refuse.
    ///
    /// Comparing literals as strings stays exact although a literal also matches escaped
    /// spellings (see [`literal_matches`]): the request segments a literal matches are
    /// exactly those that decode to it when the escapes of sub-delims, `:` and `@` are
    /// decoded, and that decoding is a function of the request segment, so two different
    /// literals match disjoint sets of segments and equal literals the same set.
    pub fn covers(&self, other: &PathPattern) -> bool {
        let lengths_ok = if self.any_suffix {
            other.segments.len() >= self.segments.len()
        } else {
            !other.any_suffix && other.segments.len() == self.segments.len()
        };
        lengths_ok
            && self
                .segments
                .iter()
                .zip(&other.segments)
                .all(|(mine, theirs)| match (mine, theirs) {
                    (Segment::Any, _) => true,
                    (Segment::Literal(a), Segment::Literal(b)) => a == b,
                    (Segment::Literal(_), Segment::Any) => false,
                })
    }
}

/// Refuses characters a literal segment cannot hold: the pattern is compared with normalised
/// paths, in which such characters are percent-encoded or refused.
fn check_literal(literal: &str) -> Result<(), PatternError> {
    for c in literal.chars() {
        match c {
            '*' => return Err(PatternError::PartialWildcard),
            '%' => return Err(PatternError::PercentEncoding),
            c if c.is_whitespace() || c.is_control() => return Err(PatternError::Whitespace),
            c if is_segment_char(c) => {}
            c => return Err(PatternError::InvalidCharacter(c)),
        }
    }
    Ok(())
}

/// Whether the literal segment `literal` (accepted by [`check_literal`]) matches the request
/// segment `actual`: byte for byte, except that a `%XX` in `actual` (hex in either case) stands
/// for the byte `XX` when that is a sub-delim, `:` or `@`. Does not allocate.
fn literal_matches(literal: &str, actual: &str) -> bool {
    let (literal, actual) = (literal.as_bytes(), actual.as_bytes());
    if !actual.contains(&b'%') {
        return literal == actual;
    }
    let mut i = 0;
    for &want in literal {
        match actual.get(i) {
            Some(b'%') => {
                let decoded = match (
                    actual.get(i + 1).copied().and_then(hex_value),
                    actual.get(i + 2).copied().and_then(hex_value),
                ) {
                    (Some(high), Some(low)) => (high << 4) | low,
                    _ => return false,
                };
                if decoded != want || !is_reserved_literal_byte(want) {
                    return false;
                }
                i += 3;
            }
            Some(&b) if b == want => i += 1,
            _ => return false,
        }
    }
    i == actual.len()
}

fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'A'..=b'F' => Some(b - b'A' + 10),
        b'a'..=b'f' => Some(b - b'a' + 10),
        _ => None,
    }
}

/// RFC 3986 `pchar` without `pct-encoded`: unreserved, sub-delims, `:` and `@` (`*`, a
/// sub-delim, is the wildcard and refused by [`check_literal`] before this is asked).
fn is_segment_char(c: char) -> bool {
    u8::try_from(c).is_ok_and(|b| {
        b.is_ascii_alphanumeric()
            || matches!(b, b'-' | b'.' | b'_' | b'~')
            || is_reserved_literal_byte(b)
    })
}

/// The characters a literal segment may hold besides unreserved ones: sub-delims except `*`,
/// `:` and `@`. These are the ones a request may spell percent-encoded and still match.
fn is_reserved_literal_byte(b: u8) -> bool {
    matches!(
        b,
        b'!' | b'$' | b'&' | b'\'' | b'(' | b')' | b'+' | b',' | b';' | b'=' | b':' | b'@'
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mk_pattern(pattern: &str) -> PathPattern {
        match PathPattern::parse(pattern) {
            Ok(p) => p,
            Err(e) => panic!("{pattern:?}: {e}"),
        }
    }

    #[test]
    fn literal_patterns_match_exactly_and_case_sensitively() {
        let p = mk_pattern("/orders");
        assert!(p.matches("/orders"));
        assert!(p.matches("/orders/"));
        assert!(!p.matches("/Orders"));
        assert!(!p.matches("/orders/1"));
        assert!(!p.matches("/ordersx"));
        assert!(!p.matches("/"));
        assert!(!p.matches("orders"));
    }

    #[test]
    fn star_matches_exactly_one_segment() {
        let p = mk_pattern("/orders/*/items");
        assert!(p.matches("/orders/1/items"));
        assert!(p.matches("/orders/abc/items/"));
        assert!(!p.matches("/orders/items"));
        assert!(!p.matches("/orders//items"));
        assert!(!p.matches("/orders/1/2/items"));
        let p = mk_pattern("/orders/*");
        assert!(p.matches("/orders/1"));
        assert!(!p.matches("/orders"));
        assert!(!p.matches("/orders/"));
    }

    #[test]
    fn double_star_matches_any_suffix_including_none() {
        let p = mk_pattern("/orders/**");
        assert!(p.matches("/orders"));
        assert!(p.matches("/orders/"));
        assert!(p.matches("/orders/1"));
        assert!(p.matches("/orders/1/items"));
        assert!(!p.matches("/order"));
        assert!(!p.matches("/ordersx/1"));
        assert!(!p.matches("/"));
    }

    #[test]
    fn root_patterns() {
        let root = mk_pattern("/");
        assert!(root.matches("/"));
        assert!(!root.matches("/a"));
        let all = mk_pattern("/**");
        for path in ["/", "/a", "/a/", "/a/b/c"] {
            assert!(all.matches(path), "{path:?}");
        }
    }

    #[test]
    fn parse_errors() {
        let cases = [
            ("orders", PatternError::NotAbsolute),
            ("", PatternError::NotAbsolute),
            ("/a/**/b", PatternError::DoubleStarNotLast),
            ("/**/**", PatternError::DoubleStarNotLast),
            ("//admin", PatternError::EmptySegment),
            ("/orders/", PatternError::EmptySegment),
            ("/a/../b", PatternError::DotSegment),
            ("/a/.", PatternError::DotSegment),
            ("/ord*", PatternError::PartialWildcard),
            ("/a/***", PatternError::PartialWildcard),
            ("/a%2Fb", PatternError::PercentEncoding),
            ("/a b", PatternError::Whitespace),
            ("/a\tb", PatternError::Whitespace),
            ("/a\\b", PatternError::InvalidCharacter('\\')),
            ("/a?b", PatternError::InvalidCharacter('?')),
            ("/é", PatternError::InvalidCharacter('é')),
        ];
        for (pattern, expected) in cases {
            assert_eq!(PathPattern::parse(pattern), Err(expected), "{pattern:?}");
        }
    }

    #[test]
    fn sub_delims_colon_and_at_are_literal_characters() {
        let p = mk_pattern("/v1/orders:search/@me/a=b;c");
        assert!(p.matches("/v1/orders:search/@me/a=b;c"));
    }

    #[test]
    fn escaped_sub_delims_colon_and_at_match_their_literal() {
        let p = mk_pattern("/a:b");
        assert!(p.matches("/a:b"));
        assert!(p.matches("/a%3Ab"));
        assert!(p.matches("/a%3ab"));
        assert!(p.matches("/a%3Ab/"));
        let p = mk_pattern("/users/a@b.com");
        assert!(p.matches("/users/a%40b.com"));
        let p = mk_pattern("/v1/orders:search/@me/a=b;c");
        assert!(p.matches("/v1/orders%3Asearch/%40me/a%3Db%3bc"));
        let p = mk_pattern("/x/!$&'()+,;=:@");
        assert!(p.matches("/x/%21%24%26%27%28%29%2B%2C%3B%3D%3A%40"));
        assert!(p.matches("/x/%21$%26'%28)%2b,%3b=%3a@"));
    }

    #[test]
    fn escapes_match_only_the_same_character() {
        let p = mk_pattern("/a:b");
        assert!(!mk_pattern("/a:c").matches("/a%3Ab"));
        // Not a character a literal may hold encoded, or not the one in the pattern.
        assert!(!p.matches("/a%3Bb"));
        assert!(!p.matches("/a%40b"));
        assert!(!p.matches("/a%253Ab"));
        assert!(!p.matches("/a%3A"));
        assert!(!p.matches("/a%3Abb"));
        assert!(!p.matches("/a%3"));
        assert!(!p.matches("/a%3Gb"));
        // Unreserved characters are decoded by the normaliser, never matched encoded.
        assert!(!mk_pattern("/admin").matches("/%61dmin"));
        assert!(!mk_pattern("/a-b").matches("/a%2Db"));
        // `*` is never a literal, so `%2A` matches only a wildcard.
        assert!(mk_pattern("/a/*").matches("/a/%2A"));
        assert!(!mk_pattern("/a:b").matches("/a%2Ab"));
    }

    #[test]
    fn literal_matches_agrees_with_decoding() {
        // Every spelling of a literal matches it, and no other literal.
        let literals = ["a:b", "a@b", "a;b", "a=b", "ab", "a:c", "a", "a::"];
        for literal in literals {
            let spelled = literal
                .replace(':', "%3a")
                .replace('@', "%40")
                .replace(';', "%3B")
                .replace('=', "%3d");
            for other in literals {
                assert_eq!(
                    literal_matches(other, &spelled),
                    other == literal,
                    "{other:?} vs {spelled:?}"
                );
            }
        }
    }

    #[test]
    fn covers() {
        let covers = |a: &str, b: &str| mk_pattern(a).covers(&mk_pattern(b));
        assert!(covers("/**", "/"));
        assert!(covers("/**", "/a/*/b/**"));
        assert!(covers("/a", "/a"));
        assert!(covers("/a/*", "/a/b"));
        assert!(covers("/a/*", "/a/*"));
        assert!(covers("/a/**", "/a"));
        assert!(covers("/a/**", "/a/*/c"));
        assert!(covers("/a/**", "/a/b/**"));
        assert!(covers("/*/b", "/a/b"));
        assert!(!covers("/a/b", "/a/*"));
        assert!(!covers("/a/*", "/a"));
        assert!(!covers("/a/*", "/a/**"));
        assert!(!covers("/a/*", "/a/b/c"));
        assert!(!covers("/a/b/**", "/a/**"));
        assert!(!covers("/a/b/**", "/a"));
        assert!(!covers("/", "/**"));
        assert!(!covers("/a", "/b"));
        assert!(!covers("/a", "/A"));
        assert!(covers("/a:b", "/a:b"));
        assert!(!covers("/a:b", "/a:c"));
        assert!(!covers("/a:b", "/a/*"));
    }
}
