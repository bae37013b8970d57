//! Opening a GPU runtime where the machine has no GPU, the way `pod` finds the libraries: an
//! environment variable naming the file. One test in this binary, since it sets the process's
//! environment.
//!
//! Debian's ROCm 5.2 runtime (`libamdhip64-5`, which `scripts/gpu-toolchains` installs) loads
//! on any machine and then sees no device. Without it the test prints why and passes; with
//! `POD_GPU_TOOLCHAINS=required` (as CI sets it) it fails instead.

use pod_inference::gpu::compile::Compiler;
use pod_inference::gpu::runtime::hip::HipRuntime;
use pod_inference::gpu::runtime::OpenError;

#[test]
fn pod_hip_path_opens_the_runtime_and_a_machine_without_gpus_is_one_line() {
    let cache = tempfile::tempdir().unwrap();
    let compiler = Compiler::new();

    std::env::set_var("POD_HIP_PATH", "libamdhip64.so.5");
    match HipRuntime::open(&compiler, 0, cache.path()) {
        Err(OpenError::Library(e)) => {
            assert!(
                std::env::var("POD_GPU_TOOLCHAINS").as_deref() != Ok("required"),
                "POD_GPU_TOOLCHAINS=required but libamdhip64.so.5 is missing: {e}"
            );
            eprintln!("skipped: {e}");
        }
        Err(err @ OpenError::NoDevice { .. }) => {
            let msg = err.to_string();
            assert!(!msg.contains('\n'), "{msg}");
            assert!(msg.starts_with("no HIP device: "), "{msg}");
        }
        Err(other) => panic!("expected no device, got: {other}"),
        Ok(runtime) => panic!("this test expects a machine without GPUs, found {runtime:?}"),
    }
}
