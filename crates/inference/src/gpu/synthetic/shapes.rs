//! Named model shapes and weight formats for synthetic models: the shapes of models people
//! run (Llama 3.2 1B, Llama 3.1 8B, Qwen 2.5 1.5B, Qwen3 30B-A3B's layers) and tiny ones
//! for tests, in the formats GGUF files come in, so that speed at realistic sizes is
//! measured without a download.

use candle_core::quantized::GgmlDType;

use super::{Experts, Family, ModelShape, RopeScaling};

/// A named shape: its sizes, before formats are chosen.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct NamedShape {
    /// The name `--shape` takes.
    pub name: &'static str,
    /// What it is the shape of.
    pub about: &'static str,
    family: Family,
    hidden: usize,
    heads: usize,
    kv_heads: usize,
    ffn: usize,
    vocab: usize,
    layers: usize,
    context: usize,
    rope: RopeScaling,
    sliding_window: Option<usize>,
    /// Width of an attention head where it is not `hidden / heads`.
    head_width: Option<usize>,
    /// A mixture of experts per layer; `ffn` is then each expert's width.
    experts: Option<Experts>,
}

/// Two llama layers at the smallest width the 256-value formats allow: a few MB.
const TINY: NamedShape = NamedShape {
    name: "tiny",
    about: "llama, 2 layers, hidden 256: a few MB, for tests",
    family: Family::Llama,
    hidden: 256,
    heads: 4,
    kv_heads: 2,
    ffn: 512,
    vocab: 512,
    layers: 2,
    context: 1024,
    rope: RopeScaling::None,
    sliding_window: None,
    head_width: None,
    experts: None,
};

/// Every named shape.
pub const SHAPES: [NamedShape; 16] = [
    TINY,
    NamedShape {
        name: "llama-1b",
        about: "Llama 3.2 1B: 16 layers, hidden 2048, 128k vocabulary",
        family: Family::Llama,
        hidden: 2048,
        heads: 32,
        kv_heads: 8,
        ffn: 8192,
        vocab: 128_256,
        layers: 16,
        context: 8192,
        ..TINY
    },
    NamedShape {
        name: "llama-8b",
        about: "Llama 3.1 8B: 32 layers, hidden 4096, 128k vocabulary",
        family: Family::Llama,
        hidden: 4096,
        heads: 32,
        kv_heads: 8,
        ffn: 14_336,
        vocab: 128_256,
        layers: 32,
        context: 8192,
        ..TINY
    },
    NamedShape {
        name: "tiny-qwen2",
        about: "qwen2 (q/k/v biases), 2 layers, hidden 256, for tests",
        family: Family::Qwen2,
        ..TINY
    },
    NamedShape {
        name: "tiny-qwen3",
        about: "qwen3 (q/k norms), 2 layers, hidden 256, for tests",
        family: Family::Qwen3,
        ..TINY
    },
    NamedShape {
        name: "qwen2-1.5b",
        about: "Qwen2.5 1.5B: 28 layers, hidden 1536, 152k vocabulary",
        family: Family::Qwen2,
        hidden: 1536,
        heads: 12,
        kv_heads: 2,
        ffn: 8960,
        vocab: 151_936,
        layers: 28,
        context: 8192,
        ..TINY
    },
    NamedShape {
        name: "tiny-linear",
        about: "llama with linear rope scaling (factor 4, attention factor 1.1), for tests",
        rope: RopeScaling::Linear {
            factor: 4.0,
            attn_factor: 1.1,
        },
        ..TINY
    },
    NamedShape {
        name: "tiny-llama3",
        about: "llama with Llama 3 frequency scaling (rope_freqs, factor 8 over 32), for tests",
        rope: RopeScaling::Llama3 {
            factor: 8.0,
            original: 32,
        },
        ..TINY
    },
    NamedShape {
        name: "tiny-yarn",
        about: "llama with YaRN rope scaling (factor 4 over 256), for tests",
        rope: RopeScaling::Yarn {
            factor: 4.0,
            original: 256,
        },
        ..TINY
    },
    NamedShape {
        name: "tiny-mistral-swa",
        about: "llama with a sliding window of 8 (as Mistral 7B v0.1), 1 layer, for tests",
        layers: 1,
        sliding_window: Some(8),
        ..TINY
    },
    NamedShape {
        name: "tiny-phi3",
        about: "phi3 (fused qkv and gate/up, a declared sliding window of 8), for tests",
        family: Family::Phi3,
        sliding_window: Some(8),
        ..TINY
    },
    NamedShape {
        name: "tiny-phi3-longrope",
        about: "phi3 with long/short rope factors over an original context of 256, for tests",
        family: Family::Phi3,
        rope: RopeScaling::LongRope { original: 256 },
        sliding_window: Some(8),
        ..TINY
    },
    NamedShape {
        name: "tiny-gemma3-linear",
        about: "gemma3 with linear rope scaling (factor 8) on its global layers, as Gemma 3 4B \
                and larger declare, for tests",
        family: Family::Gemma3,
        rope: RopeScaling::Linear {
            factor: 8.0,
            attn_factor: 1.0,
        },
        ..TINY
    },
    NamedShape {
        name: "tiny-qwen3moe",
        about: "qwen3moe, 2 layers, hidden 256, 8 experts of width 256, 2 used, for tests",
        family: Family::Qwen3Moe,
        ffn: 256,
        experts: Some(Experts { count: 8, used: 2 }),
        ..TINY
    },
    NamedShape {
        name: "qwen3moe-30b-a3b",
        about: "Qwen3 30B-A3B's layers (hidden 2048, 32 query and 4 KV heads of 128, 128 \
                experts of width 768, 8 used, 152k vocabulary), 4 of its 48: benchmarks",
        family: Family::Qwen3Moe,
        hidden: 2048,
        heads: 32,
        kv_heads: 4,
        ffn: 768,
        vocab: 151_936,
        layers: 4,
        context: 8192,
        head_width: Some(128),
        experts: Some(Experts {
            count: 128,
            used: 8,
        }),
        ..TINY
    },
    NamedShape {
        name: "tiny-long",
        about: "llama, 1 layer, hidden 256, 4 heads sharing 1 KV head, a 32k context: \
                long-context tests",
        kv_heads: 1,
        layers: 1,
        context: 32_768,
        ..TINY
    },
];

