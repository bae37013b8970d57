//! Work on one NVIDIA device: memory, modules, streams and kernel launches. The invariants its
//! `unsafe` code keeps are the parent module's.

#![allow(unsafe_code)]

use super::*;

/// Work on one device through its primary context, current on the thread that made it
/// (CUDA's current context is per thread). Releases the context on drop.
#[derive(Debug)]
pub struct Context<'c> {
    pub(super) cuda: &'c Cuda,
    pub(super) device: c_int,
    pub(super) _not_send: PhantomData<*const ()>,
}

impl<'c> Context<'c> {
    /// The device's ordinal.
    pub fn ordinal(&self) -> usize {
        usize::try_from(self.device).unwrap_or(0)
    }

    /// Free and total device memory, bytes.
    pub fn mem_info(&self) -> Result<(u64, u64), CudaError> {
        let (mut free, mut total) = (0usize, 0usize);
        // SAFETY: both are live usizes; this context is current.
        self.cuda.check("cuMemGetInfo", unsafe {
            (self.cuda.api.cuMemGetInfo_v2)(&mut free, &mut total)
        })?;
        Ok((free as u64, total as u64))
    }

    /// Allocates `len` bytes of device memory.
    pub fn alloc(&self, len: usize) -> Result<DeviceBuffer<'_>, CudaError> {
        let mut ptr = 0;
        // SAFETY: ptr is a live slot.
        self.cuda.check("cuMemAlloc", unsafe {
            (self.cuda.api.cuMemAlloc_v2)(&mut ptr, len.max(1))
        })?;
        Ok(DeviceBuffer {
            cuda: self.cuda,
            ptr,
            len,
            _context: PhantomData,
        })
    }

    /// Allocates a buffer holding a copy of `data`.
    pub fn upload<T: bytemuck::Pod>(&self, data: &[T]) -> Result<DeviceBuffer<'_>, CudaError> {
        let bytes: &[u8] = bytemuck::cast_slice(data);
        let mut buffer = self.alloc(bytes.len())?;
        buffer.copy_from_host(bytes)?;
        Ok(buffer)
    }

    /// Loads a cubin, fatbin, or NUL-terminated PTX (as [`super::compile`] makes).
    pub fn load_module(&self, code: &[u8]) -> Result<Module<'_>, CudaError> {
        let mut raw = std::ptr::null_mut();
        // SAFETY: raw is a live slot; code is readable for the whole call and the driver
        // copies what it needs. The driver checks the image's header; PTX must end in NUL,
        // which NVRTC's output does.
        self.cuda.check("cuModuleLoadData", unsafe {
            (self.cuda.api.cuModuleLoadData)(&mut raw, code.as_ptr().cast())
        })?;
        Ok(Module {
            cuda: self.cuda,
            raw,
            _context: PhantomData,
        })
    }

    /// A new stream on the device.
    pub fn stream(&self) -> Result<Stream<'_>, CudaError> {
        let mut raw = std::ptr::null_mut();
        // SAFETY: raw is a live slot; flags 0 is CU_STREAM_DEFAULT.
        self.cuda.check("cuStreamCreate", unsafe {
            (self.cuda.api.cuStreamCreate)(&mut raw, 0)
        })?;
        Ok(Stream {
            cuda: self.cuda,
            raw,
            _context: PhantomData,
        })
    }

    /// Launches `function` on `grid` blocks of `block` threads, with `shared_bytes` of
    /// dynamic shared memory, on `stream` (the default stream when `None`). Returns when the
    /// launch is queued.
    pub fn launch(
        &self,
        function: &Function<'_>,
        grid: [u32; 3],
        block: [u32; 3],
        shared_bytes: u32,
        stream: Option<&Stream<'_>>,
        args: &[KernelArg<'_>],
    ) -> Result<(), CudaError> {
        let mut values: Vec<[u8; 8]> = args.iter().map(KernelArg::bytes).collect();
        let mut pointers: Vec<*mut c_void> =
            values.iter_mut().map(|v| v.as_mut_ptr().cast()).collect();
        let stream = stream.map_or(std::ptr::null_mut(), |s| s.raw);
        // SAFETY: function came from a live module; pointers holds one pointer per kernel
        // parameter into `values`, which outlives the call; the driver copies the arguments
        // before returning. What the kernel does with them is device-side only.
        self.cuda.check("cuLaunchKernel", unsafe {
            (self.cuda.api.cuLaunchKernel)(
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

    /// Waits for all work queued in this context.
    pub fn synchronize(&self) -> Result<(), CudaError> {
        // SAFETY: no pointers.
        self.cuda.check("cuCtxSynchronize", unsafe {
            (self.cuda.api.cuCtxSynchronize)()
        })
    }
}

impl Drop for Context<'_> {
    fn drop(&mut self) {
        // SAFETY: the primary context was retained once by Cuda::context; everything made
        // in it borrowed this context and is gone.
        let _ = unsafe { (self.cuda.api.cuDevicePrimaryCtxRelease_v2)(self.device) };
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
            Self::Buffer(b) => out = b.ptr.to_ne_bytes(),
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
pub struct DeviceBuffer<'x> {
    cuda: &'x Cuda,
    ptr: DevicePtr,
    len: usize,
    _context: PhantomData<&'x Context<'x>>,
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
    pub fn copy_from_host(&mut self, data: &[u8]) -> Result<(), CudaError> {
        self.check_len(data.len())?;
        // SAFETY: the device buffer and `data` both hold self.len bytes.
        self.cuda.check("cuMemcpyHtoD", unsafe {
            (self.cuda.api.cuMemcpyHtoD_v2)(self.ptr, data.as_ptr().cast(), data.len())
        })
    }

    /// Copies the buffer (exactly `out`'s size) to the host, after all queued work.
    pub fn copy_to_host(&self, out: &mut [u8]) -> Result<(), CudaError> {
        self.check_len(out.len())?;
        // SAFETY: the device buffer and `out` both hold self.len bytes; out is writable.
        self.cuda.check("cuMemcpyDtoH", unsafe {
            (self.cuda.api.cuMemcpyDtoH_v2)(out.as_mut_ptr().cast(), self.ptr, out.len())
        })
    }

    /// Copies the buffer into a new vector of `T`.
    pub fn download<T: bytemuck::Pod>(&self) -> Result<Vec<T>, CudaError> {
        let mut out = vec![T::zeroed(); self.len / size_of::<T>().max(1)];
        self.copy_to_host(bytemuck::cast_slice_mut(&mut out))?;
        Ok(out)
    }

    fn check_len(&self, host: usize) -> Result<(), CudaError> {
        if host == self.len {
            Ok(())
        } else {
            Err(CudaError::SizeMismatch {
                host,
                device: self.len,
            })
        }
    }
}

impl Drop for DeviceBuffer<'_> {
    fn drop(&mut self) {
        // SAFETY: ptr came from cuMemAlloc and is freed only here, while its context lives.
        let _ = unsafe { (self.cuda.api.cuMemFree_v2)(self.ptr) };
    }
}

/// A module loaded in a context, unloaded on drop.
#[derive(Debug)]
pub struct Module<'x> {
    cuda: &'x Cuda,
    raw: RawModule,
    _context: PhantomData<&'x Context<'x>>,
}

impl Module<'_> {
    /// The kernel named `name` (its `extern "C"` name).
    pub fn function(&self, name: &str) -> Result<Function<'_>, CudaError> {
        let c_name = CString::new(name).map_err(|_| CudaError::InvalidName(name.into()))?;
        let mut raw = std::ptr::null_mut();
        // SAFETY: raw is a live slot, self.raw a loaded module, c_name NUL-terminated.
        self.cuda.check("cuModuleGetFunction", unsafe {
            (self.cuda.api.cuModuleGetFunction)(&mut raw, self.raw, c_name.as_ptr())
        })?;
        Ok(Function {
            cuda: self.cuda,
            raw,
            _module: PhantomData,
        })
    }
}

