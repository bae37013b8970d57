//! Resuming a generation another node started (`GenerateRequest::resume`) with the real
//! SmolLM2 model: the resumed stream must continue the interrupted one with no gap and no
//! repeat, token for token and byte for byte.

mod common;

use std::sync::OnceLock;

use common::{greedy, Run};
use pod_inference::{EngineConfig, EngineHandle};

/// The engine of these tests, without a prefix cache: a resumed request must rebuild its
/// attention cache from the tokens alone, as on a pod that never saw the request.
fn engine() -> EngineHandle {
    static ENGINE: OnceLock<EngineHandle> = OnceLock::new();
    ENGINE
        .get_or_init(|| {
            common::engine_with(EngineConfig {
                prefix_cache_bytes: 0,
                ..EngineConfig::default()
            })
        })
        .clone()
}

async fn run(req: GenerateRequest) -> Run {
    common::run_on(&engine(), req).await
}

use pod_inference::{EngineError, FinishReason, GenerateRequest, Resume, SamplingParams};
use pod_node::catalogue::DEFAULT_CHAT_MODEL;

impl Run {
    /// What the client had received when the serving node died right after the `n`th token:
    /// those tokens, and the text of the deltas it got by then. A cut inside a delta (its text
    /// was still held back) leaves that delta out.
    fn cut(&self, n: usize) -> Resume {
        let mut seen = 0;
        let mut emitted_bytes = 0;
        for d in &self.deltas {
            if seen + d.tokens.len() > n {
                break;
            }
            seen += d.tokens.len();
            emitted_bytes += d.text.len();
        }
        Resume {
            tokens: self.tokens()[..n].to_vec(),
            emitted_bytes,
        }
    }

    /// Token counts at the end of each delta: where a stream can be cut between deltas.
    fn delta_ends(&self) -> Vec<usize> {
        self.deltas
            .iter()
            .scan(0, |n, d| {
                *n += d.tokens.len();
                Some(*n)
            })
            .collect()
    }
}

/// Resumes `req` from `resume` and checks the result continues `full` exactly. Resumed tokens
/// beyond where `full` ended are expected to be ignored.
async fn resume_and_check(req: &GenerateRequest, full: &Run, resume: Resume) -> Run {
    let n = resume.tokens.len().min(full.tokens().len());
    let before = full.text()[..resume.emitted_bytes].to_owned();
    let resumed = run(GenerateRequest {
        resume: Some(resume),
        ..req.clone()
    })
    .await;
    assert_eq!(
        format!("{before}{}", resumed.text()),
        full.text(),
        "text after a cut at {n} tokens"
    );
    assert_eq!(
        resumed.tokens(),
        full.tokens()[n..],
        "tokens after a cut at {n} tokens"
    );
    assert_eq!(resumed.finish, full.finish, "cut at {n} tokens");
    assert_eq!(resumed.usage, full.usage, "cut at {n} tokens");
    resumed
}

/// Runs `req` uninterrupted, then resumed after each of the first `deltas` deltas (those the
/// stream has) and after all of them, checking each resumed stream. Returns the uninterrupted
/// run.
async fn check_cuts(req: &GenerateRequest, deltas: &[usize]) -> Run {
    let full = run(req.clone()).await;
    let ends = full.delta_ends();
    let mut cuts: Vec<usize> = deltas
        .iter()
        .filter_map(|&k| match k {
            0 => Some(0),
            k => ends.get(k - 1).copied(),
        })
        .collect();
    cuts.push(full.tokens().len());
    cuts.dedup();
    for n in cuts {
        resume_and_check(req, &full, full.cut(n)).await;
    }
    full
}

#[tokio::test]
async fn greedy_resume_continues_exactly() {
    // Ends on max_tokens.
    let req = greedy("Write a short poem about the sea.", 40);
    let full = check_cuts(&req, &[0, 1, 5, 17, 38]).await;
    assert_eq!(full.finish, FinishReason::Length);
    assert_eq!(full.usage.completion_tokens, 40);
    // Ends on the end-of-turn token, which no delta carries.
    let req = greedy("What is 2 + 2? Answer in one short sentence.", 40);
    let full = check_cuts(&req, &[1, 5]).await;
    assert_eq!(full.finish, FinishReason::Stop);
    assert_eq!(full.usage.completion_tokens, full.tokens().len() + 1);
}

