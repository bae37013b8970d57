//! The llama family and Gemma 3 on a GPU runtime: the CPU decoder's forward pass
//! (`model/cpu_decoder.rs`), step for step, as kernel launches over device memory.
//!
//! Loading goes through the CPU decoder's GGUF reading, then uploads once: every matrix in its
//! GGUF blocks, norms as f32, the RoPE tables. Each sequence's keys and values live in device
//! memory behind its [`GpuCache`].
//!
//! A pass over rows of many sequences runs: embed → per layer (rms_norm → quantise → q/k/v
//! matvec → [Gemma: q/k norms] → rope → kv_append → attention → quantise → o matvec →
//! [Gemma: norm] → add → rms_norm → quantise → gate/up matvec → silu_mul or gelu_mul →
//! quantise → down matvec → [Gemma: norm] → add) → each sequence's last row gathered → final
//! norm → quantise → output matvec → logits copied back. Projections, norms and element-wise
//! steps run over all rows at once; kv_append and attention once per sequence, on its own
//! cache.
//!
//! Batch invariance: every kernel computes each row alone, in an order fixed by its block
//! size, and block sizes depend only on the model's shapes ([`launch`]). A row's logits are
//! therefore the same bits alone or batched, prefilled or decoded one token at a time.

use std::fmt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use crate::decoder::BatchDecoder;
use crate::error::{ForwardError, LoadError};
use crate::gguf::GgufFile;
use crate::gpu::kernels::{Activations, WeightFormat};
use crate::gpu::runtime::{DeviceBuffer, DeviceRuntime, DeviceSlice, RuntimeError};
use crate::kernels::QMatrix;
use crate::model::cpu_decoder::{CpuDecoder, DecoderView, ARCHITECTURES};

mod cache;
mod launch;
mod memory;
#[cfg(test)]
mod tests;

pub use cache::GpuCache;
use launch::{activation_row_bytes, Kernels};
pub use memory::{Demand, MemoryNeed, HEADROOM};

/// Longest context the GPU decoder serves: its attention kernel keeps one f32 score per
/// attended position of a row in shared memory, and 48 KiB is what CUDA and HIP give a
/// kernel without opting in to more.
pub const MAX_GPU_CONTEXT: usize = (48 << 10) / 4;

/// Loading a model onto a GPU runtime failed.
#[derive(Debug, thiserror::Error)]
pub enum GpuLoadError {
    /// The file could not be opened, or is not GGUF.
    #[error(transparent)]
    File(#[from] LoadError),
    /// The architecture has no GPU decoder.
    #[error(
        "no GPU decoder for architecture `{0}` (supported: llama, mistral, gemma3, qwen2, qwen3, phi3)"
    )]
    Architecture(String),
    /// The weights could not be read (missing tensors, formats the kernels do not read).
    #[error("reading the weights: {0}")]
    Weights(candle_core::Error),
    /// Uploading to the device failed.
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    /// The device has too little free memory for the model at the context and batch asked.
    #[error(
        "the model needs {need} of device memory but the device has {} free; lower --ctx-size or --max-batch (or --kv-memory, --prefix-cache), or run it on the CPU with --device cpu",
        memory::gib(*free)
    )]
    Memory {
        /// What the model needs.
        need: MemoryNeed,
        /// Free device memory, bytes.
        free: usize,
    },
}

/// A weight matrix in device memory, in its GGUF blocks.
struct GpuMatrix<R: DeviceRuntime> {
    buf: DeviceBuffer<R>,
    format: WeightFormat,
    rows: usize,
    cols: usize,
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
}

