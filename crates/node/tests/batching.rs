//! Continuous batching, batch invariance and the prefix cache, with the real SmolLM2 model.

mod common;

use std::sync::atomic::Ordering;

use common::{greedy, run_on, Run};
use pod_inference::{
    ChatMessage, ChatModel, Device, EngineConfig, FinishReason, GenerateRequest, Prompt, Role,
};
use pod_node::catalogue::DEFAULT_CHAT_MODEL;

const PROMPTS: [&str; 8] = [
    "What is 2 + 2?",
    "Name a colour.",
    "Write a haiku about the sea.",
    "What is the capital of France?",
    "Say hello in Spanish.",
    "List three fruits.",
    "Why is the sky blue? Answer in one sentence.",
    "Count from 1 to 5.",
];

fn load() -> ChatModel {
    ChatModel::load(&common::model_path(DEFAULT_CHAT_MODEL), &Device::Cpu).expect("load")
}

fn tokens(model: &ChatModel, prompt: &str) -> Vec<u32> {
    let text = model
        .template()
        .render(&[ChatMessage::new(Role::User, prompt)], true)
        .expect("render");
    model.tokenizer().encode(&text).expect("encode")
}

/// The logits of a sequence's tokens are the same bits whether they were fed as one prompt,
/// one by one, or batched with other sequences at other positions.
#[test]
fn logits_do_not_depend_on_how_tokens_are_fed() {
    let model = load();
    // pod's CPU decoder serves SmolLM2 on every CPU (the portable kernels where there is no
    // AVX2), so the claim holds everywhere.
    assert!(model.batch_invariant(), "{}", model.runs_on());
    let prompt = tokens(&model, PROMPTS[0]);

    let mut whole = model.new_sequence();
    let from_prompt = whole.forward(&prompt).expect("prompt");

    let mut single = model.new_sequence();
    let mut from_decode = Vec::new();
    for t in &prompt {
        from_decode = single.forward(&[*t]).expect("token");
    }
    assert_eq!(from_prompt, from_decode, "prefill and decode differ");

    // The same prompt in two uneven chunks, batched with seven other sequences that are at
    // other positions of other prompts.
    let mut others: Vec<_> = PROMPTS[1..]
        .iter()
        .map(|p| {
            let mut s = model.new_sequence();
            let t = tokens(&model, p);
            s.forward(&t[..t.len() / 2]).expect("other prompt");
            (s, t)
        })
        .collect();
    let mut target = model.new_sequence();
    target.forward(&prompt[..5]).expect("first chunk");
    let rest = &prompt[5..];
    let mut seqs: Vec<&mut pod_inference::Sequence> = vec![&mut target];
    let mut inputs: Vec<&[u32]> = vec![rest];
    for (s, t) in others.iter_mut() {
        seqs.push(s);
        inputs.push(&t[t.len() / 2..]);
    }
    let batched = model.forward_batch(&mut seqs, &inputs).expect("batch");
    assert_eq!(batched.len(), 8);
    assert_eq!(batched[0], from_prompt, "batched logits differ");
    // And each other sequence matches its own unbatched run.
    for (i, p) in PROMPTS[1..].iter().enumerate() {
        let mut s = model.new_sequence();
        let alone = s.forward(&tokens(&model, p)).expect("alone");
        assert_eq!(
            batched[i + 1],
            alone,
            "sequence {} differs in the batch",
            i + 1
        );
    }
}

/// Eight concurrent requests share forward passes and still give each the tokens it gives
/// alone.
#[tokio::test(flavor = "multi_thread")]
async fn eight_concurrent_requests_batch_and_match_their_solo_runs() {
    let max_tokens = 24;
    let solo_engine = common::engine_with(EngineConfig {
        max_active: 1,
        prefix_cache_bytes: 0,
        ..EngineConfig::default()
    });
    let mut solo: Vec<Run> = Vec::new();
    for p in PROMPTS {
        solo.push(run_on(&solo_engine, greedy(p, max_tokens)).await);
    }

    let batch_engine = common::engine_with(EngineConfig {
        max_active: 8,
        prefix_cache_bytes: 0,
        ..EngineConfig::default()
    });
    let handles: Vec<_> = PROMPTS
        .iter()
        .map(|p| {
            let e = batch_engine.clone();
            let req = greedy(p, max_tokens);
            tokio::spawn(async move { run_on(&e, req).await })
        })
        .collect();
    let mut batched = Vec::new();
    for h in handles {
        batched.push(h.await.expect("task"));
    }
    for (i, (a, b)) in solo.iter().zip(&batched).enumerate() {
        assert_eq!(
            a.tokens(),
            b.tokens(),
            "prompt {i}: {:?} vs {:?}",
            a.text(),
            b.text()
        );
        assert_eq!(a.finish, b.finish);
    }
    let fed: u64 = batched
        .iter()
        .map(|r| (r.usage.prompt_tokens + r.usage.completion_tokens) as u64)
        .sum();
    let passes = batch_engine.stats().forward_passes.load(Ordering::Relaxed);
    let solo_passes = solo_engine.stats().forward_passes.load(Ordering::Relaxed);
    eprintln!("forward passes: {solo_passes} one at a time, {passes} batched, {fed} tokens");
    assert!(
        passes * 3 < solo_passes,
        "batched requests took {passes} passes, one at a time {solo_passes}"
    );
}

/// A request that starts like an earlier one reuses its attention cache and answers exactly as
/// it would have without it.
#[tokio::test(flavor = "multi_thread")]
async fn repeated_prompt_reuses_the_prefix_cache() {
    let cold = common::engine_with(EngineConfig {
        prefix_cache_bytes: 0,
        ..EngineConfig::default()
    });
    let warm = common::engine_with(EngineConfig::default());
    let conversation = |follow_up: Option<&str>| {
        let mut messages = vec![
            ChatMessage::new(
                Role::System,
                "You are a concise assistant for a home lab. Answer in one short sentence.",
            ),
            ChatMessage::new(Role::User, "What is a GPU?"),
        ];
        if let Some(f) = follow_up {
            messages.push(ChatMessage::new(Role::Assistant, "A graphics processor."));
            messages.push(ChatMessage::new(Role::User, f));
        }
        GenerateRequest {
            max_tokens: Some(16),
            ..GenerateRequest::new(DEFAULT_CHAT_MODEL, Prompt::Chat(messages))
        }
    };
    let first = run_on(&warm, conversation(None)).await;
    assert_eq!(warm.stats().cached_prompt_tokens.load(Ordering::Relaxed), 0);
    let again = run_on(&warm, conversation(None)).await;
    let cached = warm.stats().cached_prompt_tokens.load(Ordering::Relaxed);
    assert_eq!(
        cached as usize,
        again.usage.prompt_tokens - 1,
        "all but the last prompt token"
    );
    assert_eq!(first.tokens(), again.tokens());

    let next = run_on(&warm, conversation(Some("And a CPU?"))).await;
    let reused = warm.stats().cached_prompt_tokens.load(Ordering::Relaxed) - cached;
    assert!(
        reused >= 20,
        "only {reused} tokens of the shared system prompt were reused"
    );
    let uncached = run_on(&cold, conversation(Some("And a CPU?"))).await;
    assert_eq!(next.tokens(), uncached.tokens());
    assert_eq!(cold.stats().cached_prompt_tokens.load(Ordering::Relaxed), 0);
    assert!(matches!(
        next.finish,
        FinishReason::Stop | FinishReason::Length
    ));
}
