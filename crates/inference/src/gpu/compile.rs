//! Kernel source to code objects for one GPU target, and the cache of compiled objects.
//!
//! [`Compiler`] compiles with the target vendor's runtime compiler (hiprtc for `gfx*`, NVRTC
//! for `sm_*`), loaded when first needed; neither needs a GPU. Kernels are named by their
//! `extern "C"` names; each must be in the result, with what the code object tells of its
//! registers and scratch ([`KernelFacts`]). [`Compiler::compile_cached`] keeps results in a
//! [`CodeCache`] directory.
//!
//! Options: AMD gets `--offload-arch=<gfx>` (ROCm 5.2's hiprtc also takes
//! `--gpu-architecture=`, and needs one of them: without it, it refuses to compile) and `-O3`.
//! NVIDIA gets `--gpu-architecture=sm_XX`, which makes a cubin for that architecture, and
//! `--ptxas-options=-v`, whose report in the log is where spill counts come from.

mod cache;
mod elf;
mod facts;
mod msgpack;
mod target;

use std::path::PathBuf;
use std::sync::{Mutex, OnceLock};

pub use cache::{CacheWriteError, CodeCache};
pub use facts::{FactsError, KernelFacts};
pub use target::{Target, UnknownTarget, Vendor};

use super::cuda::{self, Nvrtc, NvrtcError};
use super::hip::{self, Hip, HipVersion, Hiprtc, HiprtcError};
use super::library::LoadError;

/// The name kernel sources are compiled under, as compile logs show it.
const SOURCE_NAME: &str = "pod_kernels.cu";

/// Compiled code for one target, with what the compiler told of each kernel.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct CompiledModule {
    /// The target's name (`gfx906`, `sm_90`).
    pub target: String,
    /// The compiler and its version, as part of the cache key.
    pub compiler: String,
    /// The code object: an AMDGPU ELF for `hipModuleLoadData`, or a cubin for
    /// `cuModuleLoadData`.
    #[serde(skip)]
    pub code: Vec<u8>,
    /// The requested kernels, in the order asked for.
    pub kernels: Vec<KernelFacts>,
    /// The compiler's log (warnings; ptxas's report on NVIDIA).
    pub log: String,
}

/// Why a kernel source could not be compiled for a target.
#[derive(Debug, thiserror::Error)]
pub enum CompileError {
    /// The target's runtime compiler could not be loaded.
    #[error("cannot compile for {target}: {source}")]
    CompilerNotFound {
        /// The target asked for.
        target: Target,
        /// Why loading failed: which paths were tried.
        #[source]
        source: LoadError,
    },
    /// The installed hiprtc is older than the first ROCm whose compiler knows the target.
    #[error("cannot compile for {target}: hiprtc of ROCm {found} does not know it (needs ROCm {}.{} or later)", needs.0, needs.1)]
    RocmTooOld {
        /// The target asked for.
        target: Target,
        /// The ROCm version found.
        found: HipVersion,
        /// The first (major, minor) that knows the target.
        needs: (u32, u32),
    },
    /// The installed NVRTC does not list the target.
    #[error(
        "cannot compile for {target}: NVRTC {version} does not support it (supports {supported})"
    )]
    UnsupportedByNvrtc {
        /// The target asked for.
        target: Target,
        /// NVRTC's version.
        version: String,
        /// The architectures it does support.
        supported: String,
    },
    /// hiprtc failed; the error holds its log.
    #[error("compiling for {target}: {source}")]
    Hiprtc {
        /// The target asked for.
        target: Target,
        /// The compiler's error, with its log.
        #[source]
        source: HiprtcError,
    },
    /// NVRTC failed; the error holds its log.
    #[error("compiling for {target}: {source}")]
    Nvrtc {
        /// The target asked for.
        target: Target,
        /// The compiler's error, with its log.
        #[source]
        source: NvrtcError,
    },
    /// The code object compiled but a kernel is missing from it or it cannot be read.
    #[error("compiling for {target}: {source}")]
    Facts {
        /// The target asked for.
        target: Target,
        /// What is wrong with the code object.
        #[source]
        source: FactsError,
    },
}

impl CompileError {
    /// The compiler's full log, for errors that have one.
    pub fn log(&self) -> Option<&str> {
        match self {
            Self::Hiprtc {
                source: HiprtcError::Compile { log, .. },
                ..
            }
            | Self::Nvrtc {
                source: NvrtcError::Compile { log, .. },
                ..
            } => Some(log),
            _ => None,
        }
    }
}

