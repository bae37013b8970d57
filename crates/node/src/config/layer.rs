//! Layering `pod start`'s settings: flags win over `POD_*` variables, variables over
//! `config.toml`, the file over the built-in defaults.
//!
//! A setting is a field of [`StartArgs`] (or a global flag in [`StartSettings`]), a field of
//! [`FileConfig`], and one row of the table below, which also gives [`KEYS`].

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;

use clap::parser::ValueSource;
use clap::ArgMatches;

use super::{FileConfig, LogFormat, StartArgs};

/// Where a setting's effective value came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// The command line.
    Flag,
    /// A `POD_*` variable.
    Env,
    /// `config.toml`.
    Config,
    /// The built-in default.
    Default,
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Source::Flag => "flag",
            Source::Env => "env",
            Source::Config => "config",
            Source::Default => "default",
        })
    }
}

/// Where each effective `pod start` setting came from, by its `config.toml` key.
pub type Sources = BTreeMap<&'static str, Source>;

/// Every setting `pod start` runs with: its own flags and the global ones `config.toml` may
/// also set.
#[derive(Debug)]
pub struct StartSettings {
    /// The flags of `pod start`.
    pub args: StartArgs,
    /// `--models-dir`.
    pub models_dir: Option<PathBuf>,
    /// `--threads`.
    pub threads: Option<usize>,
    /// `--log`.
    pub log: String,
    /// `--log-format`.
    pub log_format: LogFormat,
}

/// Whether the user set argument `id` (on the command line or through its variable). Global
/// arguments are in the subcommand's matches too, wherever they were given.
pub fn given(matches: &ArgMatches, id: &str) -> Option<Source> {
    match matches.value_source(id) {
        Some(ValueSource::CommandLine) => Some(Source::Flag),
        Some(ValueSource::EnvVariable) => Some(Source::Env),
        _ => None,
    }
}

/// Flags and variables win; else the file's value replaces the built-in default in `value`.
fn layer<T>(
    sources: &mut Sources,
    matches: &ArgMatches,
    id: &str,
    key: &'static str,
    value: &mut T,
    file: Option<T>,
) {
    let source = given(matches, id)
        .or_else(|| {
            file.map(|v| {
                *value = v;
                Source::Config
            })
        })
        .unwrap_or(Source::Default);
    sources.insert(key, source);
}

/// The file's value as the field holds it.
fn same<T>(v: T) -> T {
    v
}

/// `pull = false` is `--no-pull`.
fn not(b: bool) -> bool {
    !b
}

/// One row per setting: `key <- clap id => field of StartSettings, file value to field value`.
macro_rules! settings {
    ($($key:ident <- $id:ident => $($field:ident).+, $conv:expr;)*) => {
        /// Every key the file may hold, in the order of the example file.
        pub const KEYS: &[&str] = &[$(stringify!($key)),*];

        impl StartSettings {
            /// Applies `config.toml` under the flags and variables `matches` (those of
            /// `pod start`) holds; returns where each setting came from.
            pub fn layer(&mut self, file: FileConfig, matches: &ArgMatches) -> Sources {
                let mut sources = Sources::new();
                $(
                    layer(
                        &mut sources,
                        matches,
                        stringify!($id),
                        stringify!($key),
                        &mut self.$($field).+,
                        file.$key.map($conv),
                    );
                )*
                sources
            }
        }
    };
}

settings! {
    profile <- profile => args.profile, same;
    models <- models => args.models, same;
    models_dir <- models_dir => models_dir, Some;
    pull <- no_pull => args.no_pull, not;
    device <- device => args.device, same;
    layers <- layers => args.layers, Some;
    max_memory <- max_memory => args.max_memory, Some;
    max_batch <- max_batch => args.max_batch, same;
    max_queue <- max_queue => args.max_queue, same;
    threads <- threads => threads, Some;
    ctx_size <- ctx_size => args.ctx_size, Some;
    kv_memory <- kv_memory => args.kv_memory, Some;
    prefix_cache <- prefix_cache => args.prefix_cache, same;
    api <- no_api => args.no_api, not;
    api_host <- api_host => args.api_host, same;
    api_port <- api_port => args.api_port, same;
    api_key_file <- api_key_file => args.api_key_file, Some;
    public_api <- public_api => args.public_api, same;
    cors_origins <- cors_origins => args.cors_origins, same;
    shutdown_grace <- shutdown_grace => args.shutdown_grace, same;
    p2p_port <- p2p_port => args.p2p_port, same;
    listen <- listen => args.listen, same;
    external_addr <- external_addr => args.external_addr, same;
    bootstrap <- bootstrap => args.bootstrap, same;
    mdns <- no_mdns => args.no_mdns, not;
    nat_trust_private <- nat_trust_private => args.nat_trust_private, same;
    upnp <- no_upnp => args.no_upnp, not;
    relay_circuit_mib <- relay_circuit_mib => args.relay_circuit_mib, same;
    serve_mesh <- no_serve_mesh => args.no_serve_mesh, not;
    route <- route => args.route, same;
    announce_interval <- announce_interval => args.announce_interval, same;
    serve_rate <- serve_rate => args.serve_rate, same;
    bulk <- no_bulk => args.no_bulk, not;
    bulk_port <- bulk_port => args.bulk_port, Some;
    mesh_key <- mesh_key => args.mesh_key, Some;
    trust <- trust => args.trust, same;
    serve_to <- serve_to => args.serve_to, same;
    log <- log => log, same;
    log_format <- log_format => log_format, same;
}

