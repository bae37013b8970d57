//! `pod start`: layer `config.toml` and the environment under the flags, plan the models and
//! services, then either print the plan (`--dry-run`) or run the node until a signal.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use clap::ArgMatches;
use pod_inference::{EngineConfig, Placement};
use pod_node::access::Access;
use pod_node::config::{self, FileConfig, StartSettings};
use pod_node::identity::Identity;
use pod_node::node::{Node, StartOptions};
use pod_node::profile::Profile;

mod plan;

pub(crate) const START_HELP: &str = "\
Every setting can also come from a POD_* variable (shown as [env: ...]) or from config.toml in the \
state directory (--config FILE for another), under the flag's name with `_` for `-` (`--no-x` \
flags are `x = false`); flags win over variables, variables over the file. deploy/config.example.toml \
documents the keys. `pod start --dry-run` shows the resulting models and services without starting.";

/// Runs `pod start` with `settings` from the command line, `config` the `--config` file if
/// one was named, and `matches` those of `start` (to tell given flags from defaults).
pub(crate) fn exec(
    home: &Path,
    config: Option<PathBuf>,
    mut settings: StartSettings,
    matches: &ArgMatches,
) -> Result<()> {
    let config_path = config.clone().unwrap_or_else(|| config::default_path(home));
    let file = FileConfig::load(&config_path, config.is_some())?;
    let config_found = file.is_some();
    let sources = settings.layer(file.unwrap_or_default(), matches);
    // The file may set the thread count; nothing has started a thread pool yet.
    crate::set_threads(settings.threads);
    crate::init_tracing(&settings.log, settings.log_format);
    let store = super::open_store(home, settings.models_dir.as_deref())?;
    let args = settings.args;

    let plan = plan::plan(&store, &args, home)?;
    if args.profile == Profile::Auto {
        tracing::info!(
            profile = %plan.profile.profile,
            reason = %plan.profile.reason,
            "profile auto picked {}",
            plan.profile.profile
        );
    }
    if args.dry_run {
        let config_file = serde_json::json!({
            "path": config_path,
            "found": config_found,
        });
        return plan::print(&args, &plan, config_file, &sources);
    }

    store.clean_leftovers();
    let (identity, _) = Identity::load_or_create(home)?;
    let bulk_listen = plan::bulk_listen(&args, &plan.mesh, plan.profile.profile);
    let opts = StartOptions {
        identity,
        profile: plan.profile.profile,
        models: plan.models.iter().map(|m| m.name.clone()).collect(),
        api: !args.no_api,
        api_host: plan.api_host,
        api_port: args.api_port,
        api_keys: plan.api_keys,
        public_api: args.public_api,
        cors_origins: args.cors_origins.clone(),
        placement: plan.placement.unwrap_or_else(Placement::cpu),
        device_name: plan.device_name,
        layers: args.layers,
        max_memory: args.max_memory.map(|b| b.as_u64()),
        engine: EngineConfig {
            max_active: args.max_batch.max(1),
            max_queue: args.max_queue,
            max_context: args.ctx_size,
            kv_memory_bytes: Some(plan::kv_memory_bytes(&args)),
            prefix_cache_bytes: args.prefix_cache << 20,
            ..EngineConfig::default()
        },
        pull: !args.no_pull,
        grace: Duration::from_secs(args.shutdown_grace),
        mesh: plan.mesh,
        home: home.to_path_buf(),
        serve_mesh: !args.no_serve_mesh,
        route: args.route,
        serve_rate: args.serve_rate,
        bulk_listen,
        pull_bulk: !args.no_bulk,
        access: Access {
            serve_to: args.serve_to,
            trusted: args.trust.iter().copied().collect(),
        },
    };
    let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    let result =
        runtime.block_on(async { Node::start(store, opts).await?.run_until_stopped().await });
    runtime.shutdown_timeout(Duration::from_secs(1));
    Ok(result?)
}
