# NixOS module for pod: services.pod.*
#
# From the flake (pins the package to the flake's own build):
#
#   inputs.pod.url = "github:pod-mesh/pod";
#   ...
#   imports = [ pod.nixosModules.default ];
#   services.pod.enable = true;
#
# Those two lines replace a Hyperspace agent: the node starts at boot, serves the
# OpenAI-compatible API on 127.0.0.1:8080 and joins the mesh on port 4001. See deploy/README.md.
#
# Without the flake, `imports = [ ./path/to/pod/deploy/nixos/module.nix ];` builds the package
# from the same source with the system's nixpkgs (package.nix).
{
  config,
  lib,
  pkgs,
  ...
}:

let
  inherit (lib)
    concatMap
    concatStringsSep
    getLib
    hasPrefix
    literalExpression
    mkEnableOption
    mkIf
    mkMerge
    mkOption
    optional
    optionals
    types
    ;

  cfg = config.services.pod;

  defaultUser = "pod";
  defaultGroup = "pod";
  stateDir = "/var/lib/pod";

  # LoadCredential= copies the key file into the service's credentials directory, readable by the
  # service user even when the original is root-only; systemd expands %d to that directory.
  credentialName = "api-keys";
  credentialArg = {
    raw = "%d/${credentialName}";
  };
  # The private mesh's key reaches the service the same way.
  meshKeyCredential = "mesh-key";
  meshKeyArg = {
    raw = "%d/${meshKeyCredential}";
  };
  credentials =
    optional (cfg.apiKeyFile != null) "${credentialName}:${toString cfg.apiKeyFile}"
    ++ optional (cfg.meshKeyFile != null) "${meshKeyCredential}:${toString cfg.meshKeyFile}";
  inStore = path: path != null && hasPrefix "${builtins.storeDir}/" (toString path);

  # One GPU backend per service: each passes its own `--device`, so a GPU that is not there
  # stops the start instead of leaving the node on the CPU.
  gpuDevice =
    if cfg.rocm.enable then
      "rocm"
    else if cfg.nvidia.enable then
      "cuda"
    else
      null;
  gpuOptions = concatStringsSep " and " (
    optional cfg.rocm.enable "services.pod.rocm.enable"
    ++ optional cfg.nvidia.enable "services.pod.nvidia.enable"
  );

  # Where NixOS links the running driver's libraries (hardware.graphics), libcuda among them;
  # nixpkgs calls it addDriverRunpath.driverLink.
  driverLibDir = "/run/opengl-driver/lib";

  # Profiles that serve model files to peers. `auto` resolves to `full` only without a GPU:
  # with a named `--device` it is `inference` (or `relay` on a small machine), or no start.
  servesFiles =
    builtins.elem cfg.profile [
      "full"
      "storage"
    ]
    || (cfg.profile == "auto" && gpuDevice == null);

  # A `--device` of the user's own next to the one a GPU option passes: pod refuses two.
  extraDeviceArg = builtins.any (a: a == "--device" || hasPrefix "--device=" a) cfg.extraArgs;

  environment = config.systemd.services.pod.environment;

  apiIsLoopback = builtins.elem cfg.apiHost [
    "localhost"
    "::1"
  ] || hasPrefix "127." cfg.apiHost;

  # What `--api-host` takes: an IP address (IPv6 with or without brackets) or a host name,
  # which pod resolves when it starts. Anything else (a port, a URL, spaces) would stop every
  # start of the unit, so evaluation refuses it.
  hostLabel = "[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?";
  apiHostValid = builtins.any (re: builtins.match re cfg.apiHost != null) [
    "(${hostLabel}[.])*${hostLabel}[.]?"
    "[0-9A-Fa-f.]*:[0-9A-Fa-f.]*:[0-9A-Fa-f:.]*"
    "\\[[0-9A-Fa-f.]*:[0-9A-Fa-f.]*:[0-9A-Fa-f:.]*]"
  ];

  # One ExecStart word. A JSON string is a valid systemd double-quoted word; `%` and `$` are
  # doubled so systemd expands neither specifiers nor variables in configured values. Words
  # given as { raw = ...; } are meant for systemd (%d) and are passed unescaped.
  execWord =
    arg: if builtins.isAttrs arg then arg.raw else lib.replaceStrings [ "%" "$" ] [ "%%" "$$" ] (builtins.toJSON arg);

  startArgs =
    [
      "--home"
      stateDir
      "--log-format"
      "json"
      "start"
      "--profile"
      cfg.profile
      "--api-host"
      cfg.apiHost
      "--api-port"
      (toString cfg.apiPort)
      "--p2p-port"
      (toString cfg.p2pPort)
    ]
    ++ optionals (cfg.apiKeyFile != null) [
      "--api-key-file"
      credentialArg
    ]
    ++ concatMap (addr: [
      "--bootstrap"
      addr
    ]) cfg.bootstrap
    ++ optionals (cfg.meshKeyFile != null) [
      "--mesh-key"
      meshKeyArg
    ]
    ++ concatMap (peer: [
      "--trust"
      peer
    ]) cfg.trust
    ++ optionals (cfg.serveTo != "any") [
      "--serve-to"
      cfg.serveTo
    ]
    ++ optionals (gpuDevice != null) [
      "--device"
      gpuDevice
    ]
    ++ cfg.extraArgs;

  execStart = concatStringsSep " " (map execWord ([ "${cfg.package}/bin/pod" ] ++ startArgs));
