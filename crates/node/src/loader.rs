//! Resolving a model name to files (pulling catalogued models when missing) and loading it
//! into the engine.

use std::path::{Path, PathBuf};
use std::time::Instant;

use pod_inference::{ChatModel, DeviceSpec, EmbeddingModel, EngineHandle, LoadError, ModelInfo};

use crate::catalogue::{self, CATALOGUE};
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
    /// Pulling failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Loading failed.
    #[error(transparent)]
    Load(#[from] LoadError),
    /// The engine refused the model.
    #[error(transparent)]
    Engine(#[from] pod_inference::EngineError),
}

/// Finds a model by catalogue name or path; catalogued models are pulled when `pull` is set.
pub fn resolve(store: &ModelStore, name: &str, pull: bool) -> Result<ResolvedModel, ResolveError> {
    if let Some(entry) = catalogue::find(name) {
        if !store.is_present(entry) {
            if !pull {
                return Err(ResolveError::NotPulled(name.to_owned()));
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

/// Loads a resolved model onto the device and hands it to the engine.
pub fn load_into(
    engine: &EngineHandle,
    model: &ResolvedModel,
    device: DeviceSpec,
) -> Result<ModelInfo, ResolveError> {
    let started = Instant::now();
    let dev = device.open()?;
    match model.format {
        ModelFormat::Gguf => {
            let chat = ChatModel::load(&model.path, &dev)?;
            engine.add_chat_model(&model.name, chat)?;
        }
        ModelFormat::SentenceTransformers => {
            let emb = EmbeddingModel::load(&model.path, &dev)?;
            engine.add_embedding_model(&model.name, emb)?;
        }
    }
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
        device = %device,
        ms = started.elapsed().as_millis() as u64,
        "model loaded"
    );
    Ok(info)
}
