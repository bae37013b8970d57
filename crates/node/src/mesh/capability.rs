//! What a pod tells the mesh about itself: the capability announcement gossiped on
//! [`CAPABILITY_TOPIC`], and the checks a received one must pass.

use libp2p::PeerId;
use pod_inference::ModelInfo;

use crate::stage::StageAnnouncement;
use serde::{Deserialize, Serialize};

use crate::access::ServeTo;

/// Gossipsub topic of capability announcements. The suffix is the schema version: a pod that
/// changes the schema incompatibly announces on a new topic, and old pods simply do not hear it.
pub const CAPABILITY_TOPIC: &str = "/pod/capabilities/1";

/// Largest encoded announcement accepted or sent, in bytes.
pub const MAX_ANNOUNCEMENT_BYTES: usize = 16 * 1024;

/// Most models one announcement may list.
pub const MAX_MODELS: usize = 64;

/// Most addresses one announcement may list.
pub const MAX_ADDRS: usize = 16;

/// Most trusted peers one announcement may list (and `--trust` may name).
pub const MAX_TRUSTED: usize = 64;

/// Longest string field (names, architectures, addresses) in an announcement.
const MAX_FIELD_LEN: usize = 256;

/// One pod's announcement: who it is, what it serves and how busy it is.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Capabilities {
    /// Software and version, e.g. `pod/0.1.0`.
    pub agent: String,
    /// The profile the pod runs (`inference`, `relay`, ...).
    pub profile: String,
    /// Models it serves to the mesh.
    pub models: Vec<ModelInfo>,
    /// Current load.
    pub load: Load,
    /// What it runs on.
    pub hardware: HardwareSummary,
    /// Its HTTP API, if it serves one.
    pub api: Option<ApiInfo>,
    /// Multiaddrs it can be dialled at (listen and confirmed external addresses).
    pub addrs: Vec<String>,
    /// SHA-256 of the model files it serves to peers over `/pod/blob/1.0.0` (storage and full
    /// profiles).
    #[serde(default)]
    pub files: Vec<String>,
    /// Pipeline stages it serves: blocks of a model file (see [`crate::stage`]).
    #[serde(default)]
    pub stages: Vec<StageAnnouncement>,
    /// Which peers it serves, inference and files alike; absent (from pods that predate it,
    /// or that serve everyone): `any`.
    #[serde(default, skip_serializing_if = "is_any")]
    pub serve_to: ServeTo,
    /// With `serve_to: trusted`, the PeerIds it serves: other requesters do not ask it (it
    /// would refuse them).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub trusted: Vec<String>,
    /// Increases with every announcement from one run of a pod; receivers ignore announcements
    /// older than one they already hold.
    pub seq: u64,
}

/// Requests a pod is handling.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Load {
    /// Requests waiting for a slot.
    pub queued: usize,
    /// Sequences being generated.
    pub active: usize,
    /// Sequences it generates at once.
    pub max_active: usize,
}

/// The machine a pod runs on, as it announces it (what [`crate::profile::HostResources`]
/// probes is for choosing a profile and stays local).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HardwareSummary {
    /// Compute device of the models, e.g. `cpu` or `cuda:0`.
    pub device: String,
    /// Logical CPU cores.
    pub cpu_cores: usize,
    /// Installed memory in bytes (0 when unknown).
    pub memory_bytes: u64,
}

/// The pod's HTTP API.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiInfo {
    /// API flavour and version, e.g. `openai/v1`.
    pub version: String,
    /// Whether it takes requests now (models loaded).
    pub ready: bool,
}

/// Why a received announcement was dropped.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AnnouncementError {
    /// Larger than [`MAX_ANNOUNCEMENT_BYTES`].
    #[error("announcement of {0} bytes is over the limit")]
    TooLarge(usize),
    /// Not a valid announcement.
    #[error("malformed announcement: {0}")]
    Malformed(String),
    /// Valid JSON, but a list or field is over its limit.
    #[error("announcement over limits: {0}")]
    OverLimits(&'static str),
}

