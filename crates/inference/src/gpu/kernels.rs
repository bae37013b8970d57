//! The kernel source, in the common subset of CUDA and HIP, and its per-platform preambles.
//!
//! One body of kernels (`kernels/body.cu`) follows a short preamble per [`Platform`] that
//! defines what differs: the warp width `POD_WARP`, `pod_shfl_xor` (a shuffle inside a
//! 32-lane group), `pod_dot4` (`__dp4a` on CUDA, `__builtin_amdgcn_sdot4` on gfx906, plain
//! C++ in the emulator), the `pod_*` integer types and `POD_DYNAMIC_SHARED`. Neither runtime
//! compiler is given include paths, so the GPU preambles include no headers.
//!
//! Runtimes launch kernels by name with the parameters [`KERNELS`] lists, and check the
//! arguments against them before a launch.
//!
//! Layouts the kernels share with the host side:
//! - weights stay in GGUF's blocks, row after row, as [`QMatrix`](crate::kernels::QMatrix)
//!   holds them;
//! - activations for the 32-value formats are quantised to [`Q8_BLOCK_BYTES`]-byte blocks
//!   (f32 scale, f32 scaled sum, 32 signed bytes) and for the K-quants to
//!   [`Q8K_BLOCK_BYTES`]-byte super-blocks (f32 scale, 256 signed bytes, sixteen i16 sums of
//!   runs of 16), the same numbers the CPU path computes;
//! - `matvec_*` writes `y[t * rows + r]`, the dot of weight row `r` with activation row `t`,
//!   unpacking each weight block once per activation row (meant for a pass of one row);
//!   `matmul_*` writes the same bits, unpacking each weight block once per tile of
//!   [`MATMUL_TILE`] activation rows (passes of several rows: prompts, batches).

use candle_core::quantized::GgmlDType;

use crate::kernels::QuantFormat;

/// Where a kernel source is compiled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Platform {
    /// NVIDIA, through NVRTC (warp of 32).
    Cuda,
    /// AMD, through hiprtc (wave of 64 on GCN/CDNA such as gfx906, 32 on RDNA).
    Hip,
    /// The CPU emulator, through the host C++ compiler with `-DPOD_WARP=32` or `64`.
    Emulator,
}

impl Platform {
    /// Every platform.
    pub const ALL: [Platform; 3] = [Platform::Cuda, Platform::Hip, Platform::Emulator];

    fn preamble(self) -> &'static str {
        match self {
            Platform::Cuda => include_str!("kernels/cuda.h"),
            Platform::Hip => include_str!("kernels/hip.h"),
            Platform::Emulator => include_str!("kernels/emu.h"),
        }
    }
}

/// The kernels, the same on every platform.
const BODY: &str = include_str!("kernels/body.cu");

/// Bytes of one quantised block of 32 activations.
pub const Q8_BLOCK_BYTES: usize = 40;
/// Bytes of one quantised super-block of 256 activations.
pub const Q8K_BLOCK_BYTES: usize = 292;

/// Activation rows one block of a `matmul_*` kernel takes (`POD_TILE` in the source): the
/// launch's grid has `ceil(batch / MATMUL_TILE)` blocks in y.
pub const MATMUL_TILE: usize = 8;

/// Positions whose scores the attention kernel holds in shared memory at once
/// (`POD_ATTENTION_CHUNK` in the source); longer contexts are taken chunk after chunk. A
/// multiple of the attention kernel's block size, so that chunking changes no sum.
pub const ATTENTION_CHUNK: usize = 512;

/// The complete source for `platform`: its preamble, the constants shared with the host,
/// then the kernels.
pub fn source(platform: Platform) -> String {
    let preamble = platform.preamble();
    let constants =
        format!("#define POD_TILE {MATMUL_TILE}\n#define POD_ATTENTION_CHUNK {ATTENTION_CHUNK}\n");
    let mut s = String::with_capacity(preamble.len() + constants.len() + BODY.len() + 1);
    s.push_str(preamble);
    s.push('\n');
    s.push_str(&constants);
    s.push_str(BODY);
    s
}

