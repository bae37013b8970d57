//! NVRTC, the runtime compiler: kernel source to code objects. The invariants its `unsafe`
//! code keeps are the parent module's.

#![allow(unsafe_code)]

use super::*;

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
