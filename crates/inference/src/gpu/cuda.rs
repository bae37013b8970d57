//! The CUDA driver API and NVRTC, loaded at run time.
//!
//! `libcuda.so.1` (installed with the NVIDIA driver) and `libnvrtc` (from a CUDA toolkit, or
//! PyPI's `nvidia-cuda-nvrtc-cu12` wheel) are opened with `dlopen` when first asked for
//! ([`Cuda::load`], [`Nvrtc::load`]); nothing of CUDA is needed to build pod. Where the
//! libraries are looked for is in [`super::library`]: `POD_CUDA_PATH` and `POD_NVRTC_PATH`
//! name a file or directory to use first.
//!
//! # Why not `cudarc`
//! cudarc's `dynamic-loading` feature loads these libraries at run time too, but it fixes the
//! CUDA version when pod is built (a `cuda-XXXXX` feature, or `nvcc --version` in its build
//! script), and derives the library names it tries from it, so a binary built for 12.x does not
//! find `libnvrtc.so.13`. It panics where a library or a symbol is missing (`culib()` and its
//! symbol table `expect` them), where pod must report "no CUDA" and go on with the CPU, and
//! it finds libraries only through the loader path, with no way to name a file. The two dozen
//! functions pod needs are written out here instead, each looked up with an error, not a
//! panic, and the CUDA version is whatever the loaded driver and NVRTC report.
//!
//! # Invariants of the unsafe code
//! - Every function pointer comes from [`Library::get`] on the library named in its table and
//!   is declared with the signature of `cuda.h` / `nvrtc.h`. The versioned names (`_v2`) are
//!   those `cuda.h` maps the plain names to since CUDA 4/10, with 64-bit sizes and pointers.
//!   A table lives in the same struct as the [`Library`] it came from and never leaves it.
//! - Every out-pointer handed to CUDA points to a live, writable local of the declared type,
//!   and every length passed with a pointer is that buffer's length.
//! - A [`Context`] retains the device's primary context and releases it on drop; buffers,
//!   modules and streams borrow the context, so they are freed (once, in `Drop`) before it is
//!   released.
//! - A kernel launched through [`Context::launch`] gets device pointers and plain values
//!   copied into a local array; a mismatch with its parameters can fault the device, reported
//!   by the next call, but cannot touch this process's memory.

#![allow(unsafe_code)]

use std::ffi::{c_char, c_int, c_uint, c_void, CStr, CString};
use std::fmt;
use std::marker::PhantomData;
use std::path::{Path, PathBuf};

use libloading::Library;

use super::library::{
    c_string, first_error_line, loader_message, open_first, LibrarySearch, LoadError,
};

type Status = c_int;
type DevicePtr = u64;
type RawContext = *mut c_void;
type RawModule = *mut c_void;
type RawFunction = *mut c_void;
type RawStream = *mut c_void;
type RawProgram = *mut c_void;

const CUDA_SUCCESS: Status = 0;
/// `CUDA_ERROR_NO_DEVICE`.
pub const ERROR_NO_DEVICE: i32 = 100;
/// `CUDA_ERROR_INSUFFICIENT_DRIVER`.
pub const ERROR_INSUFFICIENT_DRIVER: i32 = 35;
const ATTRIBUTE_WARP_SIZE: c_int = 10;
const ATTRIBUTE_MULTIPROCESSOR_COUNT: c_int = 16;
const ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR: c_int = 75;
const ATTRIBUTE_COMPUTE_CAPABILITY_MINOR: c_int = 76;
const FUNC_ATTRIBUTE_LOCAL_SIZE_BYTES: c_int = 3;
const FUNC_ATTRIBUTE_NUM_REGS: c_int = 4;

