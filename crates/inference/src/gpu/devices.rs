//! Which GPU runtimes and devices are present, or why not.
//!
//! [`discover`] asks each backend in turn (HIP, then CUDA) and reports either its devices or
//! the one reason there are none: the library is not installed (and where it was looked for),
//! the kernel driver exposes no device, this user may not open the device node, or the runtime
//! failed to start. It never fails and never panics, so `pod device list` can always print it;
//! the report serializes to JSON for `--json`.

use std::io::ErrorKind;
use std::path::Path;

use super::compile::Target;
use super::cuda::{self, Cuda, Nvrtc};
use super::hip::{self, Hip, Hiprtc};
use super::library::LoadError;

/// A GPU backend pod can run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// AMD GPUs through ROCm's HIP runtime.
    Hip,
    /// NVIDIA GPUs through the CUDA driver API.
    Cuda,
}

impl std::fmt::Display for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Backend::Hip => "HIP",
            Backend::Cuda => "CUDA",
        })
    }
}

/// Why a backend has no usable device.
#[derive(Debug, Clone, thiserror::Error, serde::Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum DiscoveryError {
    /// The runtime library could not be loaded.
    #[error(transparent)]
    Library {
        /// What was tried and why it failed.
        #[from]
        source: LoadError,
    },
    /// The runtime loaded but there is no device to use.
    #[error("no {backend} device: {detail}")]
    NoDevice {
        /// The backend asked.
        backend: Backend,
        /// What says so.
        detail: String,
    },
    /// The device node exists but this user may not open it.
    #[error("permission denied on {path}: add the user running pod to the {groups} group(s)")]
    PermissionDenied {
        /// The device node.
        path: String,
        /// The groups that usually own it.
        groups: String,
    },
    /// The runtime failed to initialise or to describe a device.
    #[error("{backend} runtime failed: {message}")]
    RuntimeFailed {
        /// The backend asked.
        backend: Backend,
        /// The runtime's error.
        message: String,
    },
}

/// One device a backend can use.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct GpuDevice {
    /// The backend's ordinal for it.
    pub ordinal: usize,
    /// Marketing name.
    pub name: String,
    /// Architecture as the runtime reports it (`gfx906:sramecc+:xnack-`, `sm_90`).
    pub arch: String,
    /// The compile target for it; `None` when pod does not know the architecture.
    pub target: Option<String>,
    /// Device memory, bytes.
    pub memory_total: u64,
    /// Free device memory, bytes; `None` when it could not be asked.
    pub memory_free: Option<u64>,
    /// Compute units (AMD) or streaming multiprocessors (NVIDIA).
    pub multiprocessors: u32,
    /// Warp (wavefront) width.
    pub warp_size: u32,
}

/// What one backend found.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BackendReport {
    /// Which backend.
    pub backend: Backend,
    /// The runtime library loaded; `None` when none was found.
    pub library: Option<String>,
    /// The runtime's version (HIP: `hipRuntimeGetVersion`; CUDA: the CUDA version the
    /// driver supports).
    pub runtime_version: Option<String>,
    /// The driver's version (HIP: `hipDriverGetVersion`; CUDA: the kernel module's, from
    /// `/proc/driver/nvidia/version`).
    pub driver_version: Option<String>,
    /// The runtime compiler loaded (hiprtc, NVRTC), which kernels need; `None` when
    /// `compiler_error` says why not.
    pub compiler: Option<String>,
    /// Why no runtime compiler could be loaded.
    pub compiler_error: Option<String>,
    /// The devices found; empty when `unavailable` says why.
    pub devices: Vec<GpuDevice>,
    /// Why there are no devices.
    pub unavailable: Option<DiscoveryError>,
}

impl BackendReport {
    fn new(backend: Backend) -> Self {
        Self {
            backend,
            library: None,
            runtime_version: None,
            driver_version: None,
            compiler: None,
            compiler_error: None,
            devices: Vec::new(),
            unavailable: None,
        }
    }
}

/// What every backend found.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Discovery {
    /// One report per backend, HIP first.
    pub backends: Vec<BackendReport>,
}

/// Asks every backend for its devices.
pub fn discover() -> Discovery {
    Discovery {
        backends: vec![discover_hip(), discover_cuda()],
    }
}

