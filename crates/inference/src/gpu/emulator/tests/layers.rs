//! Emulator tests of the per-layer kernels (KV append, RMSNorm, RoPE, gates, attention) and
//! of launches themselves (bad arguments, barriers not all lanes reach, the kernel table).

use super::*;

#[test]
fn keys_and_values_append_at_their_sequences_positions() {
    let kv_w = 48;
    // Two sequences, caches at positions 0.. and 10.. of one buffer; rows: a decode step of
    // the first at position 3, a chunk of the second at positions 0..3.
    let (base, pos) = ([0i32, 10, 10, 10], [3i32, 0, 1, 2]);
    let k = random_input(base.len() * kv_w, 90);
    let v = random_input(base.len() * kv_w, 91);
    for warp in WARPS {
        let (mut kc, mut vc) = (vec![0.0f32; 20 * kv_w], vec![0.0f32; 20 * kv_w]);
        run(
            warp,
            "kv_append",
            [base.len() as u32, 1],
            32,
            0,
            &[
                Emulator::arg(&k),
                Emulator::arg(&v),
                Emulator::arg_mut(&mut kc),
                Emulator::arg_mut(&mut vc),
                Emulator::arg(&base),
                Emulator::arg(&pos),
                i32_arg(kv_w),
            ],
        );
        let mut filled = [false; 20];
        for r in 0..base.len() {
            let at = (base[r] + pos[r]) as usize;
            filled[at] = true;
            assert_eq!(&kc[at * kv_w..][..kv_w], &k[r * kv_w..][..kv_w]);
            assert_eq!(&vc[at * kv_w..][..kv_w], &v[r * kv_w..][..kv_w]);
        }
        for (p, _) in filled.iter().enumerate().filter(|(_, f)| !**f) {
            assert!(
                kc[p * kv_w..][..kv_w].iter().all(|&x| x == 0.0),
                "position {p}"
            );
        }
    }
}

/// `fast.rs`'s dot product: eight running sums.
fn dot8(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    for (x, y) in a.chunks_exact(8).zip(b.chunks_exact(8)) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    (acc[0] + acc[4]) + (acc[1] + acc[5]) + (acc[2] + acc[6]) + (acc[3] + acc[7])
}

#[test]
fn rms_norm_matches_the_cpu_model() {
    let (rows, cols, eps) = (5, 1024, 1e-6f32);
    let x = random_input(rows * cols, 50);
    let w = random_input(cols, 51);
    for warp in WARPS {
        let mut y = vec![f32::NAN; rows * cols];
        run(
            warp,
            "rms_norm",
            [rows as u32, 1],
            256,
            0,
            &[
                Emulator::arg(&x),
                Emulator::arg(&w),
                Emulator::arg_mut(&mut y),
                i32_arg(cols),
                KernelArg::F32(eps),
            ],
        );
        for (xs, ys) in x.chunks_exact(cols).zip(y.chunks_exact(cols)) {
            let scale = 1.0 / (dot8(xs, xs) / cols as f32 + eps).sqrt();
            for ((&v, &g), &wv) in xs.iter().zip(ys).zip(&w) {
                let want = v * scale * wv;
                // The sum of squares, reordered, moves by at most cols·ε relative (all terms
                // are positive); the square root halves that; four more roundings follow.
                let bound = want.abs() * (cols as f32 / 2.0 + 4.0) * EPS;
                assert!((g - want).abs() <= bound, "warp {warp}: {g} vs {want}");
            }
        }
    }
}

/// `fast.rs`'s RoPE tables for one base: `[positions, head_dim / 2]`.
fn rope_tables(head_dim: usize, base: f32, positions: usize) -> (Vec<f32>, Vec<f32>) {
    let half = head_dim / 2;
    let (mut cos, mut sin) = (Vec::new(), Vec::new());
    for p in 0..positions {
        for i in 0..half {
            let angle = p as f32 * (1.0 / base.powf((2 * i) as f32 / head_dim as f32));
            cos.push(angle.cos());
            sin.push(angle.sin());
        }
    }
    (cos, sin)
}

