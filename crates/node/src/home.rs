//! `$POD_HOME`: the one directory holding a node's state (models, identity, ledger, config).

use std::path::PathBuf;

/// Environment variable overriding the state directory.
pub const POD_HOME_ENV: &str = "POD_HOME";

/// The state directory: `$POD_HOME`, else `$XDG_DATA_HOME/pod` (`~/.local/share/pod`).
pub fn default_home() -> PathBuf {
    if let Some(home) = std::env::var_os(POD_HOME_ENV).filter(|v| !v.is_empty()) {
        return PathBuf::from(home);
    }
    dirs::data_dir()
        .unwrap_or_else(|| PathBuf::from(".local/share"))
        .join("pod")
}
