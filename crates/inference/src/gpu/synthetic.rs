//! llama-shaped (or Gemma 3, Qwen 2, Qwen 3, Qwen 3 MoE, Phi 3) models with random weights, written as GGUF: small ones for
//! checking a GPU runtime against the CPU decoder, and named realistic shapes ([`shapes`]) with
//! a generated tokenizer ([`tokenizer`]) for measuring speed, without downloading anything.

use std::fs::File;
use std::path::Path;

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

pub mod shapes;
pub mod tokenizer;

/// The projections of one layer, in the order [`ModelShape::layer_formats`] gives their
/// formats.
pub const PROJECTIONS: [&str; 7] = [
    "attn_q",
    "attn_k",
    "attn_v",
    "attn_output",
    "ffn_gate",
    "ffn_up",
    "ffn_down",
];

/// Which architecture's metadata and tensors are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// llama: RMS norms, SiLU gates, one RoPE base.
    Llama,
    /// Gemma 3: q/k norms, post norms, GELU, a sliding window of 4 on every other layer
    /// (starting with the first) and a second RoPE base for those layers.
    Gemma3,
    /// Qwen 2: llama with biases on the query, key and value projections, NeoX rotation.
    Qwen2,
    /// Qwen 3: llama with per-head q/k norms, NeoX rotation, and a head width of its own
    /// (`head_dim` need not be hidden / heads).
    Qwen3,
    /// Qwen 3 MoE: Qwen 3 with a mixture of experts in place of each feed-forward: a router
    /// (`ffn_gate_inp`, f32 as llama.cpp keeps it) and the experts' gate, up and down
    /// projections stacked in 3-D tensors (`ffn_{gate,up,down}_exps`), in the formats of
    /// `ffn_gate`, `ffn_up` and `ffn_down`.
    Qwen3Moe,
    /// Phi 3: llama with one fused q/k/v projection (`attn_qkv`), one fused gate/up projection
    /// (`ffn_up`, the gate's rows first) and NeoX rotation. The formats of `attn_q` and
    /// `ffn_up` are those of the fused matrices; those of `attn_k`, `attn_v` and `ffn_gate`
    /// are not used.
    Phi3,
}

/// The rope scaling a synthetic model declares.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum RopeScaling {
    /// Plain RoPE.
    #[default]
    None,
    /// `rope.scaling.type = linear`: angles divided by `factor`, cosines and sines multiplied
    /// by `attn_factor`.
    Linear {
        /// The scaling factor.
        factor: f32,
        /// `rope.scaling.attn_factor`.
        attn_factor: f32,
    },
    /// Llama 3's frequency scaling, as llama.cpp's converter writes it: a `rope_freqs.weight`
    /// tensor of per-frequency divisors (1 for wavelengths below `original / 4`, `factor`
    /// above `original`, a smooth blend between).
    Llama3 {
        /// The scaling factor of the slowest frequencies.
        factor: f32,
        /// The context the model was first trained at.
        original: usize,
    },
    /// Phi 3's long-context scaling as llama.cpp's converter writes it: per-frequency
    /// divisors `rope_factors_long` (for contexts beyond `original`) and `rope_factors_short`,
    /// random in [1, 4) and [1, 1.5), and the attention factor
    /// √(1 + ln(context / original) / ln(original)).
    LongRope {
        /// `rope.scaling.original_context_length`.
        original: usize,
    },
    /// YaRN (`rope.scaling.type = yarn`) with `factor` over an original context.
    Yarn {
        /// The scaling factor.
        factor: f32,
        /// `rope.scaling.original_context_length`.
        original: usize,
    },
}

impl Family {
    /// The `general.architecture` string.
    pub fn arch(self) -> &'static str {
        match self {
            Family::Llama => "llama",
            Family::Gemma3 => "gemma3",
            Family::Qwen2 => "qwen2",
            Family::Qwen3 => "qwen3",
            Family::Qwen3Moe => "qwen3moe",
            Family::Phi3 => "phi3",
        }
    }
}

