//! `$POD_HOME/config.toml`: the settings of `pod start`, read before the environment and the
//! flags override them (flags > `POD_*` variables > this file > built-in defaults).
//!
//! Every key is optional and flat (no tables); `deploy/config.example.toml` documents them all.
//! An unknown key or a bad value is an error naming the key, the line and the file.
//! [`StartSettings::layer`] puts the file under the flags and the environment.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use bytesize::ByteSize;
use libp2p::{Multiaddr, PeerId};
use pod_inference::DeviceSpec;
use serde::{Deserialize, Deserializer};

use crate::access::ServeTo;
use crate::backend::Route;
use crate::mesh::capability::MAX_TRUSTED;
use crate::profile::Profile;
use crate::stage::placement::StageLayers;

mod api_host;
mod layer;
mod start_args;

pub use api_host::{ApiHost, ApiHostError};
pub use layer::{given, Source, Sources, StartSettings, KEYS};
pub use start_args::StartArgs;

/// The file's name in the state directory.
pub const FILE_NAME: &str = "config.toml";

/// The settings `config.toml` may hold. `None`: not set in the file, so the environment or
/// the built-in default applies.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// `--profile`.
    #[serde(default, deserialize_with = "parsed")]
    pub profile: Option<Profile>,
    /// `--model`, repeated: catalogue names or paths (relative ones start at the file's folder).
    pub models: Option<Vec<String>>,
    /// `--models-dir` (relative: from the file's folder).
    pub models_dir: Option<PathBuf>,
    /// `false`: `--no-pull`.
    pub pull: Option<bool>,
    /// `--device`.
    #[serde(default, deserialize_with = "parsed")]
    pub device: Option<DeviceSpec>,
    /// `--layers`: the blocks this pod serves as a pipeline stage, e.g. `"0-14"`, or `"auto"`.
    #[serde(default, deserialize_with = "parsed")]
    pub layers: Option<StageLayers>,
    /// `--max-memory`: what a stage with `layers = "auto"` may fill, e.g. `"3GiB"`.
    #[serde(default, deserialize_with = "parsed")]
    pub max_memory: Option<ByteSize>,
    /// `--max-batch`, at least 1.
    pub max_batch: Option<usize>,
    /// `--max-queue`.
    pub max_queue: Option<usize>,
    /// `--threads`, at least 1.
    pub threads: Option<usize>,
    /// `--ctx-size`, at least 16 tokens.
    pub ctx_size: Option<usize>,
    /// `--kv-memory`, MiB, at least 1.
    pub kv_memory: Option<usize>,
    /// `--prefix-cache`, MiB; 0 turns the prefix cache off.
    pub prefix_cache: Option<usize>,
    /// `false`: `--no-api`.
    pub api: Option<bool>,
    /// `--api-host`.
    #[serde(default, deserialize_with = "parsed")]
    pub api_host: Option<ApiHost>,
    /// `--api-port`.
    pub api_port: Option<u16>,
    /// `--api-key-file` (relative: from the file's folder).
    pub api_key_file: Option<PathBuf>,
    /// `--public-api`.
    pub public_api: Option<bool>,
    /// `--cors-origin`, repeated.
    pub cors_origins: Option<Vec<String>>,
    /// `--shutdown-grace`, seconds.
    pub shutdown_grace: Option<u64>,
    /// `--p2p-port`.
    pub p2p_port: Option<u16>,
    /// `--listen`, repeated.
    #[serde(default, deserialize_with = "multiaddrs")]
    pub listen: Option<Vec<Multiaddr>>,
    /// `--external-addr`, repeated.
    #[serde(default, deserialize_with = "multiaddrs")]
    pub external_addr: Option<Vec<Multiaddr>>,
    /// `--bootstrap`, repeated.
    #[serde(default, deserialize_with = "multiaddrs")]
    pub bootstrap: Option<Vec<Multiaddr>>,
    /// `false`: `--no-mdns`.
    pub mdns: Option<bool>,
    /// `--nat-trust-private`.
    pub nat_trust_private: Option<bool>,
    /// `false`: `--no-upnp`.
    pub upnp: Option<bool>,
    /// `--relay-circuit-mib`.
    pub relay_circuit_mib: Option<u64>,
    /// `false`: `--no-serve-mesh`.
    pub serve_mesh: Option<bool>,
    /// `--route`.
    #[serde(default, deserialize_with = "route")]
    pub route: Option<Route>,
    /// `--announce-interval`, 1 to 3600 seconds.
    pub announce_interval: Option<u64>,
    /// `--serve-rate`: bytes per second per peer for model files; 0: no limit.
    pub serve_rate: Option<u64>,
    /// `false`: `--no-bulk`.
    pub bulk: Option<bool>,
    /// `--bulk-port`.
    pub bulk_port: Option<u16>,
    /// `--mesh-key` (relative: from the file's folder).
    pub mesh_key: Option<PathBuf>,
    /// `--trust`, repeated: PeerIds.
    #[serde(default, deserialize_with = "peer_ids")]
    pub trust: Option<Vec<PeerId>>,
    /// `--serve-to`: `any` or `trusted`.
    #[serde(default, deserialize_with = "parsed")]
    pub serve_to: Option<ServeTo>,
    /// `--log`.
    pub log: Option<String>,
    /// `--log-format`.
    pub log_format: Option<LogFormat>,
}

