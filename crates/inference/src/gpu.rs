//! GPU inference on AMD (ROCm/HIP) and NVIDIA (CUDA) from one kernel source, with nothing of
//! either SDK needed to build pod.
//!
//! - [`kernels`]: the kernel source, written in the common subset of CUDA and HIP, and the
//!   short per-platform preambles (shuffles, integer dot products, warp width). Reductions work
//!   in logical 32-lane groups, so the logic that runs on a wave32 NVIDIA card is the logic
//!   that runs on a wave64 gfx906.
//! - [`emulator`]: runs that same source on the CPU (each lane a fiber, barriers for
//!   `__syncthreads` and shuffles) at warp widths 32 and 64, so tests without a GPU execute the
//!   real kernels and compare them with the CPU backend.
//! - [`hip`] and [`cuda`]: the vendor runtimes and runtime compilers, loaded with `dlopen` when
//!   first asked for, never linked.
//! - [`compile`]: kernel source to code objects for one target (`gfx906`, `sm_90`, ...), and
//!   the on-disk cache of compiled objects.
//! - [`library`]: where the vendor libraries are looked for, and why loading one failed.
//! - [`devices`]: which runtimes and devices are present, or why not.
//! - [`runtime`]: the device operations a decoder needs ([`DeviceRuntime`]), implemented for
//!   the emulator, HIP and CUDA (`runtime/`).
//! - [`decoder`]: the llama family and Gemma 3 on a [`DeviceRuntime`] ([`GpuDecoder`]), the
//!   CPU decoder's forward pass launched kernel by kernel, with per-sequence KV caches in
//!   device memory.
//! - [`synthetic`]: small random-weight models written as GGUF, with the shape and weight
//!   formats as parameters.
//! - [`check`]: each weight format's tiny model on a runtime against the CPU decoder (logit
//!   errors, the bound they must stay within, greedy tokens, speed), as one report.

pub mod check;
pub mod compile;
pub mod cuda;
pub mod decoder;
pub mod devices;
pub mod emulator;
pub mod hip;
pub mod kernels;
pub mod library;
pub mod runtime;
pub mod synthetic;

pub use decoder::{GpuCache, GpuDecoder};
pub use runtime::{DeviceBuffer, DeviceRuntime, RuntimeError};
