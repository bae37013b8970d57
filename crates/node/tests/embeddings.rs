//! all-MiniLM-L6-v2 embeddings against a reference computed without candle (a numpy forward
//! pass of the same safetensors, `bench/embedding_reference.py`).

mod common;

use pod_inference::EmbedRequest;
use pod_node::catalogue::DEFAULT_EMBEDDING_MODEL;

fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let na: f32 = a.iter().map(|x| x * x).sum::<f32>().sqrt();
    let nb: f32 = b.iter().map(|x| x * x).sum::<f32>().sqrt();
    dot / (na * nb)
}

struct Case {
    name: String,
    text: String,
    tokens: usize,
    embedding: Vec<f32>,
}

fn cases() -> Vec<Case> {
    let fixture = common::fixture("minilm_reference.json");
    fixture["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| Case {
            name: c["name"].as_str().unwrap().to_owned(),
            text: c["text"].as_str().unwrap().to_owned(),
            tokens: c["tokens"].as_u64().unwrap() as usize,
            embedding: c["embedding"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap() as f32)
                .collect(),
        })
        .collect()
}

async fn embed(texts: Vec<String>) -> pod_inference::EmbedResponse {
    common::engine()
        .embed(EmbedRequest {
            model: DEFAULT_EMBEDDING_MODEL.into(),
            input: texts,
        })
        .await
        .expect("embed")
}

#[tokio::test]
async fn single_inputs_match_the_reference() {
    for case in cases() {
        let out = embed(vec![case.text.clone()]).await;
        let got = &out.data[0];
        assert_eq!(got.vector.len(), 384, "{}", case.name);
        assert_eq!(got.tokens, case.tokens, "token count of {}", case.name);
        let cos = cosine(&got.vector, &case.embedding);
        eprintln!(
            "{}: {} tokens, cosine to reference {cos:.6}",
            case.name, got.tokens
        );
        assert!(cos >= 0.999, "{}: cosine {cos}", case.name);
        let norm: f32 = got.vector.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-4, "{}: norm {norm}", case.name);
    }
}

#[tokio::test]
async fn batching_and_padding_do_not_change_vectors() {
    let cases = cases();
    let texts: Vec<String> = cases.iter().map(|c| c.text.clone()).collect();
    let batched = embed(texts).await;
    assert_eq!(batched.data.len(), cases.len());
    assert_eq!(
        batched.prompt_tokens,
        cases.iter().map(|c| c.tokens).sum::<usize>()
    );
    for (case, got) in cases.iter().zip(&batched.data) {
        let alone = embed(vec![case.text.clone()]).await;
        let cos = cosine(&got.vector, &alone.data[0].vector);
        assert!(
            cos > 0.99999,
            "{}: batched vs alone cosine {cos}",
            case.name
        );
        assert!(
            cosine(&got.vector, &case.embedding) >= 0.999,
            "{}",
            case.name
        );
    }
}

#[tokio::test]
async fn related_sentences_score_higher_than_unrelated() {
    let out = embed(vec![
        "How do I bake bread at home?".into(),
        "A simple recipe for homemade bread.".into(),
        "Quantum chromodynamics describes the strong interaction.".into(),
    ])
    .await;
    let v = |i: usize| &out.data[i].vector;
    assert!(cosine(v(0), v(1)) > cosine(v(0), v(2)) + 0.3);
}

#[tokio::test]
async fn empty_input_list_is_rejected() {
    let err = common::engine()
        .embed(EmbedRequest {
            model: DEFAULT_EMBEDDING_MODEL.into(),
            input: vec![],
        })
        .await
        .unwrap_err();
    assert!(err.to_string().contains("input"), "{err}");
}