/// How log lines are written to stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

impl fmt::Display for LogFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        })
    }
}

/// Reading `config.toml` failed.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file exists (or was named with `--config`) but cannot be read.
    #[error("cannot read config file {}: {error}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        error: std::io::Error,
    },
    /// The file is not valid TOML.
    #[error("config file {}{}: {message}", path.display(), at(*line))]
    Syntax {
        /// The file.
        path: PathBuf,
        /// Where, 1-based, when known.
        line: Option<usize>,
        /// What the parser said.
        message: String,
    },
    /// A key pod does not know (a typo, or a table).
    #[error("config file {}{}: unknown key `{key}`{}", path.display(), at(*line), suggest(key))]
    UnknownKey {
        /// The file.
        path: PathBuf,
        /// Where, 1-based, when known.
        line: Option<usize>,
        /// The key.
        key: String,
    },
    /// A known key with a value of the wrong type or out of range.
    #[error("config file {}{}: bad value for `{key}`: {message}", path.display(), at(*line))]
    BadValue {
        /// The file.
        path: PathBuf,
        /// Where, 1-based, when known.
        line: Option<usize>,
        /// The key.
        key: String,
        /// What is wrong with it.
        message: String,
    },
}

fn at(line: Option<usize>) -> String {
    line.map_or_else(String::new, |l| format!(", line {l}"))
}

/// ` (did you mean `x`?)` for a key one or two edits from a known one.
fn suggest(key: &str) -> String {
    KEYS.iter()
        .map(|k| (edit_distance(key, k), *k))
        .filter(|(d, _)| *d <= 2)
        .min()
        .map_or_else(
            || format!(" (known keys: {})", KEYS.join(", ")),
            |(_, k)| format!(" (did you mean `{k}`?)"),
        )
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let replace = prev[j] + usize::from(ca != *cb);
            cur.push(replace.min(prev[j + 1] + 1).min(cur[j] + 1));
        }
        prev = cur;
    }
    prev[b.len()]
}

/// Where the file is looked for: `config.toml` in the state directory.
pub fn default_path(home: &Path) -> PathBuf {
    home.join(FILE_NAME)
}