fn is_any(serve_to: &ServeTo) -> bool {
    *serve_to == ServeTo::Any
}

impl Capabilities {
    /// Whether the pod would serve `peer` (run its requests, send it files), as it announces.
    pub fn serves(&self, peer: &PeerId) -> bool {
        match self.serve_to {
            ServeTo::Any => true,
            ServeTo::Trusted => {
                let peer = peer.to_string();
                self.trusted.contains(&peer)
            }
        }
    }

    /// The wire form.
    pub fn encode(&self) -> Vec<u8> {
        // Serialising plain data with string keys cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Parses and checks a received announcement.
    pub fn decode(bytes: &[u8]) -> Result<Self, AnnouncementError> {
        if bytes.len() > MAX_ANNOUNCEMENT_BYTES {
            return Err(AnnouncementError::TooLarge(bytes.len()));
        }
        let caps: Capabilities = serde_json::from_slice(bytes)
            .map_err(|e| AnnouncementError::Malformed(e.to_string()))?;
        caps.check()?;
        Ok(caps)
    }

    /// Checks the limits on lists and strings.
    pub fn check(&self) -> Result<(), AnnouncementError> {
        if self.models.len() > MAX_MODELS {
            return Err(AnnouncementError::OverLimits("too many models"));
        }
        if self.addrs.len() > MAX_ADDRS {
            return Err(AnnouncementError::OverLimits("too many addresses"));
        }
        if self.files.len() > MAX_MODELS * 4
            || self
                .files
                .iter()
                .any(|f| f.len() != 64 || !f.bytes().all(|b| b.is_ascii_hexdigit()))
        {
            return Err(AnnouncementError::OverLimits("bad file list"));
        }
        if self.stages.len() > MAX_MODELS
            || self.stages.iter().any(|s| {
                s.model.len() > MAX_FIELD_LEN
                    || s.sha256.len() != 64
                    || !s.sha256.bytes().all(|b| b.is_ascii_hexdigit())
                    || s.layers.start >= s.layers.end
                    || s.layers.end > s.total_layers
            })
        {
            return Err(AnnouncementError::OverLimits("bad stage list"));
        }
        if self.trusted.len() > MAX_TRUSTED
            || self.trusted.iter().any(|t| t.parse::<PeerId>().is_err())
        {
            return Err(AnnouncementError::OverLimits("bad trusted list"));
        }
        let long = |s: &str| s.len() > MAX_FIELD_LEN;
        if long(&self.agent) || long(&self.profile) || long(&self.hardware.device) {
            return Err(AnnouncementError::OverLimits("field too long"));
        }
        if self.addrs.iter().any(|a| long(a))
            || self
                .models
                .iter()
                .any(|m| long(&m.name) || long(&m.architecture) || long(&m.quantization))
        {
            return Err(AnnouncementError::OverLimits("field too long"));
        }
        if self.api.as_ref().is_some_and(|a| long(&a.version)) {
            return Err(AnnouncementError::OverLimits("field too long"));
        }
        Ok(())
    }

    /// Whether two announcements say the same thing, ignoring the sequence number.
    pub fn same_content(&self, other: &Capabilities) -> bool {
        Capabilities {
            seq: 0,
            ..self.clone()
        } == Capabilities {
            seq: 0,
            ..other.clone()
        }
    }
}

#[cfg(test)]
mod tests {
    use pod_inference::ModelKind;

    use super::*;

