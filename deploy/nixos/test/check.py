#!/usr/bin/env python3
"""Compares what Nix evaluated (deploy/nixos/test/eval.nix) with what pod needs; run by
scripts/nix-check. Also renders the units the module describes and, where systemd-analyze
exists, has systemd verify them and the plain unit in deploy/systemd.

Exits non-zero on any mismatch. --emit-flags FILE writes the flags of `pod` that the module
uses, so that a Rust test can check each exists in `pod start --help` with the same defaults.
"""

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", ".."))
STATE = "/var/lib/pod"
CREDENTIAL = "%d/api-keys"  # systemd expands %d to the service's credentials directory
KEY_FILE = "/run/secrets/pod-api-keys"
MESH_KEY_CREDENTIAL = "%d/mesh-key"
MESH_KEY_FILE = "/run/secrets/pod-mesh-key"
TRUSTED = ["12D3KooWEyoppNCUx8Yx66oV9fJnriXwCcXwDDUA2kj6vnc6iDEp", "12D3KooWMkKyu1VUHzfUL49S9wpXfkusZp39Bi7YVk7D4aANvotC"]
ROCM_DEVICES = ["/dev/kfd rw", "char-drm rw"]
ROCM_GROUPS = ["video", "render"]
# The NVIDIA device classes, by their names in /proc/devices: GPUs (current and older drivers),
# /dev/nvidiactl, /dev/nvidia-uvm, the MIG capability nodes.
NVIDIA_DEVICES = [
    "char-nvidia rw", "char-nvidia-frontend rw", "char-nvidiactl rw", "char-nvidia-uvm rw", "char-nvidia-caps rw",
]
# Where NixOS links the running driver's libraries, libcuda among them.
DRIVER_LIB = "/run/opengl-driver/lib"
# The sandbox of every variant of the service (the GPU options relax only the devices and
# MemoryDenyWriteExecute).
HARDENING = {
    "ProtectSystem": "strict",
    "ProtectHome": True,
    "PrivateTmp": True,
    "PrivateMounts": True,
    "NoNewPrivileges": True,
    "ProtectKernelTunables": True,
    "ProtectKernelModules": True,
    "ProtectKernelLogs": True,
    "ProtectControlGroups": True,
    "ProtectClock": True,
    "ProtectHostname": True,
    "ProtectProc": "invisible",
    "RestrictSUIDSGID": True,
    "RestrictRealtime": True,
    "RestrictNamespaces": True,
    "LockPersonality": True,
    "RemoveIPC": True,
    "CapabilityBoundingSet": "",
    "RestrictAddressFamilies": ["AF_INET", "AF_INET6", "AF_UNIX", "AF_NETLINK"],
    "SystemCallArchitectures": "native",
    "SystemCallFilter": ["@system-service", "~@privileged"],
    "SystemCallErrorNumber": "EPERM",
}
# Highest `systemd-analyze security` exposure (0 to 10, lower is safer) the CPU service may
# have, as the module renders it and as deploy/systemd/pod.service is. What is left open is
# what a mesh node needs: the network, netlink, its own user.
MAX_EXPOSURE = 1.5
# Variables the GPU runtimes read themselves, not pod.
RUNTIME_VARS = {"HSA_OVERRIDE_GFX_VERSION"}

failures = []


def check(ok, what):
    if not ok:
        failures.append(what)
    return ok


def equal(actual, expected, what):
    return check(actual == expected, f"{what}: expected {expected!r}, got {actual!r}")


# ------------------------------------------------------------------ systemd command lines
def parse_exec_start(line, what):
    """Splits a NixOS-rendered ExecStart= into argv, undoing the module's escaping: each word is
    a JSON string in which % and $ are doubled; a bare word is left to systemd (only %d/...)."""
    argv = []
    for m in re.finditer(r'"((?:[^"\\]|\\.)*)"|(\S+)', line):
        if m.group(1) is not None:
            word = json.loads('"' + m.group(1) + '"')
            out, i = [], 0
            while i < len(word):
                c = word[i]
                if c in "%$":
                    if word[i + 1 : i + 2] != c:
                        check(False, f"{what}: unescaped {c!r} in ExecStart word {word!r}")
                        break
                    i += 1
                out.append(c)
                i += 1
            argv.append("".join(out))
        else:
            word = m.group(2)
            check(
                word.startswith("%d/") and "$" not in word and word.count("%") == 1,
                f"{what}: bare ExecStart word {word!r} (only %d/... may be left to systemd)",
            )
            argv.append(word)
    return argv


