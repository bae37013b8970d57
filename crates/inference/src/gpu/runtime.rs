//! The few device operations a decoder needs, behind one trait every GPU runtime implements:
//! memory (allocate, free, copy each way and within the device), kernel launches by name,
//! synchronisation, free memory and warp width.
//!
//! [`DeviceRuntime`] is the raw interface, shaped after `hipMalloc`/`cuMemAlloc`,
//! `hipMemcpyHtoD`/`cuMemcpyHtoD` and `hipModuleLaunchKernel`/`cuLaunchKernel`: device
//! addresses are plain `u64`s, and what a kernel does with them is the caller's contract.
//! [`DeviceBuffer`] owns one allocation (freed on drop) and gives bounds-checked copies and
//! [`DeviceSlice`]s, so that only kernel launches stay `unsafe`.
//!
//! [`emulator`] implements the trait for the CPU [`Emulator`](super::emulator::Emulator),
//! whose device memory is host memory; [`hip`] and [`cuda`] for a real device, opened by
//! ordinal with pod's kernels compiled for its architecture ([`OpenError`] says why one
//! cannot be).
//!
//! Unsafe code: the trait's memory and launch operations, and the calls [`DeviceBuffer`] makes
//! to them. Its invariants: a buffer's address and length are those its runtime allocated,
//! freed once on drop; every copy it makes is checked to lie inside it (and the source
//! buffer) first.
#![allow(unsafe_code)]

use std::fmt;
use std::sync::Arc;

use super::compile::{CompileError, UnknownTarget};
use super::kernels::{KernelArg, KernelSpec, KERNELS};
use super::library::LoadError;
use crate::error::ForwardError;
use crate::kernels::QuantFormat;

pub mod any;
pub mod cuda;
pub mod emulator;
pub mod hip;

/// A GPU runtime could not be opened on a device.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The vendor library is not installed, or is not the library it is named after.
    #[error(transparent)]
    Library(#[from] LoadError),
    /// The runtime loaded but sees no device.
    #[error("no {backend} device: {reason}")]
    NoDevice {
        /// `HIP` or `CUDA`.
        backend: &'static str,
        /// The runtime's reason.
        reason: String,
    },
    /// The ordinal asked for is past the devices there are.
    #[error("no {backend} device {ordinal}: there are {count}")]
    NoSuchDevice {
        /// `HIP` or `CUDA`.
        backend: &'static str,
        /// The device asked for.
        ordinal: usize,
        /// Devices the runtime sees.
        count: usize,
    },
    /// The device's architecture is one pod has no kernels for.
    #[error("{device}: {source}")]
    UnknownArch {
        /// The device's name.
        device: String,
        /// The architecture it reported.
        #[source]
        source: UnknownTarget,
    },
    /// The kernels could not be compiled for the device.
    #[error(transparent)]
    Compile(#[from] CompileError),
    /// A runtime call failed while setting the device up (context, module, kernels).
    #[error("{backend} device {ordinal}: {reason}")]
    Device {
        /// `HIP` or `CUDA`.
        backend: &'static str,
        /// The device.
        ordinal: usize,
        /// The failed call and its error.
        reason: String,
    },
}

/// The kernel named `name` in [`KERNELS`] and its position there, after checking that
/// `args` fill its parameters: a real device would read whatever a missing argument's slot
/// holds.
fn checked_kernel(
    name: &str,
    args: &[KernelArg],
) -> Result<(usize, &'static KernelSpec), RuntimeError> {
    let launch_error = |reason: String| RuntimeError::Launch {
        kernel: name.to_owned(),
        reason,
    };
    let index = KERNELS
        .iter()
        .position(|k| k.name == name)
        .ok_or_else(|| launch_error("no such kernel".into()))?;
    let spec = &KERNELS[index];
    spec.check(args).map_err(|e| launch_error(e.to_string()))?;
    Ok((index, spec))
}

/// Each argument's bytes as the kernel reads them, left-aligned in an 8-byte slot, for the
/// `void**` parameter array of `hipModuleLaunchKernel` and `cuLaunchKernel`.
fn arg_slots(args: &[KernelArg]) -> Vec<[u8; 8]> {
    args.iter()
        .map(|arg| {
            let mut slot = [0u8; 8];
            match *arg {
                KernelArg::Ptr(p) => slot = p.to_ne_bytes(),
                KernelArg::I32(v) => slot[..4].copy_from_slice(&v.to_ne_bytes()),
                KernelArg::F32(v) => slot[..4].copy_from_slice(&v.to_ne_bytes()),
            }
            slot
        })
        .collect()
}

/// A device operation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RuntimeError {
    /// The device could not allocate this many bytes.
    #[error("cannot allocate {bytes} bytes of device memory: {reason}")]
    Alloc {
        /// Bytes asked for.
        bytes: usize,
        /// The runtime's reason.
        reason: String,
    },
    /// A copy or slice reaches past the end of its buffer.
    #[error("{bytes} bytes at offset {offset} run past the end of a {len}-byte device buffer")]
    OutOfBounds {
        /// Where the access starts.
        offset: usize,
        /// Bytes accessed.
        bytes: usize,
        /// The buffer's size.
        len: usize,
    },
    /// A copy between host and device, or within the device, failed.
    #[error("device copy failed: {0}")]
    Copy(String),
    /// A kernel could not be launched, or failed while running.
    #[error("kernel {kernel} failed: {reason}")]
    Launch {
        /// The kernel.
        kernel: String,
        /// The runtime's reason.
        reason: String,
    },
    /// Waiting for the device's queued work failed.
    #[error("device synchronisation failed: {0}")]
    Sync(String),
    /// The runtime cannot tell how much memory is free.
    #[error("free device memory unknown: {0}")]
    MemoryInfo(String),
    /// A weight matrix is in a format no GPU kernel reads.
    #[error(
        "the GPU kernels do not read {} weights (run this model on the CPU with --device cpu)",
        super::check::format_name(.0.ggml())
    )]
    Format(QuantFormat),
}

