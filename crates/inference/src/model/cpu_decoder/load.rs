//! Reading a CPU decoder from a GGUF file: which files it runs, and the weights of all of a
//! model's blocks or of a range of them.

use std::io::{Read, Seek};
use std::sync::Mutex;

use candle_core::quantized::gguf_file;
use candle_core::{Device, Result};

use super::moe::{Expert, Moe};
use super::ops::{Activation, Norm};
use super::rope::{RopeScaling, RopeTable};
use super::{Bias, CpuDecoder, Ffn, Layer};
use crate::kernels::{QMatrix, QuantFormat};
use crate::model::linear::RawTensor;
use crate::model::stage::LayerRange;
use crate::model::weights;

/// A bias vector as f32, checked to be one value per output of its projection.
fn bias_vector<R: Read + Seek>(ct: &gguf_file::Content, r: &mut R, name: &str) -> Result<Vec<f32>> {
    let v: Vec<f32> = ct
        .tensor(r, name, &Device::Cpu)?
        .dequantize(&Device::Cpu)?
        .flatten_all()?
        .to_vec1()?;
    let weight = name.replace(".bias", ".weight");
    match ct.tensor_infos.get(&weight) {
        Some(info) if info.shape.dims().first() == Some(&v.len()) => Ok(v),
        _ => candle_core::bail!("{name}: {} values do not match {weight}", v.len()),
    }
}

/// The blocks of `t` for the fused kernels, whether or not this CPU runs their SIMD paths
/// (other backends load models through this decoder too).
fn matrix(t: &RawTensor, name: &str) -> Result<QMatrix> {
    let Some(format) = QuantFormat::from_ggml(t.dtype) else {
        candle_core::bail!(
            "tensor {name} is {}, which pod's fused kernels do not read",
            crate::gpu::check::format_name(t.dtype)
        );
    };
    QMatrix::new(format, t.rows, t.cols, std::sync::Arc::clone(&t.data))
        .map_err(|e| candle_core::Error::Msg(format!("{name}: {e}")))
}

/// `t` cut into consecutive runs of `parts[i]` rows (the parts of a fused projection), each a
/// matrix for the fused kernels in their interleaved layout where the format has one; one
/// part is the whole of `t`, whatever its rows.
fn split_rows(t: &RawTensor, name: &str, parts: &[usize]) -> Result<Vec<QMatrix>> {
    if let [_] = parts {
        return Ok(vec![for_decoder(matrix(t, name)?)]);
    }
    if parts.iter().sum::<usize>() != t.rows || t.rows == 0 {
        candle_core::bail!("{name}: {} rows, not {parts:?}", t.rows);
    }
    let row_bytes = t.data.len() / t.rows;
    let mut at = 0;
    parts
        .iter()
        .map(|&n| {
            let part = RawTensor {
                dtype: t.dtype,
                rows: n,
                cols: t.cols,
                data: t.data[at * row_bytes..(at + n) * row_bytes].to_vec().into(),
            };
            at += n;
            matrix(&part, name).map(for_decoder)
        })
        .collect()
}

/// `m` in the layout the decoder multiplies fastest: interleaved where its format has that
/// layout ([`QMatrix::interleaved`]).
fn for_decoder(m: QMatrix) -> QMatrix {
    m.interleaved()
}

/// The `N` matrices of a split.
fn parts<const N: usize>(v: Vec<QMatrix>) -> Result<[QMatrix; N]> {
    v.try_into()
        .map_err(|v: Vec<QMatrix>| candle_core::Error::Msg(format!("{} parts, not {N}", v.len())))
}

/// The architectures this decoder reads.
pub(crate) const ARCHITECTURES: [&str; 7] = [
    "llama", "mistral", "gemma3", "qwen2", "qwen3", "qwen3moe", "phi3",
];

/// The architectures whose feed-forward is a mixture of experts.
pub(crate) const MIXTURES: [&str; 1] = ["qwen3moe"];

