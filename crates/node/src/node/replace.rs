//! `--layers auto` between requests: a later stage placed automatically moves when the mesh's
//! coverage of its model changes (a pod that held other blocks went away while others hold its
//! own), reloading the blocks it moves to and announcing them.

use std::sync::Arc;
use std::time::Duration;

use pod_inference::model::stage::{LayerRange, StageSizes};
use pod_inference::EngineHandle;

use crate::loader::{self, ResolvedModel};
use crate::mesh;
use crate::stage::placement;
use crate::stage::server::StageHost;

/// A peer not heard of in this many announcement periods no longer counts as holding blocks.
const SILENT_PERIODS: u32 = 3;

/// An auto-placed stage and what it needs to reload itself.
#[derive(Debug)]
pub(super) struct Replacer {
    /// The engine a stage that becomes a head serves the model in.
    pub(super) engine: EngineHandle,
    /// The model file.
    pub(super) model: ResolvedModel,
    /// Its SHA-256.
    pub(super) sha256: String,
    /// What each part of it takes.
    pub(super) sizes: StageSizes,
    /// Memory the stage may fill.
    pub(super) budget: u64,
    /// The blocks it serves now.
    pub(super) current: LayerRange,
    /// Where it is served.
    pub(super) stages: Arc<StageHost>,
    /// The mesh whose announcements it reads.
    pub(super) mesh: mesh::Client,
    /// The announcement period: it reconsiders at most once per period.
    pub(super) period: Duration,
}

impl Replacer {
    /// Reconsiders once per announcement period while the stage holds no sequence, and moves
    /// when [`placement::reconsider`] says so. Ends when the stage becomes a head (a head's
    /// sequences live in the engine; it stays), or when the mesh stops.
    pub(super) async fn run(mut self) {
        let mut tick = tokio::time::interval(self.period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let total = self.sizes.total_layers();
        while self.current.start != 0 {
            tick.tick().await;
            if self.stages.sequences() > 0 {
                continue;
            }
            let Ok(peers) = self.mesh.peers().await else {
                return;
            };
            let fresh = self.period * SILENT_PERIODS;
            let others: Vec<LayerRange> = peers
                .iter()
                .filter(|p| p.connected || p.last_seen_ago < fresh)
                .filter_map(|p| p.capabilities.as_ref())
                .flat_map(|c| c.stages.iter())
                .filter(|s| s.sha256 == self.sha256 && s.total_layers == total)
                .map(|s| s.layers)
                .collect();
            let Some(step) = placement::reconsider(&self.sizes, self.budget, self.current, &others)
            else {
                continue;
            };
            // Checked again: a head may have started a sequence while the mesh was read.
            if self.stages.sequences() > 0 {
                continue;
            }
            tracing::info!(
                model = %self.model.name,
                from = %step.from,
                to = %step.to.layers,
                "--layers auto moves from blocks {} to {} of {total}: {step}",
                step.from,
                step.to.layers,
            );
            let to = step.to.layers;
            match self.reload(to).await {
                Ok(()) => self.current = to,
                Err(e) => {
                    tracing::error!(
                        model = %self.model.name,
                        blocks = %to,
                        error = %e,
                        "--layers auto could not load its new blocks; loading the old ones again"
                    );
                    if let Err(e) = self.reload(self.current).await {
                        tracing::error!(
                            model = %self.model.name,
                            error = %e,
                            "--layers auto could not load its old blocks either; serving none"
                        );
                        return;
                    }
                }
            }
        }
    }

    /// Drops the stage's weights, then loads blocks `to` (as a head where they start at 0).
    async fn reload(&self, to: LayerRange) -> Result<(), loader::ResolveError> {
        self.stages.stop_serving();
        let (engine, model, sha256) =
            (self.engine.clone(), self.model.clone(), self.sha256.clone());
        let (stages, mesh) = (Arc::clone(&self.stages), self.mesh.clone());
        let runtime = tokio::runtime::Handle::current();
        tokio::task::spawn_blocking(move || {
            loader::load_stage(&engine, &model, to, Some(sha256), &stages, &mesh, runtime)
        })
        .await
        .map_err(|e| loader::ResolveError::Stage(format!("the load panicked: {e}")))?
    }
}
