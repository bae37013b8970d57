//! Property tests over everything a peer or a user hands the node: the P2P frames of
//! `/pod/infer`, `/pod/blob` and `/pod/stage`, capability announcements, `config.toml`, GGUF headers, the
//! real SmolLM2 tokenizer and the JSON-mode validator. Arbitrary and mutated inputs must give
//! a value or an error, never a panic or an allocation a header asks for; what is encoded must
//! decode to itself.
//!
//! Each property runs a fixed number of cases from a fixed seed, so a run is deterministic and
//! takes seconds; a failure prints the shrunk input, which then becomes a regression test.

mod common;

use std::io::Write;
use std::path::Path;
use std::sync::{Arc, OnceLock};

use futures::executor::block_on;
use futures::io::Cursor;
use pod_inference::gguf::GgufFile;
use pod_inference::tokenizer::PodTokenizer;
use pod_inference::{
    ChatMessage, EngineError, FinishReason, GenerateRequest, ModelInfo, ModelKind, Prompt, Role,
    TokenLogprob, Usage,
};
use pod_node::blob::{BlobReply, BlobRequest, Manifest};
use pod_node::config::{ApiHost, ConfigError, FileConfig, KEYS};
use pod_node::mesh::capability::{
    AnnouncementError, ApiInfo, Capabilities, HardwareSummary, Load, MAX_ADDRS,
    MAX_ANNOUNCEMENT_BYTES, MAX_MODELS,
};
use pod_node::remote::{
    Frame, Request, RequestLimitError, MAX_EMBED_INPUTS, MAX_ID_BYTES, MAX_MODEL_NAME_BYTES,
    MAX_STOPS, MAX_STOP_BYTES,
};
use pod_node::stage::{read_payload, StageReply, StageRequest};
use pod_node::wire::{read_frame, write_frame, FrameError};
use proptest::prelude::*;
use proptest::test_runner::{Config, RngSeed};
use serde::de::DeserializeOwned;
use serde::Serialize;

/// `cases` cases from a fixed seed, with no regression files written.
fn cases(cases: u32) -> Config {
    Config {
        cases,
        rng_seed: RngSeed::Fixed(0x706f_6400),
        failure_persistence: None,
        ..Config::default()
    }
}

// --- frames ---------------------------------------------------------------------------------

fn encode<T: Serialize>(message: &T) -> Vec<u8> {
    let mut buf = Vec::new();
    block_on(write_frame(&mut buf, message)).expect("writing to a Vec");
    buf
}

/// Reads one frame of at most `max` bytes from `bytes`; also returns how many bytes it took.
fn decode<T: DeserializeOwned>(bytes: &[u8], max: usize) -> (Result<T, FrameError>, u64) {
    let mut r = Cursor::new(bytes.to_vec());
    let result = block_on(read_frame::<_, T>(&mut r, max));
    (result, r.position())
}

/// The framing's contract on any bytes: a declared length over the limit is refused after the
/// header alone, a short stream is an I/O error, and nothing past the declared frame is read.
fn check_framing<T: DeserializeOwned + std::fmt::Debug>(bytes: &[u8], max: usize) -> Option<T> {
    let (result, read) = decode::<T>(bytes, max);
    let declared = bytes
        .get(..4)
        .map(|h| u32::from_be_bytes([h[0], h[1], h[2], h[3]]) as usize);
    match declared {
        None => assert!(matches!(result, Err(FrameError::Io(_))), "{result:?}"),
        Some(len) if len > max => {
            assert!(
                matches!(result, Err(FrameError::TooLarge { .. })),
                "{result:?}"
            );
            assert_eq!(read, 4, "only the header is read");
        }
        Some(len) if 4 + len > bytes.len() => {
            assert!(matches!(result, Err(FrameError::Io(_))), "{result:?}")
        }
        Some(len) => {
            assert_eq!(read as usize, 4 + len);
            assert!(!matches!(
                result,
                Err(FrameError::Io(_) | FrameError::TooLarge { .. })
            ));
        }
    }
    result.ok()
}

/// Text with control characters, quotes, escapes and non-ASCII, as a peer could send.
fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => any::<String>(),
        1 => "[a-z\"\\\\{}\\[\\]:,\u{0}-\u{1f}é\u{1F600}]{0,24}",
    ]
}

fn finite() -> impl Strategy<Value = f32> {
    prop::num::f32::NORMAL | prop::num::f32::ZERO | prop::num::f32::SUBNORMAL
}

fn prompt() -> impl Strategy<Value = Prompt> {
    prop_oneof![
        text().prop_map(Prompt::Text),
        prop::collection::vec(any::<u32>(), 0..16).prop_map(Prompt::Tokens),
        prop::collection::vec(
            (
                prop_oneof![Just(Role::System), Just(Role::User), Just(Role::Assistant)],
                text()
            ),
            0..4
        )
        .prop_map(|m| Prompt::Chat(m.into_iter().map(|(r, t)| ChatMessage::new(r, t)).collect())),
    ]
}

fn request() -> impl Strategy<Value = Request> {
    let generate = (
        text(),
        text(),
        prompt(),
        prop::option::of(0usize..100_000),
        prop::collection::vec(text(), 0..20),
        prop::option::of(0usize..32),
        any::<bool>(),
    )
        .prop_map(|(id, model, prompt, max_tokens, stop, logprobs, json)| {
            let mut request = GenerateRequest::new(model, prompt);
            request.max_tokens = max_tokens;
            request.stop = stop;
            request.logprobs = logprobs;
            request.json = json;
            Request::Generate { id, request }
        });
    let embed = (text(), text(), prop::collection::vec(text(), 0..8))
        .prop_map(|(id, model, input)| Request::Embed { id, model, input });
    prop_oneof![generate, embed]
}

fn logprob() -> impl Strategy<Value = TokenLogprob> {
    (
        any::<u32>(),
        text(),
        finite(),
        prop::collection::vec((any::<u32>(), text(), finite()), 0..4),
    )
        .prop_map(|(id, text, logprob, top)| TokenLogprob {
            id,
            text,
            logprob,
            top,
        })
}

