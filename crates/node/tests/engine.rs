//! The engine with the real SmolLM2 model: streaming, stops, limits, seeds, concurrency and
//! cancellation.

mod common;

use common::{chat, greedy, run, Run};

use std::sync::atomic::Ordering;
use std::time::Duration;

use pod_inference::{
    EngineError, FinishReason, GenerateEvent, GenerateRequest, Prompt, SamplingParams,
};
use pod_node::catalogue::{DEFAULT_CHAT_MODEL, DEFAULT_EMBEDDING_MODEL};
use tokio::time::timeout;

const WAIT: Duration = Duration::from_secs(120);

#[tokio::test]
async fn greedy_answer_is_sensible_and_counted() {
    let out = run(greedy("What is 2 + 2?", 24)).await;
    assert!(out.text().contains('4'), "{:?}", out.text());
    assert_eq!(out.finish, FinishReason::Stop);
    assert!(out.usage.prompt_tokens > 10);
    assert!(out.usage.completion_tokens >= out.tokens().len());
    assert!(out.usage.completion_tokens <= 24);
}

#[tokio::test]
async fn max_tokens_ends_with_length() {
    let out = run(greedy("Write a long story about a dragon.", 5)).await;
    assert_eq!(out.finish, FinishReason::Length);
    assert_eq!(out.usage.completion_tokens, 5);
    assert_eq!(out.tokens().len(), 5);
}

#[tokio::test]
async fn stop_sequence_is_never_emitted() {
    let full = run(greedy("Count from 1 to 10, separated by commas.", 40)).await;
    // Stop on a piece of text the unconstrained answer is known to contain.
    let stop = "4";
    let at = full.text().find(stop).expect("the count reaches 4");
    let mut req = greedy("Count from 1 to 10, separated by commas.", 40);
    req.stop = vec![stop.into()];
    let out = run(req).await;
    assert_eq!(out.finish, FinishReason::Stop);
    assert_eq!(out.text(), full.text()[..at]);
    assert!(!out.text().contains(stop));
}

#[tokio::test]
async fn same_seed_same_text_and_different_seed_differs() {
    let sampled = |seed| GenerateRequest {
        sampling: SamplingParams {
            temperature: 1.0,
            top_p: 0.95,
            seed: Some(seed),
            ..Default::default()
        },
        ..greedy("Invent a name for a cat.", 24)
    };
    let a = run(sampled(7)).await;
    let b = run(sampled(7)).await;
    assert_eq!(a.tokens(), b.tokens());
    let mut differs = false;
    for seed in 8..12 {
        if run(sampled(seed)).await.tokens() != a.tokens() {
            differs = true;
            break;
        }
    }
    assert!(differs, "different seeds should give different samples");
}

#[tokio::test]
async fn concurrent_requests_match_solo_runs() {
    let prompts = [
        "What is the capital of France?",
        "Name three colours.",
        "Say hello in Spanish.",
        "What is 2 + 2?",
    ];
    let mut solo = Vec::new();
    for p in prompts {
        solo.push(run(greedy(p, 16)).await.tokens());
    }
    let together = futures_join(prompts.iter().map(|p| run(greedy(p, 16)))).await;
    for ((p, a), b) in prompts.iter().zip(&solo).zip(&together) {
        assert_eq!(a, &b.tokens(), "{p}: concurrent run differs from solo run");
    }
}

async fn futures_join<F: std::future::Future<Output = Run> + Send + 'static>(
    futures: impl Iterator<Item = F>,
) -> Vec<Run> {
    let handles: Vec<_> = futures.map(tokio::spawn).collect();
    let mut out = Vec::new();
    for h in handles {
        out.push(h.await.expect("task"));
    }
    out
}

#[tokio::test]
async fn dropping_the_receiver_cancels_within_a_step() {
    let engine = common::engine();
    let before = engine.stats().cancelled.load(Ordering::Relaxed);
    let mut rx = engine
        .generate(greedy("Write a very long essay about the sea.", 2000))
        .expect("accepted");
    // Wait for the first delta, then walk away.
    let first = timeout(WAIT, rx.recv()).await.expect("in time");
    assert!(matches!(first, Some(GenerateEvent::Delta { .. })));
    drop(rx);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while engine.stats().cancelled.load(Ordering::Relaxed) == before {
        assert!(tokio::time::Instant::now() < deadline, "not cancelled");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The engine still serves.
    let out = run(greedy("What is the capital of France?", 4)).await;
    assert_eq!(out.usage.completion_tokens, 4);
}

#[tokio::test]
async fn bad_requests_are_clear_errors() {
    let engine = common::engine();
    let err = engine
        .generate(GenerateRequest::new("no-such-model", chat("hi")))
        .unwrap_err();
    assert_eq!(err, EngineError::UnknownModel("no-such-model".into()));

    let err = engine
        .generate(GenerateRequest::new(DEFAULT_EMBEDDING_MODEL, chat("hi")))
        .unwrap_err();
    assert!(matches!(err, EngineError::WrongKind { .. }), "{err}");

    let err = engine
        .generate(GenerateRequest::new(
            DEFAULT_CHAT_MODEL,
            Prompt::Chat(vec![]),
        ))
        .unwrap_err();
    assert!(err.to_string().contains("messages"), "{err}");

    let long = "word ".repeat(10000);
    let err = engine
        .generate(GenerateRequest::new(DEFAULT_CHAT_MODEL, chat(&long)))
        .unwrap_err();
    assert!(matches!(err, EngineError::ContextLength { .. }), "{err}");
    assert!(err.to_string().contains("context length"), "{err}");

    let err = engine
        .generate(GenerateRequest {
            max_tokens: Some(100_000),
            ..GenerateRequest::new(DEFAULT_CHAT_MODEL, chat("hi"))
        })
        .unwrap_err();
    assert!(matches!(err, EngineError::ContextLength { .. }), "{err}");

    let err = engine
        .generate(GenerateRequest {
            sampling: SamplingParams {
                temperature: -1.0,
                ..Default::default()
            },
            ..GenerateRequest::new(DEFAULT_CHAT_MODEL, chat("hi"))
        })
        .unwrap_err();
    assert!(err.to_string().contains("temperature"), "{err}");
}

#[tokio::test]
async fn utf8_output_is_never_split() {
    let out = run(greedy(
        "Write the word 'café' and an emoji of a smiling face.",
        24,
    ))
    .await;
    // Every delta was valid UTF-8 by construction (String); check the assembled text decodes
    // the same as a one-shot decode would, i.e. no replacement characters crept in.
    assert!(!out.text().contains('\u{FFFD}'), "{:?}", out.text());
}

#[tokio::test]
async fn logprobs_are_reported_when_asked() {
    let mut rx = common::engine()
        .generate(GenerateRequest {
            logprobs: Some(3),
            ..greedy("What is the capital of France?", 3)
        })
        .expect("accepted");
    let mut seen = 0;
    while let Some(ev) = timeout(WAIT, rx.recv()).await.expect("in time") {
        if let GenerateEvent::Delta { logprobs, .. } = ev {
            for lp in logprobs {
                assert_eq!(lp.top.len(), 3);
                // Greedy: the chosen token is the most likely one.
                assert_eq!(lp.top[0].0, lp.id);
                assert!(lp.logprob <= 0.0);
                seen += 1;
            }
        }
    }
    assert_eq!(seen, 3);
}
