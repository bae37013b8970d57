//! `pod identity`: show, export or import the node's ed25519 key and PeerId.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::Subcommand;
use pod_node::identity::Identity;

#[derive(Debug, Subcommand)]
pub(crate) enum IdentityCommand {
    /// Print the PeerId and public key (creating the identity on first use).
    Show {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Print the identity, secret key included, as JSON for `pod identity import`.
    Export {
        /// Write to this file (mode 0600, also when it exists; a symbolic link is refused)
        /// instead of stdout.
        #[arg(long, short)]
        output: Option<PathBuf>,
    },
    /// Install an identity exported by `pod identity export`.
    Import {
        /// The export file.
        file: PathBuf,
        /// Replace an existing, different identity (its PeerId is lost).
        #[arg(long)]
        force: bool,
    },
}

pub(crate) fn exec(home: &Path, cmd: IdentityCommand) -> Result<()> {
    match cmd {
        IdentityCommand::Show { json } => {
            let (id, _) = Identity::load_or_create(home)?;
            if json {
                println!(
                    "{}",
                    serde_json::json!({
                        "peer_id": id.peer_id().to_string(),
                        "public_key": id.public_key_base64(),
                        "type": "ed25519",
                    })
                );
            } else {
                println!("peer id:    {}", id.peer_id());
                println!(
                    "public key: {} (ed25519, protobuf, base64)",
                    id.public_key_base64()
                );
            }
        }
        IdentityCommand::Export { output } => {
            let (id, _) = Identity::load_or_create(home)?;
            let text = serde_json::to_string_pretty(&id.export()?)?;
            match output {
                None => println!("{text}"),
                Some(path) => {
                    write_private(&path, &text)
                        .with_context(|| format!("cannot write {}", path.display()))?;
                    eprintln!(
                        "wrote {} (it holds the secret key; keep it private)",
                        path.display()
                    );
                }
            }
        }
        IdentityCommand::Import { file, force } => {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("cannot read {}", file.display()))?;
            let id = Identity::import(home, &text, force)?;
            println!("imported identity {}", id.peer_id());
        }
    }
    Ok(())
}

/// Writes the secret key to `path`, readable by the owner only: a new file is created 0600 and
/// an existing one is narrowed to 0600 before the key goes in. A symbolic link is refused
/// rather than followed, so the key never lands somewhere the link's owner chose.
fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
        // O_NOFOLLOW: opening a symbolic link fails (ELOOP) instead of following it.
        options.custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32);
    }
    let mut f = options.open(path).map_err(|e| {
        if path.is_symlink() {
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "it is a symbolic link; give the path of a regular file",
            )
        } else {
            e
        }
    })?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    }
    f.write_all(text.as_bytes())?;
    f.write_all(b"\n")?;
    f.sync_all()
}