#[tokio::test]
async fn resume_while_text_is_held_back() {
    // Stop strings that never match but whose starts are common hold text back until the next
    // token shows no match, so cuts land where the client had less text than tokens.
    let prompt = "Explain in a few sentences why the sky is blue.";
    let plain = run(greedy(prompt, 40)).await;
    let mut req = greedy(prompt, 40);
    req.stop = vec!["e\u{7}".into(), " th\u{7}".into(), "s\u{7}".into()];
    let held = check_cuts(&req, &[5]).await;
    assert_eq!(held.tokens(), plain.tokens());
    assert_eq!(held.text(), plain.text());
    // Cut at delta ends where text lagged the tokens.
    let lagging: Vec<usize> = held
        .delta_ends()
        .into_iter()
        .filter(|&n| plain.cut(n).emitted_bytes > held.cut(n).emitted_bytes)
        .collect();
    assert!(!lagging.is_empty(), "no cut with held-back text: {held:?}");
    for n in lagging.into_iter().step_by(4).take(3) {
        resume_and_check(&req, &held, held.cut(n)).await;
    }
}

#[tokio::test]
async fn resume_inside_a_multibyte_character() {
    let req = greedy(
        "Reply with a friendly greeting full of emoji, like 🌞🌊🐬, and the French word 'café'.",
        40,
    );
    let full = run(req.clone()).await;
    assert!(
        full.text().chars().any(|c| c.len_utf8() > 1),
        "no multi-byte character: {:?}",
        full.text()
    );
    // Cuts inside deltas: tokens generated, their text (part of a character) not yet sent.
    let ends = full.delta_ends();
    let inside: Vec<usize> = (1..full.tokens().len())
        .filter(|n| !ends.contains(n))
        .collect();
    assert!(!inside.is_empty(), "no delta with several tokens: {full:?}");
    for n in inside.into_iter().take(3) {
        resume_and_check(&req, &full, full.cut(n)).await;
    }
}

#[tokio::test]
async fn text_the_client_missed_is_sent_again() {
    let req = greedy("Write a short poem about the sea.", 30);
    let full = run(req.clone()).await;
    let text = full.text();
    let n = full.delta_ends()[6];
    let had = full.cut(n).emitted_bytes;
    // The client got only part of what those tokens yield (any character boundary).
    for emitted_bytes in [0, had / 2, had] {
        let emitted_bytes = (0..=emitted_bytes)
            .rev()
            .find(|b| text.is_char_boundary(*b))
            .unwrap_or(0);
        let resume = Resume {
            tokens: full.tokens()[..n].to_vec(),
            emitted_bytes,
        };
        let resumed = resume_and_check(&req, &full, resume).await;
        if emitted_bytes < had {
            // The missing text comes first, before any new token.
            assert_eq!(resumed.deltas[0].text, text[emitted_bytes..had]);
            assert!(resumed.deltas[0].tokens.is_empty());
        }
    }
}

#[tokio::test]
async fn resume_with_a_stop_string() {
    let prompt = "Count from 1 to 20, separated by commas.";
    let plain = run(greedy(prompt, 40)).await;
    // Every newline is held back until the next token shows whether the stop follows.
    let stop = "\n8.";
    assert!(plain.text().contains(stop), "{:?}", plain.text());
    let mut req = greedy(prompt, 40);
    req.stop = vec![stop.into()];
    let full = check_cuts(&req, &[1, 2, 5, 9, 12]).await;
    assert_eq!(full.finish, FinishReason::Stop);
    assert!(!full.text().contains(stop));
    // The last token completed the stop string: resuming with every token finishes at once.
    let all = full.cut(full.tokens().len());
    assert_eq!(all.emitted_bytes, full.text().len());
    let resumed = resume_and_check(&req, &full, all).await;
    assert!(resumed.deltas.is_empty(), "{resumed:?}");
    // Tokens past the stop are ignored: the completion ended where the stop string matched.
    let mut past = full.cut(full.tokens().len());
    past.tokens.extend(&plain.tokens()[full.tokens().len()..]);
    resume_and_check(&req, &full, past).await;
}

#[tokio::test]
async fn max_tokens_counts_the_resumed_tokens() {
    let prompt = "Write a long story about a dragon.";
    let long = run(greedy(prompt, 40)).await;
    let n = long.delta_ends()[9];
    assert!(n < 16);
    // 16 in all: the resumed tokens, then at most 16 - n new ones.
    let req = greedy(prompt, 16);
    let short = run(req.clone()).await;
    assert_eq!(short.tokens()[..], long.tokens()[..16]);
    let resumed = resume_and_check(&req, &short, long.cut(n)).await;
    assert_eq!(resumed.tokens().len(), 16 - n);
    assert_eq!(resumed.usage.completion_tokens, 16);
    assert_eq!(resumed.usage.prompt_tokens, long.usage.prompt_tokens);

    // max_tokens reached exactly by the resumed tokens: finished at once, held text released.
    let req = greedy(prompt, n);
    let exact = run(req.clone()).await;
    let resumed = resume_and_check(&req, &exact, long.cut(n)).await;
    assert!(resumed.tokens().is_empty());
    assert_eq!(resumed.finish, FinishReason::Length);
    assert_eq!(resumed.usage.completion_tokens, n);

    // max_tokens reached inside the resumed tokens: the completion ended there.
    let req = greedy(prompt, 8);
    let eight = run(req.clone()).await;
    let mut resume = long.cut(12);
    resume.emitted_bytes = eight.cut(8).emitted_bytes;
    let resumed = resume_and_check(&req, &eight, resume).await;
    assert_eq!(resumed.usage.completion_tokens, 8);
}

