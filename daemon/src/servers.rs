//! Servers (ECS): named groups of volumes, backed up together from one instant. Kept in
//! `DATA_DIR/servers.json` (written durably); a volume belongs to at most one server, and
//! deleting a server never touches its volumes or their backups.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use crate::storage::entry::now_unix_secs;
use crate::storage::manifest::write_durably;
use crate::storage::name::validate_volume_name;

const FILE: &str = "servers.json";

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("invalid server name {0:?}: use 1-64 of [A-Za-z0-9._-], not starting with '.'")]
    InvalidName(String),
    #[error("server {0:?} not found")]
    NotFound(String),
    #[error("server {0:?} already exists")]
    AlreadyExists(String),
    #[error("volume {volume:?} already belongs to server {server:?}")]
    VolumeTaken { volume: String, server: String },
    #[error("volume {volume:?} is not in server {server:?}")]
    NotMember { volume: String, server: String },
    #[error("a server needs at least one volume")]
    Empty,
    #[error("{path}: {reason}")]
    File { path: PathBuf, reason: String },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerInfo {
    pub name: String,
    pub volumes: Vec<String>,
    pub created_unix_secs: u64,
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct ServersFile {
    servers: Vec<ServerInfo>,
}

pub struct Servers {
    path: PathBuf,
    /// Held for moments only, never across a file write.
    servers: Mutex<BTreeMap<String, ServerInfo>>,
    /// Changes one at a time, each written durably before it is installed.
    changes: Mutex<()>,
}

impl Servers {
    pub fn open(data_dir: &Path) -> Result<Servers, ServerError> {
        let path = data_dir.join(FILE);
        let file_error = |reason: String| ServerError::File {
            path: path.clone(),
            reason,
        };
        let servers = match std::fs::read(&path) {
            Ok(bytes) => {
                serde_json::from_slice::<ServersFile>(&bytes)
                    .map_err(|e| file_error(e.to_string()))?
                    .servers
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(file_error(e.to_string())),
        };
        Ok(Servers {
            servers: Mutex::new(servers.into_iter().map(|s| (s.name.clone(), s)).collect()),
            changes: Mutex::new(()),
            path,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, ServerInfo>> {
        self.servers.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn save(&self, servers: &BTreeMap<String, ServerInfo>) -> Result<(), ServerError> {
        let file = ServersFile {
            servers: servers.values().cloned().collect(),
        };
        let bytes = serde_json::to_vec_pretty(&file).map_err(|e| ServerError::File {
            path: self.path.clone(),
            reason: e.to_string(),
        })?;
        write_durably(&self.path, &bytes).map_err(|e| ServerError::File {
            path: self.path.clone(),
            reason: e.to_string(),
        })
    }

    /// Applies `change` to a copy and keeps it only once it is on disk. Changes go one at a
    /// time; readers (`get`, `list`, a server backup) wait for none of the file writes.
    fn update<T>(
        &self,
        change: impl FnOnce(&mut BTreeMap<String, ServerInfo>) -> Result<T, ServerError>,
    ) -> Result<T, ServerError> {
        let _one_at_a_time = self.changes.lock().unwrap_or_else(|p| p.into_inner());
        let mut next = self.lock().clone();
        let out = change(&mut next)?;
        self.save(&next)?;
        *self.lock() = next;
        Ok(out)
    }

    pub fn create(&self, name: &str, volumes: &[String]) -> Result<ServerInfo, ServerError> {
        if validate_volume_name(name).is_err() {
            return Err(ServerError::InvalidName(name.to_owned()));
        }
        if volumes.is_empty() {
            return Err(ServerError::Empty);
        }
        self.update(|servers| {
            if servers.contains_key(name) {
                return Err(ServerError::AlreadyExists(name.to_owned()));
            }
            let mut members: Vec<String> = Vec::new();
            for volume in volumes {
                check_free(servers, volume)?;
                if !members.contains(volume) {
                    members.push(volume.clone());
                }
            }
            let info = ServerInfo {
                name: name.to_owned(),
                volumes: members,
                created_unix_secs: now_unix_secs(),
            };
            servers.insert(name.to_owned(), info.clone());
            Ok(info)
        })
    }

    pub fn add_volume(&self, name: &str, volume: &str) -> Result<ServerInfo, ServerError> {
        self.update(|servers| {
            // A missing server is not_found whatever the volume (as the docs say).
            if !servers.contains_key(name) {
                return Err(ServerError::NotFound(name.to_owned()));
            }
            check_free(servers, volume)?;
            let server = servers
                .get_mut(name)
                .ok_or_else(|| ServerError::NotFound(name.to_owned()))?;
            server.volumes.push(volume.to_owned());
            Ok(server.clone())
        })
    }

    pub fn remove_volume(&self, name: &str, volume: &str) -> Result<ServerInfo, ServerError> {
        self.update(|servers| {
            let server = servers
                .get_mut(name)
                .ok_or_else(|| ServerError::NotFound(name.to_owned()))?;
            if !server.volumes.iter().any(|v| v == volume) {
                return Err(ServerError::NotMember {
                    volume: volume.to_owned(),
                    server: name.to_owned(),
                });
            }
            if server.volumes.len() == 1 {
                return Err(ServerError::Empty);
            }
            server.volumes.retain(|v| v != volume);
            Ok(server.clone())
        })
    }

    /// A deleted volume leaves whatever server it was in (which may end up empty).
    pub fn forget_volume(&self, volume: &str) -> Result<(), ServerError> {
        if !self
            .lock()
            .values()
            .any(|s| s.volumes.iter().any(|v| v == volume))
        {
            return Ok(());
        }
        self.update(|servers| {
            for server in servers.values_mut() {
                server.volumes.retain(|v| v != volume);
            }
            Ok(())
        })
    }

    pub fn delete(&self, name: &str) -> Result<(), ServerError> {
        self.update(|servers| {
            servers
                .remove(name)
                .map(|_| ())
                .ok_or_else(|| ServerError::NotFound(name.to_owned()))
        })
    }

    pub fn list(&self) -> Vec<ServerInfo> {
        self.lock().values().cloned().collect()
    }

    pub fn get(&self, name: &str) -> Result<ServerInfo, ServerError> {
        self.lock()
            .get(name)
            .cloned()
            .ok_or_else(|| ServerError::NotFound(name.to_owned()))
    }
}

fn check_free(servers: &BTreeMap<String, ServerInfo>, volume: &str) -> Result<(), ServerError> {
    match servers
        .values()
        .find(|s| s.volumes.iter().any(|v| v == volume))
    {
        Some(owner) => Err(ServerError::VolumeTaken {
            volume: volume.to_owned(),
            server: owner.name.clone(),
        }),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn membership_rules_and_persistence() {
        let dir = tempfile::tempdir().unwrap();
        let servers = Servers::open(dir.path()).unwrap();
        let web = servers
            .create("web", &["a".into(), "b".into(), "a".into()])
            .unwrap();
        assert_eq!(web.volumes, vec!["a", "b"]);
        assert!(matches!(
            servers.create("db", &["b".into()]),
            Err(ServerError::VolumeTaken { .. })
        ));
        assert!(matches!(
            servers.create("web", &["c".into()]),
            Err(ServerError::AlreadyExists(_))
        ));
        assert!(matches!(
            servers.create("../x", &["c".into()]),
            Err(ServerError::InvalidName(_))
        ));
        assert!(matches!(servers.create("db", &[]), Err(ServerError::Empty)));
        servers.add_volume("web", "c").unwrap();
        // A missing server is not found, even with a volume another server holds.
        assert!(matches!(
            servers.add_volume("nope", "b"),
            Err(ServerError::NotFound(_))
        ));
        servers.remove_volume("web", "a").unwrap();
        assert!(matches!(
            servers.remove_volume("web", "a"),
            Err(ServerError::NotMember { .. })
        ));
        servers.create("db", &["a".into()]).unwrap();
        let reopened = Servers::open(dir.path()).unwrap();
        assert_eq!(reopened.get("web").unwrap().volumes, vec!["b", "c"]);
        assert_eq!(reopened.list().len(), 2);
        reopened.delete("db").unwrap();
        assert!(matches!(reopened.get("db"), Err(ServerError::NotFound(_))));
        assert_eq!(Servers::open(dir.path()).unwrap().list().len(), 1);
    }
}
