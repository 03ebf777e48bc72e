//! The invalid objects in `tests/fixtures/invalid/`: each file holds one object and, in
//! `# refused: ...` comment lines, what its refusal must mention (a field path or the rule's
//! message). `keygate dev` (tests/crds.rs) and a real API server (tests/e2e_cluster.rs) must
//! both refuse every one of them, each naming every listed problem.

use std::path::Path;

/// One invalid example.
pub struct Invalid {
    pub file: String,
    pub object: serde_json::Value,
    pub refused: Vec<String>,
}

/// Every file of `tests/fixtures/invalid/`, sorted by name.
pub fn examples() -> Vec<Invalid> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/invalid");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .expect("tests/fixtures/invalid")
        .map(|entry| entry.expect("entry").path())
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|path| {
            let text = std::fs::read_to_string(&path).expect("read");
            let refused: Vec<String> = text
                .lines()
                .filter_map(|line| line.strip_prefix("# refused: "))
                .map(str::to_owned)
                .collect();
            let file = path.file_name().unwrap().to_string_lossy().into_owned();
            assert!(!refused.is_empty(), "{file}: no `# refused:` line");
            let object = serde_yaml_ng::from_str(&text).expect("one YAML object");
            Invalid {
                file,
                object,
                refused,
            }
        })
        .collect()
}