#[tokio::test]
async fn seeded_sampling_resumes_exactly() {
    let req = GenerateRequest {
        sampling: SamplingParams {
            temperature: 0.8,
            seed: Some(7),
            ..Default::default()
        },
        ..greedy("Invent a name and a short story for a cat.", 40)
    };
    check_cuts(&req, &[1, 5, 17]).await;
    // Penalties and nucleus sampling replay as well.
    let req = GenerateRequest {
        sampling: SamplingParams {
            temperature: 0.8,
            top_p: 0.9,
            seed: Some(7),
            repetition_penalty: 1.2,
            presence_penalty: 0.5,
            frequency_penalty: 0.3,
            ..Default::default()
        },
        ..req
    };
    check_cuts(&req, &[1, 5, 17]).await;
}

#[tokio::test]
async fn json_mode_resumes_exactly() {
    let mut req = greedy(
        "Describe a cat as a JSON object with a name and an age.",
        60,
    );
    req.json = true;
    let full = check_cuts(&req, &[1, 5, 17]).await;
    serde_json::from_str::<serde_json::Value>(&full.text()).expect("valid JSON");
    let mut req = GenerateRequest {
        sampling: SamplingParams {
            temperature: 0.8,
            seed: Some(7),
            ..Default::default()
        },
        ..req
    };
    req.json = true;
    check_cuts(&req, &[1, 5, 17]).await;
}

#[tokio::test]
async fn invalid_resumes_are_clear_errors() {
    let engine = engine();
    let req = greedy("Write a short poem about the sea.", 20);
    let full = run(req.clone()).await;
    let with = |resume: Resume| GenerateRequest {
        resume: Some(resume),
        ..req.clone()
    };

    let err = engine
        .generate(with(Resume {
            tokens: vec![full.tokens()[0], 9_999_999],
            emitted_bytes: 0,
        }))
        .unwrap_err();
    assert!(matches!(err, EngineError::InvalidRequest(_)), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("resume.tokens") && msg.contains("9999999"),
        "{msg}"
    );
    assert!(msg.contains("vocabulary"), "{msg}");

    let mut resume = full.cut(5);
    resume.emitted_bytes = full.text().len() + 1;
    let err = engine.generate(with(resume)).unwrap_err();
    assert!(matches!(err, EngineError::InvalidRequest(_)), "{err}");
    assert!(err.to_string().contains("resume.emitted_bytes"), "{err}");

    let context_length = engine
        .models()
        .into_iter()
        .find(|m| m.name == DEFAULT_CHAT_MODEL)
        .expect("chat model listed")
        .context_length;
    let err = engine
        .generate(GenerateRequest {
            max_tokens: None,
            ..with(Resume {
                tokens: vec![full.tokens()[0]; context_length],
                emitted_bytes: 0,
            })
        })
        .unwrap_err();
    assert!(matches!(err, EngineError::InvalidRequest(_)), "{err}");
    assert!(err.to_string().contains("context length"), "{err}");

    // A cut inside a multi-byte character of the text.
    let greeting = greedy("Say 'café' and nothing else.", 10);
    let out = run(greeting.clone()).await;
    let text = out.text();
    if let Some(inside) = (1..text.len()).find(|b| !text.is_char_boundary(*b)) {
        let n = out.tokens().len();
        let err = engine
            .generate(GenerateRequest {
                resume: Some(Resume {
                    tokens: out.tokens(),
                    emitted_bytes: inside,
                }),
                ..greeting.clone()
            })
            .unwrap_err();
        assert!(
            err.to_string().contains("inside a character"),
            "{err} ({n} tokens)"
        );
    }

    // In JSON mode, tokens must keep the output a JSON prefix.
    let mut json = req.clone();
    json.json = true;
    json.resume = Some(full.cut(3));
    let err = engine.generate(json).unwrap_err();
    assert!(err.to_string().contains("JSON"), "{err}");
}
