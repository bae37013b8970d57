//! `pod version`: the version, the build, and the CPU kernels this machine will run.

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
    let cuda = cfg!(feature = "cuda");
    let info = serde_json::json!({
        "name": "pod",
        "version": env!("CARGO_PKG_VERSION"),
        "agent": pod_node::mesh::agent_version(),
        "target": target,
        "debug_build": cfg!(debug_assertions),
        "features": { "cuda": cuda, "rocm": false },
        "cpu_features": cpu_features,
        "cpu_kernels": cpu_kernels,
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
    println!("cuda      {}", on(cuda));
    println!("rocm      off (not available in this version)");
    println!(
        "cpu       {cpu_kernels} kernels ({})",
        if cpu_features.is_empty() {
            "baseline".to_owned()
        } else {
            cpu_features.join(", ")
        }
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
