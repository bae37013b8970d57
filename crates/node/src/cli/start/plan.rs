//! What `pod start` would run, from the layered settings: the profile, models, device, API
//! keys and mesh, checked as the node would, and printed by `--dry-run`.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use bytesize::ByteSize;
use libp2p::Multiaddr;
use pod_inference::gpu::devices::{self, Backend};
use pod_inference::model::stage::StageSizes;
use pod_inference::{DeviceSpec, Placement};
use pod_node::catalogue;
use pod_node::config::{self, Source, Sources, StartArgs};
use pod_node::loader::{self, ResolveError};
use pod_node::mesh::capability::MAX_TRUSTED;
use pod_node::mesh::mesh_key::{read_mesh_key, readable_by_others};
use pod_node::mesh::{is_quic, MeshConfig};
use pod_node::node;
use pod_node::profile::{self, HostResources, Profile};
use pod_node::stage::placement::{self, StageLayers};
use pod_node::store::{ModelFormat, ModelStore};

/// What `pod start` would run, from the layered settings: everything but the bound sockets.
#[derive(Debug)]
pub(super) struct Plan {
    pub(super) profile: profile::Choice,
    pub(super) models: Vec<PlannedModel>,
    pub(super) device_name: String,
    /// The opened device; `None` for a dry run or without models.
    pub(super) placement: Option<Placement>,
    pub(super) api_keys: pod_api::ApiKeys,
    /// The address the API binds: `--api-host`, resolved when it is a name.
    pub(super) api_host: IpAddr,
    pub(super) mesh: MeshConfig,
    /// What `--layers auto` can tell before it hears the mesh; `None` without it.
    pub(super) auto_layers: Option<AutoLayers>,
}

/// What `--layers auto` can tell before it hears the mesh: the memory it may fill and, when
/// the model file is on disk, its sizes and the blocks it would take in an empty mesh.
#[derive(Debug)]
pub(super) struct AutoLayers {
    /// Bytes it may fill, when known.
    pub(super) budget: Option<u64>,
    /// Where that comes from.
    pub(super) budget_from: &'static str,
    /// The model's sizes, when its file is on disk.
    pub(super) sizes: Option<StageSizes>,
    /// The blocks it would take alone, or why none fit.
    pub(super) alone: Option<Result<placement::Choice, placement::PlacementError>>,
}

/// A model `pod start` would load.
#[derive(Debug, serde::Serialize)]
pub(super) struct PlannedModel {
    /// As given: catalogue name or path.
    pub(super) name: String,
    /// `chat` or `embedding`.
    pub(super) kind: &'static str,
    /// Bytes on disk (or to download), when known.
    pub(super) size: Option<u64>,
    /// Whether it is on disk already.
    pub(super) downloaded: bool,
}

/// Resolves the profile, models, device and keys, and checks them as `pod start` would.
pub(super) fn plan(store: &ModelStore, args: &StartArgs, home: &Path) -> Result<Plan> {
    let hardware = HostResources::detect(args.device);
    let choice = args.profile.choose(&hardware);
    let names: Vec<String> = if args.models.is_empty() {
        choice
            .profile
            .default_models()
            .into_iter()
            .map(str::to_owned)
            .collect()
    } else {
        args.models.clone()
    };
    if let Some(range) = args.layers {
        if names.len() != 1 {
            bail!("--layers {range} serves blocks of one model: give exactly one --model");
        }
    }
    let auto_layers = match (args.layers, names.first()) {
        (Some(StageLayers::Auto), Some(name)) => Some(auto_layers(store, name, args)?),
        _ => None,
    };
    let mut models = Vec::new();
    for name in names {
        models.push(plan_model(store, &name, !args.no_pull)?);
    }
    let (device_name, placement) = if models.is_empty() {
        ("none".to_owned(), None)
    } else if args.dry_run {
        (find_device(args.device)?, None)
    } else {
        let placement = open_device(args.device, home)?;
        (placement.name(), Some(placement))
    };
    let api_keys = match &args.api_key_file {
        Some(path) if !args.no_api => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read API key file {}", path.display()))?;
            let keys = pod_api::ApiKeys::parse(&text);
            if keys.is_empty() {
                bail!("API key file {} holds no keys", path.display());
            }
            keys
        }
        _ => pod_api::ApiKeys::default(),
    };
    // Resolved once, here; without an API nothing binds it, so a name is not looked up.
    let api_host = if args.no_api {
        IpAddr::from([127, 0, 0, 1])
    } else {
        args.api_host.resolve()?
    };
    node::check_api_exposure(!args.no_api, api_host, &api_keys, args.public_api)?;
    pod_api::ApiConfig {
        keys: api_keys.clone(),
        cors_origins: args.cors_origins.clone(),
        ..pod_api::ApiConfig::default()
    }
    .check()?;
    check_access(args)?;
    Ok(Plan {
        mesh: mesh_config(args, choice.profile)?,
        profile: choice,
        models,
        device_name,
        placement,
        api_keys,
        api_host,
        auto_layers,
    })
}