/// Declares a table of function pointers and its loader; each field is named after the C
/// function it is looked up as.
macro_rules! api_table {
    ($(#[$meta:meta])* struct $name:ident { $($field:ident: fn($($arg:ty),*) -> $ret:ty,)* }) => {
        $(#[$meta])*
        #[allow(non_snake_case)]
        #[derive(Debug)]
        struct $name { $($field: unsafe extern "C" fn($($arg),*) -> $ret,)* }

        impl $name {
            /// # Safety
            /// `lib` must be the library this table describes, exporting each field's
            /// function with the declared signature.
            unsafe fn load(lib: &Library, what: &'static str, path: &Path) -> Result<Self, LoadError> {
                Ok(Self { $($field: {
                    let name = concat!(stringify!($field), "\0").as_bytes();
                    // SAFETY: the caller guarantees the symbol has this signature.
                    let symbol = unsafe { lib.get::<unsafe extern "C" fn($($arg),*) -> $ret>(name) };
                    *symbol.map_err(|e| LoadError::MissingSymbol {
                        what,
                        path: path.display().to_string(),
                        symbol: stringify!($field),
                        reason: loader_message(&e),
                    })?
                },)* })
            }
        }
    };
}

api_table! {
    /// The driver API functions pod uses.
    struct DriverApi {
        cuInit: fn(c_uint) -> Status,
        cuDriverGetVersion: fn(*mut c_int) -> Status,
        cuDeviceGetCount: fn(*mut c_int) -> Status,
        cuDeviceGet: fn(*mut c_int, c_int) -> Status,
        cuDeviceGetName: fn(*mut c_char, c_int, c_int) -> Status,
        cuDeviceTotalMem_v2: fn(*mut usize, c_int) -> Status,
        cuDeviceGetAttribute: fn(*mut c_int, c_int, c_int) -> Status,
        cuDevicePrimaryCtxRetain: fn(*mut RawContext, c_int) -> Status,
        cuDevicePrimaryCtxRelease_v2: fn(c_int) -> Status,
        cuCtxSetCurrent: fn(RawContext) -> Status,
        cuCtxSynchronize: fn() -> Status,
        cuMemGetInfo_v2: fn(*mut usize, *mut usize) -> Status,
        cuMemAlloc_v2: fn(*mut DevicePtr, usize) -> Status,
        cuMemFree_v2: fn(DevicePtr) -> Status,
        cuMemcpyHtoD_v2: fn(DevicePtr, *const c_void, usize) -> Status,
        cuMemcpyDtoH_v2: fn(*mut c_void, DevicePtr, usize) -> Status,
        cuModuleLoadData: fn(*mut RawModule, *const c_void) -> Status,
        cuModuleUnload: fn(RawModule) -> Status,
        cuModuleGetFunction: fn(*mut RawFunction, RawModule, *const c_char) -> Status,
        cuFuncGetAttribute: fn(*mut c_int, c_int, RawFunction) -> Status,
        cuLaunchKernel: fn(
            RawFunction, c_uint, c_uint, c_uint, c_uint, c_uint, c_uint, c_uint, RawStream,
            *mut *mut c_void, *mut *mut c_void
        ) -> Status,
        cuStreamCreate: fn(*mut RawStream, c_uint) -> Status,
        cuStreamSynchronize: fn(RawStream) -> Status,
        cuStreamDestroy_v2: fn(RawStream) -> Status,
        cuGetErrorName: fn(Status, *mut *const c_char) -> Status,
        cuGetErrorString: fn(Status, *mut *const c_char) -> Status,
    }
}

api_table! {
    /// The NVRTC functions pod uses.
    struct CompilerApi {
        nvrtcVersion: fn(*mut c_int, *mut c_int) -> Status,
        nvrtcGetNumSupportedArchs: fn(*mut c_int) -> Status,
        nvrtcGetSupportedArchs: fn(*mut c_int) -> Status,
        nvrtcCreateProgram: fn(
            *mut RawProgram, *const c_char, *const c_char, c_int, *const *const c_char,
            *const *const c_char
        ) -> Status,
        nvrtcCompileProgram: fn(RawProgram, c_int, *const *const c_char) -> Status,
        nvrtcGetProgramLogSize: fn(RawProgram, *mut usize) -> Status,
        nvrtcGetProgramLog: fn(RawProgram, *mut c_char) -> Status,
        nvrtcGetCUBINSize: fn(RawProgram, *mut usize) -> Status,
        nvrtcGetCUBIN: fn(RawProgram, *mut c_char) -> Status,
        nvrtcGetPTXSize: fn(RawProgram, *mut usize) -> Status,
        nvrtcGetPTX: fn(RawProgram, *mut c_char) -> Status,
        nvrtcDestroyProgram: fn(*mut RawProgram) -> Status,
        nvrtcGetErrorString: fn(Status) -> *const c_char,
    }
}

/// Where the driver API is looked for. The driver installs `libcuda.so.1`; the unversioned
/// name exists only with a toolkit.
pub const DRIVER_SEARCH: LibrarySearch = LibrarySearch {
    what: "CUDA driver (libcuda)",
    env_var: "POD_CUDA_PATH",
    root_vars: &[],
    default_roots: &[],
    lib_subdir: "",
    names: &["libcuda.so.1", "libcuda.so"],
};

/// Where NVRTC is looked for: newest major version first.
pub const COMPILER_SEARCH: LibrarySearch = LibrarySearch {
    what: "NVRTC (libnvrtc)",
    env_var: "POD_NVRTC_PATH",
    root_vars: &["CUDA_PATH", "CUDA_HOME"],
    default_roots: &["/usr/local/cuda"],
    lib_subdir: "lib64",
    names: &[
        "libnvrtc.so.13",
        "libnvrtc.so.12",
        "libnvrtc.so.11.2",
        "libnvrtc.so",
    ],
};

/// A failed CUDA driver call.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CudaError {
    /// The driver returned an error code.
    #[error("{call} failed: {name} ({code}): {message}")]
    Call {
        /// The driver function.
        call: &'static str,
        /// The `CUresult` value.
        code: i32,
        /// Its name, as the driver gives it.
        name: String,
        /// Its description, as the driver gives it.
        message: String,
    },
    /// A host buffer's size differs from the device buffer's.
    #[error("copy of {host} bytes into or out of a device buffer of {device} bytes")]
    SizeMismatch {
        /// Bytes on the host side.
        host: usize,
        /// Bytes of the device buffer.
        device: usize,
    },
    /// A kernel name holds a NUL byte.
    #[error("kernel name {0:?} contains a NUL byte")]
    InvalidName(String),
    /// A device ordinal does not fit the driver's C `int`.
    #[error("{0} is out of range for the CUDA driver")]
    OutOfRange(&'static str),
}

/// What the driver tells of one device.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct DeviceProperties {
    /// Marketing name (`NVIDIA H100 80GB HBM3`).
    pub name: String,
    /// Compute capability as a target name (`sm_90`).
    pub arch: String,
    /// Device memory, bytes.
    pub total_memory: u64,
    /// Streaming multiprocessors.
    pub multiprocessors: u32,
    /// Warp width (32).
    pub warp_size: u32,
}

/// Formats a CUDA version integer (`12040`) as `12.4`.
pub fn version_string(raw: i32) -> String {
    format!("{}.{}", raw / 1000, raw % 1000 / 10)
}

/// The loaded CUDA driver API.
pub struct Cuda {
    api: DriverApi,
    path: PathBuf,
    _lib: Library,
}

impl fmt::Debug for Cuda {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Cuda")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl Cuda {
    /// Loads the driver API from the first place [`DRIVER_SEARCH`] finds it.
    pub fn load() -> Result<Self, LoadError> {
        Self::load_from(&DRIVER_SEARCH.candidates())
    }

    /// Loads the driver API from the first of `candidates` that opens and has every
    /// function pod uses.
    pub fn load_from(candidates: &[PathBuf]) -> Result<Self, LoadError> {
        let what = DRIVER_SEARCH.what;
        let (cuda, _) = open_first(&DRIVER_SEARCH, candidates, |path| {
            // SAFETY: loading libcuda runs its initialisers, which only set up the driver's
            // own state; the library is one of the names searched for it.
            let lib = unsafe { Library::new(path) }.map_err(|e| loader_message(&e))?;
            // SAFETY: DriverApi declares the driver API's signatures.
            let api = unsafe { DriverApi::load(&lib, what, path) }.map_err(|e| e.to_string())?;
            Ok(Self {
                api,
                path: path.to_path_buf(),
                _lib: lib,
            })
        })?;
        Ok(cuda)
    }

    /// The file or name the driver was loaded from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Initialises the driver; every other device call needs it first.
    pub fn init(&self) -> Result<(), CudaError> {
        // SAFETY: no pointers; flags must be 0.
        self.check("cuInit", unsafe { (self.api.cuInit)(0) })
    }

    /// The CUDA version the driver supports, as an integer (`12040` for 12.4).
    pub fn driver_version(&self) -> Result<i32, CudaError> {
        let mut raw = 0;
        // SAFETY: raw is a live c_int.
        self.check("cuDriverGetVersion", unsafe {
            (self.api.cuDriverGetVersion)(&mut raw)
        })?;
        Ok(raw)
    }

    /// How many devices the driver sees (after [`Self::init`]).
    pub fn device_count(&self) -> Result<usize, CudaError> {
        let mut count = 0;
        // SAFETY: count is a live c_int.
        self.check("cuDeviceGetCount", unsafe {
            (self.api.cuDeviceGetCount)(&mut count)
        })?;
        Ok(usize::try_from(count).unwrap_or(0))
    }

    /// Name, compute capability, memory and shape of device `ordinal`.
    pub fn device_properties(&self, ordinal: usize) -> Result<DeviceProperties, CudaError> {
        let device = self.device(ordinal)?;
        let mut name = [0u8; 256];
        // SAFETY: name is 256 writable bytes and the length passed says so.
        self.check("cuDeviceGetName", unsafe {
            (self.api.cuDeviceGetName)(name.as_mut_ptr().cast(), 256, device)
        })?;
        let mut total_memory = 0usize;
        // SAFETY: total_memory is a live usize.
        self.check("cuDeviceTotalMem", unsafe {
            (self.api.cuDeviceTotalMem_v2)(&mut total_memory, device)
        })?;
        let major = self.attribute(ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, device)?;
        let minor = self.attribute(ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, device)?;
        Ok(DeviceProperties {
            name: c_string(&name),
            arch: format!("sm_{major}{minor}"),
            total_memory: total_memory as u64,
            multiprocessors: self
                .attribute(ATTRIBUTE_MULTIPROCESSOR_COUNT, device)?
                .max(0)
                .unsigned_abs(),
            warp_size: self
                .attribute(ATTRIBUTE_WARP_SIZE, device)?
                .max(0)
                .unsigned_abs(),
        })
    }

    /// Retains device `ordinal`'s primary context and makes it current on this thread.
    pub fn context(&self, ordinal: usize) -> Result<Context<'_>, CudaError> {
        let device = self.device(ordinal)?;
        let mut raw = std::ptr::null_mut();
        // SAFETY: raw is a live slot.
        self.check("cuDevicePrimaryCtxRetain", unsafe {
            (self.api.cuDevicePrimaryCtxRetain)(&mut raw, device)
        })?;
        let context = Context {
            cuda: self,
            device,
            _not_send: PhantomData,
        };
        // SAFETY: raw is the context just retained; dropping `context` on error releases it.
        self.check("cuCtxSetCurrent", unsafe {
            (self.api.cuCtxSetCurrent)(raw)
        })?;
        Ok(context)
    }

    /// The driver's name and description of an error code.
    pub fn error_name_and_message(&self, code: i32) -> (String, String) {
        let (mut name, mut message) = (std::ptr::null(), std::ptr::null());
        // SAFETY: both write a pointer to a static string into live slots, or leave them
        // null for codes they do not know, which static_c_str checks.
        let (name, message) = unsafe {
            (self.api.cuGetErrorName)(code, &mut name);
            (self.api.cuGetErrorString)(code, &mut message);
            (static_c_str(name), static_c_str(message))
        };
        (
            name.unwrap_or_else(|| "unknown error".into()),
            message.unwrap_or_default(),
        )
    }

    fn device(&self, ordinal: usize) -> Result<c_int, CudaError> {
        let ordinal = c_int::try_from(ordinal).map_err(|_| CudaError::OutOfRange("device"))?;
        let mut device = 0;
        // SAFETY: device is a live c_int.
        self.check("cuDeviceGet", unsafe {
            (self.api.cuDeviceGet)(&mut device, ordinal)
        })?;
        Ok(device)
    }

    fn attribute(&self, attribute: c_int, device: c_int) -> Result<i32, CudaError> {
        let mut value = 0;
        // SAFETY: value is a live c_int.
        self.check("cuDeviceGetAttribute", unsafe {
            (self.api.cuDeviceGetAttribute)(&mut value, attribute, device)
        })?;
        Ok(value)
    }

    fn check(&self, call: &'static str, status: Status) -> Result<(), CudaError> {
        if status == CUDA_SUCCESS {
            return Ok(());
        }
        let (name, message) = self.error_name_and_message(status);
        Err(CudaError::Call {
            call,
            code: status,
            name,
            message,
        })
    }
}

