//! Shared helpers for the node's integration tests: the real models, fetched by the store.
#![allow(dead_code, unreachable_pub)]

use std::path::PathBuf;
use std::sync::OnceLock;

use pod_inference::{
    ChatMessage, Engine, EngineConfig, EngineHandle, FinishReason, GenerateEvent, GenerateRequest,
    Prompt, Role, Usage,
};
use pod_node::catalogue::{DEFAULT_CHAT_MODEL, DEFAULT_EMBEDDING_MODEL};
use pod_node::loader;
use pod_node::store::ModelStore;

pub mod netns;
pub mod process;

/// Where tests keep downloaded models: `$POD_HOME`, else `~/.cache/pod`, so every test run
/// (and every test process) shares one verified copy.
pub fn test_home() -> PathBuf {
    std::env::var_os("POD_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| dirs::cache_dir().expect("no cache dir").join("pod"))
}

pub fn store() -> ModelStore {
    ModelStore::open(&test_home()).expect("open store")
}

/// Path of a catalogued model, pulled (and verified) on first use.
pub fn model_path(name: &str) -> PathBuf {
    loader::resolve(&store(), name, true)
        .unwrap_or_else(|e| panic!("cannot pull {name}: {e}"))
        .path
}

/// An engine with the default chat and embedding models, shared by the tests of one process.
pub fn engine() -> EngineHandle {
    static ENGINE: OnceLock<EngineHandle> = OnceLock::new();
    ENGINE
        .get_or_init(|| engine_with(EngineConfig::default()))
        .clone()
}

/// A new engine with `config` and the default chat and embedding models.
pub fn engine_with(config: EngineConfig) -> EngineHandle {
    let engine = Engine::start(config);
    for name in [DEFAULT_CHAT_MODEL, DEFAULT_EMBEDDING_MODEL] {
        let resolved = loader::resolve(&store(), name, true).expect("pull");
        loader::load_into(&engine, &resolved, &pod_inference::Placement::cpu()).expect("load");
    }
    engine
}

/// A one-message chat from the user.
pub fn chat(text: &str) -> Prompt {
    Prompt::Chat(vec![ChatMessage::new(Role::User, text)])
}

/// A chat request to the default chat model, sampled with the defaults, at most `max_tokens`
/// long.
pub fn greedy(prompt: &str, max_tokens: usize) -> GenerateRequest {
    GenerateRequest {
        max_tokens: Some(max_tokens),
        ..GenerateRequest::new(DEFAULT_CHAT_MODEL, chat(prompt))
    }
}

/// Starts an in-process mesh node with identity `key` on loopback, joining `bootstrap`;
/// returns its client and its dialable address (with `/p2p/`) once it listens.
pub async fn mesh_node(
    key: libp2p::identity::Keypair,
    bootstrap: Vec<libp2p::Multiaddr>,
) -> (pod_node::mesh::Client, libp2p::Multiaddr) {
    let (client, event_loop) = pod_node::mesh::new(key, loopback_mesh(bootstrap)).expect("mesh");
    tokio::spawn(event_loop.run());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let info = client.node_info().await.expect("node info");
        if let Some(a) = info.listen_addrs.first() {
            let addr = a
                .clone()
                .with(libp2p::multiaddr::Protocol::P2p(info.peer_id));
            return (client, addr);
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the node never listened"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// A mesh on a free loopback TCP port with no mDNS, joining `bootstrap`; other settings are
/// the defaults.
pub fn loopback_mesh(bootstrap: Vec<libp2p::Multiaddr>) -> pod_node::mesh::MeshConfig {
    pod_node::mesh::MeshConfig {
        listen: vec!["/ip4/127.0.0.1/tcp/0".parse().expect("multiaddr")],
        listen_optional: vec![],
        bootstrap,
        mdns: false,
        ..pod_node::mesh::MeshConfig::default()
    }
}

pub fn fixture(name: &str) -> serde_json::Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    let text =
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    serde_json::from_str(&text).expect("fixture json")
}

/// One delta of a completion as a client saw it.
#[derive(Debug, Clone, PartialEq)]
pub struct Delta {
    pub text: String,
    pub tokens: Vec<u32>,
}

/// A whole completion stream.
#[derive(Debug, Clone)]
pub struct Run {
    pub deltas: Vec<Delta>,
    pub finish: FinishReason,
    pub usage: Usage,
}

impl Run {
    pub fn text(&self) -> String {
        self.deltas.iter().map(|d| d.text.as_str()).collect()
    }

    pub fn tokens(&self) -> Vec<u32> {
        self.deltas.iter().flat_map(|d| d.tokens.clone()).collect()
    }
}

/// Runs a request on the shared [`engine`] to its end; panics on an error or after two minutes
/// without an event.
pub async fn run(req: GenerateRequest) -> Run {
    run_on(&engine(), req).await
}

/// [`run`] on a given engine.
pub async fn run_on(engine: &EngineHandle, req: GenerateRequest) -> Run {
    let mut rx = engine.generate(req).expect("accepted");
    let mut deltas = Vec::new();
    loop {
        let event = tokio::time::timeout(std::time::Duration::from_secs(120), rx.recv())
            .await
            .expect("engine answered in time")
            .expect("stream ends with Done");
        match event {
            GenerateEvent::Delta { text, tokens, .. } => deltas.push(Delta { text, tokens }),
            GenerateEvent::Done {
                finish_reason,
                usage,
            } => {
                return Run {
                    deltas,
                    finish: finish_reason,
                    usage,
                }
            }
            GenerateEvent::Error(e) => panic!("generation failed: {e}"),
        }
    }
}