/// What `--layers auto` can tell of model `name` before it hears the mesh.
fn auto_layers(store: &ModelStore, name: &str, args: &StartArgs) -> Result<AutoLayers> {
    let (budget, budget_from) = match args.max_memory {
        Some(b) => (Some(b.as_u64()), "--max-memory"),
        None => (placement::available_memory(), "available memory"),
    };
    let sizes = match loader::resolve(store, name, false) {
        Ok(resolved) if resolved.format != ModelFormat::Gguf => {
            bail!("--layers auto: {name} is not a chat model: only GGUF chat models run as pipeline stages")
        }
        Ok(resolved) => Some(
            StageSizes::read(&resolved.path)
                .with_context(|| format!("cannot read the sizes of {name}"))?,
        ),
        Err(_) => None,
    };
    let alone = sizes
        .as_ref()
        .zip(budget)
        .map(|(s, b)| placement::choose(s, b, &[]));
    Ok(AutoLayers {
        budget,
        budget_from,
        sizes,
        alone,
    })
}

fn plan_model(store: &ModelStore, name: &str, pull: bool) -> Result<PlannedModel> {
    let kind = |f: ModelFormat| match f {
        ModelFormat::Gguf => "chat",
        ModelFormat::SentenceTransformers => "embedding",
    };
    match loader::resolve(store, name, false) {
        Ok(resolved) => Ok(PlannedModel {
            name: name.to_owned(),
            kind: kind(resolved.format),
            size: catalogue::find(name)
                .map(|e| e.size())
                .or_else(|| std::fs::metadata(&resolved.path).ok().map(|m| m.len())),
            downloaded: true,
        }),
        // A file modified since its download is fetched again like a missing one.
        Err(ResolveError::NotPulled(_) | ResolveError::Modified { .. }) if pull => {
            let entry = catalogue::find(name).context("a catalogued model left the catalogue")?;
            Ok(PlannedModel {
                name: name.to_owned(),
                kind: kind(entry.format),
                size: Some(entry.size()),
                downloaded: false,
            })
        }
        Err(e) => Err(anyhow!("cannot load model `{name}`: {e}")),
    }
}

/// Opens the device (loading its runtime and compiling pod's kernels for it, cached under
/// `<home>/kernels`), failing before anything binds when a named device cannot be opened.
fn open_device(spec: DeviceSpec, home: &Path) -> Result<Placement> {
    if let DeviceSpec::Rocm(_) = spec {
        // The HIP runtime reads it itself; pod passes the environment through untouched.
        if let Some(v) = std::env::var_os("HSA_OVERRIDE_GFX_VERSION") {
            tracing::info!(
                hsa_override_gfx_version = %v.to_string_lossy(),
                "ROCm: HSA_OVERRIDE_GFX_VERSION is set; the HIP runtime will treat the GPU as that gfx version"
            );
        }
    }
    let placement = spec
        .place(&home.join("kernels"))
        .map_err(|e| anyhow!("--device {spec}: {e}"))?;
    tracing::info!(device = %placement.describe(), "compute device opened");
    Ok(placement)
}

/// The device `spec` would open, found without opening it (a dry run compiles nothing): a
/// named GPU must be present.
fn find_device(spec: DeviceSpec) -> Result<String> {
    let backend = match spec {
        DeviceSpec::Cpu | DeviceSpec::Emulator => return Ok(spec.to_string()),
        DeviceSpec::Auto => None,
        DeviceSpec::Rocm(n) => Some((Backend::Hip, n)),
        DeviceSpec::Cuda(n) => Some((Backend::Cuda, n)),
    };
    let found = devices::discover();
    let name = |b: Backend, n: usize| match b {
        Backend::Hip => DeviceSpec::Rocm(n).to_string(),
        Backend::Cuda => DeviceSpec::Cuda(n).to_string(),
    };
    for report in &found.backends {
        match backend {
            None => {
                if let Some(d) = report.devices.first() {
                    return Ok(name(report.backend, d.ordinal));
                }
            }
            Some((b, n)) if b == report.backend => {
                if report.devices.iter().any(|d| d.ordinal == n) {
                    return Ok(spec.to_string());
                }
                let why = match &report.unavailable {
                    Some(e) => e.to_string(),
                    None => format!("there are {} {b} device(s)", report.devices.len()),
                };
                bail!("--device {spec}: no such device: {why}");
            }
            Some(_) => {}
        }
    }
    Ok("cpu".to_owned())
}

