use super::super::testutil::{random_input, random_matrix};
use super::*;

fn matrix(format: QuantFormat, rows: usize, cols: usize, seed: u64) -> QMatrix {
    let data = random_matrix(format, rows, cols, seed);
    QMatrix::new(format, rows, cols, data.into()).unwrap()
}

/// Σ |w_ij x_j| for each output, the scale of its rounding error.
fn magnitudes(w: &QMatrix, x: &[f32]) -> Vec<f32> {
    let mut row = vec![0.0; w.cols];
    let mut out = Vec::new();
    for xs in x.chunks_exact(w.cols) {
        for j in 0..w.rows {
            w.dequantize_row(j, &mut row);
            out.push(row.iter().zip(xs).map(|(a, b)| (a * b).abs()).sum());
        }
    }
    out
}

#[test]
fn rows_do_not_depend_on_batch_or_grouping() {
    for format in QuantFormat::ALL {
        let k = 512;
        let a = matrix(format, 40, k, 1);
        let b = matrix(format, 24, k, 2);
        let m = 7;
        let x = random_input(m * k, 3);
        let mut q = QuantizedRows::new();
        q.quantize(&x, k, [format]).unwrap();
        let mut ya = vec![0.0; m * 40];
        let mut yb = vec![0.0; m * 24];
        matmul_many(&[&a, &b], &q, &mut [&mut ya, &mut yb]).unwrap();
        for r in 0..m {
            let mut q1 = QuantizedRows::new();
            q1.quantize(&x[r * k..(r + 1) * k], k, [format]).unwrap();
            let mut y1 = vec![0.0; 40];
            a.matmul(&q1, &mut y1).unwrap();
            assert_eq!(&ya[r * 40..(r + 1) * 40], &y1[..], "{format:?} row {r}");
            let mut y1 = vec![0.0; 24];
            b.matmul(&q1, &mut y1).unwrap();
            assert_eq!(&yb[r * 24..(r + 1) * 24], &y1[..], "{format:?} row {r}");
        }
    }
}

/// A run of rows of a matrix, read in place, against runs of activation rows in one
/// pass: the same bits as a copy of those rows against each activation row alone.
#[test]
fn row_views_against_row_ranges_match_each_row_alone() {
    for format in QuantFormat::ALL {
        let k = 256;
        let whole = matrix(format, 48, k, 7);
        let views = [
            whole.rows_view(0, 16).unwrap(),
            whole.rows_view(32, 16).unwrap(),
        ];
        let bytes = views[1].bytes().to_vec();
        let copy = QMatrix::new(format, 16, k, bytes.into()).unwrap();
        let m = 9;
        let x = random_input(m * k, 8);
        let mut q = QuantizedRows::new();
        q.quantize(&x, k, [format]).unwrap();
        let ranges = [0..5, 3..9];
        let mut y0 = vec![0.0; 5 * 16];
        let mut y1 = vec![0.0; 6 * 16];
        let ws = [&views[0], &views[1]];
        matmul_ranges(&ws, &q, &ranges, &mut [&mut y0, &mut y1]).unwrap();
        for (g, (range, y)) in ranges.iter().zip([&y0, &y1]).enumerate() {
            for (i, r) in range.clone().enumerate() {
                let mut q1 = QuantizedRows::new();
                q1.quantize(&x[r * k..(r + 1) * k], k, [format]).unwrap();
                let mut alone = vec![0.0; 16];
                let w = if g == 0 { &views[0] } else { &copy };
                w.matmul(&q1, &mut alone).unwrap();
                assert_eq!(&y[i * 16..(i + 1) * 16], &alone[..], "{format:?} {g} {r}");
            }
        }
        assert!(whole.rows_view(40, 16).is_err());
        assert!(matmul_ranges(&ws, &q, &[0..5, 3..10], &mut [&mut y0, &mut y1]).is_err());
    }
}