struct GpuLayer<R: DeviceRuntime> {
    attn_norm: DeviceBuffer<R>,
    ffn_norm: DeviceBuffer<R>,
    q_norm: Option<DeviceBuffer<R>>,
    k_norm: Option<DeviceBuffer<R>>,
    post_attn_norm: Option<DeviceBuffer<R>>,
    post_ffn_norm: Option<DeviceBuffer<R>>,
    /// Qwen 2: query, key and value biases.
    bias: Option<[DeviceBuffer<R>; 3]>,
    /// Positions attended to (0: all).
    window: usize,
    /// Index of its tables in [`GpuDecoder::ropes`].
    rope: usize,
    wq: GpuMatrix<R>,
    wk: GpuMatrix<R>,
    wv: GpuMatrix<R>,
    wo: GpuMatrix<R>,
    gate: GpuMatrix<R>,
    up: GpuMatrix<R>,
    down: GpuMatrix<R>,
}

/// Sizes of the model.
#[derive(Debug, Clone, Copy)]
struct Shape {
    max_len: usize,
    hidden: usize,
    n_head: usize,
    n_kv_head: usize,
    head_dim: usize,
    ffn: usize,
    vocab: usize,
    neox: bool,
    gelu: bool,
    eps: f32,
    embed_scale: f32,
}

impl Shape {
    fn q_w(&self) -> usize {
        self.n_head * self.head_dim
    }

    fn kv_w(&self) -> usize {
        self.n_kv_head * self.head_dim
    }
}

/// A llama-family or Gemma 3 decoder whose weights and caches live on a [`DeviceRuntime`].
pub struct GpuDecoder<R: DeviceRuntime> {
    runtime: Arc<R>,
    /// Tells this decoder's caches from others'.
    id: u64,
    embed: GpuMatrix<R>,
    layers: Vec<GpuLayer<R>>,
    norm: DeviceBuffer<R>,
    /// `None` when tied to the embeddings.
    output: Option<GpuMatrix<R>>,
    /// Cosine and sine tables `[max_len, head_dim / 2]`, one pair per RoPE base.
    ropes: Vec<(DeviceBuffer<R>, DeviceBuffer<R>)>,
    shape: Shape,
    /// The buffers of the last pass, kept for the next: allocating and freeing device memory
    /// on every pass would cost more than small passes themselves. Grown when a pass carries
    /// more rows or sequences; one pass at a time holds it.
    buffers: Mutex<Buffers<R>>,
}

impl<R: DeviceRuntime> fmt::Debug for GpuDecoder<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GpuDecoder")
            .field("layers", &self.layers.len())
            .field("shape", &self.shape)
            .finish_non_exhaustive()
    }
}

impl<R: DeviceRuntime> GpuDecoder<R> {
    /// Loads the GGUF decoder at `path` (llama, mistral or gemma3, every matrix in a format
    /// the CPU decoder reads) onto `runtime`, for contexts of up to `max_len` tokens (fewer
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
        if !ARCHITECTURES.contains(&arch.as_str()) {
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

    /// Reads the weights of an opened GGUF decoder (`arch`: llama, mistral or gemma3) for
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
        if !ARCHITECTURES.contains(&arch) {
            return Err(GpuLoadError::Architecture(arch.to_owned()));
        }
        let cpu =
            CpuDecoder::from_gguf(content, reader, arch, max_len).map_err(GpuLoadError::Weights)?;
        let view = whole(&cpu)?;
        let need = MemoryNeed::of(&view, demand);
        let free = runtime.free_memory()?;
        if need.total() > free {
            return Err(GpuLoadError::Memory { need, free });
        }
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
                gate: GpuMatrix::upload(rt, l.gate)?,
                up: GpuMatrix::upload(rt, l.up)?,
                down: GpuMatrix::upload(rt, l.down)?,
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
            ffn: m.layers.first().map_or(0, |l| l.gate.rows()),
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

    /// The runtime it runs on.
    pub fn runtime(&self) -> &Arc<R> {
        &self.runtime
    }

    /// Bytes of keys and values a sequence's cache holds per position.
    pub fn kv_bytes_per_token(&self) -> usize {
        2 * self.layers.len() * self.shape.n_kv_head * self.shape.head_dim * 4
    }

    /// Tokens of context it serves.
    pub fn max_len(&self) -> usize {
        self.shape.max_len
    }

    /// Entries of each logits row.
    pub fn vocab_size(&self) -> usize {
        self.shape.vocab
    }
}

/// The buffers a pass uses, each sized for the largest pass so far.
struct Buffers<R: DeviceRuntime> {
    rows: Option<Workspace<R>>,
    outputs: Option<Outputs<R>>,
}

/// Per-sequence buffers of a pass: which row is each sequence's last, that row, normed, and
/// the logits.
struct Outputs<R: DeviceRuntime> {
    /// Sequences they hold.
    seqs: usize,
    last: DeviceBuffer<R>,
    gathered: DeviceBuffer<R>,
    normed: DeviceBuffer<R>,
    logits: DeviceBuffer<R>,
}

/// The pieces of a decoder of the whole model (the GPU runs whole models only).
fn whole(cpu: &CpuDecoder) -> Result<DecoderView<'_>, GpuLoadError> {
    cpu.view().ok_or_else(|| {
        GpuLoadError::Weights(candle_core::Error::Msg(
            "the GPU decoder runs whole models, not pipeline stages".into(),
        ))
    })
}

