//! The batched forward pass of one step, with the per-sequence fallback: one pass over every
//! scheduled row where the model batches, and each sequence alone where it does not or where
//! the batched pass failed, so that one bad sequence fails only itself. Panics in model code
//! become errors of the request concerned.

use crate::decoder::{BatchDecoder, DecoderCache};
use crate::error::EngineError;

/// Feeds `rows[i]` to `caches[i]` for every `i` through `model`. Returns each row's logits or
/// error, in order, and the number of forward passes run.
pub(super) fn forward<D: BatchDecoder>(
    model: &D,
    caches: &mut [&mut D::Cache],
    rows: &[&[u32]],
) -> (Vec<Result<Vec<f32>, EngineError>>, usize) {
    let internal = |e: crate::error::ForwardError| match e {
        crate::error::ForwardError::Unavailable(m) => EngineError::Unavailable(m),
        other => EngineError::Internal(other.to_string()),
    };
    if rows.len() > 1 && model.batch_invariant() {
        let lens: Vec<usize> = caches.iter().map(|c| c.len()).collect();
        let batched = guarded(|| model.forward_rows(caches, rows).map_err(internal));
        match batched {
            Ok(logits) if logits.len() == rows.len() => {
                return (logits.into_iter().map(Ok).collect(), 1)
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error = %e, "batched step failed; retrying sequences one by one")
            }
        }
        // A panic may have left caches part-way through the pass.
        for (c, len) in caches.iter_mut().zip(lens) {
            c.truncate(len);
        }
    }
    let results = caches
        .iter_mut()
        .zip(rows)
        .map(|(cache, row)| {
            guarded(|| {
                let mut logits = model
                    .forward_rows(&mut [&mut **cache], &[*row])
                    .map_err(internal)?;
                logits
                    .pop()
                    .ok_or_else(|| EngineError::Internal("no logits".into()))
            })
        })
        .collect();
    (results, rows.len())
}

/// Mutable references to `items[i]` for each of `indices` (each index at most once, in range),
/// in the order of `indices`.
pub(super) fn select<'a, T>(items: &'a mut [T], indices: &[usize]) -> Vec<&'a mut T> {
    let mut slots: Vec<Option<&mut T>> = items.iter_mut().map(Some).collect();
    indices
        .iter()
        .filter_map(|&i| slots.get_mut(i).and_then(Option::take))
        .collect()
}

/// Runs `f`, with a panic in model code turned into an error for this request alone, so one
/// bad input cannot take the engine down for everyone.
pub(super) fn guarded<T>(f: impl FnOnce() -> Result<T, EngineError>) -> Result<T, EngineError> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|panic| {
        let what = panic
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".into());
        Err(EngineError::Internal(format!(
            "model code panicked: {what}"
        )))
    })
}
