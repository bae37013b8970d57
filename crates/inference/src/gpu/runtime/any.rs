//! [`AnyRuntime`]: whichever runtime a model was placed on, as one type, so that the engine
//! drives one concrete [`GpuDecoder`](crate::gpu::GpuDecoder) whether it runs on HIP, CUDA or
//! the kernel emulator. Each call is passed to the runtime inside: one branch per launch,
//! nothing next to the launch itself.
//!
//! Unsafe code: the trait's `unsafe` methods, forwarded with the caller's guarantees
//! unchanged to the one runtime that made every address this runtime hands out.
#![allow(unsafe_code)]

use std::fmt;

use super::cuda::CudaRuntime;
use super::hip::HipRuntime;
use super::{DeviceRuntime, RuntimeError};
use crate::gpu::emulator::Emulator;
use crate::gpu::kernels::KernelArg;

/// A GPU runtime of any backend.
pub enum AnyRuntime {
    /// An AMD device through HIP.
    Hip(HipRuntime),
    /// An NVIDIA device through CUDA.
    Cuda(CudaRuntime),
    /// pod's kernels executed on the CPU (tests and diagnosis; slow).
    Emulator(Emulator),
}

impl fmt::Debug for AnyRuntime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.describe())
    }
}

impl AnyRuntime {
    /// The device as `pod device list` and the logs name it: `rocm:0 AMD Instinct MI50
    /// (gfx906)`, `cuda:0 NVIDIA H100 80GB HBM3 (sm_90)`, `emulator (warp 64)`.
    pub fn describe(&self) -> String {
        match self {
            AnyRuntime::Hip(r) => format!("rocm:{} {} ({})", r.ordinal(), r.name(), r.target()),
            AnyRuntime::Cuda(r) => format!("cuda:{} {} ({})", r.ordinal(), r.name(), r.target()),
            AnyRuntime::Emulator(e) => format!("emulator (warp {})", e.warp()),
        }
    }

    /// The short device name a `--device` flag takes: `rocm:0`, `cuda:1`, `emulator`.
    pub fn spec(&self) -> String {
        match self {
            AnyRuntime::Hip(r) => format!("rocm:{}", r.ordinal()),
            AnyRuntime::Cuda(r) => format!("cuda:{}", r.ordinal()),
            AnyRuntime::Emulator(_) => "emulator".to_owned(),
        }
    }
}

/// Passes one call to the runtime inside.
macro_rules! each {
    ($self:ident, $r:ident => $call:expr) => {
        match $self {
            AnyRuntime::Hip($r) => $call,
            AnyRuntime::Cuda($r) => $call,
            AnyRuntime::Emulator($r) => $call,
        }
    };
}

impl DeviceRuntime for AnyRuntime {
    fn warp(&self) -> u32 {
        each!(self, r => DeviceRuntime::warp(r))
    }

    fn free_memory(&self) -> Result<usize, RuntimeError> {
        each!(self, r => DeviceRuntime::free_memory(r))
    }

    fn alloc(&self, bytes: usize) -> Result<u64, RuntimeError> {
        each!(self, r => DeviceRuntime::alloc(r, bytes))
    }

    unsafe fn free(&self, ptr: u64, bytes: usize) {
        // SAFETY: the caller's guarantee, for the runtime that allocated `ptr`.
        each!(self, r => unsafe { DeviceRuntime::free(r, ptr, bytes) })
    }

    unsafe fn copy_to_device(&self, dst: u64, src: &[u8]) -> Result<(), RuntimeError> {
        // SAFETY: the caller's guarantee, for the runtime that allocated `dst`.
        each!(self, r => unsafe { DeviceRuntime::copy_to_device(r, dst, src) })
    }

    unsafe fn copy_to_host(&self, dst: &mut [u8], src: u64) -> Result<(), RuntimeError> {
        // SAFETY: the caller's guarantee, for the runtime that allocated `src`.
        each!(self, r => unsafe { DeviceRuntime::copy_to_host(r, dst, src) })
    }

    unsafe fn copy_on_device(&self, dst: u64, src: u64, bytes: usize) -> Result<(), RuntimeError> {
        // SAFETY: the caller's guarantee, for the runtime that allocated both.
        each!(self, r => unsafe { DeviceRuntime::copy_on_device(r, dst, src, bytes) })
    }

    unsafe fn launch(
        &self,
        name: &str,
        grid: [u32; 3],
        block: [u32; 3],
        shared_bytes: u32,
        args: &[KernelArg],
    ) -> Result<(), RuntimeError> {
        // SAFETY: the caller's guarantee, for the runtime that allocated every address.
        each!(self, r => unsafe { DeviceRuntime::launch(r, name, grid, block, shared_bytes, args) })
    }

    fn synchronize(&self) -> Result<(), RuntimeError> {
        each!(self, r => DeviceRuntime::synchronize(r))
    }
}