/// Copies a static C string the driver or NVRTC returned.
///
/// # Safety
/// `ptr` is null or points to a NUL-terminated string that stays valid.
unsafe fn static_c_str(ptr: *const c_char) -> Option<String> {
    if ptr.is_null() {
        return None;
    }
    // SAFETY: non-null, and the caller guarantees it is NUL-terminated.
    Some(
        unsafe { CStr::from_ptr(ptr) }
            .to_string_lossy()
            .into_owned(),
    )
}

/// Work on one device through its primary context, current on the thread that made it
/// (CUDA's current context is per thread). Releases the context on drop.
#[derive(Debug)]
pub struct Context<'c> {
    cuda: &'c Cuda,
    device: c_int,
    _not_send: PhantomData<*const ()>,
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

/// Why an NVRTC compile failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum NvrtcError {
    /// The source or an option holds a NUL byte.
    #[error("NVRTC input contains a NUL byte")]
    Nul,
    /// An NVRTC call other than the compile itself failed.
    #[error("{call} failed: {message} ({code})")]
    Call {
        /// The NVRTC function.
        call: &'static str,
        /// The `nvrtcResult` value.
        code: i32,
        /// NVRTC's description of it.
        message: String,
    },
    /// The source did not compile; `log` is the compiler's output.
    #[error("NVRTC compile failed ({code}): {}", first_error_line(log))]
    Compile {
        /// The `nvrtcResult` value.
        code: i32,
        /// The compiler's full log.
        log: String,
    },
}

