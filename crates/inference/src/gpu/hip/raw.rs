//! Address-level device access for [`crate::gpu::runtime::hip`]: device memory as plain
//! addresses and kernels as raw handles, with no lifetimes tying them to a thread, so that a
//! runtime shared between threads can hold them. Each call acts on the calling thread's
//! current device; the caller makes its device current first ([`Hip::set_device`]). The
//! invariants its `unsafe` code keeps are the parent module's.

#![allow(unsafe_code)]

use super::*;

/// `hipMemcpyDeviceToDevice`.
const MEMCPY_DEVICE_TO_DEVICE: c_int = 3;

/// A loaded module's handle, unloaded with [`Hip::unload_module`].
#[derive(Debug, Clone, Copy)]
pub(crate) struct RawModuleHandle(pub(crate) RawModule);

/// A kernel's handle in a loaded module.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RawFunctionHandle(pub(crate) RawFunction);

impl Hip {
    /// Makes device `ordinal` current on the calling thread.
    pub(crate) fn set_device(&self, ordinal: c_int) -> Result<(), HipError> {
        // SAFETY: no pointers.
        self.check("hipSetDevice", unsafe { (self.api.hipSetDevice)(ordinal) })
    }

    /// Free and total memory of the current device, bytes.
    pub(crate) fn mem_info(&self) -> Result<(usize, usize), HipError> {
        let (mut free, mut total) = (0usize, 0usize);
        // SAFETY: both are live usizes.
        self.check("hipMemGetInfo", unsafe {
            (self.api.hipMemGetInfo)(&mut free, &mut total)
        })?;
        Ok((free, total))
    }

    /// Allocates `bytes` on the current device.
    pub(crate) fn malloc(&self, bytes: usize) -> Result<u64, HipError> {
        let mut ptr = std::ptr::null_mut();
        // SAFETY: ptr is a live pointer slot.
        self.check("hipMalloc", unsafe {
            (self.api.hipMalloc)(&mut ptr, bytes)
        })?;
        Ok(ptr as usize as u64)
    }

    /// Frees an allocation; `hipFree` waits for the device's queued work first.
    ///
    /// # Safety
    /// `ptr` came from [`Self::malloc`] and is freed once.
    pub(crate) unsafe fn free(&self, ptr: u64) -> Result<(), HipError> {
        // SAFETY: the caller's contract.
        self.check("hipFree", unsafe {
            (self.api.hipFree)(ptr as usize as *mut c_void)
        })
    }

    /// Copies `src` to device address `dst`, or between device addresses, or device to host:
    /// `hipMemcpy` of `kind`, which returns when the copy is done.
    ///
    /// # Safety
    /// `dst..dst + bytes` and `src..src + bytes` are live memory of the kind `kind` names,
    /// writable at `dst`, not overlapping.
    pub(crate) unsafe fn memcpy(
        &self,
        dst: *mut c_void,
        src: *const c_void,
        bytes: usize,
        kind: MemcpyKind,
    ) -> Result<(), HipError> {
        let kind = match kind {
            MemcpyKind::HostToDevice => MEMCPY_HOST_TO_DEVICE,
            MemcpyKind::DeviceToHost => MEMCPY_DEVICE_TO_HOST,
            MemcpyKind::DeviceToDevice => MEMCPY_DEVICE_TO_DEVICE,
        };
        // SAFETY: the caller's contract.
        self.check("hipMemcpy", unsafe {
            (self.api.hipMemcpy)(dst, src, bytes, kind)
        })
    }

    /// Loads a code object onto the current device.
    pub(crate) fn load_module_raw(&self, code: &[u8]) -> Result<RawModuleHandle, HipError> {
        let mut raw = std::ptr::null_mut();
        // SAFETY: raw is a live slot; code is readable for the whole call and the runtime
        // copies what it needs. The runtime checks the code object's header.
        self.check("hipModuleLoadData", unsafe {
            (self.api.hipModuleLoadData)(&mut raw, code.as_ptr().cast())
        })?;
        Ok(RawModuleHandle(raw))
    }

    /// Unloads a module.
    ///
    /// # Safety
    /// `module` came from [`Self::load_module_raw`], is unloaded once, and none of its
    /// functions is launched afterwards.
    pub(crate) unsafe fn unload_module(&self, module: RawModuleHandle) {
        // SAFETY: the caller's contract. Nothing can be done about a failure here.
        let _ = unsafe { (self.api.hipModuleUnload)(module.0) };
    }

    /// The kernel `name` of a loaded module.
    pub(crate) fn function_raw(
        &self,
        module: RawModuleHandle,
        name: &str,
    ) -> Result<RawFunctionHandle, HipError> {
        let c_name = CString::new(name).map_err(|_| HipError::InvalidName(name.into()))?;
        let mut raw = std::ptr::null_mut();
        // SAFETY: raw is a live slot, the module is loaded (the caller holds it), c_name is
        // NUL-terminated.
        self.check("hipModuleGetFunction", unsafe {
            (self.api.hipModuleGetFunction)(&mut raw, module.0, c_name.as_ptr())
        })?;
        Ok(RawFunctionHandle(raw))
    }

    /// Queues `function` on the default stream with `params`, one pointer per kernel
    /// parameter.
    ///
    /// # Safety
    /// `function` belongs to a loaded module of the current device; `params` points to one
    /// live value per kernel parameter, of its type; whatever addresses those values hold are
    /// live device memory large enough for the launch.
    pub(crate) unsafe fn launch_raw(
        &self,
        function: RawFunctionHandle,
        grid: [u32; 3],
        block: [u32; 3],
        shared_bytes: u32,
        params: &mut [*mut c_void],
    ) -> Result<(), HipError> {
        // SAFETY: the caller's contract; the runtime copies the arguments before returning.
        self.check("hipModuleLaunchKernel", unsafe {
            (self.api.hipModuleLaunchKernel)(
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

    /// Waits for all work queued on the current device.
    pub(crate) fn device_synchronize(&self) -> Result<(), HipError> {
        // SAFETY: no pointers.
        self.check("hipDeviceSynchronize", unsafe {
            (self.api.hipDeviceSynchronize)()
        })
    }
}

/// Which way a [`Hip::memcpy`] copies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum MemcpyKind {
    /// Host memory to device memory.
    HostToDevice,
    /// Device memory to host memory.
    DeviceToHost,
    /// Within device memory.
    DeviceToDevice,
}