/// A view of whole groups of an interleaved matrix multiplies as those rows of the whole
/// matrix do; a view that would cut a group is refused.
#[test]
fn views_of_interleaved_matrices_cut_whole_groups_only() {
    for format in [QuantFormat::Q4_0, QuantFormat::Q4K] {
        let k = 256;
        let whole = matrix(format, 32, k, 5).interleaved();
        assert!(whole.is_interleaved());
        let view = whole.rows_view(8, 16).unwrap();
        assert!(view.is_interleaved());
        assert_eq!(view.bytes().len() * 2, whole.bytes().len());
        let x = random_input(3 * k, 6);
        let mut q = QuantizedRows::new();
        q.quantize(&x, k, [format]).unwrap();
        let (mut all, mut part) = (vec![0.0; 3 * 32], vec![0.0; 3 * 16]);
        whole.matmul(&q, &mut all).unwrap();
        view.matmul(&q, &mut part).unwrap();
        for t in 0..3 {
            assert_eq!(&part[t * 16..(t + 1) * 16], &all[t * 32 + 8..t * 32 + 24]);
        }
        let mut a = vec![0.0; k];
        let mut b = vec![0.0; k];
        view.dequantize_row(3, &mut a);
        whole.dequantize_row(11, &mut b);
        assert_eq!(a, b, "{format:?}");
        assert!(whole.rows_view(4, 8).is_err());
        assert!(whole.rows_view(8, 12).is_err());
    }
}

/// Each instruction set the CPU has against the portable kernels, over 1 to 4 rows.
#[cfg(target_arch = "x86_64")]
#[test]
fn simd_kernels_agree_with_portable() {
    use super::super::x86::{self, Level};
    for level in [Level::Avx2, Level::Avx512Vnni] {
        if level > x86::level() {
            continue;
        }
        for format in QuantFormat::ALL {
            let (n, k) = (9, 768);
            let w = matrix(format, n, k, 11);
            let x = random_input(4 * k, 12);
            let mag = magnitudes(&w, &x);
            let mut q = QuantizedRows::new();
            q.quantize(&x, k, [format]).unwrap();
            let (data, rb) = (&w.data[..], w.row_bytes);
            let mut fast = vec![vec![0.0f32; n]; 4];
            let mut slow = vec![vec![0.0f32; n]; 4];
            let mut fo: Vec<&mut [f32]> = fast.iter_mut().map(|v| &mut v[..]).collect();
            let mut so: Vec<&mut [f32]> = slow.iter_mut().map(|v| &mut v[..]).collect();
            if format.activation() == ActivationForm::Q8 {
                let xs: [_; 4] = std::array::from_fn(|t| q.q8_row(t).unwrap());
                assert!(x86::tile_q8_at::<4>(level, format, data, rb, xs, &mut fo));
                match format {
                    QuantFormat::Q4_0 => dot::tile_q8::<f::Q4_0, 4>(data, rb, xs, &mut so),
                    QuantFormat::Q4_1 => dot::tile_q8::<f::Q4_1, 4>(data, rb, xs, &mut so),
                    QuantFormat::Q5_0 => dot::tile_q8::<f::Q5_0, 4>(data, rb, xs, &mut so),
                    QuantFormat::Q5_1 => dot::tile_q8::<f::Q5_1, 4>(data, rb, xs, &mut so),
                    _ => dot::tile_q8::<f::Q8_0, 4>(data, rb, xs, &mut so),
                }
            } else if format.activation() == ActivationForm::Q8K {
                let xs: [_; 4] = std::array::from_fn(|t| q.q8k_row(t).unwrap());
                assert!(x86::tile_q8k::<4>(format, data, rb, xs, &mut fo));
                dot::tile_q8k::<4>(format, data, rb, xs, &mut so);
            } else {
                let xs: [_; 4] = std::array::from_fn(|t| q.f32_row(t).unwrap());
                assert!(x86::tile_float::<4>(format, data, rb, xs, &mut fo));
                dot::tile_float::<4>(format, data, rb, xs, &mut so);
            }
            for t in 0..4 {
                for j in 0..n {
                    let (a, b) = (fo[t][j], so[t][j]);
                    let tol = 1e-6 * mag[t * n + j];
                    assert!(
                        (a - b).abs() <= tol,
                        "{level:?} {format:?} [{t},{j}]: {a} vs {b}"
                    );
                }
            }
        }
    }
}

