//! Runs the kernel source on the CPU, each lane a fiber, for tests without a GPU.
//!
//! [`Emulator::compile`] builds [`source`]`(`[`Platform::Emulator`]`)`, the runtime in
//! `emulator/runtime.cpp` and one generated launcher per kernel into a shared library with the
//! host C++ compiler (`$CXX`, else `c++`), at warp width 32 or 64, and loads it;
//! [`Emulator::compile_cached`] keeps the library for the next process. Launches go by kernel
//! name ([`Emulator::launch`]), with grid and block dimensions, dynamic shared memory and
//! arguments, as on a GPU runtime; device memory is host memory.
//!
//! Inside a launch every lane of a block is a fiber on the calling thread and blocks run one
//! after another; lanes switch only at `__syncthreads` and shuffles, where each waits for the
//! rest of its block or warp. A barrier that only some lanes reach fails the launch with
//! [`LaunchError::Deadlock`] instead of hanging.
//!
//! Unsafe code: calls into the loaded library. Its invariants:
//! - the library is the one [`Emulator::compile`] built from this crate's source, and every
//!   launcher's parameter types were checked against [`KERNELS`] when it was loaded
//!   ([`CompileError::Signature`]), so a launch whose arguments pass [`KernelSpec::check`]
//!   calls each kernel with values of its own parameter types;
//! - the library's runtime keeps global state (fibers, shared memory), and two emulators
//!   loading the same cached file share one copy of it, so every launch in the process holds
//!   one mutex;
//! - what the kernels do with the addresses they are given is the caller's contract, as on a
//!   GPU: [`Emulator::launch`] is `unsafe`.
#![allow(unsafe_code)]

use std::ffi::{c_char, c_void, CStr, OsString};
use std::fmt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, PoisonError};

use libloading::Library;

use super::kernels::{kernel, source, ArgError, KernelArg, KernelSpec, Platform, KERNELS};

/// The emulator's runtime, compiled after the kernels.
const RUNTIME: &str = include_str!("emulator/runtime.cpp");

/// `pod_launch_<name>(dims, shared_bytes, args)`: 0, 1 on deadlock, 2 for bad dimensions.
type LaunchFn = unsafe extern "C" fn(*const u32, u32, *const *mut c_void) -> i32;
/// `pod_signature_<name>()`: one letter per parameter, NUL-terminated, static.
type SignatureFn = unsafe extern "C" fn() -> *const c_char;

