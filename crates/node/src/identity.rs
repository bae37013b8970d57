//! The node's identity: an ed25519 keypair in `$POD_HOME/identity`, created once and reused,
//! so the PeerId is stable across restarts.
//!
//! The file holds the keypair in libp2p's protobuf encoding, is written atomically with mode
//! 0600, and is never replaced silently: a corrupted file is an error.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use libp2p_identity::{Keypair, PeerId};
use serde::{Deserialize, Serialize};

/// Name of the key file under `$POD_HOME`.
pub const IDENTITY_FILE: &str = "identity";

/// Reading, creating or importing the identity failed.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// The file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file exists but does not hold a valid keypair.
    #[error("identity file {path} is corrupted ({reason}); restore it from a backup (`pod identity import`) or move it away to create a new identity, which changes this node's PeerId")]
    Corrupted {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// An export to import is malformed.
    #[error("not a pod identity export: {0}")]
    BadExport(String),
    /// Importing would replace an existing, different identity.
    #[error("an identity already exists ({0}); pass --force to replace it")]
    Exists(PeerId),
}

/// A node's keypair.
#[derive(Debug, Clone)]
pub struct Identity {
    keypair: Keypair,
}

/// The portable form written by `pod identity export`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdentityExport {
    /// Key type; always `ed25519`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The PeerId derived from the key.
    pub peer_id: String,
    /// Public key, base64 of libp2p's protobuf encoding.
    pub public_key: String,
    /// Keypair, base64 of libp2p's protobuf encoding. Secret.
    pub private_key: String,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> IdentityError + '_ {
    move |source| IdentityError::Io {
        path: path.to_owned(),
        source,
    }
}

impl Identity {
    /// A fresh random identity.
    pub fn generate() -> Self {
        Self {
            keypair: Keypair::generate_ed25519(),
        }
    }

