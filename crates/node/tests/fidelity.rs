//! Fidelity to llama.cpp on the same GGUF files. The expected values come from llama.cpp's
//! `llama-server` (`bench/llama_reference.py`, see `bench/README.md`): the rendered chat
//! prompt, its token ids, and the top-10 log-probabilities of the next token; for the
//! synthetic models also the whole next-token distribution after several prefixes of each
//! prompt and a 32-token greedy continuation with llama.cpp's top-2 margin at each step.

mod common;

use pod_inference::gpu::synthetic::{self, shapes};
use pod_inference::sampling::log_softmax;
use pod_inference::Device;
use pod_inference::{ChatMessage, ChatModel, Role};
use pod_node::catalogue::DEFAULT_CHAT_MODEL;
use serde_json::Value;

fn messages(case: &Value) -> Vec<ChatMessage> {
    case["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            let role = match m["role"].as_str().unwrap() {
                "system" => Role::System,
                "assistant" => Role::Assistant,
                _ => Role::User,
            };
            ChatMessage::new(role, m["content"].as_str().unwrap())
        })
        .collect()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

/// Largest difference allowed between pod's and llama.cpp's log-probability of llama.cpp's
/// top-1 token, for any single prompt. This model's numerics amplify rounding: llama.cpp itself
/// moves by up to 0.2 between an f16 and an f32 KV cache, and candle's batched prefill and
/// token-by-token decode of the same prompt differ by up to 0.2, so a single prompt can sit
/// at that noise floor. The mean over all prompts must stay within [`MAX_MEAN_DELTA`].
const MAX_LOGPROB_DELTA: f32 = 0.25;
/// Mean absolute top-1 log-probability difference allowed over a fixture's prompts.
const MAX_MEAN_DELTA: f32 = 0.15;
/// The same for the small synthetic models, whose logits stay close to llama.cpp's: every
/// shape and format has a mean within 0.016, and a missing rope scaling on Gemma 3's global
/// layers moves it to 0.07, which [`MAX_MEAN_DELTA`] would let through.
const SYNTHETIC_MAX_MEAN_DELTA: f32 = 0.04;

/// Compares pod's next-token distribution with llama.cpp's top-10 for one prompt; returns
/// the absolute difference of the top-1 log-probability.
fn check_distribution(name: &str, logits: &[f32], top: &[Value]) -> f32 {
    let lp = log_softmax(logits);
    let mut ours: Vec<(u32, f32)> = lp.iter().enumerate().map(|(i, l)| (i as u32, *l)).collect();
    ours.sort_by(|a, b| b.1.total_cmp(&a.1));
    let theirs: Vec<(u32, f32)> = top
        .iter()
        .map(|t| {
            (
                t["id"].as_u64().unwrap() as u32,
                t["logprob"].as_f64().unwrap() as f32,
            )
        })
        .collect();
    let margin = theirs[0].1 - theirs[1].1;
    if margin >= 0.2 {
        assert_eq!(
            ours[0].0, theirs[0].0,
            "{name}: top-1 differs (llama.cpp margin {margin:.3})"
        );
    }
    let ours_lp_of_their_top = lp[theirs[0].0 as usize];
    assert!(
        (ours_lp_of_their_top - theirs[0].1).abs() <= MAX_LOGPROB_DELTA,
        "{name}: top-1 logprob {ours_lp_of_their_top:.4} vs llama.cpp {:.4}",
        theirs[0].1
    );
    let our5: Vec<u32> = ours[..5].iter().map(|x| x.0).collect();
    let shared = theirs[..5].iter().filter(|t| our5.contains(&t.0)).count();
    assert!(
        shared >= 3,
        "{name}: only {shared} of llama.cpp's top-5 in ours"
    );
    (ours_lp_of_their_top - theirs[0].1).abs()
}