impl Drop for Module<'_> {
    fn drop(&mut self) {
        // SAFETY: raw came from cuModuleLoadData and is unloaded only here; functions borrow
        // the module, so none is left.
        let _ = unsafe { (self.cuda.api.cuModuleUnload)(self.raw) };
    }
}

/// A kernel of a loaded [`Module`].
#[derive(Debug)]
pub struct Function<'m> {
    cuda: &'m Cuda,
    raw: RawFunction,
    _module: PhantomData<&'m ()>,
}

impl Function<'_> {
    /// Registers per thread, as the driver loaded the kernel.
    pub fn registers(&self) -> Result<u32, CudaError> {
        self.attribute(FUNC_ATTRIBUTE_NUM_REGS)
    }

    /// Local memory per thread (stack and spills), bytes.
    pub fn local_bytes(&self) -> Result<u32, CudaError> {
        self.attribute(FUNC_ATTRIBUTE_LOCAL_SIZE_BYTES)
    }

    fn attribute(&self, attribute: c_int) -> Result<u32, CudaError> {
        let mut value = 0;
        // SAFETY: value is a live c_int; raw is a function of a live module.
        self.cuda.check("cuFuncGetAttribute", unsafe {
            (self.cuda.api.cuFuncGetAttribute)(&mut value, attribute, self.raw)
        })?;
        Ok(value.max(0).unsigned_abs())
    }
}

/// A queue of device work, destroyed on drop.
#[derive(Debug)]
pub struct Stream<'x> {
    cuda: &'x Cuda,
    raw: RawStream,
    _context: PhantomData<&'x Context<'x>>,
}

impl Stream<'_> {
    /// Waits for the work queued on this stream.
    pub fn synchronize(&self) -> Result<(), CudaError> {
        // SAFETY: raw is a live stream.
        self.cuda.check("cuStreamSynchronize", unsafe {
            (self.cuda.api.cuStreamSynchronize)(self.raw)
        })
    }
}

impl Drop for Stream<'_> {
    fn drop(&mut self) {
        // SAFETY: raw came from cuStreamCreate and is destroyed only here.
        let _ = unsafe { (self.cuda.api.cuStreamDestroy_v2)(self.raw) };
    }
}
