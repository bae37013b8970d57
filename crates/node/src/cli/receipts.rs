//! `pod receipts`: work served to and consumed from each peer, from the signed receipt ledger.

use std::path::Path;

use anyhow::{Context, Result};
use clap::Args;

#[derive(Debug, Args)]
pub(crate) struct ReceiptsArgs {
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

pub(crate) fn exec(home: &Path, args: ReceiptsArgs) -> Result<()> {
    let ledger = pod_node::receipts::Ledger::open(home)?;
    let view = pod_node::backend::receipts_view(&ledger)
        .with_context(|| format!("cannot read {}", ledger.path().display()))?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&view)?);
        return Ok(());
    }
    if view.data.is_empty() {
        println!("no receipts yet");
    } else {
        println!(
            "{:<52} {:>8} {:>10} {:>10}   {:>8} {:>10} {:>10}",
            "PEER", "SERVED", "PROMPT", "COMPLETION", "CONSUMED", "PROMPT", "COMPLETION"
        );
        for p in &view.data {
            println!(
                "{:<52} {:>8} {:>10} {:>10}   {:>8} {:>10} {:>10}",
                p.peer,
                p.served.requests,
                p.served.prompt_tokens,
                p.served.completion_tokens,
                p.consumed.requests,
                p.consumed.prompt_tokens,
                p.consumed.completion_tokens
            );
        }
    }
    if view.invalid > 0 || view.torn > 0 {
        eprintln!(
            "skipped {} records with bad signatures and {} incomplete lines",
            view.invalid, view.torn
        );
    }
    Ok(())
}