/// What the HIP runtime finds.
pub fn discover_hip() -> BackendReport {
    let mut report = BackendReport::new(Backend::Hip);
    match Hiprtc::load() {
        Ok(rtc) => report.compiler = Some(rtc.path().display().to_string()),
        Err(e) => report.compiler_error = Some(e.to_string()),
    }
    let hip = match Hip::load() {
        Ok(hip) => hip,
        Err(e) => {
            report.unavailable = Some(e.into());
            return report;
        }
    };
    report.library = Some(hip.path().display().to_string());
    report.runtime_version = hip.runtime_version().ok().map(|v| v.to_string());
    report.driver_version = hip.driver_version().ok().map(|v| v.to_string());
    if let Err(e) = check_device_node(Path::new("/dev/kfd"), Backend::Hip, "render and video") {
        report.unavailable = Some(e);
        return report;
    }
    let failed = |e: hip::HipError| match e {
        hip::HipError::Call { code, .. } if code == hip::ERROR_NO_DEVICE => {
            DiscoveryError::NoDevice {
                backend: Backend::Hip,
                detail: e.to_string(),
            }
        }
        e => DiscoveryError::RuntimeFailed {
            backend: Backend::Hip,
            message: e.to_string(),
        },
    };
    let count = match hip.device_count() {
        Ok(count) => count,
        Err(e) => {
            report.unavailable = Some(failed(e));
            return report;
        }
    };
    list_devices(
        &mut report,
        count,
        |ordinal| {
            let props = hip.device_properties(ordinal)?;
            Ok(GpuDevice {
                ordinal,
                target: props
                    .base_arch()
                    .parse::<Target>()
                    .ok()
                    .map(|t| t.name().into()),
                memory_free: hip
                    .context(ordinal)
                    .and_then(|c| c.mem_info())
                    .ok()
                    .map(|(free, _)| free),
                name: props.name,
                arch: props.arch,
                memory_total: props.total_memory,
                multiprocessors: props.multiprocessors,
                warp_size: props.warp_size,
            })
        },
        failed,
        "the HIP runtime lists none",
    );
    report
}

/// What the CUDA driver finds.
pub fn discover_cuda() -> BackendReport {
    let mut report = BackendReport::new(Backend::Cuda);
    match Nvrtc::load() {
        Ok(rtc) => report.compiler = Some(rtc.path().display().to_string()),
        Err(e) => report.compiler_error = Some(e.to_string()),
    }
    let cuda = match Cuda::load() {
        Ok(cuda) => cuda,
        Err(e) => {
            report.unavailable = Some(e.into());
            return report;
        }
    };
    report.library = Some(cuda.path().display().to_string());
    report.runtime_version = cuda.driver_version().ok().map(cuda::version_string);
    report.driver_version = std::fs::read_to_string("/proc/driver/nvidia/version")
        .ok()
        .and_then(|text| nvidia_module_version(&text));
    if let Err(e) = check_device_node(Path::new("/dev/nvidiactl"), Backend::Cuda, "video") {
        report.unavailable = Some(e);
        return report;
    }
    let failed = |e: cuda::CudaError| match e {
        cuda::CudaError::Call { code, .. } if code == cuda::ERROR_NO_DEVICE => {
            DiscoveryError::NoDevice {
                backend: Backend::Cuda,
                detail: e.to_string(),
            }
        }
        e => DiscoveryError::RuntimeFailed {
            backend: Backend::Cuda,
            message: e.to_string(),
        },
    };
    let count = match cuda.init().and_then(|()| cuda.device_count()) {
        Ok(count) => count,
        Err(e) => {
            report.unavailable = Some(failed(e));
            return report;
        }
    };
    list_devices(
        &mut report,
        count,
        |ordinal| {
            let props = cuda.device_properties(ordinal)?;
            Ok(GpuDevice {
                ordinal,
                target: props.arch.parse::<Target>().ok().map(|t| t.name().into()),
                memory_free: cuda
                    .context(ordinal)
                    .and_then(|c| c.mem_info())
                    .ok()
                    .map(|(free, _)| free),
                name: props.name,
                arch: props.arch,
                memory_total: props.total_memory,
                multiprocessors: props.multiprocessors,
                warp_size: props.warp_size,
            })
        },
        failed,
        "the CUDA driver lists none",
    );
    report
}