fn engine_error() -> impl Strategy<Value = EngineError> {
    prop_oneof![
        text().prop_map(EngineError::UnknownModel),
        (text(), text()).prop_map(|(model, what)| EngineError::WrongKind { model, what }),
        (any::<usize>(), any::<usize>(), any::<usize>()).prop_map(|(p, m, c)| {
            EngineError::ContextLength {
                prompt_tokens: p,
                max_tokens: m,
                context_length: c,
            }
        }),
        text().prop_map(EngineError::InvalidRequest),
        any::<usize>().prop_map(EngineError::QueueFull),
        Just(EngineError::Stopped),
        text().prop_map(EngineError::Internal),
        text().prop_map(EngineError::Unavailable),
    ]
}

fn frame() -> impl Strategy<Value = Frame> {
    prop_oneof![
        Just(Frame::Accepted),
        Just(Frame::Heartbeat),
        prop::collection::vec(text(), 0..4).prop_map(|peers| Frame::Stages { peers }),
        (
            text(),
            prop::collection::vec(any::<u32>(), 0..8),
            prop::collection::vec(logprob(), 0..3)
        )
            .prop_map(|(text, tokens, logprobs)| Frame::Delta {
                text,
                tokens,
                logprobs
            }),
        (
            prop_oneof![Just(FinishReason::Stop), Just(FinishReason::Length)],
            any::<(usize, usize, usize)>()
        )
            .prop_map(|(finish_reason, (p, c, cached))| Frame::Done {
                finish_reason,
                usage: Usage {
                    prompt_tokens: p,
                    completion_tokens: c,
                    cached_tokens: cached,
                },
                receipt: None,
            }),
        (
            prop::collection::vec(prop::collection::vec(finite(), 0..8), 0..4),
            any::<usize>()
        )
            .prop_map(|(data, prompt_tokens)| Frame::Embeddings {
                data,
                prompt_tokens,
                receipt: None,
            }),
        engine_error().prop_map(Frame::Error),
    ]
}

fn hash() -> impl Strategy<Value = String> {
    prop_oneof![3 => "[0-9a-f]{64}", 1 => text()]
}

fn blob_request() -> impl Strategy<Value = BlobRequest> {
    prop_oneof![
        hash().prop_map(|sha256| BlobRequest::Manifest { sha256 }),
        (hash(), any::<u32>(), any::<u32>()).prop_map(|(sha256, first, count)| {
            BlobRequest::Chunks {
                sha256,
                first,
                count,
            }
        }),
        Just(BlobRequest::Bulk),
    ]
}

fn manifest() -> impl Strategy<Value = Manifest> {
    (
        hash(),
        any::<u64>(),
        any::<u64>(),
        prop::collection::vec(hash(), 0..6),
    )
        .prop_map(|(sha256, size, chunk_size, chunks)| Manifest {
            sha256,
            size,
            chunk_size,
            chunks,
        })
}

fn blob_reply() -> impl Strategy<Value = BlobReply> {
    prop_oneof![
        manifest().prop_map(BlobReply::Manifest),
        Just(BlobReply::Chunks),
        (any::<u16>(), text()).prop_map(|(port, ticket)| BlobReply::Bulk { port, ticket }),
        text().prop_map(BlobReply::Error),
    ]
}

/// Ways a peer can damage a frame on its way: bytes overwritten, cut, inserted or the length
/// header replaced.
#[derive(Debug, Clone)]
enum Mutation {
    Overwrite(prop::sample::Index, Vec<u8>),
    Truncate(prop::sample::Index),
    Insert(prop::sample::Index, Vec<u8>),
    Header(u32),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (
            any::<prop::sample::Index>(),
            prop::collection::vec(any::<u8>(), 1..8)
        )
            .prop_map(|(i, b)| Mutation::Overwrite(i, b)),
        any::<prop::sample::Index>().prop_map(Mutation::Truncate),
        (
            any::<prop::sample::Index>(),
            prop::collection::vec(any::<u8>(), 1..8)
        )
            .prop_map(|(i, b)| Mutation::Insert(i, b)),
        any::<u32>().prop_map(Mutation::Header),
    ]
}

fn mutate(mut bytes: Vec<u8>, mutations: &[Mutation]) -> Vec<u8> {
    for m in mutations {
        match m {
            Mutation::Overwrite(at, with) if !bytes.is_empty() => {
                let start = at.index(bytes.len());
                for (b, w) in bytes[start..].iter_mut().zip(with) {
                    *b = *w;
                }
            }
            Mutation::Overwrite(..) => {}
            Mutation::Truncate(at) => bytes.truncate(at.index(bytes.len() + 1)),
            Mutation::Insert(at, with) => {
                let at = at.index(bytes.len() + 1);
                bytes.splice(at..at, with.iter().copied());
            }
            Mutation::Header(len) if bytes.len() >= 4 => {
                bytes[..4].copy_from_slice(&len.to_be_bytes());
            }
            Mutation::Header(_) => {}
        }
    }
    bytes
}

/// A decoded value encodes to a frame that decodes to the same value.
fn reencodes<T>(value: &T)
where
    T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug,
{
    let again = encode(value);
    let (back, _) = decode::<T>(&again, again.len());
    assert_eq!(back.as_ref().ok(), Some(value));
}

/// What [`Request::check_limits`] promises of a request it lets through.
fn within_limits(r: &Request) {
    let id = r.id();
    assert!(!id.is_empty() && id.len() <= MAX_ID_BYTES);
    assert!(id.bytes().all(|b| b.is_ascii_graphic()));
    match r {
        Request::Generate { request, .. } => {
            assert!(!request.model.is_empty() && request.model.len() <= MAX_MODEL_NAME_BYTES);
            assert!(!request.model.chars().any(char::is_control));
            assert!(request.stop.len() <= MAX_STOPS);
            assert!(request.stop.iter().all(|s| s.len() <= MAX_STOP_BYTES));
        }
        Request::Embed { model, input, .. } => {
            assert!(!model.is_empty() && model.len() <= MAX_MODEL_NAME_BYTES);
            assert!(!model.chars().any(char::is_control));
            assert!(input.len() <= MAX_EMBED_INPUTS);
        }
    }
}