/// hiprtc and the ROCm release it belongs to.
#[derive(Debug)]
struct AmdCompiler {
    rtc: Hiprtc,
    /// `None` when no runtime could be loaded to ask; targets are then not checked.
    rocm: Option<HipVersion>,
}

/// One compile, worked out before running it: what the cache key covers.
struct Plan {
    target: Target,
    compiler: String,
    options: Vec<String>,
}

/// Where a [`Compiler`] looks for the runtime compilers.
#[derive(Debug, Clone)]
pub struct CompilerPaths {
    /// Candidates for hiprtc, tried in order.
    pub hiprtc: Vec<PathBuf>,
    /// Candidates for NVRTC, tried in order.
    pub nvrtc: Vec<PathBuf>,
}

impl Default for CompilerPaths {
    /// The usual places, as [`hip::COMPILER_SEARCH`] and [`cuda::COMPILER_SEARCH`] say.
    fn default() -> Self {
        Self {
            hiprtc: hip::COMPILER_SEARCH.candidates(),
            nvrtc: cuda::COMPILER_SEARCH.candidates(),
        }
    }
}

/// Compiles kernel sources with whichever runtime compiler a target needs, loading each
/// when first used.
#[derive(Debug)]
pub struct Compiler {
    paths: CompilerPaths,
    amd: OnceLock<Result<AmdCompiler, LoadError>>,
    nvidia: OnceLock<Result<Nvrtc, LoadError>>,
}

/// One compile at a time in the process, whichever [`Compiler`] runs it: neither runtime
/// compiler promises thread safety across programs in every release, and compiles happen
/// once per start.
static SERIAL: Mutex<()> = Mutex::new(());

impl Default for Compiler {
    fn default() -> Self {
        Self::new()
    }
}

impl Compiler {
    /// A compiler that looks in the usual places.
    pub fn new() -> Self {
        Self::with_paths(CompilerPaths::default())
    }

    /// A compiler that tries exactly `paths`.
    pub fn with_paths(paths: CompilerPaths) -> Self {
        Self {
            paths,
            amd: OnceLock::new(),
            nvidia: OnceLock::new(),
        }
    }

    /// Compiles `source` for `target`; `kernels` are the `extern "C"` names that must be in
    /// the result.
    pub fn compile(
        &self,
        source: &str,
        kernels: &[&str],
        target: Target,
    ) -> Result<CompiledModule, CompileError> {
        let plan = self.plan(target)?;
        self.run(&plan, source, kernels)
    }

    /// As [`Self::compile`], but takes the result from `cache` when an earlier compile of the
    /// same source, kernels, target and compiler version left it there, and stores it there
    /// otherwise. Returns whether it came from the cache. A cache that cannot be written is
    /// logged and otherwise ignored.
    pub fn compile_cached(
        &self,
        cache: &CodeCache,
        source: &str,
        kernels: &[&str],
        target: Target,
    ) -> Result<(CompiledModule, bool), CompileError> {
        let plan = self.plan(target)?;
        let key = CodeCache::key(
            target.name(),
            &plan.compiler,
            &plan.options,
            kernels,
            source,
        );
        if let Some(module) = cache.load(target.name(), &key) {
            return Ok((module, true));
        }
        let module = self.run(&plan, source, kernels)?;
        if let Err(e) = cache.store(&key, &module) {
            tracing::warn!("{e}");
        }
        Ok((module, false))
    }

    /// The compiler `target` would be compiled with, and its version, as the cache key and
    /// [`CompiledModule::compiler`] record it.
    pub fn compiler_id(&self, target: Target) -> Result<String, CompileError> {
        Ok(self.plan(target)?.compiler)
    }

    fn amd(&self, target: Target) -> Result<&AmdCompiler, CompileError> {
        let loaded = self.amd.get_or_init(|| {
            let rtc = Hiprtc::load_from(&self.paths.hiprtc)?;
            let rocm = rocm_version(&rtc);
            Ok(AmdCompiler { rtc, rocm })
        });
        loaded.as_ref().map_err(|e| CompileError::CompilerNotFound {
            target,
            source: e.clone(),
        })
    }

    fn nvidia(&self, target: Target) -> Result<&Nvrtc, CompileError> {
        let loaded = self
            .nvidia
            .get_or_init(|| Nvrtc::load_from(&self.paths.nvrtc));
        loaded.as_ref().map_err(|e| CompileError::CompilerNotFound {
            target,
            source: e.clone(),
        })
    }

