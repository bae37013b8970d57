//! The HIP runtime and its runtime compiler (hiprtc), loaded at run time.