/// A frame header followed by arbitrary bytes, mostly JSON-ish so the decoder goes deep.
fn framed_garbage() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..64),
        "[{}\\[\\]\":,a-z0-9 _-]{0,200}".prop_map(|body| {
            let mut bytes = (body.len() as u32).to_be_bytes().to_vec();
            bytes.extend_from_slice(body.as_bytes());
            bytes
        }),
        (any::<u32>(), prop::collection::vec(any::<u8>(), 0..64)).prop_map(|(len, body)| {
            let mut bytes = len.to_be_bytes().to_vec();
            bytes.extend(body);
            bytes
        }),
    ]
}

proptest! {
    #![proptest_config(cases(512))]

    #[test]
    fn infer_frames_from_any_bytes_are_values_or_errors(
        bytes in framed_garbage(),
        max in prop_oneof![0usize..256, Just(pod_node::remote::MAX_REQUEST_BYTES)],
    ) {
        if let Some(request) = check_framing::<Request>(&bytes, max) {
            if request.check_limits().is_ok() {
                within_limits(&request);
            }
            reencodes(&request);
        }
        if let Some(frame) = check_framing::<Frame>(&bytes, max) {
            reencodes(&frame);
        }
    }

    #[test]
    fn stage_frames_from_any_bytes_are_values_or_errors(
        bytes in framed_garbage(),
        max in prop_oneof![0usize..256, Just(pod_node::stage::MAX_HEADER_BYTES)],
        expected in 0usize..64,
    ) {
        if let Some(request) = check_framing::<StageRequest>(&bytes, max) {
            reencodes(&request);
        }
        if let Some(reply) = check_framing::<StageReply>(&bytes, max) {
            reencodes(&reply);
        }
        // A payload frame: exactly the values expected, or an error, never more read than
        // the header declares and never a declared length over the limit allocated.
        let mut r = Cursor::new(&bytes);
        match block_on(read_payload(&mut r, expected)) {
            Ok(values) => {
                prop_assert_eq!(values.len(), expected);
                prop_assert_eq!(r.position() as usize, 4 + 4 * expected);
            }
            Err(FrameError::TooLarge { len, .. }) => {
                prop_assert!(len > pod_node::stage::MAX_PAYLOAD_BYTES);
            }
            Err(_) => {}
        }
    }

    #[test]
    fn infer_requests_round_trip_and_their_limits_hold(
        request in request(),
        mutations in prop::collection::vec(mutation(), 0..3),
    ) {
        let bytes = encode(&request);
        let (back, read) = decode::<Request>(&bytes, bytes.len());
        prop_assert_eq!(read as usize, bytes.len());
        prop_assert_eq!(back.as_ref().ok(), Some(&request));
        match request.check_limits() {
            Ok(()) => within_limits(&request),
            Err(RequestLimitError::EmbedInputs) => {
                let over = matches!(&request, Request::Embed { input, .. } if input.len() > MAX_EMBED_INPUTS);
                prop_assert!(over, "refused for its inputs");
            }
            Err(RequestLimitError::Stops) => {
                let over = matches!(&request, Request::Generate { request, .. }
                    if request.stop.len() > MAX_STOPS || request.stop.iter().any(|s| s.len() > MAX_STOP_BYTES));
                prop_assert!(over, "refused for its stops");
            }
            Err(_) => {}
        }
        let damaged = mutate(bytes, &mutations);
        if let Some(request) = check_framing::<Request>(&damaged, pod_node::remote::MAX_REQUEST_BYTES) {
            let _ = request.check_limits();
            reencodes(&request);
        }
    }

    #[test]
    fn infer_answers_round_trip_and_damaged_ones_fail_cleanly(
        frame in frame(),
        mutations in prop::collection::vec(mutation(), 1..3),
    ) {
        let bytes = encode(&frame);
        let (back, _) = decode::<Frame>(&bytes, bytes.len());
        prop_assert_eq!(back.as_ref().ok(), Some(&frame));
        if let Some(frame) = check_framing::<Frame>(&mutate(bytes, &mutations), 1 << 20) {
            reencodes(&frame);
        }
    }

    #[test]
    fn blob_frames_round_trip_and_damaged_ones_fail_cleanly(
        request in blob_request(),
        reply in blob_reply(),
        mutations in prop::collection::vec(mutation(), 1..3),
        garbage in framed_garbage(),
    ) {
        for bytes in [encode(&request), encode(&reply)] {
            let (r, _) = decode::<BlobRequest>(&bytes, bytes.len());
            let (a, _) = decode::<BlobReply>(&bytes, bytes.len());
            prop_assert!(r.ok() == Some(request.clone()) || a.ok() == Some(reply.clone()));
            let damaged = mutate(bytes, &mutations);
            if let Some(r) = check_framing::<BlobRequest>(&damaged, 1 << 20) {
                reencodes(&r);
            }
            if let Some(a) = check_framing::<BlobReply>(&damaged, 1 << 20) {
                reencodes(&a);
            }
        }
        if let Some(r) = check_framing::<BlobRequest>(&garbage, 4096) {
            reencodes(&r);
        }
        if let Some(a) = check_framing::<BlobReply>(&garbage, 4096) {
            reencodes(&a);
        }
    }

    #[test]
    fn manifests_from_peers_never_panic_on_chunks(
        manifest in manifest(),
        index in 0usize..8,
        data in prop::collection::vec(any::<u8>(), 0..200),
    ) {
        // A chunk of the wrong length or index, or a manifest of garbage, fails the check.
        if manifest.verify_chunk(index, &data) {
            prop_assert!(index < manifest.chunks.len());
        }
    }
}

