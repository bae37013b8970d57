//! `pod chat`: a conversation with a model through the running node, or straight with a peer
//! of the mesh (`--p2p`), answers streaming to stdout.

use std::io::{BufRead, IsTerminal, Write};
use std::path::Path;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use libp2p::Multiaddr;
use pod_inference::{ChatMessage, GenerateEvent, GenerateRequest, Prompt, Role, SamplingParams};
use pod_node::catalogue::DEFAULT_CHAT_MODEL;

use super::mesh_join::{join_mesh, MeshInfer, MeshKeyArg};
use super::node_client::{locate, require_api, Api, DaemonArgs};

pub(crate) const CHAT_HELP: &str = "\
Type a message and press enter; the answer streams back, and the conversation so far goes with \
each message. /reset forgets it (keeping --system), /exit or ctrl-d ends. With stdin not a \
terminal, each line is one message, and each answer goes to stdout followed by a newline.";

#[derive(Debug, Args)]
pub(crate) struct ChatArgs {
    /// Model to talk to. Default: the default chat model if the node offers it, else the first
    /// chat model it lists.
    #[arg(long, short)]
    model: Option<String>,
    /// A system message that opens the conversation (kept across /reset).
    #[arg(long)]
    system: Option<String>,
    /// Most tokens per answer.
    #[arg(long, default_value_t = 512)]
    max_tokens: usize,
    /// Sampling temperature; 0 is greedy. Default: the server's.
    #[arg(long)]
    temperature: Option<f32>,
    /// Random seed, for answers that repeat.
    #[arg(long)]
    seed: Option<u64>,
    /// Talk to a peer of the mesh directly, joining it with a throwaway identity, instead of
    /// through the local node's API (which reaches the mesh by itself).
    #[arg(long, conflicts_with_all = ["api", "api_key"])]
    p2p: bool,
    /// With --p2p: a peer to join the mesh through, ending in /p2p/<PeerId> (repeatable).
    #[arg(long, value_name = "MULTIADDR", requires = "p2p")]
    bootstrap: Vec<Multiaddr>,
    /// With --p2p: seconds to wait for a peer that serves the model.
    #[arg(long, default_value_t = 15, value_name = "SECONDS", requires = "p2p")]
    wait: u64,
    #[command(flatten)]
    mesh_key: MeshKeyArg,
    #[command(flatten)]
    daemon: DaemonArgs,
}

/// Where `pod chat` sends the conversation.
enum ChatVia {
    /// The local node's API, which routes to the mesh by itself.
    Api { api: Api, agent: ureq::Agent },
    /// A peer of the mesh, joined in this process.
    Mesh(Box<MeshChat>),
}

/// A mesh client living in this process for the length of a conversation.
struct MeshChat {
    runtime: tokio::runtime::Runtime,
    peers: MeshInfer,
}

/// How an answer ended.
#[derive(Debug, PartialEq, Eq)]
struct Answer {
    text: String,
    /// `stop`, `length`...
    finish_reason: String,
}