/// The formats `--format` takes: one GGUF type everywhere, or `q4_k_m` / `q5_k_m`,
/// llama.cpp's mixes (Q6_K for the output head and for the value and down projections of
/// every other layer, Q4_K or Q5_K elsewhere).
pub const FORMATS: [&str; 15] = [
    "q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "q2_k", "q3_k", "q4_k", "q5_k", "q6_k", "f16", "bf16",
    "f32", "q4_k_m", "q5_k_m",
];

fn dtype(format: &str) -> Option<GgmlDType> {
    Some(match format {
        "q4_0" => GgmlDType::Q4_0,
        "q4_1" => GgmlDType::Q4_1,
        "q5_0" => GgmlDType::Q5_0,
        "q5_1" => GgmlDType::Q5_1,
        "q8_0" => GgmlDType::Q8_0,
        "q2_k" => GgmlDType::Q2K,
        "q3_k" => GgmlDType::Q3K,
        "q4_k" | "q4_k_m" => GgmlDType::Q4K,
        "q5_k" | "q5_k_m" => GgmlDType::Q5K,
        "q6_k" => GgmlDType::Q6K,
        "f16" => GgmlDType::F16,
        "bf16" => GgmlDType::BF16,
        "f32" => GgmlDType::F32,
        _ => return None,
    })
}

/// The model of shape `name` in `format`, or why there is none.
pub fn shape(name: &str, format: &str) -> Result<ModelShape, String> {
    let s = SHAPES.iter().find(|s| s.name == name).ok_or_else(|| {
        let names: Vec<_> = SHAPES.iter().map(|s| s.name).collect();
        format!("unknown shape `{name}` (known: {})", names.join(", "))
    })?;
    let format = format.to_ascii_lowercase();
    let main = dtype(&format)
        .ok_or_else(|| format!("unknown format `{format}` (known: {})", FORMATS.join(", ")))?;
    let mixed = format.ends_with("_k_m");
    let layer_formats = (0..s.layers)
        .map(|i| {
            let mut f = [main; 7];
            if mixed && i % 2 == 0 {
                // attn_v and ffn_down, in PROJECTIONS order.
                f[2] = GgmlDType::Q6K;
                f[6] = GgmlDType::Q6K;
            }
            f
        })
        .collect();
    Ok(ModelShape {
        family: s.family,
        hidden: s.hidden,
        heads: s.heads,
        kv_heads: s.kv_heads,
        ffn: s.ffn,
        vocab: s.vocab,
        context: s.context,
        embedding: main,
        output: Some(if mixed { GgmlDType::Q6K } else { main }),
        layer_formats,
        rope: s.rope,
        sliding_window: s.sliding_window,
        head_width: s.head_width,
        experts: s.experts,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_shapes_and_formats_and_refuses_others() {
        let m = shape("llama-8b", "Q4_K_M").unwrap();
        assert_eq!((m.hidden, m.layer_formats.len()), (4096, 32));
        assert_eq!(m.layer_formats[0][2], GgmlDType::Q6K);
        assert_eq!(m.layer_formats[1][2], GgmlDType::Q4K);
        assert_eq!(m.output, Some(GgmlDType::Q6K));
        let m = shape("tiny", "q5_k_m").unwrap();
        assert_eq!(m.layer_formats[0][2], GgmlDType::Q6K);
        assert_eq!(m.layer_formats[1][2], GgmlDType::Q5K);
        assert_eq!(shape("tiny", "BF16").unwrap().embedding, GgmlDType::BF16);
        assert!(shape("llama-2b", "q4_0")
            .unwrap_err()
            .contains("unknown shape"));
        assert_eq!(shape("tiny-qwen3", "q8_0").unwrap().family, Family::Qwen3);
        let moe = shape("qwen3moe-30b-a3b", "q4_k_m").unwrap();
        assert_eq!((moe.head_dim(), moe.heads * moe.head_dim()), (128, 4096));
        assert_eq!(
            moe.experts,
            Some(Experts {
                count: 128,
                used: 8
            })
        );
        assert!(shape("tiny", "iq4_xs")
            .unwrap_err()
            .contains("unknown format"));
        for s in SHAPES {
            assert_eq!(
                s.hidden % 256,
                0,
                "{}: K-quants need whole super-blocks",
                s.name
            );
        }
    }
}