/// The shape and weight formats of a synthetic model.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelShape {
    /// The architecture.
    pub family: Family,
    /// Width of the residual stream.
    pub hidden: usize,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads.
    pub kv_heads: usize,
    /// Width of the feed-forward layer.
    pub ffn: usize,
    /// Vocabulary size.
    pub vocab: usize,
    /// The context length written in the metadata.
    pub context: usize,
    /// The format of the embedding table.
    pub embedding: GgmlDType,
    /// The format of `output.weight`; `None` writes no output head, so the embedding table is
    /// the head (tied).
    pub output: Option<GgmlDType>,
    /// One entry per layer: the formats of its projections, in [`PROJECTIONS`] order.
    pub layer_formats: Vec<[GgmlDType; 7]>,
    /// The rope scaling declared.
    pub rope: RopeScaling,
    /// `{arch}.attention.sliding_window`, where written (not for Gemma 3, which always has
    /// its own).
    pub sliding_window: Option<usize>,
    /// Width of one attention head where it is not `hidden / heads` (Qwen 3's may differ);
    /// `None`: `hidden / heads`.
    pub head_width: Option<usize>,
    /// The mixture of experts of each layer ([`Family::Qwen3Moe`]); `ffn` is then each
    /// expert's width.
    pub experts: Option<Experts>,
}

/// A mixture of experts' size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Experts {
    /// Experts per layer.
    pub count: usize,
    /// Experts each token runs through.
    pub used: usize,
}

impl ModelShape {
    /// Width of one attention head.
    pub fn head_dim(&self) -> usize {
        self.head_width.unwrap_or(self.hidden / self.heads)
    }
}

/// Writing a synthetic model failed.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// A tensor could not be built or quantised to its format.
    #[error("building tensor `{name}`: {source}")]
    Tensor {
        /// The tensor's GGUF name.
        name: String,
        /// Why.
        source: candle_core::Error,
    },
    /// The file could not be created.
    #[error("creating the model file: {0}")]
    Create(#[from] std::io::Error),
    /// Writing the GGUF content failed.
    #[error("writing the model file: {0}")]
    Write(candle_core::Error),
    /// The shape cannot be written as asked.
    #[error("{0}")]
    Shape(String),
}

/// A `rows` × `cols` matrix of random values in ±`scale`, quantised to `dtype`.
fn matrix(
    rng: &mut StdRng,
    rows: usize,
    cols: usize,
    dtype: GgmlDType,
    scale: f32,
) -> candle_core::Result<QTensor> {
    let v: Vec<f32> = (0..rows * cols)
        .map(|_| rng.random_range(-1.0..1.0f32) * scale)
        .collect();
    let t = Tensor::from_vec(v, (rows, cols), &Device::Cpu)?;
    QTensor::quantize(&t, dtype)
}

/// `experts` matrices of `rows` × `cols` random values in ±`scale`, stacked as one 3-D
/// tensor (`[experts, rows, cols]`) in `dtype`: one expert per slice, as GGUF stores a
/// mixture's experts.
fn stacked(
    rng: &mut StdRng,
    experts: usize,
    rows: usize,
    cols: usize,
    dtype: GgmlDType,
    scale: f32,
) -> candle_core::Result<QTensor> {
    let v: Vec<f32> = (0..experts * rows * cols)
        .map(|_| rng.random_range(-1.0..1.0f32) * scale)
        .collect();
    let t = Tensor::from_vec(v, (experts, rows, cols), &Device::Cpu)?;
    QTensor::quantize(&t, dtype)
}

/// A norm weight near 1, as trained models have.
fn norm(rng: &mut StdRng, len: usize) -> candle_core::Result<QTensor> {
    let v: Vec<f32> = (0..len)
        .map(|_| 1.0 + rng.random_range(-0.2..0.2f32))
        .collect();
    QTensor::quantize(&Tensor::new(v, &Device::Cpu)?, GgmlDType::F32)
}

/// A bias vector of random values in ±0.5, as f32.
fn bias(rng: &mut StdRng, len: usize) -> candle_core::Result<QTensor> {
    let v: Vec<f32> = (0..len).map(|_| rng.random_range(-0.5..0.5f32)).collect();
    QTensor::quantize(&Tensor::new(v, &Device::Cpu)?, GgmlDType::F32)
}

/// Llama 3's per-frequency divisors of RoPE angles, as llama.cpp's converter computes them
/// (low and high frequency factors 1 and 4).
fn llama3_factors(head_dim: usize, base: f32, factor: f32, original: usize) -> Vec<f32> {
    let (low, high) = (1.0f32, 4.0f32);
    let (low_wavelen, high_wavelen) = (original as f32 / low, original as f32 / high);
    (0..head_dim / 2)
        .map(|i| {
            let freq = 1.0 / base.powf((2 * i) as f32 / head_dim as f32);
            let wavelen = 2.0 * std::f32::consts::PI / freq;
            if wavelen < high_wavelen {
                1.0
            } else if wavelen > low_wavelen {
                factor
            } else {
                let smooth = (original as f32 / wavelen - low) / (high - low);
                1.0 / ((1.0 - smooth) / factor + smooth)
            }
        })
        .collect()
}