/// Checks a case's token ids against llama.cpp's and the model's next-token distribution
/// after them; the top-1 log-probability's distance from llama.cpp's.
fn check_case(model: &ChatModel, name: &str, tokens: &[u32], case: &Value) -> f32 {
    assert_eq!(tokens, ids(&case["tokens"]), "{name}: token ids");
    let mut seq = model.new_sequence();
    let logits = seq.forward(tokens).unwrap();
    check_distribution(name, &logits, case["top"].as_array().unwrap())
}

fn check_mean(deltas: &[f32]) {
    check_mean_within(deltas, MAX_MEAN_DELTA);
}

fn check_mean_within(deltas: &[f32], bound: f32) {
    let mean = deltas.iter().sum::<f32>() / deltas.len() as f32;
    eprintln!("|top-1 logprob - llama.cpp| per prompt: {deltas:?}, mean {mean:.3}");
    assert!(
        mean <= bound,
        "mean top-1 logprob difference {mean:.3} (per prompt: {deltas:?})"
    );
}

#[test]
fn smollm2_matches_llama_cpp() {
    let fixture = common::fixture("llamacpp_smollm2.json");
    let model = ChatModel::load(&common::model_path(DEFAULT_CHAT_MODEL), &Device::Cpu).unwrap();
    let cases = fixture["cases"].as_array().unwrap();
    assert!(cases.len() >= 5);
    let mut deltas = Vec::new();
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let rendered = model.template().render(&messages(case), true).unwrap();
        assert_eq!(
            rendered,
            case["prompt"].as_str().unwrap(),
            "{name}: template"
        );
        let tokens = model.tokenizer().encode(&rendered).unwrap();
        deltas.push(check_case(&model, name, &tokens, case));
    }
    check_mean(&deltas);
}

#[test]
fn smollm2_tokenizer_matches_llama_cpp() {
    let fixture = common::fixture("llamacpp_smollm2.json");
    let model = ChatModel::load(&common::model_path(DEFAULT_CHAT_MODEL), &Device::Cpu).unwrap();
    let cases = fixture["tokenize"].as_array().unwrap();
    assert!(!cases.is_empty());
    check_tokenize_cases(&model, cases);
}

/// llama.cpp's `/tokenize` adds BOS only with `add_special`; pod's encoder always adds it
/// when the model asks for one, so it is dropped for cases without `add_special`.
fn check_tokenize_cases(model: &ChatModel, cases: &[Value]) {
    for case in cases {
        let text = case["text"].as_str().unwrap();
        let mut ours = model.tokenizer().encode(text).unwrap();
        let add_special = case["add_special"].as_bool().unwrap_or(false);
        if !add_special && model.tokenizer().adds_bos() && !ours.is_empty() {
            ours.remove(0);
        }
        assert_eq!(ours, ids(&case["tokens"]), "tokenizing {text:?}");
    }
}

/// A raw-mode fixture (`bench/llama_reference.py --mode raw`): each case's text tokenized as
/// llama.cpp did and its next-token distribution, then the tokenizer cases.
fn check_raw_fixture(model: &ChatModel, fixture: &Value, max_mean: f32) {
    let cases = fixture["cases"].as_array().unwrap();
    assert!(cases.len() >= 4);
    let mut deltas = Vec::new();
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let tokens = model
            .tokenizer()
            .encode(case["text"].as_str().unwrap())
            .unwrap();
        deltas.push(check_case(model, name, &tokens, case));
    }
    check_mean_within(&deltas, max_mean);
    check_tokenize_cases(model, fixture["tokenize"].as_array().unwrap());
}

#[test]
fn gemma3_matches_llama_cpp() {
    let fixture = common::fixture("llamacpp_gemma3.json");
    let model = ChatModel::load(&common::model_path("gemma3-270m"), &Device::Cpu).unwrap();
    assert_eq!(model.info().architecture, "gemma3");
    check_raw_fixture(&model, &fixture, MAX_MEAN_DELTA);
}