/// A stable 64-bit hash (FNV-1a) of [`source`]`(platform)`, for caches of compiled code: it
/// changes whenever the source does, and is the same from one build of pod to the next.
pub fn source_hash(platform: Platform) -> u64 {
    source(platform)
        .bytes()
        .fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
        })
}

/// The type of one kernel parameter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Param {
    /// A device address.
    Ptr,
    /// A 32-bit signed integer.
    I32,
    /// A 32-bit float.
    F32,
}

impl Param {
    /// The letter the emulator's compiled signatures use for this type.
    pub const fn letter(self) -> char {
        match self {
            Param::Ptr => 'p',
            Param::I32 => 'i',
            Param::F32 => 'f',
        }
    }
}

/// One argument of a launch.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum KernelArg {
    /// A device address (in the emulator, a host address).
    Ptr(u64),
    /// A 32-bit signed integer.
    I32(i32),
    /// A 32-bit float.
    F32(f32),
}

impl KernelArg {
    /// The parameter type this argument fills.
    pub const fn param(&self) -> Param {
        match self {
            KernelArg::Ptr(_) => Param::Ptr,
            KernelArg::I32(_) => Param::I32,
            KernelArg::F32(_) => Param::F32,
        }
    }
}

/// A kernel's name (its unmangled symbol) and parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KernelSpec {
    /// The symbol.
    pub name: &'static str,
    /// Parameter types, in order.
    pub params: &'static [Param],
}

/// Arguments that do not fit a kernel's parameters.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ArgError {
    /// No kernel of this name.
    #[error("no kernel named {0}")]
    UnknownKernel(String),
    /// Too many or too few arguments.
    #[error("{kernel} takes {expected} arguments, {got} given")]
    Count {
        /// The kernel.
        kernel: &'static str,
        /// Parameters it has.
        expected: usize,
        /// Arguments given.
        got: usize,
    },
    /// An argument of the wrong type.
    #[error("argument {index} of {kernel} must be {expected:?}, not {got:?}")]
    Type {
        /// The kernel.
        kernel: &'static str,
        /// Position of the argument.
        index: usize,
        /// The parameter's type.
        expected: Param,
        /// The argument's type.
        got: Param,
    },
}

impl KernelSpec {
    /// Checks that `args` fill this kernel's parameters.
    pub fn check(&self, args: &[KernelArg]) -> Result<(), ArgError> {
        if args.len() != self.params.len() {
            return Err(ArgError::Count {
                kernel: self.name,
                expected: self.params.len(),
                got: args.len(),
            });
        }
        for (index, (arg, &expected)) in args.iter().zip(self.params).enumerate() {
            if arg.param() != expected {
                return Err(ArgError::Type {
                    kernel: self.name,
                    index,
                    expected,
                    got: arg.param(),
                });
            }
        }
        Ok(())
    }
}

/// The kernel called `name`.
pub fn kernel(name: &str) -> Result<&'static KernelSpec, ArgError> {
    KERNELS
        .iter()
        .find(|k| k.name == name)
        .ok_or_else(|| ArgError::UnknownKernel(name.to_owned()))
}