#[cfg(test)]
mod tests {
    use clap::{Arg, Args, Command, FromArgMatches};

    use super::*;

    /// `pod start`'s flags and the global ones the file may set.
    fn parse(argv: &[&str]) -> (StartSettings, ArgMatches) {
        let cmd = StartArgs::augment_args(Command::new("start"))
            .arg(Arg::new("models_dir").long("models-dir"))
            .arg(Arg::new("threads").long("threads"))
            .arg(Arg::new("log").long("log"))
            .arg(Arg::new("log_format").long("log-format"));
        let matches = cmd.try_get_matches_from(argv).unwrap();
        let settings = StartSettings {
            args: StartArgs::from_arg_matches(&matches).unwrap(),
            models_dir: None,
            threads: None,
            log: "info".into(),
            log_format: LogFormat::Text,
        };
        (settings, matches)
    }

    #[test]
    fn flags_win_over_the_file_and_the_file_over_the_defaults() {
        let (mut s, m) = parse(&["start", "--api-port", "9000", "--threads", "2"]);
        let file = FileConfig {
            api_port: Some(1),
            threads: Some(7),
            max_batch: Some(3),
            pull: Some(false),
            models_dir: Some("/srv/models".into()),
            log_format: Some(LogFormat::Json),
            ..FileConfig::default()
        };
        let sources = s.layer(file, &m);
        assert_eq!(s.args.api_port, 9000);
        assert_eq!(sources["api_port"], Source::Flag);
        assert_eq!(sources["threads"], Source::Flag);
        assert_eq!(s.args.max_batch, 3);
        assert_eq!(sources["max_batch"], Source::Config);
        assert!(s.args.no_pull, "pull = false is --no-pull");
        assert_eq!(sources["pull"], Source::Config);
        assert_eq!(s.models_dir, Some("/srv/models".into()));
        assert_eq!(s.log_format, LogFormat::Json);
        assert_eq!(s.args.max_queue, 256);
        assert_eq!(sources["max_queue"], Source::Default);
        assert_eq!(sources.len(), KEYS.len(), "every key has a row");
    }

    #[test]
    fn layers_auto_and_max_memory_come_from_flags_variables_or_the_file() {
        use crate::stage::placement::StageLayers;
        let (mut s, m) = parse(&["start", "--layers", "auto", "--max-memory", "3GiB"]);
        s.layer(FileConfig::default(), &m);
        assert_eq!(s.args.layers, Some(StageLayers::Auto));
        assert_eq!(s.args.max_memory.map(|b| b.as_u64()), Some(3 << 30));
        let file: FileConfig = toml::from_str("layers = \"auto\"\nmax_memory = \"800MB\"").unwrap();
        let (mut s, m) = parse(&["start"]);
        let sources = s.layer(file, &m);
        assert_eq!(s.args.layers, Some(StageLayers::Auto));
        assert_eq!(s.args.max_memory.map(|b| b.as_u64()), Some(800_000_000));
        assert_eq!(sources["max_memory"], Source::Config);
        let cmd = StartArgs::augment_args(Command::new("start"));
        for bad in [
            &["start", "--layers", "most"][..],
            &["start", "--max-memory", "lots"][..],
        ] {
            assert!(cmd.clone().try_get_matches_from(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn who_may_connect_and_be_served_layers_like_the_rest() {
        use crate::access::ServeTo;
        let (a, b) = (libp2p::PeerId::random(), libp2p::PeerId::random());
        let (mut s, m) = parse(&["start"]);
        assert_eq!(s.args.serve_to, ServeTo::Any, "open by default");
        assert!(s.args.mesh_key.is_none() && s.args.trust.is_empty());
        let file = FileConfig {
            mesh_key: Some("/etc/pod/mesh.key".into()),
            trust: Some(vec![a]),
            serve_to: Some(ServeTo::Trusted),
            ..FileConfig::default()
        };
        let sources = s.layer(file.clone(), &m);
        assert_eq!(s.args.mesh_key, Some("/etc/pod/mesh.key".into()));
        assert_eq!(s.args.trust, vec![a]);
        assert_eq!(s.args.serve_to, ServeTo::Trusted);
        assert_eq!(sources["mesh_key"], Source::Config);
        assert_eq!(sources["trust"], Source::Config);

        let (b_text, key) = (b.to_string(), "/run/keys/mesh.key");
        let (mut s, m) = parse(&[
            "start",
            "--trust",
            &b_text,
            "--serve-to",
            "any",
            "--mesh-key",
            key,
        ]);
        let sources = s.layer(file, &m);
        assert_eq!(s.args.trust, vec![b], "the flag replaces the file's list");
        assert_eq!(s.args.serve_to, ServeTo::Any);
        assert_eq!(s.args.mesh_key, Some(key.into()));
        assert_eq!(sources["trust"], Source::Flag);
        assert_eq!(sources["serve_to"], Source::Flag);

        let cmd = StartArgs::augment_args(Command::new("start"));
        for bad in [
            &["start", "--serve-to", "everyone"][..],
            &["start", "--trust", "not-a-peer-id"][..],
        ] {
            assert!(cmd.clone().try_get_matches_from(bad).is_err(), "{bad:?}");
        }
    }
}
