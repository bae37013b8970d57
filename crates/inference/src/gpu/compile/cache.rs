//! The on-disk cache of compiled code objects, so a second start does not compile.
//!
//! An entry is two files in the cache directory: `<target>-<key>.code`, the code object, and
//! `<target>-<key>.json`, what [`CompiledModule`] says of it plus the code's SHA-256. The key
//! hashes everything the code depends on: target, compiler and its version, options, kernel
//! names and source. Each file is written to a temporary name and renamed into place, the
//! code before the JSON, so a reader sees a whole entry or none; a damaged or mismatched entry
//! is treated as missing and compiled again.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use sha2::{Digest, Sha256};

use super::CompiledModule;

/// Bumped when the entry format or what the key covers changes.
const FORMAT: u32 = 1;

/// A directory of compiled code objects.
#[derive(Debug, Clone)]
pub struct CodeCache {
    dir: PathBuf,
}

/// A cache entry could not be written.
#[derive(Debug, thiserror::Error)]
#[error("cannot write GPU code cache entry {path}: {source}")]
pub struct CacheWriteError {
    /// The file being written.
    pub path: PathBuf,
    /// What the file system said.
    #[source]
    pub source: std::io::Error,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Entry {
    format: u32,
    key: String,
    code_sha256: String,
    module: CompiledModule,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl CodeCache {
    /// A cache in `dir`, created when first written.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    /// The cache directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The key of a compile: a hex SHA-256 over every input, each length-prefixed so no two
    /// different input lists hash the same bytes.
    pub fn key(
        target: &str,
        compiler: &str,
        options: &[String],
        kernels: &[&str],
        source: &str,
    ) -> String {
        let mut hash = Sha256::new();
        let mut field = |bytes: &[u8]| {
            hash.update((bytes.len() as u64).to_le_bytes());
            hash.update(bytes);
        };
        field(&FORMAT.to_le_bytes());
        field(target.as_bytes());
        field(compiler.as_bytes());
        for option in options {
            field(option.as_bytes());
        }
        field(b"kernels");
        for kernel in kernels {
            field(kernel.as_bytes());
        }
        field(source.as_bytes());
        hex(&hash.finalize())
    }

    fn paths(&self, target: &str, key: &str) -> (PathBuf, PathBuf) {
        let stem = format!("{target}-{}", &key[..key.len().min(32)]);
        (
            self.dir.join(format!("{stem}.code")),
            self.dir.join(format!("{stem}.json")),
        )
    }

    /// The entry for `key`, if one is there whole.
    pub fn load(&self, target: &str, key: &str) -> Option<CompiledModule> {
        let (code_path, json_path) = self.paths(target, key);
        let entry: Entry = serde_json::from_slice(&fs::read(&json_path).ok()?).ok()?;
        if entry.format != FORMAT || entry.key != key {
            return None;
        }
        let code = fs::read(&code_path).ok()?;
        if hex(&Sha256::digest(&code)) != entry.code_sha256 {
            tracing::warn!(path = %code_path.display(), "GPU code cache entry damaged; compiling again");
            return None;
        }
        Some(CompiledModule {
            code,
            ..entry.module
        })
    }

    /// Saves `module` under `key`.
    pub fn store(&self, key: &str, module: &CompiledModule) -> Result<(), CacheWriteError> {
        let (code_path, json_path) = self.paths(&module.target, key);
        fs::create_dir_all(&self.dir).map_err(|source| CacheWriteError {
            path: self.dir.clone(),
            source,
        })?;
        let entry = Entry {
            format: FORMAT,
            key: key.into(),
            code_sha256: hex(&Sha256::digest(&module.code)),
            module: CompiledModule {
                code: Vec::new(),
                ..module.clone()
            },
        };
        let json = serde_json::to_vec_pretty(&entry).map_err(|e| CacheWriteError {
            path: json_path.clone(),
            source: e.into(),
        })?;
        write_atomically(&code_path, &module.code)?;
        write_atomically(&json_path, &json)
    }
}

/// Writes `bytes` to a temporary file beside `path`, then renames it over `path`, so readers
/// never see a partly written file.
fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), CacheWriteError> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let temp = path.with_file_name(format!(
        ".{file_name}.{}.{}.tmp",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let result = (|| {
        let mut file = fs::File::create(&temp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        fs::rename(&temp, path)
    })();
    result.map_err(|source| {
        let _ = fs::remove_file(&temp);
        CacheWriteError {
            path: path.to_path_buf(),
            source,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::compile::KernelFacts;

    fn module() -> CompiledModule {
        CompiledModule {
            target: "gfx906".into(),
            compiler: "hiprtc 9.0, ROCm 5.2.21153".into(),
            code: vec![1, 2, 3, 4],
            kernels: vec![KernelFacts {
                name: "k".into(),
                registers: Some(8),
                ..KernelFacts::default()
            }],
            log: String::new(),
        }
    }

    #[test]
    fn a_stored_entry_loads_back_whole() {
        let dir = tempfile::tempdir().unwrap();
        let cache = CodeCache::new(dir.path().join("gpu"));
        let key = CodeCache::key("gfx906", "c", &[], &["k"], "src");
        assert!(cache.load("gfx906", &key).is_none());
        cache.store(&key, &module()).unwrap();
        let loaded = cache.load("gfx906", &key).unwrap();
        assert_eq!(loaded.code, vec![1, 2, 3, 4]);
        assert_eq!(loaded.kernels, module().kernels);
        assert_eq!(loaded.compiler, module().compiler);
        let leftovers: Vec<_> = fs::read_dir(cache.dir())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".tmp"))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }

    #[test]
    fn keys_change_with_every_input() {
        let base = CodeCache::key("gfx906", "c", &["-O3".into()], &["k"], "src");
        assert_ne!(
            base,
            CodeCache::key("gfx90a", "c", &["-O3".into()], &["k"], "src")
        );
        assert_ne!(
            base,
            CodeCache::key("gfx906", "c2", &["-O3".into()], &["k"], "src")
        );
        assert_ne!(base, CodeCache::key("gfx906", "c", &[], &["k"], "src"));
        assert_ne!(
            base,
            CodeCache::key("gfx906", "c", &["-O3".into()], &["k2"], "src")
        );
        assert_ne!(
            base,
            CodeCache::key("gfx906", "c", &["-O3".into()], &["k"], "src2")
        );
    }

    #[test]
    fn a_damaged_code_file_is_a_miss() {
        let dir = tempfile::tempdir().unwrap();
        let cache = CodeCache::new(dir.path());
        let key = CodeCache::key("gfx906", "c", &[], &["k"], "src");
        cache.store(&key, &module()).unwrap();
        let (code_path, _) = cache.paths("gfx906", &key);
        fs::write(&code_path, [9, 9]).unwrap();
        assert!(cache.load("gfx906", &key).is_none());
    }
}
