//! The HIP runtime and its runtime compiler (hiprtc), loaded at run time.
//!
//! Nothing of ROCm is needed to build pod: `libamdhip64` is opened with `dlopen` when first
//! asked for ([`Hip::load`]), and the compiler the same way ([`Hiprtc::load`]). ROCm 6 and later
//! ship the compiler as `libhiprtc.so`; ROCm 5.x exports the `hiprtc*` functions from
//! `libamdhip64` itself, so the compiler search ends with the runtime's names. Where the
//! libraries are looked for is in [`super::library`].
//!
//! # Invariants of the unsafe code
//! - Every function pointer comes from [`Library::get`] on the library named in its table and
//!   is declared with the signature of ROCm's `hip_runtime_api.h` / `hiprtc.h` (the same in
//!   ROCm 5 and 6 for the functions used here). A table lives in the same struct as the
//!   [`Library`] it came from and never leaves it, so no pointer outlives its library.
//! - Every out-pointer handed to HIP points to a live, writable local of the declared type,
//!   and every buffer length passed with a pointer is that buffer's length.
//! - Device memory ([`DeviceBuffer`]), modules, streams and programs are freed exactly once, in
//!   `Drop`, and borrow the [`Hip`] (or [`Hiprtc`]) they came from, so they cannot outlive it.
//! - `hipDeviceProp_t` changed layout in ROCm 6 (`hipGetDevicePropertiesR0600`); the struct is
//!   never declared here. It is written into a zeroed buffer larger than either layout and
//!   only the architecture name is read from it, at the offset of the layout that was called.
//! - A kernel launched through [`Context::launch`] reads and writes device memory only: the
//!   arguments are device pointers and plain values copied into a local array, so a kernel
//!   whose parameters do not match can fault the device (reported as an error by the next
//!   call) but cannot touch this process's memory.

#![allow(unsafe_code)]

use std::ffi::{c_char, c_int, c_uint, c_void, CStr, CString};
use std::fmt;
use std::marker::PhantomData;
use std::path::{Path, PathBuf};

use libloading::Library;

use super::library::{api_table, c_string, loader_message, open_first, LibrarySearch, LoadError};

mod context;
pub(crate) mod raw;
mod rtc;

pub use context::{Context, DeviceBuffer, Function, KernelArg, Module, Stream};
pub use rtc::{Hiprtc, HiprtcError, HiprtcOutput};

type Status = c_int;
type RawModule = *mut c_void;
type RawFunction = *mut c_void;
type RawStream = *mut c_void;
type RawProgram = *mut c_void;

const HIP_SUCCESS: Status = 0;
/// `hipErrorNoDevice`.
pub const ERROR_NO_DEVICE: i32 = 100;
/// `hipErrorInvalidDevice`.
pub const ERROR_INVALID_DEVICE: i32 = 101;
const MEMCPY_HOST_TO_DEVICE: c_int = 1;
const MEMCPY_DEVICE_TO_HOST: c_int = 2;
// hipDeviceAttribute_t values; the enum has kept these since ROCm 5.0.
const ATTRIBUTE_MULTIPROCESSOR_COUNT: c_int = 63;
const ATTRIBUTE_WARP_SIZE: c_int = 87;
// Where gcnArchName[256] sits in the two hipDeviceProp_t layouts.
const ARCH_NAME_OFFSET_R0000: usize = 396;
const ARCH_NAME_OFFSET_R0600: usize = 1160;
const ARCH_NAME_LEN: usize = 256;
// Larger than either layout (652 and 1472 bytes), so a runtime that writes a field more
// than its header declares still writes into this buffer.
const PROPS_BUFFER_WORDS: usize = 1024;