/// A synthetic random-weight model (`pod models synthesize --shape SHAPE --format q8_0
/// --seed 1`) against llama.cpp on the same file: the architectures whose weights cannot be
/// fetched here. The file is written anew and must be the one the fixture was made from.
fn synthetic_matches_llama_cpp(fixture: &str, shape: &str) {
    synthetic_format_matches_llama_cpp(fixture, shape, "q8_0");
}

/// [`synthetic_matches_llama_cpp`] with the model's weights in `format`: the top-10 check,
/// then the whole logit vectors and the greedy continuations.
fn synthetic_format_matches_llama_cpp(fixture: &str, shape: &str, format: &str) {
    let fixture = common::fixture(fixture);
    let dir = tempfile::tempdir().unwrap();
    let model = synthetic_model(&dir, shape, format, &fixture);
    check_raw_fixture(&model, &fixture, SYNTHETIC_MAX_MEAN_DELTA);
    check_full_logits(&model, &fixture, format);
    check_greedy(&model, &fixture);
}

/// Least cosine similarity allowed between pod's and llama.cpp's centred next-token vectors
/// at any recorded position, for weights in f16 or bf16 (issue 16's 0.9999). Measured over
/// 15 positions each: F16 0.9999998, BF16 0.9999905.
const MIN_COSINE: f64 = 0.9999;
/// The same for quantised weights, whose activations both decoders round to 8 bits: there
/// the 0.9999 does not hold. Measured least cosines over 15 positions per fixture:
/// 0.99984 to 0.99993 (Q8_0 on every shape, Q2_K, Q3_K, Q5_1, Q5_K, Q4_K experts; worst:
/// Q5_1, 0.9998401, then `tiny-phi3-longrope`, 0.9998543). One less the cosine grows with the
/// square of the error, so allowing about twice the worst error ([`MAX_ABS_ERROR`]) means
/// allowing about four times the worst 1.6e-4: 0.9994.
const MIN_COSINE_QUANTISED: f64 = 0.9994;
/// Largest absolute difference allowed between pod's and llama.cpp's centred next-token
/// vectors, for any token at any recorded position: about twice the worst measured over every
/// fixture (0.0753, Q5_1; 0.0752, `tiny-linear` Q8_0; Q8_0 shapes 0.055–0.075, Q2_K 0.055,
/// Q3_K 0.054, Q5_K 0.061, Q4_K experts 0.042, BF16 0.018, F16 0.0024).
const MAX_ABS_ERROR: f32 = 0.15;
/// llama.cpp's top-2 margin (nats) below which a greedy step is a near tie that either
/// decoder may break either way, so it is not compared. With every centred logit within ε of
/// llama.cpp's, only a margin below 2ε can flip the argmax; the worst ε measured is 0.075, so
/// 0.15. (Measured with no threshold, pod and llama.cpp part on margins up to 0.043 on the
/// dense shapes; on `tiny-qwen3moe` Q8_0 once at 0.127, 23 steps into a continuation, where a
/// near tie in the router can pick another expert.)
const MIN_GREEDY_MARGIN: f32 = 0.15;
/// Fewest greedy steps a fixture must compare over its cases (5 cases of up to 32 steps), so
/// that the check is not vacuous: every fixture compares 96 or more, except
/// `tiny-gemma3-linear` with 70 (one continuation reaches end-of-turn after 4 tokens).
const MIN_GREEDY_STEPS: usize = 50;

/// `v` less its mean: logits and log-probabilities differ by one constant per position (the
/// log of the softmax's sum), which centring removes from both sides alike. Uncentred
/// log-probabilities would not do for the cosine: they are all large negative numbers, so
/// any two such vectors have a cosine near 1.
fn centred(v: &[f32]) -> Vec<f64> {
    let mean = v.iter().map(|&x| f64::from(x)).sum::<f64>() / v.len() as f64;
    v.iter().map(|&x| f64::from(x) - mean).collect()
}

