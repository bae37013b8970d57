//! `pod`: a peer-to-peer AI node. This file parses the command line, fixes the thread count,
//! sets up logging and runs the command (`cli/`), printing a failure as one `error:` line.
#![deny(clippy::unwrap_used)]

use std::io::{IsTerminal, Write};
use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches};
use pod_node::config::{self, LogFormat};

mod cli;

fn main() -> ExitCode {
    let parsed = cli::Cli::command()
        .try_get_matches()
        .and_then(|m| cli::Cli::from_arg_matches(&m).map(|cli| (cli, m)));
    let (cli, matches) = match parsed {
        Ok(parsed) => parsed,
        Err(e) => return usage_error(e),
    };
    if cli.command.prints_and_exits() {
        end_quietly_on_a_closed_pipe();
    }
    set_threads(cli.threads);
    // `pod start` sets up logging itself, once config.toml has had its say.
    if !matches!(cli.command, cli::Command::Start(_)) {
        // A conversation at a terminal is no place for the mesh's info lines.
        let quiet = matches!(cli.command, cli::Command::Chat(_))
            && config::given(&matches, "log").is_none();
        init_tracing(if quiet { "warn" } else { &cli.log }, cli.log_format);
    }
    match cli::exec(cli, &matches) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let _ = std::io::stdout().flush();
            eprintln!("error: {}", one_line(&e));
            ExitCode::FAILURE
        }
    }
}

/// Restores the default action of SIGPIPE, so `pod models list | head -1` ends quietly when
/// `head` closes the pipe instead of panicking in `println!` (Rust ignores SIGPIPE, turning a
/// closed stdout into an error `println!` cannot return). The long-running commands keep it
/// ignored: a peer closing a connection mid-write must be an error there, never a death.
#[cfg(unix)]
#[allow(unsafe_code)]
fn end_quietly_on_a_closed_pipe() {
    // SAFETY: `signal` with SIG_DFL installs no handler, so there is no handler code whose
    // async-signal safety matters; it runs before this process starts any thread, so nothing
    // else is changing signal dispositions at the same time.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

#[cfg(not(unix))]
fn end_quietly_on_a_closed_pipe() {}

/// Fixes the inference thread count once, before any pool starts: the kernels' pool and candle
/// read it from the environment (and would otherwise probe the CPU list on every operation).
pub(crate) fn set_threads(threads: Option<usize>) {
    const VARS: [&str; 2] = ["RAYON_NUM_THREADS", "CANDLE_NUM_THREADS"];
    let n = threads
        .or_else(|| {
            VARS.iter()
                .find_map(|v| std::env::var(v).ok()?.parse().ok())
                .filter(|&n: &usize| n > 0)
        })
        .unwrap_or_else(pod_inference::default_threads);
    for var in VARS {
        std::env::set_var(var, n.to_string());
    }
}

/// The error and its causes on one line, skipping causes the message already quotes.
fn one_line(e: &anyhow::Error) -> String {
    let mut msg = e.to_string();
    for cause in e.chain().skip(1) {
        let cause = cause.to_string();
        if !msg.contains(&cause) {
            msg.push_str(": ");
            msg.push_str(&cause);
        }
    }
    // Library errors may carry backtraces (RUST_BACKTRACE) after the message.
    msg.lines().next().unwrap_or_default().to_owned()
}

/// Prints a command-line error as one line (help and version are printed as clap does).
fn usage_error(e: clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    if matches!(
        e.kind(),
        ErrorKind::DisplayHelp
            | ErrorKind::DisplayVersion
            | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
    ) {
        e.exit();
    }
    let text = e.render().to_string();
    let mut line = String::new();
    for part in text
        .lines()
        .map(str::trim)
        .take_while(|l| !l.starts_with("Usage:") && !l.starts_with("For more information"))
        .filter(|l| !l.is_empty())
    {
        if !line.is_empty() {
            line.push_str(if line.ends_with(':') { " " } else { "; " });
        }
        line.push_str(part);
    }
    eprintln!("{line}");
    ExitCode::from(2)
}

/// Logs to stderr with `filter` (RUST_LOG, when set, wins) in `format`.
pub(crate) fn init_tracing(filter: &str, format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(filter));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false);
    match format {
        LogFormat::Text => builder
            .with_ansi(std::io::stderr().is_terminal())
            .compact()
            .init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}
