//! Loading a node's models at start: the missing catalogued ones pulled from peers first, then
//! each resolved (downloaded from its sources when still missing) and loaded into the engine.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytesize::ByteSize;
use pod_inference::model::stage::{LayerRange, StageSizes};
use pod_inference::{EngineHandle, Placement};

use super::replace::Replacer;
use super::NodeError;
use crate::blob::{self, BlobServer};
use crate::catalogue;
use crate::loader;
use crate::loader::{ResolveError, ResolvedModel};
use crate::mesh;
use crate::stage::placement::{self, StageLayers};
use crate::stage::server::StageHost;
use crate::store::ModelStore;

/// How long a starting node waits to hear of pods serving the files of a missing model before
/// it downloads the model from its sources.
const PEER_PULL_WAIT: Duration = Duration::from_secs(3);

/// Longest a pod with `--layers auto` listens to the mesh before it chooses its blocks.
const MAX_AUTO_SETTLE: Duration = Duration::from_secs(15);

/// How long a pod with `--layers auto` listens to the mesh's announcements before it
/// chooses its blocks: one announcement period and a second, so that every pod the mesh
/// reaches has announced its stages at least once (neighbours announce to a newcomer at
/// once), at most [`MAX_AUTO_SETTLE`].
pub(super) fn auto_settle(announce_interval: Duration) -> Duration {
    (announce_interval + Duration::from_secs(1)).min(MAX_AUTO_SETTLE)
}

/// The models a node loads at start and where it may get the missing ones.
#[derive(Debug)]
pub(super) struct ModelLoad {
    /// The model store.
    pub(super) store: ModelStore,
    /// Names of the models, in load order.
    pub(super) models: Vec<String>,
    /// The engine they are loaded into.
    pub(super) engine: EngineHandle,
    /// The device they are loaded on.
    pub(super) placement: Placement,
    /// Pull missing models, from peers first and then from their sources (false: a missing
    /// model fails the start).
    pub(super) pull: bool,
    /// The mesh peers are asked through.
    pub(super) mesh: mesh::Client,
    /// How pulls from peers run.
    pub(super) pull_opts: blob::PullOptions,
    /// The node's file server, which serves pulled files on.
    pub(super) blobs: Option<Arc<BlobServer>>,
    /// The blocks to serve as a pipeline stage (of the one model), if not whole models.
    pub(super) layers: Option<StageLayers>,
    /// What a stage with `--layers auto` may fill (`None`: what is available).
    pub(super) max_memory: Option<u64>,
    /// How long `--layers auto` listens to the mesh, from the start of the load, before it
    /// chooses.
    pub(super) settle: Duration,
    /// Where stages are served.
    pub(super) stages: Arc<StageHost>,
    /// The mesh's announcement period: a later stage placed by `--layers auto` reconsiders
    /// its blocks at most once per period.
    pub(super) announce_interval: Duration,
}

impl ModelLoad {
    /// Pulls and loads every model; the first that cannot be had or loaded fails the lot.
    pub(super) async fn run(self) -> Result<(), NodeError> {
        let ModelLoad {
            store,
            models,
            engine,
            placement,
            pull,
            mesh,
            pull_opts,
            blobs,
            layers,
            max_memory,
            settle,
            stages,
            announce_interval,
        } = self;
        let settled = Instant::now() + settle;
        if pull {
            pull_missing_models(&store, &models, &mesh, &pull_opts, blobs.as_ref()).await;
        }
        let runtime = tokio::runtime::Handle::current();
        tokio::task::spawn_blocking(move || -> Result<(), NodeError> {
            for name in models {
                let resolved =
                    loader::resolve(&store, &name, pull).map_err(|source| NodeError::Load {
                        model: name.clone(),
                        source: Box::new(source),
                    })?;
                let loaded = match layers {
                    Some(StageLayers::Blocks(range)) => loader::load_stage(
                        &engine,
                        &resolved,
                        range,
                        None,
                        &stages,
                        &mesh,
                        runtime.clone(),
                    ),
                    Some(StageLayers::Auto) => choose_layers(
                        &resolved, &mesh, max_memory, settled, &runtime,
                    )
                    .and_then(|auto| {
                        loader::load_stage(
                            &engine,
                            &resolved,
                            auto.range,
                            Some(auto.sha256.clone()),
                            &stages,
                            &mesh,
                            runtime.clone(),
                        )?;
                        runtime.spawn(
                            Replacer {
                                engine: engine.clone(),
                                model: resolved.clone(),
                                sha256: auto.sha256,
                                sizes: auto.sizes,
                                budget: auto.budget,
                                current: auto.range,
                                stages: Arc::clone(&stages),
                                mesh: mesh.clone(),
                                period: announce_interval,
                            }
                            .run(),
                        );
                        Ok(())
                    }),
                    None => loader::load_into(&engine, &resolved, &placement).map(drop),
                };
                loaded.map_err(|source| NodeError::Load {
                    model: name.clone(),
                    source: Box::new(source),
                })?;
            }
            Ok(())
        })
        .await
        .map_err(NodeError::LoadPanicked)?
    }
}

