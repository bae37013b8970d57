//! Loading a model onto the device: the weights read through the CPU decoder's GGUF loading,
//! then uploaded once, every matrix in its GGUF blocks, norms and RoPE tables as f32. A
//! mixture's experts go up as the GGUF stacks them: one buffer per tensor, expert after
//! expert, so that a kernel finds expert `e`'s rows at `e × width`.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use super::memory::{Demand, MemoryNeed};
use super::workspace::Buffers;
use super::{GpuDecoder, GpuLoadError};
use crate::error::LoadError;
use crate::gguf::GgufFile;
use crate::gpu::kernels::WeightFormat;
use crate::gpu::runtime::{DeviceBuffer, DeviceRuntime, RuntimeError};
use crate::kernels::QMatrix;
use crate::model::cpu_decoder::{CpuDecoder, DecoderView, ExpertsView, FfnView, ARCHITECTURES};

/// A weight matrix in device memory, in its GGUF blocks.
pub(super) struct GpuMatrix<R: DeviceRuntime> {
    pub(super) buf: DeviceBuffer<R>,
    pub(super) format: WeightFormat,
    pub(super) rows: usize,
    pub(super) cols: usize,
}

impl<R: DeviceRuntime> GpuMatrix<R> {
    fn upload(runtime: &Arc<R>, m: &QMatrix) -> Result<Self, RuntimeError> {
        Ok(Self {
            buf: DeviceBuffer::from_slice(runtime, &m.gguf_blocks()[..])?,
            format: WeightFormat::of(m.format()).ok_or(RuntimeError::Format(m.format()))?,
            rows: m.rows(),
            cols: m.cols(),
        })
    }

    /// `parts`, matrices of one format and width, stacked row after row into one buffer
    /// (uploaded one by one: no host copy of the whole).
    fn upload_stacked(runtime: &Arc<R>, parts: &[&QMatrix]) -> Result<Self, RuntimeError> {
        let Some(first) = parts.first() else {
            return Err(RuntimeError::Alloc {
                bytes: 0,
                reason: "a mixture with no experts".into(),
            });
        };
        let format = first.format();
        let gpu_format = WeightFormat::of(format).ok_or(RuntimeError::Format(format))?;
        let (rows, cols) = (first.rows(), first.cols());
        if parts
            .iter()
            .any(|p| p.format() != format || p.rows() != rows || p.cols() != cols)
        {
            return Err(RuntimeError::Alloc {
                bytes: 0,
                reason: "experts of different shapes or formats".into(),
            });
        }
        let part_bytes = rows * super::launch::weight_row_bytes(gpu_format, cols);
        let mut buf = DeviceBuffer::new(runtime, parts.len() * part_bytes)?;
        for (i, p) in parts.iter().enumerate() {
            buf.upload(i * part_bytes, &p.gguf_blocks()[..])?;
        }
        Ok(Self {
            buf,
            format: gpu_format,
            rows: parts.len() * rows,
            cols,
        })
    }
}

/// A layer's feed-forward on the device.
pub(super) enum GpuFfn<R: DeviceRuntime> {
    /// One gated feed-forward every row runs through.
    Dense {
        gate: GpuMatrix<R>,
        up: GpuMatrix<R>,
        down: GpuMatrix<R>,
    },
    /// A router and experts (Qwen 3 MoE).
    Experts(GpuExperts<R>),
}

/// A mixture of experts on the device.
pub(super) struct GpuExperts<R: DeviceRuntime> {
    /// `[count, hidden]`: one score per expert for each row.
    pub(super) router: GpuMatrix<R>,
    /// Every expert's gate, up and down, stacked: expert `e`'s rows start at row `e × width`
    /// (`width` the expert's, i.e. `rows / count`).
    pub(super) gate: GpuMatrix<R>,
    pub(super) up: GpuMatrix<R>,
    pub(super) down: GpuMatrix<R>,
    /// Experts.
    pub(super) count: usize,
    /// Experts each row runs through.
    pub(super) used: usize,
    /// Multiplier of the renormalised weights (1 where the GGUF gives none).
    pub(super) scale: f32,
}

impl<R: DeviceRuntime> GpuExperts<R> {
    fn upload(runtime: &Arc<R>, e: &ExpertsView<'_>) -> Result<Self, RuntimeError> {
        Ok(Self {
            router: GpuMatrix::upload(runtime, e.router)?,
            gate: GpuMatrix::upload_stacked(runtime, &e.gate)?,
            up: GpuMatrix::upload_stacked(runtime, &e.up)?,
            down: GpuMatrix::upload_stacked(runtime, &e.down)?,
            count: e.gate.len(),
            used: e.used,
            scale: e.scale.unwrap_or(1.0),
        })
    }
}