impl FileConfig {
    /// Reads the file at `path`. A missing file is an empty configuration unless `required`
    /// (it was named explicitly), when it is an error.
    pub fn load(path: &Path, required: bool) -> Result<Option<FileConfig>, ConfigError> {
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !required => return Ok(None),
            Err(error) => {
                return Err(ConfigError::Read {
                    path: path.to_owned(),
                    error,
                })
            }
        };
        let mut config = Self::parse(&text, path)?;
        config.resolve_paths(path.parent().unwrap_or(Path::new(".")));
        Ok(Some(config))
    }

    /// Parses the text of the file at `path` (`path` only names it in errors).
    pub fn parse(text: &str, path: &Path) -> Result<FileConfig, ConfigError> {
        let table: toml::Table = toml::from_str(text).map_err(|e| ConfigError::Syntax {
            path: path.to_owned(),
            line: e.span().map(|s| line_of(text, s.start)),
            message: one_line(e.message()),
        })?;
        // Key by key, so an error names the key whatever serde's message says.
        for (key, value) in &table {
            let line = key_line(text, key);
            if !KEYS.contains(&key.as_str()) {
                return Err(ConfigError::UnknownKey {
                    path: path.to_owned(),
                    line,
                    key: key.clone(),
                });
            }
            let mut one = toml::Table::new();
            one.insert(key.clone(), value.clone());
            let parsed: FileConfig =
                one.try_into()
                    .map_err(|e: toml::de::Error| ConfigError::BadValue {
                        path: path.to_owned(),
                        line,
                        key: key.clone(),
                        message: one_line(e.message()),
                    })?;
            parsed
                .check_ranges()
                .map_err(|message| ConfigError::BadValue {
                    path: path.to_owned(),
                    line,
                    key: key.clone(),
                    message,
                })?;
        }
        table
            .try_into()
            .map_err(|e: toml::de::Error| ConfigError::Syntax {
                path: path.to_owned(),
                line: None,
                message: one_line(e.message()),
            })
    }

    /// Limits the types alone do not express; the message is for the one key set.
    fn check_ranges(&self) -> Result<(), String> {
        if self.max_batch == Some(0) || self.threads == Some(0) || self.kv_memory == Some(0) {
            return Err("must be at least 1".into());
        }
        if self.ctx_size.is_some_and(|c| c < 16) {
            return Err("must be at least 16 tokens".into());
        }
        if let Some(s) = self.announce_interval {
            if !(1..=3600).contains(&s) {
                return Err(format!("{s} is not in 1..=3600 seconds"));
            }
        }
        if self.trust.as_ref().is_some_and(|t| t.len() > MAX_TRUSTED) {
            return Err(format!("at most {MAX_TRUSTED} trusted peers"));
        }
        if self.log.as_deref().is_some_and(|l| l.trim().is_empty()) {
            return Err("an empty log filter".into());
        }
        Ok(())
    }

    /// Makes relative paths relative to the file's folder, not to wherever pod was started.
    fn resolve_paths(&mut self, dir: &Path) {
        for path in [
            &mut self.api_key_file,
            &mut self.models_dir,
            &mut self.mesh_key,
        ]
        .into_iter()
        .flatten()
        {
            if path.is_relative() {
                *path = dir.join(&*path);
            }
        }
        for model in self.models.iter_mut().flatten() {
            if model.starts_with("./") || model.starts_with("../") {
                *model = dir.join(&*model).to_string_lossy().into_owned();
            }
        }
    }
}

/// The 1-based line holding byte `offset`.
fn line_of(text: &str, offset: usize) -> usize {
    text.get(..offset)
        .map_or(0, |s| s.bytes().filter(|b| *b == b'\n').count())
        + 1
}

/// The line where top-level `key = ...` is set, if it can be found by looking.
fn key_line(text: &str, key: &str) -> Option<usize> {
    text.lines()
        .position(|l| {
            let l = l.trim_start();
            let rest = l
                .strip_prefix(key)
                .or_else(|| l.strip_prefix(&format!("\"{key}\"")))
                .or_else(|| l.strip_prefix(&format!("[{key}]")).map(|_| "="));
            rest.is_some_and(|r| r.trim_start().starts_with('='))
        })
        .map(|i| i + 1)
}

fn one_line(message: &str) -> String {
    message
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("; ")
}