def expected_argv(profile="auto", host="127.0.0.1", port="8080", p2p="4001", tail=()):
    return [
        "--home", STATE, "--log-format", "json", "start",
        "--profile", profile, "--api-host", host, "--api-port", port, "--p2p-port", p2p,
        *tail,
    ]


# ------------------------------------------------------------------ pod's own names
def library_env_vars():
    """The variables pod's library search reads (crates/inference/src/gpu: each LibrarySearch's
    env_var and root_vars), so that a renamed variable breaks this check, not a deployment."""
    names = set()
    gpu = os.path.join(ROOT, "crates", "inference", "src", "gpu")
    for name in ("hip.rs", "cuda.rs"):
        text = open(os.path.join(gpu, name), encoding="utf-8").read()
        names.update(re.findall(r'env_var: "(\w+)"', text))
        for group in re.findall(r"root_vars: &\[([^\]]*)\]", text):
            names.update(re.findall(r'"(\w+)"', group))
    check({"POD_HIP_PATH", "POD_HIPRTC_PATH", "POD_CUDA_PATH", "POD_NVRTC_PATH"} <= names,
          f"crates/inference/src/gpu: library variables not found where expected: {sorted(names)}")
    return names


def check_env_names(env, known, what):
    for key in env:
        check(key in known or key in RUNTIME_VARS or key == "POD_HOME",
              f"{what}: {key} is not a variable pod or its GPU runtimes read")


