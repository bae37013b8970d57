//! `pod mesh`: the pre-shared key of a private mesh, made and inspected.

use std::path::PathBuf;

use anyhow::Result;
use clap::Subcommand;
use pod_node::mesh::mesh_key::{generate_mesh_key, read_mesh_key, write_mesh_key};

#[derive(Debug, Subcommand)]
pub(crate) enum MeshCommand {
    /// The pre-shared key of a private mesh: pods started with the same `--mesh-key FILE`
    /// connect only to each other.
    #[command(subcommand)]
    Key(KeyCommand),
}

#[derive(Debug, Subcommand)]
pub(crate) enum KeyCommand {
    /// Make a new random key and write it to a new file, readable by its owner only (0600);
    /// an existing file is never replaced.
    New {
        /// The key file to create.
        #[arg(long, short, value_name = "FILE")]
        out: PathBuf,
    },
    /// Check a key file and print its fingerprint, which is the same on every pod holding
    /// the key (the key itself is not printed).
    Show {
        /// The key file.
        file: PathBuf,
    },
}

pub(crate) fn exec(cmd: MeshCommand) -> Result<()> {
    match cmd {
        MeshCommand::Key(KeyCommand::New { out }) => {
            let key = generate_mesh_key();
            write_mesh_key(&out, key)?;
            println!(
                "wrote {} (fingerprint {})",
                out.display(),
                key.fingerprint()
            );
            eprintln!(
                "copy it to every pod of the private mesh (privately: whoever holds it can join) \
                 and start each with --mesh-key {}",
                out.display()
            );
        }
        MeshCommand::Key(KeyCommand::Show { file }) => {
            let key = read_mesh_key(&file)?;
            println!("fingerprint {}", key.fingerprint());
        }
    }
    Ok(())
}
