//! `pod device list` and `pod device compile`: which GPUs this machine offers pod (or why
//! none), and whether pod's kernels compile for a GPU architecture, with no GPU needed.

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use pod_inference::gpu::compile::{CompiledModule, Compiler, Target, Vendor};
use pod_inference::gpu::devices::{self, BackendReport};
use pod_inference::gpu::kernels::{self, Platform, KERNELS};

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

pub(crate) fn exec(cmd: DeviceCommand) -> Result<()> {
    match cmd {
        DeviceCommand::List(args) => list(args),
        DeviceCommand::Compile(args) => compile(args),
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
