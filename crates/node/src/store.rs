//! The model store: catalogued models downloaded under `$POD_HOME/models`, verified by SHA-256.
//!
//! A file is fetched into a temporary file in the model's directory, hashed while it is
//! written, checked against the pinned hash and size, synced, and only then renamed into
//! place: an interrupted or corrupted download never becomes a model. A source that sends
//! more than the catalogued size is stopped there, and an HTTP server that stays silent past
//! the read timeout ([`HttpTimeouts`]) fails its source; neither leaves anything behind. A
//! lock file ([`ModelLock`]) serialises pulls of the same model, from its sources or from
//! peers, by this process or others.
//!
//! The size, modification time and inode of each verified file are recorded with its hash.
//! Before a file counts as present (to load it, serve it to peers or skip its download) they
//! are compared with the file's; when they differ the file is hashed again, so a file changed
//! on disk after its download (bit rot, a stray write, tampering) is found and never used.
//! [`ModelStore::verify`] hashes every file whatever its stamps.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::catalogue::{CatalogueEntry, FileSpec};
use crate::progress::Progress;
use crate::source::{
    FetchContext, HttpTimeouts, Source, SourceError, HF_DEFAULT_ENDPOINT, HF_ENDPOINT_ENV,
};

/// On-disk format of a model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ModelFormat {
    /// One GGUF file (`model.gguf`): a chat model.
    Gguf,
    /// A sentence-transformers directory (safetensors, config, tokenizer): an embedding model.
    SentenceTransformers,
}

/// A store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Creating, reading or renaming files in the store failed.
    #[error("{path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// Every source of a file failed.
    #[error("could not fetch {model}/{file}: {errors}")]
    AllSourcesFailed {
        /// Model name.
        model: String,
        /// File name.
        file: String,
        /// Each source's failure, joined.
        errors: String,
    },
    /// A fetched file's hash or size is not the pinned one.
    #[error("{0}")]
    Verification(String),
    /// A source spec is invalid.
    #[error(transparent)]
    Source(#[from] SourceError),
}

const VERIFIED_FILE: &str = ".verified.json";

/// Record of the files verified in one model directory.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Verified {
    files: BTreeMap<String, VerifiedFile>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct VerifiedFile {
    sha256: String,
    size: u64,
    /// The file's stamp when it was last hashed; `None` in records written before stamps were
    /// kept, which makes the next check hash the file again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    stamp: Option<Stamp>,
}

impl VerifiedFile {
    /// Whether the record is of the pinned content `file`.
    fn is_of(&self, file: &FileSpec) -> bool {
        self.sha256 == file.sha256 && self.size == file.size
    }
}

/// What identifies one version of a file on disk without reading it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
struct Stamp {
    /// Modification time, nanoseconds since the Unix epoch.
    mtime_ns: u64,
    /// Inode number (0 where the platform has none).
    inode: u64,
}

impl Stamp {
    fn of(meta: &fs::Metadata) -> Option<Stamp> {
        let mtime_ns = meta
            .modified()
            .ok()?
            .duration_since(std::time::UNIX_EPOCH)
            .ok()?
            .as_nanos();
        #[cfg(unix)]
        let inode = std::os::unix::fs::MetadataExt::ino(meta);
        #[cfg(not(unix))]
        let inode = 0;
        Some(Stamp {
            mtime_ns: u64::try_from(mtime_ns).ok()?,
            inode,
        })
    }
}

/// What checking a model file against its verification record found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileState {
    /// The file is the verified one.
    Ok,
    /// The file was verified once but its content is no longer the pinned one.
    Modified,
    /// The file is not there, or was never verified (an interrupted or no download).
    Missing,
}

impl FileState {
    /// How `pod models verify` prints it.
    pub fn as_str(self) -> &'static str {
        match self {
            FileState::Ok => "OK",
            FileState::Modified => "MODIFIED",
            FileState::Missing => "MISSING",
        }
    }
}

