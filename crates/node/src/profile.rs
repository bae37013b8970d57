//! Profiles: which models and services a node runs, and how `auto` picks one for a machine.

use std::fmt;
use std::str::FromStr;

use pod_inference::gpu::devices::{self, Backend};
use pod_inference::DeviceSpec;

use crate::catalogue::{DEFAULT_CHAT_MODEL, DEFAULT_EMBEDDING_MODEL};

/// Below this much memory `auto` runs the relay profile: the default models need about 1 GiB
/// loaded, and a machine this small is better used as a front door to the mesh.
pub const RELAY_BELOW_BYTES: u64 = 2 << 30;

/// A set of capabilities, chosen with `pod start --profile`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Profile {
    /// Picks one of the others from the machine's hardware: see [`Profile::choose`].
    #[default]
    Auto,
    /// Every capability: chat and embedding models, relay server, storage.
    Full,
    /// Chat models on the best device.
    Inference,
    /// Embedding models.
    Embedding,
    /// No local models: the API fronts the mesh's models; relays for peers behind NAT.
    Relay,
    /// Serves model files to peers; no local inference.
    Storage,
}

/// What `auto` resolved to, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Choice {
    /// The profile that runs (never [`Profile::Auto`]).
    pub profile: Profile,
    /// Why, for a log line: empty when the profile was named explicitly.
    pub reason: String,
}

/// What the machine offers, as far as profiles care.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct HostResources {
    /// Memory available to this process: installed memory, or a smaller cgroup limit.
    /// `None`: unknown (not Linux, or `/proc` unreadable).
    pub memory_bytes: Option<u64>,
    /// Whether a GPU backend is compiled into this binary (always: the ROCm and CUDA
    /// runtimes are loaded when a device is opened).
    pub gpu_compiled: bool,
    /// The GPU found, e.g. `rocm:0`; `None`: no GPU runtime or no device.
    pub gpu: Option<String>,
}

impl HostResources {
    /// Looks at this machine: its memory, and the first GPU the device setting allows
    /// (`cpu` and `emulator` skip the probe; a probe loads the vendor runtime and lists its
    /// devices, compiling nothing).
    pub fn detect(device: DeviceSpec) -> HostResources {
        let wanted = |backend: Backend, ordinal: usize| match device {
            DeviceSpec::Auto => true,
            DeviceSpec::Rocm(n) => backend == Backend::Hip && ordinal == n,
            DeviceSpec::Cuda(n) => backend == Backend::Cuda && ordinal == n,
            DeviceSpec::Cpu | DeviceSpec::Emulator => false,
        };
        let gpu = match device {
            DeviceSpec::Cpu | DeviceSpec::Emulator => None,
            _ => devices::discover().backends.iter().find_map(|report| {
                report
                    .devices
                    .iter()
                    .find(|d| wanted(report.backend, d.ordinal))
                    .map(|d| match report.backend {
                        Backend::Hip => format!("rocm:{} ({})", d.ordinal, d.name),
                        Backend::Cuda => format!("cuda:{} ({})", d.ordinal, d.name),
                    })
            }),
        };
        HostResources {
            memory_bytes: memory_bytes(),
            gpu_compiled: true,
            gpu,
        }
    }
}

/// Memory this process may use: `MemTotal`, capped by a cgroup v2 `memory.max` (containers,
/// systemd `MemoryMax=`).
pub fn memory_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    let total = kib * 1024;
    let limit = std::fs::read_to_string("/sys/fs/cgroup/memory.max")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok());
    Some(limit.map_or(total, |l| l.min(total)))
}

/// Attention (KV) cache memory the engine gets when `--kv-memory` is not given: a quarter of
/// [`memory_bytes`]. That leaves the weights (a 4-bit 8B model takes about 5 GiB), the system
/// and other programs the rest, and on a 16 GiB machine still holds four full 8k-token
/// sequences of a 1B model (128 KiB per token in pod's f32 caches) or 88k tokens of
/// SmolLM2-135M. 4 GiB where the memory is unknown.
pub fn default_kv_memory() -> usize {
    memory_bytes()
        .and_then(|b| usize::try_from(b / 4).ok())
        .unwrap_or(4 << 30)
}

