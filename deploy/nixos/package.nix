# How pod is built with Nix, from this source tree. flake.nix calls it for
# packages.<system>.default, and module.nix for the default of services.pod.package when the
# module is imported without the flake.
#
# - Only the `pod` binary of the pod-node crate is built; dependencies come from Cargo.lock
#   (no prebuilt binary, no network in the build).
# - `pod models pull` runs `python3 -m pip download` for models whose source is on PyPI, so the
#   binary is wrapped with a python3 that has pip on its PATH.
# - .cargo/config.toml is part of the source and sets `-C target-cpu=x86-64-v3` for
#   x86_64-unknown-linux-gnu: the x86_64-linux package therefore needs an x86-64-v3 CPU (AVX2, FMA,
#   F16C: Intel Haswell / AMD Excavator or newer). It is left as is on purpose (candle's quantised
#   kernels are 2-4x faster with it); aarch64-linux is not affected.
# - The default feature set is built: no `cuda` feature.
{
  lib,
  rustPlatform,
  makeWrapper,
  cmake,
  python3,
}:

let
  root = ../..;
  workspace = (lib.importTOML ../../Cargo.toml).workspace.package;
  # `python3 -m pip` must work: nixpkgs' python3 has no pip module of its own.
  pythonWithPip = python3.withPackages (ps: [ ps.pip ]);
in
rustPlatform.buildRustPackage {
  pname = "pod";
  inherit (workspace) version;

  # Only what cargo needs: the workspace manifests, the lock file, .cargo/config.toml and the
  # crates. Keeps target/, models and the Python end-to-end tests out of the store.
  src = lib.cleanSourceWith {
    name = "pod-source";
    src = root;
    filter =
      path: _type:
      let
        rel = lib.removePrefix (toString root + "/") (toString path);
      in
      builtins.elem rel [
        "Cargo.toml"
        "Cargo.lock"
        ".cargo"
        ".cargo/config.toml"
        "crates"
      ]
      || lib.hasPrefix "crates/" rel;
  };

  cargoLock.lockFile = ../../Cargo.lock;
  cargoBuildFlags = [
    "-p"
    "pod-node"
    "--bin"
    "pod"
  ];

  # The test suite is not run in the Nix build: its tests load real models, which pod fetches
  # (through pip, from PyPI) on first use, and the build sandbox has no network. Run
  # ./scripts/test outside Nix instead.
  doCheck = false;

  # aws-lc-sys (TLS for libp2p/ureq) builds with the C compiler and falls back to CMake; it is
  # not a CMake project itself, hence dontUseCmakeConfigure.
  nativeBuildInputs = [
    makeWrapper
    cmake
  ];
  dontUseCmakeConfigure = true;

  postInstall = ''
    wrapProgram $out/bin/pod --prefix PATH : ${lib.makeBinPath [ pythonWithPip ]}
  '';

  meta = {
    description = "Peer-to-peer AI node: local LLM and embedding inference, OpenAI-compatible API, libp2p mesh";
    homepage = "https://github.com/pod-mesh/pod";
    license = lib.licenses.asl20;
    mainProgram = "pod";
    platforms = [
      "x86_64-linux"
      "aarch64-linux"
    ];
  };
}