api_table! {
    /// The HIP runtime functions pod uses.
    struct RuntimeApi {
        hipInit: fn(c_uint) -> Status,
        hipRuntimeGetVersion: fn(*mut c_int) -> Status,
        hipDriverGetVersion: fn(*mut c_int) -> Status,
        hipGetDeviceCount: fn(*mut c_int) -> Status,
        hipDeviceGetName: fn(*mut c_char, c_int, c_int) -> Status,
        hipDeviceTotalMem: fn(*mut usize, c_int) -> Status,
        hipDeviceGetAttribute: fn(*mut c_int, c_int, c_int) -> Status,
        hipSetDevice: fn(c_int) -> Status,
        hipMemGetInfo: fn(*mut usize, *mut usize) -> Status,
        hipMalloc: fn(*mut *mut c_void, usize) -> Status,
        hipFree: fn(*mut c_void) -> Status,
        hipMemcpy: fn(*mut c_void, *const c_void, usize, c_int) -> Status,
        hipModuleLoadData: fn(*mut RawModule, *const c_void) -> Status,
        hipModuleUnload: fn(RawModule) -> Status,
        hipModuleGetFunction: fn(*mut RawFunction, RawModule, *const c_char) -> Status,
        hipModuleLaunchKernel: fn(
            RawFunction, c_uint, c_uint, c_uint, c_uint, c_uint, c_uint, c_uint, RawStream,
            *mut *mut c_void, *mut *mut c_void
        ) -> Status,
        hipStreamCreate: fn(*mut RawStream) -> Status,
        hipStreamSynchronize: fn(RawStream) -> Status,
        hipStreamDestroy: fn(RawStream) -> Status,
        hipDeviceSynchronize: fn() -> Status,
        hipGetErrorName: fn(Status) -> *const c_char,
        hipGetErrorString: fn(Status) -> *const c_char,
    }
}

/// Which `hipGetDeviceProperties` the runtime exports, and where its layout keeps the
/// architecture name.
#[derive(Debug, Clone, Copy)]
struct PropertiesFn {
    call: unsafe extern "C" fn(*mut c_void, c_int) -> Status,
    arch_name_offset: usize,
}

/// Where the HIP runtime is looked for.
pub const RUNTIME_SEARCH: LibrarySearch = LibrarySearch {
    what: "HIP runtime (libamdhip64)",
    env_var: "POD_HIP_PATH",
    root_vars: &["ROCM_PATH"],
    default_roots: &["/opt/rocm"],
    lib_subdir: "lib",
    names: &[
        "libamdhip64.so.7",
        "libamdhip64.so.6",
        "libamdhip64.so.5",
        "libamdhip64.so",
    ],
};

/// Where hiprtc is looked for: its own library (ROCm 6 and later), then the runtime, which
/// carries the compiler in ROCm 5.x.
pub const COMPILER_SEARCH: LibrarySearch = LibrarySearch {
    what: "HIP runtime compiler (libhiprtc, or libamdhip64 of ROCm 5)",
    env_var: "POD_HIPRTC_PATH",
    root_vars: &["ROCM_PATH"],
    default_roots: &["/opt/rocm"],
    lib_subdir: "lib",
    names: &[
        "libhiprtc.so.7",
        "libhiprtc.so.6",
        "libhiprtc.so",
        "libamdhip64.so.5",
        "libamdhip64.so",
    ],
};

/// A failed HIP runtime call.
#[derive(Debug, Clone, thiserror::Error)]
pub enum HipError {
    /// The runtime returned an error code.
    #[error("{call} failed: {name} ({code}): {message}")]
    Call {
        /// The HIP function.
        call: &'static str,
        /// The `hipError_t` value.
        code: i32,
        /// Its name, as the runtime gives it.
        name: String,
        /// Its description, as the runtime gives it.
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
    /// A device ordinal or launch dimension does not fit the runtime's C `int`.
    #[error("{0} is out of range for the HIP runtime")]
    OutOfRange(&'static str),
}

/// A HIP runtime version, decoded from `hipRuntimeGetVersion`'s
/// `major * 10_000_000 + minor * 100_000 + patch`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
pub struct HipVersion {
    /// ROCm major version.
    pub major: u32,
    /// ROCm minor version.
    pub minor: u32,
    /// Build number.
    pub patch: u32,
}

impl HipVersion {
    /// Decodes the runtime's integer form.
    pub fn from_raw(raw: i32) -> Self {
        let raw = raw.max(0).unsigned_abs();
        Self {
            major: raw / 10_000_000,
            minor: raw / 100_000 % 100,
            patch: raw % 100_000,
        }
    }
}

impl fmt::Display for HipVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

/// What the runtime tells of one device.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct DeviceProperties {
    /// Marketing name (`AMD Instinct MI50`).
    pub name: String,
    /// `gcnArchName` with its feature flags (`gfx906:sramecc+:xnack-`).
    pub arch: String,
    /// Device memory, bytes.
    pub total_memory: u64,
    /// Compute units.
    pub multiprocessors: u32,
    /// Wavefront width: 64 on GCN and CDNA, 32 on RDNA.
    pub warp_size: u32,
}

impl DeviceProperties {
    /// The architecture without feature flags (`gfx906`), the name compile targets use.
    pub fn base_arch(&self) -> &str {
        self.arch.split(':').next().unwrap_or(&self.arch)
    }
}

/// The loaded HIP runtime.
pub struct Hip {
    api: RuntimeApi,
    properties: PropertiesFn,
    path: PathBuf,
    _lib: Library,
}

impl fmt::Debug for Hip {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Hip")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl Hip {
    /// Loads the runtime from the first place [`RUNTIME_SEARCH`] finds it.
    pub fn load() -> Result<Self, LoadError> {
        Self::load_from(&RUNTIME_SEARCH.candidates())
    }