/// The experts of a mixture, each a run of `rows` rows of the layer's stacked tensors `name`
/// (`[experts, rows, cols]`), read in place: the whole stack interleaved when each expert is
/// whole groups of interleaved rows, in GGUF's layout otherwise.
fn expert_views(t: &RawTensor, name: &str, experts: usize) -> Result<Vec<QMatrix>> {
    let rows = t.rows / experts.max(1);
    let all = match matrix(t, name)? {
        m if rows.is_multiple_of(QMatrix::GROUP_ROWS) => for_decoder(m),
        m => m,
    };
    (0..experts)
        .map(|e| {
            all.rows_view(e * rows, rows)
                .map_err(|err| candle_core::Error::Msg(format!("{name}: {err}")))
        })
        .collect()
}

/// Layer `i`'s router and experts, checked against the counts the metadata gives.
fn mixture<R: Read + Seek>(
    ct: &gguf_file::Content,
    r: &mut R,
    i: usize,
    experts: usize,
    used: usize,
    scale: Option<f32>,
) -> Result<Moe> {
    let name = |part: &str| format!("blk.{i}.{part}.weight");
    let router = matrix(
        &weights::raw(ct, r, &name("ffn_gate_inp"))?,
        &name("ffn_gate_inp"),
    )?;
    if router.rows() != experts {
        candle_core::bail!(
            "{}: {} experts, not the {experts} the metadata gives",
            name("ffn_gate_inp"),
            router.rows()
        );
    }
    let mut stacks = Vec::with_capacity(3);
    for part in ["ffn_gate_exps", "ffn_up_exps", "ffn_down_exps"] {
        let (t, n) = weights::raw_stacked(ct, r, &name(part))?;
        if n != experts {
            candle_core::bail!(
                "{}: {n} experts, not the {experts} the metadata gives",
                name(part)
            );
        }
        stacks.push(expert_views(&t, &name(part), experts)?);
    }
    let [gate, up, down]: [Vec<QMatrix>; 3] = stacks
        .try_into()
        .map_err(|_| candle_core::Error::Msg("three expert tensors".into()))?;
    Ok(Moe {
        router,
        experts: gate
            .into_iter()
            .zip(up)
            .zip(down)
            .map(|((gate, up), down)| Expert { gate, up, down })
            .collect(),
        used,
        scale,
    })
}

/// Gemma 3 repeats five local (sliding-window) layers and one global layer.
const GEMMA3_WINDOW_PATTERN: usize = 6;

/// Which of Gemma 3's layers attend through the sliding window, from
/// `attention.sliding_window_pattern`: a number `n` (every layer but each `n`th is local), or
/// one flag per layer (true: local), as llama.cpp reads it.
#[derive(Debug, Clone, PartialEq)]
enum SwaPattern {
    Every(usize),
    Flags(Vec<bool>),
}

impl SwaPattern {
    fn from_gguf(value: Option<&gguf_file::Value>) -> Self {
        match value {
            Some(gguf_file::Value::Array(flags)) => Self::Flags(
                flags
                    .iter()
                    .map(|f| match f {
                        gguf_file::Value::Bool(b) => *b,
                        other => other.to_u32().is_ok_and(|v| v != 0),
                    })
                    .collect(),
            ),
            Some(v) => Self::Every(
                v.to_u32()
                    .map_or(GEMMA3_WINDOW_PATTERN, |n| n as usize)
                    .max(1),
            ),
            None => Self::Every(GEMMA3_WINDOW_PATTERN),
        }
    }

    /// Whether layer `i` is local (windowed).
    fn is_local(&self, i: usize) -> bool {
        match self {
            Self::Every(n) => !(i + 1).is_multiple_of(*n),
            Self::Flags(flags) => flags.get(i).copied().unwrap_or(false),
        }
    }
}
const GEMMA3_LOCAL_ROPE_BASE: f32 = 10_000.0;
const GEMMA3_GLOBAL_ROPE_BASE: f32 = 1_000_000.0;

