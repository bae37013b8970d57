# Stand-ins for the few nixpkgs packages that flake.nix, package.nix and module.nix name. Nothing
# is built: buildRustPackage returns a derivation-shaped attribute set that keeps the arguments it
# was given (drvAttrs), so that scripts/nix-check can compare them with what the package needs.
{
  lib,
  system ? "x86_64-linux",
}:

let
  fakeDrv =
    name: extra:
    {
      type = "derivation";
      inherit name system;
      outPath = "${builtins.storeDir}/${
        builtins.substring 0 32 (builtins.hashString "sha256" "${system}/${name}")
      }-${name}";
    }
    // extra;

  # A package with several outputs, as nixpkgs' multi-output derivations: the set is the `out`
  # output and has each output (out, lib, ...) as an attribute with its own store path.
  multiOutput =
    name: outputs:
    let
      each = lib.genAttrs outputs (
        output:
        fakeDrv (if output == "out" then name else "${name}-${output}") { outputName = output; }
      );
    in
    each.out // each // { inherit outputs; };

  pkgs = {
    inherit lib;
    stdenv.hostPlatform = {
      inherit system;
    };

    # Like nixpkgs' callPackage: arguments come from pkgs, overrides win, and an argument that
    # neither provides (and that has no default) is an error.
    callPackage =
      fn: overrides:
      let
        f = if builtins.isFunction fn then fn else import fn;
        wanted = builtins.functionArgs f;
        missing = builtins.filter (n: !wanted.${n} && !(pkgs ? ${n}) && !(overrides ? ${n})) (
          builtins.attrNames wanted
        );
      in
      if missing != [ ] then
        throw "callPackage: no package `${builtins.head missing}' in the stub pkgs"
      else
        f (builtins.intersectAttrs wanted pkgs // overrides);

    rustPlatform.buildRustPackage =
      args:
      fakeDrv "${args.pname}-${args.version}" {
        drvAttrs = args;
        meta = args.meta or { };
      };

    # The GPU runtimes' packages that module.nix defaults to, with nixpkgs' attribute paths and
    # output layout: ROCm's clr has outputs out and icd, with libamdhip64 and libhiprtc in
    # out/lib (pkgs/development/rocm-modules/6/clr); cuda_nvrtc is a CUDA redistributable whose
    # libnvrtc is in its lib output (pkgs/development/cuda-modules/packages/cuda_nvrtc.nix).
    rocmPackages.clr = multiOutput "clr-6.3.3" [
      "out"
      "icd"
    ];
    cudaPackages.cuda_nvrtc = multiOutput "cuda_nvrtc-12.8.93" [
      "out"
      "dev"
      "include"
      "lib"
      "static"
      "stubs"
    ];

    makeWrapper = fakeDrv "make-shell-wrapper-hook" { };
    cmake = fakeDrv "cmake" { };
    python3 = fakeDrv "python3" {
      pkgs.pip = fakeDrv "python3-pip" { };
      # The environment's name lists its packages, e.g. python3-env+python3-pip.
      withPackages =
        f:
        fakeDrv (builtins.concatStringsSep "+" ([ "python3-env" ] ++ map (p: p.name) (f pkgs.python3.pkgs))) { };
    };
  };
in
pkgs
