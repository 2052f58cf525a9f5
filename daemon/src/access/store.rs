//! Every volume's access rules: those from the config file (re-read on SIGHUP) and those set
//! through the admin socket (kept in `DATA_DIR/access.json`, written durably). A volume named in
//! the config file is managed there; the admin socket may not change it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::access::error::AccessError;
use crate::access::policy::{AccessPolicy, ClientIdentity, Decision};
use crate::storage::manifest::write_durably;

const FILE: &str = "access.json";

/// Where a volume's rules come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PolicySource {
    /// No rules: every client may open it.
    None,
    Config,
    Admin,
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct AccessFile {
    volumes: BTreeMap<String, AccessPolicy>,
}

#[derive(Debug, Default)]
struct Rules {
    config: BTreeMap<String, AccessPolicy>,
    admin: BTreeMap<String, AccessPolicy>,
}

pub struct AccessStore {
    path: PathBuf,
    /// Read by every handshake, on the connections' threads: held only for moments, never
    /// across a file write.
    rules: RwLock<Rules>,
    /// Admin changes one at a time, each written durably before it is installed.
    changes: Mutex<()>,
    /// Bumped on every change, so open connections can re-check their own access.
    generation: watch::Sender<u64>,
}

/// The volume whose rules govern an export: `vol@snap` exports follow `vol`.
fn governing_volume(export: &str) -> &str {
    export.split_once('@').map_or(export, |(volume, _)| volume)
}

impl AccessStore {
    pub fn open(
        data_dir: &Path,
        config: BTreeMap<String, AccessPolicy>,
    ) -> Result<AccessStore, AccessError> {
        let path = data_dir.join(FILE);
        let file_error = |reason: String| AccessError::File {
            path: path.clone(),
            reason,
        };
        let admin = match std::fs::read(&path) {
            Ok(bytes) => {
                serde_json::from_slice::<AccessFile>(&bytes)
                    .map_err(|e| file_error(e.to_string()))?
                    .volumes
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(e) => return Err(file_error(e.to_string())),
        };
        for policy in config.values().chain(admin.values()) {
            policy.validate()?;
        }
        Ok(AccessStore {
            path,
            rules: RwLock::new(Rules { config, admin }),
            changes: Mutex::new(()),
            generation: watch::Sender::new(0),
        })
    }

    fn read(&self) -> RwLockReadGuard<'_, Rules> {
        // Writers replace whole maps after validating; a panic cannot leave them half-built.
        self.rules.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, Rules> {
        self.rules.write().unwrap_or_else(|p| p.into_inner())
    }

    fn changed(&self) {
        self.generation.send_modify(|g| *g += 1);
    }

    /// The rules governing `export` and where they come from.
    pub fn policy(&self, export: &str) -> (AccessPolicy, PolicySource) {
        let volume = governing_volume(export);
        let rules = self.read();
        if let Some(policy) = rules.config.get(volume) {
            return (policy.clone(), PolicySource::Config);
        }
        match rules.admin.get(volume) {
            Some(policy) => (policy.clone(), PolicySource::Admin),
            None => (AccessPolicy::default(), PolicySource::None),
        }
    }

    pub fn decide(&self, export: &str, client: &ClientIdentity) -> Decision {
        self.policy(export).0.decide(client)
    }

    /// Replaces a volume's admin-set rules; open rules remove the entry.
    pub fn set(&self, volume: &str, policy: AccessPolicy) -> Result<(), AccessError> {
        policy.validate()?;
        let _one_at_a_time = self.changes.lock().unwrap_or_else(|p| p.into_inner());
        let mut next = {
            let rules = self.read();
            if rules.config.contains_key(volume) {
                return Err(AccessError::ManagedByConfig(volume.to_owned()));
            }
            rules.admin.clone()
        };
        if policy.is_open() {
            next.remove(volume);
        } else {
            next.insert(volume.to_owned(), policy);
        }
        self.save(&next)?;
        self.write().admin = next;
        self.changed();
        Ok(())
    }

    /// Drops a deleted volume's admin-set rules, so a new volume of that name starts open.
    pub fn forget(&self, volume: &str) -> Result<(), AccessError> {
        let _one_at_a_time = self.changes.lock().unwrap_or_else(|p| p.into_inner());
        let mut next = self.read().admin.clone();
        if next.remove(volume).is_none() {
            return Ok(());
        }
        self.save(&next)?;
        self.write().admin = next;
        Ok(())
    }

    /// Installs the config file's rules after a reload.
    pub fn replace_config(
        &self,
        config: BTreeMap<String, AccessPolicy>,
    ) -> Result<(), AccessError> {
        for policy in config.values() {
            policy.validate()?;
        }
        self.write().config = config;
        self.changed();
        Ok(())
    }

    /// Every volume with rules, by name.
    pub fn list(&self) -> Vec<(String, AccessPolicy, PolicySource)> {
        let rules = self.read();
        let mut all: BTreeMap<&String, (&AccessPolicy, PolicySource)> = BTreeMap::new();
        for (name, policy) in &rules.admin {
            all.insert(name, (policy, PolicySource::Admin));
        }
        for (name, policy) in &rules.config {
            all.insert(name, (policy, PolicySource::Config));
        }
        all.into_iter()
            .map(|(name, (policy, source))| (name.clone(), policy.clone(), source))
            .collect()
    }

    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.generation.subscribe()
    }

