//! `pod device list`, `pod device compile` and `pod device check`: which GPUs this machine
//! offers pod (or why none), whether pod's kernels compile for a GPU architecture (no GPU
//! needed), and whether a device computes what the CPU computes.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use pod_inference::gpu::check::{check_model, run_checks, CheckOptions, CheckReport};
use pod_inference::gpu::compile::{CompiledModule, Compiler, Target, Vendor};
use pod_inference::gpu::devices::{self, Backend, BackendReport};
use pod_inference::gpu::emulator::Emulator;
use pod_inference::gpu::kernels::{self, Platform, KERNELS};
use pod_inference::gpu::runtime::cuda::CudaRuntime;
use pod_inference::gpu::runtime::hip::HipRuntime;
use pod_inference::gpu::DeviceRuntime;

#[derive(Debug, Subcommand)]
pub(crate) enum DeviceCommand {
    /// GPUs per backend (HIP for AMD, CUDA for NVIDIA): name, architecture, memory, runtime
    /// and driver versions; or, for each backend, why it has none (library not found, no
    /// device, permission denied on /dev/kfd).
    List(ListArgs),
    /// Compile every kernel for a GPU architecture with its runtime compiler (hiprtc for
    /// gfx*, NVRTC for sm_*), without a GPU, and report per kernel what the compiler says of
    /// registers and scratch memory.
    Compile(CompileArgs),
    /// Run small random-weight models in every weight format on a device and compare its
    /// logits and greedy tokens with the CPU decoder's: a table of errors, bounds, pass/fail
    /// and tokens/s, non-zero exit if any check fails. Needs no model file.
    Check(CheckArgs),
}

#[derive(Debug, Args)]
pub(crate) struct CheckArgs {
    /// The device: auto (the first GPU found), rocm[:N], cuda[:N], or emulator (pod's kernels
    /// run on the CPU, lanes emulated: slow, but the same source the GPUs run).
    #[arg(long, default_value = "auto")]
    device: String,
    /// Lanes per warp for the emulator: 32 (NVIDIA) or 64 (AMD GCN/CDNA such as gfx906).
    #[arg(long, default_value_t = 64, value_parser = parse_warp)]
    warp: u32,
    /// Check this model file (llama, mistral, gemma3, qwen2 or qwen3) instead of the tiny
    /// random-weight model per format.
    #[arg(long, conflicts_with = "shape")]
    model: Option<PathBuf>,
    /// Check a random-weight model of this shape (tiny, llama-1b, llama-8b, qwen2-1.5b, ...)
    /// in --format instead of the tiny model per format: the kernels at a realistic size.
    #[arg(long)]
    shape: Option<String>,
    /// Weight format of the --shape model.
    #[arg(long, default_value = "q4_k_m", requires = "shape")]
    format: String,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
pub(crate) struct ListArgs {
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
pub(crate) struct CompileArgs {
    /// The architecture: gfx906 (MI50/MI60, Radeon VII), gfx908, gfx90a, gfx942, gfx1030,
    /// gfx1100, ..., sm_80, sm_86, sm_89, sm_90, ...
    #[arg(long)]
    target: String,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

pub(crate) fn exec(home: &Path, cmd: DeviceCommand) -> Result<()> {
    match cmd {
        DeviceCommand::List(args) => list(args),
        DeviceCommand::Compile(args) => compile(args),
        DeviceCommand::Check(args) => check(home, args),
    }
}

fn list(args: ListArgs) -> Result<()> {
    let found = devices::discover();
    if args.json {
        println!("{}", serde_json::to_string_pretty(&found)?);
        return Ok(());
    }
    for report in &found.backends {
        print_backend(report);
    }
    Ok(())
}

fn print_backend(report: &BackendReport) {
    let versions = [
        report
            .runtime_version
            .as_deref()
            .map(|v| format!("runtime {v}")),
        report
            .driver_version
            .as_deref()
            .map(|v| format!("driver {v}")),
    ];
    let versions: Vec<String> = versions.into_iter().flatten().collect();
    if versions.is_empty() {
        println!("{}", report.backend);
    } else {
        println!("{} ({})", report.backend, versions.join(", "));
    }
    for d in &report.devices {
        let free = d
            .memory_free
            .map(|f| format!(", {} free", gib(f)))
            .unwrap_or_default();
        println!(
            "  {}: {} ({}{}), {} total{free}, {} compute units, warp {}",
            d.ordinal,
            d.name,
            d.arch,
            if d.target.is_some() {
                ""
            } else {
                ", unknown to pod"
            },
            gib(d.memory_total),
            d.multiprocessors,
            d.warp_size,
        );
    }
    if let Some(why) = &report.unavailable {
        println!("  none: {why}");
    }
    match (&report.compiler, &report.compiler_error) {
        (Some(c), _) => println!("  compiler: {c}"),
        (None, Some(e)) => println!("  compiler: none: {e}"),
        (None, None) => {}
    }
}

fn gib(bytes: u64) -> String {
    format!("{:.1} GiB", bytes as f64 / (1u64 << 30) as f64)
}

fn compile(args: CompileArgs) -> Result<()> {
    let target: Target = args.target.parse()?;
    let platform = match target.vendor() {
        Vendor::Amd => Platform::Hip,
        Vendor::Nvidia => Platform::Cuda,
    };
    let names: Vec<&str> = KERNELS.iter().map(|k| k.name).collect();
    let source = kernels::source(platform);
    let started = std::time::Instant::now();
    let module = Compiler::new()
        .compile(&source, &names, target)
        .with_context(|| format!("kernels did not compile for {target}"))?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&module)?);
        return Ok(());
    }
    print_module(&module, started.elapsed().as_secs_f64());
    if module.kernels.len() != names.len() {
        bail!(
            "the code object for {target} holds {} of {} kernels",
            module.kernels.len(),
            names.len()
        );
    }
    Ok(())
}