/// The loaded NVRTC.
pub struct Nvrtc {
    api: CompilerApi,
    path: PathBuf,
    _lib: Library,
}

impl fmt::Debug for Nvrtc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Nvrtc")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

/// What a successful NVRTC compile produced.
#[derive(Debug, Clone)]
pub struct NvrtcOutput {
    /// A cubin when compiled for a real architecture (`sm_90`), else NUL-terminated PTX
    /// (for a virtual one, `compute_90`); either loads with [`Context::load_module`].
    pub code: Vec<u8>,
    /// Whether `code` is PTX.
    pub is_ptx: bool,
    /// The compiler's log, with ptxas's report when asked for (`--ptxas-options=-v`).
    pub log: String,
}

impl Nvrtc {
    /// Loads NVRTC from the first place [`COMPILER_SEARCH`] finds it.
    pub fn load() -> Result<Self, LoadError> {
        Self::load_from(&COMPILER_SEARCH.candidates())
    }

    /// Loads NVRTC from the first of `candidates` that opens and has every function pod
    /// uses.
    pub fn load_from(candidates: &[PathBuf]) -> Result<Self, LoadError> {
        let what = COMPILER_SEARCH.what;
        let (rtc, _) = open_first(&COMPILER_SEARCH, candidates, |path| {
            // SAFETY: the library is one of the names searched for NVRTC; its initialisers
            // only set up its own state.
            let lib = unsafe { Library::new(path) }.map_err(|e| loader_message(&e))?;
            // SAFETY: CompilerApi declares NVRTC's signatures.
            let api = unsafe { CompilerApi::load(&lib, what, path) }.map_err(|e| e.to_string())?;
            Ok(Self {
                api,
                path: path.to_path_buf(),
                _lib: lib,
            })
        })?;
        Ok(rtc)
    }

