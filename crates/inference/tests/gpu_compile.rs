//! Offline compilation with the real runtime compilers: hiprtc (ROCm 5.2 from Debian's
//! `libamdhip64-5` and `libhiprtc-builtins5`) for gfx906, NVRTC (PyPI's
//! `nvidia-cuda-nvrtc-cu12`) for sm_90. Neither needs a GPU; `scripts/gpu-toolchains` installs
//! both and prints the environment that finds them.
//!
//! Without a toolchain a test prints why and passes; with `POD_GPU_TOOLCHAINS=required` (as
//! CI sets it) a missing toolchain fails the test instead.

mod gpu {
    use std::path::PathBuf;
    use std::process::Command;

    use pod_inference::gpu::compile::{CodeCache, CompileError, Compiler, Target};

    /// A vector add, and a kernel using a warp shuffle and the int8 dot product, in the common
    /// subset of CUDA and HIP.
    const SOURCE: &str = r#"
#if defined(__HIP_PLATFORM_AMD__) || defined(__HIP__)
#define DOT4(a, b, c) __builtin_amdgcn_sdot4((a), (b), (c), false)
#define SHFL_XOR(v, m) __shfl_xor((v), (m), 32)
#else
#define DOT4(a, b, c) __dp4a((a), (b), (c))
#define SHFL_XOR(v, m) __shfl_xor_sync(0xffffffffu, (v), (m), 32)
#endif

extern "C" __global__ void vector_add(const float* a, const float* b, float* c, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) c[i] = a[i] + b[i];
}

