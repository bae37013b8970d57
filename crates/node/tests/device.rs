//! `pod device list` and `pod device compile`, run as a user would, on a machine that may have
//! no GPU: discovery must say why there is none, and the kernels must compile offline where the
//! runtime compilers are installed (`scripts/gpu-toolchains`; CI sets
//! `POD_GPU_TOOLCHAINS=required`, so there a missing compiler fails instead of skipping).

use std::process::{Command, Output};

use pod_inference::gpu::kernels::KERNELS;

fn pod(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_pod"))
        .args(["--log", "warn"])
        .args(args)
        .output()
        .expect("run pod")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn toolchains_required() -> bool {
    std::env::var("POD_GPU_TOOLCHAINS").as_deref() == Ok("required")
}

#[test]
fn device_list_reports_each_backend_with_devices_or_the_reason_for_none() {
    let o = pod(&["device", "list", "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let found: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    let backends = found["backends"].as_array().expect("backends");
    let names: Vec<&str> = backends
        .iter()
        .map(|b| b["backend"].as_str().expect("backend name"))
        .collect();
    assert_eq!(names, ["hip", "cuda"]);
    for b in backends {
        let devices = b["devices"].as_array().expect("devices");
        if devices.is_empty() {
            let why = &b["unavailable"];
            assert!(why["kind"].is_string(), "no devices and no reason: {b}");
        } else {
            for d in devices {
                assert!(d["memory_total"].as_u64().unwrap_or(0) > 0, "{d}");
                assert!(d["arch"].as_str().is_some_and(|a| !a.is_empty()), "{d}");
            }
        }
    }

    let text = pod(&["device", "list"]);
    assert!(text.status.success(), "{}", stderr(&text));
    let out = String::from_utf8_lossy(&text.stdout);
    assert!(out.lines().any(|l| l.starts_with("HIP")), "{out}");
    assert!(out.lines().any(|l| l.starts_with("CUDA")), "{out}");
}

#[test]
fn an_unknown_target_is_one_line_naming_the_known_ones() {
    let o = pod(&["device", "compile", "--target", "gfx9999"]);
    assert!(!o.status.success());
    let err = stderr(&o);
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "{err}");
    assert!(lines[0].starts_with("error: "), "{err}");
    assert!(
        lines[0].contains("gfx9999") && lines[0].contains("gfx906"),
        "{err}"
    );
}

/// Compiles every kernel for `target` and checks that the code object holds each with the
/// compiler's register count; skips (saying why) when the compiler is missing and not required.
fn compiles_every_kernel_for(target: &str) {
    let o = pod(&["device", "compile", "--target", target, "--json"]);
    if !o.status.success() {
        let err = stderr(&o);
        assert!(
            !toolchains_required(),
            "compiling for {target} failed: {err}"
        );
        assert!(err.contains("cannot compile for"), "{err}");
        eprintln!("skipped: no runtime compiler for {target}: {err}");
        return;
    }
    let module: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    assert_eq!(module["target"], target);
    let kernels = module["kernels"].as_array().expect("kernels");
    let names: Vec<&str> = kernels
        .iter()
        .map(|k| k["name"].as_str().expect("name"))
        .collect();
    let expected: Vec<&str> = KERNELS.iter().map(|k| k.name).collect();
    assert_eq!(names, expected);
    for k in kernels {
        assert!(k["registers"].as_u64().is_some_and(|r| r > 0), "{k}");
    }
}

#[test]
fn the_kernels_compile_for_gfx906_without_a_gpu() {
    compiles_every_kernel_for("gfx906");
}

#[test]
fn the_kernels_compile_for_sm_90_without_a_gpu() {
    compiles_every_kernel_for("sm_90");
}
