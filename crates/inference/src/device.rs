//! Choice of compute device.

use std::fmt;
use std::str::FromStr;

use candle_core::Device;

use crate::error::LoadError;

/// Where models run. Backends other than the CPU are compiled in with cargo features.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceSpec {
    /// The best device compiled in and present, else the CPU.
    #[default]
    Auto,
    /// The CPU.
    Cpu,
    /// An NVIDIA GPU through CUDA (feature `cuda`), by ordinal.
    Cuda(usize),
    /// An AMD GPU through ROCm; not yet available in this build.
    Rocm(usize),
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
            _ => Err(format!(
                "unknown device `{s}` (expected auto, cpu, cuda[:N] or rocm[:N])"
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
        }
    }
}

impl DeviceSpec {
    /// Opens the device, failing with a clear reason when the backend is missing.
    pub fn open(self) -> Result<Device, LoadError> {
        match self {
            DeviceSpec::Cpu => Ok(Device::Cpu),
            DeviceSpec::Auto => {
                if candle_core::utils::cuda_is_available() {
                    if let Ok(d) = Device::new_cuda(0) {
                        return Ok(d);
                    }
                }
                Ok(Device::Cpu)
            }
            DeviceSpec::Cuda(n) => {
                if !candle_core::utils::cuda_is_available() {
                    return Err(LoadError::Device(
                        "this pod was built without CUDA support (rebuild with `--features cuda`)"
                            .into(),
                    ));
                }
                Device::new_cuda(n)
                    .map_err(|e| LoadError::Device(format!("cannot open CUDA device {n}: {e}")))
            }
            DeviceSpec::Rocm(_) => Err(LoadError::Device(
                "this pod was built without ROCm support".into(),
            )),
        }
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
    fn rocm_is_a_clear_error() {
        let err = DeviceSpec::Rocm(0).open().err().map(|e| e.to_string());
        assert_eq!(
            err.as_deref(),
            Some("this pod was built without ROCm support")
        );
    }
}