#[test]
fn rope_matches_the_cpu_model_in_both_layouts() {
    let (heads, hd) = (3, 64);
    let width = heads * hd;
    let (cos, sin) = rope_tables(hd, 10_000.0, 100);
    let pos = [0i32, 5, 99, 42];
    let x = random_input(pos.len() * width, 60);
    for neox in [false, true] {
        let mut want = x.clone();
        for (row, &p) in want.chunks_exact_mut(width).zip(&pos) {
            let half = hd / 2;
            let (c, s) = (&cos[p as usize * half..], &sin[p as usize * half..]);
            for head in row.chunks_exact_mut(hd) {
                for i in 0..half {
                    let (a, b) = if neox {
                        (i, i + half)
                    } else {
                        (2 * i, 2 * i + 1)
                    };
                    let (x0, x1) = (head[a], head[b]);
                    head[a] = x0 * c[i] - x1 * s[i];
                    head[b] = x0 * s[i] + x1 * c[i];
                }
            }
        }
        for warp in WARPS {
            let mut got = x.clone();
            run(
                warp,
                "rope",
                [pos.len() as u32, 1],
                64,
                0,
                &[
                    Emulator::arg_mut(&mut got),
                    Emulator::arg(&pos),
                    Emulator::arg(&cos),
                    Emulator::arg(&sin),
                    i32_arg(width),
                    i32_arg(hd),
                    KernelArg::I32(i32::from(neox)),
                ],
            );
            // The same roundings in the same order (no fused multiply-adds on either side).
            assert_eq!(got, want, "neox {neox} warp {warp}");
        }
    }
}

#[test]
fn residual_add_and_gates_match_their_definitions() {
    let n = 1000;
    let (a, b) = (random_input(n, 70), random_input(n, 71));
    for warp in WARPS {
        let launch = |name: &str, x: &mut [f32]| {
            run(
                warp,
                name,
                [n.div_ceil(128) as u32, 1],
                128,
                0,
                &[Emulator::arg_mut(x), Emulator::arg(&b), i32_arg(n)],
            )
        };
        let mut sum = a.clone();
        launch("add", &mut sum);
        let want: Vec<f32> = a.iter().zip(&b).map(|(x, y)| x + y).collect();
        assert_eq!(sum, want);

        let mut silu = a.clone();
        launch("silu_mul", &mut silu);
        let mut gelu = a.clone();
        launch("gelu_mul", &mut gelu);
        for i in 0..n {
            let (g, u) = (f64::from(a[i]), f64::from(b[i]));
            let want_silu = g / (1.0 + (-g).exp()) * u;
            let y = 0.797_884_6 * g * (1.0 + 0.044_715 * g * g);
            let want_gelu = 0.5 * g * (1.0 + y.tanh()) * u;
            // expf is within a few ulp; the rest are a handful of roundings. GELU's
            // 1 - 2 / (e^2y + 1) loses up to ε of 1 + tanh to cancellation, absolutely.
            let close = |got: f32, want: f64, abs: f64| {
                (f64::from(got) - want).abs() <= want.abs() * 16.0 * f64::from(EPS) + abs
            };
            assert!(
                close(silu[i], want_silu, 0.0),
                "silu {} vs {want_silu}",
                silu[i]
            );
            let abs = 4.0 * f64::from(EPS) * (0.5 * g * u).abs();
            assert!(
                close(gelu[i], want_gelu, abs),
                "gelu {} vs {want_gelu}",
                gelu[i]
            );
        }
    }
}

/// `fast.rs`'s attention of one query head against cached positions `first..=pos`.
#[allow(clippy::too_many_arguments)]
fn attend(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    kv_w: usize,
    off: usize,
    first: usize,
    pos: usize,
    scale: f32,
    out: &mut [f32],
) {
    let hd = q.len();
    let scores: Vec<f32> = (first..=pos)
        .map(|j| dot8(q, &k[j * kv_w + off..][..hd]) * scale)
        .collect();
    let max = scores.iter().fold(f32::NEG_INFINITY, |m, &s| m.max(s));
    let e: Vec<f32> = scores.iter().map(|s| (s - max).exp()).collect();
    let sum: f32 = e.iter().sum();
    out.fill(0.0);
    for (j, &w) in (first..).zip(&e) {
        for (o, &vv) in out.iter_mut().zip(&v[j * kv_w + off..][..hd]) {
            *o += w / sum * vv;
        }
    }
}

