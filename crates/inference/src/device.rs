//! Choice of compute device: the `--device` setting ([`DeviceSpec`]) and what opening it gave
//! ([`Placement`]).
//!
//! ROCm and CUDA GPUs run chat models on pod's own GPU decoder
//! ([`GpuDecoder`](crate::gpu::GpuDecoder)); their runtimes are loaded when the device is
//! opened, so every build has them. candle's CUDA backend (cargo feature `cuda`) stays for
//! what the GPU decoder does not run.

use std::fmt;
use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;

use candle_core::Device;

use crate::error::LoadError;
use crate::gpu::compile::Compiler;
use crate::gpu::devices::{self, Backend};
use crate::gpu::emulator::Emulator;
use crate::gpu::runtime::any::AnyRuntime;
use crate::gpu::runtime::cuda::CudaRuntime;
use crate::gpu::runtime::hip::HipRuntime;

/// Warp width the emulator device runs at: the MI50's, the wider of the two.
const EMULATOR_WARP: u32 = 64;

/// Where models run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceSpec {
    /// The best device compiled in and present, else the CPU.
    #[default]
    Auto,
    /// The CPU.
    Cpu,
    /// An NVIDIA GPU through CUDA, by ordinal.
    Cuda(usize),
    /// An AMD GPU through ROCm (HIP), by ordinal.
    Rocm(usize),
    /// pod's GPU kernels executed on the CPU by the kernel emulator: for tests and for telling
    /// a kernel fault from a driver fault. Very slow.
    Emulator,
}

impl FromStr for DeviceSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (kind, ordinal) = match s.split_once(':') {
            Some((k, o)) => (
                k,
                o.parse::<usize>()
                    .map_err(|_| format!("bad device ordinal in `{s}`"))?,
            ),
            None => (s, 0),
        };
        match kind {
            "auto" => Ok(DeviceSpec::Auto),
            "cpu" => Ok(DeviceSpec::Cpu),
            "cuda" => Ok(DeviceSpec::Cuda(ordinal)),
            "rocm" => Ok(DeviceSpec::Rocm(ordinal)),
            "emulator" if ordinal == 0 => Ok(DeviceSpec::Emulator),
            _ => Err(format!(
                "unknown device `{s}` (expected auto, cpu, cuda[:N], rocm[:N] or emulator)"
            )),
        }
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceSpec::Auto => write!(f, "auto"),
            DeviceSpec::Cpu => write!(f, "cpu"),
            DeviceSpec::Cuda(n) => write!(f, "cuda:{n}"),
            DeviceSpec::Rocm(n) => write!(f, "rocm:{n}"),
            DeviceSpec::Emulator => write!(f, "emulator"),
        }
    }
}

/// What opening a [`DeviceSpec`] gave: the GPU that chat models go on, if any, and candle's
/// device for the rest.
#[derive(Debug, Clone)]
pub struct Placement {
    /// The GPU runtime chat models run on through pod's GPU decoder; `None`: the CPU (or
    /// candle's CUDA).
    pub gpu: Option<Arc<AnyRuntime>>,
    /// candle's device: embedding models, and chat models the GPU decoder does not run.
    pub candle: Device,
    /// Whether the device was named (`--device rocm`): then a chat model that cannot go on
    /// it fails to load. Under `auto` it loads on the CPU instead, with a log line saying why.
    pub strict: bool,
    /// Under `auto` with no GPU opened: which devices were tried and why each was not used
    /// (a runtime library not found, no device, a device that did not open). `None` when a
    /// GPU opened or none was asked for.
    pub fallback: Option<String>,
}

impl Placement {
    /// Everything on the CPU.
    pub fn cpu() -> Self {
        Self {
            gpu: None,
            candle: Device::Cpu,
            strict: false,
            fallback: None,
        }
    }

    /// The device chat models go on, as `--device` names it: `rocm:0`, `cuda:0`,
    /// `emulator` or `cpu`.
    pub fn name(&self) -> String {
        match (&self.gpu, &self.candle) {
            (Some(gpu), _) => gpu.spec(),
            (None, Device::Cuda(_)) => "cuda:0".to_owned(),
            (None, _) => "cpu".to_owned(),
        }
    }

    /// The device with its model and architecture, for logs.
    pub fn describe(&self) -> String {
        match &self.gpu {
            Some(gpu) => gpu.describe(),
            None => self.name(),
        }
    }
}