    /// Loads the runtime from the first of `candidates` (paths or bare names) that opens and
    /// has every function pod uses.
    pub fn load_from(candidates: &[PathBuf]) -> Result<Self, LoadError> {
        let what = RUNTIME_SEARCH.what;
        let (hip, _) = open_first(&RUNTIME_SEARCH, candidates, |path| {
            // SAFETY: loading libamdhip64 runs its initialisers, which only set up the
            // runtime's own state; the library is one of the names searched for it.
            let lib = unsafe { Library::new(path) }.map_err(|e| loader_message(&e))?;
            // SAFETY: the library is the HIP runtime; RuntimeApi declares its signatures.
            let api = unsafe { RuntimeApi::load(&lib, what, path) }.map_err(|e| e.to_string())?;
            let properties = properties_fn(&lib)
                .ok_or_else(|| format!("{} exports no hipGetDeviceProperties", path.display()))?;
            Ok(Self {
                api,
                properties,
                path: path.to_path_buf(),
                _lib: lib,
            })
        })?;
        Ok(hip)
    }

    /// The file or name the runtime was loaded from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Initialises the runtime; the other calls do this implicitly, but this one reports
    /// why a machine's devices are unusable.
    pub fn init(&self) -> Result<(), HipError> {
        // SAFETY: no pointers; flags must be 0.
        self.check("hipInit", unsafe { (self.api.hipInit)(0) })
    }

    /// The runtime's version; needs no device.
    pub fn runtime_version(&self) -> Result<HipVersion, HipError> {
        let mut raw = 0;
        // SAFETY: raw is a live c_int.
        self.check("hipRuntimeGetVersion", unsafe {
            (self.api.hipRuntimeGetVersion)(&mut raw)
        })?;
        Ok(HipVersion::from_raw(raw))
    }

    /// The kernel driver's version as the runtime reports it.
    pub fn driver_version(&self) -> Result<HipVersion, HipError> {
        let mut raw = 0;
        // SAFETY: raw is a live c_int.
        self.check("hipDriverGetVersion", unsafe {
            (self.api.hipDriverGetVersion)(&mut raw)
        })?;
        Ok(HipVersion::from_raw(raw))
    }

    /// How many devices this process can use; an error (code [`ERROR_NO_DEVICE`]) when
    /// there are none.
    pub fn device_count(&self) -> Result<usize, HipError> {
        let mut count = 0;
        // SAFETY: count is a live c_int.
        self.check("hipGetDeviceCount", unsafe {
            (self.api.hipGetDeviceCount)(&mut count)
        })?;
        Ok(usize::try_from(count).unwrap_or(0))
    }

    /// Name, architecture, memory and shape of device `ordinal`.
    pub fn device_properties(&self, ordinal: usize) -> Result<DeviceProperties, HipError> {
        let device = c_int::try_from(ordinal).map_err(|_| HipError::OutOfRange("device"))?;
        let mut name = [0u8; 256];
        // SAFETY: name is 256 writable bytes and the length passed says so.
        self.check("hipDeviceGetName", unsafe {
            (self.api.hipDeviceGetName)(name.as_mut_ptr().cast(), 256, device)
        })?;
        let mut total_memory = 0usize;
        // SAFETY: total_memory is a live usize.
        self.check("hipDeviceTotalMem", unsafe {
            (self.api.hipDeviceTotalMem)(&mut total_memory, device)
        })?;
        let multiprocessors = self.attribute(ATTRIBUTE_MULTIPROCESSOR_COUNT, device)?;
        let warp_size = self.attribute(ATTRIBUTE_WARP_SIZE, device)?;
        let mut props = vec![0u64; PROPS_BUFFER_WORDS];
        // SAFETY: props is a zeroed, 8-byte aligned buffer larger than either
        // hipDeviceProp_t layout (see PROPS_BUFFER_WORDS).
        self.check("hipGetDeviceProperties", unsafe {
            (self.properties.call)(props.as_mut_ptr().cast(), device)
        })?;
        let bytes: &[u8] = bytemuck::cast_slice(&props);
        let offset = self.properties.arch_name_offset;
        let arch = c_string(&bytes[offset..offset + ARCH_NAME_LEN]);
        Ok(DeviceProperties {
            name: c_string(&name),
            arch,
            total_memory: total_memory as u64,
            multiprocessors: multiprocessors.max(0).unsigned_abs(),
            warp_size: warp_size.max(0).unsigned_abs(),
        })
    }