pub(crate) fn exec(home: &Path, args: ChatArgs) -> Result<()> {
    let (via, model) = if args.p2p {
        let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
        let model = args
            .model
            .clone()
            .unwrap_or_else(|| DEFAULT_CHAT_MODEL.to_owned());
        let peers = runtime.block_on(async {
            let peers = MeshInfer::new(join_mesh(home, &args.bootstrap, &args.mesh_key).await?);
            peers.wait_for_model(&model, args.wait).await?;
            anyhow::Ok(peers)
        })?;
        (ChatVia::Mesh(Box::new(MeshChat { runtime, peers })), model)
    } else {
        let located = locate(home, &args.daemon)?;
        let api = require_api(&located)?;
        let api = Api::new(&api.base, api.key.clone());
        let model = chat_model(&api, args.model.as_deref())?;
        // No overall timeout: an answer streams for as long as it takes; the server sends
        // keep-alive comments, so a silent minute means the node is gone.
        let agent = ureq::Agent::new_with_config(
            ureq::Agent::config_builder()
                .timeout_connect(Some(Duration::from_secs(10)))
                .timeout_recv_response(Some(Duration::from_secs(300)))
                .timeout_per_read(Some(Duration::from_secs(60)))
                .http_status_as_error(false)
                .build(),
        );
        (ChatVia::Api { api, agent }, model)
    };

    let interactive = std::io::stdin().is_terminal();
    let opening: Vec<ChatMessage> = args
        .system
        .iter()
        .map(|s| ChatMessage::new(Role::System, s.clone()))
        .collect();
    let mut history = opening.clone();
    if interactive {
        eprintln!(
            "chatting with {model}{}; /reset starts over, /exit or ctrl-d ends",
            match &via {
                ChatVia::Api { api, .. } => format!(" through {}", api.base),
                ChatVia::Mesh(_) => " on the mesh".to_owned(),
            }
        );
    }
    let mut stdin = std::io::stdin().lock();
    let mut line = String::new();
    loop {
        if interactive {
            eprint!("> ");
            let _ = std::io::stderr().flush();
        }
        line.clear();
        if stdin.read_line(&mut line)? == 0 {
            if interactive {
                eprintln!();
            }
            return Ok(());
        }
        let text = line.trim();
        match text {
            "" => continue,
            "/exit" | "/quit" => return Ok(()),
            "/reset" => {
                history.clone_from(&opening);
                if interactive {
                    eprintln!("(conversation reset)");
                }
                continue;
            }
            "/help" => {
                eprintln!("/reset forgets the conversation; /exit or ctrl-d ends");
                continue;
            }
            _ => {}
        }
        history.push(ChatMessage::new(Role::User, text));
        let mut out = Tally {
            out: std::io::stdout().lock(),
            bytes: 0,
        };
        let answer = match &via {
            ChatVia::Api { api, agent } => {
                chat_over_api(api, agent, &model, &history, &args, &mut out)
            }
            ChatVia::Mesh(mesh) => {
                mesh.runtime
                    .block_on(chat_on_mesh(&mesh.peers, &model, &history, &args, &mut out))
            }
        };
        if answer.is_ok() || out.bytes > 0 {
            writeln!(out.out)?;
            out.out.flush()?;
        }
        match answer {
            Ok(answer) => {
                if answer.finish_reason == "length" {
                    eprintln!("[cut at --max-tokens {}]", args.max_tokens);
                }
                history.push(ChatMessage::new(Role::Assistant, answer.text));
            }
            // At a terminal, one failed answer does not end the conversation.
            Err(e) if interactive => {
                eprintln!("error: {e:#}");
                history.pop();
            }
            Err(e) => return Err(e),
        }
    }
}

/// A writer that counts what passes through.
struct Tally<W> {
    out: W,
    bytes: usize,
}

impl<W: Write> Write for Tally<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.out.write(buf)?;
        self.bytes += n;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }
}

/// `wanted` if the node or its mesh offers it as a chat model; with none wanted, the default
/// chat model if offered, else the first chat model listed.
fn chat_model(api: &Api, wanted: Option<&str>) -> Result<String> {
    let models = api.get_json(pod_api::paths::MODELS)?;
    let chat: Vec<&str> = models["data"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|m| m["kind"] == "chat")
        .filter_map(|m| m["id"].as_str())
        .collect();
    if let Some(wanted) = wanted {
        if chat.contains(&wanted) {
            return Ok(wanted.to_owned());
        }
        bail!(
            "no chat model `{wanted}` on the pod at {} or its peers (chat models: {})",
            api.base,
            if chat.is_empty() {
                "none".to_owned()
            } else {
                chat.join(", ")
            }
        );
    }
    chat.iter()
        .find(|m| **m == DEFAULT_CHAT_MODEL)
        .or(chat.first())
        .map(|m| (*m).to_owned())
        .ok_or_else(|| {
            anyhow!(
                "the pod at {} has no chat model, and no peer offers one",
                api.base
            )
        })
}