impl CpuDecoder {
    /// Whether a GGUF decoder can run here: a llama-family, Qwen 2/3 (or 3 MoE), Phi 3 or Gemma 3
    /// model on the CPU (any CPU: the kernels have portable versions where it has no SIMD ones),
    /// every matrix in a format they read, and full-width rotary embeddings. `Err` says, in one
    /// line, why not.
    pub(crate) fn supported(
        ct: &gguf_file::Content,
        arch: &str,
        dev: &Device,
    ) -> std::result::Result<(), String> {
        if !ARCHITECTURES.contains(&arch) {
            return Err(format!("pod's CPU decoder does not read `{arch}` models"));
        }
        if !dev.is_cpu() {
            return Err("the model is not on the CPU".to_owned());
        }
        let md = |k: &str| {
            ct.metadata
                .get(&format!("{arch}.{k}"))
                .and_then(|v| v.to_u32().ok())
        };
        let (Some(n_head), Some(hidden)) = (md("attention.head_count"), md("embedding_length"))
        else {
            return Err(format!(
                "no {arch}.attention.head_count or embedding_length"
            ));
        };
        if n_head == 0 {
            return Err("no attention heads".to_owned());
        }
        let head_dim = md("attention.key_length").unwrap_or(hidden / n_head);
        if head_dim == 0
            || !head_dim.is_multiple_of(2)
            || md("rope.dimension_count").is_some_and(|d| d != head_dim)
            || md("attention.value_length").is_some_and(|d| d != head_dim)
        {
            return Err(format!(
                "heads of {head_dim} values with partial rotary embeddings or other value widths"
            ));
        }
        let mut names: Vec<&String> = ct.tensor_infos.keys().collect();
        names.sort();
        for name in names {
            let info = &ct.tensor_infos[name];
            if info.shape.dims().len() >= 2
                && !name.ends_with("norm.weight")
                && QuantFormat::from_ggml(info.ggml_dtype).is_none()
            {
                return Err(format!(
                    "tensor {name} is {}, which pod's fused kernels do not read",
                    crate::gpu::check::format_name(info.ggml_dtype)
                ));
            }
        }
        Ok(())
    }

    /// The whole model's decoder.
    pub(crate) fn from_gguf<R: Read + Seek>(
        ct: &gguf_file::Content,
        r: &mut R,
        arch: &str,
        max_len: usize,
    ) -> Result<Self> {
        Self::from_gguf_range(ct, r, arch, max_len, None)
    }

