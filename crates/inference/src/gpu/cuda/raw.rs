//! Address-level device access for [`crate::gpu::runtime::cuda`]: the device's primary
//! context, memory as plain addresses and kernels as raw handles, with no lifetimes tying them
//! to a thread, so that a runtime shared between threads can hold them. Each call acts in the
//! calling thread's current context; the caller makes its context current first
//! ([`Cuda::set_current`]). The invariants its `unsafe` code keeps are the parent module's.

#![allow(unsafe_code)]

use super::*;

/// A retained primary context, released with [`Cuda::release_primary`].
#[derive(Debug, Clone, Copy)]
pub(crate) struct RawContextHandle {
    pub(crate) raw: RawContext,
    pub(crate) device: c_int,
}

/// A loaded module's handle, unloaded with [`Cuda::unload_module`].
#[derive(Debug, Clone, Copy)]
pub(crate) struct RawModuleHandle(pub(crate) RawModule);

/// A kernel's handle in a loaded module.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RawFunctionHandle(pub(crate) RawFunction);

impl Cuda {
    /// Retains device `ordinal`'s primary context (current on no thread yet).
    pub(crate) fn retain_primary(&self, ordinal: usize) -> Result<RawContextHandle, CudaError> {
        let device = self.device(ordinal)?;
        let mut raw = std::ptr::null_mut();
        // SAFETY: raw is a live slot.
        self.check("cuDevicePrimaryCtxRetain", unsafe {
            (self.api.cuDevicePrimaryCtxRetain)(&mut raw, device)
        })?;
        Ok(RawContextHandle { raw, device })
    }

    /// Releases a primary context.
    ///
    /// # Safety
    /// `context` came from [`Self::retain_primary`], is released once, and nothing made in
    /// it is used afterwards.
    pub(crate) unsafe fn release_primary(&self, context: RawContextHandle) {
        // SAFETY: the caller's contract. Nothing can be done about a failure here.
        let _ = unsafe { (self.api.cuDevicePrimaryCtxRelease_v2)(context.device) };
    }

    /// Makes `context` current on the calling thread.
    pub(crate) fn set_current(&self, context: RawContextHandle) -> Result<(), CudaError> {
        // SAFETY: the handle is a retained context (the caller holds it until release).
        self.check("cuCtxSetCurrent", unsafe {
            (self.api.cuCtxSetCurrent)(context.raw)
        })
    }

    /// Free and total memory of the current context's device, bytes.
    pub(crate) fn mem_info(&self) -> Result<(usize, usize), CudaError> {
        let (mut free, mut total) = (0usize, 0usize);
        // SAFETY: both are live usizes.
        self.check("cuMemGetInfo", unsafe {
            (self.api.cuMemGetInfo_v2)(&mut free, &mut total)
        })?;
        Ok((free, total))
    }

    /// Allocates `bytes` in the current context.
    pub(crate) fn malloc(&self, bytes: usize) -> Result<u64, CudaError> {
        let mut ptr = 0;
        // SAFETY: ptr is a live slot.
        self.check("cuMemAlloc", unsafe {
            (self.api.cuMemAlloc_v2)(&mut ptr, bytes)
        })?;
        Ok(ptr)
    }

    /// Frees an allocation.
    ///
    /// # Safety
    /// `ptr` came from [`Self::malloc`] in the current context, is freed once, and no
    /// queued work uses it.
    pub(crate) unsafe fn free(&self, ptr: u64) -> Result<(), CudaError> {
        // SAFETY: the caller's contract.
        self.check("cuMemFree", unsafe { (self.api.cuMemFree_v2)(ptr) })
    }

    /// Copies host memory to the device; returns when done.
    ///
    /// # Safety
    /// `dst..dst + src.len()` is live device memory of the current context.
    pub(crate) unsafe fn memcpy_htod(&self, dst: u64, src: &[u8]) -> Result<(), CudaError> {
        // SAFETY: the caller's contract; src is readable for its length.
        self.check("cuMemcpyHtoD", unsafe {
            (self.api.cuMemcpyHtoD_v2)(dst, src.as_ptr().cast(), src.len())
        })
    }

