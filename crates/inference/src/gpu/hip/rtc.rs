//! hiprtc, the runtime compiler: kernel source to code objects. The invariants its `unsafe`
//! code keeps are the parent module's.

#![allow(unsafe_code)]

use super::*;

api_table! {
    /// The hiprtc functions pod uses.
    struct CompilerApi {
        hiprtcVersion: fn(*mut c_int, *mut c_int) -> Status,
        hiprtcCreateProgram: fn(
            *mut RawProgram, *const c_char, *const c_char, c_int, *const *const c_char,
            *const *const c_char
        ) -> Status,
        hiprtcCompileProgram: fn(RawProgram, c_int, *const *const c_char) -> Status,
        hiprtcGetProgramLogSize: fn(RawProgram, *mut usize) -> Status,
        hiprtcGetProgramLog: fn(RawProgram, *mut c_char) -> Status,
        hiprtcGetCodeSize: fn(RawProgram, *mut usize) -> Status,
        hiprtcGetCode: fn(RawProgram, *mut c_char) -> Status,
        hiprtcDestroyProgram: fn(*mut RawProgram) -> Status,
        hiprtcGetErrorString: fn(Status) -> *const c_char,
    }
}

/// Why a hiprtc compile failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum HiprtcError {
    /// The source or an option holds a NUL byte.
    #[error("hiprtc input contains a NUL byte")]
    Nul,
    /// A hiprtc call other than the compile itself failed.
    #[error("{call} failed: {message} ({code})")]
    Call {
        /// The hiprtc function.
        call: &'static str,
        /// The `hiprtcResult` value.
        code: i32,
        /// hiprtc's description of it.
        message: String,
    },
    /// The source did not compile; `log` is the compiler's output.
    #[error(
        "hiprtc compile failed ({code}): {}",
        crate::gpu::library::first_error_line(log)
    )]
    Compile {
        /// The `hiprtcResult` value.
        code: i32,
        /// The compiler's full log.
        log: String,
    },
}

/// The loaded HIP runtime compiler.
pub struct Hiprtc {
    api: CompilerApi,
    path: PathBuf,
    _lib: Library,
}

impl fmt::Debug for Hiprtc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Hiprtc")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

/// What a successful hiprtc compile produced.
#[derive(Debug, Clone)]
pub struct HiprtcOutput {
    /// The code object (an AMDGPU ELF) for `hipModuleLoadData`.
    pub code: Vec<u8>,
    /// The compiler's log, often empty.
    pub log: String,
}

impl Hiprtc {
    /// Loads the compiler from the first place [`COMPILER_SEARCH`] finds it.
    pub fn load() -> Result<Self, LoadError> {
        Self::load_from(&COMPILER_SEARCH.candidates())
    }

    /// Loads the compiler from the first of `candidates` that opens and exports hiprtc.
    pub fn load_from(candidates: &[PathBuf]) -> Result<Self, LoadError> {
        let what = COMPILER_SEARCH.what;
        let (rtc, _) = open_first(&COMPILER_SEARCH, candidates, |path| {
            // SAFETY: as for the runtime: the library is one of the names searched for hiprtc.
            let lib = unsafe { Library::new(path) }.map_err(|e| loader_message(&e))?;
            // SAFETY: CompilerApi declares hiprtc's signatures.
            let api = unsafe { CompilerApi::load(&lib, what, path) }.map_err(|e| e.to_string())?;
            Ok(Self {
                api,
                path: path.to_path_buf(),
                _lib: lib,
            })
        })?;
        Ok(rtc)
    }

    /// The file or name the compiler was loaded from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// hiprtc's own (major, minor) version.
    pub fn version(&self) -> Result<(i32, i32), HiprtcError> {
        let (mut major, mut minor) = (0, 0);
        // SAFETY: both are live c_ints.
        let status = unsafe { (self.api.hiprtcVersion)(&mut major, &mut minor) };
        self.check("hiprtcVersion", status)?;
        Ok((major, minor))
    }

