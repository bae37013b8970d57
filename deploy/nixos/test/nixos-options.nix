# Declarations of the NixOS options that deploy/nixos/module.nix sets, with the names and types
# NixOS gives them (nixos/lib/systemd-unit-options.nix, users-groups.nix, firewall.nix,
# assertions.nix, graphics.nix), so that evaluating the module without nixpkgs still fails on a misspelt option
# or a value of the wrong type. It only declares options: it does not generate unit files, create
# users or configure a firewall.
{ lib, ... }:

let
  inherit (lib) mkOption types;

  # NixOS' unitOption: a list of values becomes several lines (definitions concatenate); any
  # other value must be the same in every definition.
  unitOption = lib.mkOptionType {
    name = "systemd option";
    merge =
      loc: defs:
      if builtins.any (def: builtins.isList def.value) defs then
        builtins.concatMap (def: lib.toList def.value) defs
      else
        lib.mergeEqualOption loc defs;
  };

  # NixOS checks these [Service] values when it builds the unit (checkService).
  oneOf =
    name: allowed: attrs:
    !(attrs ? ${name}) || builtins.elem attrs.${name} allowed;
  checkService =
    attrs:
    oneOf "Type" [
      "exec"
      "simple"
      "forking"
      "oneshot"
      "dbus"
      "notify"
      "notify-reload"
      "idle"
    ] attrs
    && oneOf "Restart" [
      "no"
      "on-success"
      "on-failure"
      "on-abnormal"
      "on-abort"
      "on-watchdog"
      "always"
    ] attrs
    && oneOf "NotifyAccess" [
      "none"
      "main"
      "exec"
      "all"
    ] attrs;

  unitNames = mkOption {
    type = types.listOf types.str;
    default = [ ];
  };

  serviceModule = {
    options = {
      description = mkOption {
        type = types.str;
        default = "";
      };
      documentation = unitNames;
      wantedBy = unitNames;
      requiredBy = unitNames;
      wants = unitNames;
      requires = unitNames;
      after = unitNames;
      before = unitNames;
      environment = mkOption {
        type = types.attrsOf (types.nullOr (types.either types.str types.path));
        default = { };
      };
      path = mkOption {
        type = types.listOf (types.either types.package types.str);
        default = [ ];
      };
      unitConfig = mkOption {
        type = types.attrsOf unitOption;
        default = { };
      };
      serviceConfig = mkOption {
        type = types.addCheck (types.attrsOf unitOption) checkService;
        default = { };
      };
    };
  };

  userModule = {
    options = {
      isSystemUser = mkOption {
        type = types.bool;
        default = false;
      };
      isNormalUser = mkOption {
        type = types.bool;
        default = false;
      };
      group = mkOption {
        type = types.str;
        default = "";
      };
      extraGroups = unitNames;
      home = mkOption {
        type = types.path;
        default = "/var/empty";
      };
      createHome = mkOption {
        type = types.bool;
        default = false;
      };
      description = mkOption {
        type = types.str;
        default = "";
      };
    };
  };

  groupModule = {
    options.gid = mkOption {
      type = types.nullOr types.int;
      default = null;
    };
  };
in
{
  options = {
    assertions = mkOption {
      type = types.listOf types.unspecified;
      default = [ ];
    };
    warnings = mkOption {
      type = types.listOf types.str;
      default = [ ];
    };
    systemd.services = mkOption {
      type = types.attrsOf (types.submodule serviceModule);
      default = { };
    };
    users.users = mkOption {
      type = types.attrsOf (types.submodule userModule);
      default = { };
    };
    users.groups = mkOption {
      type = types.attrsOf (types.submodule groupModule);
      default = { };
    };
    environment.systemPackages = mkOption {
      type = types.listOf types.package;
      default = [ ];
    };
    networking.firewall.allowedTCPPorts = mkOption {
      type = types.listOf types.port;
      default = [ ];
    };
    networking.firewall.allowedUDPPorts = mkOption {
      type = types.listOf types.port;
      default = [ ];
    };
    # nixos/modules/hardware/graphics.nix: links the driver's libraries into /run/opengl-driver.
    hardware.graphics.enable = mkOption {
      type = types.bool;
      default = false;
    };
  };
}
