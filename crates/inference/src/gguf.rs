//! Reading GGUF files and the metadata keys pod relies on.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{Content, Value};

use crate::error::LoadError;

/// Context assumed for a file that does not state its own.
const DEFAULT_CONTEXT: usize = 2048;
/// The most context a declared rope scaling extends a model to.
const MAX_SCALED_CONTEXT: usize = 1 << 20;

/// An open GGUF file: its parsed header and a reader positioned anywhere in it.
#[derive(Debug)]
pub struct GgufFile {
    /// Where the file lives.
    pub path: PathBuf,
    /// Header: metadata and tensor directory.
    pub content: Content,
    /// Reader for tensor data.
    pub reader: BufReader<File>,
}

impl GgufFile {
    /// Opens and parses the header of a GGUF file.
    pub fn open(path: &Path) -> Result<Self, LoadError> {
        let file = File::open(path).map_err(|source| LoadError::Io {
            path: path.to_owned(),
            source,
        })?;
        let mut reader = BufReader::new(file);
        let invalid = |reason: String| LoadError::InvalidGguf {
            path: path.to_owned(),
            reason,
        };
        // candle's parser divides by `general.alignment` unchecked, so a header declaring an
        // alignment of 0 panics inside it. Such a file is invalid, not a reason to crash; the
        // reader is dropped with the error, so no state a panic left half-done is used.
        let content =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| Content::read(&mut reader)))
                .map_err(|_| invalid("malformed header".into()))?
                // candle appends a backtrace when RUST_BACKTRACE is set; keep the message.
                .map_err(|e| {
                    invalid(e.to_string().lines().next().unwrap_or_default().to_owned())
                })?;
        Ok(Self {
            path: path.to_owned(),
            content,
            reader,
        })
    }

    /// The metadata map.
    pub fn metadata(&self) -> &HashMap<String, Value> {
        &self.content.metadata
    }

    /// `general.architecture`, e.g. `llama`.
    pub fn architecture(&self) -> Result<String, LoadError> {
        self.string("general.architecture")
            .map(str::to_owned)
            .ok_or_else(|| LoadError::Metadata {
                key: "general.architecture".into(),
            })
    }

    /// A string value, if present with that type.
    pub fn string(&self, key: &str) -> Option<&str> {
        self.metadata()
            .get(key)
            .and_then(|v| v.to_string().ok())
            .map(String::as_str)
    }

    /// An unsigned integer value of any width, if present.
    pub fn uint(&self, key: &str) -> Option<u64> {
        match self.metadata().get(key)? {
            Value::U8(v) => Some(u64::from(*v)),
            Value::U16(v) => Some(u64::from(*v)),
            Value::U32(v) => Some(u64::from(*v)),
            Value::U64(v) => Some(*v),
            Value::I8(v) => u64::try_from(*v).ok(),
            Value::I16(v) => u64::try_from(*v).ok(),
            Value::I32(v) => u64::try_from(*v).ok(),
            Value::I64(v) => u64::try_from(*v).ok(),
            _ => None,
        }
    }

    /// A boolean value, if present.
    pub fn bool(&self, key: &str) -> Option<bool> {
        self.metadata().get(key).and_then(|v| v.to_bool().ok())
    }

    /// An array value, if present.
    pub fn array(&self, key: &str) -> Option<&Vec<Value>> {
        self.metadata().get(key).and_then(|v| v.to_vec().ok())
    }

    /// The context length the model was trained for (`<arch>.context_length`).
    pub fn context_length(&self) -> Option<usize> {
        let arch = self.string("general.architecture")?;
        self.uint(&format!("{arch}.context_length"))
            .and_then(|v| usize::try_from(v).ok())
    }

    /// Tokens of context pod serves for this model: the context it was trained for
    /// (`{arch}.context_length`; 2048 where the file does not say), or more where the file
    /// declares YaRN or linear rope scaling (which pod's decoders apply): the original context
    /// times the scaling factor, as a Qwen 2.5 converted with YaRN factor 4 over 32k serves
    /// 128k. Files whose trained context already includes the scaling (Llama 3.x, Phi 3,
    /// Gemma 3), or that declare no original context, keep it.
    pub fn servable_context(&self) -> usize {
        let trained = self.context_length().unwrap_or(DEFAULT_CONTEXT);
        let Some(arch) = self.string("general.architecture") else {
            return trained;
        };
        let kind = self.string(&format!("{arch}.rope.scaling.type"));
        if !matches!(kind, Some("yarn" | "linear")) {
            return trained;
        }
        let factor = self
            .metadata()
            .get(&format!("{arch}.rope.scaling.factor"))
            .and_then(|v| v.to_f32().ok())
            .filter(|f| f.is_finite() && *f > 1.0);
        // Without an original context, the trained one is taken to include the scaling, as
        // converters write it for Gemma 3 4B and larger.
        let Some(original) = self
            .uint(&format!("{arch}.rope.scaling.original_context_length"))
            .and_then(|v| usize::try_from(v).ok())
        else {
            return trained;
        };
        match factor {
            // The product is capped so that a hostile header cannot ask for absurd caches
            // (the KV budget bounds what is actually allocated).
            Some(f) => {
                trained.max(((original as f64 * f64::from(f)) as usize).min(MAX_SCALED_CONTEXT))
            }
            None => trained,
        }
    }

    /// The most common tensor type by element count, e.g. `Q4_1`: what users call the
    /// quantisation of the file.
    pub fn quantization(&self) -> String {
        let mut counts: BTreeMap<String, usize> = BTreeMap::new();
        for info in self.content.tensor_infos.values() {
            // Dimensions come from the file: their product may overflow.
            let elems = info
                .shape
                .dims()
                .iter()
                .try_fold(1usize, |n, &d| n.checked_mul(d))
                .unwrap_or(usize::MAX);
            let count = counts.entry(format!("{:?}", info.ggml_dtype)).or_default();
            *count = count.saturating_add(elems);
        }
        counts
            .into_iter()
            .max_by_key(|(_, n)| *n)
            .map(|(t, _)| t.to_uppercase())
            .unwrap_or_else(|| "unknown".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file_with(metadata: &[(&str, Value)]) -> (tempfile::TempDir, GgufFile) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.gguf");
        let mut out = std::fs::File::create(&path).unwrap();
        let md: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (*k, v)).collect();
        candle_core::quantized::gguf_file::write(&mut out, &md, &[]).unwrap();
        drop(out);
        let file = GgufFile::open(&path).unwrap();
        (dir, file)
    }

    #[test]
    fn declared_yarn_or_linear_scaling_extends_the_servable_context() {
        let arch = ("general.architecture", Value::String("qwen2".into()));
        let trained = ("qwen2.context_length", Value::U32(32_768));
        let (_d, plain) = file_with(&[arch.clone(), trained.clone()]);
        assert_eq!(plain.servable_context(), 32_768);
        let (_d, yarn) = file_with(&[
            arch.clone(),
            trained.clone(),
            ("qwen2.rope.scaling.type", Value::String("yarn".into())),
            ("qwen2.rope.scaling.factor", Value::F32(4.0)),
            (
                "qwen2.rope.scaling.original_context_length",
                Value::U32(32_768),
            ),
        ]);
        assert_eq!(yarn.servable_context(), 131_072);
        // Llama 3.x: the trained context already includes the scaling.
        let (_d, included) = file_with(&[
            ("general.architecture", Value::String("llama".into())),
            ("llama.context_length", Value::U32(131_072)),
            ("llama.rope.scaling.type", Value::String("linear".into())),
            ("llama.rope.scaling.factor", Value::F32(8.0)),
            (
                "llama.rope.scaling.original_context_length",
                Value::U32(8192),
            ),
        ]);
        assert_eq!(included.servable_context(), 131_072);
        // Without an original context, the trained one includes the scaling (Gemma 3 4B).
        let (_d, gemma) = file_with(&[
            arch.clone(),
            ("qwen2.context_length", Value::U32(131_072)),
            ("qwen2.rope.scaling.type", Value::String("linear".into())),
            ("qwen2.rope.scaling.factor", Value::F32(8.0)),
        ]);
        assert_eq!(gemma.servable_context(), 131_072);
        // An absurd factor is capped.
        let (_d, linear) = file_with(&[
            arch.clone(),
            ("qwen2.context_length", Value::U32(4096)),
            ("qwen2.rope.scaling.type", Value::String("linear".into())),
            ("qwen2.rope.scaling.factor", Value::F32(1e12)),
            (
                "qwen2.rope.scaling.original_context_length",
                Value::U32(4096),
            ),
        ]);
        assert_eq!(linear.servable_context(), MAX_SCALED_CONTEXT);
        let (_d, none) = file_with(&[
            arch,
            trained,
            ("qwen2.rope.scaling.type", Value::String("none".into())),
            ("qwen2.rope.scaling.factor", Value::F32(4.0)),
        ]);
        assert_eq!(none.servable_context(), 32_768);
    }
}