/// Cosine similarity and largest absolute difference of two centred vectors.
fn compare_vectors(ours: &[f32], theirs: &[f32]) -> (f64, f32) {
    assert_eq!(ours.len(), theirs.len(), "vocabulary size");
    let (a, b) = (centred(ours), centred(theirs));
    let dot: f64 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
    let na: f64 = a.iter().map(|x| x * x).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| x * x).sum::<f64>().sqrt();
    let max = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max);
    (dot / (na * nb), max as f32)
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

/// pod's whole next-token logit vector after each prefix the fixture's `full` records,
/// against llama.cpp's log-probabilities there: cosine at least [`MIN_COSINE`] (or
/// [`MIN_COSINE_QUANTISED`] for quantised weights), every token within [`MAX_ABS_ERROR`].
fn check_full_logits(model: &ChatModel, fixture: &Value, format: &str) {
    let min_cosine = if matches!(format, "f16" | "bf16" | "f32") {
        MIN_COSINE
    } else {
        MIN_COSINE_QUANTISED
    };
    let (mut worst_cos, mut worst_err, mut positions) = (1.0f64, 0.0f32, 0);
    for case in fixture["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let tokens = ids(&case["tokens"]);
        let full = case["full"]
            .as_array()
            .expect("fixture has no full vectors");
        for at in full {
            let n = at["prompt_tokens"].as_u64().unwrap() as usize;
            let theirs = floats(&at["logprobs"]);
            let logits = model.new_sequence().forward(&tokens[..n]).unwrap();
            let (cos, err) = compare_vectors(&logits, &theirs);
            assert!(
                cos >= min_cosine,
                "{name} after {n} tokens: cosine {cos:.6} with llama.cpp"
            );
            assert!(
                err <= MAX_ABS_ERROR,
                "{name} after {n} tokens: a logit {err:.4} from llama.cpp's"
            );
            worst_cos = worst_cos.min(cos);
            worst_err = worst_err.max(err);
            positions += 1;
        }
    }
    assert!(positions >= 10, "only {positions} full vectors");
    eprintln!(
        "full vectors: {positions} positions, least cosine {worst_cos:.7}, largest error {worst_err:.4}"
    );
}

/// pod's greedy continuation of each case (the prompt's forward pass, then one token at a
/// time, the argmax at each step) against llama.cpp's 32 tokens: at every step where
/// llama.cpp's top-2 margin is at least [`MIN_GREEDY_MARGIN`] pod picks llama.cpp's token.
/// pod is fed llama.cpp's token at every step, so a near tie that goes the other way does
/// not end the comparison (steps before a case's first near tie are counted apart, as the
/// plain "continuations identical" figure). Over the fixture at least [`MIN_GREEDY_STEPS`]
/// steps are compared.
fn check_greedy(model: &ChatModel, fixture: &Value) {
    let (mut compared, mut before_tie, mut total) = (0, 0, 0);
    for case in fixture["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let greedy = case
            .get("greedy")
            .expect("fixture has no greedy continuations");
        let theirs = ids(&greedy["tokens"]);
        let margins = floats(&greedy["margins"]);
        assert_eq!(theirs.len(), margins.len(), "{name}");
        total += theirs.len();
        let mut seq = model.new_sequence();
        let mut logits = seq.forward(&ids(&case["tokens"])).unwrap();
        let mut tied = false;
        for (step, (&token, &margin)) in theirs.iter().zip(&margins).enumerate() {
            if margin >= MIN_GREEDY_MARGIN {
                let ours = argmax(&logits);
                assert_eq!(
                    ours, token,
                    "{name}: greedy step {step} differs (llama.cpp margin {margin:.3})"
                );
                compared += 1;
                before_tie += usize::from(!tied);
            } else {
                tied = true;
            }
            logits = seq.forward(&[token]).unwrap();
        }
    }
    eprintln!(
        "greedy: {compared} of {total} steps clear and equal, {before_tie} before each case's first near tie"
    );
    assert!(
        compared >= MIN_GREEDY_STEPS,
        "only {compared} greedy steps with a clear margin"
    );
}

fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// Writes the synthetic `shape` model in `format` with seed 1 into `dir`, checks it is the
/// file `fixture` was made from, and loads it on the CPU.
fn synthetic_model(
    dir: &tempfile::TempDir,
    shape: &str,
    format: &str,
    fixture: &Value,
) -> ChatModel {
    let path = dir.path().join("model.gguf");
    let model_shape = shapes::shape(shape, format).unwrap();
    synthetic::write_chat_model(&path, 1, &model_shape).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    let sha = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&bytes));
    assert_eq!(
        sha,
        fixture["model_sha256"].as_str().unwrap(),
        "the synthetic {shape} {format} model changed: regenerate its fixture (bench/README.md)"
    );
    let model = ChatModel::load(&path, &Device::Cpu).unwrap();
    assert_eq!(model.info().architecture, model_shape.family.arch());
    assert_eq!(model.runs_on(), "cpu", "{format}: not on pod's CPU decoder");
    if std::env::var("POD_CPU_KERNELS").as_deref() == Ok("portable") {
        assert_eq!(pod_inference::kernels::cpu_level(), "portable");
    }
    model
}

/// The fidelity tests of the architectures and rope scalings that used to need AVX2 to run on
/// pod's CPU decoder, run again in a child process of this test binary with the kernels capped
/// to the portable ones (`POD_CPU_KERNELS`, read once per process): the same bounds against
/// llama.cpp, on pod's decoder ([`synthetic_model`] asserts it), at the `portable` level
/// ([`synthetic_model`] asserts that too where the variable is set).
#[test]
fn synthetic_models_match_llama_cpp_on_the_portable_kernels() {
    let tests = [
        "synthetic_llama3_rope_scaling_matches_llama_cpp",
        "synthetic_yarn_rope_scaling_matches_llama_cpp",
        "synthetic_linear_rope_scaling_matches_llama_cpp",
        "synthetic_qwen3_matches_llama_cpp",
        "synthetic_phi3_matches_llama_cpp",
        "synthetic_qwen3moe_q4_k_matches_llama_cpp",
    ];
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("child.log");
    let file = std::fs::File::create(&log).unwrap();
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args(tests)
        .args(["--exact", "--test-threads", "1"])
        .env("POD_CPU_KERNELS", "portable")
        .stdout(file.try_clone().unwrap())
        .stderr(file)
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(600);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the child did not finish within 600 s");
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    let out = std::fs::read_to_string(&log).unwrap();
    assert!(status.success(), "{out}");
    let summary = format!("test result: ok. {} passed", tests.len());
    assert!(out.contains(&summary), "{out}");
}

/// The prompt `bench/llama_reference.py --mode long` draws: `tokens` ids below `vocab` from a
/// 64-bit LCG seeded with `seed`.
fn long_prompt(tokens: usize, seed: u64, vocab: u64) -> Vec<u32> {
    let mut state = seed;
    (0..tokens)
        .map(|_| {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            ((state >> 33) % vocab) as u32
        })
        .collect()
}