impl DeviceSpec {
    /// Opens the device: loads the GPU runtime and compiles pod's kernels for the device's
    /// architecture (code objects cached in `kernel_cache`, so later starts do not compile).
    /// A named device that cannot be opened is an error saying why; `auto` takes the first
    /// GPU that opens and otherwise the CPU, logging why no GPU was used.
    pub fn place(self, kernel_cache: &Path) -> Result<Placement, LoadError> {
        let strict = |gpu: AnyRuntime, candle: Device| Placement {
            gpu: Some(Arc::new(gpu)),
            candle,
            strict: true,
            fallback: None,
        };
        match self {
            DeviceSpec::Cpu => Ok(Placement::cpu()),
            DeviceSpec::Emulator => Emulator::compile_cached(EMULATOR_WARP, kernel_cache)
                .map(|e| strict(AnyRuntime::Emulator(e), Device::Cpu))
                .map_err(|e| LoadError::Device(format!("cannot build the kernel emulator: {e}"))),
            DeviceSpec::Rocm(n) => HipRuntime::open(&Compiler::new(), n, kernel_cache)
                .map(|r| strict(AnyRuntime::Hip(r), Device::Cpu))
                .map_err(|e| LoadError::Device(format!("cannot open rocm:{n}: {e}"))),
            DeviceSpec::Cuda(n) => CudaRuntime::open(&Compiler::new(), n, kernel_cache)
                .map(|r| strict(AnyRuntime::Cuda(r), candle_cuda(n)))
                .map_err(|e| LoadError::Device(format!("cannot open cuda:{n}: {e}"))),
            DeviceSpec::Auto => Ok(place_auto(kernel_cache)),
        }
    }
}

/// candle's CUDA device `n` when candle was built with CUDA and it opens, else the CPU.
fn candle_cuda(n: usize) -> Device {
    if candle_core::utils::cuda_is_available() {
        if let Ok(d) = Device::new_cuda(n) {
            return d;
        }
    }
    Device::Cpu
}

/// The first GPU that opens, HIP's before CUDA's; else the CPU, saying why.
fn place_auto(kernel_cache: &Path) -> Placement {
    let found = devices::discover();
    let mut why_not = Vec::new();
    for report in &found.backends {
        if let Some(e) = &report.unavailable {
            why_not.push(e.to_string());
        }
        for dev in &report.devices {
            let compiler = Compiler::new();
            let opened = match report.backend {
                Backend::Hip => HipRuntime::open(&compiler, dev.ordinal, kernel_cache)
                    .map(|r| (AnyRuntime::Hip(r), Device::Cpu)),
                Backend::Cuda => CudaRuntime::open(&compiler, dev.ordinal, kernel_cache)
                    .map(|r| (AnyRuntime::Cuda(r), candle_cuda(dev.ordinal))),
            };
            match opened {
                Ok((gpu, candle)) => {
                    return Placement {
                        gpu: Some(Arc::new(gpu)),
                        candle,
                        strict: false,
                        fallback: None,
                    }
                }
                Err(e) => {
                    let name = format!("{} device {} ({})", report.backend, dev.ordinal, dev.name);
                    tracing::warn!(device = %name, error = %e, "GPU did not open; trying the next");
                    why_not.push(format!("{name}: {e}"));
                }
            }
        }
    }
    let candle = candle_cuda(0);
    let fallback = fallback_reason(&why_not);
    tracing::info!(
        reasons = %fallback,
        "no GPU for pod's GPU decoder: chat models run on the {}",
        if candle.is_cpu() { "CPU" } else { "candle CUDA backend" }
    );
    Placement {
        gpu: None,
        candle,
        strict: false,
        fallback: Some(fallback),
    }
}

/// One line saying why `--device auto` used no GPU, from what each backend and device said.
fn fallback_reason(why_not: &[String]) -> String {
    if why_not.is_empty() {
        "--device auto found no GPU".to_owned()
    } else {
        format!("--device auto opened no GPU: {}", why_not.join("; "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_device_names() {
        assert_eq!("cpu".parse::<DeviceSpec>(), Ok(DeviceSpec::Cpu));
        assert_eq!("cuda:1".parse::<DeviceSpec>(), Ok(DeviceSpec::Cuda(1)));
        assert_eq!("auto".parse::<DeviceSpec>(), Ok(DeviceSpec::Auto));
        assert!("tpu".parse::<DeviceSpec>().is_err());
        assert!("cuda:x".parse::<DeviceSpec>().is_err());
    }

    #[test]
    fn parses_the_emulator_but_not_an_ordinal_for_it() {
        assert_eq!("emulator".parse::<DeviceSpec>(), Ok(DeviceSpec::Emulator));
        assert!("emulator:1".parse::<DeviceSpec>().is_err());
        assert_eq!(DeviceSpec::Emulator.to_string(), "emulator");
        assert_eq!(DeviceSpec::Rocm(1).to_string(), "rocm:1");
    }

    #[test]
    fn cpu_places_nothing_on_a_gpu() {
        let dir = tempfile::tempdir().unwrap();
        let p = DeviceSpec::Cpu.place(dir.path()).unwrap();
        assert!(p.gpu.is_none() && p.candle.is_cpu() && !p.strict);
        assert_eq!(p.name(), "cpu");
    }
}
