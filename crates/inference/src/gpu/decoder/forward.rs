//! The forward pass: one pass over rows of many sequences, as kernel launches over the
//! workspace (the order of the steps is in the parent module's documentation).

use super::launch::{activation_row_bytes, Kernels};
use super::upload::{GpuExperts, GpuFfn, GpuMatrix};
use super::workspace::{f32_bytes, first, rows, Buffers, Workspace};
use super::{GpuCache, GpuDecoder};
use crate::gpu::kernels::{Activations, WeightFormat};
use crate::gpu::runtime::{DeviceBuffer, DeviceRuntime, DeviceSlice, RuntimeError};

/// Which rows a projection multiplies: the same matrix for every row, or each (row, rank)
/// pair of a mixture its chosen expert of a stack.
#[derive(Clone, Copy)]
enum Rows {
    /// Every activation row by the whole matrix.
    All,
    /// `pairs` pairs, pair `p` by the rows of expert `ids[p]` (of `experts` stacked) with
    /// activation row `p / x_div`.
    Experts {
        ids: DeviceSlice,
        experts: usize,
        pairs: usize,
        x_div: usize,
    },
}

impl<R: DeviceRuntime> GpuDecoder<R> {
    fn project(
        &self,
        ws: &Workspace<R>,
        x: DeviceSlice,
        m: usize,
        projections: &[(&GpuMatrix<R>, DeviceSlice)],
    ) -> Result<(), RuntimeError> {
        self.project_rows(ws, x, m, Rows::All, projections)
    }

    /// `m` rows of `x` through each matrix, quantised once per activation form.
    fn project_rows(
        &self,
        ws: &Workspace<R>,
        x: DeviceSlice,
        m: usize,
        rows: Rows,
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
            match rows {
                Rows::All => k.matvec(w.format, (w.buf.all(), w.rows, w.cols), input, out, m)?,
                Rows::Experts {
                    ids,
                    experts,
                    pairs,
                    x_div,
                } => {
                    let per_expert = w.rows / experts.max(1);
                    let stack = (w.buf.all(), per_expert, w.cols, experts);
                    k.matvec_ids(w.format, stack, input, (ids, pairs, x_div), out)?;
                }
            }
        }
        Ok(())
    }

    /// The mixture of experts of one layer over `m` rows: `ws.h` (normalised) in, each row's
    /// weighted sum of its chosen experts' feed-forwards out, into `ws.h`, as the CPU
    /// decoder's `Moe::forward` computes it.
    fn mixture(&self, ws: &Workspace<R>, e: &GpuExperts<R>, m: usize) -> Result<(), RuntimeError> {
        let k = Kernels(&*self.runtime);
        let Some(b) = &ws.moe else {
            return Err(RuntimeError::Alloc {
                bytes: 0,
                reason: "no mixture buffers".into(),
            });
        };
        let (d, used, count) = (self.shape.hidden, e.used, e.count);
        let width = e.gate.rows / count.max(1);
        let pairs = m * used;
        let logits = first(&b.logits, m * count)?;
        self.project(ws, ws.h.all(), m, &[(&e.router, logits)])?;
        let (chosen, weights) = (b.chosen.slice(0, pairs * 4)?, first(&b.weights, pairs)?);
        k.moe_route(logits, (chosen, weights), m, count, used, e.scale)?;
        let (g, u) = (first(&ws.g, pairs * width)?, first(&ws.u, pairs * width)?);
        let each_row = Rows::Experts {
            ids: chosen,
            experts: count,
            pairs,
            x_div: used,
        };
        self.project_rows(ws, ws.h.all(), m, each_row, &[(&e.gate, g), (&e.up, u)])?;
        let gate = if self.shape.gelu {
            "gelu_mul"
        } else {
            "silu_mul"
        };
        k.elementwise(gate, g, u, pairs * width)?;
        let each_pair = Rows::Experts {
            ids: chosen,
            experts: count,
            pairs,
            x_div: 1,
        };
        let out = first(&b.out, pairs * d)?;
        self.project_rows(ws, g, pairs, each_pair, &[(&e.down, out)])?;
        k.moe_combine((out, weights), ws.h.all(), m, d, used)
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
    pub(super) fn run(
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
            match &layer.ffn {
                GpuFfn::Dense { gate, up, down } => {
                    let (g, u) = (ws.g.all(), ws.u.all());
                    self.project(ws, ws.h.all(), m, &[(gate, g), (up, u)])?;
                    let act = if s.gelu { "gelu_mul" } else { "silu_mul" };
                    k.elementwise(act, g, u, m * gate.rows)?;
                    self.project(ws, g, m, &[(down, ws.h.all())])?;
                }
                GpuFfn::Experts(e) => self.mixture(ws, e, m)?,
            }
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