/// Parses `route` names, for the flag and the file.
pub fn parse_route(s: &str) -> Result<Route, String> {
    match s {
        "auto" => Ok(Route::Auto),
        "local" => Ok(Route::Local),
        "mesh" => Ok(Route::Mesh),
        other => Err(format!(
            "unknown route `{other}` (expected auto, local or mesh)"
        )),
    }
}

/// The name `parse_route` reads.
pub fn route_name(route: Route) -> &'static str {
    match route {
        Route::Auto => "auto",
        Route::Local => "local",
        Route::Mesh => "mesh",
    }
}

fn parsed<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
    T: FromStr,
    T::Err: fmt::Display,
{
    let s = String::deserialize(d)?;
    s.parse().map(Some).map_err(serde::de::Error::custom)
}

fn route<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Route>, D::Error> {
    let s = String::deserialize(d)?;
    parse_route(&s).map(Some).map_err(serde::de::Error::custom)
}

fn peer_ids<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<PeerId>>, D::Error> {
    Vec::<String>::deserialize(d)?
        .iter()
        .map(|s| {
            s.parse::<PeerId>()
                .map_err(|e| serde::de::Error::custom(format!("`{s}` is not a PeerId: {e}")))
        })
        .collect::<Result<Vec<_>, _>>()
        .map(Some)
}