/// Building or loading the emulator failed.
#[derive(Debug, thiserror::Error)]
pub enum CompileError {
    /// Only warps of 32 and 64 lanes exist (or a cached library was built for another).
    #[error("warp width {0} is not the one asked for, 32 or 64")]
    Warp(u32),
    /// The source could not be written to a temporary directory.
    #[error("writing the emulator's source: {0}")]
    Io(#[from] std::io::Error),
    /// The C++ compiler could not be started.
    #[error("running the C++ compiler {compiler:?}: {source}")]
    Spawn {
        /// The compiler tried.
        compiler: OsString,
        /// Why it did not start.
        source: std::io::Error,
    },
    /// The C++ compiler rejected the source.
    #[error("the C++ compiler failed ({status}):\n{stderr}")]
    Rejected {
        /// Its exit status.
        status: std::process::ExitStatus,
        /// What it printed.
        stderr: String,
    },
    /// The compiled library could not be loaded, or lacks a launcher.
    #[error("loading the compiled emulator: {0}")]
    Load(#[from] libloading::Error),
    /// A kernel's compiled parameters are not those [`KERNELS`] lists.
    #[error("kernel {kernel} takes ({compiled}) in the source but ({listed}) in KERNELS")]
    Signature {
        /// The kernel.
        kernel: &'static str,
        /// Its parameter letters in the source.
        compiled: String,
        /// Its parameter letters in [`KERNELS`].
        listed: String,
    },
}

/// A launch failed; the kernel may have run in part.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    /// Unknown kernel, or arguments that do not fit its parameters.
    #[error(transparent)]
    Args(#[from] ArgError),
    /// Empty dimensions, or more than 1024 threads per block.
    #[error("{kernel}: grid {grid:?} with blocks of {block:?} cannot be launched")]
    Dimensions {
        /// The kernel.
        kernel: &'static str,
        /// Grid dimensions.
        grid: [u32; 3],
        /// Block dimensions.
        block: [u32; 3],
    },
    /// Some lanes wait at a barrier that others never reach.
    #[error("{0}: lanes wait at a barrier the rest of their block or warp never reaches")]
    Deadlock(&'static str),
}

/// The kernel source compiled for the CPU at one warp width, ready to launch kernels.
pub struct Emulator {
    warp: u32,
    launchers: Vec<(&'static KernelSpec, LaunchFn)>,
    /// Kept loaded while the launchers are in use; dropped last.
    _library: Library,
}

impl fmt::Debug for Emulator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Emulator")
            .field("warp", &self.warp)
            .finish_non_exhaustive()
    }
}

/// The emulator's complete C++ source: preamble, kernels, runtime, launchers.
fn emulator_source() -> String {
    let mut s = source(Platform::Emulator);
    s.push('\n');
    s.push_str(RUNTIME);
    for k in KERNELS {
        let n = k.name;
        s.push_str(&format!(
            "extern \"C\" const char* pod_signature_{n}() {{ return pod_emu::signature({n}); }}\n\
             extern \"C\" int pod_launch_{n}(const unsigned* dims, unsigned shared, void** args) \
             {{ return pod_emu::launch({n}, dims, shared, args); }}\n"
        ));
    }
    s
}

impl Emulator {
    /// Compiles the kernels for warps of `warp` lanes (32 or 64) and loads them. Takes
    /// seconds: compile once per process and share, or use [`compile_cached`](Self::compile_cached).
    pub fn compile(warp: u32) -> Result<Self, CompileError> {
        let dir = scratch_dir(&std::env::temp_dir(), warp)?;
        let lib = dir.join("kernels.so");
        let built = build(&dir, &lib, warp).and_then(|()| Self::load(&lib, warp));
        // Once loaded, the library no longer needs its file.
        let _ = std::fs::remove_dir_all(&dir);
        built
    }

    /// As [`compile`](Self::compile), but keeps the compiled library in `cache` (created if
    /// missing), named by a hash of the source, the flags and the compiler, and loads it from
    /// there while they stay the same: one compile for every process that runs the same
    /// source. `cache` must be a directory only this user can write, since whatever library
    /// it holds under the expected name is loaded.
    pub fn compile_cached(warp: u32, cache: &Path) -> Result<Self, CompileError> {
        let key = fnv1a(
            [
                emulator_source().as_bytes(),
                compiler().as_encoded_bytes(),
                FLAGS.join(" ").as_bytes(),
                &warp.to_le_bytes(),
            ]
            .concat()
            .as_slice(),
        );
        let lib = cache.join(format!("kernels-{key:016x}-w{warp}.so"));
        if !lib.exists() {
            std::fs::create_dir_all(cache)?;
            let dir = scratch_dir(cache, warp)?;
            let fresh = dir.join("kernels.so");
            // Renamed into place whole, so that a process racing this one loads either no
            // file or a complete one.
            let built = build(&dir, &fresh, warp)
                .and_then(|()| std::fs::rename(&fresh, &lib).map_err(CompileError::from));
            let _ = std::fs::remove_dir_all(&dir);
            built?;
        }
        Self::load(&lib, warp)
    }

    /// Loads a library [`build`] made and checks its kernels' signatures.
    fn load(lib: &Path, warp: u32) -> Result<Self, CompileError> {
        if warp != 32 && warp != 64 {
            return Err(CompileError::Warp(warp));
        }
        // SAFETY: the library is one `build` compiled from this crate's source (the cache
        // directory's owner guarantees that for cached ones); loading it runs only the static
        // constructors of its runtime, which make empty containers.
        let library = unsafe { Library::new(lib) }?;
        // SAFETY: `pod_emu_warp` is the runtime's `unsigned pod_emu_warp()`.
        let built_warp =
            unsafe { (*library.get::<unsafe extern "C" fn() -> u32>(b"pod_emu_warp")?)() };
        if built_warp != warp {
            return Err(CompileError::Warp(built_warp));
        }
        let mut launchers = Vec::with_capacity(KERNELS.len());
        for k in KERNELS {
            // SAFETY: the generated launchers have exactly these C signatures.
            let (signature, launch) = unsafe {
                let sig =
                    library.get::<SignatureFn>(format!("pod_signature_{}", k.name).as_bytes())?;
                let launch =
                    library.get::<LaunchFn>(format!("pod_launch_{}", k.name).as_bytes())?;
                (*sig, *launch)
            };
            // SAFETY: the signature functions return a pointer to a static NUL-terminated
            // array.
            let compiled = unsafe { CStr::from_ptr(signature()) }
                .to_string_lossy()
                .into_owned();
            let listed: String = k.params.iter().map(|p| p.letter()).collect();
            if compiled != listed {
                return Err(CompileError::Signature {
                    kernel: k.name,
                    compiled,
                    listed,
                });
            }
            launchers.push((k, launch));
        }
        Ok(Self {
            warp,
            launchers,
            _library: library,
        })
    }

    /// Lanes per warp: 32 or 64.
    pub fn warp(&self) -> u32 {
        self.warp
    }

    /// A kernel argument for memory the kernel only reads.
    pub fn arg<T>(data: &[T]) -> KernelArg {
        KernelArg::Ptr(data.as_ptr() as usize as u64)
    }

    /// A kernel argument for memory the kernel may write.
    pub fn arg_mut<T>(data: &mut [T]) -> KernelArg {
        KernelArg::Ptr(data.as_mut_ptr() as usize as u64)
    }

    /// Runs kernel `name` over `grid` blocks of `block` threads, with `shared_bytes` of
    /// dynamic shared memory, and returns when it has finished.
    ///
    /// # Safety
    /// As on a GPU, the kernel trusts its arguments: every address must point to host memory
    /// that stays valid for the launch and holds everything the kernel reads or writes for
    /// these sizes and dimensions (see [`KERNELS`]), memory it writes must come from
    /// [`Emulator::arg_mut`] (an exclusive borrow) and not overlap memory other arguments
    /// read, and no other thread may touch that memory during the launch.
    pub unsafe fn launch(
        &self,
        name: &str,
        grid: [u32; 3],
        block: [u32; 3],
        shared_bytes: u32,
        args: &[KernelArg],
    ) -> Result<(), LaunchError> {
        let spec = kernel(name)?;
        spec.check(args)?;
        let launch = self
            .launchers
            .iter()
            .find(|(k, _)| k.name == spec.name)
            .map(|&(_, f)| f)
            .ok_or_else(|| ArgError::UnknownKernel(name.to_owned()))?;
        // One 8-byte slot per argument, its value in the first bytes, where the launcher
        // reads it as its parameter's type.
        let mut values: Vec<u64> = args
            .iter()
            .map(|a| match *a {
                KernelArg::Ptr(p) => p,
                KernelArg::I32(v) => slot(v.to_ne_bytes()),
                KernelArg::F32(v) => slot(v.to_ne_bytes()),
            })
            .collect();
        let pointers: Vec<*mut c_void> = values
            .iter_mut()
            .map(|v| (v as *mut u64).cast::<c_void>())
            .collect();
        let dims = [grid[0], grid[1], grid[2], block[0], block[1], block[2]];
        // The runtime's state is global to its library, and one library may be loaded by
        // several emulators: one launch at a time in the whole process.
        static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());
        let _launching = ONE_AT_A_TIME.lock().unwrap_or_else(PoisonError::into_inner);
        // SAFETY: the arguments match the kernel's compiled parameter types (checked above
        // against KERNELS, which were checked against the library at load); the memory they
        // address is the caller's contract.
        let rc = unsafe { launch(dims.as_ptr(), shared_bytes, pointers.as_ptr()) };
        match rc {
            0 => Ok(()),
            1 => Err(LaunchError::Deadlock(spec.name)),
            _ => Err(LaunchError::Dimensions {
                kernel: spec.name,
                grid,
                block,
            }),
        }
    }
}

/// Compiler flags besides the warp width and the paths.
const FLAGS: [&str; 7] = [
    "-std=c++20",
    "-O2",
    "-shared",
    "-fPIC",
    "-w",
    // No fused multiply-adds, so element-wise results match the CPU path's exactly.
    "-ffp-contract=off",
    // The kernels read byte buffers as wider types, as GPU code does.
    "-fno-strict-aliasing",
];

/// The host C++ compiler: `$CXX`, else `c++`.
fn compiler() -> OsString {
    std::env::var_os("CXX").unwrap_or_else(|| "c++".into())
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// A new directory under `parent` for one build.
fn scratch_dir(parent: &Path, warp: u32) -> Result<PathBuf, CompileError> {
    static BUILDS: AtomicUsize = AtomicUsize::new(0);
    let dir = parent.join(format!(
        "pod-gpu-emulator-{}-{}-{}",
        std::process::id(),
        warp,
        BUILDS.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// Compiles the emulator's source in `dir` into the shared library `lib`.
fn build(dir: &Path, lib: &Path, warp: u32) -> Result<(), CompileError> {
    if warp != 32 && warp != 64 {
        return Err(CompileError::Warp(warp));
    }
    let src = dir.join("kernels.cpp");
    std::fs::write(&src, emulator_source())?;
    let compiler = compiler();
    let out = Command::new(&compiler)
        .args(FLAGS)
        .arg(format!("-DPOD_WARP={warp}"))
        .arg("-o")
        .arg(lib)
        .arg(&src)
        .output()
        .map_err(|source| CompileError::Spawn {
            compiler: compiler.clone(),
            source,
        })?;
    if !out.status.success() {
        return Err(CompileError::Rejected {
            status: out.status,
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        });
    }
    Ok(())
}

/// A 4-byte value at the start of an 8-byte slot.
fn slot(bytes: [u8; 4]) -> u64 {
    let mut b = [0u8; 8];
    b[..4].copy_from_slice(&bytes);
    u64::from_ne_bytes(b)
}

#[cfg(test)]
mod tests;