/// The directory of downloaded models.
#[derive(Debug, Clone)]
pub struct ModelStore {
    root: PathBuf,
    hf_endpoint: String,
    http: HttpTimeouts,
}

/// The pull lock of one model, held while its files are fetched and installed: pulls of a
/// model, from its sources or from peers, by this process or another, take turns. Released
/// when dropped.
#[derive(Debug)]
pub struct ModelLock {
    model: String,
    _file: File,
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_owned(),
        source,
    }
}

impl ModelStore {
    /// The store under `home` (`$POD_HOME`), created if missing.
    pub fn open(home: &Path) -> Result<Self, StoreError> {
        Self::open_dir(&home.join("models"))
    }

    /// Opens (creating if needed) a store kept in `root` itself, apart from the state
    /// directory (`--models-dir`).
    pub fn open_dir(root: &Path) -> Result<Self, StoreError> {
        let root = root.to_path_buf();
        fs::create_dir_all(&root).map_err(io_err(&root))?;
        let hf_endpoint = std::env::var(HF_ENDPOINT_ENV)
            .ok()
            .filter(|v| !v.is_empty())
            .unwrap_or_else(|| HF_DEFAULT_ENDPOINT.to_owned());
        Ok(Self {
            root,
            hf_endpoint,
            http: HttpTimeouts::default(),
        })
    }

    /// Fetches `hf:` sources from another endpoint (a mirror, or a test server).
    pub fn with_hf_endpoint(mut self, endpoint: &str) -> Self {
        self.hf_endpoint = endpoint.to_owned();
        self
    }

    /// Gives up on HTTP servers after other timeouts than the defaults.
    pub fn with_http_timeouts(mut self, timeouts: HttpTimeouts) -> Self {
        self.http = timeouts;
        self
    }