    /// Copies device memory to the host, after queued work; returns when done.
    ///
    /// # Safety
    /// `src..src + dst.len()` is live device memory of the current context.
    pub(crate) unsafe fn memcpy_dtoh(&self, dst: &mut [u8], src: u64) -> Result<(), CudaError> {
        // SAFETY: the caller's contract; dst is writable for its length.
        self.check("cuMemcpyDtoH", unsafe {
            (self.api.cuMemcpyDtoH_v2)(dst.as_mut_ptr().cast(), src, dst.len())
        })
    }

    /// Copies within device memory, in order with queued work.
    ///
    /// # Safety
    /// Both ranges are live device memory of the current context and do not overlap.
    pub(crate) unsafe fn memcpy_dtod(
        &self,
        dst: u64,
        src: u64,
        bytes: usize,
    ) -> Result<(), CudaError> {
        // SAFETY: the caller's contract.
        self.check("cuMemcpyDtoD", unsafe {
            (self.api.cuMemcpyDtoD_v2)(dst, src, bytes)
        })
    }

    /// Loads a cubin in the current context.
    pub(crate) fn load_module_raw(&self, code: &[u8]) -> Result<RawModuleHandle, CudaError> {
        let mut raw = std::ptr::null_mut();
        // SAFETY: raw is a live slot; code is readable for the whole call and the driver
        // copies what it needs; the driver checks the image's header.
        self.check("cuModuleLoadData", unsafe {
            (self.api.cuModuleLoadData)(&mut raw, code.as_ptr().cast())
        })?;
        Ok(RawModuleHandle(raw))
    }

    /// Unloads a module.
    ///
    /// # Safety
    /// `module` came from [`Self::load_module_raw`] in the current context, is unloaded
    /// once, and none of its functions is launched afterwards.
    pub(crate) unsafe fn unload_module(&self, module: RawModuleHandle) {
        // SAFETY: the caller's contract. Nothing can be done about a failure here.
        let _ = unsafe { (self.api.cuModuleUnload)(module.0) };
    }

    /// The kernel `name` of a loaded module.
    pub(crate) fn function_raw(
        &self,
        module: RawModuleHandle,
        name: &str,
    ) -> Result<RawFunctionHandle, CudaError> {
        let c_name = CString::new(name).map_err(|_| CudaError::InvalidName(name.into()))?;
        let mut raw = std::ptr::null_mut();
        // SAFETY: raw is a live slot, the module is loaded, c_name is NUL-terminated.
        self.check("cuModuleGetFunction", unsafe {
            (self.api.cuModuleGetFunction)(&mut raw, module.0, c_name.as_ptr())
        })?;
        Ok(RawFunctionHandle(raw))
    }

    /// Queues `function` on the default stream with `params`, one pointer per kernel
    /// parameter.
    ///
    /// # Safety
    /// `function` belongs to a module loaded in the current context; `params` points to one
    /// live value per kernel parameter, of its type; whatever addresses those values hold
    /// are live device memory large enough for the launch.
    pub(crate) unsafe fn launch_raw(
        &self,
        function: RawFunctionHandle,
        grid: [u32; 3],
        block: [u32; 3],
        shared_bytes: u32,
        params: &mut [*mut c_void],
    ) -> Result<(), CudaError> {
        // SAFETY: the caller's contract; the driver copies the arguments before returning.
        self.check("cuLaunchKernel", unsafe {
            (self.api.cuLaunchKernel)(
                function.0,
                grid[0],
                grid[1],
                grid[2],
                block[0],
                block[1],
                block[2],
                shared_bytes,
                std::ptr::null_mut(),
                params.as_mut_ptr(),
                std::ptr::null_mut(),
            )
        })
    }

    /// Waits for all work queued in the current context.
    pub(crate) fn context_synchronize(&self) -> Result<(), CudaError> {
        // SAFETY: no pointers.
        self.check("cuCtxSynchronize", unsafe { (self.api.cuCtxSynchronize)() })
    }
}