impl From<RuntimeError> for ForwardError {
    fn from(e: RuntimeError) -> Self {
        ForwardError::Compute(e.to_string())
    }
}

/// A GPU runtime: the operations a decoder drives a device with.
///
/// Launches and copies may be queued and run later, in order, as on one HIP or CUDA stream;
/// [`synchronize`](Self::synchronize) waits for all of them. Copies to the host return once
/// the data is there.
pub trait DeviceRuntime: Send + Sync + 'static {
    /// Lanes per warp (wavefront): 32 or 64.
    fn warp(&self) -> u32;

    /// Bytes of device memory free now.
    fn free_memory(&self) -> Result<usize, RuntimeError>;

    /// Allocates `bytes` (more than 0) of device memory, aligned for any kernel argument,
    /// and returns its address. Prefer [`DeviceBuffer::new`], which frees it.
    fn alloc(&self, bytes: usize) -> Result<u64, RuntimeError>;

    /// Frees an allocation. Implementations must not let the memory be reused before queued
    /// work that uses it has finished (free in stream order, or wait for it).
    ///
    /// # Safety
    /// `ptr` came from [`alloc`](Self::alloc)`(bytes)` of this runtime, is freed once, and no
    /// queued or later work uses it.
    unsafe fn free(&self, ptr: u64, bytes: usize);

    /// Copies `src` to device address `dst`.
    ///
    /// # Safety
    /// `dst..dst + src.len()` lies inside one live allocation of this runtime.
    unsafe fn copy_to_device(&self, dst: u64, src: &[u8]) -> Result<(), RuntimeError>;

    /// Copies device memory at `src` into `dst`, after all queued work.
    ///
    /// # Safety
    /// `src..src + dst.len()` lies inside one live allocation of this runtime.
    unsafe fn copy_to_host(&self, dst: &mut [u8], src: u64) -> Result<(), RuntimeError>;

    /// Copies `bytes` from device address `src` to `dst`.
    ///
    /// # Safety
    /// Both ranges lie inside live allocations of this runtime and do not overlap.
    unsafe fn copy_on_device(&self, dst: u64, src: u64, bytes: usize) -> Result<(), RuntimeError>;

    /// Runs kernel `name` (one of [`KERNELS`](super::kernels::KERNELS)) over `grid` blocks of
    /// `block` threads with `shared_bytes` of dynamic shared memory.
    ///
    /// # Safety
    /// As on any GPU, the kernel trusts its arguments: every address must lie in a live
    /// allocation of this runtime holding everything the kernel reads or writes for these
    /// sizes and dimensions (see [`KERNELS`](super::kernels::KERNELS)).
    unsafe fn launch(
        &self,
        name: &str,
        grid: [u32; 3],
        block: [u32; 3],
        shared_bytes: u32,
        args: &[KernelArg],
    ) -> Result<(), RuntimeError>;

    /// Waits until every queued launch and copy has finished.
    fn synchronize(&self) -> Result<(), RuntimeError>;
}

/// One device allocation, freed when dropped.
pub struct DeviceBuffer<R: DeviceRuntime> {
    runtime: Arc<R>,
    ptr: u64,
    len: usize,
}

impl<R: DeviceRuntime> fmt::Debug for DeviceBuffer<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeviceBuffer")
            .field("ptr", &format_args!("{:#x}", self.ptr))
            .field("len", &self.len)
            .finish()
    }
}

/// A byte range of a [`DeviceBuffer`], as kernels receive it: an address and a length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceSlice {
    /// Its device address.
    pub ptr: u64,
    /// Its length in bytes.
    pub len: usize,
}

impl DeviceSlice {
    /// The address as a kernel argument.
    pub fn arg(self) -> KernelArg {
        KernelArg::Ptr(self.ptr)
    }
}

impl<R: DeviceRuntime> DeviceBuffer<R> {
    /// `len` bytes (at least one is allocated) of uninitialised device memory.
    pub fn new(runtime: &Arc<R>, len: usize) -> Result<Self, RuntimeError> {
        let ptr = runtime.alloc(len.max(1))?;
        Ok(Self {
            runtime: Arc::clone(runtime),
            ptr,
            len,
        })
    }

