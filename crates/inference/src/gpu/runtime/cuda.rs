//! [`DeviceRuntime`] on an NVIDIA GPU through the CUDA driver API: pod's kernels compiled for
//! the device's own compute capability (through the code cache), loaded once into the
//! device's primary context, launched on the default stream.
//!
//! CUDA's current context is per thread, while the runtime is shared between threads (the
//! engine drives it from its own). So [`CudaRuntime`] retains the primary context for its
//! whole life and makes it current at the start of every call (`cuCtxSetCurrent` only sets a
//! thread-local); the module and function handles belong to that context, usable from any
//! thread where it is current.
//!
//! Unsafe code: the handles shared between threads, and the trait's copies, frees and
//! launches. Its invariants: every call makes this runtime's context current first; the
//! module is unloaded and the context released once, in `Drop`, after all work is done
//! (buffers hold the runtime in an `Arc`, so none is left by then); launch arguments are
//! checked against [`KERNELS`] before their slots are handed to the driver; the address
//! ranges are the trait callers' contract.
#![allow(unsafe_code)]

use std::ffi::c_void;
use std::fmt;
use std::path::Path;

use super::{arg_slots, checked_kernel, DeviceRuntime, OpenError, RuntimeError};
use crate::gpu::compile::{CodeCache, Compiler, Target};
use crate::gpu::cuda::raw::{RawContextHandle, RawFunctionHandle, RawModuleHandle};
use crate::gpu::cuda::{Cuda, CudaError, ERROR_NO_DEVICE};
use crate::gpu::kernels::{self, KernelArg, Platform, KERNELS};

const BACKEND: &str = "CUDA";

/// One NVIDIA device, ready to run pod's kernels.
pub struct CudaRuntime {
    cuda: Cuda,
    context: RawContextHandle,
    ordinal: usize,
    name: String,
    target: Target,
    warp: u32,
    module: RawModuleHandle,
    /// One per entry of [`KERNELS`], in its order.
    functions: Vec<RawFunctionHandle>,
}

// SAFETY: see the module's invariants: the raw handles belong to the retained primary
// context, which every method makes current on the calling thread before using them; the
// driver API itself is thread-safe.
unsafe impl Send for CudaRuntime {}
// SAFETY: as for Send; no method hands out a reference into shared mutable state.
unsafe impl Sync for CudaRuntime {}

impl fmt::Debug for CudaRuntime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CudaRuntime")
            .field("ordinal", &self.ordinal)
            .field("name", &self.name)
            .field("target", &self.target)
            .field("warp", &self.warp)
            .finish_non_exhaustive()
    }
}

impl CudaRuntime {
    /// Opens device `ordinal` of the CUDA driver found where [`Cuda::load`] looks, compiling
    /// the kernels with `compiler` and keeping the cubins in `cache_dir`.
    pub fn open(compiler: &Compiler, ordinal: usize, cache_dir: &Path) -> Result<Self, OpenError> {
        Self::open_with(Cuda::load()?, compiler, ordinal, cache_dir)
    }

    /// As [`Self::open`] on an already loaded driver.
    pub fn open_with(
        cuda: Cuda,
        compiler: &Compiler,
        ordinal: usize,
        cache_dir: &Path,
    ) -> Result<Self, OpenError> {
        let no_device = |e: CudaError| OpenError::NoDevice {
            backend: BACKEND,
            reason: e.to_string(),
        };
        let count = match cuda.init().and_then(|()| cuda.device_count()) {
            Err(CudaError::Call { code, .. }) if code == ERROR_NO_DEVICE => 0,
            other => other.map_err(no_device)?,
        };
        if count == 0 {
            return Err(OpenError::NoDevice {
                backend: BACKEND,
                reason: "the driver sees none".into(),
            });
        }
        if ordinal >= count {
            return Err(OpenError::NoSuchDevice {
                backend: BACKEND,
                ordinal,
                count,
            });
        }
        let device_error = |e: CudaError| OpenError::Device {
            backend: BACKEND,
            ordinal,
            reason: e.to_string(),
        };
        let props = cuda.device_properties(ordinal).map_err(device_error)?;
        let target: Target = props
            .arch
            .parse()
            .map_err(|source| OpenError::UnknownArch {
                device: props.name.clone(),
                source,
            })?;
        let names: Vec<&str> = KERNELS.iter().map(|k| k.name).collect();
        let source = kernels::source(Platform::Cuda);
        let (compiled, cached) =
            compiler.compile_cached(&CodeCache::new(cache_dir), &source, &names, target)?;
        tracing::info!(
            device = %props.name, %target, cached, "pod kernels ready for CUDA device {ordinal}"
        );
        let context = cuda.retain_primary(ordinal).map_err(device_error)?;
        let loaded = cuda.set_current(context).and_then(|()| {
            let module = cuda.load_module_raw(&compiled.code)?;
            let functions = KERNELS
                .iter()
                .map(|k| cuda.function_raw(module, k.name))
                .collect::<Result<Vec<_>, _>>();
            match functions {
                Ok(functions) => Ok((module, functions)),
                Err(e) => {
                    // SAFETY: loaded just above in the current context; no function of it
                    // is used.
                    unsafe { cuda.unload_module(module) };
                    Err(e)
                }
            }
        });
        let (module, functions) = match loaded {
            Ok(loaded) => loaded,
            Err(e) => {
                // SAFETY: retained above; nothing made in it is left.
                unsafe { cuda.release_primary(context) };
                return Err(device_error(e));
            }
        };
        Ok(Self {
            cuda,
            context,
            ordinal,
            name: props.name,
            target,
            warp: props.warp_size,
            module,
            functions,
        })
    }