    /// The identity under `home`, if one was created.
    pub fn load(home: &Path) -> Result<Option<Self>, IdentityError> {
        let path = home.join(IDENTITY_FILE);
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err(&path)(e)),
        };
        let keypair =
            Keypair::from_protobuf_encoding(&bytes).map_err(|e| IdentityError::Corrupted {
                path: path.clone(),
                reason: e.to_string(),
            })?;
        if keypair.clone().try_into_ed25519().is_err() {
            return Err(IdentityError::Corrupted {
                path,
                reason: "not an ed25519 key".into(),
            });
        }
        Ok(Some(Self { keypair }))
    }

    /// The identity under `home`, created on first use; the flag says whether it was created.
    pub fn load_or_create(home: &Path) -> Result<(Self, bool), IdentityError> {
        if let Some(id) = Self::load(home)? {
            return Ok((id, false));
        }
        let id = Self::generate();
        id.save(home)?;
        tracing::info!(peer_id = %id.peer_id(), "created a new node identity");
        Ok((id, true))
    }

    /// Writes the key file atomically, readable by the owner only.
    pub fn save(&self, home: &Path) -> Result<(), IdentityError> {
        fs::create_dir_all(home).map_err(io_err(home))?;
        let path = home.join(IDENTITY_FILE);
        let bytes = self
            .keypair
            .to_protobuf_encoding()
            .map_err(|e| IdentityError::BadExport(e.to_string()))?;
        let mut tmp = tempfile::NamedTempFile::new_in(home).map_err(io_err(home))?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            tmp.as_file()
                .set_permissions(fs::Permissions::from_mode(0o600))
                .map_err(io_err(&path))?;
        }
        tmp.write_all(&bytes)
            .and_then(|()| tmp.as_file().sync_all())
            .map_err(io_err(&path))?;
        tmp.persist(&path).map_err(|e| IdentityError::Io {
            path: path.clone(),
            source: e.error,
        })?;
        if let Ok(dir) = fs::File::open(home) {
            let _ = dir.sync_all();
        }
        Ok(())
    }

    /// The PeerId.
    pub fn peer_id(&self) -> PeerId {
        self.keypair.public().to_peer_id()
    }

    /// The keypair, for the network layer.
    pub fn keypair(&self) -> &Keypair {
        &self.keypair
    }

    /// Public key, base64 of the protobuf encoding.
    pub fn public_key_base64(&self) -> String {
        B64.encode(self.keypair.public().encode_protobuf())
    }

    /// The portable export, secret key included.
    pub fn export(&self) -> Result<IdentityExport, IdentityError> {
        let private = self
            .keypair
            .to_protobuf_encoding()
            .map_err(|e| IdentityError::BadExport(e.to_string()))?;
        Ok(IdentityExport {
            kind: "ed25519".into(),
            peer_id: self.peer_id().to_string(),
            public_key: self.public_key_base64(),
            private_key: B64.encode(private),
        })
    }

    /// Parses an export and checks that its PeerId matches its key.
    pub fn from_export(text: &str) -> Result<Self, IdentityError> {
        let export: IdentityExport =
            serde_json::from_str(text).map_err(|e| IdentityError::BadExport(e.to_string()))?;
        let bytes = B64
            .decode(export.private_key.trim())
            .map_err(|e| IdentityError::BadExport(format!("private_key: {e}")))?;
        let keypair = Keypair::from_protobuf_encoding(&bytes)
            .map_err(|e| IdentityError::BadExport(format!("private_key: {e}")))?;
        let id = Self { keypair };
        if id.peer_id().to_string() != export.peer_id {
            return Err(IdentityError::BadExport(format!(
                "peer_id {} does not match the key ({})",
                export.peer_id,
                id.peer_id()
            )));
        }
        Ok(id)
    }

    /// Installs an exported identity under `home`; an existing different one is only replaced
    /// with `force`.
    pub fn import(home: &Path, text: &str, force: bool) -> Result<Self, IdentityError> {
        let id = Self::from_export(text)?;
        if let Some(existing) = Self::load(home)? {
            if existing.peer_id() != id.peer_id() && !force {
                return Err(IdentityError::Exists(existing.peer_id()));
            }
        }
        id.save(home)?;
        Ok(id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn created_once_then_reused() {
        let home = tempfile::tempdir().unwrap();
        let (a, created) = Identity::load_or_create(home.path()).unwrap();
        assert!(created);
        let (b, created) = Identity::load_or_create(home.path()).unwrap();
        assert!(!created);
        assert_eq!(a.peer_id(), b.peer_id());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(home.path().join(IDENTITY_FILE))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }

    #[test]
    fn corrupted_file_is_an_error_not_replaced() {
        let home = tempfile::tempdir().unwrap();
        let path = home.path().join(IDENTITY_FILE);
        fs::write(&path, b"garbage").unwrap();
        let err = Identity::load_or_create(home.path()).unwrap_err();
        assert!(matches!(err, IdentityError::Corrupted { .. }), "{err}");
        assert_eq!(fs::read(&path).unwrap(), b"garbage");
    }

    #[test]
    fn export_import_round_trip_and_checks() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        let (id, _) = Identity::load_or_create(a.path()).unwrap();
        let text = serde_json::to_string(&id.export().unwrap()).unwrap();
        let imported = Identity::import(b.path(), &text, false).unwrap();
        assert_eq!(imported.peer_id(), id.peer_id());
        assert_eq!(
            Identity::load(b.path()).unwrap().unwrap().peer_id(),
            id.peer_id()
        );

        let other = tempfile::tempdir().unwrap();
        Identity::load_or_create(other.path()).unwrap();
        assert!(matches!(
            Identity::import(other.path(), &text, false),
            Err(IdentityError::Exists(_))
        ));
        assert_eq!(
            Identity::import(other.path(), &text, true)
                .unwrap()
                .peer_id(),
            id.peer_id()
        );

        let mut tampered = id.export().unwrap();
        tampered.peer_id = Identity::generate().peer_id().to_string();
        let err = Identity::from_export(&serde_json::to_string(&tampered).unwrap()).unwrap_err();
        assert!(err.to_string().contains("does not match"), "{err}");
        assert!(Identity::from_export("{}").is_err());
    }
}
