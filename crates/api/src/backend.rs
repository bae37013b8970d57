//! What the API talks to: anything that can list models, generate and embed.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use pod_inference::{
    EmbedRequest, EmbedResponse, EngineError, EngineHandle, GenerateEvent, GenerateRequest,
    ModelInfo,
};
use tokio::sync::mpsc;

use crate::metrics::BlobTotals;
use crate::node::{FileList, NodeView, PeerView, ReceiptsPage, ReceiptsView};
use crate::openai::ModelPipeline;

/// A model as the API lists it.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelEntry {
    /// The model.
    pub info: ModelInfo,
    /// Peers serving it (1 when only this node does).
    pub providers: usize,
    /// Who serves it: this node's name, or a peer id.
    pub owned_by: String,
    /// The stages it is split across, where pods serve it that way.
    pub pipeline: Option<ModelPipeline>,
}

/// A started completion.
#[derive(Debug)]
pub struct Generation {
    /// The engine's events; dropping the receiver cancels the work.
    pub events: mpsc::Receiver<GenerateEvent>,
    /// The node that is doing the work, for the `x-pod-served-by` header.
    pub served_by: String,
}

/// Finished embeddings.
#[derive(Debug)]
pub struct Embeddings {
    /// The vectors.
    pub response: EmbedResponse,
    /// The node that computed them, for the `x-pod-served-by` header.
    pub served_by: String,
}

/// The inference side of the API.
pub trait Backend: Send + Sync + 'static {
    /// Models that can be requested.
    fn models(&self) -> Vec<ModelEntry>;
    /// Whether the backend can take requests (models loaded).
    fn is_ready(&self) -> bool;
    /// Requests waiting and sequences running, for metrics and load reports.
    fn load(&self) -> (usize, usize);
    /// Starts a completion.
    fn generate(
        &self,
        req: GenerateRequest,
    ) -> impl Future<Output = Result<Generation, EngineError>> + Send;
    /// Embeds texts.
    fn embed(
        &self,
        req: EmbedRequest,
    ) -> impl Future<Output = Result<Embeddings, EngineError>> + Send;
    /// This node as `/pod/v1/node` shows it; `None` when there is no mesh.
    fn node(&self) -> impl Future<Output = Option<NodeView>> + Send {
        async { None }
    }
    /// The peer table as `/pod/v1/peers` shows it; `None` when there is no mesh.
    fn peers(&self) -> impl Future<Output = Option<Vec<PeerView>>> + Send {
        async { None }
    }
    /// One page of the receipt ledger's totals per peer; `None` when there is no mesh.
    fn receipts(&self, page: ReceiptsPage) -> impl Future<Output = Option<ReceiptsView>> + Send {
        let _ = page;
        async { None }
    }
    /// Model-file transfers with peers, for `/metrics`; `None` when there is no mesh.
    fn blob_totals(&self) -> Option<BlobTotals> {
        None
    }
    /// The model files this node serves to peers, as `/pod/v1/files` shows them; `None` when
    /// there is no mesh.
    fn files(&self) -> impl Future<Output = Option<FileList>> + Send {
        async { None }
    }
}

/// The local engine as a backend.
#[derive(Debug, Clone)]
pub struct LocalBackend {
    engine: EngineHandle,
    ready: Arc<AtomicBool>,
    name: String,
}

impl LocalBackend {
    /// Wraps an engine; `name` is reported as the serving node. Not ready until
    /// [`LocalBackend::set_ready`].
    pub fn new(engine: EngineHandle, name: impl Into<String>) -> Self {
        Self {
            engine,
            ready: Arc::new(AtomicBool::new(false)),
            name: name.into(),
        }
    }

    /// Marks the models as loaded (or not).
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Release);
    }

    /// The engine.
    pub fn engine(&self) -> &EngineHandle {
        &self.engine
    }
}

impl Backend for LocalBackend {
    fn models(&self) -> Vec<ModelEntry> {
        self.engine
            .models()
            .into_iter()
            .map(|info| ModelEntry {
                info,
                providers: 1,
                owned_by: self.name.clone(),
                pipeline: None,
            })
            .collect()
    }

    fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    fn load(&self) -> (usize, usize) {
        let stats = self.engine.stats();
        (
            stats.queued.load(Ordering::Relaxed),
            stats.active.load(Ordering::Relaxed),
        )
    }

    async fn generate(&self, req: GenerateRequest) -> Result<Generation, EngineError> {
        let events = self.engine.generate_async(req).await?;
        Ok(Generation {
            events,
            served_by: self.name.clone(),
        })
    }

    async fn embed(&self, req: EmbedRequest) -> Result<Embeddings, EngineError> {
        Ok(Embeddings {
            response: self.engine.embed(req).await?,
            served_by: self.name.clone(),
        })
    }
}