/// Rows a new workspace holds: at least `m`, rounded up so that growing passes reallocate
/// a logarithmic number of times.
fn capacity(m: usize) -> usize {
    m.max(16).next_power_of_two()
}

/// Device buffers of passes over up to `rows` rows.
struct Workspace<R: DeviceRuntime> {
    /// Rows every buffer holds.
    rows: usize,
    x: DeviceBuffer<R>,
    h: DeviceBuffer<R>,
    q: DeviceBuffer<R>,
    k: DeviceBuffer<R>,
    v: DeviceBuffer<R>,
    att: DeviceBuffer<R>,
    /// Norm outputs before they replace their input (Gemma).
    tmp: DeviceBuffer<R>,
    g: DeviceBuffer<R>,
    u: DeviceBuffer<R>,
    /// Activations quantised for 32-value and 256-value formats.
    q8: DeviceBuffer<R>,
    q8k: DeviceBuffer<R>,
    ids: DeviceBuffer<R>,
    pos: DeviceBuffer<R>,
    zeros: DeviceBuffer<R>,
}

/// Bytes of `n` f32s.
fn f32_bytes(n: usize) -> usize {
    n * 4
}

/// The first `n` f32s of `b`.
fn first<R: DeviceRuntime>(b: &DeviceBuffer<R>, n: usize) -> Result<DeviceSlice, RuntimeError> {
    b.slice(0, f32_bytes(n))
}

/// Rows `start..start + n` of `width` f32s.
fn rows<R: DeviceRuntime>(
    b: &DeviceBuffer<R>,
    start: usize,
    n: usize,
    width: usize,
) -> Result<DeviceSlice, RuntimeError> {
    b.slice(f32_bytes(start * width), f32_bytes(n * width))
}

impl<R: DeviceRuntime> GpuDecoder<R> {
    fn workspace(&self, m: usize) -> Result<Workspace<R>, RuntimeError> {
        let s = &self.shape;
        let rt = &self.runtime;
        let widest = s.hidden.max(s.q_w()).max(s.ffn);
        let buf = |n: usize| DeviceBuffer::new(rt, f32_bytes(n));
        Ok(Workspace {
            rows: m,
            x: buf(m * s.hidden)?,
            h: buf(m * s.hidden)?,
            q: buf(m * s.q_w())?,
            k: buf(m * s.kv_w())?,
            v: buf(m * s.kv_w())?,
            att: buf(m * s.q_w())?,
            tmp: buf(m * s.hidden.max(s.q_w()))?,
            g: buf(m * s.ffn)?,
            u: buf(m * s.ffn)?,
            q8: DeviceBuffer::new(rt, m * activation_row_bytes(Activations::Q8, widest))?,
            q8k: DeviceBuffer::new(
                rt,
                m * activation_row_bytes(Activations::Q8K, widest.next_multiple_of(256)),
            )?,
            ids: DeviceBuffer::new(rt, m * 4)?,
            pos: DeviceBuffer::new(rt, m * 4)?,
            zeros: DeviceBuffer::from_slice(rt, &vec![0i32; m])?,
        })
    }

