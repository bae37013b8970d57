//! Which GPU runtimes and devices are present, or why not.