fn print_module(module: &CompiledModule, seconds: f64) {
    let cell = |v: Option<u32>| v.map_or_else(|| "-".to_owned(), |v| v.to_string());
    println!(
        "{} kernels compiled for {} by {} in {seconds:.1} s ({} bytes of code)",
        module.kernels.len(),
        module.target,
        module.compiler,
        module.code.len()
    );
    println!(
        "{:<24} {:>9} {:>8} {:>8} {:>8} {:>11}",
        "KERNEL", "REGISTERS", "SCALAR", "PRIVATE", "SPILLED", "SPILL BYTES"
    );
    for k in &module.kernels {
        println!(
            "{:<24} {:>9} {:>8} {:>8} {:>8} {:>11}",
            k.name,
            cell(k.registers),
            cell(k.scalar_registers),
            cell(k.private_bytes),
            cell(k.spilled_registers),
            cell(k.spill_store_bytes),
        );
    }
}

fn parse_warp(s: &str) -> Result<u32, String> {
    match s {
        "32" => Ok(32),
        "64" => Ok(64),
        _ => Err(format!("`{s}` is not a warp width (32 or 64)")),
    }
}

/// Which device `pod device check` runs on.
enum CheckDevice {
    Emulator,
    Rocm(usize),
    Cuda(usize),
}

fn parse_check_device(spec: &str) -> Result<CheckDevice> {
    let (kind, ordinal) = match spec.split_once(':') {
        Some((k, n)) => (
            k,
            n.parse::<usize>()
                .with_context(|| format!("bad device ordinal in `{spec}`"))?,
        ),
        None => (spec, 0),
    };
    Ok(match kind {
        "emulator" => CheckDevice::Emulator,
        "rocm" => CheckDevice::Rocm(ordinal),
        "cuda" => CheckDevice::Cuda(ordinal),
        "auto" => {
            let found = devices::discover();
            let first = found
                .backends
                .iter()
                .find_map(|b| b.devices.first().map(|d| (b.backend, d.ordinal)));
            match first {
                Some((Backend::Hip, n)) => CheckDevice::Rocm(n),
                Some((Backend::Cuda, n)) => CheckDevice::Cuda(n),
                None => bail!(
                    "no GPU found (`pod device list` says why); `--device emulator` runs the checks on the CPU"
                ),
            }
        }
        _ => bail!("unknown device `{spec}` (expected auto, emulator, rocm[:N] or cuda[:N])"),
    })
}

fn check(home: &Path, args: CheckArgs) -> Result<()> {
    let device = parse_check_device(&args.device)?;
    // A --shape model is written first, to a directory that lives as long as the check.
    let synthetic = tempfile::tempdir().context("cannot create a temporary directory")?;
    let model = match (&args.model, &args.shape) {
        (Some(path), _) => Some(path.clone()),
        (None, Some(shape)) => {
            let path = synthetic.path().join("model.gguf");
            pod_node::bench::write_synthetic(&path, shape, &args.format, 1)?;
            Some(path)
        }
        (None, None) => None,
    };
    let model = model.as_deref();
    let cache = home.join("kernels");
    let (name, report) = match device {
        CheckDevice::Emulator => {
            let emulator = Emulator::compile_cached(args.warp, &cache)
                .context("cannot build the kernel emulator")?;
            (
                format!("emulator (warp {})", args.warp),
                checks_on(Arc::new(emulator), model),
            )
        }
        CheckDevice::Rocm(n) => {
            let runtime = HipRuntime::open(&Compiler::new(), n, &cache)
                .with_context(|| format!("cannot open rocm:{n}"))?;
            (
                format!("rocm:{n} {} ({})", runtime.name(), runtime.target()),
                checks_on(Arc::new(runtime), model),
            )
        }
        CheckDevice::Cuda(n) => {
            let runtime = CudaRuntime::open(&Compiler::new(), n, &cache)
                .with_context(|| format!("cannot open cuda:{n}"))?;
            (
                format!("cuda:{n} {} ({})", runtime.name(), runtime.target()),
                checks_on(Arc::new(runtime), model),
            )
        }
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_checks(&name, &report);
    }
    if !report.passed() {
        let failed = report.checks.iter().filter(|c| !c.passed).count();
        bail!(
            "{failed} of {} checks failed on {name}",
            report.checks.len()
        );
    }
    Ok(())
}

/// The checks on `runtime`: of the model at `model`, else of the tiny model per format.
fn checks_on<R: DeviceRuntime>(runtime: Arc<R>, model: Option<&Path>) -> CheckReport {
    match model {
        Some(path) => check_model(runtime, path, CheckOptions::default()),
        None => run_checks(runtime, CheckOptions::default()),
    }
}

fn print_checks(device: &str, report: &CheckReport) {
    println!("{device}: against the CPU decoder");
    println!(
        "{:<12} {:>11} {:>11} {:>11} {:>7} {:>6} {:>9}",
        "FORMAT", "MAX ERR", "MEAN ERR", "BOUND", "GREEDY", "RESULT", "TOK/S"
    );
    for c in &report.checks {
        println!(
            "{:<12} {:>11.3e} {:>11.3e} {:>11.3e} {:>7} {:>6} {:>9.1}",
            c.format,
            c.max_abs_error,
            c.mean_abs_error,
            c.bound,
            if c.greedy_equal { "same" } else { "DIFF" },
            if c.passed { "pass" } else { "FAIL" },
            c.tokens_per_second,
        );
        if let Some(e) = &c.error {
            println!("         {e}");
        }
    }
}
