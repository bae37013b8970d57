//! The GPU targets kernels are compiled for, and which compiler versions know them.

use std::fmt;
use std::str::FromStr;

/// Whose compiler and runtime a target needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Vendor {
    /// AMD, through HIP and hiprtc.
    Amd,
    /// NVIDIA, through the CUDA driver and NVRTC.
    Nvidia,
}

/// One known target: its name, vendor, and for AMD the first ROCm release whose hiprtc
/// compiles for it (ROCm 5.2's hiprtc aborts the whole process on an architecture its LLVM
/// does not know, so this is checked before compiling, not left to the compiler).
struct Known {
    name: &'static str,
    vendor: Vendor,
    min_rocm: (u32, u32),
}

const fn amd(name: &'static str, min_rocm: (u32, u32)) -> Known {
    Known {
        name,
        vendor: Vendor::Amd,
        min_rocm,
    }
}

const fn nvidia(name: &'static str) -> Known {
    Known {
        name,
        vendor: Vendor::Nvidia,
        min_rocm: (0, 0),
    }
}

const KNOWN: &[Known] = &[
    amd("gfx900", (4, 0)),
    amd("gfx906", (4, 0)),
    amd("gfx908", (4, 0)),
    amd("gfx90a", (4, 3)),
    amd("gfx942", (5, 7)),
    amd("gfx950", (7, 0)),
    amd("gfx1030", (4, 0)),
    amd("gfx1100", (5, 4)),
    amd("gfx1101", (5, 4)),
    amd("gfx1102", (5, 4)),
    amd("gfx1200", (6, 3)),
    amd("gfx1201", (6, 3)),
    nvidia("sm_70"),
    nvidia("sm_75"),
    nvidia("sm_80"),
    nvidia("sm_86"),
    nvidia("sm_87"),
    nvidia("sm_89"),
    nvidia("sm_90"),
    nvidia("sm_100"),
    nvidia("sm_120"),
];

/// A GPU architecture kernels are compiled for (`gfx906`, `sm_90`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Target {
    index: usize,
}

/// A target name pod does not know.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown GPU target {given:?} (known: {})", Target::all().map(|t| t.name()).collect::<Vec<_>>().join(", "))]
pub struct UnknownTarget {
    /// The name given.
    pub given: String,
}

impl Target {
    /// Every known target.
    pub fn all() -> impl Iterator<Item = Target> {
        (0..KNOWN.len()).map(|index| Target { index })
    }

    /// Its name, as compilers and `gcnArchName` spell it (`gfx906`, `sm_90`).
    pub fn name(&self) -> &'static str {
        KNOWN[self.index].name
    }

    /// Whose toolchain builds for it.
    pub fn vendor(&self) -> Vendor {
        KNOWN[self.index].vendor
    }

    /// For AMD, the first ROCm (major, minor) whose hiprtc compiles for it.
    pub fn min_rocm(&self) -> Option<(u32, u32)> {
        (self.vendor() == Vendor::Amd).then_some(KNOWN[self.index].min_rocm)
    }

    /// For NVIDIA, the compute capability as NVRTC lists it (`90` for `sm_90`).
    pub fn compute_capability(&self) -> Option<u32> {
        self.name().strip_prefix("sm_")?.parse().ok()
    }
}

impl FromStr for Target {
    type Err = UnknownTarget;

    /// Parses a target name; AMD feature flags (`gfx906:sramecc+:xnack-`, as devices report
    /// their architecture) are accepted and dropped.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let base = s.trim().split(':').next().unwrap_or_default();
        KNOWN
            .iter()
            .position(|k| k.name.eq_ignore_ascii_case(base))
            .map(|index| Target { index })
            .ok_or_else(|| UnknownTarget { given: s.into() })
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_with_or_without_feature_flags() {
        let t: Target = "gfx906:sramecc+:xnack-".parse().unwrap();
        assert_eq!(t.name(), "gfx906");
        assert_eq!(t.vendor(), Vendor::Amd);
        let t: Target = "sm_90".parse().unwrap();
        assert_eq!(t.vendor(), Vendor::Nvidia);
        assert_eq!(t.compute_capability(), Some(90));
        assert_eq!(t.min_rocm(), None);
    }

    #[test]
    fn an_unknown_target_is_one_line_listing_the_known_ones() {
        let err = "gfx9999".parse::<Target>().unwrap_err();
        let msg = err.to_string();
        assert!(!msg.contains('\n'), "{msg}");
        assert!(msg.starts_with("unknown GPU target \"gfx9999\""), "{msg}");
        assert!(msg.contains("gfx906") && msg.contains("sm_90"), "{msg}");
    }
}