/// One block's weights on the device.
pub(super) struct GpuLayer<R: DeviceRuntime> {
    pub(super) attn_norm: DeviceBuffer<R>,
    pub(super) ffn_norm: DeviceBuffer<R>,
    pub(super) q_norm: Option<DeviceBuffer<R>>,
    pub(super) k_norm: Option<DeviceBuffer<R>>,
    pub(super) post_attn_norm: Option<DeviceBuffer<R>>,
    pub(super) post_ffn_norm: Option<DeviceBuffer<R>>,
    /// Qwen 2: query, key and value biases.
    pub(super) bias: Option<[DeviceBuffer<R>; 3]>,
    /// Positions attended to (0: all).
    pub(super) window: usize,
    /// Index of its tables in [`GpuDecoder::ropes`].
    pub(super) rope: usize,
    pub(super) wq: GpuMatrix<R>,
    pub(super) wk: GpuMatrix<R>,
    pub(super) wv: GpuMatrix<R>,
    pub(super) wo: GpuMatrix<R>,
    pub(super) ffn: GpuFfn<R>,
}

/// Sizes of the model.
#[derive(Debug, Clone, Copy)]
pub(super) struct Shape {
    pub(super) max_len: usize,
    pub(super) hidden: usize,
    pub(super) n_head: usize,
    pub(super) n_kv_head: usize,
    pub(super) head_dim: usize,
    /// Values of a feed-forward's inner rows (an expert's, in a mixture).
    pub(super) ffn: usize,
    /// Inner rows per row: 1, or the experts each row runs through in a mixture.
    pub(super) ffn_per_row: usize,
    /// Experts of a mixture (0 for a dense feed-forward).
    pub(super) experts: usize,
    pub(super) vocab: usize,
    pub(super) neox: bool,
    pub(super) gelu: bool,
    pub(super) eps: f32,
    pub(super) embed_scale: f32,
}

impl Shape {
    pub(super) fn q_w(&self) -> usize {
        self.n_head * self.head_dim
    }

    pub(super) fn kv_w(&self) -> usize {
        self.n_kv_head * self.head_dim
    }
}

impl<R: DeviceRuntime> GpuDecoder<R> {
    /// Loads the GGUF decoder at `path` (any architecture of the CPU decoder, every matrix in
    /// a format the GPU kernels read) onto `runtime`, for contexts of up to `max_len` tokens (fewer
    /// when the model was trained on fewer).
    pub fn load(runtime: Arc<R>, path: &Path, max_len: usize) -> Result<Self, GpuLoadError> {
        let GgufFile {
            content,
            mut reader,
            ..
        } = GgufFile::open(path)?;
        let arch = match content.metadata.get("general.architecture") {
            Some(v) => v.to_string().map_err(GpuLoadError::Weights)?.clone(),
            None => {
                return Err(LoadError::Metadata {
                    key: "general.architecture".into(),
                }
                .into())
            }
        };
        if !gpu_runs(&arch) {
            return Err(GpuLoadError::Architecture(arch));
        }
        let trained = content
            .metadata
            .get(&format!("{arch}.context_length"))
            .and_then(|v| v.to_u32().ok())
            .map_or(max_len, |v| v as usize);
        let cpu = CpuDecoder::from_gguf(&content, &mut reader, &arch, max_len.min(trained))
            .map_err(GpuLoadError::Weights)?;
        Ok(Self::upload(runtime, &whole(&cpu)?)?)
    }

    /// Reads the weights of an opened GGUF decoder (`arch`: one the CPU decoder reads) for
    /// contexts of `max_len` tokens and uploads them if the device has room for them and for
    /// what `demand` will ask; otherwise fails with [`GpuLoadError::Memory`], having allocated
    /// nothing on the device.
    pub(crate) fn load_within<Rd: std::io::Read + std::io::Seek>(
        runtime: Arc<R>,
        content: &candle_core::quantized::gguf_file::Content,
        reader: &mut Rd,
        arch: &str,
        max_len: usize,
        demand: Demand,
    ) -> Result<(Self, MemoryNeed), GpuLoadError> {
        if !gpu_runs(arch) {
            return Err(GpuLoadError::Architecture(arch.to_owned()));
        }
        let mut cpu =
            CpuDecoder::from_gguf(content, reader, arch, max_len).map_err(GpuLoadError::Weights)?;
        let mut need = MemoryNeed::of(&whole(&cpu)?, demand);
        let free = runtime.free_memory()?;
        if need.total() > free && demand.fit_context {
            // No context was asked for: serve the longest one the device holds, as a model's
            // trained context (128k for Llama 3.x) rarely fits beside its weights.
            if let Some(fits) = need.context_within(free, cpu.kv_bytes_per_token(), demand) {
                tracing::warn!(
                    trained = need.context,
                    context = fits,
                    free = %super::memory::gib(free),
                    "the device holds fewer positions than the model's context for every \
                     sequence at once: its context is cut (set --ctx-size or --max-batch to \
                     choose)"
                );
                cpu.limit_context(fits);
                need = MemoryNeed::of(&whole(&cpu)?, demand);
            }
        }
        if need.total() > free {
            return Err(GpuLoadError::Memory { need, free });
        }
        let view = whole(&cpu)?;
        Ok((Self::upload(runtime, &view)?, need))
    }