// Sums the int8x4 dot products of 32 lanes into out[group].
extern "C" __global__ void dot_i8(const int* a, const int* b, int* out, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    int acc = i < n ? DOT4(a[i], b[i], 0) : 0;
    for (int mask = 16; mask > 0; mask >>= 1) acc += SHFL_XOR(acc, mask);
    if (i < n && (threadIdx.x & 31) == 0) out[i / 32] = acc;
}
"#;

    const KERNELS: &[&str] = &["vector_add", "dot_i8"];

    fn required() -> bool {
        std::env::var("POD_GPU_TOOLCHAINS").is_ok_and(|v| v == "required")
    }

    /// Skips (returns `None`) when `what` is missing, unless toolchains are required.
    fn skip_or_fail<T>(what: &str, reason: impl std::fmt::Display) -> Option<T> {
        assert!(
            !required(),
            "POD_GPU_TOOLCHAINS=required but {what} is missing: {reason}"
        );
        eprintln!("skipped: {what} is missing ({reason}); run scripts/gpu-toolchains");
        None
    }

    /// A compiler whose toolchain for `target` is present.
    fn compiler_for(target: &str) -> Option<(Compiler, Target)> {
        let target: Target = target.parse().unwrap();
        let compiler = Compiler::new();
        match compiler.compiler_id(target) {
            Ok(_) => Some((compiler, target)),
            Err(e @ CompileError::CompilerNotFound { .. }) => skip_or_fail(target.name(), e),
            Err(e) => panic!("{e}"),
        }
    }

    fn llvm_objdump() -> Option<PathBuf> {
        let names = std::env::var_os("POD_LLVM_OBJDUMP")
            .map(PathBuf::from)
            .into_iter()
            .chain(
                (14..=20)
                    .rev()
                    .map(|v| PathBuf::from(format!("llvm-objdump-{v}"))),
            )
            .chain([PathBuf::from("llvm-objdump")]);
        names.into_iter().find(|name| {
            Command::new(name)
                .arg("--version")
                .output()
                .is_ok_and(|o| o.status.success())
        })
    }

    #[test]
    fn gfx906_code_objects_hold_both_kernels_and_the_int8_dot_instruction() {
        let Some((compiler, target)) = compiler_for("gfx906") else {
            return;
        };
        let module = compiler.compile(SOURCE, KERNELS, target).unwrap();
        assert_eq!(&module.code[..4], b"\x7fELF");
        assert_eq!(module.target, "gfx906");
        assert!(
            module.compiler.starts_with("hiprtc "),
            "{}",
            module.compiler
        );
        let names: Vec<_> = module.kernels.iter().map(|k| k.name.as_str()).collect();
        assert_eq!(names, KERNELS);
        for kernel in &module.kernels {
            assert!(kernel.registers.is_some_and(|r| r > 0), "{kernel:?}");
            assert!(kernel.scalar_registers.is_some_and(|r| r > 0), "{kernel:?}");
            assert_eq!(kernel.private_bytes, Some(0), "{kernel:?}");
            assert_eq!(kernel.spilled_registers, Some(0), "{kernel:?}");
        }

        let Some(objdump) = llvm_objdump() else {
            skip_or_fail::<()>("llvm-objdump", "not on PATH; set POD_LLVM_OBJDUMP");
            return;
        };
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kernels.hsaco");
        std::fs::write(&path, &module.code).unwrap();
        let out = Command::new(&objdump)
            .args(["-d", "--mcpu=gfx906"])
            .arg(&path)
            .output()
            .unwrap();
        let listing = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let dot_i8 = listing
            .split("<dot_i8>:")
            .nth(1)
            .expect("dot_i8 disassembled");
        assert!(dot_i8.contains("v_dot4_i32_i8"), "{listing}");
    }

    /// pod's own integer-dot matrix kernels, compiled for gfx906, use its int8 dot
    /// instruction: the speed of quantised decode on an MI50 rests on it.
    #[test]
    fn pods_quantised_matvec_kernels_use_the_int8_dot_instruction_on_gfx906() {
        use pod_inference::gpu::kernels::{self, Platform};

        let Some((compiler, target)) = compiler_for("gfx906") else {
            return;
        };
        let names: Vec<&str> = kernels::KERNELS.iter().map(|k| k.name).collect();
        let module = compiler
            .compile(&kernels::source(Platform::Hip), &names, target)
            .unwrap();
        let Some(objdump) = llvm_objdump() else {
            skip_or_fail::<()>("llvm-objdump", "not on PATH; set POD_LLVM_OBJDUMP");
            return;
        };
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pod.hsaco");
        std::fs::write(&path, &module.code).unwrap();
        let out = Command::new(&objdump)
            .args(["-d", "--mcpu=gfx906"])
            .arg(&path)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let listing = String::from_utf8_lossy(&out.stdout);
        for name in [
            "matvec_q4_0",
            "matvec_q4_1",
            "matvec_q5_0",
            "matvec_q5_1",
            "matvec_q8_0",
            "matvec_q4_k",
            "matvec_q5_k",
            "matvec_q6_k",
        ] {
            let body = listing
                .split(&format!("<{name}>:"))
                .nth(1)
                .unwrap_or_else(|| panic!("{name} not disassembled"));
            let body = body.split("\n\n").next().unwrap_or(body);
            assert!(
                body.contains("v_dot4_i32_i8"),
                "{name} has no v_dot4_i32_i8:\n{body}"
            );
        }
    }

    #[test]
    fn sm_90_cubins_hold_both_kernels_with_registers_and_spills() {
        let Some((compiler, target)) = compiler_for("sm_90") else {
            return;
        };
        let module = compiler.compile(SOURCE, KERNELS, target).unwrap();
        assert_eq!(&module.code[..4], b"\x7fELF");
        assert!(module.compiler.starts_with("NVRTC "), "{}", module.compiler);
        let names: Vec<_> = module.kernels.iter().map(|k| k.name.as_str()).collect();
        assert_eq!(names, KERNELS);
        for kernel in &module.kernels {
            assert!(kernel.registers.is_some_and(|r| r > 0), "{kernel:?}");
            assert_eq!(kernel.private_bytes, Some(0), "{kernel:?}");
            assert_eq!(kernel.spill_store_bytes, Some(0), "{kernel:?}");
        }
        assert!(
            module.log.contains("Compiling entry function 'dot_i8'"),
            "{}",
            module.log
        );
    }

    #[test]
    fn compile_errors_are_one_line_and_keep_the_log() {
        let broken = "extern \"C\" __global__ void broken(int* p) { p[0] = undeclared_name; }";
        for name in ["gfx906", "sm_90"] {
            let Some((compiler, target)) = compiler_for(name) else {
                continue;
            };
            let err = compiler.compile(broken, &["broken"], target).unwrap_err();
            let msg = err.to_string();
            assert!(!msg.contains('\n'), "{msg}");
            assert!(msg.starts_with(&format!("compiling for {name}: ")), "{msg}");
            assert!(msg.contains("undeclared_name"), "{msg}");
            assert!(
                err.log().is_some_and(|log| log.contains("undeclared_name")),
                "{err:?}"
            );
        }
    }

    #[test]
    fn a_kernel_missing_from_the_source_is_named() {
        for name in ["gfx906", "sm_90"] {
            let Some((compiler, target)) = compiler_for(name) else {
                continue;
            };
            let err = compiler
                .compile(SOURCE, &["vector_add", "no_such_kernel"], target)
                .unwrap_err();
            let msg = err.to_string();
            assert!(!msg.contains('\n'), "{msg}");
            assert!(
                msg.contains("\"no_such_kernel\" is not in the compiled code object"),
                "{msg}"
            );
        }
    }

    #[test]
    fn a_second_compile_comes_from_the_cache() {
        for name in ["gfx906", "sm_90"] {
            let Some((compiler, target)) = compiler_for(name) else {
                continue;
            };
            let dir = tempfile::tempdir().unwrap();
            let cache = CodeCache::new(dir.path().join("gpu"));
            let (first, cached) = compiler
                .compile_cached(&cache, SOURCE, KERNELS, target)
                .unwrap();
            assert!(!cached);
            let (second, cached) = compiler
                .compile_cached(&cache, SOURCE, KERNELS, target)
                .unwrap();
            assert!(cached);
            assert_eq!(first.code, second.code);
            assert_eq!(first.kernels, second.kernels);
            // A fresh compiler (a second start) finds it too.
            let (_, cached) = Compiler::new()
                .compile_cached(&cache, SOURCE, KERNELS, target)
                .unwrap();
            assert!(cached);
            // Another source is another entry.
            let (_, cached) = compiler
                .compile_cached(&cache, &format!("{SOURCE}\n// changed"), KERNELS, target)
                .unwrap();
            assert!(!cached);
        }
    }

    #[test]
    fn targets_newer_than_the_installed_rocm_are_refused_before_compiling() {
        let Some((compiler, _)) = compiler_for("gfx906") else {
            return;
        };
        let id = compiler.compiler_id("gfx906".parse().unwrap()).unwrap();
        if !id.contains("ROCm 5.2") {
            eprintln!("skipped: needs ROCm 5.2's hiprtc, found {id}");
            return;
        }
        // ROCm 5.2's hiprtc would abort the process on gfx1100.
        let err = compiler
            .compile(SOURCE, KERNELS, "gfx1100".parse().unwrap())
            .unwrap_err();
        assert!(matches!(err, CompileError::RocmTooOld { .. }), "{err}");
        assert_eq!(
            err.to_string(),
            "cannot compile for gfx1100: hiprtc of ROCm 5.2.21153 does not know it (needs ROCm 5.4 or later)"
        );
    }
}