/// What `--layers auto` chose, and what it chose from.
struct AutoChoice {
    range: LayerRange,
    sha256: String,
    sizes: StageSizes,
    budget: u64,
}

/// `--layers auto`: once the mesh has been listened to until `settled`, the blocks of `model`
/// its pods cover least, as many as fit in `max_memory` (or what is available). Runs on a
/// blocking thread.
fn choose_layers(
    model: &ResolvedModel,
    mesh: &mesh::Client,
    max_memory: Option<u64>,
    settled: Instant,
    runtime: &tokio::runtime::Handle,
) -> Result<AutoChoice, ResolveError> {
    let sha256 = loader::stage_sha256(model)?;
    let sizes = StageSizes::read(&model.path)?;
    let total = sizes.total_layers();
    let (budget, from) = match max_memory {
        Some(b) => (b, "--max-memory"),
        None => (
            placement::available_memory().ok_or_else(|| {
                ResolveError::Stage(
                    "cannot read the available memory (/proc/meminfo): give --max-memory".into(),
                )
            })?,
            "available memory",
        ),
    };
    let wait = settled.saturating_duration_since(Instant::now());
    tracing::info!(
        model = %model.name,
        seconds = wait.as_secs_f64(),
        "--layers auto: listening to the mesh's stages before choosing blocks"
    );
    let peers = runtime.block_on(async {
        tokio::time::sleep(wait).await;
        mesh.peers().await.unwrap_or_default()
    });
    let announced: Vec<LayerRange> = peers
        .iter()
        .filter_map(|p| p.capabilities.as_ref())
        .flat_map(|c| c.stages.iter())
        .filter(|s| s.sha256 == sha256 && s.total_layers == total)
        .map(|s| s.layers)
        .collect();
    let choice = placement::choose(&sizes, budget, &announced)
        .map_err(|e| ResolveError::Stage(format!("--layers auto for {}: {e}", model.name)))?;
    let held: Vec<String> = announced.iter().map(ToString::to_string).collect();
    tracing::info!(
        model = %model.name,
        blocks = %choice.layers,
        total,
        bytes = choice.bytes,
        budget,
        announced = %held.join(", "),
        "--layers auto chose blocks {} of {total} ({} of {} {from}; the mesh's stages: {}; \
         least covered: {} pods)",
        choice.layers,
        ByteSize(choice.bytes).display().iec(),
        ByteSize(budget).display().iec(),
        if held.is_empty() { "none".to_owned() } else { held.join(", ") },
        choice.coverage,
    );
    Ok(AutoChoice {
        range: choice.layers,
        sha256,
        sizes,
        budget,
    })
}

/// Pulls the missing catalogued models among `models` from pods of the mesh that serve them;
/// what cannot be had from peers is left for the catalogue's sources. Pulled files are served
/// on by `blobs`.
async fn pull_missing_models(
    store: &ModelStore,
    models: &[String],
    mesh: &mesh::Client,
    opts: &blob::PullOptions,
    blobs: Option<&Arc<BlobServer>>,
) {
    for name in models {
        let Some(entry) = catalogue::find(name) else {
            continue;
        };
        if store.is_present(entry) {
            continue;
        }
        match blob::pull_via_mesh(store, entry, mesh, PEER_PULL_WAIT, opts).await {
            // Each file pulled was logged as it was installed.
            Ok(Some(_)) => {
                if let Some(blobs) = blobs {
                    blobs.add_present(store);
                    let preparing = Arc::clone(blobs);
                    tokio::spawn(async move { preparing.prepare_manifests().await });
                }
            }
            Ok(None) => tracing::info!(model = %name, "no peer serves it; using its sources"),
            Err(e) => {
                tracing::warn!(model = %name, error = %e, "pulling from peers failed; using its sources");
            }
        }
    }
}