/// Bytes as GiB with one decimal, for messages.
pub fn gib(bytes: u64) -> String {
    format!("{:.1} GiB", bytes as f64 / f64::from(1u32 << 30))
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

    /// The profile that runs on `hw`: named profiles stand; `auto` takes relay below
    /// [`RELAY_BELOW_BYTES`] of memory, inference when a GPU backend is compiled in and a GPU
    /// opened, else full.
    pub fn choose(self, hw: &HostResources) -> Choice {
        if self != Profile::Auto {
            return Choice {
                profile: self,
                reason: String::new(),
            };
        }
        let memory = hw.memory_bytes.map(gib);
        if let Some(bytes) = hw.memory_bytes.filter(|b| *b < RELAY_BELOW_BYTES) {
            return Choice {
                profile: Profile::Relay,
                reason: format!(
                    "{} of memory is under {}: no local models, the API serves the mesh's",
                    gib(bytes),
                    gib(RELAY_BELOW_BYTES)
                ),
            };
        }
        let memory = memory.map_or("memory unknown".to_owned(), |m| format!("{m} of memory"));
        if let Some(gpu) = &hw.gpu {
            return Choice {
                profile: Profile::Inference,
                reason: format!("GPU {gpu} present and {memory}: chat models on the GPU"),
            };
        }
        let gpu = if hw.gpu_compiled {
            "no GPU found"
        } else {
            "no GPU backend compiled in"
        };
        Choice {
            profile: Profile::Full,
            reason: format!("{memory}, {gpu}: chat and embedding models on the CPU"),
        }
    }

    /// The models the profile loads when no `--model` is given.
    pub fn default_models(self) -> Vec<&'static str> {
        match self {
            Profile::Auto | Profile::Full => vec![DEFAULT_CHAT_MODEL, DEFAULT_EMBEDDING_MODEL],
            Profile::Inference => vec![DEFAULT_CHAT_MODEL],
            Profile::Embedding => vec![DEFAULT_EMBEDDING_MODEL],
            Profile::Relay | Profile::Storage => vec![],
        }
    }

    /// Whether the node serves its model files to peers (`/pod/blob/1.0.0`).
    pub fn serves_files(self) -> bool {
        matches!(self, Profile::Storage | Profile::Full)
    }

    /// Whether the node relays connections (circuit relay v2 server) for peers behind NAT.
    pub fn relays(self) -> bool {
        matches!(self, Profile::Relay | Profile::Full)
    }

    /// One line on what the profile is for.
    pub fn summary(self) -> &'static str {
        match self {
            Profile::Auto => "picks relay, inference or full from this machine's memory and GPU",
            Profile::Full => "chat and embedding models, relay server, model storage",
            Profile::Inference => "chat models on the best device",
            Profile::Embedding => "embedding models",
            Profile::Relay => "no local models: relay server, and the API fronts the mesh's models",
            Profile::Storage => "serves model files to peers; no local inference",
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn hw(gib: u64, gpu: Option<&str>) -> HostResources {
        HostResources {
            memory_bytes: Some(gib << 30),
            gpu_compiled: gpu.is_some(),
            gpu: gpu.map(str::to_owned),
        }
    }

    #[test]
    fn auto_picks_relay_on_small_machines() {
        let c = Profile::Auto.choose(&HostResources {
            memory_bytes: Some(1 << 30),
            ..HostResources::default()
        });
        assert_eq!(c.profile, Profile::Relay);
        assert!(c.reason.contains("1.0 GiB"), "{}", c.reason);
        // Even with a GPU: the models would not fit beside the OS.
        let small_gpu = HostResources {
            memory_bytes: Some(1 << 30),
            ..hw(1, Some("cuda:0"))
        };
        assert_eq!(Profile::Auto.choose(&small_gpu).profile, Profile::Relay);
    }

    #[test]
    fn auto_picks_inference_with_a_gpu_and_full_without() {
        let c = Profile::Auto.choose(&hw(32, Some("cuda:0")));
        assert_eq!(c.profile, Profile::Inference);
        assert!(c.reason.contains("cuda:0"), "{}", c.reason);
        let c = Profile::Auto.choose(&hw(32, None));
        assert_eq!(c.profile, Profile::Full);
        assert!(
            c.reason.contains("no GPU backend compiled in"),
            "{}",
            c.reason
        );
        let c = Profile::Auto.choose(&HostResources::default());
        assert_eq!(c.profile, Profile::Full);
        assert!(c.reason.contains("memory unknown"), "{}", c.reason);
    }

    #[test]
    fn named_profiles_stand() {
        for p in Profile::ALL.into_iter().filter(|p| *p != Profile::Auto) {
            let c = p.choose(&hw(1, None));
            assert_eq!(c.profile, p);
            assert!(c.reason.is_empty());
        }
    }

    #[test]
    fn parses_names_and_lists_them_in_errors() {
        assert_eq!("relay".parse::<Profile>(), Ok(Profile::Relay));
        let err = "gpu".parse::<Profile>().unwrap_err();
        assert!(err.contains("unknown profile `gpu`"), "{err}");
        assert!(err.contains("storage"), "{err}");
    }
}
