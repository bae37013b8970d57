//! Runs the kernel source on the CPU: each lane a host thread, for tests without a GPU.
