//! One sequence's keys and values in device memory.
//!
//! A cache's store is shared between clones (the engine copies caches into its prefix cache
//! and back) and copied on the device only when a clone is about to be written, inside a
//! forward pass, where a failed copy can be reported: `Clone` cannot fail.

use std::fmt;
use std::sync::Arc;

use crate::decoder::DecoderCache;
use crate::gpu::runtime::{DeviceBuffer, DeviceRuntime, DeviceSlice, RuntimeError};

/// Fewest positions added when a sequence outgrows its store (else half again what it holds,
/// so long sequences copy their cache a logarithmic number of times).
const KV_GROWTH: usize = 256;

/// Keys and values of `capacity` positions for every layer: layer `l`'s keys are region
/// `2l`, its values region `2l + 1`, each `[capacity][kv_w]` f32.
pub(super) struct KvStore<R: DeviceRuntime> {
    buf: DeviceBuffer<R>,
    capacity: usize,
    kv_w: usize,
}

impl<R: DeviceRuntime> fmt::Debug for KvStore<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KvStore")
            .field("capacity", &self.capacity)
            .finish_non_exhaustive()
    }
}

impl<R: DeviceRuntime> KvStore<R> {
    fn region_bytes(&self) -> usize {
        self.capacity * self.kv_w * 4
    }

    /// Layer `layer`'s keys and values, each of all `capacity` positions.
    pub(super) fn layer(&self, layer: usize) -> Result<(DeviceSlice, DeviceSlice), RuntimeError> {
        let r = self.region_bytes();
        Ok((
            self.buf.slice(2 * layer * r, r)?,
            self.buf.slice((2 * layer + 1) * r, r)?,
        ))
    }
}

/// One sequence's attention cache in device memory, for [`GpuDecoder`](super::GpuDecoder).
pub struct GpuCache<R: DeviceRuntime> {
    /// The decoder that made it, so that caches of another model are refused.
    pub(super) owner: u64,
    /// Nothing until the first token is fed.
    pub(super) store: Option<Arc<KvStore<R>>>,
    pub(super) len: usize,
    pub(super) layers: usize,
    pub(super) kv_w: usize,
}

impl<R: DeviceRuntime> fmt::Debug for GpuCache<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GpuCache")
            .field("len", &self.len)
            .field("capacity", &self.store.as_ref().map(|s| s.capacity))
            .finish_non_exhaustive()
    }
}

impl<R: DeviceRuntime> Clone for GpuCache<R> {
    fn clone(&self) -> Self {
        Self {
            owner: self.owner,
            store: self.store.clone(),
            len: self.len,
            layers: self.layers,
            kv_w: self.kv_w,
        }
    }
}

impl<R: DeviceRuntime> GpuCache<R> {
    /// Makes the store this cache's own, with room for `need` positions (at most `max_len`),
    /// copying the positions fed so far into a new store when it is shared or too small.
    pub(super) fn reserve(
        &mut self,
        runtime: &Arc<R>,
        need: usize,
        max_len: usize,
    ) -> Result<&KvStore<R>, RuntimeError> {
        let fits = |s: &Arc<KvStore<R>>| s.capacity >= need && Arc::strong_count(s) == 1;
        if !self.store.as_ref().is_some_and(fits) {
            let capacity = (need + (self.len / 2).max(KV_GROWTH))
                .min(max_len)
                .max(need);
            let fresh = self.copy(runtime, capacity)?;
            self.store = Some(Arc::new(fresh));
        }
        match &self.store {
            Some(s) => Ok(s),
            None => Err(RuntimeError::Alloc {
                bytes: 0,
                reason: "no cache store".into(),
            }),
        }
    }

    /// A new store of `capacity` positions holding the positions fed so far.
    fn copy(&self, runtime: &Arc<R>, capacity: usize) -> Result<KvStore<R>, RuntimeError> {
        let bytes = 2 * self.layers * capacity * self.kv_w * 4;
        let mut fresh = KvStore {
            buf: DeviceBuffer::new(runtime, bytes)?,
            capacity,
            kv_w: self.kv_w,
        };
        if let Some(old) = &self.store {
            let used = self.len * self.kv_w * 4;
            for region in 0..2 * self.layers {
                let (to, from) = (region * fresh.region_bytes(), region * old.region_bytes());
                fresh.buf.copy_from(to, &old.buf, from, used)?;
            }
        }
        Ok(fresh)
    }
}

impl<R: DeviceRuntime> DecoderCache for GpuCache<R> {
    fn len(&self) -> usize {
        self.len
    }

    /// Always done: positions past `len` are never read, and a shared store is copied before
    /// it is written.
    fn truncate(&mut self, len: usize) -> bool {
        self.len = self.len.min(len);
        true
    }

    fn bytes(&self) -> usize {
        self.len * self.kv_w * 2 * self.layers * std::mem::size_of::<f32>()
    }

    /// Copies the positions fed into a store of just that size when this cache is the
    /// store's only user; keeps the larger store if the device cannot make the copy.
    fn shrink_to_fit(&mut self) {
        if self.len == 0 {
            self.store = None;
            return;
        }
        let Some(store) = &self.store else {
            return;
        };
        if store.capacity <= self.len.max(1) || Arc::strong_count(store) > 1 {
            return;
        }
        let runtime = Arc::clone(store.buf.runtime());
        if let Ok(fresh) = self.copy(&runtime, self.len.max(1)) {
            self.store = Some(Arc::new(fresh));
        }
    }
}