// --- capability announcements ---------------------------------------------------------------

fn short() -> impl Strategy<Value = String> {
    "[ -~é]{0,40}"
}

fn capabilities() -> impl Strategy<Value = Capabilities> {
    let model = (
        short(),
        any::<bool>(),
        short(),
        short(),
        any::<usize>(),
        prop::option::of(any::<usize>()),
    )
        .prop_map(
            |(name, chat, architecture, quantization, context_length, dimension)| ModelInfo {
                name,
                kind: if chat {
                    ModelKind::Chat
                } else {
                    ModelKind::Embedding
                },
                architecture,
                quantization,
                context_length,
                dimension,
            },
        );
    (
        (short(), short(), prop::collection::vec(model, 0..4)),
        any::<(usize, usize, usize)>(),
        (short(), any::<usize>(), any::<u64>()),
        prop::option::of((short(), any::<bool>())),
        prop::collection::vec(short(), 0..4),
        prop::collection::vec("[0-9a-f]{64}", 0..4),
        (
            any::<bool>(),
            prop::collection::vec(any::<[u8; 32]>(), 0..3),
            any::<u64>(),
        ),
    )
        .prop_map(
            |(
                (agent, profile, models),
                (queued, active, max_active),
                (device, cpu_cores, memory_bytes),
                api,
                addrs,
                files,
                (trusted_only, trusted, seq),
            )| {
                Capabilities {
                    agent,
                    profile,
                    models,
                    load: Load {
                        queued,
                        active,
                        max_active,
                    },
                    hardware: HardwareSummary {
                        device,
                        cpu_cores,
                        memory_bytes,
                    },
                    api: api.map(|(version, ready)| ApiInfo { version, ready }),
                    addrs,
                    files,
                    stages: Vec::new(),
                    serve_to: if trusted_only {
                        pod_node::access::ServeTo::Trusted
                    } else {
                        pod_node::access::ServeTo::Any
                    },
                    trusted: trusted
                        .into_iter()
                        .filter_map(|mut secret| {
                            libp2p::identity::Keypair::ed25519_from_bytes(&mut secret).ok()
                        })
                        .map(|k| k.public().to_peer_id().to_string())
                        .collect(),
                    seq,
                }
            },
        )
}

proptest! {
    #![proptest_config(cases(512))]

    #[test]
    fn announcements_round_trip(caps in capabilities()) {
        prop_assert_eq!(Capabilities::decode(&caps.encode()), Ok(caps));
    }

    #[test]
    fn damaged_or_arbitrary_announcements_are_values_or_errors(
        caps in capabilities(),
        mutations in prop::collection::vec(mutation(), 1..4),
        garbage in prop::collection::vec(any::<u8>(), 0..256),
        extra_models in 0usize..80,
        extra_addrs in 0usize..20,
    ) {
        let mut big = caps.clone();
        big.models.extend(std::iter::repeat_n(caps.models.first().cloned().unwrap_or(ModelInfo {
            name: "m".into(), kind: ModelKind::Chat, architecture: "llama".into(),
            quantization: "Q4_0".into(), context_length: 1, dimension: None,
        }), extra_models));
        big.addrs.extend(std::iter::repeat_n("/ip4/127.0.0.1/tcp/1".to_owned(), extra_addrs));
        for bytes in [mutate(caps.encode(), &mutations), garbage, big.encode()] {
            match Capabilities::decode(&bytes) {
                Ok(decoded) => {
                    prop_assert!(bytes.len() <= MAX_ANNOUNCEMENT_BYTES);
                    prop_assert!(decoded.models.len() <= MAX_MODELS);
                    prop_assert!(decoded.addrs.len() <= MAX_ADDRS);
                    prop_assert_eq!(decoded.check(), Ok(()));
                    prop_assert_eq!(Capabilities::decode(&decoded.encode()), Ok(decoded));
                }
                Err(AnnouncementError::TooLarge(n)) => prop_assert!(n > MAX_ANNOUNCEMENT_BYTES),
                Err(_) => {}
            }
        }
    }
}

// --- config.toml ----------------------------------------------------------------------------

fn parse(text: &str) -> Result<FileConfig, ConfigError> {
    FileConfig::parse(text, Path::new("/etc/pod/config.toml"))
}

/// A TOML value of any type, some of them valid for some keys.
fn toml_value() -> impl Strategy<Value = String> {
    let leaf = prop_oneof![
        any::<i64>().prop_map(|n| n.to_string()),
        (0u64..70_000).prop_map(|n| n.to_string()),
        any::<bool>().prop_map(|b| b.to_string()),
        any::<f64>().prop_map(|f| format!("{f:?}")),
        "[ -~]{0,20}".prop_map(|s| toml_string(&s)),
        prop_oneof![
            Just("auto"),
            Just("local"),
            Just("mesh"),
            Just("cpu"),
            Just("full"),
            Just("127.0.0.1"),
            Just("::1"),
            Just("/ip4/127.0.0.1/tcp/0"),
            Just("json"),
            Just("info"),
        ]
        .prop_map(toml_string),
    ];
    leaf.prop_recursive(2, 8, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(|v| format!("[{}]", v.join(", "))),
            prop::collection::vec(("[a-z_]{1,8}", inner), 0..3).prop_map(|kv| {
                let kv: Vec<String> = kv.into_iter().map(|(k, v)| format!("{k} = {v}")).collect();
                format!("{{ {} }}", kv.join(", "))
            }),
        ]
    })
}