    /// The decoder of blocks `range` (all when `None`): only their tensors are read, plus
    /// the embeddings when the range starts at block 0 and the output head when it ends at
    /// the last block.
    pub(crate) fn from_gguf_range<R: Read + Seek>(
        ct: &gguf_file::Content,
        r: &mut R,
        arch: &str,
        max_len: usize,
        range: Option<LayerRange>,
    ) -> Result<Self> {
        let md = |k: &str| {
            ct.metadata
                .get(&format!("{arch}.{k}"))
                .ok_or_else(|| candle_core::Error::Msg(format!("missing {arch}.{k}")))
        };
        let gemma = arch == "gemma3";
        // Per-head RMSNorm of queries and keys: Gemma 3 and Qwen 3.
        let qk_norm = gemma || matches!(arch, "qwen3" | "qwen3moe");
        let qkv_bias = arch == "qwen2";
        // Rotation of halves (NeoX) rather than of interleaved pairs.
        let neox = gemma || matches!(arch, "qwen2" | "qwen3" | "qwen3moe" | "phi3");
        // Experts in each layer, those each row runs through, and the multiplier of their
        // renormalised weights (llama.cpp applies one other than 0 or 1).
        let experts = if MIXTURES.contains(&arch) {
            let n = md("expert_count")?.to_u32()? as usize;
            let used = md("expert_used_count")?.to_u32()? as usize;
            if n == 0 || used == 0 || used > n {
                candle_core::bail!("{used} experts used of {n}");
            }
            let scale = md("expert_weights_scale")
                .and_then(|v| v.to_f32())
                .ok()
                .filter(|&s| s != 0.0 && s != 1.0);
            Some((n, used, scale))
        } else {
            None
        };
        let phi3 = arch == "phi3";
        let fused_qkv = |i: usize| {
            ct.tensor_infos
                .contains_key(&format!("blk.{i}.attn_qkv.weight"))
        };
        let n_head = md("attention.head_count")?.to_u32()? as usize;
        let n_kv_head = md("attention.head_count_kv")
            .and_then(|v| v.to_u32())
            .map_or(n_head, |v| v as usize);
        if n_kv_head == 0 || !n_head.is_multiple_of(n_kv_head) {
            candle_core::bail!("{n_head} attention heads cannot share {n_kv_head} KV heads");
        }
        let blocks = md("block_count")?.to_u32()? as usize;
        let hidden = md("embedding_length")?.to_u32()? as usize;
        let head_dim = md("attention.key_length")
            .and_then(|v| v.to_u32())
            .map_or(hidden / n_head.max(1), |v| v as usize);
        let eps = md("attention.layer_norm_rms_epsilon")?.to_f32()?;
        // Rows of each half of Phi 3's fused gate/up projection.
        let ffn = if phi3 {
            md("feed_forward_length")?.to_u32()? as usize
        } else {
            0
        };
        let (ropes, window, pattern) = if gemma {
            let global = md("rope.freq_base")
                .and_then(|v| v.to_f32())
                .unwrap_or(GEMMA3_GLOBAL_ROPE_BASE);
            // llama.cpp's keys first, then the names candle's Gemma 3 reads.
            let local = md("rope.freq_base_swa")
                .or_else(|_| md("rope.local_freq_base"))
                .and_then(|v| v.to_f32())
                .unwrap_or(GEMMA3_LOCAL_ROPE_BASE);
            let window = md("attention.sliding_window")?.to_u32()? as usize;
            let pattern = SwaPattern::from_gguf(
                md("attention.sliding_window_pattern")
                    .or_else(|_| md("attention.sliding_window_type"))
                    .ok(),
            );
            // A declared scaling (Gemma 3 4B and larger: linear, factor 8) stretches the
            // global layers' rotations only; local layers keep plain RoPE, as in llama.cpp.
            let scaling = RopeScaling::from_gguf(ct, r, arch, head_dim, global, max_len)?;
            if !scaling.is_plain() {
                tracing::debug!(
                    architecture = arch,
                    ?scaling,
                    "scaled global rotary embeddings"
                );
            }
            (
                vec![
                    RopeTable::new(head_dim, local),
                    RopeTable::scaled(head_dim, global, &scaling),
                ],
                Some(window),
                pattern,
            )
        } else {
            let base = md("rope.freq_base")
                .and_then(|v| v.to_f32())
                .unwrap_or(10_000.0);
            let scaling = RopeScaling::from_gguf(ct, r, arch, head_dim, base, max_len)?;
            if !scaling.is_plain() {
                tracing::debug!(architecture = arch, ?scaling, "scaled rotary embeddings");
            }
            // Mistral's sliding window, on every layer, where a llama or mistral GGUF declares
            // one. (llama.cpp b11434 ignores the key for llama and disables Phi 3's on purpose,
            // which pod follows for Phi 3.)
            let window = if matches!(arch, "llama" | "mistral") {
                md("attention.sliding_window")
                    .and_then(|v| v.to_u32())
                    .ok()
                    .filter(|&w| w > 0)
                    .map(|w| w as usize)
            } else {
                None
            };
            (
                vec![RopeTable::scaled(head_dim, base, &scaling)],
                window,
                SwaPattern::Every(1),
            )
        };

        let range = range.unwrap_or(LayerRange {
            start: 0,
            end: blocks,
        });
        if range.start >= range.end || range.end > blocks {
            candle_core::bail!("blocks {range} are not within the model's {blocks}");
        }
        let tied = !ct.tensor_infos.contains_key("output.weight");
        let first = range.start == 0;
        let last = range.end == blocks;
        let embed = if first || (last && tied) {
            Some(matrix(
                &weights::raw(ct, r, "token_embd.weight")?,
                "token_embd.weight",
            )?)
        } else {
            None
        };
        let head = if last {
            let output = match &embed {
                Some(e) if tied => e.clone(),
                _ => matrix(&weights::raw(ct, r, "output.weight")?, "output.weight")?,
            };
            Some((Norm::load(ct, r, "output_norm.weight", eps)?, output))
        } else {
            None
        };
        let embed = if first { embed } else { None };
        let mut layers = Vec::with_capacity(range.len());
        for i in range.start..range.end {
            let mut m = |name: &str, parts: &[usize]| {
                let full = format!("blk.{i}.{name}.weight");
                split_rows(&weights::raw(ct, r, &full)?, &full, parts)
            };
            let (q_w, kv_w) = (n_head * head_dim, n_kv_head * head_dim);
            // Phi 3 fuses q, k and v into one matrix (where its converter did), and the
            // feed-forward gate and up into `ffn_up`, the gate's rows first.
            let (wq, wk, wv) = if fused_qkv(i) {
                let [q, k, v] = parts(m("attn_qkv", &[q_w, kv_w, kv_w])?)?;
                (q, k, v)
            } else {
                let [q] = parts(m("attn_q", &[q_w])?)?;
                let [k] = parts(m("attn_k", &[kv_w])?)?;
                let [v] = parts(m("attn_v", &[kv_w])?)?;
                (q, k, v)
            };
            let [wo] = parts(m("attn_output", &[hidden])?)?;
            let ffn = if let Some((n, used, scale)) = experts {
                Ffn::Experts(mixture(ct, r, i, n, used, scale)?)
            } else if phi3 {
                let [gate, up] = parts(m("ffn_up", &[ffn, ffn])?)?;
                let [down] = parts(m("ffn_down", &[hidden])?)?;
                Ffn::Dense { gate, up, down }
            } else {
                let [gate] = parts(m("ffn_gate", &[ffn])?)?;
                let [up] = parts(m("ffn_up", &[ffn])?)?;
                let [down] = parts(m("ffn_down", &[hidden])?)?;
                Ffn::Dense { gate, up, down }
            };
            // Gemma 3's local layers; every layer of a model with a window otherwise.
            let local = !gemma || pattern.is_local(i);
            let bias = if qkv_bias {
                let mut b = |name: &str| bias_vector(ct, r, &format!("blk.{i}.{name}.bias"));
                Some(Bias {
                    q: b("attn_q")?,
                    k: b("attn_k")?,
                    v: b("attn_v")?,
                })
            } else {
                None
            };
            let mut norm = |name: &str| Norm::load(ct, r, &format!("blk.{i}.{name}.weight"), eps);
            layers.push(Layer {
                attn_norm: norm("attn_norm")?,
                ffn_norm: norm("ffn_norm")?,
                q_norm: qk_norm.then(|| norm("attn_q_norm")).transpose()?,
                k_norm: qk_norm.then(|| norm("attn_k_norm")).transpose()?,
                post_attn_norm: gemma.then(|| norm("post_attention_norm")).transpose()?,
                post_ffn_norm: gemma.then(|| norm("post_ffw_norm")).transpose()?,
                bias,
                window: if local { window } else { None },
                rope: usize::from(gemma && !local),
                wq,
                wk,
                wv,
                wo,
                ffn,
            });
        }
        Ok(Self {
            embed,
            embed_scale: gemma.then(|| (hidden as f64).sqrt() as f32),
            layers,
            head,
            range,
            ropes,
            max_len,
            hidden,
            n_head,
            n_kv_head,
            head_dim,
            neox,
            activation: if gemma {
                Activation::Gelu
            } else {
                Activation::Silu
            },
            scratch: Mutex::default(),
        })
    }
}