    /// The file or name NVRTC was loaded from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// NVRTC's (major, minor) version: the CUDA release it came with.
    pub fn version(&self) -> Result<(i32, i32), NvrtcError> {
        let (mut major, mut minor) = (0, 0);
        // SAFETY: both are live c_ints.
        let status = unsafe { (self.api.nvrtcVersion)(&mut major, &mut minor) };
        self.check("nvrtcVersion", status)?;
        Ok((major, minor))
    }

    /// The compute capabilities this NVRTC compiles for (`90` for `sm_90`).
    pub fn supported_archs(&self) -> Result<Vec<u32>, NvrtcError> {
        let mut count = 0;
        // SAFETY: count is a live c_int.
        let status = unsafe { (self.api.nvrtcGetNumSupportedArchs)(&mut count) };
        self.check("nvrtcGetNumSupportedArchs", status)?;
        let mut archs = vec![0 as c_int; usize::try_from(count).unwrap_or(0)];
        // SAFETY: archs holds the `count` ints NVRTC said it will write.
        let status = unsafe { (self.api.nvrtcGetSupportedArchs)(archs.as_mut_ptr()) };
        self.check("nvrtcGetSupportedArchs", status)?;
        Ok(archs.into_iter().map(|a| a.max(0).unsigned_abs()).collect())
    }