#[test]
fn attention_matches_the_cpu_model_for_decode_and_prompt_chunks() {
    let (n_head, n_kv, hd) = (4, 2, 64);
    let kv_w = n_kv * hd;
    let scale = 1.0 / (hd as f32).sqrt();
    // Two sequences in one cache buffer: 40 positions from 0, then 75 from 40. Rows: one
    // decode row of each, then a prompt chunk of the second.
    let (lens, bases) = ([40usize, 75], [0i32, 40]);
    let total: usize = lens.iter().sum();
    let k = random_input(total * kv_w, 80);
    let v = random_input(total * kv_w, 81);
    let rows: Vec<(usize, usize)> = vec![(0, 39), (1, 74), (1, 60), (1, 61), (1, 62)];
    let q = random_input(rows.len() * n_head * hd, 82);
    let base: Vec<i32> = rows.iter().map(|&(s, _)| bases[s]).collect();
    let pos: Vec<i32> = rows.iter().map(|&(_, p)| p as i32).collect();
    for window in [0usize, 16] {
        let mut want = vec![0.0f32; q.len()];
        let mut bounds = vec![0.0f32; q.len()];
        for (r, &(s, p)) in rows.iter().enumerate() {
            let first = if window > 0 {
                (p + 1).saturating_sub(window)
            } else {
                0
            };
            let b = bases[s] as usize * kv_w;
            for h in 0..n_head {
                let off = h / (n_head / n_kv) * hd;
                let at = (r * n_head + h) * hd;
                let qh = &q[at..at + hd];
                attend(
                    qh,
                    &k[b..],
                    &v[b..],
                    kv_w,
                    off,
                    first,
                    p,
                    scale,
                    &mut want[at..at + hd],
                );
                // A score reordered moves by at most hd·ε·Σ|q·k|·scale; e^score turns that
                // into the same relative error of its weight, normalising doubles it, and the
                // weighted sum of values adds n·ε relative: the output moves by at most that
                // times the largest |value|.
                let n = p + 1 - first;
                let (mut qk, mut vmax) = (0.0f32, 0.0f32);
                for j in first..=p {
                    let kj = &k[b + j * kv_w + off..][..hd];
                    let s: f32 = qh.iter().zip(kj).map(|(a, c)| (a * c).abs()).sum();
                    qk = qk.max(s * scale);
                    let vj = &v[b + j * kv_w + off..][..hd];
                    vmax = vj.iter().fold(vmax, |m, x| m.max(x.abs()));
                }
                let delta = (hd as f32 + 2.0) * EPS * qk + (n as f32 + 4.0) * EPS;
                bounds[at..at + hd].fill(4.0 * delta * vmax);
            }
        }
        let mut per_warp = Vec::new();
        for warp in WARPS {
            let mut out = vec![f32::NAN; q.len()];
            run(
                warp,
                "attention",
                [rows.len() as u32, n_head as u32],
                64,
                4 * hd as u32,
                &[
                    Emulator::arg(&q),
                    Emulator::arg(&k),
                    Emulator::arg(&v),
                    Emulator::arg_mut(&mut out),
                    Emulator::arg(&base),
                    Emulator::arg(&pos),
                    i32_arg(n_head),
                    i32_arg(n_kv),
                    i32_arg(hd),
                    i32_arg(window),
                    KernelArg::F32(scale),
                ],
            );
            for i in 0..out.len() {
                assert!(
                    (out[i] - want[i]).abs() <= bounds[i],
                    "window {window} warp {warp} at {i}: {} vs {} (bound {})",
                    out[i],
                    want[i],
                    bounds[i]
                );
            }
            per_warp.push(out);
        }
        assert_eq!(per_warp[0], per_warp[1], "window {window}");
    }
}

/// Runs `attention` for query rows `q` at `pos` of one sequence whose cache starts at 0.
#[allow(clippy::too_many_arguments)]
fn gpu_attention(
    warp: u32,
    q: &[f32],
    (k, v): (&[f32], &[f32]),
    pos: &[i32],
    (n_head, n_kv, hd): (usize, usize, usize),
    window: usize,
    scale: f32,
) -> Vec<f32> {
    let base = vec![0i32; pos.len()];
    let mut out = vec![f32::NAN; q.len()];
    run(
        warp,
        "attention",
        [pos.len() as u32, n_head as u32],
        64,
        4 * hd as u32,
        &[
            Emulator::arg(q),
            Emulator::arg(k),
            Emulator::arg(v),
            Emulator::arg_mut(&mut out),
            Emulator::arg(&base),
            Emulator::arg(pos),
            i32_arg(n_head),
            i32_arg(n_kv),
            i32_arg(hd),
            i32_arg(window),
            KernelArg::F32(scale),
        ],
    );
    out
}