/// A TOML basic string holding `s` (printable ASCII only, so only quotes and backslashes
/// need escaping).
fn toml_string(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

/// A key as written in the file, and the key it names.
fn toml_key() -> impl Strategy<Value = (String, String)> {
    prop_oneof![
        4 => prop::sample::select(KEYS).prop_map(|k| (k.to_owned(), k.to_owned())),
        1 => "[a-z_]{1,12}".prop_map(|k| (k.clone(), k)),
        // Quoted keys may hold anything, control characters and terminal escapes included.
        1 => any::<String>().prop_map(|k| {
            let quoted = serde_json::to_string(&k)
                .unwrap_or_default()
                .replace('\u{7f}', "\\u007f");
            (quoted, k)
        }),
    ]
}

proptest! {
    #![proptest_config(cases(512))]

    #[test]
    fn any_config_text_is_a_config_or_one_line_error(text in any::<String>()) {
        if let Err(e) = parse(&text) {
            prop_assert!(!e.to_string().contains('\n'), "{}", e);
        }
    }

    #[test]
    fn config_errors_are_one_line_and_name_the_key(
        lines in prop::collection::vec((toml_key(), toml_value()), 0..6),
    ) {
        let text: String = lines.iter().map(|((k, _), v)| format!("{k} = {v}\n")).collect();
        match parse(&text) {
            Ok(_) => {
                // Every key set is a known one.
                for ((_, name), _) in &lines {
                    prop_assert!(KEYS.contains(&name.as_str()), "{:?} accepted", name);
                }
            }
            Err(e) => {
                let message = e.to_string();
                prop_assert!(!message.contains('\n'), "{}", message);
                if let ConfigError::BadValue { key, line, .. } | ConfigError::UnknownKey { key, line, .. } = &e {
                    prop_assert!(lines.iter().any(|((_, name), _)| name == key), "{}", message);
                    if let Some(line) = line {
                        prop_assert_eq!(&lines[line - 1].0.1, key);
                    }
                }
            }
        }
    }

    #[test]
    fn valid_configs_parse_to_what_they_say(
        max_batch in prop::option::of(1usize..4096),
        threads in prop::option::of(1usize..256),
        ctx_size in prop::option::of(16usize..1_000_000),
        api_port in prop::option::of(any::<u16>()),
        api_host in prop::option::of(prop_oneof![
            any::<std::net::IpAddr>().prop_map(ApiHost::Addr),
            "[a-k][a-z0-9-]{0,8}[a-z0-9](\\.[a-z0-9]{1,10}){0,2}".prop_map(ApiHost::Name),
        ]),
        pull in prop::option::of(any::<bool>()),
        announce_interval in prop::option::of(1u64..=3600),
        cors_origins in prop::option::of(prop::collection::vec("https://[a-z]{1,10}\\.example(:[0-9]{1,5})?", 0..3)),
        log in prop::option::of("[a-z_]{1,10}(=(trace|debug|info|warn|error))?"),
    ) {
        let mut text = String::new();
        let mut line = |k: &str, v: Option<String>| {
            if let Some(v) = v {
                text.push_str(&format!("{k} = {v}\n"));
            }
        };
        line("max_batch", max_batch.map(|v| v.to_string()));
        line("threads", threads.map(|v| v.to_string()));
        line("ctx_size", ctx_size.map(|v| v.to_string()));
        line("api_port", api_port.map(|v| v.to_string()));
        line("api_host", api_host.as_ref().map(|v| toml_string(&v.to_string())));
        line("pull", pull.map(|v| v.to_string()));
        line("announce_interval", announce_interval.map(|v| v.to_string()));
        line("cors_origins", cors_origins.clone().map(|v| {
            format!("[{}]", v.iter().map(|s| toml_string(s)).collect::<Vec<_>>().join(", "))
        }));
        line("log", log.as_deref().map(toml_string));
        let config = parse(&text).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(config, FileConfig {
            max_batch, threads, ctx_size, api_port, api_host, pull, announce_interval,
            cors_origins, log, ..FileConfig::default()
        });
    }

    #[test]
    fn out_of_range_values_name_their_key(
        (key, value) in prop_oneof![
            Just(("max_batch", "0".to_owned())),
            Just(("threads", "0".to_owned())),
            Just(("kv_memory", "0".to_owned())),
            (0usize..16).prop_map(|v| ("ctx_size", v.to_string())),
            (3601u64..u32::MAX as u64).prop_map(|v| ("announce_interval", v.to_string())),
            (65_536u64..1 << 40).prop_map(|v| ("api_port", v.to_string())),
            Just(("announce_interval", "0".to_owned())),
            Just(("log", "\"  \"".to_owned())),
        ],
        before in prop::sample::subsequence(vec!["pull = true", "bulk = true", "mdns = false"], 0..3),
    ) {
        let text: String = before.iter().map(|l| format!("{l}\n")).collect::<String>()
            + &format!("{key} = {value}\n");
        match parse(&text) {
            Err(ConfigError::BadValue { key: k, line, .. }) => {
                prop_assert_eq!(k, key);
                prop_assert_eq!(line, Some(before.len() + 1));
            }
            other => prop_assert!(false, "{:?}", other),
        }
    }
}

// --- GGUF headers ---------------------------------------------------------------------------

/// A GGUF metadata value as written on disk: its type id and bytes.
#[derive(Debug, Clone)]
enum GgufValue {
    U8(u8),
    I32(i32),
    U32(u32),
    U64(u64),
    F32(f32),
    Bool(u8),
    Str(Vec<u8>),
    Array(u32, Vec<GgufValue>),
    /// An array whose declared length is not its real one (a lie a hostile file tells).
    ArrayLen(u32, u64),
}

impl GgufValue {
    fn kind(&self) -> u32 {
        match self {
            GgufValue::U8(_) => 0,
            GgufValue::I32(_) => 5,
            GgufValue::U32(_) => 4,
            GgufValue::U64(_) => 10,
            GgufValue::F32(_) => 6,
            GgufValue::Bool(_) => 7,
            GgufValue::Str(_) => 8,
            GgufValue::Array(..) | GgufValue::ArrayLen(..) => 9,
        }
    }

    fn write(&self, out: &mut Vec<u8>) {
        match self {
            GgufValue::U8(v) => out.push(*v),
            GgufValue::I32(v) => out.extend(v.to_le_bytes()),
            GgufValue::U32(v) => out.extend(v.to_le_bytes()),
            GgufValue::U64(v) => out.extend(v.to_le_bytes()),
            GgufValue::F32(v) => out.extend(v.to_le_bytes()),
            GgufValue::Bool(v) => out.push(*v),
            GgufValue::Str(s) => {
                out.extend((s.len() as u64).to_le_bytes());
                out.extend(s);
            }
            GgufValue::Array(t, items) => {
                out.extend(t.to_le_bytes());
                out.extend((items.len() as u64).to_le_bytes());
                for item in items {
                    item.write(out);
                }
            }
            GgufValue::ArrayLen(t, len) => {
                out.extend(t.to_le_bytes());
                out.extend(len.to_le_bytes());
            }
        }
    }
}

fn gguf_value() -> impl Strategy<Value = GgufValue> {
    let leaf = prop_oneof![
        any::<u8>().prop_map(GgufValue::U8),
        any::<i32>().prop_map(GgufValue::I32),
        prop_oneof![any::<u32>(), 0u32..5000].prop_map(GgufValue::U32),
        any::<u64>().prop_map(GgufValue::U64),
        any::<f32>().prop_map(GgufValue::F32),
        (0u8..3).prop_map(GgufValue::Bool),
        prop_oneof![
            "llama|gemma3|bert|[a-z]{0,8}".prop_map(String::into_bytes),
            prop::collection::vec(any::<u8>(), 0..16),
        ]
        .prop_map(GgufValue::Str),
        (
            (0u32..14),
            prop_oneof![any::<u64>(), Just(u64::MAX), Just(1 << 40)]
        )
            .prop_map(|(t, len)| GgufValue::ArrayLen(t, len)),
    ];
    leaf.prop_recursive(2, 16, 6, |inner| {
        (0usize..6, prop::collection::vec(inner, 0..6)).prop_map(|(_, items)| {
            // Arrays are of one type: keep the items of the first item's type.
            let t = items.first().map_or(4, GgufValue::kind);
            let items = items.into_iter().filter(|i| i.kind() == t).collect();
            GgufValue::Array(t, items)
        })
    })
}

fn gguf_key() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::sample::select(vec![
            "general.architecture",
            "general.alignment",
            "llama.context_length",
            "llama.embedding_length",
            "llama.block_count",
            "tokenizer.ggml.model",
            "tokenizer.ggml.tokens",
            "tokenizer.ggml.merges",
            "tokenizer.ggml.bos_token_id",
            "tokenizer.ggml.eos_token_id",
            "tokenizer.ggml.token_type",
        ])
        .prop_map(str::to_owned),
        "[a-z.]{0,16}",
    ]
}

