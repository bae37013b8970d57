//! Work on one AMD device: memory, modules, streams and kernel launches. The invariants its
//! `unsafe` code keeps are the parent module's.

#![allow(unsafe_code)]

use super::*;

/// Work on one device: memory, modules, launches. Bound to the thread that made it, since
/// HIP's current device is per thread.
#[derive(Debug)]
pub struct Context<'h> {
    pub(super) hip: &'h Hip,
    pub(super) device: c_int,
    pub(super) _not_send: PhantomData<*const ()>,
}

impl<'h> Context<'h> {
    /// The device's ordinal.
    pub fn ordinal(&self) -> usize {
        usize::try_from(self.device).unwrap_or(0)
    }

    /// Free and total device memory, bytes.
    pub fn mem_info(&self) -> Result<(u64, u64), HipError> {
        let (mut free, mut total) = (0usize, 0usize);
        // SAFETY: both are live usizes.
        self.hip.check("hipMemGetInfo", unsafe {
            (self.hip.api.hipMemGetInfo)(&mut free, &mut total)
        })?;
        Ok((free as u64, total as u64))
    }

    /// Allocates `len` bytes of device memory.
    pub fn alloc(&self, len: usize) -> Result<DeviceBuffer<'h>, HipError> {
        let mut ptr = std::ptr::null_mut();
        // SAFETY: ptr is a live pointer slot.
        self.hip.check("hipMalloc", unsafe {
            (self.hip.api.hipMalloc)(&mut ptr, len.max(1))
        })?;
        Ok(DeviceBuffer {
            hip: self.hip,
            ptr,
            len,
        })
    }

    /// Allocates a buffer holding a copy of `data`.
    pub fn upload<T: bytemuck::Pod>(&self, data: &[T]) -> Result<DeviceBuffer<'h>, HipError> {
        let bytes: &[u8] = bytemuck::cast_slice(data);
        let mut buffer = self.alloc(bytes.len())?;
        buffer.copy_from_host(bytes)?;
        Ok(buffer)
    }

    /// Loads a code object (as [`super::compile`] makes) onto the device.
    pub fn load_module(&self, code: &[u8]) -> Result<Module<'h>, HipError> {
        let mut raw = std::ptr::null_mut();
        // SAFETY: raw is a live slot; code is a readable buffer for the whole call, and the
        // runtime copies what it needs from it. The runtime checks the code object's header.
        self.hip.check("hipModuleLoadData", unsafe {
            (self.hip.api.hipModuleLoadData)(&mut raw, code.as_ptr().cast())
        })?;
        Ok(Module { hip: self.hip, raw })
    }

    /// A new stream on the device.
    pub fn stream(&self) -> Result<Stream<'h>, HipError> {
        let mut raw = std::ptr::null_mut();
        // SAFETY: raw is a live slot.
        self.hip.check("hipStreamCreate", unsafe {
            (self.hip.api.hipStreamCreate)(&mut raw)
        })?;
        Ok(Stream { hip: self.hip, raw })
    }

    /// Launches `function` on `grid` blocks of `block` threads, with `shared_bytes` of
    /// dynamic shared memory, on `stream` (the default stream when `None`). Returns when the
    /// launch is queued; synchronize the stream to wait for it.
    pub fn launch(
        &self,
        function: &Function<'_>,
        grid: [u32; 3],
        block: [u32; 3],
        shared_bytes: u32,
        stream: Option<&Stream<'_>>,
        args: &[KernelArg<'_>],
    ) -> Result<(), HipError> {
        let mut values: Vec<[u8; 8]> = args.iter().map(KernelArg::bytes).collect();
        let mut pointers: Vec<*mut c_void> =
            values.iter_mut().map(|v| v.as_mut_ptr().cast()).collect();
        let stream = stream.map_or(std::ptr::null_mut(), |s| s.raw);
        // SAFETY: function came from a live module (its lifetime says so); pointers holds
        // one pointer per kernel parameter into `values`, which outlives the call; the
        // runtime copies the arguments before returning. What the kernel does with them is
        // device-side only (see the module's invariants).
        self.hip.check("hipModuleLaunchKernel", unsafe {
            (self.hip.api.hipModuleLaunchKernel)(
                function.raw,
                grid[0],
                grid[1],
                grid[2],
                block[0],
                block[1],
                block[2],
                shared_bytes,
                stream,
                pointers.as_mut_ptr(),
                std::ptr::null_mut(),
            )
        })
    }

    /// Waits for all work queued on the device.
    pub fn synchronize(&self) -> Result<(), HipError> {
        // SAFETY: no pointers.
        self.hip.check("hipDeviceSynchronize", unsafe {
            (self.hip.api.hipDeviceSynchronize)()
        })
    }
}

/// One kernel argument: a device buffer or a plain value, as the kernel declares it.
#[derive(Debug, Clone, Copy)]
pub enum KernelArg<'a> {
    /// A pointer parameter (`float*`, `const int*`...).
    Buffer(&'a DeviceBuffer<'a>),
    /// `int`.
    I32(i32),
    /// `unsigned int`.
    U32(u32),
    /// `float`.
    F32(f32),
    /// `unsigned long long` / `size_t`.
    U64(u64),
}

