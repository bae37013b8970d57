//! Resolving a model name to files (pulling catalogued models when missing) and loading it
//! into the engine.

use std::path::{Path, PathBuf};
use std::time::Instant;

use std::sync::Arc;

use pod_inference::model::stage::{self, LayerRange, StageModel};
use pod_inference::{
    ChatModel, EmbeddingModel, EngineConfig, EngineHandle, LoadError, ModelInfo, Placement,
};

use crate::catalogue::{self, CATALOGUE};
use crate::mesh;
use crate::stage::client::MeshDownstream;
use crate::stage::server::StageHost;
use crate::stage::StageAnnouncement;
use crate::store::{ModelFormat, ModelStore, StoreError};

/// A model located on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedModel {
    /// Name requests will use.
    pub name: String,
    /// What the files are.
    pub format: ModelFormat,
    /// The GGUF file, or the sentence-transformers directory.
    pub path: PathBuf,
}

/// Finding or loading a model failed.
#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    /// The name is neither catalogued nor an existing path.
    #[error("unknown model `{name}` (known models: {known}; or give a path to a .gguf file or a sentence-transformers directory)")]
    Unknown {
        /// What was asked for.
        name: String,
        /// Catalogue names.
        known: String,
    },
    /// The model is catalogued but not downloaded, and pulling was not allowed.
    #[error("model `{0}` is not downloaded; run `pod models pull {0}`")]
    NotPulled(String),
    /// A downloaded file of the model changed on disk since it was verified, and pulling
    /// was not allowed.
    #[error("{} was modified after its download (its SHA-256 is not the pinned one); run `pod models pull {name}` to fetch it again", path.display())]
    Modified {
        /// The model.
        name: String,
        /// The modified file.
        path: PathBuf,
    },
    /// Pulling failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Loading failed.
    #[error(transparent)]
    Load(#[from] LoadError),
    /// The engine refused the model.
    #[error(transparent)]
    Engine(#[from] pod_inference::EngineError),
    /// The model cannot be served as the pipeline stage asked.
    #[error("{0}")]
    Stage(String),
}

/// Finds a model by catalogue name or path; catalogued models are pulled when `pull` is set.
pub fn resolve(store: &ModelStore, name: &str, pull: bool) -> Result<ResolvedModel, ResolveError> {
    if let Some(entry) = catalogue::find(name) {
        if !store.is_present(entry) {
            if !pull {
                return Err(match store.modified_file(entry) {
                    Some(path) => ResolveError::Modified {
                        name: name.to_owned(),
                        path,
                    },
                    None => ResolveError::NotPulled(name.to_owned()),
                });
            }
            store.pull(entry)?;
        }
        let dir = store.model_dir(entry.name);
        let path = match entry.format {
            ModelFormat::Gguf => dir.join("model.gguf"),
            ModelFormat::SentenceTransformers => dir,
        };
        return Ok(ResolvedModel {
            name: name.to_owned(),
            format: entry.format,
            path,
        });
    }
    let path = Path::new(name);
    let stem = || {
        path.file_stem()
            .or_else(|| path.file_name())
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| name.to_owned())
    };
    if path.is_file() {
        return Ok(ResolvedModel {
            name: stem(),
            format: ModelFormat::Gguf,
            path: path.to_owned(),
        });
    }
    if path.is_dir() && path.join("config.json").is_file() {
        return Ok(ResolvedModel {
            name: stem(),
            format: ModelFormat::SentenceTransformers,
            path: path.to_owned(),
        });
    }
    Err(ResolveError::Unknown {
        name: name.to_owned(),
        known: CATALOGUE
            .iter()
            .map(|e| e.name)
            .collect::<Vec<_>>()
            .join(", "),
    })
}

/// Loads a resolved model onto the placement's device and hands it to the engine. Chat
/// models go on the GPU when there is one; where one cannot (architecture, memory) it is an
/// error if the device was named, else the model loads on the CPU with a warning saying why.
/// Embedding models run on candle's device.
pub fn load_into(
    engine: &EngineHandle,
    model: &ResolvedModel,
    placement: &Placement,
) -> Result<ModelInfo, ResolveError> {
    let started = Instant::now();
    let runs_on = match model.format {
        ModelFormat::Gguf => {
            let chat = load_chat(&model.path, placement, engine.config())?;
            let runs_on = chat.runs_on();
            engine.add_chat_model(&model.name, chat)?;
            runs_on
        }
        ModelFormat::SentenceTransformers => {
            let emb = EmbeddingModel::load(&model.path, &placement.candle)?;
            engine.add_embedding_model(&model.name, emb)?;
            if placement.candle.is_cpu() {
                "cpu".to_owned()
            } else {
                "candle (cuda)".to_owned()
            }
        }
    };
    let info = engine
        .models()
        .into_iter()
        .find(|m| m.name == model.name)
        .ok_or_else(|| ResolveError::Engine(pod_inference::EngineError::Stopped))?;
    tracing::info!(
        model = %info.name,
        architecture = %info.architecture,
        quantization = %info.quantization,
        context = info.context_length,
        device = %runs_on,
        ms = started.elapsed().as_millis() as u64,
        "model loaded"
    );
    Ok(info)
}

