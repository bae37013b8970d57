//! The engine with the real SmolLM2 model: streaming, stops, limits, seeds, concurrency and
//! cancellation.

mod common;

use common::{chat, greedy, run, Run};

use std::sync::atomic::Ordering;
use std::time::Duration;

use pod_inference::{
    EmbedRequest, EngineConfig, EngineError, FinishReason, GenerateEvent, GenerateRequest, Prompt,
    SamplingParams,
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

fn sentences(count: usize) -> Vec<String> {
    (0..count)
        .map(|i| format!("Sentence number {i} is about the weather on the coast."))
        .collect()
}

fn embed_request(input: Vec<String>) -> EmbedRequest {
    EmbedRequest {
        model: DEFAULT_EMBEDDING_MODEL.into(),
        input,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generation_keeps_stepping_during_a_long_embedding_request() {
    let engine = common::engine_with(EngineConfig::default());
    let counting = GenerateRequest {
        max_tokens: Some(1000),
        ..GenerateRequest::new(DEFAULT_CHAT_MODEL, Prompt::Text("1, 2, 3, 4, 5, 6,".into()))
    };
    let mut rx = engine.generate(counting).expect("accepted");
    let first = timeout(WAIT, rx.recv()).await.expect("in time");
    assert!(
        matches!(first, Some(GenerateEvent::Delta { .. })),
        "{first:?}"
    );
    let tokens = || engine.stats().completion_tokens.load(Ordering::Relaxed);
    let before = tokens();
    let out = timeout(WAIT, engine.embed(embed_request(sentences(512))))
        .await
        .expect("in time")
        .expect("embedded");
    let during = tokens() - before;
    assert_eq!(out.data.len(), 512);
    // 16 batches of 32 texts, with a generation step between each.
    eprintln!("{during} tokens generated while 512 texts were embedded");
    assert!(
        during >= 8,
        "only {during} tokens generated while the embedding request ran"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedding_requests_count_against_the_queue_and_can_be_cancelled() {
    let engine = common::engine_with(EngineConfig {
        max_queue: 1,
        ..EngineConfig::default()
    });
    let queued = |e: &pod_inference::EngineHandle| e.stats().queued.load(Ordering::Relaxed);
    let wait_for = |e: pod_inference::EngineHandle, want: usize| async move {
        let deadline = tokio::time::Instant::now() + WAIT;
        while e.stats().queued.load(Ordering::Relaxed) != want {
            assert!(
                tokio::time::Instant::now() < deadline,
                "queue never at {want}"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };

    let big = tokio::spawn({
        let engine = engine.clone();
        async move { engine.embed(embed_request(sentences(512))).await }
    });
    wait_for(engine.clone(), 1).await;
    let err = engine.generate(greedy("hi", 4)).map(|_| ()).unwrap_err();
    assert!(matches!(err, EngineError::QueueFull(1)), "{err:?}");
    let err = engine.embed(embed_request(sentences(1))).await.unwrap_err();
    assert!(matches!(err, EngineError::QueueFull(1)), "{err:?}");
    let out = timeout(WAIT, big)
        .await
        .expect("in time")
        .expect("joined")
        .expect("embedded");
    assert_eq!(out.data.len(), 512);
    assert_eq!(queued(&engine), 0);

    // A caller that goes away frees its place before its request is through.
    let cancelled = engine.stats().cancelled.load(Ordering::Relaxed);
    let abandoned = tokio::spawn({
        let engine = engine.clone();
        async move { engine.embed(embed_request(sentences(512))).await }
    });
    wait_for(engine.clone(), 1).await;
    abandoned.abort();
    wait_for(engine.clone(), 0).await;
    assert_eq!(
        engine.stats().cancelled.load(Ordering::Relaxed),
        cancelled + 1
    );
    let out = timeout(WAIT, engine.embed(embed_request(sentences(3))))
        .await
        .expect("in time")
        .expect("embedded");
    assert_eq!(out.data.len(), 3);
}