/// A tensor directory entry: name, dimensions, ggml type id, offset.
type TensorEntry = (String, Vec<u64>, u32, u64);

fn tensor_entry() -> impl Strategy<Value = TensorEntry> {
    (
        "[a-z.]{1,12}",
        prop::collection::vec(prop_oneof![1u64..4096, any::<u64>()], 0..5),
        prop_oneof![
            Just(0u32),
            Just(1),
            Just(2),
            Just(3),
            Just(8),
            Just(12),
            0u32..64
        ],
        any::<u64>(),
    )
}

fn gguf_header(version: u32, kv: &[(String, GgufValue)], tensors: &[TensorEntry]) -> Vec<u8> {
    let mut out = b"GGUF".to_vec();
    out.extend(version.to_le_bytes());
    out.extend((tensors.len() as u64).to_le_bytes());
    out.extend((kv.len() as u64).to_le_bytes());
    for (key, value) in kv {
        GgufValue::Str(key.clone().into_bytes()).write(&mut out);
        out.extend(value.kind().to_le_bytes());
        value.write(&mut out);
    }
    for (name, dims, dtype, offset) in tensors {
        GgufValue::Str(name.clone().into_bytes()).write(&mut out);
        out.extend((dims.len() as u32).to_le_bytes());
        for d in dims {
            out.extend(d.to_le_bytes());
        }
        out.extend(dtype.to_le_bytes());
        out.extend(offset.to_le_bytes());
    }
    out
}

/// Opens `bytes` as a GGUF file and reads everything pod reads from a header.
fn open_gguf(bytes: &[u8], tokenizer: bool) -> Result<(), String> {
    let mut file = tempfile::NamedTempFile::new().map_err(|e| e.to_string())?;
    file.write_all(bytes).map_err(|e| e.to_string())?;
    let gguf = GgufFile::open(file.path()).map_err(|e| e.to_string())?;
    let _ = gguf.architecture();
    let _ = gguf.context_length();
    let _ = gguf.quantization();
    for key in gguf.metadata().keys() {
        let _ = (
            gguf.string(key),
            gguf.uint(key),
            gguf.bool(key),
            gguf.array(key),
        );
    }
    if tokenizer {
        let _ = PodTokenizer::from_gguf(&gguf);
    }
    Ok(())
}

proptest! {
    #![proptest_config(cases(512))]

    #[test]
    fn any_gguf_header_opens_or_fails_cleanly(
        version in prop_oneof![Just(3u32), Just(2), 0u32..5],
        kv in prop::collection::vec((gguf_key(), gguf_value()), 0..6),
        tensors in prop::collection::vec(tensor_entry(), 0..4),
        mutations in prop::collection::vec(mutation(), 0..3),
        padding in 0usize..64,
    ) {
        let mut bytes = gguf_header(version, &kv, &tensors);
        bytes.extend(std::iter::repeat_n(0u8, padding));
        // The frame mutations also work on files; `Header` rewrites the magic.
        let bytes = mutate(bytes, &mutations);
        let _ = open_gguf(&bytes, true);
    }
}

/// Regression: candle divides by `general.alignment` unchecked, so a header with an alignment
/// of 0 panicked while the file was opened.
#[test]
fn a_gguf_alignment_of_zero_is_an_invalid_file() {
    let header = gguf_header(
        3,
        &[("general.alignment".to_owned(), GgufValue::U32(0))],
        &[],
    );
    let error = open_gguf(&header, false).expect_err("an alignment of 0 must be refused");
    assert!(error.contains("not a valid GGUF model"), "{error}");
    let aligned = gguf_header(
        3,
        &[("general.alignment".to_owned(), GgufValue::U32(32))],
        &[],
    );
    open_gguf(&aligned, false).expect("an alignment of 32 is fine");
}