fn multiaddrs<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<Multiaddr>>, D::Error> {
    Vec::<String>::deserialize(d)?
        .iter()
        .map(|s| {
            s.parse::<Multiaddr>()
                .map_err(|e| serde::de::Error::custom(format!("`{s}` is not a multiaddr: {e}")))
        })
        .collect::<Result<Vec<_>, _>>()
        .map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = include_str!("../../../deploy/config.example.toml");

    fn parse(text: &str) -> Result<FileConfig, String> {
        FileConfig::parse(text, Path::new("/etc/pod/config.toml")).map_err(|e| e.to_string())
    }

    #[test]
    fn the_example_parses_and_sets_what_it_says() {
        let c = parse(EXAMPLE).unwrap();
        // The example's active lines match the built-in defaults.
        assert_eq!(c.profile, Some(Profile::Auto));
        assert_eq!(c.api_port, Some(8080));
        assert_eq!(c.p2p_port, Some(crate::mesh::DEFAULT_P2P_PORT));
        // Every key is shown in the example, commented out or not.
        for key in KEYS {
            assert!(
                EXAMPLE.lines().any(|l| l
                    .trim_start_matches(['#', ' '])
                    .starts_with(&format!("{key} ="))),
                "the example does not show `{key}`"
            );
        }
        // And the commented-out values parse too: the first line showing each key.
        let mut seen = Vec::new();
        let mut uncommented = String::new();
        for line in EXAMPLE.lines() {
            let line = line.strip_prefix("# ").unwrap_or(line);
            let key = line.split(" =").next().unwrap_or_default();
            if KEYS.contains(&key) && !seen.contains(&key) {
                seen.push(key);
                uncommented.push_str(line);
                uncommented.push('\n');
            }
        }
        let all = parse(&uncommented).unwrap_or_else(|e| panic!("{e}\n{uncommented}"));
        assert!(all.bootstrap.is_some_and(|b| !b.is_empty()));
    }

    #[test]
    fn every_key_is_a_field() {
        for key in KEYS {
            let err = parse(&format!("{key} = {{ }}")).unwrap_err();
            assert!(err.contains(&format!("bad value for `{key}`")), "{err}");
        }
    }

    #[test]
    fn unknown_keys_name_the_key_the_line_and_the_file() {
        let err = parse("profile = \"relay\"\napi_prot = 80\n").unwrap_err();
        assert_eq!(
            err,
            "config file /etc/pod/config.toml, line 2: unknown key `api_prot` (did you mean `api_port`?)"
        );
        let err = parse("[mesh]\nport = 1\n").unwrap_err();
        assert!(err.contains("unknown key `mesh`"), "{err}");
        assert!(err.contains("known keys: profile"), "{err}");
    }

    #[test]
    fn bad_values_name_the_key_the_line_and_the_file() {
        let cases = [
            ("api_port = \"x\"", "api_port", "expected u16"),
            ("api_port = 70000", "api_port", "70000"),
            ("profile = \"gpu\"", "profile", "unknown profile `gpu`"),
            ("device = \"tpu\"", "device", "unknown device `tpu`"),
            ("route = \"nowhere\"", "route", "unknown route"),
            (
                "api_host = \"0.0.0.0:8080\"",
                "api_host",
                "neither an IP address nor a host name",
            ),
            (
                "bootstrap = [\"nope\"]",
                "bootstrap",
                "`nope` is not a multiaddr",
            ),
            (
                "bootstrap = \"/ip4/1.2.3.4/tcp/1\"",
                "bootstrap",
                "expected a sequence",
            ),
            ("max_batch = 0", "max_batch", "at least 1"),
            ("threads = 0", "threads", "at least 1"),
            ("ctx_size = 8", "ctx_size", "at least 16 tokens"),
            ("announce_interval = 0", "announce_interval", "1..=3600"),
            ("mdns = \"yes\"", "mdns", "expected a boolean"),
            ("log_format = \"xml\"", "log_format", "xml"),
            ("serve_to = \"all\"", "serve_to", "expected any or trusted"),
            ("trust = [\"me\"]", "trust", "`me` is not a PeerId"),
            ("trust = \"12D3KooW\"", "trust", "expected a sequence"),
            ("mesh_key = 1", "mesh_key", "expected"),
        ];
        for (text, key, needle) in cases {
            let err = parse(&format!("# pod\n\n{text}\n")).unwrap_err();
            assert!(
                err.starts_with(&format!(
                    "config file /etc/pod/config.toml, line 3: bad value for `{key}`: "
                )),
                "{err}"
            );
            assert!(err.contains(needle), "{needle:?} not in {err}");
            assert!(!err.contains('\n'), "{err}");
        }
    }

    #[test]
    fn syntax_errors_are_one_line_with_the_line_number() {
        let err = parse("profile = \"full\"\napi_port = \n").unwrap_err();
        assert!(
            err.starts_with("config file /etc/pod/config.toml, line 2: "),
            "{err}"
        );
        assert!(!err.contains('\n'), "{err}");
    }

    #[test]
    fn relative_paths_start_at_the_files_folder() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.toml");
        std::fs::write(
            &path,
            "api_key_file = \"keys\"\nmodels = [\"./my.gguf\", \"smollm2-135m-instruct\"]\nmodels_dir = \"/srv/models\"\nmesh_key = \"mesh.key\"\n",
        )
        .unwrap();
        let c = FileConfig::load(&path, true).unwrap().unwrap();
        assert_eq!(c.api_key_file, Some(dir.path().join("keys")));
        assert_eq!(c.mesh_key, Some(dir.path().join("mesh.key")));
        assert_eq!(c.models_dir, Some(PathBuf::from("/srv/models")));
        let models = c.models.unwrap();
        assert_eq!(models[0], dir.path().join("./my.gguf").to_string_lossy());
        assert_eq!(models[1], "smollm2-135m-instruct");
    }

    #[test]
    fn trust_and_serve_to_parse_and_the_trusted_list_is_bounded() {
        let id = libp2p::PeerId::random();
        let c = parse(&format!("serve_to = \"trusted\"\ntrust = [\"{id}\"]\n")).unwrap();
        assert_eq!(c.serve_to, Some(ServeTo::Trusted));
        assert_eq!(c.trust, Some(vec![id]));
        let many = vec![format!("\"{id}\""); MAX_TRUSTED + 1].join(", ");
        let err = parse(&format!("trust = [{many}]\n")).unwrap_err();
        assert!(err.contains("bad value for `trust`: at most 64"), "{err}");
    }

    #[test]
    fn a_missing_file_is_empty_unless_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.toml");
        assert_eq!(FileConfig::load(&path, false).unwrap(), None);
        let err = FileConfig::load(&path, true).unwrap_err().to_string();
        assert!(err.starts_with("cannot read config file "), "{err}");
    }
}