/// A 16k-token prompt on the synthetic `tiny-long` model (a 32k context), fed in chunks as
/// the engine feeds prompts: the next-token distributions after its last prefixes match
/// llama.cpp's on the same file.
#[test]
fn synthetic_long_context_matches_llama_cpp() {
    let fixture = common::fixture("llamacpp_synthetic_long.json");
    let dir = tempfile::tempdir().unwrap();
    let model = synthetic_model(&dir, "tiny-long", "q8_0", &fixture);
    assert_eq!(model.info().context_length, 32_768, "the trained context");
    let spec = &fixture["long_prompt"];
    let prompt = long_prompt(
        spec["tokens"].as_u64().unwrap() as usize,
        spec["seed"].as_u64().unwrap(),
        spec["vocab"].as_u64().unwrap(),
    );
    assert!(prompt.len() >= 16_384);
    let cases = fixture["cases"].as_array().unwrap();
    let first = cases[0]["prompt_tokens"].as_u64().unwrap() as usize;
    let started = std::time::Instant::now();
    let mut seq = model.new_sequence();
    let mut logits = Vec::new();
    for chunk in prompt[..first].chunks(512) {
        logits = seq.forward(chunk).unwrap();
    }
    let mut deltas = Vec::new();
    for (i, case) in cases.iter().enumerate() {
        let n = case["prompt_tokens"].as_u64().unwrap() as usize;
        if i > 0 {
            logits = seq.forward(&prompt[n - 1..n]).unwrap();
        }
        assert_eq!(seq.len(), n);
        let name = case["name"].as_str().unwrap();
        deltas.push(check_distribution(
            name,
            &logits,
            case["top"].as_array().unwrap(),
        ));
    }
    eprintln!(
        "{} tokens in {:.1} s",
        seq.len(),
        started.elapsed().as_secs_f64()
    );
    check_mean_within(&deltas, SYNTHETIC_MAX_MEAN_DELTA);
}

#[test]
fn synthetic_qwen2_matches_llama_cpp() {
    synthetic_matches_llama_cpp("llamacpp_synthetic_qwen2.json", "tiny-qwen2");
}

#[test]
fn synthetic_qwen3_matches_llama_cpp() {
    synthetic_matches_llama_cpp("llamacpp_synthetic_qwen3.json", "tiny-qwen3");
}

/// Qwen 3 MoE (8 experts, 2 used per token): the router, the renormalised top-2 and the
/// experts read from the stacked tensors, against llama.cpp on the same file.
#[test]
fn synthetic_qwen3moe_matches_llama_cpp() {
    synthetic_matches_llama_cpp("llamacpp_synthetic_qwen3moe.json", "tiny-qwen3moe");
}

/// [`synthetic_qwen3moe_matches_llama_cpp`] with the experts in Q4_K.
#[test]
fn synthetic_qwen3moe_q4_k_matches_llama_cpp() {
    synthetic_format_matches_llama_cpp(
        "llamacpp_synthetic_qwen3moe_q4_k.json",
        "tiny-qwen3moe",
        "q4_k",
    );
}

#[test]
fn synthetic_llama_matches_llama_cpp() {
    synthetic_matches_llama_cpp("llamacpp_synthetic_llama.json", "tiny");
}

#[test]
fn synthetic_linear_rope_scaling_matches_llama_cpp() {
    synthetic_matches_llama_cpp("llamacpp_synthetic_linear.json", "tiny-linear");
}

/// Gemma 3 4B and larger declare linear rope scaling, which applies to their global layers
/// only; the tiny shape's second layer is global, its first local with a window of 4.
#[test]
fn synthetic_gemma3_global_rope_scaling_matches_llama_cpp() {
    synthetic_matches_llama_cpp(
        "llamacpp_synthetic_gemma3_linear.json",
        "tiny-gemma3-linear",
    );
}

#[test]
fn synthetic_llama3_rope_scaling_matches_llama_cpp() {
    synthetic_matches_llama_cpp("llamacpp_synthetic_llama3.json", "tiny-llama3");
}

#[test]
fn synthetic_yarn_rope_scaling_matches_llama_cpp() {
    synthetic_matches_llama_cpp("llamacpp_synthetic_yarn.json", "tiny-yarn");
}

