//! Who may use this pod: run inference on it and pull model files from it. By default any
//! peer of the mesh may (the open, public mesh); `--serve-to trusted` limits both to the peers
//! listed with `--trust`. (Who may connect at all is the private mesh's key:
//! [`crate::mesh::mesh_key`].)

use std::collections::BTreeSet;
use std::fmt;
use std::str::FromStr;

use libp2p::PeerId;
use serde::{Deserialize, Serialize};

/// Which peers a pod runs requests for and sends model files to.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ServeTo {
    /// Every peer that can connect.
    #[default]
    Any,
    /// Only the trusted peers (`--trust`).
    Trusted,
}

impl ServeTo {
    /// The name `--serve-to` takes.
    pub fn as_str(self) -> &'static str {
        match self {
            ServeTo::Any => "any",
            ServeTo::Trusted => "trusted",
        }
    }
}

impl fmt::Display for ServeTo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for ServeTo {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "any" => Ok(ServeTo::Any),
            "trusted" => Ok(ServeTo::Trusted),
            other => Err(format!(
                "unknown serve-to `{other}` (expected any or trusted)"
            )),
        }
    }
}

/// What a refused peer is told, and what its pod logs.
pub const NOT_TRUSTED: &str = "this pod serves trusted peers only (--serve-to trusted)";

/// Who may use this pod.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Access {
    /// Any peer, or only the trusted ones.
    pub serve_to: ServeTo,
    /// The trusted peers (`--trust`).
    pub trusted: BTreeSet<PeerId>,
}

impl Access {
    /// Serves only `trusted`.
    pub fn trusted_only(trusted: impl IntoIterator<Item = PeerId>) -> Self {
        Self {
            serve_to: ServeTo::Trusted,
            trusted: trusted.into_iter().collect(),
        }
    }

    /// Whether `peer` may run inference on this pod and pull files from it.
    pub fn allows(&self, peer: &PeerId) -> bool {
        match self.serve_to {
            ServeTo::Any => true,
            ServeTo::Trusted => self.trusted.contains(peer),
        }
    }

    /// The refusal for `peer`, if it is not allowed.
    pub fn check(&self, peer: &PeerId) -> Result<(), &'static str> {
        if self.allows(peer) {
            Ok(())
        } else {
            Err(NOT_TRUSTED)
        }
    }

    /// The trusted peers as the capability announcement lists them: only when they matter.
    pub fn announced(&self) -> Vec<String> {
        match self.serve_to {
            ServeTo::Any => Vec::new(),
            ServeTo::Trusted => self.trusted.iter().map(ToString::to_string).collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn any_serves_everyone_and_trusted_only_the_listed_peers() {
        let (a, b) = (PeerId::random(), PeerId::random());
        let open = Access::default();
        assert!(open.allows(&a) && open.allows(&b));
        assert!(open.announced().is_empty());
        let closed = Access::trusted_only([a]);
        assert!(closed.allows(&a));
        assert!(!closed.allows(&b));
        assert_eq!(closed.check(&b), Err(NOT_TRUSTED));
        assert_eq!(closed.announced(), vec![a.to_string()]);
        // Trusting nobody serves nobody.
        assert!(!Access::trusted_only([]).allows(&a));
    }

    #[test]
    fn serve_to_names_round_trip() {
        for s in [ServeTo::Any, ServeTo::Trusted] {
            assert_eq!(s.as_str().parse::<ServeTo>(), Ok(s));
            assert_eq!(
                serde_json::to_string(&s).unwrap(),
                format!("\"{}\"", s.as_str())
            );
        }
        assert!("everyone"
            .parse::<ServeTo>()
            .unwrap_err()
            .contains("any or trusted"));
    }
}