/// Checks `--trust` and `--serve-to`, warning about settings that do not do what they may
/// seem to.
fn check_access(args: &StartArgs) -> Result<()> {
    use pod_node::access::ServeTo;
    if args.trust.len() > MAX_TRUSTED {
        bail!(
            "--trust: at most {MAX_TRUSTED} trusted peers, not {}",
            args.trust.len()
        );
    }
    match args.serve_to {
        ServeTo::Any if !args.trust.is_empty() => {
            tracing::warn!("--trust has no effect with --serve-to any: every peer may use this pod")
        }
        ServeTo::Trusted if args.trust.is_empty() => {
            tracing::warn!("--serve-to trusted with no --trust peers: this pod serves no peer")
        }
        _ => {}
    }
    Ok(())
}

/// The mesh's settings; with `--mesh-key`, the key (a bad file is an error naming it) and
/// TCP only.
fn mesh_config(args: &StartArgs, profile: Profile) -> Result<MeshConfig> {
    let mesh_key = match &args.mesh_key {
        Some(path) => {
            let key = read_mesh_key(path)?;
            if readable_by_others(path) {
                tracing::warn!(
                    file = %path.display(),
                    "the mesh key file can be read by other users; chmod 600 it"
                );
            }
            Some(key)
        }
        None => None,
    };
    let (mut listen, mut listen_optional) = if args.listen.is_empty() {
        MeshConfig::listen_on_port(args.p2p_port)
    } else {
        (args.listen.clone(), Vec::new())
    };
    if mesh_key.is_some() {
        listen.retain(|a| !is_quic(a));
        listen_optional.retain(|a| !is_quic(a));
        let given = [
            ("--listen", &args.listen),
            ("--external-addr", &args.external_addr),
            ("--bootstrap", &args.bootstrap),
        ];
        for (flag, addrs) in given {
            if let Some(a) = addrs.iter().find(|a| is_quic(a)) {
                bail!("{flag} {a}: a private mesh (--mesh-key) runs over TCP only; QUIC cannot carry its key");
            }
        }
    }
    let announce_interval = Duration::from_secs(args.announce_interval);
    Ok(MeshConfig {
        listen,
        listen_optional,
        external: args.external_addr.clone(),
        bootstrap: args.bootstrap.clone(),
        mdns: !args.no_mdns,
        relay_server: profile.relays(),
        relay_circuit_bytes: args.relay_circuit_mib * 1024 * 1024,
        nat_trust_private: args.nat_trust_private,
        upnp: !args.no_upnp,
        announce_interval,
        peer_expiry: announce_interval * 3,
        mesh_key,
        ..MeshConfig::default()
    })
}

/// Bytes of attention cache the engine may hold: `--kv-memory`, else
/// [`profile::default_kv_memory`].
pub(super) fn kv_memory_bytes(args: &StartArgs) -> usize {
    args.kv_memory
        .map_or_else(profile::default_kv_memory, |mib| mib << 20)
}

/// Where a pod that serves files listens for bulk connections: every IP its mesh listens on,
/// at `--bulk-port`, else the first mesh port plus one (any free port when that is 0 or
/// 65535). Empty with `--no-bulk` and for profiles that serve no files.
pub(super) fn bulk_listen(
    args: &StartArgs,
    mesh: &MeshConfig,
    profile: Profile,
) -> Vec<SocketAddr> {
    use libp2p::multiaddr::Protocol;
    if args.no_bulk || !profile.serves_files() {
        return Vec::new();
    }
    let mut out: Vec<SocketAddr> = Vec::new();
    for addr in mesh.listen.iter().chain(&mesh.listen_optional) {
        let (mut ip, mut port) = (None, None);
        for p in addr.iter() {
            match p {
                Protocol::Ip4(a) => ip = Some(IpAddr::V4(a)),
                Protocol::Ip6(a) => ip = Some(IpAddr::V6(a)),
                Protocol::Tcp(p) | Protocol::Udp(p) => port = Some(p),
                _ => {}
            }
        }
        let (Some(ip), Some(port)) = (ip, port) else {
            continue;
        };
        if out.iter().all(|a| a.ip() != ip) {
            let port = args.bulk_port.unwrap_or_else(|| {
                if port == 0 {
                    0
                } else {
                    port.checked_add(1).unwrap_or(0)
                }
            });
            out.push(SocketAddr::new(ip, port));
        }
    }
    out
}