    /// Directory holding a model's files.
    pub fn model_dir(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    /// Path a chat model's GGUF file has once pulled.
    pub fn gguf_path(&self, name: &str) -> PathBuf {
        self.model_dir(name).join("model.gguf")
    }

    /// Whether every file of the model is present and verified, hashing again any whose stamp
    /// changed since it was verified.
    pub fn is_present(&self, entry: &CatalogueEntry) -> bool {
        entry
            .files
            .iter()
            .all(|f| self.check_file(entry, f) == FileState::Ok)
    }

    /// Checks one file of a model against its verification record: when the file's size,
    /// modification time or inode differ from those recorded, it is hashed again, and its
    /// record updated when the content is still the pinned one (say, after a copy).
    pub fn check_file(&self, entry: &CatalogueEntry, file: &FileSpec) -> FileState {
        self.check(entry, file, false)
    }

    /// Hashes every file of the model whatever its stamp (`pod models verify`).
    pub fn verify(&self, entry: &CatalogueEntry) -> Vec<(&'static str, FileState)> {
        entry
            .files
            .iter()
            .map(|f| (f.name, self.check(entry, f, true)))
            .collect()
    }

    /// Checks one file; `full` hashes it whatever its stamp (and leaves the reporting to the
    /// caller, while a quick check logs what it finds wrong).
    fn check(&self, entry: &CatalogueEntry, file: &FileSpec, full: bool) -> FileState {
        let dir = self.model_dir(entry.name);
        let path = dir.join(file.name);
        let (state, why) = compare(&dir, &path, file, full);
        if let (false, Some(why)) = (full, why) {
            tracing::warn!(path = %path.display(), "{why}");
        }
        state
    }

    /// The first file of the model that was verified once but changed since, if any.
    pub fn modified_file(&self, entry: &CatalogueEntry) -> Option<PathBuf> {
        entry
            .files
            .iter()
            .find(|f| self.check_file(entry, f) == FileState::Modified)
            .map(|f| self.model_dir(entry.name).join(f.name))
    }

    /// Waits for the pull lock of the model `name`; blocks the thread until it is free.
    pub fn lock_model(&self, name: &str) -> Result<ModelLock, StoreError> {
        let path = self.lock_path(name);
        let file = File::create(&path).map_err(io_err(&path))?;
        file.lock().map_err(io_err(&path))?;
        Ok(ModelLock {
            model: name.to_owned(),
            _file: file,
        })
    }

    fn lock_path(&self, name: &str) -> PathBuf {
        self.root.join(format!(".{name}.lock"))
    }

    /// Removes what interrupted pulls left behind: `.partial-*` files in the directories of
    /// models no pull is fetching now (their pull lock is free), and, when no pull of any
    /// model runs, the scratch directories under `.tmp/`. Kept: `.partial/`, where pulls from
    /// peers keep what they fetched to resume it. Returns how many entries were removed.
    pub fn clean_leftovers(&self) -> usize {
        let mut removed = 0;
        let mut all_idle = true;
        // Held until the end, so no pull starts while its scratch space is cleared.
        let mut locks = Vec::new();
        for entry in crate::catalogue::CATALOGUE {
            let Ok(lock) = File::create(self.lock_path(entry.name)) else {
                all_idle = false;
                continue;
            };
            if lock.try_lock().is_err() {
                all_idle = false;
                continue;
            }
            let Ok(dir) = fs::read_dir(self.model_dir(entry.name)) else {
                locks.push(lock);
                continue;
            };
            for item in dir.flatten() {
                if item.file_name().to_string_lossy().starts_with(".partial-")
                    && fs::remove_file(item.path()).is_ok()
                {
                    removed += 1;
                }
            }
            locks.push(lock);
        }
        let scratch = self.root.join(".tmp");
        if let (true, Ok(dir)) = (all_idle, fs::read_dir(&scratch)) {
            for item in dir.flatten() {
                let path = item.path();
                let gone = if path.is_dir() {
                    fs::remove_dir_all(&path)
                } else {
                    fs::remove_file(&path)
                };
                if gone.is_ok() {
                    removed += 1;
                }
            }
        }
        if removed > 0 {
            tracing::info!(removed, store = %self.root.display(), "removed what interrupted pulls left");
        }
        removed
    }

    /// Downloads whatever files of the model are missing; returns the model's directory.
    pub fn pull(&self, entry: &CatalogueEntry) -> Result<PathBuf, StoreError> {
        let dir = self.model_dir(entry.name);
        fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        let _lock = self.lock_model(entry.name)?;
        if self.is_present(entry) {
            return Ok(dir);
        }
        let mut ctx = FetchContext::new(&self.root.join(".tmp"), &self.hf_endpoint, self.http)?;
        let progress = Progress::bytes(&format!("pulling {}", entry.name));
        for file in entry.files {
            let target = dir.join(file.name);
            match self.check_file(entry, file) {
                FileState::Ok => continue,
                FileState::Modified => tracing::warn!(
                    path = %target.display(),
                    "model file modified since its download; fetching it again"
                ),
                FileState::Missing => {}
            }
            self.fetch_file(entry, file, &target, &mut ctx, &progress)?;
            let mut verified = read_verified(&dir);
            verified
                .files
                .insert(file.name.to_owned(), verified_record(file, &target));
            write_verified(&dir, &verified)?;
            // What an interrupted pull from peers kept of this file is of no use now.
            let partial = self.partial_path(file.sha256);
            if partial.exists() {
                if let Err(e) = fs::remove_file(&partial) {
                    tracing::warn!(path = %partial.display(), error = %e, "cannot remove a partial file");
                }
            }
        }
        progress.finish();
        tracing::info!(model = entry.name, dir = %dir.display(), "model ready");
        Ok(dir)
    }

    fn fetch_file(
        &self,
        entry: &CatalogueEntry,
        file: &FileSpec,
        target: &Path,
        ctx: &mut FetchContext,
        progress: &Progress,
    ) -> Result<(), StoreError> {
        let parent = target.parent().unwrap_or(&self.root);
        fs::create_dir_all(parent).map_err(io_err(parent))?;
        let mut errors = Vec::new();
        for spec in file.sources {
            let parts = Source::parse_parts(spec)?;
            let desc = parts
                .iter()
                .map(Source::describe)
                .collect::<Vec<_>>()
                .join(" + ");
            tracing::info!(model = entry.name, file = file.name, source = %desc, "fetching");
            let tmp = tempfile::Builder::new()
                .prefix(".partial-")
                .tempfile_in(parent)
                .map_err(io_err(parent))?;
            let mut writer = HashingWriter::new(BufWriter::new(tmp.as_file()), file.size);
            let mut result = Ok(0u64);
            for part in &parts {
                result = part.copy_to(ctx, &mut writer, progress);
                if result.is_err() {
                    break;
                }
            }
            if let Err(e) = result {
                tracing::warn!(source = %desc, error = %e, "source failed");
                errors.push(e.to_string());
                continue;
            }
            let (buffered, digest, size) = writer.finish();
            buffered
                .into_inner()
                .map_err(|e| e.into_error())
                .and_then(|f| f.sync_all())
                .map_err(io_err(tmp.path()))?;
            let actual = hex::encode(digest);
            if actual != file.sha256 || size != file.size {
                let err = StoreError::Verification(format!(
                    "{}/{} from {desc} failed verification: expected sha256 {} ({} bytes), got {actual} ({size} bytes)",
                    entry.name, file.name, file.sha256, file.size
                ));
                tracing::warn!(error = %err, "discarding download");
                errors.push(err.to_string());
                continue;
            }
            tmp.persist(target).map_err(|e| StoreError::Io {
                path: target.to_owned(),
                source: e.error,
            })?;
            sync_dir(parent);
            return Ok(());
        }
        Err(StoreError::AllSourcesFailed {
            model: entry.name.to_owned(),
            file: file.name.to_owned(),
            errors: errors.join("; "),
        })
    }

    /// Where a serving pod saves the manifests of the files it serves (`/pod/blob/1.0.0`).
    pub fn manifest_dir(&self) -> PathBuf {
        self.root.join(".manifests")
    }

    /// Where a download from peers keeps its partial file between attempts.
    pub fn partial_path(&self, sha256: &str) -> PathBuf {
        self.root.join(".partial").join(sha256)
    }

    /// Whether one file of a model is present and verified (hashed again if its stamp changed).
    pub fn file_present(&self, entry: &CatalogueEntry, file: &FileSpec) -> bool {
        self.check_file(entry, file) == FileState::Ok
    }

    /// Moves a complete file, already checked against `file.sha256` by the caller, into the
    /// model's directory and records it as verified. The caller holds the model's pull lock
    /// (`lock`), from before it fetched the file, so no other pull writes or installs it
    /// meanwhile.
    pub fn install_verified(
        &self,
        lock: &ModelLock,
        entry: &CatalogueEntry,
        file: &FileSpec,
        from: &Path,
    ) -> Result<PathBuf, StoreError> {
        let dir = self.model_dir(entry.name);
        if lock.model != entry.name {
            return Err(StoreError::Io {
                path: dir,
                source: io::Error::other(format!(
                    "installing into {} under the lock of {}",
                    entry.name, lock.model
                )),
            });
        }
        fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        let target = dir.join(file.name);
        if let Some(parent) = target.parent() {
            fs::create_dir_all(parent).map_err(io_err(parent))?;
        }
        fs::rename(from, &target).map_err(io_err(&target))?;
        sync_dir(&dir);
        let mut verified = read_verified(&dir);
        verified
            .files
            .insert(file.name.to_owned(), verified_record(file, &target));
        write_verified(&dir, &verified)?;
        Ok(target)
    }

    /// Deletes a model's files; returns whether there was anything to delete.
    pub fn remove(&self, name: &str) -> Result<bool, StoreError> {
        let dir = self.model_dir(name);
        if !dir.exists() {
            return Ok(false);
        }
        fs::remove_dir_all(&dir).map_err(io_err(&dir))?;
        Ok(true)
    }
}

/// The state of the file at `path` against its record in `dir`, and what is wrong with it.
fn compare(dir: &Path, path: &Path, file: &FileSpec, full: bool) -> (FileState, Option<String>) {
    let mut verified = read_verified(dir);
    let Some(record) = verified.files.get(file.name).filter(|r| r.is_of(file)) else {
        return (FileState::Missing, None);
    };
    let Ok(meta) = fs::metadata(path) else {
        return (FileState::Missing, None);
    };
    if meta.len() != file.size {
        let why = format!(
            "model file is {} bytes, not the {} verified",
            meta.len(),
            file.size
        );
        return (FileState::Modified, Some(why));
    }
    let stamp = Stamp::of(&meta);
    if !full && stamp.is_some() && record.stamp == stamp {
        return (FileState::Ok, None);
    }
    match sha256_file(path) {
        Ok(actual) if actual == file.sha256 => {
            if record.stamp != stamp {
                let record = VerifiedFile {
                    sha256: file.sha256.to_owned(),
                    size: file.size,
                    stamp,
                };
                verified.files.insert(file.name.to_owned(), record);
                if let Err(e) = write_verified(dir, &verified) {
                    tracing::debug!(error = %e, "cannot record a re-verified file's stamp");
                }
            }
            (FileState::Ok, None)
        }
        Ok(actual) => {
            let why = format!(
                "model file modified since it was verified: sha256 {actual}, not {}",
                file.sha256
            );
            (FileState::Modified, Some(why))
        }
        Err(e) => (
            FileState::Missing,
            Some(format!("cannot read a model file: {e}")),
        ),
    }
}

/// The record of `file`, just verified at `path`, stamped as it is now.
fn verified_record(file: &FileSpec, path: &Path) -> VerifiedFile {
    VerifiedFile {
        sha256: file.sha256.to_owned(),
        size: file.size,
        stamp: fs::metadata(path).ok().as_ref().and_then(Stamp::of),
    }
}

fn read_verified(dir: &Path) -> Verified {
    fs::read(dir.join(VERIFIED_FILE))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

fn write_verified(dir: &Path, verified: &Verified) -> Result<(), StoreError> {
    let path = dir.join(VERIFIED_FILE);
    let mut tmp = tempfile::NamedTempFile::new_in(dir).map_err(io_err(dir))?;
    let body = serde_json::to_vec_pretty(verified).map_err(|e| StoreError::Io {
        path: path.clone(),
        source: io::Error::other(e),
    })?;
    tmp.write_all(&body)
        .and_then(|()| tmp.as_file().sync_all())
        .map_err(io_err(&path))?;
    tmp.persist(&path).map_err(|e| StoreError::Io {
        path: path.clone(),
        source: e.error,
    })?;
    sync_dir(dir);
    Ok(())
}

/// Makes a rename durable; failures only weaken crash safety, so they are logged.
fn sync_dir(dir: &Path) {
    if let Err(e) = File::open(dir).and_then(|d| d.sync_all()) {
        tracing::debug!(dir = %dir.display(), error = %e, "cannot sync directory");
    }
}

struct HashingWriter<W> {
    inner: W,
    hasher: Sha256,
    size: u64,
    /// Bytes past this are refused: a source sending more than the catalogue's size is wrong,
    /// and is stopped before it fills the disk.
    limit: u64,
}

impl<W: Write> HashingWriter<W> {
    fn new(inner: W, limit: u64) -> Self {
        Self {
            inner,
            hasher: Sha256::new(),
            size: 0,
            limit,
        }
    }

    fn finish(self) -> (W, [u8; 32], u64) {
        (self.inner, self.hasher.finalize().into(), self.size)
    }
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.size.saturating_add(buf.len() as u64) > self.limit {
            return Err(io::Error::other(format!(
                "more than the {} bytes the catalogue gives",
                self.limit
            )));
        }
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.size += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// SHA-256 of a file, lowercase hex.
pub fn sha256_file(path: &Path) -> io::Result<String> {
    let mut f = File::open(path)?;
    let mut hasher = Sha256::new();
    io::copy(&mut f, &mut hasher)?;
    Ok(hex::encode(hasher.finalize()))
}
