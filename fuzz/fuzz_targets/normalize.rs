//! Path normalisation never panics, is idempotent, and never yields a path a rule could be
//! bypassed with (dot segments, empty segments, encoded slashes).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(path) = std::str::from_utf8(data) else { return };
    if let Ok(normalized) = keygate::policy::normalize(path) {
        assert!(normalized.starts_with('/'));
        assert!(!normalized.contains("//"));
        assert!(!normalized.split('/').any(|s| s == "." || s == ".."));
        let again = keygate::policy::normalize(&normalized).expect("a normalized path normalizes");
        assert_eq!(again, normalized);
    }
});