    fn sample() -> Capabilities {
        Capabilities {
            agent: "pod/0.1.0".into(),
            profile: "inference".into(),
            models: vec![ModelInfo {
                name: "smollm2-135m-instruct".into(),
                kind: ModelKind::Chat,
                architecture: "llama".into(),
                quantization: "Q4_1".into(),
                context_length: 8192,
                dimension: None,
            }],
            load: Load {
                queued: 1,
                active: 2,
                max_active: 8,
            },
            hardware: HardwareSummary {
                device: "cpu".into(),
                cpu_cores: 2,
                memory_bytes: 1 << 34,
            },
            api: Some(ApiInfo {
                version: "openai/v1".into(),
                ready: true,
            }),
            addrs: vec!["/ip4/127.0.0.1/tcp/4001".into()],
            files: vec!["ab".repeat(32)],
            stages: Vec::new(),
            serve_to: ServeTo::Any,
            trusted: Vec::new(),
            seq: 7,
        }
    }

    #[test]
    fn serve_to_is_optional_on_the_wire_and_trusted_pods_serve_only_their_list() {
        let open = sample();
        let wire = String::from_utf8(open.encode()).unwrap();
        assert!(
            !wire.contains("serve_to") && !wire.contains("trusted"),
            "{wire}"
        );
        let mut old: serde_json::Value = serde_json::from_str(&wire).unwrap();
        old.as_object_mut().unwrap().remove("serve_to");
        let decoded = Capabilities::decode(old.to_string().as_bytes()).unwrap();
        assert_eq!(decoded.serve_to, ServeTo::Any);
        assert!(decoded.serves(&PeerId::random()));

        let (friend, stranger) = (PeerId::random(), PeerId::random());
        let mut closed = sample();
        closed.serve_to = ServeTo::Trusted;
        closed.trusted = vec![friend.to_string()];
        let wire = String::from_utf8(closed.encode()).unwrap();
        assert!(wire.contains("\"serve_to\":\"trusted\""), "{wire}");
        let decoded = Capabilities::decode(wire.as_bytes()).unwrap();
        assert!(decoded.serves(&friend));
        assert!(!decoded.serves(&stranger));

        let mut bad = closed.clone();
        bad.trusted = vec!["not a peer id".into()];
        assert_eq!(
            Capabilities::decode(&bad.encode()),
            Err(AnnouncementError::OverLimits("bad trusted list"))
        );
        bad.trusted = vec![friend.to_string(); MAX_TRUSTED + 1];
        assert_eq!(
            Capabilities::decode(&bad.encode()),
            Err(AnnouncementError::OverLimits("bad trusted list"))
        );
    }

    #[test]
    fn round_trips() {
        let caps = sample();
        assert_eq!(Capabilities::decode(&caps.encode()), Ok(caps));
    }

    #[test]
    fn rejects_garbage_and_oversize() {
        assert!(matches!(
            Capabilities::decode(b"\x00\xffnot json"),
            Err(AnnouncementError::Malformed(_))
        ));
        assert!(matches!(
            Capabilities::decode(br#"{"agent": 5}"#),
            Err(AnnouncementError::Malformed(_))
        ));
        let big = vec![b' '; MAX_ANNOUNCEMENT_BYTES + 1];
        assert_eq!(
            Capabilities::decode(&big),
            Err(AnnouncementError::TooLarge(MAX_ANNOUNCEMENT_BYTES + 1))
        );
    }

    #[test]
    fn rejects_lists_over_limits() {
        let mut caps = sample();
        caps.addrs = vec!["/ip4/127.0.0.1/tcp/1".into(); MAX_ADDRS + 1];
        assert_eq!(
            Capabilities::decode(&caps.encode()),
            Err(AnnouncementError::OverLimits("too many addresses"))
        );
        let mut caps = sample();
        caps.models[0].name = "x".repeat(MAX_FIELD_LEN + 1);
        assert_eq!(
            Capabilities::decode(&caps.encode()),
            Err(AnnouncementError::OverLimits("field too long"))
        );
    }

    #[test]
    fn same_content_ignores_seq() {
        let a = sample();
        let mut b = sample();
        b.seq = 99;
        assert!(a.same_content(&b));
        b.load.active = 3;
        assert!(!a.same_content(&b));
    }
}
