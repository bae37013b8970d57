//! [`DeviceRuntime`] on an AMD GPU through HIP: pod's kernels compiled for the device's own
//! architecture (through the code cache), loaded once, launched on the default stream.
//!
//! HIP's current device is per thread, while the runtime is shared between threads (the
//! engine drives it from its own). So [`HipRuntime`] keeps the device's ordinal and makes it
//! current at the start of every call (`hipSetDevice` only sets a thread-local); module and
//! function handles are process-wide in HIP, valid from any thread for the device they were
//! loaded on.
//!
//! Unsafe code: the handles shared between threads, and the trait's copies, frees and
//! launches. Its invariants: every call makes this runtime's device current first; the
//! module is unloaded once, in `Drop`, after all work is done (buffers hold the runtime in an
//! `Arc`, so none is left by then); launch arguments are checked against [`KERNELS`] before
//! their slots are handed to HIP; the address ranges are the trait callers' contract.
#![allow(unsafe_code)]

use std::ffi::c_void;
use std::fmt;
use std::path::Path;

use super::{arg_slots, checked_kernel, DeviceRuntime, OpenError, RuntimeError};
use crate::gpu::compile::{CodeCache, Compiler, Target};
use crate::gpu::hip::raw::{MemcpyKind, RawFunctionHandle, RawModuleHandle};
use crate::gpu::hip::{Hip, HipError, ERROR_NO_DEVICE};
use crate::gpu::kernels::{self, KernelArg, Platform, KERNELS};

const BACKEND: &str = "HIP";

/// One AMD device, ready to run pod's kernels.
pub struct HipRuntime {
    hip: Hip,
    device: i32,
    ordinal: usize,
    name: String,
    target: Target,
    warp: u32,
    module: RawModuleHandle,
    /// One per entry of [`KERNELS`], in its order.
    functions: Vec<RawFunctionHandle>,
}

// SAFETY: see the module's invariants: the raw handles are process-wide HIP objects, and
// every method makes the device current on the calling thread before using them; the HIP
// runtime API itself is thread-safe.
unsafe impl Send for HipRuntime {}
// SAFETY: as for Send; no method hands out a reference into shared mutable state.
unsafe impl Sync for HipRuntime {}

impl fmt::Debug for HipRuntime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HipRuntime")
            .field("ordinal", &self.ordinal)
            .field("name", &self.name)
            .field("target", &self.target)
            .field("warp", &self.warp)
            .finish_non_exhaustive()
    }
}

impl HipRuntime {
    /// Opens device `ordinal` of the HIP runtime found where [`Hip::load`] looks, compiling
    /// the kernels with `compiler` and keeping the code objects in `cache_dir`.
    pub fn open(compiler: &Compiler, ordinal: usize, cache_dir: &Path) -> Result<Self, OpenError> {
        Self::open_with(Hip::load()?, compiler, ordinal, cache_dir)
    }

