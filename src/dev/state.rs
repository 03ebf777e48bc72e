//! The state directory of `keygate dev`: generated credentials, the issuer's signing keys and
//! revocations, kept across restarts with owner-only permissions. Nothing here is ever
//! regenerated once written; files are replaced atomically.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use futures::future::BoxFuture;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::credentials::CredentialData;
use crate::registry::{ObjectKey, RevocationList, RevocationStore, Revocations, StoreError};
use crate::token::keys::StoredKeySet;

/// The state directory.
#[derive(Debug, Clone)]
pub struct StateDir {
    root: PathBuf,
}

impl StateDir {
    /// Opens (creating, mode 0700) the state directory.
    pub fn open(root: &Path) -> std::io::Result<Self> {
        std::fs::create_dir_all(root.join("clients"))?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o700))?;
            std::fs::set_permissions(root.join("clients"), std::fs::Permissions::from_mode(0o700))?;
        }
        Ok(Self {
            root: root.to_owned(),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn client_path(&self, key: &ObjectKey) -> PathBuf {
        self.root
            .join("clients")
            .join(format!("{}.{}.json", key.namespace, key.name))
    }

    /// The stored credentials of a client, if any.
    pub fn client(&self, key: &ObjectKey) -> std::io::Result<Option<CredentialData>> {
        read_json(&self.client_path(key))
    }

    pub fn save_client(&self, key: &ObjectKey, data: &CredentialData) -> std::io::Result<()> {
        write_json(&self.client_path(key), data)
    }

    /// The client a reference names: `namespace/name`, or `name` when only one namespace
    /// has stored credentials for a client of that name.
    pub fn resolve(&self, reference: &str) -> Result<ObjectKey, String> {
        if let Some((ns, name)) = reference.split_once('/') {
            return Ok(ObjectKey::new(ns, name));
        }
        let matches: Vec<ObjectKey> = std::fs::read_dir(self.root.join("clients"))
            .map_err(|e| format!("cannot read {}: {e}", self.root.display()))?
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter_map(|n| {
                let (ns, name) = n.strip_suffix(".json")?.split_once('.')?;
                (name == reference).then(|| ObjectKey::new(ns, name))
            })
            .collect();
        match <[ObjectKey; 1]>::try_from(matches) {
            Ok([key]) => Ok(key),
            Err(matches) if matches.is_empty() => Err(format!(
                "no credentials for {reference} in {}",
                self.root.display()
            )),
            Err(_) => Err(format!(
                "{reference} is ambiguous: name it as namespace/name"
            )),
        }
    }

    /// Finds a client's credentials by reference, as [`StateDir::resolve`] does.
    pub fn find_client(&self, reference: &str) -> Result<CredentialData, String> {
        let key = self.resolve(reference)?;
        let path = self.client_path(&key);
        read_json(&path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?
            .ok_or_else(|| format!("no credentials for {reference} in {}", self.root.display()))
    }

    /// The files of every client's stored credentials.
    pub fn client_files(&self) -> Vec<PathBuf> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(self.root.join("clients"))
            .into_iter()
            .flatten()
            .filter_map(|e| Some(e.ok()?.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "json"))
            .collect();
        files.sort();
        files
    }

    pub fn signing_keys(&self) -> std::io::Result<Option<StoredKeySet>> {
        read_json(&self.root.join("signing-keys.json"))
    }

    pub fn save_signing_keys(&self, keys: &StoredKeySet) -> std::io::Result<()> {
        write_json(&self.root.join("signing-keys.json"), keys)
    }

    pub fn revocations(&self) -> std::io::Result<Option<RevocationList>> {
        read_json(&self.root.join("revocations.json"))
    }

    pub fn save_revocations(&self, list: &RevocationList) -> std::io::Result<()> {
        write_json(&self.root.join("revocations.json"), list)
    }
}

/// `keygate dev`'s [`RevocationStore`]: `revocations.json` in the state directory,
/// rewritten with the whole list before a revocation is answered.
pub struct RevocationFile {
    state: StateDir,
    revocations: Arc<Revocations>,
    /// Writers one at a time, so that an older list never overwrites a newer one.
    writing: Arc<Mutex<()>>,
}

impl RevocationFile {
    pub fn new(state: StateDir, revocations: Arc<Revocations>) -> Self {
        Self {
            state,
            revocations,
            writing: Arc::default(),
        }
    }
}

impl RevocationStore for RevocationFile {
    fn store(&self, entries: RevocationList) -> BoxFuture<'static, Result<(), StoreError>> {
        let (state, revocations, writing) = (
            self.state.clone(),
            self.revocations.clone(),
            self.writing.clone(),
        );
        Box::pin(async move {
            tokio::task::spawn_blocking(move || {
                let _one_at_a_time = writing.lock().unwrap_or_else(|p| p.into_inner());
                let mut list = (*revocations.current()).clone();
                list.absorb(&entries);
                state.save_revocations(&list)
            })
            .await
            .map_err(|e| StoreError(e.to_string()))?
            .map_err(|e| StoreError(e.to_string()))
        })
    }
}

fn read_json<T: DeserializeOwned>(path: &Path) -> std::io::Result<Option<T>> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("{}: {e}", path.display()),
            )
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Writes `value` to a temporary file with mode 0600, then renames it into place, so a crash
/// never leaves a half-written credential file.
fn write_json<T: Serialize>(path: &Path, value: &T) -> std::io::Result<()> {
    let bytes = serde_json::to_vec_pretty(value)?;
    let tmp = path.with_extension("json.tmp");
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(&tmp)?;
    file.write_all(&bytes)?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_round_trip_with_owner_only_permissions() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::open(dir.path()).unwrap();
        let key = ObjectKey::new("shop", "reporting");
        assert_eq!(state.client(&key).unwrap(), None);
        let data = CredentialData::from([("client_id".to_string(), "kgc_1".to_string())]);
        state.save_client(&key, &data).unwrap();
        assert_eq!(state.client(&key).unwrap(), Some(data.clone()));
        assert_eq!(state.find_client("reporting").unwrap(), data);
        assert_eq!(state.find_client("shop/reporting").unwrap(), data);
        assert!(state.find_client("nobody").is_err());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.path().join("clients/shop.reporting.json"))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }
}
