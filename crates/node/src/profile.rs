//! Profiles: which models and services a node runs.

use std::fmt;
use std::str::FromStr;

use crate::catalogue::{DEFAULT_CHAT_MODEL, DEFAULT_EMBEDDING_MODEL};

/// A set of capabilities, chosen with `pod start --profile`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Profile {
    /// Everything this machine can run (today: the default chat and embedding models).
    #[default]
    Auto,
    /// Every capability.
    Full,
    /// Chat models.
    Inference,
    /// Embedding models.
    Embedding,
    /// No local models: the API fronts the mesh's models.
    Relay,
    /// Serves model files to peers; no local inference.
    Storage,
}

impl Profile {
    /// Every profile, for help texts and errors.
    pub const ALL: [Profile; 6] = [
        Profile::Auto,
        Profile::Full,
        Profile::Inference,
        Profile::Embedding,
        Profile::Relay,
        Profile::Storage,
    ];

    /// The models the profile loads when no `--model` is given.
    pub fn default_models(self) -> Vec<&'static str> {
        match self {
            Profile::Auto | Profile::Full => vec![DEFAULT_CHAT_MODEL, DEFAULT_EMBEDDING_MODEL],
            Profile::Inference => vec![DEFAULT_CHAT_MODEL],
            Profile::Embedding => vec![DEFAULT_EMBEDDING_MODEL],
            Profile::Relay | Profile::Storage => vec![],
        }
    }

    /// Whether the node relays connections (circuit relay v2 server) for peers behind NAT.
    pub fn relays(self) -> bool {
        matches!(self, Profile::Relay | Profile::Full)
    }

    /// The profile's name.
    pub fn as_str(self) -> &'static str {
        match self {
            Profile::Auto => "auto",
            Profile::Full => "full",
            Profile::Inference => "inference",
            Profile::Embedding => "embedding",
            Profile::Relay => "relay",
            Profile::Storage => "storage",
        }
    }
}

impl fmt::Display for Profile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Profile {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Profile::ALL
            .into_iter()
            .find(|p| p.as_str() == s)
            .ok_or_else(|| {
                format!(
                    "unknown profile `{s}` (expected one of: {})",
                    Profile::ALL.map(Profile::as_str).join(", ")
                )
            })
    }
}