/// One answer through `/v1/chat/completions` with `stream: true`, written to `out` as it comes.
fn chat_over_api(
    api: &Api,
    agent: &ureq::Agent,
    model: &str,
    history: &[ChatMessage],
    args: &ChatArgs,
    out: &mut impl Write,
) -> Result<Answer> {
    let mut body = serde_json::json!({
        "model": model,
        "messages": history,
        "stream": true,
        "max_tokens": args.max_tokens,
    });
    if let Some(t) = args.temperature {
        body["temperature"] = t.into();
    }
    if let Some(s) = args.seed {
        body["seed"] = s.into();
    }
    let url = format!("{}{}", api.base, pod_api::paths::CHAT_COMPLETIONS);
    let mut req = agent.post(&url).header("Content-Type", "application/json");
    if let Some(key) = &api.key {
        req = req.header("Authorization", &format!("Bearer {key}"));
    }
    let res = req
        .send(body.to_string())
        .map_err(|e| anyhow!("no pod answers at {} ({e})", api.base))?;
    let status = res.status().as_u16();
    if !(200..300).contains(&status) {
        let text = res.into_body().read_to_string().unwrap_or_default();
        let body: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
        bail!(
            "{status} {}",
            body["error"]["message"].as_str().unwrap_or(&text)
        );
    }
    let reader = std::io::BufReader::new(res.into_body().into_reader());
    let mut answer = Answer {
        text: String::new(),
        finish_reason: String::new(),
    };
    for line in reader.lines() {
        let line = line.context("the answer stream broke")?;
        let Some(data) = line.strip_prefix("data:").map(str::trim) else {
            continue;
        };
        if data == "[DONE]" {
            return Ok(answer);
        }
        let chunk: serde_json::Value =
            serde_json::from_str(data).context("the answer stream is not JSON")?;
        if let Some(msg) = chunk["error"]["message"].as_str() {
            bail!("{msg}");
        }
        let choice = &chunk["choices"][0];
        if let Some(text) = choice["delta"]["content"].as_str() {
            out.write_all(text.as_bytes())?;
            out.flush()?;
            answer.text.push_str(text);
        }
        if let Some(reason) = choice["finish_reason"].as_str() {
            reason.clone_into(&mut answer.finish_reason);
        }
    }
    bail!("the answer stream ended early")
}

/// One answer from a peer of the mesh, written to `out` as it comes.
async fn chat_on_mesh(
    peers: &MeshInfer,
    model: &str,
    history: &[ChatMessage],
    args: &ChatArgs,
    out: &mut impl Write,
) -> Result<Answer> {
    let mut sampling = SamplingParams {
        seed: args.seed,
        ..Default::default()
    };
    if let Some(t) = args.temperature {
        sampling.temperature = t;
    }
    let request = GenerateRequest {
        model: model.to_owned(),
        prompt: Prompt::Chat(history.to_vec()),
        sampling,
        max_tokens: Some(args.max_tokens),
        stop: Vec::new(),
        logprobs: None,
        json: false,
        resume: None,
    };
    let (_, mut events) = peers.generate(request).await?;
    let mut text = String::new();
    while let Some(event) = events.recv().await {
        match event {
            GenerateEvent::Delta { text: delta, .. } => {
                out.write_all(delta.as_bytes())?;
                out.flush()?;
                text.push_str(&delta);
            }
            GenerateEvent::Done { finish_reason, .. } => {
                return Ok(Answer {
                    text,
                    finish_reason: finish_reason.as_str().to_owned(),
                })
            }
            GenerateEvent::Error(e) => bail!(e),
        }
    }
    bail!("the peer stopped before finishing")
}