    /// Compiles `source` (named `name` in messages) with `options`, e.g.
    /// `--gpu-architecture=sm_90`.
    pub fn compile(
        &self,
        source: &str,
        name: &str,
        options: &[String],
    ) -> Result<NvrtcOutput, NvrtcError> {
        let c_source = CString::new(source).map_err(|_| NvrtcError::Nul)?;
        let c_name = CString::new(name).map_err(|_| NvrtcError::Nul)?;
        let c_options = options
            .iter()
            .map(|o| CString::new(o.as_str()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|_| NvrtcError::Nul)?;
        let option_ptrs: Vec<*const c_char> = c_options.iter().map(|o| o.as_ptr()).collect();
        let count = c_int::try_from(option_ptrs.len()).map_err(|_| NvrtcError::Nul)?;
        let mut program: RawProgram = std::ptr::null_mut();
        // SAFETY: program is a live slot; source and name are NUL-terminated; no headers.
        let status = unsafe {
            (self.api.nvrtcCreateProgram)(
                &mut program,
                c_source.as_ptr(),
                c_name.as_ptr(),
                0,
                std::ptr::null(),
                std::ptr::null(),
            )
        };
        self.check("nvrtcCreateProgram", status)?;
        let program = Program {
            rtc: self,
            raw: program,
        };
        // SAFETY: the program is live; option_ptrs holds `count` NUL-terminated strings that
        // outlive the call.
        let status =
            unsafe { (self.api.nvrtcCompileProgram)(program.raw, count, option_ptrs.as_ptr()) };
        let log = program.log()?;
        if status != CUDA_SUCCESS {
            return Err(NvrtcError::Compile { code: status, log });
        }
        let mut size = 0usize;
        // SAFETY: size is a live usize. A virtual architecture has no cubin (size 0).
        let status = unsafe { (self.api.nvrtcGetCUBINSize)(program.raw, &mut size) };
        if status == CUDA_SUCCESS && size > 0 {
            let mut code = vec![0u8; size];
            // SAFETY: code holds the `size` bytes NVRTC said it will write.
            let status = unsafe { (self.api.nvrtcGetCUBIN)(program.raw, code.as_mut_ptr().cast()) };
            self.check("nvrtcGetCUBIN", status)?;
            return Ok(NvrtcOutput {
                code,
                is_ptx: false,
                log,
            });
        }
        // SAFETY: size is a live usize.
        let status = unsafe { (self.api.nvrtcGetPTXSize)(program.raw, &mut size) };
        self.check("nvrtcGetPTXSize", status)?;
        let mut code = vec![0u8; size];
        // SAFETY: code holds the `size` bytes (with the NUL) NVRTC said it will write.
        let status = unsafe { (self.api.nvrtcGetPTX)(program.raw, code.as_mut_ptr().cast()) };
        self.check("nvrtcGetPTX", status)?;
        Ok(NvrtcOutput {
            code,
            is_ptx: true,
            log,
        })
    }

    fn check(&self, call: &'static str, status: Status) -> Result<(), NvrtcError> {
        if status == CUDA_SUCCESS {
            return Ok(());
        }
        // SAFETY: nvrtcGetErrorString returns a static string or null, which is checked.
        let message = unsafe { static_c_str((self.api.nvrtcGetErrorString)(status)) };
        Err(NvrtcError::Call {
            call,
            code: status,
            message: message.unwrap_or_else(|| "unknown error".into()),
        })
    }
}

/// An NVRTC program, destroyed on drop.
struct Program<'r> {
    rtc: &'r Nvrtc,
    raw: RawProgram,
}