    /// As [`Self::open`] on an already loaded runtime.
    pub fn open_with(
        hip: Hip,
        compiler: &Compiler,
        ordinal: usize,
        cache_dir: &Path,
    ) -> Result<Self, OpenError> {
        let no_device = |e: HipError| OpenError::NoDevice {
            backend: BACKEND,
            reason: e.to_string(),
        };
        hip.init().map_err(no_device)?;
        let count = match hip.device_count() {
            Err(HipError::Call { code, .. }) if code == ERROR_NO_DEVICE => 0,
            other => other.map_err(no_device)?,
        };
        if count == 0 {
            return Err(OpenError::NoDevice {
                backend: BACKEND,
                reason: "the runtime sees none".into(),
            });
        }
        if ordinal >= count {
            return Err(OpenError::NoSuchDevice {
                backend: BACKEND,
                ordinal,
                count,
            });
        }
        let device_error = |e: HipError| OpenError::Device {
            backend: BACKEND,
            ordinal,
            reason: e.to_string(),
        };
        let props = hip.device_properties(ordinal).map_err(device_error)?;
        let target: Target = props
            .arch
            .parse()
            .map_err(|source| OpenError::UnknownArch {
                device: props.name.clone(),
                source,
            })?;
        let names: Vec<&str> = KERNELS.iter().map(|k| k.name).collect();
        let source = kernels::source(Platform::Hip);
        let (compiled, cached) =
            compiler.compile_cached(&CodeCache::new(cache_dir), &source, &names, target)?;
        tracing::info!(
            device = %props.name, %target, cached, "pod kernels ready for HIP device {ordinal}"
        );
        let device =
            i32::try_from(ordinal).map_err(|_| device_error(HipError::OutOfRange("device")))?;
        hip.set_device(device).map_err(device_error)?;
        let module = hip.load_module_raw(&compiled.code).map_err(device_error)?;
        let functions = KERNELS
            .iter()
            .map(|k| hip.function_raw(module, k.name))
            .collect::<Result<Vec<_>, _>>();
        let functions = match functions {
            Ok(f) => f,
            Err(e) => {
                // SAFETY: loaded just above, on the current device; no function of it is used.
                unsafe { hip.unload_module(module) };
                return Err(device_error(e));
            }
        };
        Ok(Self {
            hip,
            device,
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

    fn current(&self) -> Result<(), HipError> {
        self.hip.set_device(self.device)
    }
}

impl DeviceRuntime for HipRuntime {
    fn warp(&self) -> u32 {
        self.warp
    }

    fn free_memory(&self) -> Result<usize, RuntimeError> {
        let info = self.current().and_then(|()| self.hip.mem_info());
        info.map(|(free, _)| free)
            .map_err(|e| RuntimeError::MemoryInfo(e.to_string()))
    }

    fn alloc(&self, bytes: usize) -> Result<u64, RuntimeError> {
        self.current()
            .and_then(|()| self.hip.malloc(bytes.max(1)))
            .map_err(|e| RuntimeError::Alloc {
                bytes,
                reason: e.to_string(),
            })
    }

    unsafe fn free(&self, ptr: u64, _bytes: usize) {
        if self.current().is_ok() {
            // SAFETY: the caller passes an address `alloc` returned, once, unused from now on;
            // hipFree waits for the device's queued work before releasing it.
            if let Err(e) = unsafe { self.hip.free(ptr) } {
                tracing::warn!("freeing device memory: {e}");
            }
        }
    }

    unsafe fn copy_to_device(&self, dst: u64, src: &[u8]) -> Result<(), RuntimeError> {
        self.current()
            // SAFETY: the caller keeps `dst..dst + src.len()` in a live allocation of this
            // device; `src` is readable for its length.
            .and_then(|()| unsafe {
                self.hip.memcpy(
                    dst as usize as *mut c_void,
                    src.as_ptr().cast(),
                    src.len(),
                    MemcpyKind::HostToDevice,
                )
            })
            .map_err(|e| RuntimeError::Copy(e.to_string()))
    }

    unsafe fn copy_to_host(&self, dst: &mut [u8], src: u64) -> Result<(), RuntimeError> {
        self.current()
            // SAFETY: the caller keeps `src..src + dst.len()` in a live allocation of this
            // device; `dst` is writable for its length. hipMemcpy runs after queued work.
            .and_then(|()| unsafe {
                self.hip.memcpy(
                    dst.as_mut_ptr().cast(),
                    src as usize as *const c_void,
                    dst.len(),
                    MemcpyKind::DeviceToHost,
                )
            })
            .map_err(|e| RuntimeError::Copy(e.to_string()))
    }

    unsafe fn copy_on_device(&self, dst: u64, src: u64, bytes: usize) -> Result<(), RuntimeError> {
        self.current()
            // SAFETY: the caller keeps both ranges in live allocations, not overlapping.
            .and_then(|()| unsafe {
                self.hip.memcpy(
                    dst as usize as *mut c_void,
                    src as usize as *const c_void,
                    bytes,
                    MemcpyKind::DeviceToDevice,
                )
            })
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
            // SAFETY: the function is this module's kernel `name`, loaded on this device, made
            // current; `params` holds one pointer per parameter (checked against KERNELS) into
            // `slots`, which outlives the call; the addresses are the caller's contract.
            .and_then(|()| unsafe {
                self.hip.launch_raw(
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
            .and_then(|()| self.hip.device_synchronize())
            .map_err(|e| RuntimeError::Sync(e.to_string()))
    }
}

impl Drop for HipRuntime {
    fn drop(&mut self) {
        if self.current().is_ok() {
            let _ = self.hip.device_synchronize();
            // SAFETY: loaded on this device in `open_with`, unloaded only here; no launch can
            // follow, since launches need the runtime.
            unsafe { self.hip.unload_module(self.module) };
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    #[test]
    fn a_missing_runtime_is_one_line() {
        let err = Hip::load_from(&[PathBuf::from("/nonexistent/libamdhip64.so.6")])
            .map_err(OpenError::from)
            .unwrap_err();
        let msg = err.to_string();
        assert!(!msg.contains('\n'), "{msg}");
        assert!(
            msg.contains("HIP runtime") && msg.contains("not found"),
            "{msg}"
        );
    }

    #[test]
    fn a_runtime_without_a_device_says_so_in_one_line() {
        // Debian's ROCm 5.2 runtime loads on any machine; with no AMD GPU it sees no device.
        let path = PathBuf::from("libamdhip64.so.5");
        let Ok(hip) = Hip::load_from(&[path]) else {
            assert_ne!(
                std::env::var("POD_GPU_TOOLCHAINS").as_deref(),
                Ok("required"),
                "libamdhip64.so.5 is required"
            );
            return;
        };
        let dir = tempfile::tempdir().unwrap();
        let err = HipRuntime::open_with(hip, &Compiler::new(), 0, dir.path()).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, OpenError::NoDevice { .. }), "{msg}");
        assert!(!msg.contains('\n'), "{msg}");
        assert!(msg.starts_with("no HIP device"), "{msg}");
    }
}