/// Past the 12,288 positions whose scores the kernel once kept in shared memory: many chunks
/// of scores, peaked (the largest weights fall in different chunks for different rows) so
/// that a chunk lost or rescaled wrongly moves the output far past the rounding bound.
#[test]
fn attention_over_a_context_longer_than_shared_memory_holds_matches_the_cpu_model() {
    use crate::gpu::kernels::ATTENTION_CHUNK;
    let (n_head, n_kv, hd) = (2, 1, 8);
    // Past 12,288, in more than 20 chunks.
    let len = 13_000;
    let k = random_input(len * n_kv * hd, 120);
    let v = random_input(len * n_kv * hd, 121);
    // Rows: the last position, one mid-way, one on a chunk boundary; with a window of 700,
    // each row's chunks start mid-way through the other rows'.
    let pos = [len as i32 - 1, 9_001, 2 * ATTENTION_CHUNK as i32];
    let q: Vec<f32> = random_input(pos.len() * n_head * hd, 122)
        .iter()
        .map(|x| 6.0 * x)
        .collect();
    let scale = 1.0 / (hd as f32).sqrt();
    for window in [0usize, 700] {
        let mut want = vec![0.0f32; q.len()];
        let mut bounds = vec![0.0f32; q.len()];
        for (r, &p) in pos.iter().enumerate() {
            let p = p as usize;
            let first = if window > 0 {
                (p + 1).saturating_sub(window)
            } else {
                0
            };
            for h in 0..n_head {
                let at = (r * n_head + h) * hd;
                let qh = &q[at..at + hd];
                attend(qh, &k, &v, hd, 0, first, p, scale, &mut want[at..at + hd]);
                let (mut qk, mut vmax) = (0.0f32, 0.0f32);
                for j in first..=p {
                    let s: f32 = qh
                        .iter()
                        .zip(&k[j * hd..][..hd])
                        .map(|(a, c)| (a * c).abs())
                        .sum();
                    qk = qk.max(s * scale);
                    vmax = v[j * hd..][..hd].iter().fold(vmax, |m, x| m.max(x.abs()));
                }
                let n = p + 1 - first;
                let delta = (hd as f32 + 2.0) * EPS * qk + (n as f32 + 4.0) * EPS;
                bounds[at..at + hd].fill(4.0 * delta * vmax);
            }
        }
        let heads = (n_head, n_kv, hd);
        let mut per_warp = Vec::new();
        for warp in WARPS {
            let out = gpu_attention(warp, &q, (&k, &v), &pos, heads, window, scale);
            for i in 0..out.len() {
                assert!(
                    (out[i] - want[i]).abs() <= bounds[i],
                    "window {window} warp {warp} at {i}: {} vs {} (bound {})",
                    out[i],
                    want[i],
                    bounds[i]
                );
            }
            // A row alone gives the bits it gave among others.
            let row = n_head * hd;
            let alone = gpu_attention(
                warp,
                &q[row..2 * row],
                (&k, &v),
                &pos[1..2],
                heads,
                window,
                scale,
            );
            assert_eq!(
                alone.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                out[row..2 * row]
                    .iter()
                    .map(|x| x.to_bits())
                    .collect::<Vec<_>>(),
                "window {window} warp {warp}: a row alone"
            );
            per_warp.push(out);
        }
        assert_eq!(per_warp[0], per_warp[1], "window {window}");
        // The weights are peaked: the output is not a mean of values that hides mistakes.
        let spread = want.iter().fold(0.0f32, |m, x| m.max(x.abs()));
        let bound = bounds.iter().fold(0.0f32, |m, &x| m.max(x));
        assert!(
            spread > 50.0 * bound,
            "window {window}: {spread} vs bound {bound}"
        );
    }
}

#[test]
fn uncached_builds_work_and_odd_warps_are_refused() {
    assert_eq!(Emulator::compile(64).unwrap().warp(), 64);
    assert!(matches!(Emulator::compile(48), Err(CompileError::Warp(48))));
}