impl Program<'_> {
    fn log(&self) -> Result<String, NvrtcError> {
        let mut size = 0usize;
        // SAFETY: size is a live usize.
        let status = unsafe { (self.rtc.api.nvrtcGetProgramLogSize)(self.raw, &mut size) };
        self.rtc.check("nvrtcGetProgramLogSize", status)?;
        if size == 0 {
            return Ok(String::new());
        }
        let mut log = vec![0u8; size];
        // SAFETY: log holds the `size` bytes NVRTC said it will write.
        let status =
            unsafe { (self.rtc.api.nvrtcGetProgramLog)(self.raw, log.as_mut_ptr().cast()) };
        self.rtc.check("nvrtcGetProgramLog", status)?;
        Ok(c_string(&log))
    }
}

impl Drop for Program<'_> {
    fn drop(&mut self) {
        // SAFETY: raw came from nvrtcCreateProgram and is destroyed only here.
        let _ = unsafe { (self.rtc.api.nvrtcDestroyProgram)(&mut self.raw) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_format_as_major_dot_minor() {
        assert_eq!(version_string(12040), "12.4");
        assert_eq!(version_string(13000), "13.0");
        assert_eq!(version_string(11080), "11.8");
    }

    #[test]
    fn a_missing_driver_is_one_line_naming_the_paths_tried() {
        let err = Cuda::load_from(&[PathBuf::from("/nonexistent/libcuda.so.1")]).unwrap_err();
        let msg = err.to_string();
        assert!(!msg.contains('\n'), "{msg}");
        assert!(msg.contains("/nonexistent/libcuda.so.1"), "{msg}");
        assert!(msg.contains("POD_CUDA_PATH"), "{msg}");
    }

    #[test]
    fn a_library_without_nvrtc_is_refused_with_the_missing_function() {
        let err = Nvrtc::load_from(&[PathBuf::from("libc.so.6")]).unwrap_err();
        let msg = err.to_string();
        assert!(!msg.contains('\n'), "{msg}");
        assert!(msg.contains("nvrtcVersion"), "{msg}");
    }
}