    fn outputs(&self, b: usize) -> Result<Outputs<R>, RuntimeError> {
        let (rt, s) = (&self.runtime, &self.shape);
        Ok(Outputs {
            seqs: b,
            last: DeviceBuffer::new(rt, b * 4)?,
            gathered: DeviceBuffer::new(rt, f32_bytes(b * s.hidden))?,
            normed: DeviceBuffer::new(rt, f32_bytes(b * s.hidden))?,
            logits: DeviceBuffer::new(rt, f32_bytes(b * s.vocab))?,
        })
    }

    /// The kept buffers, grown to hold a pass of `m` rows over `b` sequences. A buffer too
    /// small is freed before its replacement is allocated.
    fn buffers(
        &self,
        m: usize,
        b: usize,
    ) -> Result<std::sync::MutexGuard<'_, Buffers<R>>, RuntimeError> {
        let mut held = self.buffers.lock().unwrap_or_else(PoisonError::into_inner);
        if held.rows.as_ref().is_none_or(|w| w.rows < m) {
            held.rows = None;
            held.rows = Some(self.workspace(capacity(m))?);
        }
        if held.outputs.as_ref().is_none_or(|o| o.seqs < b) {
            held.outputs = None;
            held.outputs = Some(self.outputs(capacity(b))?);
        }
        Ok(held)
    }

    /// `outs[i] = x · ws[i]ᵀ` for `m` rows of `x`, quantised once per activation form.
    fn project(
        &self,
        ws: &Workspace<R>,
        x: DeviceSlice,
        m: usize,
        projections: &[(&GpuMatrix<R>, DeviceSlice)],
    ) -> Result<(), RuntimeError> {
        let k = Kernels(&*self.runtime);
        let cols = projections.first().map_or(0, |(w, _)| w.cols);
        let mut done = [false; 2];
        for &(w, out) in projections {
            let form = w.format.activations();
            let slot = match form {
                Activations::Q8 => Some((0, &ws.q8)),
                Activations::Q8K => Some((1, &ws.q8k)),
                Activations::F32 => None,
            };
            let input = match slot {
                Some((i, buf)) => {
                    let bytes = m * activation_row_bytes(form, cols);
                    let qa = buf.slice(0, bytes)?;
                    if !done[i] {
                        k.quantize(form, x, qa, m, cols)?;
                        done[i] = true;
                    }
                    qa
                }
                None => x,
            };
            k.matvec(w.format, (w.buf.all(), w.rows, w.cols), input, out, m)?;
        }
        Ok(())
    }

    /// RMS-normalises `n` rows of `cols` values of `x` in place with weights `w`, through
    /// `tmp`.
    fn norm_in_place(
        &self,
        tmp: &DeviceBuffer<R>,
        x: &mut DeviceBuffer<R>,
        w: &DeviceBuffer<R>,
        (n, cols): (usize, usize),
    ) -> Result<(), RuntimeError> {
        let k = Kernels(&*self.runtime);
        let (src, dst) = (first(x, n * cols)?, first(tmp, n * cols)?);
        k.rms_norm((src, dst), w.all(), n, cols, self.shape.eps)?;
        x.copy_from(0, tmp, 0, f32_bytes(n * cols))
    }

    /// The pass itself, once the rows are checked and every cache has room for them.
    fn run(
        &self,
        caches: &[&mut GpuCache<R>],
        row_ids: &[&[u32]],
    ) -> Result<Vec<Vec<f32>>, RuntimeError> {
        let s = self.shape;
        let (d, hd, q_w, kv_w) = (s.hidden, s.head_dim, s.q_w(), s.kv_w());
        // Each sequence's rows: first row, count; every row's token and position.
        let mut spans = Vec::with_capacity(caches.len());
        let (mut ids, mut pos, mut last) = (Vec::new(), Vec::new(), Vec::new());
        for (c, toks) in caches.iter().zip(row_ids) {
            spans.push((ids.len(), toks.len(), c.len));
            ids.extend(toks.iter().map(|&t| t as i32));
            pos.extend((c.len..c.len + toks.len()).map(|p| p as i32));
            last.push((ids.len() - 1) as i32);
        }
        let m = ids.len();
        let max_id = ids.iter().copied().max().unwrap_or(0) as usize;
        let max_pos = pos.iter().copied().max().unwrap_or(0) as usize;
        let mut held = self.buffers(m, last.len())?;
        let Buffers {
            rows: Some(ws),
            outputs: Some(out),
        } = &mut *held
        else {
            return Err(RuntimeError::Alloc {
                bytes: 0,
                reason: "no workspace".into(),
            });
        };
        ws.ids.upload(0, &ids)?;
        ws.pos.upload(0, &pos)?;
        let k = Kernels(&*self.runtime);
        let all_pos = (ws.pos.all(), max_pos);

        k.embed(
            self.embed.format,
            (self.embed.buf.all(), self.embed.rows),
            (ws.ids.all(), max_id),
            ws.x.all(),
            m,
            d,
            s.embed_scale,
        )?;
        let stores: Vec<_> = caches.iter().map(|c| c.store.as_ref()).collect();
        for (li, layer) in self.layers.iter().enumerate() {
            let (x, h) = (ws.x.all(), ws.h.all());
            k.rms_norm((x, h), layer.attn_norm.all(), m, d, s.eps)?;
            let (q, kk, v) = (ws.q.all(), ws.k.all(), ws.v.all());
            self.project(ws, h, m, &[(&layer.wq, q), (&layer.wk, kk), (&layer.wv, v)])?;
            if let Some([bq, bk, bv]) = &layer.bias {
                k.add_bias(q, bq.all(), m, q_w)?;
                k.add_bias(kk, bk.all(), m, kv_w)?;
                k.add_bias(v, bv.all(), m, kv_w)?;
            }
            if let Some(w) = &layer.q_norm {
                self.norm_in_place(&ws.tmp, &mut ws.q, w, (m * s.n_head, hd))?;
            }
            if let Some(w) = &layer.k_norm {
                self.norm_in_place(&ws.tmp, &mut ws.k, w, (m * s.n_kv_head, hd))?;
            }
            let (cos, sin) = &self.ropes[layer.rope];
            let tables = (cos.all(), sin.all());
            k.rope(ws.q.all(), (m, q_w, hd), all_pos, tables, s.neox)?;
            k.rope(ws.k.all(), (m, kv_w, hd), all_pos, tables, s.neox)?;
            for (&(start, n, len), store) in spans.iter().zip(&stores) {
                let Some(store) = store else {
                    return Err(RuntimeError::Alloc {
                        bytes: 0,
                        reason: "a cache has no store".into(),
                    });
                };
                let cache = store.layer(li)?;
                let seq_pos = (ws.pos.slice(start * 4, n * 4)?, len + n - 1);
                let zeros = ws.zeros.slice(start * 4, n * 4)?;
                let (kr, vr) = (rows(&ws.k, start, n, kv_w)?, rows(&ws.v, start, n, kv_w)?);
                k.kv_append((kr, vr), cache, zeros, seq_pos, n, kv_w)?;
                let (qr, or) = (rows(&ws.q, start, n, q_w)?, rows(&ws.att, start, n, q_w)?);
                let heads = (s.n_head, s.n_kv_head, hd);
                let scale = 1.0 / (hd as f32).sqrt();
                k.attention(
                    (qr, or),
                    cache,
                    zeros,
                    seq_pos,
                    n,
                    heads,
                    (layer.window, scale),
                )?;
            }
            self.project(ws, ws.att.all(), m, &[(&layer.wo, h)])?;
            if let Some(w) = &layer.post_attn_norm {
                self.norm_in_place(&ws.tmp, &mut ws.h, w, (m, d))?;
            }
            k.elementwise("add", ws.x.all(), ws.h.all(), m * d)?;
            k.rms_norm((ws.x.all(), ws.h.all()), layer.ffn_norm.all(), m, d, s.eps)?;
            let (g, u) = (ws.g.all(), ws.u.all());
            self.project(ws, ws.h.all(), m, &[(&layer.gate, g), (&layer.up, u)])?;
            let gate = if s.gelu { "gelu_mul" } else { "silu_mul" };
            k.elementwise(gate, g, u, m * s.ffn)?;
            self.project(ws, g, m, &[(&layer.down, ws.h.all())])?;
            if let Some(w) = &layer.post_ffn_norm {
                self.norm_in_place(&ws.tmp, &mut ws.h, w, (m, d))?;
            }
            k.elementwise("add", ws.x.all(), ws.h.all(), m * d)?;
        }

        let b = last.len();
        out.last.upload(0, &last)?;
        let (last_ids, gathered, normed) = (&out.last, &out.gathered, &out.normed);
        let logits = first(&out.logits, b * s.vocab)?;
        let x_f32 = (ws.x.all(), m);
        k.embed(
            WeightFormat::F32,
            x_f32,
            (last_ids.all(), m - 1),
            gathered.all(),
            b,
            d,
            1.0,
        )?;
        k.rms_norm((gathered.all(), normed.all()), self.norm.all(), b, d, s.eps)?;
        let output = self.output.as_ref().unwrap_or(&self.embed);
        // The workspace's quantisation buffers hold m ≥ b rows.
        self.project(ws, normed.all(), b, &[(output, logits)])?;
        self.runtime.synchronize()?;
        let mut host = vec![0.0f32; b * s.vocab];
        out.logits.download(0, &mut host)?;
        Ok(host.chunks_exact(s.vocab).map(<[f32]>::to_vec).collect())
    }
}