    /// The device's ordinal.
    pub fn ordinal(&self) -> usize {
        self.ordinal
    }

    /// The device's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The architecture the kernels were compiled for.
    pub fn target(&self) -> Target {
        self.target
    }

    fn current(&self) -> Result<(), CudaError> {
        self.cuda.set_current(self.context)
    }
}

impl DeviceRuntime for CudaRuntime {
    fn warp(&self) -> u32 {
        self.warp
    }

    fn free_memory(&self) -> Result<usize, RuntimeError> {
        let info = self.current().and_then(|()| self.cuda.mem_info());
        info.map(|(free, _)| free)
            .map_err(|e| RuntimeError::MemoryInfo(e.to_string()))
    }

    fn alloc(&self, bytes: usize) -> Result<u64, RuntimeError> {
        self.current()
            .and_then(|()| self.cuda.malloc(bytes.max(1)))
            .map_err(|e| RuntimeError::Alloc {
                bytes,
                reason: e.to_string(),
            })
    }

    unsafe fn free(&self, ptr: u64, _bytes: usize) {
        // Queued launches may still use the memory: wait for them before it can be reused.
        let done = self
            .current()
            .and_then(|()| self.cuda.context_synchronize());
        let freed = done.and_then(|()| {
            // SAFETY: the caller passes an address `alloc` returned, once, unused from now
            // on, and the work queued before has finished.
            unsafe { self.cuda.free(ptr) }
        });
        if let Err(e) = freed {
            tracing::warn!("freeing device memory: {e}");
        }
    }

    unsafe fn copy_to_device(&self, dst: u64, src: &[u8]) -> Result<(), RuntimeError> {
        self.current()
            // SAFETY: the caller keeps `dst..dst + src.len()` in a live allocation of this
            // context.
            .and_then(|()| unsafe { self.cuda.memcpy_htod(dst, src) })
            .map_err(|e| RuntimeError::Copy(e.to_string()))
    }

    unsafe fn copy_to_host(&self, dst: &mut [u8], src: u64) -> Result<(), RuntimeError> {
        self.current()
            // SAFETY: the caller keeps `src..src + dst.len()` in a live allocation of this
            // context.
            .and_then(|()| unsafe { self.cuda.memcpy_dtoh(dst, src) })
            .map_err(|e| RuntimeError::Copy(e.to_string()))
    }

    unsafe fn copy_on_device(&self, dst: u64, src: u64, bytes: usize) -> Result<(), RuntimeError> {
        self.current()
            // SAFETY: the caller keeps both ranges in live allocations, not overlapping.
            .and_then(|()| unsafe { self.cuda.memcpy_dtod(dst, src, bytes) })
            .map_err(|e| RuntimeError::Copy(e.to_string()))
    }

    unsafe fn launch(
        &self,
        name: &str,
        grid: [u32; 3],
        block: [u32; 3],
        shared_bytes: u32,
        args: &[KernelArg],
    ) -> Result<(), RuntimeError> {
        let (index, _) = checked_kernel(name, args)?;
        let mut slots = arg_slots(args);
        let mut params: Vec<*mut c_void> =
            slots.iter_mut().map(|s| s.as_mut_ptr().cast()).collect();
        self.current()
            // SAFETY: the function is this module's kernel `name`, in this context, made
            // current; `params` holds one pointer per parameter (checked against KERNELS) into
            // `slots`, which outlives the call; the addresses are the caller's contract.
            .and_then(|()| unsafe {
                self.cuda.launch_raw(
                    self.functions[index],
                    grid,
                    block,
                    shared_bytes,
                    &mut params,
                )
            })
            .map_err(|e| RuntimeError::Launch {
                kernel: name.to_owned(),
                reason: e.to_string(),
            })
    }

    fn synchronize(&self) -> Result<(), RuntimeError> {
        self.current()
            .and_then(|()| self.cuda.context_synchronize())
            .map_err(|e| RuntimeError::Sync(e.to_string()))
    }
}

impl Drop for CudaRuntime {
    fn drop(&mut self) {
        if self.current().is_ok() {
            let _ = self.cuda.context_synchronize();
            // SAFETY: loaded in this context in `open_with`, unloaded only here; no launch
            // can follow, since launches need the runtime.
            unsafe { self.cuda.unload_module(self.module) };
        }
        // SAFETY: retained in `open_with`, released only here; nothing made in it is left.
        unsafe { self.cuda.release_primary(self.context) };
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    #[test]
    fn a_missing_driver_is_one_line() {
        let err = Cuda::load_from(&[PathBuf::from("/nonexistent/libcuda.so.1")])
            .map_err(OpenError::from)
            .unwrap_err();
        let msg = err.to_string();
        assert!(!msg.contains('\n'), "{msg}");
        assert!(
            msg.contains("CUDA driver") && msg.contains("not found"),
            "{msg}"
        );
    }
}
