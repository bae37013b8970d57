//! Fused quantised matrix products on the CPU for the GGUF block formats.
//!
//! Weights stay in their GGUF blocks ([`QMatrix`]), or, for `Q4_0`, `Q8_0`, `Q4_K` and `Q6_K`,
//! in the same blocks with eight rows interleaved ([`QMatrix::interleaved`], how the CPU
//! decoder holds its `Q4_0`, `Q8_0` and `Q4_K` projections; with AVX-512, tiles of eight
//! activation rows take two such groups per 512-bit register); activations are quantised once per row to
//! 8-bit blocks ([`QuantizedRows`]: blocks of 32 for `Q4_0`, `Q4_1`, `Q5_0`, `Q5_1` and
//! `Q8_0`, super-blocks of 256 for `Q2_K` to `Q6_K`) and dotted block by block in integer arithmetic,
//! each block's sum scaled once in f32, as ggml does. Float weights (`F16`, `BF16`, `F32`) are
//! widened to f32 and dotted with the activations as they are. [`matmul_many`] runs one input
//! through several matrices in a single pass over the worker pool.
//!
//! On x86-64 the kernels use AVX-512 VNNI or AVX2 when the CPU has them (checked at run time;
//! `POD_CPU_KERNELS=avx2` or `=portable` caps the choice) and portable ones otherwise: on
//! aarch64, and on x86-64 CPUs without AVX2. The portable kernels are plain safe Rust written
//! for the compiler to vectorise (fixed-size arrays, integer products over whole runs of a
//! block, each block unpacked once per tile), so the same source gives SSE2 or NEON code, and
//! they give the same bits as the SIMD ones where those are tested to the bit. Models run on
//! them on every CPU; [`accelerated`] only says whether the hand-written SIMD ones run. A row's
//! result is computed the same way whatever it is batched with, so prefill and decode of the
//! same tokens give bit-identical projections.
//!
//! Accuracy: quantising activations to 8 bits moves each by at most half a step, which bounds
//! every output's error against an f32 product (the same trade llama.cpp makes);
//! `kernels/candle_reference.rs` checks that bound against candle on random blocks of every format.

#[cfg(test)]
mod candle_reference;
mod dot;
mod format;
mod interleave;
mod matmul;
mod quantize;
#[cfg(target_arch = "x86_64")]
mod x86;

pub use format::QuantFormat;
pub use matmul::{matmul_many, matmul_ranges, QMatrix};
pub use quantize::QuantizedRows;

/// Whether this CPU runs the hand-written SIMD kernels (AVX2 or AVX-512 VNNI). Without them
/// the portable ones run, with the same results (to the bit for the interleaved and float
/// layouts, within rounding for the others), more slowly.
pub fn accelerated() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        x86::level() > x86::Level::Portable
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// The instruction set the kernels use on this CPU, chosen at run time (after any
/// `POD_CPU_KERNELS` cap): `avx512-vnni`, `avx2` or `portable`.
pub fn cpu_level() -> &'static str {
    #[cfg(target_arch = "x86_64")]
    {
        match x86::level() {
            x86::Level::Avx512Vnni => "avx512-vnni",
            x86::Level::Avx2 => "avx2",
            x86::Level::Portable => "portable",
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        "portable"
    }
}

/// A fused kernel was handed inconsistent shapes or data.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    /// The input's length is not a whole number of rows.
    #[error("{len} activations are not whole rows of {cols}")]
    InputShape {
        /// Values given.
        len: usize,
        /// Values per row.
        cols: usize,
    },
    /// Rows of this width do not split into whole blocks of the format.
    #[error("rows of {cols} values are not whole {format:?} blocks")]
    PartialBlock {
        /// The format.
        format: QuantFormat,
        /// Values per row.
        cols: usize,
    },
    /// A weight matrix's bytes do not match its shape.
    #[error("{format:?} matrix of {rows}x{cols} cannot have {len} bytes")]
    DataSize {
        /// The format.
        format: QuantFormat,
        /// Rows.
        rows: usize,
        /// Values per row.
        cols: usize,
        /// Bytes given.
        len: usize,
    },
    /// The activations are not as wide as the matrix's rows.
    #[error("matrix rows have {expected} values, activations {got}")]
    InputWidth {
        /// The matrix's row width.
        expected: usize,
        /// The activations' row width.
        got: usize,
    },
    /// The activations were not quantised in the form this format reads.
    #[error("activations were not quantised for {0:?} weights")]
    NotQuantizedFor(QuantFormat),
    /// An output buffer has the wrong length.
    #[error("output holds {got} values, the product has {expected}")]
    OutputSize {
        /// Values the product has.
        expected: usize,
        /// Values the buffer holds.
        got: usize,
    },
    /// A different number of matrices and output buffers.
    #[error("{matrices} matrices but {outputs} output buffers")]
    OutputCount {
        /// Matrices given.
        matrices: usize,
        /// Output buffers given.
        outputs: usize,
    },
    /// Rows asked of a matrix or of the activations that it does not have.
    #[error("rows {start}..{start}+{rows} asked of {available}")]
    RowRange {
        /// First row asked.
        start: usize,
        /// Rows asked.
        rows: usize,
        /// Rows there are.
        available: usize,
    },
}