# ------------------------------------------------------------------ the module
def check_scenarios(sc, flake, gpu):
    argvs = {}

    def svc(name):
        s = sc[name]["service"]
        check(s is not None, f"{name}: no systemd.services.pod")
        return s or {"serviceConfig": {}, "environment": {}}

    def argv_of(name):
        if name not in argvs:
            line = svc(name)["serviceConfig"].get("ExecStart", "")
            argv = parse_exec_start(line, name)
            check(argv and argv[0].endswith("/bin/pod"), f"{name}: ExecStart does not run bin/pod: {line}")
            argvs[name] = argv
        return argvs[name][1:]

    # Disabled: the module defines nothing.
    d = sc["disabled"]
    equal(d["service"], None, "disabled: service")
    equal(d["firewall"], {"tcp": [], "udp": []}, "disabled: firewall")
    equal(d["users"], {}, "disabled: users")
    equal(d["groups"], [], "disabled: groups")
    equal(d["systemPackages"], [], "disabled: systemPackages")
    equal(d["failedAssertions"] + d["warnings"], [], "disabled: assertions and warnings")

    # Defaults.
    s = svc("default")
    c = s["serviceConfig"]
    equal(argv_of("default"), expected_argv(), "default: pod arguments")
    version = flake["cargoVersion"]
    check(
        argvs["default"][0].endswith(f"-pod-{version}/bin/pod"),
        f"default: the package is not pod {version} from package.nix: {argvs['default'][0]}",
    )
    for key, value in {
        "Type": "notify",
        "NotifyAccess": "main",
        "TimeoutStartSec": "15min",
        "TimeoutStopSec": "30s",
        "KillSignal": "SIGTERM",
        "Restart": "on-failure",
        "User": "pod",
        "Group": "pod",
        "DynamicUser": False,
        "StateDirectory": "pod",
        "WorkingDirectory": STATE,
        "PrivateDevices": True,
        "MemoryDenyWriteExecute": True,
        **HARDENING,
    }.items():
        equal(c.get(key), value, f"default: {key}")
    for key in ["DeviceAllow", "DevicePolicy", "SupplementaryGroups", "LoadCredential"]:
        check(key not in c, f"default: {key} is set: {c.get(key)!r}")
    equal(s["environment"], {"POD_HOME": STATE}, "default: environment")
    equal(s["wantedBy"], ["multi-user.target"], "default: wantedBy")
    equal(s["after"], ["network-online.target"], "default: after")
    equal(s["wants"], ["network-online.target"], "default: wants")
    equal(sc["default"]["firewall"], {"tcp": [], "udp": []}, "default: firewall (openFirewall off)")
    equal(
        sc["default"]["users"],
        {"pod": {"isSystemUser": True, "group": "pod", "home": STATE}},
        "default: users",
    )
    equal(sc["default"]["groups"], ["pod"], "default: groups")
    equal(len(sc["default"]["systemPackages"]), 1, "default: systemPackages")

    # Firewall.
    # The bulk port (mesh port + 1) only for profiles that may serve model files.
    equal(sc["openFirewall"]["firewall"], {"tcp": [4001, 4002], "udp": [4001]}, "openFirewall, loopback API: firewall")
    equal(
        sc["openFirewallInference"]["firewall"],
        {"tcp": [4001], "udp": [4001]},
        "openFirewall, inference profile: firewall",
    )
    equal(
        sc["openFirewallPublic"]["firewall"],
        {"tcp": [4001, 4002, 8080], "udp": [4001]},
        "openFirewall, apiHost 0.0.0.0: firewall",
    )
    equal(
        argv_of("openFirewallPublic"),
        expected_argv(host="0.0.0.0", tail=["--api-key-file", CREDENTIAL]),
        "openFirewallPublic: pod arguments",
    )
    equal(
        sc["publicApiNoKeys"]["firewall"], {"tcp": [4001, 4002, 8080], "udp": [4001]}, "publicApiNoKeys: firewall"
    )
    equal(argv_of("publicApiNoKeys"), expected_argv(host="::", tail=["--public-api"]), "publicApiNoKeys: pod arguments")

    # API keys through LoadCredential.
    c = svc("apiKeyFile")["serviceConfig"]
    equal(c.get("LoadCredential"), [f"api-keys:{KEY_FILE}"], "apiKeyFile: LoadCredential")
    equal(argv_of("apiKeyFile"), expected_argv(tail=["--api-key-file", CREDENTIAL]), "apiKeyFile: pod arguments")

    # A private mesh: the key through LoadCredential beside the API keys, the trusted peers,
    # and no UDP port for QUIC, which the key cannot cover.
    c = svc("privateMesh")["serviceConfig"]
    equal(c.get("LoadCredential"), [f"api-keys:{KEY_FILE}", f"mesh-key:{MESH_KEY_FILE}"],
          "privateMesh: LoadCredential")
    equal(argv_of("privateMesh"), expected_argv(tail=[
        "--api-key-file", CREDENTIAL, "--mesh-key", MESH_KEY_CREDENTIAL,
        "--trust", TRUSTED[0], "--trust", TRUSTED[1], "--serve-to", "trusted",
    ]), "privateMesh: pod arguments")
    equal(sc["privateMesh"]["firewall"], {"tcp": [4001, 4002], "udp": []}, "privateMesh: firewall")

    # ROCm: the HIP runtime and hiprtc from rocm.package's lib/ (a directory pod searches).
    clr_lib = gpu["clr"] + "/lib"
    custom_lib = gpu["customRocm"] + "/lib"
    rocm_cases = [
        ("rocm", "9.0.6", {"POD_HIP_PATH": clr_lib, "POD_HIPRTC_PATH": clr_lib}),
        ("rocmNoOverride", None, {"POD_HIP_PATH": clr_lib, "POD_HIPRTC_PATH": clr_lib}),
        ("rocmPackage", None, {"POD_HIP_PATH": custom_lib, "POD_HIPRTC_PATH": custom_lib}),
        ("rocmNoPackage", None, {}),
        ("rocmNoPackageEnv", None, {"POD_HIP_PATH": "/opt/rocm-6.3.3/lib"}),
    ]
    for name, override, libs in rocm_cases:
        s = svc(name)
        c = s["serviceConfig"]
        env = {"POD_HOME": STATE, **libs}
        if override:
            env["HSA_OVERRIDE_GFX_VERSION"] = override
        equal(s["environment"], env, f"{name}: environment")
        equal(c.get("DeviceAllow"), ROCM_DEVICES, f"{name}: DeviceAllow")
        equal(c.get("DevicePolicy"), "closed", f"{name}: DevicePolicy")
        equal(c.get("PrivateDevices"), False, f"{name}: PrivateDevices")
        equal(c.get("SupplementaryGroups"), ROCM_GROUPS, f"{name}: SupplementaryGroups")
        check_gpu_sandbox(name, c)
        equal(argv_of(name), expected_argv(tail=["--device", "rocm"]), f"{name}: pod arguments")
    s = svc("overrideWithoutRocm")
    equal(s["environment"], {"POD_HOME": STATE}, "overrideWithoutRocm: environment")
    check("DeviceAllow" not in s["serviceConfig"], "overrideWithoutRocm: DeviceAllow is set")
    equal(s["serviceConfig"].get("PrivateDevices"), True, "overrideWithoutRocm: PrivateDevices")
    equal(s["serviceConfig"].get("MemoryDenyWriteExecute"), True, "overrideWithoutRocm: MemoryDenyWriteExecute")
    equal(len(sc["overrideWithoutRocm"]["warnings"]), 1, "overrideWithoutRocm: warnings")
    equal(argv_of("overrideWithoutRocm"), expected_argv(), "overrideWithoutRocm: pod arguments")
    w = sc["rocmNoPackage"]["warnings"]
    check(len(w) == 1 and "POD_HIP_PATH" in w[0], f"rocmNoPackage: expected the POD_HIP_PATH warning, got {w}")

    # NVIDIA: libcuda from the driver NixOS links into /run/opengl-driver/lib, NVRTC from the
    # lib output of nvidia.nvrtcPackage (its out output holds no library).
    check(gpu["nvrtcLib"] != gpu["nvrtc"], f"stub cuda_nvrtc: lib output is the out output: {gpu}")
    nvrtc_lib = gpu["nvrtcLib"] + "/lib"
    nvidia_cases = [
        ("nvidia", "auto", {"POD_NVRTC_PATH": nvrtc_lib}),
        ("nvidiaInference", "inference", {"POD_NVRTC_PATH": nvrtc_lib}),
        ("nvidiaOpenFirewall", "auto", {"POD_NVRTC_PATH": nvrtc_lib}),
        ("nvidiaNoGraphics", "auto", {"POD_NVRTC_PATH": nvrtc_lib}),
        ("nvidiaNoNvrtc", "auto", {}),
        ("nvidiaNoNvrtcEnv", "auto", {"POD_NVRTC_PATH": "/opt/nvrtc/lib/libnvrtc.so.12"}),
    ]
    for name, profile, libs in nvidia_cases:
        s = svc(name)
        c = s["serviceConfig"]
        equal(s["environment"], {"POD_HOME": STATE, "POD_CUDA_PATH": DRIVER_LIB, **libs}, f"{name}: environment")
        equal(c.get("DeviceAllow"), NVIDIA_DEVICES, f"{name}: DeviceAllow")
        equal(c.get("DevicePolicy"), "closed", f"{name}: DevicePolicy")
        equal(c.get("PrivateDevices"), False, f"{name}: PrivateDevices")
        check("SupplementaryGroups" not in c, f"{name}: SupplementaryGroups is set: {c.get('SupplementaryGroups')}")
        check_gpu_sandbox(name, c)
        equal(argv_of(name), expected_argv(profile=profile, tail=["--device", "cuda"]), f"{name}: pod arguments")
    # With a GPU option, auto resolves to inference (or the start fails): no bulk port.
    equal(sc["nvidiaOpenFirewall"]["firewall"], {"tcp": [4001], "udp": [4001]}, "nvidiaOpenFirewall: firewall")
    equal(sc["nvidiaInference"]["firewall"], {"tcp": [4001], "udp": [4001]}, "nvidiaInference: firewall")
    w = sc["nvidiaNoGraphics"]["warnings"]
    check(len(w) == 1 and "hardware.graphics.enable" in w[0] and DRIVER_LIB in w[0],
          f"nvidiaNoGraphics: expected the hardware.graphics warning, got {w}")
    w = sc["nvidiaNoNvrtc"]["warnings"]
    check(len(w) == 1 and "POD_NVRTC_PATH" in w[0], f"nvidiaNoNvrtc: expected the POD_NVRTC_PATH warning, got {w}")
    warned = {"overrideWithoutRocm", "rocmNoPackage", "nvidiaNoGraphics", "nvidiaNoNvrtc"}
    for name in sc:
        if name not in warned:
            equal(sc[name]["warnings"], [], f"{name}: warnings")

    # Every variable the module sets is one pod (or the GPU runtime) reads.
    known = library_env_vars()
    for name in sc:
        if sc[name]["service"] is not None:
            check_env_names(sc[name]["service"]["environment"], known, name)

    # Every other setting.
    equal(
        argv_of("custom"),
        expected_argv(
            profile="inference",
            port="9000",
            p2p="4010",
            tail=[
                "--bootstrap", "/dns4/boot-1.example.org/tcp/4001/p2p/12D3KooWBootOne",
                "--bootstrap", "/ip4/198.51.100.2/udp/4001/quic-v1/p2p/12D3KooWBootTwo",
                "--no-mdns",
                "--listen", "/ip4/0.0.0.0/tcp/4010",
                "--external-addr", '/dns4/a%d$HOME "x".example/tcp/4010',
            ],
        ),
        "custom: pod arguments",
    )
    s = svc("custom")
    equal(s["wantedBy"], [], "custom (autoStart off): wantedBy")
    equal((s["serviceConfig"].get("User"), s["serviceConfig"].get("Group")), ("ai", "ai"), "custom: User, Group")
    equal((sc["custom"]["users"], sc["custom"]["groups"]), ({}, []), "custom (own user): users, groups")
    equal(sc["custom"]["firewall"], {"tcp": [], "udp": []}, "custom: firewall")

    # Assertions.
    for name in sc:
        if name not in ("publicWithoutKeys", "keyFileInStore", "meshKeyInStore", "bothGpus", "gpuAndDeviceArg",
                        "apiHostWithPort", "apiHostUrl"):
            equal(sc[name]["failedAssertions"], [], f"{name}: failed assertions")
    fa = sc["bothGpus"]["failedAssertions"]
    check(len(fa) == 1 and "one GPU backend" in fa[0], f"bothGpus: expected the one-backend assertion, got {fa}")
    fa = sc["gpuAndDeviceArg"]["failedAssertions"]
    check(len(fa) == 1 and "--device cuda" in fa[0] and "extraArgs" in fa[0],
          f"gpuAndDeviceArg: expected the --device assertion, got {fa}")
    fa = sc["publicWithoutKeys"]["failedAssertions"]
    check(len(fa) == 1 and "apiHost" in fa[0], f"publicWithoutKeys: expected the apiHost assertion, got {fa}")
    for name in ("apiHostWithPort", "apiHostUrl"):
        fa = sc[name]["failedAssertions"]
        check(len(fa) == 1 and "neither an IP address nor a host name" in fa[0],
              f"{name}: expected the apiHost form assertion, got {fa}")
    equal(argv_of("apiHostName"), expected_argv(host="localhost"), "apiHostName: pod arguments")
    equal(sc["apiHostName"]["firewall"], {"tcp": [], "udp": []}, "apiHostName: firewall")
    fa = sc["keyFileInStore"]["failedAssertions"]
    check(len(fa) == 1 and "Nix store" in fa[0], f"keyFileInStore: expected the store assertion, got {fa}")
    fa = sc["meshKeyInStore"]["failedAssertions"]
    check(len(fa) == 1 and "meshKeyFile is in the Nix store" in fa[0],
          f"meshKeyInStore: expected the store assertion, got {fa}")

    equal(svc("forcedTimeout")["serviceConfig"].get("TimeoutStartSec"), "1h", "forcedTimeout: mkForce")

    return {name: argv_of(name) for name in sc if sc[name]["service"] is not None}