/// Loads blocks `range` of a resolved GGUF chat model as a pipeline stage: as the model's
/// head (a chat model in the engine, the later blocks run by the stages the mesh announces)
/// where the range starts at block 0, else as a stage served to heads by `stages`. The whole
/// range is an ordinary load. `sha256` is the file's, where already computed.
pub fn load_stage(
    engine: &EngineHandle,
    model: &ResolvedModel,
    range: LayerRange,
    sha256: Option<String>,
    stages: &StageHost,
    mesh: &mesh::Client,
    runtime: tokio::runtime::Handle,
) -> Result<(), ResolveError> {
    check_stage_format(model)?;
    let started = Instant::now();
    let (_, total) = stage::block_count(&model.path)?;
    if range.end > total {
        return Err(ResolveError::Stage(format!(
            "--layers {range}: {} has blocks 0-{}",
            model.name,
            total.saturating_sub(1)
        )));
    }
    if range.start == 0 && range.end == total {
        load_into(engine, model, &Placement::cpu())?;
        return Ok(());
    }
    let sha256 = match sha256 {
        Some(sha256) => sha256,
        None => stage_sha256(model)?,
    };
    let announcement = StageAnnouncement {
        model: model.name.clone(),
        sha256: sha256.clone(),
        layers: range,
        total_layers: total,
    };
    if range.start == 0 {
        let downstream = Arc::new(
            MeshDownstream::new(
                model.name.clone(),
                sha256,
                range.end,
                total,
                mesh.clone(),
                runtime,
            )
            .with_ledger(stages.ledger()),
        );
        let chat = ChatModel::load_head(&model.path, range, Arc::clone(&downstream) as _)?;
        engine.add_chat_model(&model.name, chat)?;
        stages.add_head(announcement, downstream);
    } else {
        let context = engine.config().max_context.unwrap_or(usize::MAX);
        let stage = StageModel::load(&model.path, range, context)?;
        stages
            .serve(stage, announcement)
            .map_err(|e| ResolveError::Stage(format!("cannot start the stage: {e}")))?;
    }
    tracing::info!(
        model = %model.name,
        blocks = %range,
        total,
        role = if range.start == 0 { "head" } else { "stage" },
        ms = started.elapsed().as_millis() as u64,
        "pipeline stage loaded"
    );
    Ok(())
}

/// The SHA-256 of a model file to serve blocks of, which names it to the other stages.
pub fn stage_sha256(model: &ResolvedModel) -> Result<String, ResolveError> {
    check_stage_format(model)?;
    crate::store::sha256_file(&model.path)
        .map_err(|e| ResolveError::Stage(format!("cannot read {}: {e}", model.path.display())))
}

fn check_stage_format(model: &ResolvedModel) -> Result<(), ResolveError> {
    if model.format != ModelFormat::Gguf {
        return Err(ResolveError::Stage(format!(
            "{} is not a chat model: only GGUF chat models run as pipeline stages",
            model.name
        )));
    }
    Ok(())
}

/// A chat model on the placement's GPU (sized for what `engine` will ask of it), or on the
/// CPU where the GPU is not required and the model cannot go on it.
pub fn load_chat(
    path: &Path,
    placement: &Placement,
    engine: &EngineConfig,
) -> Result<ChatModel, LoadError> {
    if let Some(gpu) = &placement.gpu {
        match ChatModel::load_gpu(path, std::sync::Arc::clone(gpu), engine) {
            Ok(model) => return Ok(model),
            Err(e) if placement.strict => return Err(e),
            Err(e) => tracing::warn!(
                model = %path.display(),
                error = %e,
                "cannot load the model on the GPU; loading it on the CPU"
            ),
        }
    }
    ChatModel::load(path, &placement.candle)
}
