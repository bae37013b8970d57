//! The pre-shared key of a private mesh (libp2p's `pnet`): every TCP connection of the mesh is
//! encrypted with it before Noise starts, so a pod without the key (or with another one)
//! cannot connect at all, nor read or answer anything. QUIC cannot carry it, so a pod with a
//! mesh key speaks TCP only.
//!
//! The key file is the format go-libp2p and IPFS use (`swarm.key`):
//!
//! ```text
//! /key/swarm/psk/1.0.0/
//! /base16/
//! <64 hex digits>
//! ```

use std::io::Write;
use std::path::{Path, PathBuf};

use libp2p::pnet::KeyParseError;
pub use libp2p::pnet::PreSharedKey;

/// Reading or writing a mesh key file failed.
#[derive(Debug, thiserror::Error)]
pub enum MeshKeyError {
    /// The file cannot be read.
    #[error("cannot read mesh key file {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not a key file.
    #[error("mesh key file {} is not a key file: {reason}", path.display())]
    Parse {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The file already exists; keys are never overwritten.
    #[error("{} already exists; a mesh key is never overwritten (remove it first, or pick another file)", path.display())]
    Exists {
        /// The file.
        path: PathBuf,
    },
    /// The file cannot be written.
    #[error("cannot write mesh key file {}: {source}", path.display())]
    Write {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// What is wrong with a key file's text, in words.
fn reason(e: &KeyParseError) -> &'static str {
    match e {
        KeyParseError::InvalidKeyFile => {
            "expected three lines: /key/swarm/psk/1.0.0/, /base16/ and the key in 64 hex digits"
        }
        KeyParseError::InvalidKeyType => "the first line must be /key/swarm/psk/1.0.0/",
        KeyParseError::InvalidKeyEncoding => "the second line must be /base16/",
        KeyParseError::InvalidKeyLength => "the key (third line) must be 64 hex digits",
        KeyParseError::InvalidKeyChar(_) => "the key (third line) holds a non-hex character",
    }
}

/// Parses a key file's text; `path` names it in the error.
pub fn parse_mesh_key(text: &str, path: &Path) -> Result<PreSharedKey, MeshKeyError> {
    text.parse().map_err(|e| MeshKeyError::Parse {
        path: path.to_owned(),
        reason: reason(&e),
    })
}

/// Reads the key file at `path`.
pub fn read_mesh_key(path: &Path) -> Result<PreSharedKey, MeshKeyError> {
    let text = std::fs::read_to_string(path).map_err(|source| MeshKeyError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse_mesh_key(&text, path)
}

/// Whether others than the owner may read the file at `path` (a key everyone on the host can
/// read is a key everyone on the host holds).
pub fn readable_by_others(path: &Path) -> bool {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(path).is_ok_and(|m| m.permissions().mode() & 0o077 != 0)
    }
    #[cfg(not(unix))]
    {
        let _ = path;
        false
    }
}

/// A new random key.
pub fn generate_mesh_key() -> PreSharedKey {
    PreSharedKey::new(rand::random())
}

/// Writes `key` to a new file at `path`, readable by the owner only (0600). An existing file
/// (or a link) is never replaced.
pub fn write_mesh_key(path: &Path, key: PreSharedKey) -> Result<(), MeshKeyError> {
    let mut options = std::fs::OpenOptions::new();
    // create_new: O_CREAT | O_EXCL, which also refuses to follow a symbolic link.
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(path).map_err(|source| {
        if source.kind() == std::io::ErrorKind::AlreadyExists {
            MeshKeyError::Exists {
                path: path.to_owned(),
            }
        } else {
            MeshKeyError::Write {
                path: path.to_owned(),
                source,
            }
        }
    })?;
    file.write_all(key.to_key_file().as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(|source| MeshKeyError::Write {
            path: path.to_owned(),
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEX: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn parse(text: &str) -> Result<PreSharedKey, String> {
        parse_mesh_key(text, Path::new("/etc/pod/mesh.key")).map_err(|e| e.to_string())
    }

    #[test]
    fn the_standard_key_file_parses_with_or_without_a_final_newline_or_crlf() {
        let key = parse(&format!("/key/swarm/psk/1.0.0/\n/base16/\n{HEX}\n")).unwrap();
        assert_eq!(
            parse(&format!("/key/swarm/psk/1.0.0/\n/base16/\n{HEX}")).unwrap(),
            key
        );
        assert_eq!(
            parse(&format!("/key/swarm/psk/1.0.0/\r\n/base16/\r\n{HEX}\r\n")).unwrap(),
            key
        );
        // What is written is what is read.
        assert_eq!(parse(&key.to_key_file()).unwrap(), key);
        let other = parse(&format!(
            "/key/swarm/psk/1.0.0/\n/base16/\n{}\n",
            HEX.replace('0', "f")
        ))
        .unwrap();
        assert_ne!(
            other.fingerprint().to_string(),
            key.fingerprint().to_string()
        );
    }

    #[test]
    fn bad_key_files_are_one_line_naming_the_file_and_what_is_wrong() {
        let cases = [
            ("", "expected three lines"),
            (HEX, "expected three lines"),
            (
                &format!("/key/swarm/psk/2.0.0/\n/base16/\n{HEX}\n"),
                "first line",
            ),
            (
                &format!("/key/swarm/psk/1.0.0/\n/base64/\n{HEX}\n"),
                "second line",
            ),
            (
                &format!("/key/swarm/psk/1.0.0/\n/base16/\n{}\n", &HEX[2..]),
                "64 hex digits",
            ),
            (
                &format!("/key/swarm/psk/1.0.0/\n/base16/\n{}zz\n", &HEX[2..]),
                "non-hex",
            ),
        ];
        for (text, needle) in cases {
            let err = parse(text).unwrap_err();
            assert!(
                err.starts_with("mesh key file /etc/pod/mesh.key is not a key file: "),
                "{err}"
            );
            assert!(err.contains(needle), "{needle:?} not in {err}");
            assert!(!err.contains('\n'), "{err}");
            assert!(!err.contains(&HEX[4..]), "the key leaks into {err}");
        }
    }

    #[test]
    fn a_new_key_is_written_0600_read_back_and_never_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mesh.key");
        let key = generate_mesh_key();
        assert_ne!(key, generate_mesh_key());
        write_mesh_key(&path, key).unwrap();
        assert_eq!(read_mesh_key(&path).unwrap(), key);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
            assert!(!readable_by_others(&path));
        }
        let err = write_mesh_key(&path, generate_mesh_key()).unwrap_err();
        assert!(matches!(err, MeshKeyError::Exists { .. }), "{err}");
        assert_eq!(read_mesh_key(&path).unwrap(), key, "the key was replaced");
        // A link is not followed.
        #[cfg(unix)]
        {
            let link = dir.path().join("link.key");
            std::os::unix::fs::symlink(dir.path().join("elsewhere.key"), &link).unwrap();
            assert!(write_mesh_key(&link, key).is_err());
            assert!(!dir.path().join("elsewhere.key").exists());
        }
        let missing = read_mesh_key(&dir.path().join("none.key")).unwrap_err();
        assert!(
            missing
                .to_string()
                .starts_with("cannot read mesh key file "),
            "{missing}"
        );
    }
}
