//! Kernel source to code objects for one GPU target, and the cache of compiled objects.
