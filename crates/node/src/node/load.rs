//! Loading a node's models at start: the missing catalogued ones pulled from peers first, then
//! each resolved (downloaded from its sources when still missing) and loaded into the engine.

use std::sync::Arc;
use std::time::Duration;

use pod_inference::model::stage::LayerRange;
use pod_inference::{EngineHandle, Placement};

use super::NodeError;
use crate::blob::{self, BlobServer};
use crate::catalogue;
use crate::loader;
use crate::mesh;
use crate::stage::server::StageHost;
use crate::store::ModelStore;

/// How long a starting node waits to hear of pods serving the files of a missing model before
/// it downloads the model from its sources.
const PEER_PULL_WAIT: Duration = Duration::from_secs(3);

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
    pub(super) layers: Option<LayerRange>,
    /// Where stages are served.
    pub(super) stages: Arc<StageHost>,
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
            stages,
        } = self;
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
                    Some(range) => loader::load_stage(
                        &engine,
                        &resolved,
                        range,
                        &stages,
                        &mesh,
                        runtime.clone(),
                    ),
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