/// A synthetic model with a sliding window (`tiny-mistral-swa`: 8 positions, one layer) against
/// llama.cpp, which ignores the window for llama: the last position of a prompt attends to its
/// last 8 tokens only, and RoPE depends on relative positions only, so pod's distribution after
/// the whole prompt must be llama.cpp's after its last 8 tokens (the fixture's `tail`,
/// `--tail 8`), and away from llama.cpp's full attention over the whole prompt. (With more
/// layers, the positions before the last see more of a truncated prompt than of the whole.)
#[test]
fn synthetic_mistral_sliding_window_matches_llama_cpp() {
    let fixture = common::fixture("llamacpp_synthetic_mistral_swa.json");
    let dir = tempfile::tempdir().unwrap();
    let model_shape = shapes::shape("tiny-mistral-swa", "q8_0").unwrap();
    assert_eq!(model_shape.sliding_window, Some(8));
    let model = synthetic_model(&dir, "tiny-mistral-swa", "q8_0", &fixture);
    let cases = fixture["cases"].as_array().unwrap();
    assert!(cases.len() >= 4);
    let (mut deltas, mut full_deltas) = (Vec::new(), Vec::new());
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let tokens = model
            .tokenizer()
            .encode(case["text"].as_str().unwrap())
            .unwrap();
        assert_eq!(tokens, ids(&case["tokens"]), "{name}: token ids");
        let tail = &case["tail"];
        assert_eq!(ids(&tail["tokens"]), tokens[tokens.len() - 8..], "{name}");
        let logits = model.new_sequence().forward(&tokens).unwrap();
        deltas.push(check_distribution(
            name,
            &logits,
            tail["top"].as_array().unwrap(),
        ));
        let full = &case["top"][0];
        let lp = log_softmax(&logits)[full["id"].as_u64().unwrap() as usize];
        full_deltas.push((lp - full["logprob"].as_f64().unwrap() as f32).abs());
    }
    check_mean_within(&deltas, SYNTHETIC_MAX_MEAN_DELTA);
    let away = full_deltas.iter().sum::<f32>() / full_deltas.len() as f32;
    eprintln!("|top-1 logprob - llama.cpp over the whole prompt|: {full_deltas:?}, mean {away:.3}");
    assert!(
        away > MAX_MEAN_DELTA,
        "the window changes nothing on these prompts: mean {away:.3} from full attention"
    );
}

/// Phi 3 on pod's decoder: fused q/k/v and gate/up, NeoX rotation, and a declared sliding
/// window that llama.cpp b11434 disables for Phi 3 (and pod with it).
#[test]
fn synthetic_phi3_matches_llama_cpp() {
    synthetic_matches_llama_cpp("llamacpp_synthetic_phi3.json", "tiny-phi3");
}

/// Phi 3's long-context rope factors (`rope_factors_long`, picked for a context beyond the
/// original one, as both pod and llama-server's 2048 are) and attention factor.
#[test]
fn synthetic_phi3_longrope_matches_llama_cpp() {
    synthetic_matches_llama_cpp(
        "llamacpp_synthetic_phi3_longrope.json",
        "tiny-phi3-longrope",
    );
}

#[test]
fn synthetic_q5_1_matches_llama_cpp() {
    synthetic_format_matches_llama_cpp("llamacpp_synthetic_llama_q5_1.json", "tiny", "q5_1");
}

#[test]
fn synthetic_q5_k_matches_llama_cpp() {
    synthetic_format_matches_llama_cpp("llamacpp_synthetic_llama_q5_k.json", "tiny", "q5_k");
}

#[test]
fn synthetic_f16_matches_llama_cpp() {
    synthetic_format_matches_llama_cpp("llamacpp_synthetic_llama_f16.json", "tiny", "f16");
}

#[test]
fn synthetic_bf16_matches_llama_cpp() {
    synthetic_format_matches_llama_cpp("llamacpp_synthetic_llama_bf16.json", "tiny", "bf16");
}

#[test]
fn synthetic_q2_k_matches_llama_cpp() {
    synthetic_format_matches_llama_cpp("llamacpp_synthetic_llama_q2_k.json", "tiny", "q2_k");
}

#[test]
fn synthetic_q3_k_matches_llama_cpp() {
    synthetic_format_matches_llama_cpp("llamacpp_synthetic_llama_q3_k.json", "tiny", "q3_k");
}