in
{
  options.services.pod = {
    enable = mkEnableOption "pod, the peer-to-peer AI node (OpenAI-compatible API and libp2p mesh)";

    package = mkOption {
      type = types.package;
      default = pkgs.callPackage ./package.nix { };
      defaultText = literalExpression "pod built from this source (the flake's module uses the flake's packages.\${system}.default)";
      description = "The pod package to run. Its `bin/pod` is the service's executable.";
    };

    user = mkOption {
      type = types.str;
      default = defaultUser;
      description = ''
        User the service runs as. The module creates the system user `pod` when this is left at
        its default; any other user must exist already.
      '';
    };

    group = mkOption {
      type = types.str;
      default = defaultGroup;
      description = ''
        Group the service runs as. The module creates the group `pod` when this is left at its
        default; any other group must exist already.
      '';
    };

    profile = mkOption {
      type = types.enum [
        "auto"
        "full"
        "inference"
        "embedding"
        "relay"
        "storage"
      ];
      default = "auto";
      description = ''
        Node profile (`pod start --profile`): which roles the node takes on in the mesh and
        which models it loads. `auto` lets pod decide from the machine's resources when it
        starts, and logs what it picked and why: `relay` with under 2 GiB of memory,
        `inference` when a GPU opens (with `rocm.enable` or `nvidia.enable`, the GPU those
        name; a node with one of them set therefore runs `inference`), else `full`.
      '';
    };

    apiHost = mkOption {
      type = types.str;
      default = "127.0.0.1";
      example = "0.0.0.0";
      description = ''
        Address the OpenAI-compatible HTTP API binds (`--api-host`): an IP address, or a host
        name pod resolves when it starts (`localhost` is 127.0.0.1). Any address other than
        loopback needs `apiKeyFile`, or `--public-api` in `extraArgs` to serve without keys.
      '';
    };

    apiPort = mkOption {
      type = types.port;
      default = 8080;
      description = "TCP port of the HTTP API (`--api-port`).";
    };

    p2pPort = mkOption {
      type = types.port;
      default = 4001;
      description = "Port of the libp2p mesh, TCP and QUIC over UDP (TCP only with `meshKeyFile`; `--p2p-port`).";
    };

    apiKeyFile = mkOption {
      type = types.nullOr types.path;
      default = null;
      example = "/run/secrets/pod-api-keys";
      description = ''
        File with the API keys, one per line (`--api-key-file`). The service reads it through
        systemd's LoadCredential=, so the file may be owned by root with mode 0400. Give it as a
        string path outside the Nix store (for example a file managed by agenix or sops-nix):
        anything in the store is readable by every local user.
      '';
    };

    bootstrap = mkOption {
      type = types.listOf (types.strMatching "/.+");
      default = [ ];
      example = [ "/dns4/boot.example.org/tcp/4001/p2p/12D3KooWExamplePeerId" ];
      description = "Multiaddrs of peers to join the mesh through (one `--bootstrap` each).";
    };

    meshKeyFile = mkOption {
      type = types.nullOr types.path;
      default = null;
      example = "/run/secrets/pod-mesh-key";
      description = ''
        Pre-shared key file of a private mesh (`--mesh-key`; make one with `pod mesh key new
        --out FILE` and copy it to every node): only pods holding the same key can connect at
        all. The key covers TCP only, so with it the node neither listens on nor dials QUIC,
        and `openFirewall` opens no UDP port. Read through LoadCredential= like `apiKeyFile`:
        give a string path outside the Nix store. Default: none, the open public mesh.
      '';
    };

    trust = mkOption {
      type = types.listOf (types.strMatching "[1-9A-HJ-NP-Za-km-z]{46,64}");
      default = [ ];
      example = [ "12D3KooWEyoppNCUx8Yx66oV9fJnriXwCcXwDDUA2kj6vnc6iDEp" ];
      description = ''
        PeerIds (`pod identity show` on each) that may run inference on this node and pull its
        model files when `serveTo` is `trusted` (one `--trust` each; at most 64).
      '';
    };

    serveTo = mkOption {
      type = types.enum [
        "any"
        "trusted"
      ];
      default = "any";
      description = ''
        Who may run inference on this node and pull its model files (`--serve-to`): `any`
        peer of the mesh (the default, as the public mesh expects), or only the `trust`ed
        ones; others are refused and their pods ask another provider.
      '';
    };

    openFirewall = mkOption {
      type = types.bool;
      default = false;
      description = ''
        Open the mesh port (`p2pPort`, TCP and UDP for QUIC) in the firewall; the TCP port after
        it, for bulk connections that carry model files, with the `auto`, `full` and `storage`
        profiles; and the API port when `apiHost` is not a loopback address.
      '';
    };

    autoStart = mkOption {
      type = types.bool;
      default = true;
      description = "Start the service at boot (wanted by multi-user.target).";
    };

    extraArgs = mkOption {
      type = types.listOf types.str;
      default = [ ];
      example = [
        "--no-mdns"
        "--external-addr"
        "/ip4/203.0.113.7/tcp/4001"
      ];
      description = "Further arguments appended to `pod start`.";
    };

    rocm = {
      enable = mkEnableOption ''
        AMD GPUs through ROCm: passes `--device rocm` (chat models on the first AMD GPU; the
        start fails when it does not open, and `profile = "auto"` resolves to `inference`),
        gives the service /dev/kfd and the DRM render nodes (video and render groups) instead
        of a private /dev, and points pod at the HIP libraries of `rocm.package`. Not together
        with `nvidia.enable`
      '';

      package = mkOption {
        type = types.nullOr types.package;
        default = pkgs.rocmPackages.clr;
        defaultText = literalExpression "pkgs.rocmPackages.clr";
        description = ''
          The ROCm package whose `lib/` holds the HIP runtime (`libamdhip64`) and its runtime
          compiler (`libhiprtc`; ROCm 5 has it inside `libamdhip64`). pod loads both when it
          starts, from the paths the module puts in POD_HIP_PATH and POD_HIPRTC_PATH. `null`
          sets neither: pod then looks in `$ROCM_PATH/lib`, `/opt/rocm/lib` and the loader path,
          none of which NixOS provides, so set POD_HIP_PATH (a file or a directory) in
          `systemd.services.pod.environment` yourself.
        '';
      };

      gfxVersionOverride = mkOption {
        type = types.nullOr types.str;
        default = null;
        example = "9.0.6";
        description = ''
          Value for HSA_OVERRIDE_GFX_VERSION, for GPUs the installed ROCm does not list, e.g.
          "9.0.6" for an MI50 (gfx906). Only used when `rocm.enable` is set.
        '';
      };
    };

    nvidia = {
      enable = mkEnableOption ''
        NVIDIA GPUs through CUDA: passes `--device cuda` (chat models on the first NVIDIA GPU;
        the start fails when it does not open, and `profile = "auto"` resolves to `inference`),
        lets the service open the NVIDIA device nodes (/dev/nvidia0.., /dev/nvidiactl,
        /dev/nvidia-uvm, /dev/nvidia-caps) instead of a private /dev, and points pod at the
        driver's `libcuda` in /run/opengl-driver/lib and at NVRTC from `nvidia.nvrtcPackage`.
        The driver itself is the machine's configuration (`hardware.nvidia`, with
        `hardware.graphics.enable`). Not together with `rocm.enable`
      '';

      nvrtcPackage = mkOption {
        type = types.nullOr types.package;
        default = pkgs.cudaPackages.cuda_nvrtc;
        defaultText = literalExpression "pkgs.cudaPackages.cuda_nvrtc";
        description = ''
          The package whose library output holds NVRTC (`libnvrtc`), the CUDA runtime compiler
          pod compiles its kernels with at first start (cached under /var/lib/pod/kernels);
          pod needs no other part of the CUDA toolkit. The module sets POD_NVRTC_PATH to its
          `lib/`. nixpkgs' CUDA packages are unfree: allow this one, e.g. with
          `nixpkgs.config.allowUnfreePredicate`. `null` sets no POD_NVRTC_PATH: pod then looks
          in `$CUDA_PATH`, `/usr/local/cuda` and the loader path, none of which NixOS provides,
          so set POD_NVRTC_PATH (a file or a directory) in `systemd.services.pod.environment`
          yourself.
        '';
      };
    };
  };

  config = mkIf cfg.enable {
    assertions = [
      {
        assertion = !(inStore cfg.apiKeyFile);
        message = ''
          services.pod.apiKeyFile is in the Nix store, where every local user can read it. Give
          the path of a file outside the store as a string, e.g. "/run/secrets/pod-api-keys".
        '';
      }
      {
        assertion = !(inStore cfg.meshKeyFile);
        message = ''
          services.pod.meshKeyFile is in the Nix store, where every local user can read it (and
          join the private mesh with it). Give the path of a file outside the store as a
          string, e.g. "/run/secrets/pod-mesh-key".
        '';
      }
      {
        assertion = apiHostValid;
        message = ''
          services.pod.apiHost = "${cfg.apiHost}" is neither an IP address nor a host name (no
          port, no scheme): e.g. "127.0.0.1", "::", "localhost" or "node1.example.org".
        '';
      }
      {
        assertion =
          apiIsLoopback
          || cfg.apiKeyFile != null
          || builtins.elem "--public-api" cfg.extraArgs
          || builtins.elem "--no-api" cfg.extraArgs;
        message = ''
          services.pod.apiHost = "${cfg.apiHost}" exposes the API beyond this machine: set
          services.pod.apiKeyFile, or add "--public-api" to services.pod.extraArgs to serve it
          without keys (pod refuses to start otherwise).
        '';
      }
      {
        assertion = !(cfg.rocm.enable && cfg.nvidia.enable);
        message = ''
          services.pod.rocm.enable and services.pod.nvidia.enable are both set: a service runs
          its chat models on one GPU backend (`--device rocm` or `--device cuda`). On a machine
          with both kinds of GPU, enable the one the node should serve from.
        '';
      }
      {
        assertion = gpuDevice == null || !extraDeviceArg;
        message = ''
          services.pod.extraArgs has a --device, and ${gpuOptions} passes
          `--device ${toString gpuDevice}` already (pod refuses two). Drop one of them.
        '';
      }
    ];

    warnings =
      optional (cfg.rocm.gfxVersionOverride != null && !cfg.rocm.enable) ''
        services.pod.rocm.gfxVersionOverride is set but services.pod.rocm.enable is not, so it
        has no effect.
      ''
      ++ optional
        (
          cfg.rocm.enable
          && cfg.rocm.package == null
          && !(environment ? POD_HIP_PATH || environment ? ROCM_PATH)
        )
        ''
          services.pod.rocm.package is null and the service's environment names no POD_HIP_PATH
          or ROCM_PATH: pod will look for libamdhip64 only in /opt/rocm/lib and on the loader
          path, which NixOS does not fill. Set systemd.services.pod.environment.POD_HIP_PATH.
        ''
      ++ optional
        (
          cfg.nvidia.enable
          && cfg.nvidia.nvrtcPackage == null
          && !(environment ? POD_NVRTC_PATH || environment ? CUDA_PATH || environment ? CUDA_HOME)
        )
        ''
          services.pod.nvidia.nvrtcPackage is null and the service's environment names no
          POD_NVRTC_PATH or CUDA_PATH: pod will look for libnvrtc only in /usr/local/cuda and on
          the loader path, which NixOS does not fill. Set
          systemd.services.pod.environment.POD_NVRTC_PATH.
        ''
      # Without hardware.graphics NixOS links no driver libraries into /run/opengl-driver.
      ++ optional (cfg.nvidia.enable && !(config.hardware.graphics.enable or true)) ''
        services.pod.nvidia.enable is set but hardware.graphics.enable is not: NixOS then puts
        no libcuda in ${driverLibDir}, where pod looks for it.
      '';

    users.users = mkIf (cfg.user == defaultUser) {
      ${defaultUser} = {
        isSystemUser = true;
        group = cfg.group;
        home = stateDir;
        description = "pod peer-to-peer AI node";
      };
    };

    users.groups = mkIf (cfg.group == defaultGroup) { ${defaultGroup} = { }; };

    # The same binary as the service's, for `pod models list`, `pod identity show`, ...
    environment.systemPackages = [ cfg.package ];

    networking.firewall = mkIf cfg.openFirewall {
      allowedTCPPorts = [
        cfg.p2pPort
      ]
      # Bulk connections for model files (`--bulk-port`, the mesh port plus one), on the
      # profiles that serve them.
      ++ optional (servesFiles && cfg.p2pPort < 65535) (cfg.p2pPort + 1)
      ++ optional (!apiIsLoopback) cfg.apiPort;
      # QUIC, which a private mesh does not use.
      allowedUDPPorts = optional (cfg.meshKeyFile == null) cfg.p2pPort;
    };

    systemd.services.pod = {
      description = "pod peer-to-peer AI node";
      documentation = [ "https://github.com/pod-mesh/pod" ];
      wantedBy = mkIf cfg.autoStart [ "multi-user.target" ];
      wants = [ "network-online.target" ];
      after = [ "network-online.target" ];

      environment = mkMerge [
        { POD_HOME = stateDir; }
        (mkIf (cfg.rocm.enable && cfg.rocm.gfxVersionOverride != null) {
          HSA_OVERRIDE_GFX_VERSION = cfg.rocm.gfxVersionOverride;
        })
        # Directories: pod tries each library name it knows in them (libamdhip64.so.7, .6, ...).
        (mkIf (cfg.rocm.enable && cfg.rocm.package != null) {
          POD_HIP_PATH = "${getLib cfg.rocm.package}/lib";
          POD_HIPRTC_PATH = "${getLib cfg.rocm.package}/lib";
        })
        (mkIf cfg.nvidia.enable {
          POD_CUDA_PATH = driverLibDir;
        })
        (mkIf (cfg.nvidia.enable && cfg.nvidia.nvrtcPackage != null) {
          POD_NVRTC_PATH = "${getLib cfg.nvidia.nvrtcPackage}/lib";
        })
      ];

      serviceConfig = mkMerge [
        {
          # pod sends READY=1 once the API listens and the models are loaded.
          Type = "notify";
          NotifyAccess = "main";
          ExecStart = execStart;
          # The first start downloads the profile's models.
          TimeoutStartSec = "15min";
          # SIGTERM: pod stops accepting requests and lets in-flight ones finish
          # (--shutdown-grace, 10 s by default) before it exits.
          KillSignal = "SIGTERM";
          TimeoutStopSec = "30s";
          Restart = "on-failure";
          RestartSec = "5s";

          User = cfg.user;
          Group = cfg.group;
          DynamicUser = false;
          StateDirectory = "pod";
          StateDirectoryMode = "0750";
          WorkingDirectory = stateDir;
          UMask = "0077";
          # libp2p keeps many connections open.
          LimitNOFILE = 65536;

          ProtectSystem = "strict";
          ProtectHome = true;
          PrivateTmp = true;
          PrivateMounts = true;
          NoNewPrivileges = true;
          ProtectKernelTunables = true;
          ProtectKernelModules = true;
          ProtectKernelLogs = true;
          ProtectControlGroups = true;
          ProtectClock = true;
          ProtectHostname = true;
          # Other users' processes are hidden. /proc's other files stay (no ProcSubset=pid):
          # pod reads /proc/meminfo to pick its profile.
          ProtectProc = "invisible";
          RestrictSUIDSGID = true;
          RestrictRealtime = true;
          RestrictNamespaces = true;
          LockPersonality = true;
          RemoveIPC = true;
          CapabilityBoundingSet = "";
          # AF_NETLINK: libp2p watches the host's interfaces and addresses.
          RestrictAddressFamilies = [
            "AF_INET"
            "AF_INET6"
            "AF_UNIX"
            "AF_NETLINK"
          ];
          SystemCallArchitectures = "native";
          # The system calls of an ordinary service, less the privileged ones. A call outside
          # them fails with EPERM instead of killing the node. @system-service keeps what the
          # GPU runtimes use (ioctl on the device nodes, mbind).
          SystemCallFilter = [
            "@system-service"
            "~@privileged"
          ];
          SystemCallErrorNumber = "EPERM";
        }
        (mkIf (gpuDevice == null) {
          PrivateDevices = true;
          # No memory both writable and executable: pod generates no code on the CPU. Not with
          # a GPU option: the GPU runtimes compile in the process at run time (NVRTC and the
          # driver's PTX compiler; hiprtc and comgr, built on LLVM), and a JIT may map memory
          # writable and executable, which this forbids: the GPU would fail to open.
          MemoryDenyWriteExecute = true;
        })
        (mkIf cfg.rocm.enable {
          # A private /dev would hide the GPU; only the ROCm devices are let through instead.
          PrivateDevices = false;
          DevicePolicy = "closed";
          # DeviceAllow= takes device nodes or classes, not directories: the DRM nodes under
          # /dev/dri (card*, renderD*) are the class char-drm.
          DeviceAllow = [
            "/dev/kfd rw"
            "char-drm rw"
          ];
          SupplementaryGroups = [
            "video"
            "render"
          ];
        })
        (mkIf cfg.nvidia.enable {
          # A private /dev would hide the GPU; only the NVIDIA devices are let through instead.
          PrivateDevices = false;
          DevicePolicy = "closed";
          # Classes by their names in /proc/devices. The GPUs (/dev/nvidia0..) are `nvidia`
          # (`nvidia-frontend` in older drivers), /dev/nvidiactl `nvidiactl`, /dev/nvidia-uvm
          # (unified memory, which CUDA needs) `nvidia-uvm`, and the MIG capability nodes under
          # /dev/nvidia-caps `nvidia-caps`. The driver makes the nodes mode 0666: no groups.
          DeviceAllow = [
            "char-nvidia rw"
            "char-nvidia-frontend rw"
            "char-nvidiactl rw"
            "char-nvidia-uvm rw"
            "char-nvidia-caps rw"
          ];
        })
        (mkIf (credentials != [ ]) {
          LoadCredential = credentials;
        })
      ];
    };
  };
}