    /// A buffer holding `data`.
    pub fn from_slice<T: bytemuck::Pod>(
        runtime: &Arc<R>,
        data: &[T],
    ) -> Result<Self, RuntimeError> {
        let bytes: &[u8] = bytemuck::cast_slice(data);
        let mut buf = Self::new(runtime, bytes.len())?;
        buf.upload(0, bytes)?;
        Ok(buf)
    }

    /// Its length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether it holds no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The runtime it lives on.
    pub fn runtime(&self) -> &Arc<R> {
        &self.runtime
    }

    fn check(&self, offset: usize, bytes: usize) -> Result<(), RuntimeError> {
        match offset.checked_add(bytes) {
            Some(end) if end <= self.len => Ok(()),
            _ => Err(RuntimeError::OutOfBounds {
                offset,
                bytes,
                len: self.len,
            }),
        }
    }

    /// The whole buffer.
    pub fn all(&self) -> DeviceSlice {
        DeviceSlice {
            ptr: self.ptr,
            len: self.len,
        }
    }

    /// `bytes` bytes from `offset`.
    pub fn slice(&self, offset: usize, bytes: usize) -> Result<DeviceSlice, RuntimeError> {
        self.check(offset, bytes)?;
        Ok(DeviceSlice {
            ptr: self.ptr + offset as u64,
            len: bytes,
        })
    }

    /// Copies `data` into the buffer from byte `offset`.
    pub fn upload<T: bytemuck::Pod>(
        &mut self,
        offset: usize,
        data: &[T],
    ) -> Result<(), RuntimeError> {
        let bytes: &[u8] = bytemuck::cast_slice(data);
        self.check(offset, bytes.len())?;
        // SAFETY: the range was checked to lie inside this live allocation.
        unsafe { self.runtime.copy_to_device(self.ptr + offset as u64, bytes) }
    }

    /// Copies the buffer's bytes from `offset` into `out`, after all queued work.
    pub fn download<T: bytemuck::Pod>(
        &self,
        offset: usize,
        out: &mut [T],
    ) -> Result<(), RuntimeError> {
        let bytes: &mut [u8] = bytemuck::cast_slice_mut(out);
        self.check(offset, bytes.len())?;
        // SAFETY: the range was checked to lie inside this live allocation.
        unsafe { self.runtime.copy_to_host(bytes, self.ptr + offset as u64) }
    }

    /// Copies `bytes` bytes of `src` from `src_offset` into this buffer at `offset`.
    pub fn copy_from(
        &mut self,
        offset: usize,
        src: &DeviceBuffer<R>,
        src_offset: usize,
        bytes: usize,
    ) -> Result<(), RuntimeError> {
        self.check(offset, bytes)?;
        src.check(src_offset, bytes)?;
        if bytes == 0 {
            return Ok(());
        }
        // SAFETY: both ranges were checked to lie inside live allocations, which are distinct
        // (`self` is borrowed mutably, `src` shared), so they do not overlap.
        unsafe {
            self.runtime.copy_on_device(
                self.ptr + offset as u64,
                src.ptr + src_offset as u64,
                bytes,
            )
        }
    }
}

impl<R: DeviceRuntime> Drop for DeviceBuffer<R> {
    fn drop(&mut self) {
        // SAFETY: `ptr` came from `alloc(len.max(1))` in `new` and is freed only here, once
        // the buffer can no longer be named; the runtime keeps queued work ahead of reuse.
        unsafe { self.runtime.free(self.ptr, self.len.max(1)) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::kernels::Param;

    #[test]
    fn arguments_fill_8_byte_slots_as_kernels_read_them() {
        let slots = arg_slots(&[
            KernelArg::Ptr(0x1234_5678_9abc_def0),
            KernelArg::I32(-2),
            KernelArg::F32(1.5),
        ]);
        assert_eq!(slots[0], 0x1234_5678_9abc_def0u64.to_ne_bytes());
        assert_eq!(&slots[1][..4], &(-2i32).to_ne_bytes());
        assert_eq!(&slots[2][..4], &1.5f32.to_ne_bytes());
        assert_eq!(&slots[1][4..], &[0; 4]);
        assert_eq!(&slots[2][4..], &[0; 4]);
    }

    #[test]
    fn launches_are_checked_against_the_kernel_table_before_reaching_a_device() {
        let spec = &KERNELS[3];
        let args: Vec<KernelArg> = spec
            .params
            .iter()
            .map(|p| match p {
                Param::Ptr => KernelArg::Ptr(0),
                Param::I32 => KernelArg::I32(0),
                Param::F32 => KernelArg::F32(0.0),
            })
            .collect();
        let (index, found) = checked_kernel(spec.name, &args).unwrap();
        assert_eq!((index, found.name), (3, spec.name));

        let err = checked_kernel(spec.name, &args[1..]).unwrap_err();
        assert!(matches!(&err, RuntimeError::Launch { kernel, .. } if kernel == spec.name));
        assert!(err.to_string().contains("arguments"), "{err}");

        let err = checked_kernel("no_such_kernel", &args).unwrap_err();
        assert!(err.to_string().contains("no such kernel"), "{err}");
    }
}
