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
    api_table, c_string, first_error_line, loader_message, open_first, LibrarySearch, LoadError,
};

mod context;
pub(crate) mod raw;
mod rtc;

pub use context::{Context, DeviceBuffer, Function, KernelArg, Module, Stream};
pub use rtc::{Nvrtc, NvrtcError, NvrtcOutput};

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
        cuMemcpyDtoD_v2: fn(DevicePtr, DevicePtr, usize) -> Status,
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