/// `--layers auto` in the JSON of a dry run.
fn auto_layers_json(auto: &AutoLayers) -> serde_json::Value {
    let (alone, error) = match &auto.alone {
        Some(Ok(c)) => (Some(c.layers.to_string()), None),
        Some(Err(e)) => (None, Some(e.to_string())),
        None => (None, None),
    };
    serde_json::json!({
        "decided": "at start",
        "max_memory": auto.budget,
        "max_memory_from": auto.budget_from,
        "alone": alone,
        "error": error,
        "sizes": auto.sizes.as_ref().map(|s| serde_json::json!({
            "blocks": s.blocks,
            "embeddings": s.embeddings,
            "output_norm": s.output_norm,
            "output": s.output,
            "kv_per_position": s.kv_per_position,
            "kv_positions": placement::KV_POSITIONS,
        })),
    })
}

pub(super) fn print(
    args: &StartArgs,
    plan: &Plan,
    config_file: serde_json::Value,
    sources: &Sources,
) -> Result<()> {
    let strings = |v: &[Multiaddr]| v.iter().map(ToString::to_string).collect::<Vec<_>>();
    let serve_mesh = !args.no_serve_mesh && !plan.models.is_empty();
    let api_url = format!("http://{}", SocketAddr::new(plan.api_host, args.api_port));
    let auth = if plan.api_keys.is_empty() {
        "none"
    } else {
        "api-key"
    };
    let json = serde_json::json!({
        "profile": plan.profile.profile.as_str(),
        "requested_profile": args.profile.as_str(),
        "reason": (!plan.profile.reason.is_empty()).then_some(&plan.profile.reason),
        "models": plan.models,
        "layers": args.layers.map(|r| r.to_string()),
        "auto_layers": plan.auto_layers.as_ref().map(auto_layers_json),
        "device": { "requested": args.device.to_string(), "resolved": plan.device_name },
        "api": {
            "enabled": !args.no_api,
            "url": (!args.no_api).then_some(&api_url),
            "host": plan.api_host,
            "port": args.api_port,
            "auth": auth,
        },
        "mesh": {
            "listen": strings(&plan.mesh.listen),
            "listen_optional": strings(&plan.mesh.listen_optional),
            "external": strings(&plan.mesh.external),
            "bootstrap": strings(&plan.mesh.bootstrap),
            "mdns": plan.mesh.mdns,
            "relay_server": plan.mesh.relay_server,
            "relay_circuit_bytes": plan.mesh.relay_circuit_bytes,
            "nat_trust_private": plan.mesh.nat_trust_private,
            "upnp": plan.mesh.upnp,
            "serve_mesh": serve_mesh,
            "announce_interval_seconds": args.announce_interval,
            "private": plan.mesh.mesh_key.is_some(),
            "mesh_key_fingerprint": plan.mesh.mesh_key.map(|k| k.fingerprint().to_string()),
        },
        "serve_to": args.serve_to.as_str(),
        "trust": args.trust.iter().map(ToString::to_string).collect::<Vec<_>>(),
        "storage": plan.profile.profile.serves_files(),
        "serve_rate_bytes_per_second": args.serve_rate,
        "bulk_listen": bulk_listen(args, &plan.mesh, plan.profile.profile)
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>(),
        "pull_bulk": !args.no_bulk,
        "route": config::route_name(args.route),
        "engine": {
            "max_batch": args.max_batch,
            "max_queue": args.max_queue,
            "ctx_size": args.ctx_size,
            "kv_memory_mib": kv_memory_bytes(args) >> 20,
            "prefix_cache_mib": args.prefix_cache,
        },
        "shutdown_grace_seconds": args.shutdown_grace,
        "config_file": config_file,
        "sources": sources,
    });
    if args.json {
        println!("{}", serde_json::to_string_pretty(&json)?);
        return Ok(());
    }
    let yes = |b: bool| if b { "yes" } else { "no" };
    let p = plan.profile.profile;
    if args.profile == Profile::Auto {
        println!("profile   {p} (auto: {})", plan.profile.reason);
    } else {
        println!("profile   {p}: {}", p.summary());
    }
    if plan.models.is_empty() {
        println!("models    none");
    }
    for (i, model) in plan.models.iter().enumerate() {
        println!(
            "{:<10}{:<28} {:<10} {:>9}  {}",
            if i == 0 { "models" } else { "" },
            model.name,
            model.kind,
            model
                .size
                .map_or("-".to_owned(), |s| format!("{} MB", s / 1_000_000)),
            if model.downloaded {
                "downloaded"
            } else {
                "to download"
            }
        );
    }
    println!("device    {} (--device {})", plan.device_name, args.device);
    if args.no_api {
        println!("API       none (--no-api)");
    } else {
        println!(
            "API       {api_url}/v1 and /health, /metrics, /pod/v1/*; API keys: {}",
            if plan.api_keys.is_empty() {
                "none".to_owned()
            } else {
                format!("{} accepted", plan.api_keys.len())
            }
        );
    }
    match (args.listen.is_empty(), plan.mesh.mesh_key.is_some()) {
        (true, false) => println!(
            "mesh      TCP and UDP (QUIC) port {} on every interface",
            args.p2p_port
        ),
        (true, true) => println!("mesh      TCP port {} on every interface", args.p2p_port),
        (false, _) => println!("mesh      {}", strings(&plan.mesh.listen).join(", ")),
    }
    match plan.mesh.mesh_key {
        Some(key) => println!(
            "private   yes: only pods with the key (fingerprint {}) can connect; TCP only, QUIC off",
            key.fingerprint()
        ),
        None => println!("private   no: the open mesh, any pod can connect (--mesh-key to close it)"),
    }
    if !plan.mesh.external.is_empty() {
        println!("external  {}", strings(&plan.mesh.external).join(", "));
    }
    if !plan.mesh.bootstrap.is_empty() {
        println!("bootstrap {}", strings(&plan.mesh.bootstrap).join(", "));
    }
    println!("mDNS      {}", if plan.mesh.mdns { "on" } else { "off" });
    println!("UPnP      {}", if plan.mesh.upnp { "on" } else { "off" });
    if plan.mesh.relay_server {
        println!(
            "relay     yes (circuit relay server for pods behind NAT; {} MiB per circuit)",
            plan.mesh.relay_circuit_bytes / (1024 * 1024)
        );
    } else {
        println!("relay     no (circuit relay server for pods behind NAT)");
    }
    if plan.mesh.nat_trust_private {
        println!("NAT       AutoNAT trusts peers at private addresses");
    }
    println!(
        "serving   {} (this node's models to peers)",
        yes(serve_mesh)
    );
    println!("storage   {} (model files to peers)", yes(p.serves_files()));
    match args.serve_to {
        pod_node::access::ServeTo::Any => println!("serve to  any peer"),
        pod_node::access::ServeTo::Trusted => println!(
            "serve to  trusted peers only: {}",
            if args.trust.is_empty() {
                "none".to_owned()
            } else {
                args.trust
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            }
        ),
    }
    let bulk = bulk_listen(args, &plan.mesh, p);
    if let Some(first) = bulk.first() {
        println!(
            "bulk      TCP {} (plain connections for model files, opened with tickets from the mesh)",
            match first.port() {
                0 => format!("any free port on {}", first.ip()),
                port => format!("port {port} on {}", first.ip()),
            }
        );
    }
    match (args.layers, &plan.auto_layers) {
        (Some(StageLayers::Blocks(range)), _) => println!(
            "stage     blocks {range} of the model, on the CPU, {}",
            if range.start == 0 {
                "as its head: serves its requests, the later blocks on the mesh's stages"
            } else {
                "as a stage: runs them for the pods holding the earlier blocks"
            }
        ),
        (Some(StageLayers::Auto), Some(auto)) => println!(
            "stage     blocks decided at start (--layers auto): those the mesh's pods cover \
             least, as many as fit in {}, on the CPU; {}",
            auto.budget.map_or_else(
                || "--max-memory (the available memory is unknown)".to_owned(),
                |b| format!("{} ({})", ByteSize(b).display().iec(), auto.budget_from)
            ),
            match (&auto.alone, &auto.sizes) {
                (Some(Ok(c)), Some(s)) => format!(
                    "alone in the mesh it would take blocks {} of {}",
                    c.layers,
                    s.total_layers()
                ),
                (Some(Err(e)), _) => e.to_string(),
                _ => "the model is not on disk yet to size it".to_owned(),
            }
        ),
        _ => {}
    }
    println!("routing   {}", config::route_name(args.route));
    println!(
        "config    {} ({})",
        config_file["path"].as_str().unwrap_or("?"),
        if config_file["found"] == true {
            "read"
        } else {
            "not found"
        }
    );
    let changed: Vec<String> = sources
        .iter()
        .filter(|(_, s)| **s != Source::Default)
        .map(|(k, s)| format!("{k} ({s})"))
        .collect();
    if !changed.is_empty() {
        println!("set by    {}", changed.join(", "));
    }
    Ok(())
}
