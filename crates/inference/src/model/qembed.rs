//! Token embeddings kept quantised: rows are dequantised on lookup, so a model does not carry
//! an f32 copy of its (often largest) tensor.

use std::borrow::Cow;
use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QStorage, QTensor};
use candle_core::{Device, Result, Tensor};

use super::linear::RawTensor;

#[derive(Debug, Clone)]
pub(crate) struct QEmbedding {
    /// The table's blocks in host memory, shared with the output head when the model ties
    /// them.
    data: Arc<Vec<u8>>,
    dtype: GgmlDType,
    rows: usize,
    hidden: usize,
    row_bytes: usize,
    device: Device,
}

impl QEmbedding {
    /// Wraps a `[rows, hidden]` quantised matrix.
    pub(crate) fn new(t: &RawTensor, device: &Device) -> Result<Self> {
        let (rows, hidden, dtype) = (t.rows, t.cols, t.dtype);
        if !hidden.is_multiple_of(dtype.block_size()) {
            candle_core::bail!("embedding rows of {hidden} values are not whole {dtype:?} blocks");
        }
        let row_bytes = hidden / dtype.block_size() * dtype.type_size();
        let len = t.data.len();
        if len != rows * row_bytes {
            candle_core::bail!(
                "embedding tensor has {len} bytes, expected {}",
                rows * row_bytes
            );
        }
        Ok(Self {
            data: Arc::clone(&t.data),
            dtype,
            rows,
            hidden,
            row_bytes,
            device: device.clone(),
        })
    }

    /// The rows of `ids` as a `[ids.len(), hidden]` f32 tensor.
    pub(crate) fn lookup(&self, ids: &[u32]) -> Result<Tensor> {
        let data = &self.data;
        let mut bytes = Vec::with_capacity(ids.len() * self.row_bytes);
        for &id in ids {
            let id = id as usize;
            if id >= self.rows {
                candle_core::bail!(
                    "token id {id} is outside the embedding table of {} rows",
                    self.rows
                );
            }
            bytes.extend_from_slice(&data[id * self.row_bytes..(id + 1) * self.row_bytes]);
        }
        let storage = QStorage::from_data(Cow::Owned(bytes), &self.device, self.dtype)?;
        QTensor::new(storage, (ids.len(), self.hidden))?.dequantize(&self.device)
    }
}