    /// Uploads a model the CPU decoder loaded.
    pub(crate) fn upload(runtime: Arc<R>, m: &DecoderView<'_>) -> Result<Self, RuntimeError> {
        static IDS: AtomicU64 = AtomicU64::new(0);
        let rt = &runtime;
        let f32s = |v: &[f32]| DeviceBuffer::from_slice(rt, v);
        let opt = |v: Option<&[f32]>| v.map(f32s).transpose();
        let mut layers = Vec::with_capacity(m.layers.len());
        for l in &m.layers {
            layers.push(GpuLayer {
                attn_norm: f32s(l.attn_norm)?,
                ffn_norm: f32s(l.ffn_norm)?,
                q_norm: opt(l.q_norm)?,
                k_norm: opt(l.k_norm)?,
                post_attn_norm: opt(l.post_attn_norm)?,
                post_ffn_norm: opt(l.post_ffn_norm)?,
                bias: match l.bias {
                    Some(b) => Some([f32s(&b.q)?, f32s(&b.k)?, f32s(&b.v)?]),
                    None => None,
                },
                window: l.window.unwrap_or(0),
                rope: l.rope,
                wq: GpuMatrix::upload(rt, l.wq)?,
                wk: GpuMatrix::upload(rt, l.wk)?,
                wv: GpuMatrix::upload(rt, l.wv)?,
                wo: GpuMatrix::upload(rt, l.wo)?,
                ffn: match &l.ffn {
                    FfnView::Dense { gate, up, down } => GpuFfn::Dense {
                        gate: GpuMatrix::upload(rt, gate)?,
                        up: GpuMatrix::upload(rt, up)?,
                        down: GpuMatrix::upload(rt, down)?,
                    },
                    FfnView::Experts(e) => GpuFfn::Experts(GpuExperts::upload(rt, e)?),
                },
            });
        }
        let tied = Arc::ptr_eq(m.output.data(), m.embed.data());
        let output = if tied {
            None
        } else {
            Some(GpuMatrix::upload(rt, m.output)?)
        };
        let mut ropes = Vec::with_capacity(m.ropes.len());
        for (cos, sin) in &m.ropes {
            ropes.push((f32s(cos)?, f32s(sin)?));
        }
        let shape = Shape {
            max_len: m.max_len,
            hidden: m.hidden,
            n_head: m.n_head,
            n_kv_head: m.n_kv_head,
            head_dim: m.head_dim,
            // The widest layer's, should layers differ.
            ffn: m.layers.iter().map(|l| l.ffn.width()).max().unwrap_or(0),
            ffn_per_row: m.layers.iter().map(|l| l.ffn.per_row()).max().unwrap_or(1),
            experts: m
                .layers
                .iter()
                .map(|l| match &l.ffn {
                    FfnView::Dense { .. } => 0,
                    FfnView::Experts(e) => e.gate.len(),
                })
                .max()
                .unwrap_or(0),
            vocab: m.output.rows(),
            neox: m.neox,
            gelu: m.gelu,
            eps: m.eps,
            embed_scale: m.embed_scale.unwrap_or(1.0),
        };
        Ok(Self {
            embed: GpuMatrix::upload(rt, m.embed)?,
            norm: f32s(m.norm)?,
            layers,
            output,
            ropes,
            shape,
            id: IDS.fetch_add(1, Ordering::Relaxed),
            buffers: Mutex::new(Buffers {
                rows: None,
                outputs: None,
            }),
            runtime,
        })
    }
}

/// Whether the GPU decoder runs `arch`: every architecture of the CPU decoder.
fn gpu_runs(arch: &str) -> bool {
    ARCHITECTURES.contains(&arch)
}

/// The pieces of a decoder of the whole model (the GPU runs whole models only).
fn whole(cpu: &CpuDecoder) -> Result<DecoderView<'_>, GpuLoadError> {
    cpu.view().ok_or_else(|| {
        GpuLoadError::Weights(candle_core::Error::Msg(
            "the GPU decoder runs whole models, not pipeline stages".into(),
        ))
    })
}
