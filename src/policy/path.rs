//! Request path normalisation.
//!
//! Route rules are matched against one canonical spelling of the request path, so that
//! `/public/../admin`, `//admin` and `/%61dmin` cannot slip past a rule for `/admin`:
//!
//! 1. percent-encoded unreserved characters (`A-Z a-z 0-9 - . _ ~`) are decoded and every
//!    other escape gets upper-case hex (RFC 3986 §6.2.2.1-2);
//! 2. dot segments are removed (RFC 3986 §5.2.4), after the decoding so that `%2e%2e` counts,
//!    and a `..` at the root stays at the root as RFC 3986 specifies;
//! 3. runs of `/` collapse into one, as most web servers do before routing;
//! 4. a trailing `/` is kept.
//!
//! Paths whose meaning differs between servers are refused instead of guessed at: an encoded
//! slash (`%2F`), a backslash (raw or `%5C`), control characters (raw or encoded), a raw
//! space or non-ASCII character, and malformed escapes. The proxy should forward the
//! normalised path, so the application sees exactly the path that was authorised.

use std::borrow::Cow;

/// Why a request path was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    /// The path does not start with `/`.
    #[error("the path must start with /")]
    NotAbsolute,
    /// `%2F`: servers disagree on whether it separates segments.
    #[error("the path contains an encoded slash (%2F)")]
    EncodedSlash,
    /// `\` or `%5C`: some servers treat it as a separator.
    #[error("the path contains a backslash")]
    Backslash,
    /// A raw or percent-encoded control character, or a raw space, DEL or non-ASCII byte.
    #[error("the path contains a control, space or non-ASCII character")]
    InvalidCharacter,
    /// A `%` not followed by two hex digits.
    #[error("the path contains a malformed percent escape")]
    MalformedEscape,
}

/// Normalises the path of a request target (without the query) as the module doc describes.
///
/// Paths that are already canonical, which is nearly all of them, are returned borrowed
/// without allocating.
pub fn normalize(raw_path: &str) -> Result<Cow<'_, str>, PathError> {
    if is_canonical(raw_path) {
        Ok(Cow::Borrowed(raw_path))
    } else {
        normalize_slow(raw_path).map(Cow::Owned)
    }
}

/// Whether `path` needs no work: absolute, only plain characters, no empty segment except a
/// trailing one and no dot segment.
fn is_canonical(path: &str) -> bool {
    let Some(rest) = path.strip_prefix('/') else {
        return false;
    };
    if !rest.bytes().all(is_plain) {
        return false;
    }
    let mut segments = rest.split('/').peekable();
    while let Some(segment) = segments.next() {
        let is_last = segments.peek().is_none();
        if (segment.is_empty() && !is_last) || segment == "." || segment == ".." {
            return false;
        }
    }
    true
}

/// A byte that may appear in a canonical path as is: printable ASCII except space, `%` and
/// `\`.
fn is_plain(b: u8) -> bool {
    matches!(b, 0x21..=0x7E) && b != b'%' && b != b'\\'
}

fn normalize_slow(raw_path: &str) -> Result<String, PathError> {
    if !raw_path.starts_with('/') {
        return Err(PathError::NotAbsolute);
    }
    let decoded = decode_unreserved(raw_path)?;

    let mut segments: Vec<&str> = Vec::new();
    // Whether the output ends with `/`: the input does, or its last segment was `.`/`..`
    // (RFC 3986 turns `/a/b/..` into `/a/`).
    let mut trailing_slash = false;
    for segment in decoded.split('/').skip(1) {
        trailing_slash = true;
        match segment {
            "" | "." => {}
            ".." => {
                segments.pop();
            }
            _ => {
                segments.push(segment);
                trailing_slash = false;
            }
        }
    }

    let mut out = String::with_capacity(decoded.len());
    for segment in &segments {
        out.push('/');
        out.push_str(segment);
    }
    if trailing_slash || out.is_empty() {
        out.push('/');
    }
    Ok(out)
}

/// Decodes escapes of unreserved characters, upper-cases the hex of the others and refuses
/// the characters the module doc lists.
fn decode_unreserved(path: &str) -> Result<String, PathError> {
    let bytes = path.as_bytes();
    let mut out = String::with_capacity(path.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'%' {
            let value = match (
                bytes.get(i + 1).copied().and_then(hex_value),
                bytes.get(i + 2).copied().and_then(hex_value),
            ) {
                (Some(high), Some(low)) => (high << 4) | low,
                _ => return Err(PathError::MalformedEscape),
            };
            check_decoded(value)?;
            if is_unreserved(value) {
                out.push(char::from(value));
            } else {
                out.push('%');
                out.push(char::from(HEX_UPPER[usize::from(value >> 4)]));
                out.push(char::from(HEX_UPPER[usize::from(value & 0x0F)]));
            }
            i += 3;
        } else {
            if b == b'\\' {
                return Err(PathError::Backslash);
            }
            if !is_plain(b) && b != b'/' {
                return Err(PathError::InvalidCharacter);
            }
            out.push(char::from(b));
            i += 1;
        }
    }
    Ok(out)
}