/// Describes devices `0..count` into `report`: the first that cannot be described ends the
/// list with `failed`'s reason, and a backend with none is `NoDevice` saying `none`.
fn list_devices<E>(
    report: &mut BackendReport,
    count: usize,
    mut describe: impl FnMut(usize) -> Result<GpuDevice, E>,
    failed: impl Fn(E) -> DiscoveryError,
    none: &str,
) {
    for ordinal in 0..count {
        match describe(ordinal) {
            Ok(device) => report.devices.push(device),
            Err(e) => {
                report.unavailable = Some(failed(e));
                return;
            }
        }
    }
    if report.devices.is_empty() {
        report.unavailable = Some(DiscoveryError::NoDevice {
            backend: report.backend,
            detail: none.into(),
        });
    }
}

/// Whether this user can open a device node read-write, as the runtime will.
fn check_device_node(path: &Path, backend: Backend, groups: &str) -> Result<(), DiscoveryError> {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
    {
        Ok(_) => Ok(()),
        Err(e) => Err(device_node_error(
            path,
            e.kind(),
            backend,
            groups,
            &e.to_string(),
        )),
    }
}

fn device_node_error(
    path: &Path,
    kind: ErrorKind,
    backend: Backend,
    groups: &str,
    message: &str,
) -> DiscoveryError {
    match kind {
        ErrorKind::PermissionDenied => DiscoveryError::PermissionDenied {
            path: path.display().to_string(),
            groups: groups.into(),
        },
        ErrorKind::NotFound => DiscoveryError::NoDevice {
            backend,
            detail: format!(
                "{} does not exist (is the kernel driver loaded?)",
                path.display()
            ),
        },
        _ => DiscoveryError::RuntimeFailed {
            backend,
            message: format!("cannot open {}: {message}", path.display()),
        },
    }
}

/// The kernel module's version from `/proc/driver/nvidia/version`
/// ("NVRM version: NVIDIA UNIX x86_64 Kernel Module  550.54.14  Thu Feb 22 ...").
fn nvidia_module_version(text: &str) -> Option<String> {
    let line = text.lines().find(|l| l.starts_with("NVRM version"))?;
    let rest = line.split("Kernel Module").nth(1)?;
    rest.split_whitespace().next().map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_node_errors_say_what_to_do_in_one_line() {
        let path = Path::new("/dev/kfd");
        let denied = device_node_error(
            path,
            ErrorKind::PermissionDenied,
            Backend::Hip,
            "render and video",
            "",
        );
        assert_eq!(
            denied.to_string(),
            "permission denied on /dev/kfd: add the user running pod to the render and video group(s)"
        );
        let missing = device_node_error(
            path,
            ErrorKind::NotFound,
            Backend::Hip,
            "render and video",
            "",
        );
        assert_eq!(
            missing.to_string(),
            "no HIP device: /dev/kfd does not exist (is the kernel driver loaded?)"
        );
    }

    #[test]
    fn a_missing_device_node_is_no_device() {
        let err =
            check_device_node(Path::new("/nonexistent/kfd"), Backend::Hip, "render").unwrap_err();
        assert!(matches!(err, DiscoveryError::NoDevice { .. }), "{err}");
    }

    #[test]
    fn the_nvidia_module_version_is_read_from_proc() {
        let text = "NVRM version: NVIDIA UNIX x86_64 Kernel Module  550.54.14  Thu Feb 22 01:44:30 UTC 2024\nGCC version:  gcc version 12.2.0\n";
        assert_eq!(nvidia_module_version(text).as_deref(), Some("550.54.14"));
        assert_eq!(nvidia_module_version("garbage"), None);
    }

    #[test]
    fn discovery_never_fails_and_serializes_each_backend() {
        let discovery = discover();
        assert_eq!(discovery.backends.len(), 2);
        for report in &discovery.backends {
            // Either devices or the reason there are none, never neither.
            assert_eq!(
                report.devices.is_empty(),
                report.unavailable.is_some(),
                "{report:?}"
            );
            if let Some(reason) = &report.unavailable {
                assert!(!reason.to_string().contains('\n'), "{reason}");
            }
        }
        let json = serde_json::to_value(&discovery).unwrap();
        assert_eq!(json["backends"][0]["backend"], "hip");
        assert_eq!(json["backends"][1]["backend"], "cuda");
        let reason = &json["backends"][1]["unavailable"];
        assert!(reason.is_null() || reason["kind"].is_string(), "{reason}");
    }
}
