{
  description = "pod: a peer-to-peer AI node (local inference, OpenAI-compatible API, libp2p mesh)";

  # rust-version in Cargo.toml is 1.89: the nixpkgs used must ship rustc >= 1.89.
  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-unstable";

  outputs =
    { self, nixpkgs }:
    let
      systems = [
        "x86_64-linux"
        "aarch64-linux"
      ];
      forAllSystems = f: nixpkgs.lib.genAttrs systems (system: f nixpkgs.legacyPackages.${system});
    in
    {
      # nix build .#  ->  result/bin/pod, built from this source by rustPlatform.buildRustPackage
      # (cargoLock.lockFile = ./Cargo.lock; only `-p pod-node --bin pod`; doCheck = false because
      # the tests fetch real models over the network; wrapped so that `python3 -m pip` works for
      # `pod models pull`). See deploy/nixos/package.nix. On x86_64-linux the binary inherits
      # `-C target-cpu=x86-64-v3` from .cargo/config.toml.
      packages = forAllSystems (pkgs: {
        pod = pkgs.callPackage ./deploy/nixos/package.nix { };
        default = self.packages.${pkgs.stdenv.hostPlatform.system}.pod;
      });

      # imports = [ pod.nixosModules.default ]; services.pod.enable = true;
      # deploy/nixos/module.nix, with services.pod.package defaulting to this flake's package.
      nixosModules.default =
        { lib, pkgs, ... }:
        {
          imports = [ ./deploy/nixos/module.nix ];
          services.pod.package = lib.mkDefault self.packages.${pkgs.stdenv.hostPlatform.system}.default;
        };
      nixosModules.pod = self.nixosModules.default;

      overlays.default = final: _prev: { pod = final.callPackage ./deploy/nixos/package.nix { }; };
    };
}