impl KernelArg<'_> {
    /// The argument's bytes as the kernel reads them, left-aligned in an 8-byte slot.
    fn bytes(&self) -> [u8; 8] {
        let mut out = [0u8; 8];
        match *self {
            Self::Buffer(b) => out = (b.ptr as usize as u64).to_ne_bytes(),
            Self::I32(v) => out[..4].copy_from_slice(&v.to_ne_bytes()),
            Self::U32(v) => out[..4].copy_from_slice(&v.to_ne_bytes()),
            Self::F32(v) => out[..4].copy_from_slice(&v.to_ne_bytes()),
            Self::U64(v) => out = v.to_ne_bytes(),
        }
        out
    }
}

/// Device memory, freed on drop.
#[derive(Debug)]
pub struct DeviceBuffer<'h> {
    hip: &'h Hip,
    ptr: *mut c_void,
    len: usize,
}

impl DeviceBuffer<'_> {
    /// Size in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the buffer holds no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Copies `data` (exactly the buffer's size) to the device; returns when done.
    pub fn copy_from_host(&mut self, data: &[u8]) -> Result<(), HipError> {
        self.check_len(data.len())?;
        // SAFETY: the device buffer and `data` both hold self.len bytes.
        self.hip.check("hipMemcpy", unsafe {
            (self.hip.api.hipMemcpy)(
                self.ptr,
                data.as_ptr().cast(),
                data.len(),
                MEMCPY_HOST_TO_DEVICE,
            )
        })
    }

    /// Copies the buffer (exactly `out`'s size) to the host, after all queued work.
    pub fn copy_to_host(&self, out: &mut [u8]) -> Result<(), HipError> {
        self.check_len(out.len())?;
        // SAFETY: the device buffer and `out` both hold self.len bytes; out is writable.
        self.hip.check("hipMemcpy", unsafe {
            (self.hip.api.hipMemcpy)(
                out.as_mut_ptr().cast(),
                self.ptr,
                out.len(),
                MEMCPY_DEVICE_TO_HOST,
            )
        })
    }

    /// Copies the buffer into a new vector of `T`.
    pub fn download<T: bytemuck::Pod>(&self) -> Result<Vec<T>, HipError> {
        let mut out = vec![T::zeroed(); self.len / size_of::<T>().max(1)];
        self.copy_to_host(bytemuck::cast_slice_mut(&mut out))?;
        Ok(out)
    }

    fn check_len(&self, host: usize) -> Result<(), HipError> {
        if host == self.len {
            Ok(())
        } else {
            Err(HipError::SizeMismatch {
                host,
                device: self.len,
            })
        }
    }
}

impl Drop for DeviceBuffer<'_> {
    fn drop(&mut self) {
        // SAFETY: ptr came from hipMalloc and is freed only here. An error cannot be acted
        // on in drop and is ignored.
        let _ = unsafe { (self.hip.api.hipFree)(self.ptr) };
    }
}

/// A code object loaded on a device, unloaded on drop.
#[derive(Debug)]
pub struct Module<'h> {
    hip: &'h Hip,
    raw: RawModule,
}

impl Module<'_> {
    /// The kernel named `name` (its `extern "C"` name).
    pub fn function(&self, name: &str) -> Result<Function<'_>, HipError> {
        let c_name = CString::new(name).map_err(|_| HipError::InvalidName(name.into()))?;
        let mut raw = std::ptr::null_mut();
        // SAFETY: raw is a live slot, self.raw a loaded module, c_name NUL-terminated.
        self.hip.check("hipModuleGetFunction", unsafe {
            (self.hip.api.hipModuleGetFunction)(&mut raw, self.raw, c_name.as_ptr())
        })?;
        Ok(Function {
            raw,
            _module: PhantomData,
        })
    }
}

impl Drop for Module<'_> {
    fn drop(&mut self) {
        // SAFETY: raw came from hipModuleLoadData and is unloaded only here; functions
        // borrow the module, so none is left.
        let _ = unsafe { (self.hip.api.hipModuleUnload)(self.raw) };
    }
}

/// A kernel of a loaded [`Module`].
#[derive(Debug)]
pub struct Function<'m> {
    raw: RawFunction,
    _module: PhantomData<&'m ()>,
}

/// A queue of device work, destroyed on drop.
#[derive(Debug)]
pub struct Stream<'h> {
    hip: &'h Hip,
    raw: RawStream,
}

impl Stream<'_> {
    /// Waits for the work queued on this stream.
    pub fn synchronize(&self) -> Result<(), HipError> {
        // SAFETY: raw is a live stream.
        self.hip.check("hipStreamSynchronize", unsafe {
            (self.hip.api.hipStreamSynchronize)(self.raw)
        })
    }
}

impl Drop for Stream<'_> {
    fn drop(&mut self) {
        // SAFETY: raw came from hipStreamCreate and is destroyed only here.
        let _ = unsafe { (self.hip.api.hipStreamDestroy)(self.raw) };
    }
}
