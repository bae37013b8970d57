//! [`DeviceRuntime`] for the CPU [`Emulator`]: device memory is host memory from the global
//! allocator, launches run to completion before they return, so there is nothing to wait for.
//!
//! Unsafe code: allocation, copies through raw addresses and launches. Its invariants: every
//! address handed out is a live `std::alloc` allocation of the recorded size and alignment
//! [`ALIGN`], which no Rust reference ever points into (so kernels and copies writing it alias
//! nothing); callers of the trait's `unsafe` methods keep their ranges inside such
//! allocations, as the trait requires.
#![allow(unsafe_code)]

use std::alloc::Layout;

use super::{DeviceRuntime, RuntimeError};
use crate::gpu::emulator::Emulator;
use crate::gpu::kernels::KernelArg;

/// Alignment of every allocation, as GPU runtimes give at least.
const ALIGN: usize = 256;

fn layout(bytes: usize) -> Result<Layout, RuntimeError> {
    Layout::from_size_align(bytes.max(1), ALIGN).map_err(|e| RuntimeError::Alloc {
        bytes,
        reason: e.to_string(),
    })
}

impl DeviceRuntime for Emulator {
    fn warp(&self) -> u32 {
        Emulator::warp(self)
    }

    /// The host's available memory (`MemAvailable` of `/proc/meminfo`).
    fn free_memory(&self) -> Result<usize, RuntimeError> {
        let info = std::fs::read_to_string("/proc/meminfo")
            .map_err(|e| RuntimeError::MemoryInfo(e.to_string()))?;
        info.lines()
            .find_map(|l| l.strip_prefix("MemAvailable:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<usize>().ok())
            .map(|kib| kib * 1024)
            .ok_or_else(|| RuntimeError::MemoryInfo("no MemAvailable in /proc/meminfo".into()))
    }

    fn alloc(&self, bytes: usize) -> Result<u64, RuntimeError> {
        let layout = layout(bytes)?;
        // SAFETY: the layout's size is at least 1. Zeroed, so that no copy back to the host
        // ever reads uninitialised bytes.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        if ptr.is_null() {
            return Err(RuntimeError::Alloc {
                bytes,
                reason: "out of host memory".into(),
            });
        }
        Ok(ptr as usize as u64)
    }

    unsafe fn free(&self, ptr: u64, bytes: usize) {
        if let Ok(layout) = layout(bytes) {
            // SAFETY: the caller passes an address `alloc(bytes)` returned, with this layout,
            // once; launches have all finished, since each returns only when done.
            unsafe { std::alloc::dealloc(ptr as usize as *mut u8, layout) }
        }
    }

    unsafe fn copy_to_device(&self, dst: u64, src: &[u8]) -> Result<(), RuntimeError> {
        // SAFETY: the caller keeps `dst..dst + src.len()` inside one live allocation, which no
        // Rust reference (so not `src`) points into.
        unsafe {
            std::ptr::copy_nonoverlapping(src.as_ptr(), dst as usize as *mut u8, src.len());
        }
        Ok(())
    }

    unsafe fn copy_to_host(&self, dst: &mut [u8], src: u64) -> Result<(), RuntimeError> {
        // SAFETY: the caller keeps `src..src + dst.len()` inside one live, initialised (zeroed
        // at allocation) allocation, which `dst` cannot point into.
        unsafe {
            std::ptr::copy_nonoverlapping(src as usize as *const u8, dst.as_mut_ptr(), dst.len());
        }
        Ok(())
    }

    unsafe fn copy_on_device(&self, dst: u64, src: u64, bytes: usize) -> Result<(), RuntimeError> {
        // SAFETY: the caller keeps both ranges inside live allocations, not overlapping.
        unsafe {
            std::ptr::copy_nonoverlapping(
                src as usize as *const u8,
                dst as usize as *mut u8,
                bytes,
            );
        }
        Ok(())
    }

    unsafe fn launch(
        &self,
        name: &str,
        grid: [u32; 3],
        block: [u32; 3],
        shared_bytes: u32,
        args: &[KernelArg],
    ) -> Result<(), RuntimeError> {
        // SAFETY: the caller's contract is the emulator's: every address lies in an allocation
        // sized for the launch, and no Rust reference points into device memory, so what the
        // kernel writes aliases nothing the host holds.
        unsafe { Emulator::launch(self, name, grid, block, shared_bytes, args) }.map_err(|e| {
            RuntimeError::Launch {
                kernel: name.to_owned(),
                reason: e.to_string(),
            }
        })
    }

    fn synchronize(&self) -> Result<(), RuntimeError> {
        Ok(())
    }
}