/// The float kernels keep the portable kernels' order of operations, so they agree to the
/// bit, at widths with and without an odd run of 8 and a tail.
#[cfg(target_arch = "x86_64")]
#[test]
fn float_kernels_agree_with_portable_to_the_bit() {
    use super::super::x86::{self, Level};
    if x86::level() < Level::Avx2 {
        return;
    }
    for format in [QuantFormat::F16, QuantFormat::BF16, QuantFormat::F32] {
        for k in [8, 20, 100, 256, 588] {
            let n = 5;
            let w = matrix(format, n, k, 21);
            let x = random_input(3 * k, 22);
            let mut q = QuantizedRows::new();
            q.quantize(&x, k, [format]).unwrap();
            let mut fast = vec![vec![0.0f32; n]; 3];
            let mut slow = vec![vec![0.0f32; n]; 3];
            let mut fo: Vec<&mut [f32]> = fast.iter_mut().map(|v| &mut v[..]).collect();
            let mut so: Vec<&mut [f32]> = slow.iter_mut().map(|v| &mut v[..]).collect();
            let xs: [_; 3] = std::array::from_fn(|t| q.f32_row(t).unwrap());
            assert!(x86::tile_float::<3>(
                format,
                &w.data,
                w.row_bytes,
                xs,
                &mut fo
            ));
            dot::tile_float::<3>(format, &w.data, w.row_bytes, xs, &mut so);
            assert_eq!(fast, slow, "{format:?} k={k}");
            assert!(fast.iter().flatten().any(|v| *v != 0.0), "{format:?} k={k}");
        }
    }
}

/// The interleaved layout keeps every row's result independent of its batch and grouping,
/// and within rounding of the GGUF layout's (the sums are the same, added in another order).
#[test]
fn interleaved_rows_do_not_depend_on_batch_and_match_gguf_layout() {
    for format in [
        QuantFormat::Q4_0,
        QuantFormat::Q8_0,
        QuantFormat::Q4K,
        QuantFormat::Q6K,
    ] {
        let (k, m) = (512, 11);
        let plain = [matrix(format, 40, k, 1), matrix(format, 24, k, 2)];
        let [a, b] = plain.clone().map(|w| w.interleaved());
        assert!(a.is_interleaved() && b.is_interleaved());
        let x = random_input(m * k, 3);
        let mut q = QuantizedRows::new();
        q.quantize(&x, k, [format]).unwrap();
        let mut ya = vec![0.0; m * 40];
        let mut yb = vec![0.0; m * 24];
        matmul_many(&[&a, &b], &q, &mut [&mut ya, &mut yb]).unwrap();
        for (w, y) in [(&a, &ya), (&b, &yb)] {
            let n = w.rows();
            for r in 0..m {
                let mut q1 = QuantizedRows::new();
                q1.quantize(&x[r * k..(r + 1) * k], k, [format]).unwrap();
                let mut y1 = vec![0.0; n];
                w.matmul(&q1, &mut y1).unwrap();
                assert_eq!(&y[r * n..(r + 1) * n], &y1[..], "{format:?} row {r}");
            }
        }
        let mut yp = vec![0.0; m * 40];
        plain[0].matmul(&q, &mut yp).unwrap();
        let mag = magnitudes(&plain[0], &x);
        for (i, (&u, &v)) in ya.iter().zip(&yp).enumerate() {
            assert!(
                (u - v).abs() <= 1e-5 * mag[i],
                "{format:?} [{i}]: {u} vs {v}"
            );
        }
    }
}

#[test]
fn interleaving_keeps_the_gguf_blocks_and_rows() {
    for format in QuantFormat::ALL {
        let w = matrix(format, 16, 512, 9);
        let v = w.interleaved();
        let expect = matches!(
            format,
            QuantFormat::Q4_0 | QuantFormat::Q8_0 | QuantFormat::Q4K | QuantFormat::Q6K
        );
        assert_eq!(v.is_interleaved(), expect, "{format:?}");
        assert_eq!(&v.gguf_blocks()[..], &w.data()[..], "{format:?}");
        let (mut a, mut b) = (vec![0.0; 512], vec![0.0; 512]);
        for i in 0..16 {
            w.dequantize_row(i, &mut a);
            v.dequantize_row(i, &mut b);
            assert_eq!(a, b, "{format:?} row {i}");
        }
    }
    assert!(!matrix(QuantFormat::Q4K, 12, 256, 1)
        .interleaved()
        .is_interleaved());
}