#[cfg(test)]
mod tests {
    use candle_core::quantized::GgmlDType;

    use super::*;
    use crate::gpu::synthetic::{self, shapes};
    use crate::model::ChatModel;

    fn content(path: &std::path::Path) -> gguf_file::Content {
        let mut f = std::fs::File::open(path).unwrap();
        gguf_file::Content::read(&mut f).unwrap()
    }

    /// Gemma 3's window pattern is read as llama.cpp reads it: a number `n` makes every `n`th
    /// layer global, an array flags each layer, and none means every 6th.
    #[test]
    fn window_patterns_are_a_period_or_one_flag_per_layer() {
        use gguf_file::Value;
        let every = SwaPattern::from_gguf(Some(&Value::U32(2)));
        assert_eq!(
            (0..4).map(|i| every.is_local(i)).collect::<Vec<_>>(),
            [true, false, true, false]
        );
        let default = SwaPattern::from_gguf(None);
        assert_eq!((0..6).filter(|&i| default.is_local(i)).count(), 5);
        assert!(!default.is_local(5));
        let flags = SwaPattern::from_gguf(Some(&Value::Array(vec![
            Value::Bool(false),
            Value::Bool(true),
        ])));
        assert_eq!(
            (0..3).map(|i| flags.is_local(i)).collect::<Vec<_>>(),
            [false, true, false]
        );
    }