    /// Resolves once the rules no longer let `client` hold `export` as it was granted: denied,
    /// TLS now required of a plaintext client, or made read-only under a writer. Decides
    /// first, once subscribed: the grant was made during the handshake, and a change between
    /// it and this call (a client can stretch that by not reading its option replies) would
    /// otherwise never reach the connection.
    pub async fn revoked(&self, export: &str, client: &ClientIdentity, granted_read_only: bool) {
        let mut changes = self.subscribe();
        loop {
            match self.decide(export, client) {
                Decision::Allow { read_only } if read_only <= granted_read_only => {}
                _ => return,
            }
            if changes.changed().await.is_err() {
                // The store is gone, i.e. the daemon is stopping: shutdown handles that.
                std::future::pending::<()>().await;
            }
        }
    }

    fn save(&self, admin: &BTreeMap<String, AccessPolicy>) -> Result<(), AccessError> {
        let file_error = |reason: String| AccessError::File {
            path: self.path.clone(),
            reason,
        };
        let bytes = serde_json::to_vec_pretty(&AccessFile {
            volumes: admin.clone(),
        })
        .map_err(|e| file_error(e.to_string()))?;
        write_durably(&self.path, &bytes).map_err(|e| file_error(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::access::policy::ClientAddr;

    fn plain_client() -> ClientIdentity {
        ClientIdentity {
            addr: ClientAddr::tcp("127.0.0.1".parse().unwrap()),
            tls: false,
            cert_names: Vec::new(),
        }
    }

    fn read_only() -> AccessPolicy {
        AccessPolicy {
            read_only: true,
            ..Default::default()
        }
    }

    #[test]
    fn admin_rules_persist_config_rules_win_and_snapshots_follow_their_volume() {
        let dir = tempfile::tempdir().unwrap();
        let config = BTreeMap::from([(
            "managed".to_owned(),
            AccessPolicy {
                tls_only: true,
                ..Default::default()
            },
        )]);
        let store = AccessStore::open(dir.path(), config.clone()).unwrap();
        store.set("vol1", read_only()).unwrap();
        assert!(matches!(
            store.set("managed", read_only()),
            Err(AccessError::ManagedByConfig(_))
        ));
        let client = plain_client();
        assert_eq!(
            store.decide("vol1@snap", &client),
            Decision::Allow { read_only: true }
        );
        assert_eq!(store.decide("managed", &client), Decision::NeedsTls);
        assert_eq!(store.policy("other").1, PolicySource::None);

        let reopened = AccessStore::open(dir.path(), BTreeMap::new()).unwrap();
        assert_eq!(reopened.policy("vol1"), (read_only(), PolicySource::Admin));
        assert_eq!(reopened.policy("managed").1, PolicySource::None);
        reopened.forget("vol1").unwrap();
        reopened.set("vol2", AccessPolicy::default()).unwrap();
        let again = AccessStore::open(dir.path(), BTreeMap::new()).unwrap();
        assert!(again.list().is_empty());
    }

    #[tokio::test]
    async fn revocation_fires_on_a_stricter_rule_only() {
        let dir = tempfile::tempdir().unwrap();
        let store = std::sync::Arc::new(AccessStore::open(dir.path(), BTreeMap::new()).unwrap());
        let client = plain_client();
        let watcher = {
            let store = std::sync::Arc::clone(&store);
            let client = client.clone();
            tokio::spawn(async move { store.revoked("vol1", &client, false).await })
        };
        // A change that still allows a writer does not revoke.
        store
            .set(
                "vol1",
                AccessPolicy {
                    max_connections: Some(4),
                    ..Default::default()
                },
            )
            .unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        assert!(!watcher.is_finished());
        store.set("vol1", read_only()).unwrap();
        tokio::time::timeout(std::time::Duration::from_secs(5), watcher)
            .await
            .expect("revoked when made read-only")
            .unwrap();
        // Made read-only before the connection started watching (between its handshake's
        // grant and the transmission): revoked at once all the same.
        tokio::time::timeout(
            std::time::Duration::from_secs(5),
            store.revoked("vol1", &client, false),
        )
        .await
        .expect("a change made before the watch started revokes");
        // A read-only grant under the same rules stands.
        let still = tokio::time::timeout(
            std::time::Duration::from_millis(50),
            store.revoked("vol1", &client, true),
        )
        .await;
        assert!(still.is_err(), "a read-only client keeps its grant");
    }
}
