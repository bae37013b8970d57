//! Activations quantised to 8 bits, once per input, for every weight matrix that reads them.
//!
//! Each block keeps the sums of its quantised values, so that weight formats with an offset
//! (`Q4_1`'s min, the `- 8` of `Q4_0`, `Q4_K`'s mins, `Q6_K`'s `- 32`) fold the offset in with
//! one multiply per block instead of per value. Float weights read the activations as they
//! are.

use super::format::{ActivationForm, QuantFormat, QK, QK_K};
use super::KernelError;

/// 32 activations as `d * qs[i]`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Q8Block {
    /// Scale.
    pub(crate) d: f32,
    /// `d * Σ qs`, the block's sum as the quantised values represent it.
    pub(crate) s: f32,
    /// `Σ qs`, for kernels that fold an offset in before scaling.
    pub(crate) sum: i32,
    pub(crate) qs: [i8; QK],
}

impl Q8Block {
    const ZERO: Self = Self {
        d: 0.0,
        s: 0.0,
        sum: 0,
        qs: [0; QK],
    };
}

/// 256 activations as `d * qs[i]`, with the sum of each run of 16 quantised values.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Q8KBlock {
    pub(crate) d: f32,
    pub(crate) qs: [i8; QK_K],
    pub(crate) bsums: [i16; QK_K / 16],
}

impl Q8KBlock {
    const ZERO: Self = Self {
        d: 0.0,
        qs: [0; QK_K],
        bsums: [0; QK_K / 16],
    };
}

/// Rows of activations quantised for the fused kernels; reused from one call to the next so
/// that steady-state decoding allocates nothing.
#[derive(Debug, Clone, Default)]
pub struct QuantizedRows {
    rows: usize,
    cols: usize,
    q8: Vec<Q8Block>,
    q8k: Vec<Q8KBlock>,
    /// The activations as given, for float weights.
    f32s: Vec<f32>,
    has_q8: bool,
    has_q8k: bool,
    has_f32: bool,
}

impl QuantizedRows {
    /// An empty buffer.
    pub fn new() -> Self {
        Self::default()
    }