    /// Each format added to the fused kernels runs a whole model on the decoder, and a
    /// prompt fed at once ends on the same logits, to the bit, as fed one token at a time.
    #[test]
    fn new_formats_run_on_the_decoder_whatever_the_batch() {
        let dir = tempfile::tempdir().unwrap();
        for format in [
            "q2_k", "q3_k", "q5_1", "q5_k", "q5_k_m", "f16", "bf16", "f32",
        ] {
            let path = dir.path().join(format!("{format}.gguf"));
            synthetic::write_chat_model(&path, 3, &shapes::shape("tiny", format).unwrap()).unwrap();
            assert_eq!(
                CpuDecoder::supported(&content(&path), "llama", &Device::Cpu),
                Ok(())
            );
            let model = ChatModel::load(&path, &Device::Cpu).unwrap();
            assert_eq!(model.runs_on(), "cpu", "{format}");
            let prompt = [1u32, 40, 300, 7, 7, 511];
            let whole = model.new_sequence().forward(&prompt).unwrap();
            let mut seq = model.new_sequence();
            let mut last = Vec::new();
            for t in prompt {
                last = seq.forward(&[t]).unwrap();
            }
            assert_eq!(whole, last, "{format}");
            assert!(whole.iter().all(|v| v.is_finite()), "{format}");
        }
    }

    /// Qwen 3 MoE runs on the decoder, and a sequence's logits are the same bits fed at once,
    /// token by token, and batched with another sequence whose rows route elsewhere.
    #[test]
    fn qwen3moe_runs_on_the_decoder_whatever_the_batch() {
        let dir = tempfile::tempdir().unwrap();
        for format in ["q8_0", "q4_k_m"] {
            let path = dir.path().join(format!("moe-{format}.gguf"));
            let shape = shapes::shape("tiny-qwen3moe", format).unwrap();
            synthetic::write_chat_model(&path, 2, &shape).unwrap();
            assert_eq!(
                CpuDecoder::supported(&content(&path), "qwen3moe", &Device::Cpu),
                Ok(())
            );
            let model = ChatModel::load(&path, &Device::Cpu).unwrap();
            assert_eq!(model.runs_on(), "cpu", "{format}");
            assert_eq!(model.info().architecture, "qwen3moe");
            let prompt = [1u32, 40, 300, 7, 7, 511, 90];
            let other = [3u32, 200, 17, 450, 88];
            let whole = model.new_sequence().forward(&prompt).unwrap();
            let mut seq = model.new_sequence();
            let mut last = Vec::new();
            for t in prompt {
                last = seq.forward(&[t]).unwrap();
            }
            assert_eq!(whole, last, "{format}");
            let (mut a, mut b) = (model.new_sequence(), model.new_sequence());
            let both = model
                .forward_batch(&mut [&mut a, &mut b], &[&prompt, &other])
                .unwrap();
            assert_eq!(both[0], whole, "{format}");
            assert_eq!(both[1], model.new_sequence().forward(&other).unwrap());
            assert!(whole.iter().all(|v| v.is_finite()), "{format}");
            assert_ne!(whole, both[1]);
        }
    }

    /// A tensor in a format the kernels do not read sends the model to candle, with one line
    /// naming the tensor and its type.
    #[test]
    fn an_unread_tensor_type_is_named_and_the_model_runs_on_candle() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("q8_1.gguf");
        let mut shape = shapes::shape("tiny", "q8_0").unwrap();
        shape.layer_formats[1][5] = GgmlDType::Q8_1;
        synthetic::write_chat_model(&path, 3, &shape).unwrap();
        let why = CpuDecoder::supported(&content(&path), "llama", &Device::Cpu).unwrap_err();
        assert_eq!(
            why,
            "tensor blk.1.ffn_up.weight is Q8_1, which pod's fused kernels do not read"
        );
        let model = ChatModel::load(&path, &Device::Cpu).unwrap();
        assert!(model.runs_on().starts_with("candle"), "{}", model.runs_on());
        let logits = model.new_sequence().forward(&[1, 40, 300]).unwrap();
        assert!(logits.iter().all(|v| v.is_finite()));
    }
}