/// Writes a model of `shape` to `path`, its weights drawn from `seed`. Matrix entries are
/// scaled by 1/√cols so that activations keep their size from layer to layer.
pub fn write_model(path: &Path, seed: u64, shape: &ModelShape) -> Result<(), WriteError> {
    write_with(path, seed, shape, Vec::new())
}

/// As [`write_model`], with a generated byte-level BPE tokenizer of the model's vocabulary
/// ([`tokenizer::metadata`]) and ChatML's special tokens, so that pod (and llama.cpp) load it
/// as a chat model. The vocabulary must hold at least [`tokenizer::MIN_VOCAB`] tokens.
pub fn write_chat_model(path: &Path, seed: u64, shape: &ModelShape) -> Result<(), WriteError> {
    let metadata = tokenizer::metadata(shape.vocab)?;
    write_with(path, seed, shape, metadata)
}

fn write_with(
    path: &Path,
    seed: u64,
    shape: &ModelShape,
    extra: Vec<(String, Value)>,
) -> Result<(), WriteError> {
    let gemma = shape.family == Family::Gemma3;
    let phi3 = shape.family == Family::Phi3;
    let qk_norm = gemma || matches!(shape.family, Family::Qwen3 | Family::Qwen3Moe);
    let experts = match (shape.family, shape.experts) {
        (Family::Qwen3Moe, Some(e)) if e.used >= 1 && e.used <= e.count => Some(e),
        (Family::Qwen3Moe, _) => {
            return Err(WriteError::Shape(
                "a qwen3moe model needs experts, at least one used and no more than there are"
                    .into(),
            ))
        }
        _ => None,
    };
    let (hidden, head_dim) = (shape.hidden, shape.head_dim());
    let (q_w, kv_w) = (shape.heads * head_dim, shape.kv_heads * head_dim);
    let mut rng = StdRng::seed_from_u64(seed);
    let mut tensors: Vec<(String, QTensor)> = Vec::new();
    let mut push = |name: String, t: candle_core::Result<QTensor>| match t {
        Ok(t) => {
            tensors.push((name, t));
            Ok(())
        }
        Err(source) => Err(WriteError::Tensor { name, source }),
    };
    let embd = matrix(&mut rng, shape.vocab, hidden, shape.embedding, 1.0);
    push("token_embd.weight".into(), embd)?;
    push("output_norm.weight".into(), norm(&mut rng, hidden))?;
    if let Some(dtype) = shape.output {
        let scale = 2.0 / (hidden as f32).sqrt();
        let w = matrix(&mut rng, shape.vocab, hidden, dtype, scale);
        push("output.weight".into(), w)?;
    }
    for (i, formats) in shape.layer_formats.iter().enumerate() {
        let dims = [
            (q_w, hidden),
            (kv_w, hidden),
            (kv_w, hidden),
            (hidden, q_w),
            (shape.ffn, hidden),
            (shape.ffn, hidden),
            (hidden, shape.ffn),
        ];
        for ((name, (rows, cols)), &dtype) in PROJECTIONS.into_iter().zip(dims).zip(formats) {
            let (name, rows) = match name {
                "attn_k" | "attn_v" | "ffn_gate" if phi3 => continue,
                "attn_q" if phi3 => ("attn_qkv", q_w + 2 * kv_w),
                "ffn_up" if phi3 => ("ffn_up", 2 * shape.ffn),
                _ => (name, rows),
            };
            let scale = 1.7 / (cols as f32).sqrt();
            if let (Some(e), "ffn_gate" | "ffn_up" | "ffn_down") = (experts, name) {
                if name == "ffn_gate" {
                    let w = matrix(&mut rng, e.count, hidden, GgmlDType::F32, scale);
                    push(format!("blk.{i}.ffn_gate_inp.weight"), w)?;
                }
                let w = stacked(&mut rng, e.count, rows, cols, dtype, scale);
                push(format!("blk.{i}.{name}_exps.weight"), w)?;
                continue;
            }
            let w = matrix(&mut rng, rows, cols, dtype, scale);
            push(format!("blk.{i}.{name}.weight"), w)?;
        }
        if shape.family == Family::Qwen2 {
            for (name, len) in [("attn_q", q_w), ("attn_k", kv_w), ("attn_v", kv_w)] {
                push(format!("blk.{i}.{name}.bias"), bias(&mut rng, len))?;
            }
        }
        let mut norms = vec![("attn_norm", hidden), ("ffn_norm", hidden)];
        if qk_norm {
            norms.extend([("attn_q_norm", head_dim), ("attn_k_norm", head_dim)]);
        }
        if gemma {
            norms.extend([("post_attention_norm", hidden), ("post_ffw_norm", hidden)]);
        }
        for (name, len) in norms {
            push(format!("blk.{i}.{name}.weight"), norm(&mut rng, len))?;
        }
    }
    let arch = shape.family.arch();
    let key = |k: &str| format!("{arch}.{k}");
    let mut metadata = vec![
        (
            "general.architecture".to_owned(),
            Value::String(arch.into()),
        ),
        (
            key("block_count"),
            Value::U32(shape.layer_formats.len() as u32),
        ),
        (key("embedding_length"), Value::U32(hidden as u32)),
        (key("feed_forward_length"), Value::U32(shape.ffn as u32)),
        (key("attention.head_count"), Value::U32(shape.heads as u32)),
        (
            key("attention.head_count_kv"),
            Value::U32(shape.kv_heads as u32),
        ),
        (key("attention.layer_norm_rms_epsilon"), Value::F32(1e-5)),
        (key("context_length"), Value::U32(shape.context as u32)),
    ];
    if gemma {
        metadata.extend([
            (key("attention.key_length"), Value::U32(head_dim as u32)),
            (key("attention.sliding_window"), Value::U32(4)),
            (key("attention.sliding_window_pattern"), Value::U32(2)),
            (key("rope.freq_base"), Value::F32(1_000_000.0)),
            (key("rope.freq_base_swa"), Value::F32(10_000.0)),
        ]);
    } else {
        metadata.push((key("rope.freq_base"), Value::F32(10_000.0)));
    }
    if phi3 {
        metadata.push((key("rope.dimension_count"), Value::U32(head_dim as u32)));
    }
    if let Some(window) = shape.sliding_window {
        metadata.push((key("attention.sliding_window"), Value::U32(window as u32)));
    }
    match shape.rope {
        RopeScaling::None => {}
        RopeScaling::Linear {
            factor,
            attn_factor,
        } => metadata.extend([
            (key("rope.scaling.type"), Value::String("linear".into())),
            (key("rope.scaling.factor"), Value::F32(factor)),
            (key("rope.scaling.attn_factor"), Value::F32(attn_factor)),
        ]),
        RopeScaling::Llama3 { factor, original } => {
            let factors = llama3_factors(head_dim, 10_000.0, factor, original);
            let t = Tensor::new(factors, &Device::Cpu)
                .and_then(|t| QTensor::quantize(&t, GgmlDType::F32));
            push("rope_freqs.weight".into(), t)?;
        }
        RopeScaling::LongRope { original } => {
            let scale = shape.context as f32 / original as f32;
            let attn_factor = (1.0 + scale.ln() / (original as f32).ln()).sqrt();
            metadata.extend([
                (
                    key("rope.scaling.original_context_length"),
                    Value::U32(original as u32),
                ),
                (key("rope.scaling.attn_factor"), Value::F32(attn_factor)),
            ]);
            for (name, top) in [("rope_factors_long", 4.0f32), ("rope_factors_short", 1.5)] {
                let v: Vec<f32> = (0..head_dim / 2)
                    .map(|_| rng.random_range(1.0..top))
                    .collect();
                let t = Tensor::new(v, &Device::Cpu)
                    .and_then(|t| QTensor::quantize(&t, GgmlDType::F32));
                push(format!("{name}.weight"), t)?;
            }
        }
        RopeScaling::Yarn { factor, original } => metadata.extend([
            (key("rope.scaling.type"), Value::String("yarn".into())),
            (key("rope.scaling.factor"), Value::F32(factor)),
            (
                key("rope.scaling.original_context_length"),
                Value::U32(original as u32),
            ),
        ]),
    }
    if matches!(shape.family, Family::Qwen3 | Family::Qwen3Moe) {
        metadata.extend([
            (key("attention.key_length"), Value::U32(head_dim as u32)),
            (key("attention.value_length"), Value::U32(head_dim as u32)),
        ]);
    }
    if let Some(e) = experts {
        metadata.extend([
            (key("expert_count"), Value::U32(e.count as u32)),
            (key("expert_used_count"), Value::U32(e.used as u32)),
            (
                key("expert_feed_forward_length"),
                Value::U32(shape.ffn as u32),
            ),
        ]);
    }
    metadata.extend(extra);
    let md: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let ts: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut f = File::create(path)?;
    gguf_file::write(&mut f, &md, &ts).map_err(WriteError::Write)
}
