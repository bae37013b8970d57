# Evaluates deploy/nixos/module.nix and flake.nix without nixpkgs, for scripts/nix-check:
#
#   nix-instantiate --eval --strict --json deploy/nixos/test/eval.nix -A scenarios
#   nix-instantiate --eval --strict --json deploy/nixos/test/eval.nix -A flake
#   nix-instantiate --eval --strict --json deploy/nixos/test/eval.nix -A gpuPackages
#   nix-instantiate --eval --strict --json deploy/nixos/test/eval.nix -A mustFail.<name>   (must fail)
#
# With `--arg libPath /path/to/nixpkgs/lib` the real nixpkgs lib (its module system and types)
# replaces stub-lib.nix. The NixOS options the module sets are declared by nixos-options.nix and
# the packages by stub-pkgs.nix in both cases.
{
  libPath ? null,
}:

let
  lib = if libPath == null then import ./stub-lib.nix else import libPath;
  pkgsFor = system: import ./stub-pkgs.nix { inherit lib system; };
  pkgs = pkgsFor "x86_64-linux";
  root = toString ../../..;

  testPackage = {
    type = "derivation";
    name = "pod-test";
    outPath = "${builtins.storeDir}/00000000000000000000000000000000-pod-test";
  };

  evalConfig =
    modules:
    (lib.evalModules {
      specialArgs = { inherit pkgs; };
      modules = [ ./nixos-options.nix ] ++ modules;
    }).config;

  summarize =
    config:
    let
      svc = config.systemd.services.pod or null;
    in
    {
      service =
        if svc == null then
          null
        else
          {
            inherit (svc)
              description
              documentation
              wantedBy
              wants
              after
              environment
              serviceConfig
              ;
          };
      firewall = {
        tcp = config.networking.firewall.allowedTCPPorts;
        udp = config.networking.firewall.allowedUDPPorts;
      };
      users = builtins.mapAttrs (_: u: {
        inherit (u) isSystemUser group home;
      }) config.users.users;
      groups = builtins.attrNames config.users.groups;
      systemPackages = map (p: p.name) config.environment.systemPackages;
      failedAssertions = map (a: a.message) (builtins.filter (a: !a.assertion) config.assertions);
      inherit (config) warnings;
    };

  # services.pod settings, with the test package unless the scenario is about the default.
  withPod = settings: [
    ../module.nix
    { services.pod = { package = testPackage; } // settings; }
  ];
  scenario = settings: summarize (evalConfig (withPod settings));
  # services.pod settings plus a module of other NixOS settings.
  scenarioWith = settings: other: summarize (evalConfig (withPod settings ++ [ other ]));
  withGraphics = {
    hardware.graphics.enable = true;
  };

  # A ROCm other than nixpkgs' default, as a user's overlay or own build would give it.
  customRocm = {
    type = "derivation";
    name = "rocm-custom-6.2.4";
    outPath = "${builtins.storeDir}/11111111111111111111111111111111-rocm-custom-6.2.4";
  };

  keyFile = "/run/secrets/pod-api-keys";
  meshKeyFile = "/run/secrets/pod-mesh-key";
  trustedPeers = [
    "12D3KooWEyoppNCUx8Yx66oV9fJnriXwCcXwDDUA2kj6vnc6iDEp"
    "12D3KooWMkKyu1VUHzfUL49S9wpXfkusZp39Bi7YVk7D4aANvotC"
  ];
in
{
  scenarios = {
    disabled = scenario { };
    # Nothing but enable: the package is the module's own default (package.nix).
    default = summarize (
      evalConfig [
        ../module.nix
        { services.pod.enable = true; }
      ]
    );
    openFirewall = scenario {
      enable = true;
      openFirewall = true;
    };
    openFirewallInference = scenario {
      enable = true;
      openFirewall = true;
      profile = "inference";
    };
    openFirewallPublic = scenario {
      enable = true;
      openFirewall = true;
      apiHost = "0.0.0.0";
      apiKeyFile = keyFile;
    };
    publicApiNoKeys = scenario {
      enable = true;
      openFirewall = true;
      apiHost = "::";
      extraArgs = [ "--public-api" ];
    };
    apiKeyFile = scenario {
      enable = true;
      apiKeyFile = keyFile;
    };
    # A private mesh serving two trusted peers, next to API keys: two credentials, no UDP.
    privateMesh = scenario {
      enable = true;
      openFirewall = true;
      apiKeyFile = keyFile;
      meshKeyFile = meshKeyFile;
      trust = trustedPeers;
      serveTo = "trusted";
    };
    rocm = scenario {
      enable = true;
      rocm.enable = true;
      rocm.gfxVersionOverride = "9.0.6";
    };
    rocmNoOverride = scenario {
      enable = true;
      rocm.enable = true;
    };
    overrideWithoutRocm = scenario {
      enable = true;
      rocm.gfxVersionOverride = "9.0.6";
    };
    rocmPackage = scenario {
      enable = true;
      rocm.enable = true;
      rocm.package = customRocm;
    };
    # No package: pod is left to find the libraries, and a warning says it will not on NixOS...
    rocmNoPackage = scenario {
      enable = true;
      rocm.enable = true;
      rocm.package = null;
    };
    # ...unless the user names them in the environment.
    rocmNoPackageEnv = scenarioWith {
      enable = true;
      rocm.enable = true;
      rocm.package = null;
    } { systemd.services.pod.environment.POD_HIP_PATH = "/opt/rocm-6.3.3/lib"; };
    nvidia = scenarioWith {
      enable = true;
      nvidia.enable = true;
    } withGraphics;
    nvidiaInference = scenarioWith {
      enable = true;
      profile = "inference";
      openFirewall = true;
      nvidia.enable = true;
    } withGraphics;
    # profile auto with a GPU option resolves to inference, which serves no model files.
    nvidiaOpenFirewall = scenarioWith {
      enable = true;
      openFirewall = true;
      nvidia.enable = true;
    } withGraphics;
    nvidiaNoGraphics = scenario {
      enable = true;
      nvidia.enable = true;
    };
    nvidiaNoNvrtc = scenarioWith {
      enable = true;
      nvidia.enable = true;
      nvidia.nvrtcPackage = null;
    } withGraphics;
    nvidiaNoNvrtcEnv = scenarioWith {
      enable = true;
      nvidia.enable = true;
      nvidia.nvrtcPackage = null;
    } {
      hardware.graphics.enable = true;
      systemd.services.pod.environment.POD_NVRTC_PATH = "/opt/nvrtc/lib/libnvrtc.so.12";
    };
    custom = scenario {
      enable = true;
      profile = "inference";
      apiPort = 9000;
      p2pPort = 4010;
      user = "ai";
      group = "ai";
      autoStart = false;
      bootstrap = [
        "/dns4/boot-1.example.org/tcp/4001/p2p/12D3KooWBootOne"
        "/ip4/198.51.100.2/udp/4001/quic-v1/p2p/12D3KooWBootTwo"
      ];
      extraArgs = [
        "--no-mdns"
        "--listen"
        "/ip4/0.0.0.0/tcp/4010"
        "--external-addr"
        "/dns4/a%d$HOME \"x\".example/tcp/4010"
      ];
    };
    # Failed assertions, not evaluation errors.
    publicWithoutKeys = scenario {
      enable = true;
      apiHost = "0.0.0.0";
    };
    # A host name is passed on for pod to resolve; a port or a URL is refused.
    apiHostName = scenario {
      enable = true;
      apiHost = "localhost";
    };
    apiHostWithPort = scenario {
      enable = true;
      apiHost = "0.0.0.0:8080";
      apiKeyFile = keyFile;
    };
    apiHostUrl = scenario {
      enable = true;
      apiHost = "http://node1.example.org";
      apiKeyFile = keyFile;
    };
    keyFileInStore = scenario {
      enable = true;
      apiKeyFile = "${builtins.storeDir}/00000000000000000000000000000000-keys";
    };
    meshKeyInStore = scenario {
      enable = true;
      meshKeyFile = "${builtins.storeDir}/00000000000000000000000000000000-mesh-key";
    };
    bothGpus = scenarioWith {
      enable = true;
      rocm.enable = true;
      nvidia.enable = true;
    } withGraphics;
    gpuAndDeviceArg = scenarioWith {
      enable = true;
      nvidia.enable = true;
      extraArgs = [ "--device=cpu" ];
    } withGraphics;
    # A user's mkForce wins over the module's value.
    forcedTimeout = summarize (
      evalConfig (
        withPod { enable = true; }
        ++ [ { systemd.services.pod.serviceConfig.TimeoutStartSec = lib.mkForce "1h"; } ]
      )
    );
  };

  # The store paths of the GPU packages the module defaults to (stub-pkgs.nix), and of the
  # output each library lives in, for check.py to compare the service's environment with.
  gpuPackages = {
    clr = toString pkgs.rocmPackages.clr;
    customRocm = toString customRocm;
    nvrtc = toString pkgs.cudaPackages.cuda_nvrtc;
    nvrtcLib = toString pkgs.cudaPackages.cuda_nvrtc.lib;
  };

  # Each must fail to evaluate; scripts/nix-check checks the error message.
  mustFail = {
    apiPortNotAPort = scenario {
      enable = true;
      apiPort = "8080";
    };
    unknownProfile = scenario {
      enable = true;
      profile = "gpu";
    };
    misspeltOption = scenario {
      enable = true;
      apiPrt = 9000;
    };
    bootstrapNotMultiaddr = scenario {
      enable = true;
      bootstrap = [ "198.51.100.2:4001" ];
    };
    serveToUnknown = scenario {
      enable = true;
      serveTo = "friends";
    };
    trustNotPeerId = scenario {
      enable = true;
      trust = [ "my laptop" ];
    };
    # A library directory outside the store goes in the environment, not in rocm.package.
    rocmPackageNotPackage = scenario {
      enable = true;
      rocm.enable = true;
      rocm.package = "/opt/rocm";
    };
    conflictingUnitValue = summarize (
      evalConfig (
        withPod { enable = true; } ++ [ { systemd.services.pod.serviceConfig.TimeoutStartSec = "1h"; } ]
      )
    );
  };

  flake =
    let
      flake = import ../../../flake.nix;
      nixpkgs = {
        inherit lib;
        legacyPackages = lib.genAttrs [ "x86_64-linux" "aarch64-linux" ] pkgsFor;
      };
      outputs = flake.outputs { inherit self nixpkgs; };
      self = outputs // {
        outPath = root;
      };
      pkg = outputs.packages.x86_64-linux.default;
      a = pkg.drvAttrs;
      rel = p: lib.removePrefix (root + "/") (toString p);
      moduleConfig = evalConfig [
        outputs.nixosModules.default
        { services.pod.enable = true; }
      ];
    in
    {
      nixpkgsUrl = flake.inputs.nixpkgs.url;
      systems = builtins.attrNames outputs.packages;
      packageAttrs = builtins.mapAttrs (_: builtins.attrNames) outputs.packages;
      packageNames = builtins.mapAttrs (_: ps: ps.default.name) outputs.packages;
      packagePath = toString pkg;
      cargoVersion = (builtins.fromTOML (builtins.readFile ../../../Cargo.toml)).workspace.package.version;
      package = {
        inherit (a)
          pname
          version
          cargoBuildFlags
          doCheck
          postInstall
          ;
        lockFile = rel a.cargoLock.lockFile;
        nativeBuildInputs = map (p: p.name) a.nativeBuildInputs;
        mainProgram = a.meta.mainProgram;
        platforms = a.meta.platforms;
        # Which paths the source filter keeps.
        src = builtins.listToAttrs (
          map
            (p: {
              name = p.path;
              value = a.src.filter "${root}/${p.path}" p.type;
            })
            [
              {
                path = "Cargo.toml";
                type = "regular";
              }
              {
                path = "Cargo.lock";
                type = "regular";
              }
              {
                path = ".cargo";
                type = "directory";
              }
              {
                path = ".cargo/config.toml";
                type = "regular";
              }
              {
                path = "crates";
                type = "directory";
              }
              {
                path = "crates/node/src/main.rs";
                type = "regular";
              }
              {
                path = "target";
                type = "directory";
              }
              {
                path = "tests";
                type = "directory";
              }
              {
                path = "bench";
                type = "directory";
              }
              {
                path = "deploy";
                type = "directory";
              }
              {
                path = "README.md";
                type = "regular";
              }
            ]
        );
        # Forces Nix to read the filtered source tree (the store path is computed, not written).
        srcStorePath = toString a.src;
      };
      aarch64Package = outputs.packages.aarch64-linux.default.name;
      module = {
        execStart = moduleConfig.systemd.services.pod.serviceConfig.ExecStart;
        systemPackages = map toString moduleConfig.environment.systemPackages;
      };
      overlayPackage = (outputs.overlays.default pkgs pkgs).pod.name;
    };
}
