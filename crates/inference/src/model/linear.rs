//! Linear projections `y = x Wᵀ` over quantised weights: pod's fused kernels on CPUs with
//! their SIMD paths, for the formats they read; candle's `QMatMul` otherwise (other devices,
//! other formats, other CPUs).

use std::borrow::Cow;
use std::cell::RefCell;
use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QMatMul, QStorage, QTensor};
use candle_core::{DType, Device, Module, Result, Storage, Tensor};

use crate::kernels::{self, QMatrix, QuantFormat, QuantizedRows};

thread_local! {
    /// Quantised activations, reused by every projection the thread runs so that decoding
    /// allocates no quantisation buffers.
    static ACTIVATIONS: RefCell<QuantizedRows> = RefCell::new(QuantizedRows::new());
}

/// A 2-D GGUF tensor's raw blocks.
#[derive(Debug, Clone)]
pub(crate) struct RawTensor {
    pub(crate) dtype: GgmlDType,
    pub(crate) rows: usize,
    pub(crate) cols: usize,
    pub(crate) data: Arc<Vec<u8>>,
}

impl RawTensor {
    /// The same bytes as a candle tensor on `dev`.
    pub(crate) fn qtensor(&self, dev: &Device) -> Result<QTensor> {
        let storage = QStorage::from_data(Cow::Borrowed(&self.data[..]), dev, self.dtype)?;
        QTensor::new(storage, (self.rows, self.cols))
    }
}

/// A projection from `cols` input features to `rows` output features.
#[derive(Debug, Clone)]
pub(crate) enum Linear {
    /// GGUF blocks multiplied by pod's kernels.
    Fused(QMatrix),
    /// Anything else, through candle.
    Candle(QMatMul),
}

fn kernel_err(e: kernels::KernelError) -> candle_core::Error {
    candle_core::Error::Msg(e.to_string())
}

impl Linear {
    /// The projection stored in `t`, for activations on `dev`.
    pub(crate) fn new(t: &RawTensor, dev: &Device) -> Result<Self> {
        match QuantFormat::from_ggml(t.dtype) {
            Some(format) if dev.is_cpu() && kernels::accelerated() => Ok(Self::Fused(
                QMatrix::new(format, t.rows, t.cols, Arc::clone(&t.data)).map_err(kernel_err)?,
            )),
            _ => Ok(Self::Candle(QMatMul::from_qtensor(t.qtensor(dev)?)?)),
        }
    }

    /// `x Wᵀ` over the last dimension of `x`.
    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let [y] = forward_many([self], x)?;
        Ok(y)
    }
}

/// Several projections of the same input (q/k/v, gate/up). With the fused kernels the input is
/// quantised once and all the products run in one pass over the worker pool.
pub(crate) fn forward_many<const N: usize>(ls: [&Linear; N], x: &Tensor) -> Result<[Tensor; N]> {
    let matrices: Vec<&QMatrix> = ls
        .iter()
        .filter_map(|l| match l {
            Linear::Fused(m) => Some(m),
            Linear::Candle(_) => None,
        })
        .collect();
    if matrices.len() < N || x.dtype() != DType::F32 {
        let mut out = Vec::with_capacity(N);
        for l in ls {
            out.push(match l {
                Linear::Candle(m) => m.forward(x)?,
                Linear::Fused(_) if x.dtype() != DType::F32 => {
                    let y = l.forward(&x.to_dtype(DType::F32)?)?;
                    y.to_dtype(x.dtype())?
                }
                Linear::Fused(_) => l.forward(x)?,
            });
        }
        return out
            .try_into()
            .map_err(|_| candle_core::Error::Msg("projection count".into()));
    }
    let x = x.contiguous()?;
    let dims = x.dims().to_vec();
    let cols = dims.last().copied().unwrap_or(0);
    let m = x.elem_count() / cols.max(1);
    let mut outs: Vec<Vec<f32>> = matrices.iter().map(|w| vec![0.0; m * w.rows()]).collect();
    ACTIVATIONS.with(|cell| -> Result<()> {
        let mut q = cell.borrow_mut();
        {
            let (storage, layout) = x.storage_and_layout();
            let Storage::Cpu(cpu) = &*storage else {
                candle_core::bail!("fused projections need activations in CPU memory");
            };
            let all = cpu.as_slice::<f32>()?;
            let xs = &all[layout.start_offset()..layout.start_offset() + m * cols];
            q.quantize(xs, cols, matrices.iter().map(|w| w.format()))
                .map_err(kernel_err)?;
        }
        let mut slices: Vec<&mut [f32]> = outs.iter_mut().map(|o| &mut o[..]).collect();
        kernels::matmul_many(&matrices, &q, &mut slices).map_err(kernel_err)
    })?;
    let mut tensors = Vec::with_capacity(N);
    for (w, data) in matrices.iter().zip(outs) {
        let mut shape = dims.clone();
        if let Some(last) = shape.last_mut() {
            *last = w.rows();
        }
        tensors.push(Tensor::from_vec(data, shape, x.device())?);
    }
    tensors
        .try_into()
        .map_err(|_| candle_core::Error::Msg("projection count".into()))
}
