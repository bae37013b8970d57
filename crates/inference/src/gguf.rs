//! Reading GGUF files and the metadata keys pod relies on.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{Content, Value};

use crate::error::LoadError;

/// Context assumed for a file that does not state its own.
const DEFAULT_CONTEXT: usize = 2048;

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
    /// (`{arch}.context_length`; 2048 where the file does not say). A context beyond it is
    /// served only where the file declares rope scaling that the decoders apply; none is
    /// read yet, so this is the trained context.
    pub fn servable_context(&self) -> usize {
        self.context_length().unwrap_or(DEFAULT_CONTEXT)
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