    /// Makes device `ordinal` current on this thread and returns a handle for work on it.
    pub fn context(&self, ordinal: usize) -> Result<Context<'_>, HipError> {
        let device = c_int::try_from(ordinal).map_err(|_| HipError::OutOfRange("device"))?;
        // SAFETY: no pointers.
        self.check("hipSetDevice", unsafe { (self.api.hipSetDevice)(device) })?;
        Ok(Context {
            hip: self,
            device,
            _not_send: PhantomData,
        })
    }

    /// The runtime's name and description of an error code.
    pub fn error_name_and_message(&self, code: i32) -> (String, String) {
        // SAFETY: both functions return pointers to static strings, or null for codes they
        // do not know, which is checked.
        let (name, message) = unsafe {
            (
                static_c_str((self.api.hipGetErrorName)(code)),
                static_c_str((self.api.hipGetErrorString)(code)),
            )
        };
        (
            name.unwrap_or_else(|| "unknown error".into()),
            message.unwrap_or_default(),
        )
    }

    fn attribute(&self, attribute: c_int, device: c_int) -> Result<i32, HipError> {
        let mut value = 0;
        // SAFETY: value is a live c_int.
        self.check("hipDeviceGetAttribute", unsafe {
            (self.api.hipDeviceGetAttribute)(&mut value, attribute, device)
        })?;
        Ok(value)
    }

    fn check(&self, call: &'static str, status: Status) -> Result<(), HipError> {
        if status == HIP_SUCCESS {
            return Ok(());
        }
        let (name, message) = self.error_name_and_message(status);
        Err(HipError::Call {
            call,
            code: status,
            name,
            message,
        })
    }
}

/// ROCm 6 renamed the layout-changing call; the old name stays exported with the old layout.
fn properties_fn(lib: &Library) -> Option<PropertiesFn> {
    type GetProperties = unsafe extern "C" fn(*mut c_void, c_int) -> Status;
    for (symbol, arch_name_offset) in [
        (
            &b"hipGetDevicePropertiesR0600\0"[..],
            ARCH_NAME_OFFSET_R0600,
        ),
        (&b"hipGetDeviceProperties\0"[..], ARCH_NAME_OFFSET_R0000),
    ] {
        // SAFETY: both symbols take (hipDeviceProp_t*, int) and return hipError_t.
        if let Ok(call) = unsafe { lib.get::<GetProperties>(symbol) } {
            return Some(PropertiesFn {
                call: *call,
                arch_name_offset,
            });
        }
    }
    None
}

/// Copies a static C string the runtime returned.
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
    fn versions_decode_from_the_runtime_integer() {
        let v = HipVersion::from_raw(50_221_153);
        assert_eq!((v.major, v.minor, v.patch), (5, 2, 21153));
        assert_eq!(v.to_string(), "5.2.21153");
        assert_eq!(HipVersion::from_raw(60_443_483).to_string(), "6.4.43483");
    }

    #[test]
    fn a_missing_runtime_is_one_line_naming_the_paths_tried() {
        let err = Hip::load_from(&[PathBuf::from("/nonexistent/libamdhip64.so.6")]).unwrap_err();
        let msg = err.to_string();
        assert!(!msg.contains('\n'), "{msg}");
        assert!(msg.contains("/nonexistent/libamdhip64.so.6"), "{msg}");
        assert!(msg.contains("POD_HIP_PATH"), "{msg}");
    }

    #[test]
    fn a_library_without_hip_is_refused_with_the_missing_function() {
        // libc opens but has none of HIP's functions.
        let err = Hip::load_from(&[PathBuf::from("libc.so.6")]).unwrap_err();
        let msg = err.to_string();
        assert!(!msg.contains('\n'), "{msg}");
        assert!(msg.contains("hipInit"), "{msg}");
    }

    #[test]
    fn base_arch_drops_feature_flags() {
        let props = DeviceProperties {
            name: "AMD Instinct MI50".into(),
            arch: "gfx906:sramecc+:xnack-".into(),
            total_memory: 0,
            multiprocessors: 60,
            warp_size: 64,
        };
        assert_eq!(props.base_arch(), "gfx906");
    }
}