/// The interleaved kernels of each instruction set give the portable ones' bits, at a tile
/// width of 3 and of 8, where AVX-512 takes two groups at once and leaves the odd one to
/// the 256-bit kernel.
#[cfg(target_arch = "x86_64")]
#[test]
fn interleaved_simd_kernels_agree_with_portable_to_the_bit() {
    use super::super::x86::{self, Level};
    fn check<const T: usize>(level: Level, format: QuantFormat) {
        let (n, k) = (40, 768);
        let w = matrix(format, n, k, 13).interleaved();
        let nb = k / format.block_values();
        let x = random_input(T * k, 14);
        let mut q = QuantizedRows::new();
        q.quantize(&x, k, [format]).unwrap();
        let mut fast = vec![vec![0.0f32; n]; T];
        let mut slow = vec![vec![0.0f32; n]; T];
        let mut fo: Vec<&mut [f32]> = fast.iter_mut().map(|v| &mut v[..]).collect();
        let mut so: Vec<&mut [f32]> = slow.iter_mut().map(|v| &mut v[..]).collect();
        let q8: [_; T] = std::array::from_fn(|t| q.q8_row(t).unwrap_or_default());
        let q8k: [_; T] = std::array::from_fn(|t| q.q8k_row(t).unwrap_or_default());
        let (data, out) = (w.data(), &mut fo);
        let ran = match format {
            QuantFormat::Q4_0 => x86::tile_x8_q4_0::<T>(level, data, nb, q8, out),
            QuantFormat::Q8_0 => x86::tile_x8_q8_0::<T>(level, data, nb, q8, out),
            QuantFormat::Q4K => x86::tile_x8_q4k::<T>(level, data, nb, q8k, out),
            _ => x86::tile_x8_q6k::<T>(level, data, nb, q8k, out),
        };
        assert!(ran, "{level:?} {format:?}");
        match format {
            QuantFormat::Q4_0 => interleave::tile_q4_0::<T>(data, nb, q8, &mut so),
            QuantFormat::Q8_0 => interleave::tile_q8_0::<T>(data, nb, q8, &mut so),
            QuantFormat::Q4K => interleave::tile_q4k::<T>(data, nb, q8k, &mut so),
            _ => interleave::tile_q6k::<T>(data, nb, q8k, &mut so),
        }
        assert_eq!(fast, slow, "{level:?} {format:?} T={T}");
        assert!(fast.iter().flatten().all(|v| *v != 0.0), "{format:?}");
    }
    for level in [Level::Avx2, Level::Avx512Vnni] {
        if level > x86::level() {
            continue;
        }
        for format in [
            QuantFormat::Q4_0,
            QuantFormat::Q8_0,
            QuantFormat::Q4K,
            QuantFormat::Q6K,
        ] {
            check::<3>(level, format);
            check::<8>(level, format);
        }
    }
}

#[test]
fn shapes_are_checked() {
    let w = matrix(QuantFormat::Q4_1, 8, 64, 5);
    let mut q = QuantizedRows::new();
    q.quantize(&random_input(64, 6), 64, [QuantFormat::Q4_1])
        .unwrap();
    let mut out = vec![0.0; 7];
    assert!(matches!(
        w.matmul(&q, &mut out),
        Err(KernelError::OutputSize { .. })
    ));
    let k = matrix(QuantFormat::Q6K, 8, 256, 5);
    let mut out = vec![0.0; 8];
    assert!(k.matmul(&q, &mut out).is_err());
    assert!(QMatrix::new(QuantFormat::Q8_0, 2, 32, vec![0; 67].into()).is_err());
    assert!(QMatrix::new(QuantFormat::Q8_0, 2, 48, vec![0; 0].into()).is_err());
}