/// A weight matrix's format on the GPU: every format of the fused CPU kernels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WeightFormat {
    /// 4-bit values with one scale per 32.
    Q4_0,
    /// 4-bit values with one scale and one offset per 32.
    Q4_1,
    /// 5-bit values with one scale per 32.
    Q5_0,
    /// 5-bit values with one scale and one offset per 32 (24 bytes: `d`, `m`, 4 bytes of fifth
    /// bits, 16 bytes of nibbles).
    Q5_1,
    /// 8-bit values with one scale per 32.
    Q8_0,
    /// 2-bit values in super-blocks of 256 (84 bytes: sixteen bytes of 4-bit scales and mins,
    /// 64 bytes of values, `d`, `dmin`).
    Q2K,
    /// 3-bit values in super-blocks of 256 (110 bytes: 32 bytes of third bits, 64 bytes of
    /// low bits, sixteen 6-bit signed scales in 12 bytes, `d`).
    Q3K,
    /// 4-bit values in super-blocks of 256 with 6-bit sub-block scales and mins.
    Q4K,
    /// 5-bit values in super-blocks of 256 (176 bytes: `d`, `dmin`, 12 bytes of scales and
    /// mins packed as `Q4_K`'s, 32 bytes of fifth bits, 128 bytes of nibbles).
    Q5K,
    /// 6-bit values in super-blocks of 256 with 8-bit sub-block scales.
    Q6K,
    /// IEEE half floats.
    F16,
    /// bfloat16: the top half of an f32.
    BF16,
    /// 32-bit floats.
    F32,
}

/// What a `matvec_*` kernel reads as its activation rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activations {
    /// `quantize_q8`'s 32-value blocks.
    Q8,
    /// `quantize_q8k`'s 256-value super-blocks.
    Q8K,
    /// Plain f32 rows.
    F32,
}

impl WeightFormat {
    /// Every format the kernels read.
    pub const ALL: [WeightFormat; 13] = [
        WeightFormat::Q4_0,
        WeightFormat::Q4_1,
        WeightFormat::Q5_0,
        WeightFormat::Q5_1,
        WeightFormat::Q8_0,
        WeightFormat::Q2K,
        WeightFormat::Q3K,
        WeightFormat::Q4K,
        WeightFormat::Q5K,
        WeightFormat::Q6K,
        WeightFormat::F16,
        WeightFormat::BF16,
        WeightFormat::F32,
    ];

    /// The GPU format of a CPU kernel format; every one has GPU kernels, the `Option` is for
    /// formats the CPU kernels may learn first.
    pub const fn of(format: QuantFormat) -> Option<Self> {
        Some(match format {
            QuantFormat::Q4_0 => Self::Q4_0,
            QuantFormat::Q4_1 => Self::Q4_1,
            QuantFormat::Q5_0 => Self::Q5_0,
            QuantFormat::Q5_1 => Self::Q5_1,
            QuantFormat::Q8_0 => Self::Q8_0,
            QuantFormat::Q2K => Self::Q2K,
            QuantFormat::Q3K => Self::Q3K,
            QuantFormat::Q4K => Self::Q4K,
            QuantFormat::Q5K => Self::Q5K,
            QuantFormat::Q6K => Self::Q6K,
            QuantFormat::F16 => Self::F16,
            QuantFormat::BF16 => Self::BF16,
            QuantFormat::F32 => Self::F32,
        })
    }

    /// The same format as the CPU kernels name it.
    pub const fn quant(self) -> QuantFormat {
        match self {
            Self::Q4_0 => QuantFormat::Q4_0,
            Self::Q4_1 => QuantFormat::Q4_1,
            Self::Q5_0 => QuantFormat::Q5_0,
            Self::Q5_1 => QuantFormat::Q5_1,
            Self::Q8_0 => QuantFormat::Q8_0,
            Self::Q2K => QuantFormat::Q2K,
            Self::Q3K => QuantFormat::Q3K,
            Self::Q4K => QuantFormat::Q4K,
            Self::Q5K => QuantFormat::Q5K,
            Self::Q6K => QuantFormat::Q6K,
            Self::F16 => QuantFormat::F16,
            Self::BF16 => QuantFormat::BF16,
            Self::F32 => QuantFormat::F32,
        }
    }

    /// The format of a GGUF tensor type, or `None` when no kernel reads it.
    pub fn from_ggml(dtype: GgmlDType) -> Option<Self> {
        QuantFormat::from_ggml(dtype).and_then(Self::of)
    }