/// The runtime on its own, with a kernel whose lanes wait at different barriers (lanes that
/// have returned count as arrived, as on a GPU): the launch must report it rather than hang,
/// and a well-formed launch must still run afterwards.
#[test]
fn lanes_waiting_at_different_barriers_fail_the_launch() {
    let dir = tempfile::tempdir().unwrap();
    let test = r#"
        extern "C" __global__ void divergent(int* out) {
            if (threadIdx.x < 16) {
                __syncthreads();
            } else {
                out[threadIdx.x] = pod_shfl_xor(1, 1);
            }
            out[threadIdx.x] = 1;
        }
        extern "C" __global__ void uniform(int* out) {
            __syncthreads();
            out[threadIdx.x] = pod_shfl_xor((int)threadIdx.x, 1);
        }
        int main() {
            int out[64] = {0};
            int* p = out;
            void* args[] = {&p};
            unsigned dims[] = {1, 1, 1, 64, 1, 1};
            int a = pod_emu::launch(divergent, dims, 0, args);
            int b = pod_emu::launch(uniform, dims, 0, args);
            return a == 1 && b == 0 && out[0] == 1 && out[1] == 0 && out[63] == 62 ? 0 : 1;
        }
    "#;
    for warp in WARPS {
        let src = dir.path().join("deadlock.cpp");
        let source = format!("{}\n{RUNTIME}\n{test}", source(Platform::Emulator));
        std::fs::write(&src, source).unwrap();
        let bin = dir.path().join(format!("deadlock-{warp}"));
        let status = Command::new(compiler())
            .args(
                FLAGS
                    .iter()
                    .filter(|f| !matches!(**f, "-shared" | "-fPIC" | "-O2")),
            )
            .arg(format!("-DPOD_WARP={warp}"))
            .arg("-o")
            .arg(&bin)
            .arg(&src)
            .status()
            .unwrap();
        assert!(status.success());
        assert!(
            Command::new(&bin).status().unwrap().success(),
            "warp {warp}"
        );
    }
}

#[test]
fn launches_with_wrong_arguments_or_shapes_fail_cleanly() {
    let emu = emulator(32);
    let mut y = [0.0f32; 32];
    let x = [0.0f32; 32];
    let good = [
        Emulator::arg_mut(&mut y),
        Emulator::arg(&x),
        KernelArg::I32(32),
    ];
    // SAFETY: the buffers hold the 32 values `add` touches with n = 32; the failing launches
    // are refused before anything runs.
    unsafe {
        assert!(matches!(
            emu.launch("add", [1, 1, 1], [32, 1, 1], 0, &good[..2]),
            Err(LaunchError::Args(ArgError::Count {
                expected: 3,
                got: 2,
                ..
            }))
        ));
        assert!(matches!(
            emu.launch(
                "add",
                [1, 1, 1],
                [32, 1, 1],
                0,
                &[good[0], good[1], KernelArg::F32(1.0)]
            ),
            Err(LaunchError::Args(ArgError::Type {
                index: 2,
                expected: Param::I32,
                got: Param::F32,
                ..
            }))
        ));
        assert!(matches!(
            emu.launch("no_such_kernel", [1, 1, 1], [32, 1, 1], 0, &good),
            Err(LaunchError::Args(ArgError::UnknownKernel(_)))
        ));
        for block in [[0, 1, 1], [2048, 1, 1]] {
            assert!(matches!(
                emu.launch("add", [1, 1, 1], block, 0, &good),
                Err(LaunchError::Dimensions { .. })
            ));
        }
        emu.launch("add", [1, 1, 1], [32, 1, 1], 0, &good).unwrap();
    }
}

#[test]
fn every_kernel_named_is_in_the_source_and_the_gpu_preambles_include_nothing() {
    use crate::gpu::kernels::{source_hash, KERNELS};
    for p in Platform::ALL {
        let s = source(p);
        for k in KERNELS {
            assert!(
                s.contains(&format!("void {}(", k.name)) || s.contains(&format!("({}, ", k.name)),
                "{} missing from {p:?}",
                k.name
            );
        }
        if p != Platform::Emulator {
            assert!(!s.contains("#include"), "{p:?}");
        }
        assert_eq!(source_hash(p), source_hash(p));
    }
    assert_ne!(source_hash(Platform::Cuda), source_hash(Platform::Hip));
    for format in WeightFormat::ALL {
        let matvec = kernel(format.matvec_kernel()).unwrap();
        let embed = kernel(format.embed_kernel()).unwrap();
        assert_eq!(matvec.params.len(), 6, "{format:?}");
        assert_eq!(embed.params.len(), 5, "{format:?}");
        if let Some((name, _)) = format.activations().quantize_kernel() {
            kernel(name).unwrap();
        }
    }
    for dtype in [
        GgmlDType::Q4_0,
        GgmlDType::Q2K,
        GgmlDType::Q3K,
        GgmlDType::Q5K,
        GgmlDType::Q6K,
        GgmlDType::F16,
        GgmlDType::BF16,
    ] {
        let format = WeightFormat::from_ggml(dtype).unwrap();
        assert_eq!(format.block_bytes(), dtype.type_size(), "{dtype:?}");
        assert_eq!(format.block_values(), dtype.block_size(), "{dtype:?}");
    }
    assert_eq!(WeightFormat::from_ggml(GgmlDType::Q8_1), None);
}
