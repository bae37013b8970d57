//! `pod models`: list, download (from peers first, else the catalogue's sources), delete, and
//! write synthetic models.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use libp2p::Multiaddr;
use pod_node::catalogue::{self, CATALOGUE};
use pod_node::daemon_file::{DaemonFile, Liveness};
use pod_node::store::{ModelFormat, ModelStore};

use super::mesh_join::{join_mesh, MeshKeyArg};
use super::node_client::Api;

#[derive(Debug, Subcommand)]
pub(crate) enum ModelsCommand {
    /// Show the catalogue, which models are downloaded and, when the node running with this
    /// state directory serves model files (storage and full profiles), which ones it serves
    /// and to how many peers.
    List {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Download models (verified against their pinned SHA-256): from pods of the mesh that
    /// serve them (storage and full profiles) first, else from the catalogue's sources.
    Pull(PullArgs),
    /// Hash every file of the downloaded models (or of NAME) again and compare it with the
    /// pinned SHA-256: a table of OK, MODIFIED (changed on disk since its download; `pod
    /// models pull` fetches it again) or MISSING, non-zero exit unless every file is OK.
    Verify {
        /// Catalogue name; all downloaded models when omitted.
        name: Option<String>,
    },
    /// Delete a downloaded model.
    Remove {
        /// Catalogue name.
        name: String,
    },
    /// Write a llama-shaped GGUF chat model with random weights and a generated tokenizer,
    /// at a named shape (`tiny`, `llama-1b`, `llama-8b`) and weight format: real input for
    /// `pod bench`, `pod infer` and llama.cpp alike, to measure speed at realistic sizes
    /// without a download. Its answers are noise.
    Synthesize(SynthesizeArgs),
}

#[derive(Debug, Args)]
pub(crate) struct SynthesizeArgs {
    /// The shape: tiny (a few MB), llama-1b (Llama 3.2 1B), llama-8b (Llama 3.1 8B),
    /// qwen2-1.5b (Qwen2.5 1.5B), qwen3moe-30b-a3b (Qwen3 30B-A3B's layers, 4 of its 48),
    /// tiny-qwen2, tiny-qwen3, tiny-qwen3moe, tiny-long (one layer of tiny with a 32k
    /// context), and the other test shapes the unknown-shape error lists.
    #[arg(long, default_value = "tiny")]
    shape: String,
    /// Weight format: q4_0, q4_1, q5_0, q5_1, q8_0, q2_k, q3_k, q4_k, q5_k, q6_k, f16, bf16,
    /// f32, or q4_k_m / q5_k_m (llama.cpp's mixes).
    #[arg(long, default_value = "q4_k_m")]
    format: String,
    /// Seed of the random weights: the same seed writes the same file.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// The file to write (replaced if it exists).
    #[arg(long, short)]
    out: PathBuf,
}

#[derive(Debug, Args)]
pub(crate) struct PullArgs {
    /// Catalogue names; see `pod models list`.
    #[arg(required = true)]
    names: Vec<String>,
    /// Only the catalogue's sources; do not ask peers.
    #[arg(long)]
    no_peers: bool,
    /// A pod to join the mesh through, ending in /p2p/<PeerId> (repeatable). The node
    /// running with this state directory, if any, is used too; without either, mDNS.
    #[arg(long, value_name = "MULTIADDR")]
    bootstrap: Vec<Multiaddr>,
    /// Seconds to wait for peers that serve the model's files.
    #[arg(long, default_value_t = 3, value_name = "SECONDS")]
    peer_wait: u64,
    /// Only peers: fail, keeping what was fetched for the next pull to resume, rather than
    /// download from the catalogue's sources.
    #[arg(long, conflicts_with = "no_peers")]
    no_sources: bool,
    /// Fetch over mesh streams only (Noise-encrypted), never over the plain TCP bulk
    /// connections storage pods offer for speed (chunks are verified either way).
    #[arg(long)]
    no_bulk: bool,
    #[command(flatten)]
    mesh_key: MeshKeyArg,
}

pub(crate) fn exec(home: &Path, store: &ModelStore, cmd: ModelsCommand) -> Result<()> {
    match cmd {
        ModelsCommand::List { json } => list(home, store, json),
        ModelsCommand::Pull(args) => pull(home, store, args),
        ModelsCommand::Verify { name } => verify(store, name.as_deref()),
        ModelsCommand::Remove { name } => remove(store, &name),
        ModelsCommand::Synthesize(args) => synthesize(&args),
    }
}

fn verify(store: &ModelStore, name: Option<&str>) -> Result<()> {
    use pod_node::store::FileState;
    let entries: Vec<&catalogue::CatalogueEntry> = match name {
        Some(name) => vec![catalogue::find(name)
            .with_context(|| format!("unknown model `{name}`; see `pod models list`"))?],
        // Every model with something downloaded: a verification record or a file.
        None => CATALOGUE
            .iter()
            .filter(|e| store.model_dir(e.name).exists())
            .collect(),
    };
    println!("{:<24} {:<32} STATUS", "MODEL", "FILE");
    let (mut modified, mut missing) = (0, 0);
    for entry in entries {
        for (file, state) in store.verify(entry) {
            println!("{:<24} {:<32} {}", entry.name, file, state.as_str());
            match state {
                FileState::Ok => {}
                FileState::Modified => modified += 1,
                FileState::Missing => missing += 1,
            }
        }
    }
    if modified + missing > 0 {
        bail!(
            "{modified} model file(s) modified and {missing} missing; `pod models pull NAME` \
             fetches them again"
        );
    }
    Ok(())
}

fn synthesize(args: &SynthesizeArgs) -> Result<()> {
    eprintln!(
        "writing a random-weight {} model in {} to {}",
        args.shape,
        args.format,
        args.out.display()
    );
    pod_node::bench::write_synthetic(&args.out, &args.shape, &args.format, args.seed)?;
    let bytes = std::fs::metadata(&args.out)?.len();
    println!("{} ({})", args.out.display(), pod_node::profile::gib(bytes));
    Ok(())
}

fn list(home: &Path, store: &ModelStore, json: bool) -> Result<()> {
    let served = served_files(home);
    // Per model: whether the running node serves every file of it, and to how many
    // peers (the most of any one of its files).
    let serving = |e: &catalogue::CatalogueEntry| -> Option<u64> {
        let served = served.as_ref()?;
        e.files
            .iter()
            .map(|f| served.get(f.sha256).copied())
            .try_fold(0, |most, peers| Some(most.max(peers?)))
    };
    let rows: Vec<serde_json::Value> = CATALOGUE
        .iter()
        .map(|e| {
            serde_json::json!({
                "name": e.name,
                "kind": match e.format {
                    ModelFormat::Gguf => "chat",
                    ModelFormat::SentenceTransformers => "embedding",
                },
                "size": e.size(),
                "downloaded": store.is_present(e),
                "serving": serving(e).is_some(),
                "peers_served": serving(e).unwrap_or(0),
                "path": store.model_dir(e.name),
                "license": e.license,
                "description": e.description,
            })
        })
        .collect();
    if json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else {
        println!(
            "{:<24} {:<10} {:>9}  {:<10} {:<14} DESCRIPTION",
            "NAME", "KIND", "SIZE", "STATUS", "SERVED"
        );
        for e in CATALOGUE {
            println!(
                "{:<24} {:<10} {:>7} MB  {:<10} {:<14} {}",
                e.name,
                match e.format {
                    ModelFormat::Gguf => "chat",
                    ModelFormat::SentenceTransformers => "embedding",
                },
                e.size() / 1_000_000,
                if store.is_present(e) { "pulled" } else { "-" },
                match serving(e) {
                    Some(1) => "to 1 peer".to_owned(),
                    Some(n) => format!("to {n} peers"),
                    None => "-".to_owned(),
                },
                e.description
            );
        }
    }
    Ok(())
}

fn pull(home: &Path, store: &ModelStore, args: PullArgs) -> Result<()> {
    let PullArgs {
        names,
        no_peers,
        bootstrap,
        peer_wait,
        no_sources,
        no_bulk,
        mesh_key,
    } = args;
    let mut mesh: Option<(tokio::runtime::Runtime, pod_node::mesh::Client)> = None;
    for name in &names {
        let entry = catalogue::find(name).with_context(|| {
            format!(
                "unknown model `{name}` (known: {})",
                CATALOGUE
                    .iter()
                    .map(|e| e.name)
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })?;
        if store.is_present(entry) {
            println!("{name}: {} (already here)", store.model_dir(name).display());
            continue;
        }
        if !no_peers {
            if mesh.is_none() {
                let runtime =
                    tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
                let joined = runtime.block_on(join_mesh(home, &bootstrap, &mesh_key))?;
                mesh = Some((runtime, joined.mesh));
            }
            if let Some((runtime, client)) = &mesh {
                let wait = Duration::from_secs(peer_wait);
                match runtime.block_on(pod_node::blob::pull_via_mesh(
                    store,
                    entry,
                    client,
                    wait,
                    &pod_node::blob::PullOptions {
                        stats: None,
                        bulk: !no_bulk,
                    },
                )) {
                    Ok(Some(files)) => {
                        for f in &files {
                            for (peer, bytes) in &f.report.bytes_from {
                                let how = if f.report.bulk_from.contains(peer) {
                                    "a bulk connection"
                                } else {
                                    "the mesh"
                                };
                                println!(
                                    "{name}/{}: {bytes} bytes from peer {peer} over {how}",
                                    f.file
                                );
                            }
                            if f.report.chunks_reused > 0 {
                                println!(
                                    "{name}/{}: {} chunks kept from an interrupted pull",
                                    f.file, f.report.chunks_reused
                                );
                            }
                            for bad in &f.report.bad_providers {
                                eprintln!("{name}/{}: dropped peer {bad}: it sent chunks that failed verification", f.file);
                            }
                        }
                        println!("{name}: {} (from peers)", store.model_dir(name).display());
                        continue;
                    }
                    Ok(None) if no_sources => bail!("{name}: no peer serves it"),
                    Ok(None) => {
                        eprintln!("{name}: no peer serves it; downloading from its sources")
                    }
                    Err(e) if no_sources => bail!(
                        "{name}: pulling from peers failed ({e}); run the pull again to resume"
                    ),
                    Err(e) => eprintln!(
                        "{name}: pulling from peers failed ({e}); downloading from its sources"
                    ),
                }
            }
        }
        let dir = store.pull(entry)?;
        println!("{name}: {} (from its sources)", dir.display());
    }
    if let Some((runtime, client)) = mesh {
        drop(client);
        runtime.shutdown_timeout(Duration::from_secs(1));
    }
    Ok(())
}

fn remove(store: &ModelStore, name: &str) -> Result<()> {
    if catalogue::find(name).is_none() {
        bail!("unknown model `{name}`");
    }
    if store.remove(name)? {
        println!("removed {name}");
        Ok(())
    } else {
        bail!("model `{name}` is not downloaded")
    }
}

/// The files the node running with this state directory serves to peers, by SHA-256, with
/// the number of peers each was sent to; `None` when no node runs here, it has no API, or it
/// serves no files (not the `storage` or `full` profile).
fn served_files(home: &Path) -> Option<std::collections::HashMap<String, u64>> {
    let daemon = DaemonFile::read(home).filter(|d| d.liveness() == Liveness::Running)?;
    let key = std::env::var("POD_API_KEY").ok();
    let body = Api::new(daemon.api.as_deref()?, key)
        .get_json(pod_api::paths::FILES)
        .map_err(|e| tracing::debug!(error = %e, "cannot ask the running node what it serves"))
        .ok()?;
    if body["serving"] != serde_json::Value::Bool(true) {
        return None;
    }
    Some(
        body["data"]
            .as_array()?
            .iter()
            .filter_map(|f| {
                Some((
                    f["sha256"].as_str()?.to_owned(),
                    f["peers_served"].as_u64()?,
                ))
            })
            .collect(),
    )
}