    /// Values per block (1 for unquantised weights).
    pub const fn block_values(self) -> usize {
        self.quant().block_values()
    }

    /// Bytes per block.
    pub const fn block_bytes(self) -> usize {
        self.quant().block_bytes()
    }

    /// The activation rows its `matvec_*` kernel reads.
    pub const fn activations(self) -> Activations {
        match self {
            Self::Q2K | Self::Q3K | Self::Q4K | Self::Q5K | Self::Q6K => Activations::Q8K,
            Self::Q4_0 | Self::Q4_1 | Self::Q5_0 | Self::Q5_1 | Self::Q8_0 => Activations::Q8,
            Self::F16 | Self::BF16 | Self::F32 => Activations::F32,
        }
    }

    /// Its `matvec_*` kernel.
    pub const fn matvec_kernel(self) -> &'static str {
        match self {
            Self::Q4_0 => "matvec_q4_0",
            Self::Q4_1 => "matvec_q4_1",
            Self::Q5_0 => "matvec_q5_0",
            Self::Q5_1 => "matvec_q5_1",
            Self::Q8_0 => "matvec_q8_0",
            Self::Q2K => "matvec_q2_k",
            Self::Q3K => "matvec_q3_k",
            Self::Q4K => "matvec_q4_k",
            Self::Q5K => "matvec_q5_k",
            Self::Q6K => "matvec_q6_k",
            Self::F16 => "matvec_f16",
            Self::BF16 => "matvec_bf16",
            Self::F32 => "matvec_f32",
        }
    }

    /// Its tiled `matmul_*` kernel: the products of [`matvec_kernel`](Self::matvec_kernel),
    /// the same bits, for passes of several rows.
    pub const fn matmul_kernel(self) -> &'static str {
        match self {
            Self::Q4_0 => "matmul_q4_0",
            Self::Q4_1 => "matmul_q4_1",
            Self::Q5_0 => "matmul_q5_0",
            Self::Q5_1 => "matmul_q5_1",
            Self::Q8_0 => "matmul_q8_0",
            Self::Q2K => "matmul_q2_k",
            Self::Q3K => "matmul_q3_k",
            Self::Q4K => "matmul_q4_k",
            Self::Q5K => "matmul_q5_k",
            Self::Q6K => "matmul_q6_k",
            Self::F16 => "matmul_f16",
            Self::BF16 => "matmul_bf16",
            Self::F32 => "matmul_f32",
        }
    }

    /// Its `matvec_ids_*` kernel: products of a mixture's chosen experts, each pair's
    /// expert read from a device buffer.
    pub const fn matvec_ids_kernel(self) -> &'static str {
        match self {
            Self::Q4_0 => "matvec_ids_q4_0",
            Self::Q4_1 => "matvec_ids_q4_1",
            Self::Q5_0 => "matvec_ids_q5_0",
            Self::Q5_1 => "matvec_ids_q5_1",
            Self::Q8_0 => "matvec_ids_q8_0",
            Self::Q2K => "matvec_ids_q2_k",
            Self::Q3K => "matvec_ids_q3_k",
            Self::Q4K => "matvec_ids_q4_k",
            Self::Q5K => "matvec_ids_q5_k",
            Self::Q6K => "matvec_ids_q6_k",
            Self::F16 => "matvec_ids_f16",
            Self::BF16 => "matvec_ids_bf16",
            Self::F32 => "matvec_ids_f32",
        }
    }

    /// Its `embed_*` kernel.
    pub const fn embed_kernel(self) -> &'static str {
        match self {
            Self::Q4_0 => "embed_q4_0",
            Self::Q4_1 => "embed_q4_1",
            Self::Q5_0 => "embed_q5_0",
            Self::Q5_1 => "embed_q5_1",
            Self::Q8_0 => "embed_q8_0",
            Self::Q2K => "embed_q2_k",
            Self::Q3K => "embed_q3_k",
            Self::Q4K => "embed_q4_k",
            Self::Q5K => "embed_q5_k",
            Self::Q6K => "embed_q6_k",
            Self::F16 => "embed_f16",
            Self::BF16 => "embed_bf16",
            Self::F32 => "embed_f32",
        }
    }
}