    /// Quantises `x`, rows of `cols` values each, into the forms that matrices of `formats`
    /// read. `cols` must be a whole number of blocks of each of those formats.
    pub fn quantize(
        &mut self,
        x: &[f32],
        cols: usize,
        formats: impl IntoIterator<Item = QuantFormat>,
    ) -> Result<(), KernelError> {
        if cols == 0 || !x.len().is_multiple_of(cols) {
            return Err(KernelError::InputShape { len: x.len(), cols });
        }
        self.rows = x.len() / cols;
        self.cols = cols;
        self.has_q8 = false;
        self.has_q8k = false;
        self.has_f32 = false;
        for format in formats {
            if !cols.is_multiple_of(format.block_values()) {
                return Err(KernelError::PartialBlock { format, cols });
            }
            match format.activation() {
                ActivationForm::Q8 if !self.has_q8 => {
                    self.q8.resize(x.len() / QK, Q8Block::ZERO);
                    for (xs, b) in x.chunks_exact(QK).zip(&mut self.q8) {
                        quantize_q8(xs, b);
                    }
                    self.has_q8 = true;
                }
                ActivationForm::Q8K if !self.has_q8k => {
                    self.q8k.resize(x.len() / QK_K, Q8KBlock::ZERO);
                    for (xs, b) in x.chunks_exact(QK_K).zip(&mut self.q8k) {
                        quantize_q8k(xs, b);
                    }
                    self.has_q8k = true;
                }
                ActivationForm::F32 if !self.has_f32 => {
                    self.f32s.clear();
                    self.f32s.extend_from_slice(x);
                    self.has_f32 = true;
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Rows quantised by the last [`quantize`](Self::quantize).
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Values per row.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Row `i` in 32-value blocks, if quantised in that form.
    pub(crate) fn q8_row(&self, i: usize) -> Option<&[Q8Block]> {
        let n = self.cols / QK;
        self.has_q8.then(|| &self.q8[i * n..(i + 1) * n])
    }

    /// Row `i` in 256-value blocks, if quantised in that form.
    pub(crate) fn q8k_row(&self, i: usize) -> Option<&[Q8KBlock]> {
        let n = self.cols / QK_K;
        self.has_q8k.then(|| &self.q8k[i * n..(i + 1) * n])
    }

    /// Row `i` as given, if kept for float weights.
    pub(crate) fn f32_row(&self, i: usize) -> Option<&[f32]> {
        let n = self.cols;
        self.has_f32.then(|| &self.f32s[i * n..(i + 1) * n])
    }

    pub(crate) fn has(&self, form: ActivationForm) -> bool {
        match form {
            ActivationForm::Q8 => self.has_q8,
            ActivationForm::Q8K => self.has_q8k,
            ActivationForm::F32 => self.has_f32,
        }
    }
}

/// Symmetric 8-bit quantisation: the largest magnitude maps to ±127.
fn scale_of(xs: &[f32]) -> (f32, f32) {
    let amax = xs.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = if d > 0.0 { 1.0 / d } else { 0.0 };
    (d, id)
}

fn quantize_q8(xs: &[f32], out: &mut Q8Block) {
    let (d, id) = scale_of(xs);
    let mut sum = 0i32;
    for (q, &v) in out.qs.iter_mut().zip(xs) {
        // |v * id| <= 127 up to rounding, and `as` saturates, so no value wraps.
        *q = (v * id).round_ties_even() as i8;
        sum += i32::from(*q);
    }
    out.d = d;
    out.s = d * sum as f32;
    out.sum = sum;
}

fn quantize_q8k(xs: &[f32], out: &mut Q8KBlock) {
    let (d, id) = scale_of(xs);
    for (q, &v) in out.qs.iter_mut().zip(xs) {
        *q = (v * id).round_ties_even() as i8;
    }
    for (s, qs) in out.bsums.iter_mut().zip(out.qs.chunks_exact(16)) {
        *s = qs.iter().map(|&q| i16::from(q)).sum();
    }
    out.d = d;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn q8_round_trips_within_half_a_step() {
        let x: Vec<f32> = (0..64)
            .map(|i| ((i * 37 % 23) as f32 - 11.0) * 0.37)
            .collect();
        let mut q = QuantizedRows::new();
        q.quantize(&x, 64, [QuantFormat::Q4_0, QuantFormat::Q6K])
            .unwrap_err();
        q.quantize(&x, 64, [QuantFormat::Q4_0]).unwrap();
        let row = q.q8_row(0).unwrap();
        for (b, xs) in row.iter().zip(x.chunks_exact(QK)) {
            let sum: i32 = b.qs.iter().map(|&v| i32::from(v)).sum();
            assert_eq!(b.s, b.d * sum as f32);
            assert_eq!(b.sum, sum);
            for (&qv, &v) in b.qs.iter().zip(xs) {
                assert!((b.d * f32::from(qv) - v).abs() <= b.d * 0.5 + 1e-6);
            }
        }
        assert!(q.q8k_row(0).is_none());
    }

    #[test]
    fn q8k_block_sums_match_values() {
        let x: Vec<f32> = (0..512).map(|i| (i as f32 * 0.61).sin()).collect();
        let mut q = QuantizedRows::new();
        q.quantize(&x, 256, [QuantFormat::Q6K]).unwrap();
        assert_eq!(q.rows(), 2);
        for i in 0..2 {
            let b = &q.q8k_row(i).unwrap()[0];
            for (g, &s) in b.bsums.iter().enumerate() {
                let want: i16 = b.qs[16 * g..16 * g + 16]
                    .iter()
                    .map(|&v| i16::from(v))
                    .sum();
                assert_eq!(s, want);
            }
        }
    }

    #[test]
    fn zero_rows_quantise_to_zero() {
        let mut q = QuantizedRows::new();
        q.quantize(&[0.0; 32], 32, [QuantFormat::Q8_0]).unwrap();
        let b = q.q8_row(0).unwrap()[0];
        assert_eq!((b.d, b.s), (0.0, 0.0));
        assert!(b.qs.iter().all(|&v| v == 0));
    }
}