# ------------------------------------------------------------------ the flake
def check_flake(f):
    equal(f["systems"], ["aarch64-linux", "x86_64-linux"], "flake: packages' systems")
    for system, attrs in f["packageAttrs"].items():
        check("default" in attrs, f"flake: no packages.{system}.default")
    p = f["package"]
    version = f["cargoVersion"]
    equal((p["pname"], p["version"]), ("pod", version), "flake: package name and version")
    equal(p["cargoBuildFlags"], ["-p", "pod-node", "--bin", "pod"], "flake: cargoBuildFlags")
    equal(p["doCheck"], False, "flake: doCheck")
    equal(p["lockFile"], "Cargo.lock", "flake: cargoLock.lockFile")
    equal(p["mainProgram"], "pod", "flake: meta.mainProgram")
    check("make-shell-wrapper-hook" in p["nativeBuildInputs"], "flake: makeWrapper not in nativeBuildInputs")
    check(
        re.search(r"wrapProgram \$out/bin/pod --prefix PATH : \S+-python3-env\+python3-pip/bin", p["postInstall"]),
        f"flake: bin/pod is not wrapped with a python3 that has pip: {p['postInstall']!r}",
    )
    equal(
        p["src"],
        {
            "Cargo.toml": True, "Cargo.lock": True, ".cargo": True, ".cargo/config.toml": True,
            "crates": True, "crates/node/src/main.rs": True,
            "target": False, "tests": False, "bench": False, "deploy": False, "README.md": False,
        },
        "flake: what the source filter keeps",
    )
    check(p["srcStorePath"].endswith("-pod-source"), f"flake: source path {p['srcStorePath']}")
    equal(f["aarch64Package"], f"pod-{version}", "flake: aarch64-linux package")
    equal(f["overlayPackage"], f"pod-{version}", "flake: overlay")
    argv = parse_exec_start(f["module"]["execStart"], "flake module")
    equal(argv[0], f["packagePath"] + "/bin/pod", "flake module: runs the flake's package")
    equal(argv[1:], expected_argv(), "flake module: pod arguments")
    equal(f["module"]["systemPackages"], [f["packagePath"]], "flake module: systemPackages")
    check(
        f["nixpkgsUrl"].startswith("github:NixOS/nixpkgs/"), f"flake: nixpkgs input {f['nixpkgsUrl']}"
    )