impl<R: DeviceRuntime> BatchDecoder for GpuDecoder<R> {
    type Cache = GpuCache<R>;

    fn new_cache(&self) -> GpuCache<R> {
        GpuCache {
            owner: self.id,
            store: None,
            len: 0,
            layers: self.layers.len(),
            kv_w: self.shape.kv_w(),
        }
    }

    /// Always: see the module documentation.
    fn batch_invariant(&self) -> bool {
        true
    }

    fn kv_bytes_per_token(&self) -> usize {
        GpuDecoder::kv_bytes_per_token(self)
    }

    fn forward_rows(
        &self,
        caches: &mut [&mut GpuCache<R>],
        rows: &[&[u32]],
    ) -> Result<Vec<Vec<f32>>, ForwardError> {
        let invalid = |m: String| Err(ForwardError::InvalidBatch(m));
        if caches.len() != rows.len() {
            return invalid(format!("{} caches for {} rows", caches.len(), rows.len()));
        }
        if caches.is_empty() {
            return Ok(Vec::new());
        }
        let vocab = self.embed.rows;
        for (c, toks) in caches.iter().zip(rows) {
            if c.owner != self.id {
                return invalid("a cache of another model".into());
            }
            if toks.is_empty() {
                return invalid("a row with no tokens".into());
            }
            if c.len + toks.len() > self.shape.max_len {
                let n = c.len + toks.len();
                return invalid(format!(
                    "{n} tokens exceed the context of {}",
                    self.shape.max_len
                ));
            }
            if let Some(&id) = toks.iter().find(|&&t| t as usize >= vocab) {
                return invalid(format!(
                    "token id {id} is outside the vocabulary of {vocab}"
                ));
            }
        }
        // Growing or unsharing a store keeps the tokens fed so far, so the caches stay as they
        // were if the pass then fails; positions it wrote past their lengths are never read.
        for (c, toks) in caches.iter_mut().zip(rows) {
            let need = c.len + toks.len();
            c.reserve(&self.runtime, need, self.shape.max_len)?;
        }
        let logits = self.run(caches, rows)?;
        for (c, toks) in caches.iter_mut().zip(rows) {
            c.len += toks.len();
        }
        Ok(logits)
    }
}