const HEX_UPPER: &[u8; 16] = b"0123456789ABCDEF";

fn hex_value(b: u8) -> Option<u8> {
    char::from(b)
        .to_digit(16)
        .and_then(|d| u8::try_from(d).ok())
}

/// Refuses escapes whose meaning servers disagree on.
fn check_decoded(value: u8) -> Result<(), PathError> {
    match value {
        b'/' => Err(PathError::EncodedSlash),
        b'\\' => Err(PathError::Backslash),
        0x00..=0x1F | 0x7F => Err(PathError::InvalidCharacter),
        _ => Ok(()),
    }
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(raw: &str) -> String {
        match normalize(raw) {
            Ok(path) => path.into_owned(),
            Err(e) => panic!("{raw:?} was refused: {e}"),
        }
    }

    #[test]
    fn canonical_paths_are_borrowed() {
        for path in [
            "/",
            "/orders",
            "/orders/",
            "/orders/1/items",
            "/a.b/..c/.d",
            "/v1/x:y@z",
        ] {
            assert!(
                matches!(normalize(path), Ok(Cow::Borrowed(p)) if p == path),
                "{path:?}"
            );
            // The fast path must agree with the full algorithm.
            assert_eq!(normalize_slow(path).as_deref(), Ok(path), "{path:?}");
        }
    }

    #[test]
    fn dot_segments_are_removed() {
        assert_eq!(ok("/public/../admin"), "/admin");
        assert_eq!(ok("/a/./b"), "/a/b");
        assert_eq!(ok("/a/b/.."), "/a/");
        assert_eq!(ok("/a/b/."), "/a/b/");
        assert_eq!(ok("/a/b/../../c"), "/c");
        assert_eq!(ok("/."), "/");
        assert_eq!(ok("/.."), "/");
    }

    #[test]
    fn dot_dot_above_the_root_clamps_at_the_root() {
        assert_eq!(ok("/../admin"), "/admin");
        assert_eq!(ok("/../../../etc/passwd"), "/etc/passwd");
    }

    #[test]
    fn encoded_dot_segments_are_removed_too() {
        assert_eq!(ok("/%2e%2e/admin"), "/admin");
        assert_eq!(ok("/a/%2E./b"), "/b");
        assert_eq!(ok("/public/.%2e/admin"), "/admin");
        assert_eq!(ok("/a/%2e/b"), "/a/b");
    }

    #[test]
    fn duplicate_slashes_collapse() {
        assert_eq!(ok("//admin"), "/admin");
        assert_eq!(ok("/a//b///c"), "/a/b/c");
        assert_eq!(ok("/a//"), "/a/");
        assert_eq!(ok("//"), "/");
    }

    #[test]
    fn trailing_slash_is_kept() {
        assert_eq!(ok("/orders/"), "/orders/");
        assert_eq!(ok("/orders/%41/"), "/orders/A/");
    }

    #[test]
    fn unreserved_escapes_are_decoded_and_others_upper_cased() {
        assert_eq!(ok("/%7e"), "/~");
        assert_eq!(ok("/%61dmin"), "/admin");
        assert_eq!(ok("/a%2db%5fc%2E"), "/a-b_c.");
        assert_eq!(ok("/a%3ab"), "/a%3Ab");
        assert_eq!(ok("/%c3%a9"), "/%C3%A9");
        assert_eq!(ok("/a%20b"), "/a%20b");
        assert_eq!(ok("/100%25"), "/100%25");
    }

    #[test]
    fn encoded_slash_is_refused() {
        assert_eq!(normalize("/a%2Fb"), Err(PathError::EncodedSlash));
        assert_eq!(normalize("/a%2fb"), Err(PathError::EncodedSlash));
    }

    #[test]
    fn backslashes_are_refused() {
        assert_eq!(normalize("/a\\b"), Err(PathError::Backslash));
        assert_eq!(normalize("/a%5cb"), Err(PathError::Backslash));
        assert_eq!(normalize("/a%5Cb"), Err(PathError::Backslash));
    }

    #[test]
    fn control_and_non_ascii_characters_are_refused() {
        for path in [
            "/a%00", "/a%0a", "/a%7F", "/a\0b", "/a\nb", "/a b", "/a\u{7f}", "/é",
        ] {
            assert_eq!(
                normalize(path),
                Err(PathError::InvalidCharacter),
                "{path:?}"
            );
        }
    }

    #[test]
    fn malformed_escapes_are_refused() {
        for path in ["/%zz", "/%", "/a%2", "/a%g1", "/%%41"] {
            assert_eq!(normalize(path), Err(PathError::MalformedEscape), "{path:?}");
        }
    }

    #[test]
    fn relative_paths_are_refused() {
        for path in ["", "admin", "*", "%2Fadmin"] {
            assert_eq!(normalize(path), Err(PathError::NotAbsolute), "{path:?}");
        }
    }
}