# ------------------------------------------------------------------ flags for the Rust test
def flags_document(argvs):
    global_flags, start_flags, takes_value = [], [], {}
    for argv in argvs.values():
        at = argv.index("start")
        for part, flags in ((argv[:at], global_flags), (argv[at + 1 :], start_flags)):
            for i, word in enumerate(part):
                if word.startswith("--"):
                    flag, eq, _ = word.partition("=")
                    if flag not in flags:
                        flags.append(flag)
                    nxt = part[i + 1] if i + 1 < len(part) else None
                    takes_value[flag] = bool(eq) or (nxt is not None and not nxt.startswith("--"))
    default = argvs["default"]
    at = default.index("start")
    defaults = {default[i]: default[i + 1] for i in range(at + 1, len(default) - 1, 2)}
    return {
        "about": "Flags of `pod` that deploy/nixos/module.nix passes; written by scripts/nix-check --emit-flags.",
        "subcommand": "start",
        "global_flags": global_flags,
        "start_flags": start_flags,
        "takes_value": takes_value,
        "start_defaults": defaults,
        "argv": argvs,
    }


def check_gpu_sandbox(name, c):
    """A GPU service keeps the whole sandbox but for MemoryDenyWriteExecute: the GPU runtimes
    compile in the process, and a JIT may need memory both writable and executable."""
    for key, value in HARDENING.items():
        equal(c.get(key), value, f"{name}: {key}")
    check(c.get("MemoryDenyWriteExecute", False) is False,
          f"{name}: MemoryDenyWriteExecute is on, which GPU runtimes may not survive")