/// Regression: the element count of a tensor whose dimensions multiply past `usize::MAX`
/// overflowed (a panic in debug builds) while the file's quantisation was named.
#[test]
fn huge_gguf_tensor_dimensions_do_not_overflow() {
    let header = gguf_header(3, &[], &[("t".to_owned(), vec![u64::MAX / 2, 4, 3], 2, 0)]);
    let mut file = tempfile::NamedTempFile::new().unwrap();
    file.write_all(&header).unwrap();
    let gguf = GgufFile::open(file.path()).unwrap();
    assert_eq!(gguf.quantization(), "Q4_0");
}

/// The header of the real SmolLM2 file (metadata, tokenizer and tensor directory).
fn smollm2_header() -> &'static [u8] {
    static HEADER: OnceLock<Vec<u8>> = OnceLock::new();
    HEADER.get_or_init(|| {
        let path = common::model_path("smollm2-135m-instruct");
        let gguf = GgufFile::open(&path).expect("open SmolLM2");
        let len = gguf.content.tensor_data_offset as usize;
        let mut bytes = std::fs::read(&path).expect("read SmolLM2");
        bytes.truncate(len);
        bytes
    })
}

proptest! {
    #![proptest_config(cases(24))]

    #[test]
    fn the_real_header_damaged_opens_or_fails_cleanly(
        mutations in prop::collection::vec(
            (any::<prop::sample::Index>(), prop_oneof![
                Just(u64::MAX.to_le_bytes().to_vec()),
                Just(0u64.to_le_bytes().to_vec()),
                prop::collection::vec(any::<u8>(), 1..9),
            ]),
            1..4,
        ),
        // Most of the header is the vocabulary; damage its first kilobytes (the counts, the
        // small metadata and the start of the token arrays) more often.
        near_start in any::<bool>(),
    ) {
        let mut bytes = smollm2_header().to_vec();
        for (at, with) in &mutations {
            let end = if near_start { 4096.min(bytes.len()) } else { bytes.len() };
            let start = at.index(end);
            for (b, w) in bytes[start..].iter_mut().zip(with) {
                *b = *w;
            }
        }
        let _ = open_gguf(&bytes, true);
    }
}

// --- the real tokenizer ---------------------------------------------------------------------

fn smollm2_tokenizer() -> Arc<PodTokenizer> {
    static TOKENIZER: OnceLock<Arc<PodTokenizer>> = OnceLock::new();
    TOKENIZER
        .get_or_init(|| {
            let gguf =
                GgufFile::open(&common::model_path("smollm2-135m-instruct")).expect("open SmolLM2");
            Arc::new(PodTokenizer::from_gguf(&gguf).expect("SmolLM2's tokenizer"))
        })
        .clone()
}

/// Text a user or a model may produce: arbitrary Unicode, and strings built from pieces that
/// exercise byte-level BPE (spaces, newlines, digits, emoji, combining marks, CJK).
fn user_text() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        prop::collection::vec(
            prop::sample::select(vec![
                " ",
                "  ",
                "\n",
                "\t",
                "\r\n",
                "the",
                " The",
                "42",
                "3.14",
                "é",
                "e\u{301}",
                "日本",
                "🦀",
                "👩‍👩‍👧",
                "<",
                "|",
                "\u{0}",
                "\u{FFFD}",
                "'s",
                "don't",
            ]),
            0..24,
        )
        .prop_map(|p| p.concat()),
    ]
}

proptest! {
    #![proptest_config(cases(48))]

    #[test]
    fn tokenizer_round_trips_text(text in user_text()) {
        // Special tokens written in text are matched whole, and decoding leaves them out.
        prop_assume!(!(text.contains("<|") && text.contains("|>")));
        let tokenizer = smollm2_tokenizer();
        let ids = tokenizer.encode(&text).map_err(TestCaseError::fail)?;
        prop_assert!(ids.iter().all(|&id| (id as usize) < tokenizer.vocab_size()));
        prop_assert_eq!(tokenizer.decode(&ids).map_err(TestCaseError::fail)?, text.clone());
        // Streaming the same ids gives the same text, piece by piece.
        let mut stream = tokenizer.stream();
        let mut streamed = String::new();
        for id in &ids {
            if let Some(piece) = stream.push(*id).map_err(TestCaseError::fail)? {
                streamed.push_str(&piece);
            }
        }
        prop_assert!(text.starts_with(&streamed), "{:?} streamed as {:?}", text, streamed);
        if !text.ends_with('\u{FFFD}') {
            prop_assert_eq!(streamed, text);
        }
    }

    #[test]
    fn tokenizer_takes_any_ids(ids in prop::collection::vec(
        prop_oneof![0u32..49_152, any::<u32>()], 0..32,
    )) {
        let tokenizer = smollm2_tokenizer();
        // Ids a peer or a prompt of tokens names: text or an error, never a panic.
        let _ = tokenizer.decode(&ids);
        let mut stream = tokenizer.stream();
        for &id in &ids {
            let _ = tokenizer.token_piece(id);
            let _ = stream.push(id);
        }
    }
}

// --- the JSON-mode validator ----------------------------------------------------------------

mod json_mode {
    use pod_inference::json::JsonPrefix;
    use proptest::prelude::*;
    use serde::de::IgnoredAny;

    /// The validator's limit on consecutive blanks between tokens.
    const MAX_WHITESPACE_RUN: usize = 24;

    /// What serde_json, the reference, says of `text`: whether it is one JSON value, and
    /// whether that value is an object. Numbers and strings are scanned, not converted,
    /// so `1e999` is valid JSON here as the grammar says.
    fn reference(text: &str) -> (bool, bool) {
        let valid = serde_json::from_str::<IgnoredAny>(text).is_ok();
        (valid, valid && text.trim_start().starts_with('{'))
    }

