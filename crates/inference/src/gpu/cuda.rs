//! The CUDA driver API and NVRTC, loaded at run time.