# ------------------------------------------------------------------ systemd's own parser
def nixos_unit_text(s, exe):
    """The unit roughly as NixOS writes it from systemd.services.pod."""
    lines = ["[Unit]", f"Description={s['description']}"]
    if s["documentation"]:
        lines.append("Documentation=" + " ".join(s["documentation"]))
    lines += [f"Wants={u}" for u in s["wants"]] + [f"After={u}" for u in s["after"]]
    lines += ["", "[Service]"]
    lines += ["Environment=" + json.dumps(f"{k}={v}") for k, v in sorted(s["environment"].items())]
    for key, value in s["serviceConfig"].items():
        if key == "ExecStart":
            first = re.match(r'"(?:[^"\\]|\\.)*"', value)
            value = json.dumps(exe) + value[first.end() :]
        for v in value if isinstance(value, list) else [value]:
            v = ("true" if v else "false") if isinstance(v, bool) else str(v)
            lines.append(f"{key}={v}")
    if s["wantedBy"]:
        lines += ["", "[Install]"] + [f"WantedBy={u}" for u in s["wantedBy"]]
    return "\n".join(lines) + "\n"


def systemd_verify(unit_paths, label):
    """systemd-analyze verify exits 0 on unknown keys and unparsable values; its messages about
    our files are what counts."""
    proc = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", *unit_paths],
        capture_output=True, text=True, timeout=120,
    )
    names = [os.path.basename(p) for p in unit_paths]
    complaints = [
        line for line in (proc.stdout + proc.stderr).splitlines()
        if any(n in line for n in names) or any(p in line for p in unit_paths)
    ]
    check(proc.returncode == 0 and not complaints,
          f"systemd-analyze verify ({label}), exit {proc.returncode}:\n    " + "\n    ".join(complaints))
    return not complaints


def exposure(unit_path, label, limit=None):
    """`systemd-analyze security`'s overall exposure of a unit file (0 safest, 10 least safe),
    printed; with `limit`, a failure when over it."""
    proc = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", "--no-pager", unit_path],
        capture_output=True, text=True, timeout=120,
    )
    m = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", proc.stdout)
    if not check(m is not None, f"systemd-analyze security ({label}) gave no exposure:\n{proc.stdout}{proc.stderr}"):
        return None
    level = float(m.group(1))
    print(f"nix-check: systemd-analyze security, {label}: exposure {level}", file=sys.stderr)
    if limit is not None:
        check(level <= limit, f"systemd-analyze security ({label}): exposure {level} over {limit}")
    return level


def uncommented_text(path):
    """The file with its commented-out Environment= lines turned on, as a user would."""
    text = open(path, encoding="utf-8").read()
    return re.sub(r"(?m)^#(Environment=)", r"\1", text)


def parse_unit(path, uncomment=False):
    sections, section = {}, None
    text = uncommented_text(path) if uncomment else open(path, encoding="utf-8").read()
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = sections.setdefault(line.strip("[]"), [])
            continue
        key, _, value = line.partition("=")
        section.append((key.strip(), value.strip()))
    return sections