/// Random weights and inputs for the kernel tests.
#[cfg(test)]
pub(crate) mod testutil {
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    use super::QuantFormat;

    fn put_f16(b: &mut [u8], at: usize, v: f32) {
        b[at..at + 2].copy_from_slice(&half::f16::from_f32(v).to_le_bytes());
    }

    /// `rows` rows of `cols` values of random blocks with plausible scales.
    pub(crate) fn random_matrix(
        format: QuantFormat,
        rows: usize,
        cols: usize,
        seed: u64,
    ) -> Vec<u8> {
        let mut rng = StdRng::seed_from_u64(seed);
        let blocks = rows * cols / format.block_values();
        let mut data = vec![0u8; blocks * format.block_bytes()];
        rng.fill(&mut data[..]);
        if format.block_values() == 1 {
            // Float weights: random values of trained models' size, not random bits.
            for b in data.chunks_exact_mut(format.block_bytes()) {
                let v = rng.random_range(-0.08..0.08f32);
                match format {
                    QuantFormat::F16 => b.copy_from_slice(&half::f16::from_f32(v).to_le_bytes()),
                    QuantFormat::BF16 => b.copy_from_slice(&half::bf16::from_f32(v).to_le_bytes()),
                    _ => b.copy_from_slice(&v.to_le_bytes()),
                }
            }
            return data;
        }
        for b in data.chunks_exact_mut(format.block_bytes()) {
            let sign = if rng.random::<bool>() { 1.0 } else { -1.0 };
            let d = sign * rng.random_range(0.002..0.05f32);
            match format {
                QuantFormat::Q4_0 | QuantFormat::Q5_0 | QuantFormat::Q8_0 => put_f16(b, 0, d),
                QuantFormat::Q4_1 | QuantFormat::Q5_1 => {
                    put_f16(b, 0, d.abs());
                    put_f16(b, 2, rng.random_range(-0.4..0.1f32));
                }
                QuantFormat::Q4K | QuantFormat::Q5K => {
                    put_f16(b, 0, d.abs() / 10.0);
                    put_f16(b, 2, rng.random_range(0.0..0.005f32));
                }
                QuantFormat::Q6K => put_f16(b, 208, d.abs() / 10.0),
                QuantFormat::Q2K => {
                    put_f16(b, 80, d.abs() / 4.0);
                    put_f16(b, 82, rng.random_range(0.0..0.005f32));
                }
                QuantFormat::Q3K => put_f16(b, 108, d / 10.0),
                QuantFormat::F16 | QuantFormat::BF16 | QuantFormat::F32 => {}
            }
        }
        data
    }

    /// `len` activations, mostly small with a few large ones, as in a transformer.
    pub(crate) fn random_input(len: usize, seed: u64) -> Vec<f32> {
        let mut rng = StdRng::seed_from_u64(seed);
        (0..len)
            .map(|_| {
                let v: f32 = rng.random_range(-1.0..1.0);
                if rng.random_range(0..50) == 0 {
                    v * 20.0
                } else {
                    v
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_named_level_is_the_one_that_runs() {
        let level = super::cpu_level();
        assert!(
            ["avx512-vnni", "avx2", "portable"].contains(&level),
            "{level}"
        );
        assert_eq!(super::accelerated(), level != "portable");
    }
}