impl Activations {
    /// The kernel that quantises f32 rows into this form, and the bytes it writes per
    /// [`values`](Self::values) activations; `None` for plain rows.
    pub const fn quantize_kernel(self) -> Option<(&'static str, usize)> {
        match self {
            Activations::Q8 => Some(("quantize_q8", Q8_BLOCK_BYTES)),
            Activations::Q8K => Some(("quantize_q8k", Q8K_BLOCK_BYTES)),
            Activations::F32 => None,
        }
    }

    /// Activations per block.
    pub const fn values(self) -> usize {
        match self {
            Activations::Q8 => 32,
            Activations::Q8K => 256,
            Activations::F32 => 1,
        }
    }
}

use Param::{Ptr as P, F32 as F, I32 as I};

const MATVEC: &[Param] = &[P, P, P, I, I, I];
const MATVEC_IDS: &[Param] = &[P, P, P, P, I, I, I, I];
const EMBED: &[Param] = &[P, P, P, I, F];
const QUANTIZE: &[Param] = &[P, P, I];
const ELEMENTWISE: &[Param] = &[P, P, I];

const fn spec(name: &'static str, params: &'static [Param]) -> KernelSpec {
    KernelSpec { name, params }
}

/// Every kernel in the source. Launch shapes:
/// - `matvec_<format>(w, x, y, rows, cols, batch)`: grid `rows`, any block of 32·k threads;
///   `x` holds `batch` activation rows in the form [`WeightFormat::activations`] says
///   (32-value blocks for `q4_0`, `q4_1`, `q5_0`, `q5_1`, `q8_0`, 256-value super-blocks for
///   `q2_k`, `q3_k`, `q4_k`, `q5_k`, `q6_k`, f32 for `f16`, `bf16`, `f32`).
/// - `matmul_<format>(w, x, y, rows, cols, batch)`: as `matvec_<format>`, the same bits, over
///   grid `(rows, ceil(batch / MATMUL_TILE))`.
/// - `matvec_ids_<format>(w, x, y, ids, rows, cols, experts, x_div)`: a mixture's chosen
///   experts, `w` holding `experts` matrices of `rows` × `cols` stacked; grid `(pairs, rows)`,
///   any block of 32·k threads: `y[p * rows + r]` = row `r` of expert `ids[p]` · activation
///   row `p / x_div`. An expert index outside `0..experts` writes NaN and reads nothing.
/// - `moe_route(logits, chosen, weights, experts, used, scale, rows)`: at least `rows`
///   threads; each row's `used` best experts (indices below `experts`) and their weights.
/// - `moe_combine(y, weights, out, cols, used, n)`: at least `n` threads; each of `n / cols`
///   rows of `out` = its `used` rows of `y` weighted, in rank order.
/// - `embed_<format>(table, ids, out, cols, scale)`: grid = number of ids; `embed_f32` on
///   hidden states gathers rows.
/// - `quantize_q8(x, out, blocks)`, `quantize_q8k(x, out, blocks)`: one 32-lane group per
///   block, so at least `32 * blocks` threads in all.
/// - `rms_norm(x, w, y, cols, eps)`: grid = rows.
/// - `rope(x, pos, cos, sin, width, head_dim, neox)`: grid = rows, tables
///   `[positions, head_dim / 2]`.
/// - `add(x, y, n)`, `silu_mul(gate, up, n)`, `gelu_mul(gate, up, n)`: at least `n` threads.
/// - `add_bias(x, b, cols, n)`: `b` (`cols` values) added to each row of `x`; at least `n`
///   threads.
/// - `kv_append(k, v, k_cache, v_cache, base, pos, kv_w)`: grid = rows; row `r` goes to
///   cache position `base[r] + pos[r]`.
/// - `attention(q, k, v, out, base, pos, n_head, n_kv_head, head_dim, window, scale)`: grid
///   `(rows, n_head)`, dynamic shared memory of 4 bytes per value of a head (`head_dim`),
///   whatever the context.
pub const KERNELS: &[KernelSpec] = &[
    spec("matvec_q4_0", MATVEC),
    spec("matvec_q4_1", MATVEC),
    spec("matvec_q5_0", MATVEC),
    spec("matvec_q5_1", MATVEC),
    spec("matvec_q8_0", MATVEC),
    spec("matvec_q2_k", MATVEC),
    spec("matvec_q3_k", MATVEC),
    spec("matvec_q4_k", MATVEC),
    spec("matvec_q5_k", MATVEC),
    spec("matvec_q6_k", MATVEC),
    spec("matvec_f16", MATVEC),
    spec("matvec_bf16", MATVEC),
    spec("matvec_f32", MATVEC),
    spec("matmul_q4_0", MATVEC),
    spec("matmul_q4_1", MATVEC),
    spec("matmul_q5_0", MATVEC),
    spec("matmul_q5_1", MATVEC),
    spec("matmul_q8_0", MATVEC),
    spec("matmul_q2_k", MATVEC),
    spec("matmul_q3_k", MATVEC),
    spec("matmul_q4_k", MATVEC),
    spec("matmul_q5_k", MATVEC),
    spec("matmul_q6_k", MATVEC),
    spec("matmul_f16", MATVEC),
    spec("matmul_bf16", MATVEC),
    spec("matmul_f32", MATVEC),
    spec("matvec_ids_q4_0", MATVEC_IDS),
    spec("matvec_ids_q4_1", MATVEC_IDS),
    spec("matvec_ids_q5_0", MATVEC_IDS),
    spec("matvec_ids_q5_1", MATVEC_IDS),
    spec("matvec_ids_q8_0", MATVEC_IDS),
    spec("matvec_ids_q2_k", MATVEC_IDS),
    spec("matvec_ids_q3_k", MATVEC_IDS),
    spec("matvec_ids_q4_k", MATVEC_IDS),
    spec("matvec_ids_q5_k", MATVEC_IDS),
    spec("matvec_ids_q6_k", MATVEC_IDS),
    spec("matvec_ids_f16", MATVEC_IDS),
    spec("matvec_ids_bf16", MATVEC_IDS),
    spec("matvec_ids_f32", MATVEC_IDS),
    spec("moe_route", &[P, P, P, I, I, F, I]),
    spec("moe_combine", &[P, P, P, I, I, I]),
    spec("embed_q4_0", EMBED),
    spec("embed_q4_1", EMBED),
    spec("embed_q5_0", EMBED),
    spec("embed_q5_1", EMBED),
    spec("embed_q8_0", EMBED),
    spec("embed_q2_k", EMBED),
    spec("embed_q3_k", EMBED),
    spec("embed_q4_k", EMBED),
    spec("embed_q5_k", EMBED),
    spec("embed_q6_k", EMBED),
    spec("embed_f16", EMBED),
    spec("embed_bf16", EMBED),
    spec("embed_f32", EMBED),
    spec("quantize_q8", QUANTIZE),
    spec("quantize_q8k", QUANTIZE),
    spec("rms_norm", &[P, P, P, I, F]),
    spec("rope", &[P, P, P, P, I, I, I]),
    spec("add", ELEMENTWISE),
    spec("add_bias", &[P, P, I, I]),
    spec("silu_mul", ELEMENTWISE),
    spec("gelu_mul", ELEMENTWISE),
    spec("kv_append", &[P, P, P, P, P, P, I]),
    spec("attention", &[P, P, P, P, P, P, I, I, I, I, F]),
];