    fn json_value() -> impl Strategy<Value = serde_json::Value> {
        let leaf = prop_oneof![
            Just(serde_json::Value::Null),
            any::<bool>().prop_map(serde_json::Value::from),
            any::<i64>().prop_map(serde_json::Value::from),
            any::<f64>()
                .prop_filter("finite", |f| f.is_finite())
                .prop_map(serde_json::Value::from),
            any::<String>().prop_map(serde_json::Value::from),
        ];
        leaf.prop_recursive(4, 32, 5, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..5).prop_map(serde_json::Value::from),
                prop::collection::btree_map(any::<String>(), inner, 0..5)
                    .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
            ]
        })
    }

    fn json_object() -> impl Strategy<Value = String> {
        (
            prop::collection::btree_map("[a-z\"\\\\é]{0,6}", json_value(), 0..5),
            any::<bool>(),
        )
            .prop_map(|(m, pretty)| {
                let v = serde_json::Value::Object(m.into_iter().collect());
                if pretty {
                    serde_json::to_string_pretty(&v).unwrap_or_default()
                } else {
                    v.to_string()
                }
            })
    }

    /// Pieces of JSON, so that random sequences often come close to valid documents.
    fn json_soup() -> impl Strategy<Value = String> {
        prop::collection::vec(
            prop::sample::select(vec![
                "{", "}", "[", "]", "\"", ":", ",", " ", "\n", "0", "1", "-", ".", "e", "E", "+",
                "true", "false", "null", "tru", "\\", "\\u", "\\ud800", "00e9", "x", "é", "\u{1}",
                "\"a\":", "{\"a\":", "1e999",
            ]),
            0..24,
        )
        .prop_map(|p| p.concat())
    }

    /// Ways to damage a document: a char dropped, a piece inserted, the end cut.
    fn damaged(doc: String, at: prop::sample::Index, piece: &str, how: u8) -> String {
        let cuts: Vec<usize> = doc
            .char_indices()
            .map(|(i, _)| i)
            .chain([doc.len()])
            .collect();
        let i = cuts[at.index(cuts.len())];
        match how {
            0 => doc[..i].to_owned(),
            1 => format!("{}{piece}{}", &doc[..i], &doc[i..]),
            _ => {
                let next = doc[i..].chars().next().map_or(0, char::len_utf8);
                format!("{}{}", &doc[..i], &doc[i + next..])
            }
        }
    }

    fn whitespace_runs_within_limit(text: &str) -> bool {
        let mut run = 0;
        let mut in_string = false;
        let mut escaped = false;
        for c in text.chars() {
            if in_string {
                match (escaped, c) {
                    (true, _) => escaped = false,
                    (false, '\\') => escaped = true,
                    (false, '"') => in_string = false,
                    _ => {}
                }
                continue;
            }
            if matches!(c, ' ' | '\n' | '\t' | '\r') {
                run += 1;
                if run > MAX_WHITESPACE_RUN {
                    return false;
                }
            } else {
                run = 0;
                in_string = c == '"';
            }
        }
        true
    }

    /// The validator and the reference agree on `text`.
    fn agrees(text: &str) -> Result<(), TestCaseError> {
        let state = JsonPrefix::default().advance(text);
        let complete = state.as_ref().is_some_and(JsonPrefix::is_complete);
        let (_, object) = reference(text);
        if complete {
            prop_assert!(object, "accepted but not a JSON object: {:?}", text);
        }
        if object && text.trim_end() == text && whitespace_runs_within_limit(text) {
            prop_assert!(complete, "a JSON object refused: {:?}", text);
        }
        // Every prefix of an accepted prefix is accepted.
        if state.is_some() {
            let cuts: Vec<usize> = text.char_indices().map(|(i, _)| i).collect();
            for &i in cuts.iter().step_by(cuts.len() / 64 + 1) {
                prop_assert!(JsonPrefix::default().advance(&text[..i]).is_some());
            }
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(super::cases(1024))]

        #[test]
        fn objects_are_accepted_whole_and_piece_by_piece(
            doc in json_object(),
            splits in prop::collection::vec(any::<prop::sample::Index>(), 0..6),
        ) {
            agrees(&doc)?;
            let whole = JsonPrefix::default().advance(&doc);
            prop_assert!(whole.as_ref().is_some_and(JsonPrefix::is_complete), "{:?}", doc);
            // Fed in pieces (as tokens arrive), the state is the same as fed whole.
            let cuts: Vec<usize> = doc.char_indices().map(|(i, _)| i).chain([doc.len()]).collect();
            let mut at: Vec<usize> = splits.iter().map(|s| cuts[s.index(cuts.len())]).collect();
            at.sort_unstable();
            let mut state = JsonPrefix::default();
            let mut from = 0;
            for to in at.into_iter().chain([doc.len()]) {
                state = state.advance(&doc[from..to]).ok_or_else(|| TestCaseError::fail("refused a piece"))?;
                from = to;
            }
            prop_assert_eq!(Some(state), whole);
        }

        #[test]
        fn damaged_objects_are_judged_as_the_reference_does(
            doc in json_object(),
            damage in prop::collection::vec((any::<prop::sample::Index>(), json_soup(), 0u8..3), 1..3),
        ) {
            let mut text = doc;
            for (at, piece, how) in damage {
                text = damaged(text, at, &piece, how);
            }
            agrees(&text)?;
        }

        #[test]
        fn any_text_is_judged_as_the_reference_does(
            text in prop_oneof![json_soup(), any::<String>()],
            tail in json_soup(),
        ) {
            agrees(&text)?;
            // Once refused, no continuation makes it acceptable again.
            if JsonPrefix::default().advance(&text).is_none() {
                let longer = format!("{text}{tail}");
                prop_assert!(JsonPrefix::default().advance(&longer).is_none(), "{:?}", longer);
            }
        }
    }
}