def plain_unit_argv(service_entries):
    env = {}
    for key, value in service_entries:
        if key == "Environment":
            for assignment in shlex.split(value):
                k, _, v = assignment.partition("=")
                env[k] = v
    exec_start = [v for k, v in service_entries if k == "ExecStart"][-1]
    argv = []
    for word in exec_start.split():
        m = re.fullmatch(r"\$\{(\w+)\}", word)
        if m:
            argv.append(env.get(m.group(1), ""))
            continue
        m = re.fullmatch(r"\$(\w+)", word)
        if m:
            argv += env.get(m.group(1), "").split()
            continue
        check("$" not in word, f"deploy/systemd/pod.service: unexpanded word {word!r}")
        argv.append(word)
    return argv, env


def check_plain_unit(sc, workdir, can_verify, known_vars):
    base = os.path.join(ROOT, "deploy", "systemd")
    unit = parse_unit(os.path.join(base, "pod.service"))
    service = unit["Service"]
    values = {}
    for key, value in service:
        values.setdefault(key, []).append(value)
    module = sc["default"]["service"]["serviceConfig"]

    def norm(v):
        if isinstance(v, bool):
            return "yes" if v else "no"
        if isinstance(v, list):
            return " ".join(str(x) for x in v)
        return {"true": "yes", "false": "no"}.get(str(v), str(v))

    for key, value in module.items():
        if key == "ExecStart":
            continue
        plain = " ".join(values.get(key, ["<missing>"]))
        equal(norm(plain), norm(value), f"deploy/systemd/pod.service: {key} (the module has {value!r})")
    for key in values:
        check(key in module or key in ("Environment", "EnvironmentFile", "ExecStart"),
              f"deploy/systemd/pod.service: {key} is not in the NixOS module")
    equal(dict(unit["Install"]).get("WantedBy"), "multi-user.target", "deploy/systemd/pod.service: WantedBy")

    argv, env = plain_unit_argv(service)
    equal(env.get("POD_HOME"), STATE, "deploy/systemd/pod.service: POD_HOME")
    equal(argv[0], "/usr/local/bin/pod", "deploy/systemd/pod.service: binary")
    equal(argv[1:], expected_argv(), "deploy/systemd/pod.service: pod arguments (the module's defaults)")

    keys = parse_unit(os.path.join(base, "api-keys.conf"))["Service"]
    argv, _ = plain_unit_argv(service + keys)
    equal(argv[1:], expected_argv(tail=["--api-key-file", CREDENTIAL]), "api-keys.conf: pod arguments")
    equal([v for k, v in keys if k == "LoadCredential"], ["api-keys:/etc/pod/api-keys"], "api-keys.conf: LoadCredential")

    rocm = parse_unit(os.path.join(base, "rocm.conf"))["Service"]
    argv, _ = plain_unit_argv(service + rocm)
    equal(argv[1:], expected_argv(tail=["--device", "rocm"]), "rocm.conf: pod arguments")
    module_rocm = sc["rocm"]["service"]["serviceConfig"]
    equal([v for k, v in rocm if k == "DeviceAllow"], module_rocm["DeviceAllow"], "rocm.conf: DeviceAllow")
    equal(" ".join(v for k, v in rocm if k == "SupplementaryGroups").split(), module_rocm["SupplementaryGroups"],
          "rocm.conf: SupplementaryGroups")
    equal(dict(rocm).get("PrivateDevices"), "no", "rocm.conf: PrivateDevices")
    equal(dict(rocm).get("MemoryDenyWriteExecute"), "no", "rocm.conf: MemoryDenyWriteExecute")
    equal(dict(rocm).get("DevicePolicy"), "closed", "rocm.conf: DevicePolicy")

    nvidia = parse_unit(os.path.join(base, "nvidia.conf"))["Service"]
    argv, _ = plain_unit_argv(service + nvidia)
    equal(argv[1:], expected_argv(tail=["--device", "cuda"]), "nvidia.conf: pod arguments")
    module_nvidia = sc["nvidia"]["service"]["serviceConfig"]
    equal([v for k, v in nvidia if k == "DeviceAllow"], module_nvidia["DeviceAllow"], "nvidia.conf: DeviceAllow")
    equal(dict(nvidia).get("PrivateDevices"), "no", "nvidia.conf: PrivateDevices")
    equal(dict(nvidia).get("MemoryDenyWriteExecute"), "no", "nvidia.conf: MemoryDenyWriteExecute")
    equal(dict(nvidia).get("DevicePolicy"), "closed", "nvidia.conf: DevicePolicy")
    check("SupplementaryGroups" not in dict(nvidia), "nvidia.conf: SupplementaryGroups is set")

    # The commented-out variables, once a user turns them on, are ones pod reads.
    expect_commented = {
        "rocm.conf": {"HSA_OVERRIDE_GFX_VERSION", "POD_HIP_PATH", "POD_HIPRTC_PATH"},
        "nvidia.conf": {"POD_NVRTC_PATH", "POD_CUDA_PATH"},
    }
    for conf, names in expect_commented.items():
        entries = parse_unit(os.path.join(base, conf), uncomment=True)["Service"]
        _, env = plain_unit_argv(service + entries)
        _, plain_env = plain_unit_argv(service + parse_unit(os.path.join(base, conf))["Service"])
        added = set(env) - set(plain_env)
        equal(added, names, f"{conf}: commented-out Environment= lines")
        check_env_names(added, known_vars, f"{conf}, commented-out Environment= lines")

    if can_verify:
        exposure(os.path.join(base, "pod.service"), "deploy/systemd/pod.service", MAX_EXPOSURE)
        exe = os.path.join(workdir, "pod")
        text = open(os.path.join(base, "pod.service"), encoding="utf-8").read()
        # One GPU drop-in at a time (both set POD_DEVICE_ARGS), with the comments turned on.
        for label, confs in (("api-keys.conf and rocm.conf", ("api-keys.conf", "rocm.conf")),
                             ("nvidia.conf", ("nvidia.conf",))):
            d = os.path.join(workdir, "plain-" + confs[-1].split(".")[0])
            os.makedirs(os.path.join(d, "pod.service.d"), exist_ok=True)
            open(os.path.join(d, "pod.service"), "w").write(text.replace("/usr/local/bin/pod", exe))
            for conf in confs:
                with open(os.path.join(d, "pod.service.d", conf), "w") as f:
                    f.write(uncommented_text(os.path.join(base, conf)))
            systemd_verify([os.path.join(d, "pod.service")], f"deploy/systemd/pod.service with {label}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--scenarios", required=True)
    ap.add_argument("--flake", required=True)
    ap.add_argument("--gpu-packages", required=True)
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--emit-flags")
    args = ap.parse_args()
    sc = json.load(open(args.scenarios))
    flake = json.load(open(args.flake))

    gpu = json.load(open(args.gpu_packages))

    argvs = check_scenarios(sc, flake, gpu)
    check_flake(flake)

    exe = os.path.join(args.workdir, "pod")
    with open(exe, "w") as f:
        f.write("#!/bin/sh\nexit 0\n")
    os.chmod(exe, 0o755)
    can_verify = shutil.which("systemd-analyze") is not None
    if can_verify:
        units = []
        os.makedirs(os.path.join(args.workdir, "units"), exist_ok=True)
        for name, s in sc.items():
            if s["service"] is not None:
                path = os.path.join(args.workdir, "units", f"podcheck-{name}.service")
                with open(path, "w") as f:
                    f.write(nixos_unit_text(s["service"], exe))
                units.append(path)
        systemd_verify(units, f"{len(units)} units rendered from the module")
        unit_dir = os.path.join(args.workdir, "units")
        exposure(os.path.join(unit_dir, "podcheck-default.service"), "the module's default unit", MAX_EXPOSURE)
        for name in ("rocm", "nvidia"):
            exposure(os.path.join(unit_dir, f"podcheck-{name}.service"), f"the module's {name} unit")
    check_plain_unit(sc, args.workdir, can_verify, library_env_vars())

    if args.emit_flags:
        with open(args.emit_flags, "w") as f:
            json.dump(flags_document(argvs), f, indent=2)
            f.write("\n")

    summary = {
        "default ExecStart": " ".join(argvs["default"]),
        "firewall, openFirewall": sc["openFirewall"]["firewall"],
        "firewall, openFirewall + apiHost 0.0.0.0": sc["openFirewallPublic"]["firewall"],
        "environment, rocm + override": sc["rocm"]["service"]["environment"],
        "DeviceAllow, rocm": sc["rocm"]["service"]["serviceConfig"]["DeviceAllow"],
        "environment, nvidia": sc["nvidia"]["service"]["environment"],
        "DeviceAllow, nvidia": sc["nvidia"]["service"]["serviceConfig"]["DeviceAllow"],
        "LoadCredential, apiKeyFile": sc["apiKeyFile"]["service"]["serviceConfig"]["LoadCredential"],
    }
    for k, v in summary.items():
        print(f"nix-check: {k}: {v if isinstance(v, str) else json.dumps(v)}", file=sys.stderr)
    if not can_verify:
        print("nix-check: systemd-analyze not found: units not verified by systemd", file=sys.stderr)

    if failures:
        for f in failures:
            print(f"nix-check: FAIL {f}", file=sys.stderr)
        print(f"nix-check: {len(failures)} mismatches", file=sys.stderr)
        return 1
    print("nix-check: module, flake and plain unit match expectations", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
