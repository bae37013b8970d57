//! The kernel source, in the common subset of CUDA and HIP, and its per-platform preambles.