    /// Compiles `source` (named `name` in messages) with `options`, e.g.
    /// `--offload-arch=gfx906` and `-O3`.
    ///
    /// hiprtc of ROCm 5.2 aborts the process when asked for an architecture its LLVM does not
    /// know (gfx1100, say): [`super::compile`] checks targets against the runtime's version
    /// before calling this.
    pub fn compile(
        &self,
        source: &str,
        name: &str,
        options: &[String],
    ) -> Result<HiprtcOutput, HiprtcError> {
        let c_source = CString::new(source).map_err(|_| HiprtcError::Nul)?;
        let c_name = CString::new(name).map_err(|_| HiprtcError::Nul)?;
        let c_options = options
            .iter()
            .map(|o| CString::new(o.as_str()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|_| HiprtcError::Nul)?;
        let option_ptrs: Vec<*const c_char> = c_options.iter().map(|o| o.as_ptr()).collect();
        let count = c_int::try_from(option_ptrs.len()).map_err(|_| HiprtcError::Nul)?;
        let mut program: RawProgram = std::ptr::null_mut();
        // SAFETY: program is a live slot; source and name are NUL-terminated; no headers.
        let status = unsafe {
            (self.api.hiprtcCreateProgram)(
                &mut program,
                c_source.as_ptr(),
                c_name.as_ptr(),
                0,
                std::ptr::null(),
                std::ptr::null(),
            )
        };
        self.check("hiprtcCreateProgram", status)?;
        let program = Program {
            rtc: self,
            raw: program,
        };
        // SAFETY: the program is live; option_ptrs holds `count` NUL-terminated strings that
        // outlive the call.
        let status =
            unsafe { (self.api.hiprtcCompileProgram)(program.raw, count, option_ptrs.as_ptr()) };
        let log = program.log()?;
        if status != HIP_SUCCESS {
            return Err(HiprtcError::Compile { code: status, log });
        }
        let mut size = 0usize;
        // SAFETY: size is a live usize.
        let status = unsafe { (self.api.hiprtcGetCodeSize)(program.raw, &mut size) };
        self.check("hiprtcGetCodeSize", status)?;
        let mut code = vec![0u8; size];
        // SAFETY: code holds the `size` bytes hiprtc said it will write.
        let status = unsafe { (self.api.hiprtcGetCode)(program.raw, code.as_mut_ptr().cast()) };
        self.check("hiprtcGetCode", status)?;
        Ok(HiprtcOutput { code, log })
    }

    fn check(&self, call: &'static str, status: Status) -> Result<(), HiprtcError> {
        if status == HIP_SUCCESS {
            return Ok(());
        }
        // SAFETY: hiprtcGetErrorString returns a static string or null, which is checked.
        let message = unsafe { static_c_str((self.api.hiprtcGetErrorString)(status)) };
        Err(HiprtcError::Call {
            call,
            code: status,
            message: message.unwrap_or_else(|| "unknown error".into()),
        })
    }
}

/// A hiprtc program, destroyed on drop.
struct Program<'r> {
    rtc: &'r Hiprtc,
    raw: RawProgram,
}

impl Program<'_> {
    fn log(&self) -> Result<String, HiprtcError> {
        let mut size = 0usize;
        // SAFETY: size is a live usize.
        let status = unsafe { (self.rtc.api.hiprtcGetProgramLogSize)(self.raw, &mut size) };
        self.rtc.check("hiprtcGetProgramLogSize", status)?;
        if size == 0 {
            return Ok(String::new());
        }
        let mut log = vec![0u8; size];
        // SAFETY: log holds the `size` bytes hiprtc said it will write.
        let status =
            unsafe { (self.rtc.api.hiprtcGetProgramLog)(self.raw, log.as_mut_ptr().cast()) };
        self.rtc.check("hiprtcGetProgramLog", status)?;
        Ok(c_string(&log))
    }
}

impl Drop for Program<'_> {
    fn drop(&mut self) {
        // SAFETY: raw came from hiprtcCreateProgram and is destroyed only here.
        let _ = unsafe { (self.rtc.api.hiprtcDestroyProgram)(&mut self.raw) };
    }
}