    fn plan(&self, target: Target) -> Result<Plan, CompileError> {
        match target.vendor() {
            Vendor::Amd => {
                let amd = self.amd(target)?;
                let needs = target.min_rocm().unwrap_or((0, 0));
                if let Some(found) = amd.rocm {
                    if (found.major, found.minor) < needs {
                        return Err(CompileError::RocmTooOld {
                            target,
                            found,
                            needs,
                        });
                    }
                }
                let (major, minor) = amd
                    .rtc
                    .version()
                    .map_err(|source| CompileError::Hiprtc { target, source })?;
                let rocm = amd.rocm.map_or_else(|| "unknown".into(), |v| v.to_string());
                Ok(Plan {
                    target,
                    compiler: format!("hiprtc {major}.{minor}, ROCm {rocm}"),
                    options: vec![format!("--offload-arch={}", target.name()), "-O3".into()],
                })
            }
            Vendor::Nvidia => {
                let rtc = self.nvidia(target)?;
                let nvrtc_error = |source| CompileError::Nvrtc { target, source };
                let (major, minor) = rtc.version().map_err(nvrtc_error)?;
                let supported = rtc.supported_archs().map_err(nvrtc_error)?;
                let wanted = target.compute_capability().unwrap_or_default();
                if !supported.contains(&wanted) {
                    return Err(CompileError::UnsupportedByNvrtc {
                        target,
                        version: format!("{major}.{minor}"),
                        supported: supported
                            .iter()
                            .map(|a| format!("sm_{a}"))
                            .collect::<Vec<_>>()
                            .join(", "),
                    });
                }
                Ok(Plan {
                    target,
                    compiler: format!("NVRTC {major}.{minor}"),
                    options: vec![
                        format!("--gpu-architecture={}", target.name()),
                        "--ptxas-options=-v".into(),
                    ],
                })
            }
        }
    }

    fn run(
        &self,
        plan: &Plan,
        source: &str,
        kernels: &[&str],
    ) -> Result<CompiledModule, CompileError> {
        let target = plan.target;
        let _serial = SERIAL
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let (code, log, kernels) = match target.vendor() {
            Vendor::Amd => {
                let out = self
                    .amd(target)?
                    .rtc
                    .compile(source, SOURCE_NAME, &plan.options)
                    .map_err(|source| CompileError::Hiprtc { target, source })?;
                let facts = facts::amd(&out.code, kernels);
                (out.code, out.log, facts)
            }
            Vendor::Nvidia => {
                let out = self
                    .nvidia(target)?
                    .compile(source, SOURCE_NAME, &plan.options)
                    .map_err(|source| CompileError::Nvrtc { target, source })?;
                let facts = facts::nvidia(&out.code, &out.log, kernels);
                (out.code, out.log, facts)
            }
        };
        Ok(CompiledModule {
            target: target.name().into(),
            compiler: plan.compiler.clone(),
            kernels: kernels.map_err(|source| CompileError::Facts { target, source })?,
            code,
            log,
        })
    }
}

/// The ROCm release of a loaded hiprtc, from the HIP runtime beside it (ROCm 5's hiprtc is
/// the runtime itself). hiprtc's own version is no guide: ROCm 5.2's says 9.0.
fn rocm_version(rtc: &Hiprtc) -> Option<HipVersion> {
    let path = rtc.path();
    let is_runtime = path
        .file_name()
        .is_some_and(|n| n.to_string_lossy().starts_with("libamdhip64"));
    let mut candidates = Vec::new();
    if is_runtime {
        candidates.push(path.to_path_buf());
    } else if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        candidates.extend(hip::RUNTIME_SEARCH.names.iter().map(|n| dir.join(n)));
    }
    candidates.extend(hip::RUNTIME_SEARCH.candidates());
    Hip::load_from(&candidates).ok()?.runtime_version().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_compiler_is_one_line_naming_the_target_and_paths() {
        let compiler = Compiler::with_paths(CompilerPaths {
            hiprtc: vec![PathBuf::from("/nonexistent/libhiprtc.so")],
            nvrtc: vec![PathBuf::from("/nonexistent/libnvrtc.so.12")],
        });
        for (target, path) in [
            ("gfx906", "/nonexistent/libhiprtc.so"),
            ("sm_90", "/nonexistent/libnvrtc.so.12"),
        ] {
            let err = compiler
                .compile("", &[], target.parse().unwrap())
                .unwrap_err();
            let msg = err.to_string();
            assert!(
                matches!(err, CompileError::CompilerNotFound { .. }),
                "{msg}"
            );
            assert!(!msg.contains('\n'), "{msg}");
            assert!(
                msg.starts_with(&format!("cannot compile for {target}: ")),
                "{msg}"
            );
            assert!(msg.contains(path), "{msg}");
        }
    }
}
