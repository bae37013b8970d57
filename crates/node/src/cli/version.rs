//! `pod version`: the version, the build, the CPU kernels this machine will run, the GPU
//! backends with the devices they found, and the architectures each of pod's decoders runs.

use anyhow::Result;
use clap::Args;

#[derive(Debug, Args)]
pub(crate) struct VersionArgs {
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

pub(crate) fn exec(args: VersionArgs) -> Result<()> {
    let target = format!(
        "{}-{}{}",
        std::env::consts::ARCH,
        std::env::consts::OS,
        if cfg!(target_env = "gnu") {
            "-gnu"
        } else if cfg!(target_env = "musl") {
            "-musl"
        } else {
            ""
        }
    );
    let cpu_features = cpu_features();
    let cpu_kernels = pod_inference::kernels::cpu_level();
    let (cpu_decoder, gpu_decoder) = pod_inference::decoder_architectures();
    let cuda = cfg!(feature = "cuda");
    let found = pod_inference::gpu::devices::discover();
    let gpus: Vec<serde_json::Value> = found
        .backends
        .iter()
        .map(|b| {
            serde_json::json!({
                "backend": b.backend,
                "library": b.library,
                "runtime_version": b.runtime_version,
                "devices": b.devices.iter().map(|d| serde_json::json!({
                    "ordinal": d.ordinal,
                    "name": d.name,
                    "arch": d.arch,
                })).collect::<Vec<_>>(),
                "unavailable": b.unavailable.as_ref().map(ToString::to_string),
            })
        })
        .collect();
    let info = serde_json::json!({
        "name": "pod",
        "version": env!("CARGO_PKG_VERSION"),
        "agent": pod_node::mesh::agent_version(),
        "target": target,
        "debug_build": cfg!(debug_assertions),
        "features": { "candle_cuda": cuda, "rocm": true, "cuda": true },
        "gpu_backends": gpus,
        "cpu_features": cpu_features,
        "cpu_kernels": cpu_kernels,
        "decoders": { "cpu": cpu_decoder, "gpu": gpu_decoder },
        "protocols": {
            "infer": pod_node::remote::PROTOCOL.to_string(),
            "kad": pod_node::mesh::KAD_PROTOCOL.to_string(),
            "capabilities_topic": pod_node::mesh::capability::CAPABILITY_TOPIC,
            "api": "openai/v1",
        },
    });
    if args.json {
        println!("{}", serde_json::to_string_pretty(&info)?);
        return Ok(());
    }
    let on = |b: bool| if b { "on" } else { "off" };
    println!("pod {}", env!("CARGO_PKG_VERSION"));
    println!(
        "target    {target}{}",
        if cfg!(debug_assertions) {
            " (debug build)"
        } else {
            ""
        }
    );
    for b in &found.backends {
        let name = match b.backend {
            pod_inference::gpu::devices::Backend::Hip => "rocm",
            pod_inference::gpu::devices::Backend::Cuda => "cuda",
        };
        let devices: Vec<String> = b
            .devices
            .iter()
            .map(|d| format!("{name}:{} {} ({})", d.ordinal, d.name, d.arch))
            .collect();
        let state = match (&b.unavailable, devices.is_empty()) {
            (_, false) => devices.join(", "),
            (Some(why), true) => format!("no device: {why}"),
            (None, true) => "no device".to_owned(),
        };
        println!("{name:<9} built in (runtime loaded at start); {state}");
    }
    println!("candle    CUDA backend {}", on(cuda));
    println!(
        "cpu       {cpu_kernels} kernels ({})",
        if cpu_features.is_empty() {
            "baseline".to_owned()
        } else {
            cpu_features.join(", ")
        }
    );
    println!(
        "decoders  cpu: {}; gpu: {}; other architectures on candle",
        cpu_decoder.join(", "),
        gpu_decoder.join(", ")
    );
    println!(
        "protocols {}, {}, {}",
        pod_node::remote::PROTOCOL,
        pod_node::mesh::KAD_PROTOCOL,
        pod_node::mesh::capability::CAPABILITY_TOPIC
    );
    Ok(())
}

/// The SIMD extensions this CPU has, asked at run time: the kernels choose among them when
/// they start, whatever the binary was compiled for.
fn cpu_features() -> Vec<&'static str> {
    #[cfg(target_arch = "x86_64")]
    let found = [
        ("avx2", std::arch::is_x86_feature_detected!("avx2")),
        ("fma", std::arch::is_x86_feature_detected!("fma")),
        ("f16c", std::arch::is_x86_feature_detected!("f16c")),
        ("avx512f", std::arch::is_x86_feature_detected!("avx512f")),
        (
            "avx512vnni",
            std::arch::is_x86_feature_detected!("avx512vnni"),
        ),
    ];
    #[cfg(target_arch = "aarch64")]
    let found = [("neon", std::arch::is_aarch64_feature_detected!("neon"))];
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    let found: [(&str, bool); 0] = [];
    found
        .into_iter()
        .filter_map(|(name, on)| on.then_some(name))
        .collect()
}
