# A small stand-in for nixpkgs' `lib`, for evaluating deploy/nixos/module.nix and flake.nix with
# nothing but a Nix evaluator (scripts/nix-check). It is not nixpkgs: it implements the parts of
# the module system those files rely on, with nixpkgs' semantics, so that a broken module fails:
#
# - evalModules: modules as functions, attribute sets or paths; `imports`; `options` declared in
#   several modules; `config` as the fixed point; a definition of an undeclared option is an
#   error ("does not exist"); so is an unsupported top-level module attribute.
# - mkIf (conditions must be booleans and are pushed down lazily, as in nixpkgs), mkMerge,
#   mkOverride/mkDefault/mkForce and option defaults (priority 1500): only the definitions of
#   the highest priority count.
# - types: bool int port str strMatching path package enum listOf attrsOf nullOr either submodule
#   unspecified addCheck mkOptionType; every definition is checked against its type, and merged
#   like nixpkgs does (lists concatenate, attrsOf merges per attribute and drops attributes whose
#   definitions are all mkIf false, scalars must agree, package must be defined once per priority).
#
# scripts/nix-check --nixpkgs-lib DIR runs the same evaluation with the real nixpkgs lib instead.
let
  inherit (builtins)
    all
    any
    attrNames
    concatLists
    concatMap
    elem
    filter
    foldl'
    genList
    head
    isAttrs
    isBool
    isFunction
    isInt
    isList
    isPath
    isString
    length
    listToAttrs
    mapAttrs
    match
    stringLength
    substring
    tail
    toJSON
    typeOf
    ;

  lib = rec {
    # ---------------------------------------------------------------- lists, strings, attrsets
    inherit (builtins) concatMap concatStringsSep elem replaceStrings mapAttrs attrNames;
    id = x: x;
    optional = cond: x: if cond then [ x ] else [ ];
    optionals = cond: xs: if cond then xs else [ ];
    optionalAttrs = cond: as: if cond then as else { };
    optionalString = cond: s: if cond then s else "";
    toList = x: if isList x then x else [ x ];
    last = xs: builtins.elemAt xs (length xs - 1);
    imap1 = f: xs: genList (n: f (n + 1) (builtins.elemAt xs n)) (length xs);
    concatMapStringsSep = sep: f: xs: concatStringsSep sep (map f xs);
    hasPrefix = pref: s: substring 0 (stringLength pref) s == pref;
    hasSuffix =
      suf: s:
      let
        ls = stringLength s;
        lf = stringLength suf;
      in
      lf <= ls && substring (ls - lf) lf s == suf;
    removePrefix =
      pref: s: if hasPrefix pref s then substring (stringLength pref) (stringLength s) s else s;
    genAttrs =
      names: f:
      listToAttrs (
        map (n: {
          name = n;
          value = f n;
        }) names
      );
    filterAttrs =
      pred: set:
      listToAttrs (
        concatMap (
          n:
          if pred n set.${n} then
            [
              {
                name = n;
                value = set.${n};
              }
            ]
          else
            [ ]
        ) (attrNames set)
      );
    zipAttrsWith =
      f: sets:
      mapAttrs (n: _: f n (concatMap (s: if s ? ${n} then [ s.${n} ] else [ ]) sets)) (
        foldl' (acc: s: acc // s) { } sets
      );
    mergeAttrs = a: b: a // b;
    importTOML = p: builtins.fromTOML (builtins.readFile p);
    makeBinPath = ps: concatStringsSep ":" (map (p: "${p}/bin") ps);
    isDerivation = x: isAttrs x && (x.type or null) == "derivation";
    # A package's output by name (`lib`, `dev`), else its `out`, as nixpkgs picks it; a package
    # given as one output already (pkg.lib, outputSpecified) stays as it is.
    getOutput =
      output: pkg:
      if !(pkg ? outputSpecified) || !pkg.outputSpecified then
        pkg.${output} or pkg.out or pkg
      else
        pkg;
    getLib = getOutput "lib";
    isStorePath = x: isString x && hasPrefix "${builtins.storeDir}/" x;
    escapeShellArg =
      arg:
      let
        s = toString arg;
      in
      if match "[[:alnum:],._+:@%/-]+" s == null then
        "'${replaceStrings [ "'" ] [ "'\\''" ] s}'"
      else
        s;
    escapeShellArgs = concatMapStringsSep " " escapeShellArg;

    # ---------------------------------------------------------------- sources, meta
    cleanSourceWith =
      {
        src,
        filter ? (_: _: true),
        name ? null,
      }:
      let
        orig = src.origSrc or src;
        inner = src.filter or (_: _: true);
        both = path: type: inner path type && filter path type;
        name' = if name != null then name else src.name or "source";
      in
      {
        _isLibCleanSourceWith = true;
        origSrc = orig;
        filter = both;
        name = name';
        outPath = builtins.path {
          name = name';
          path = orig;
          filter = both;
        };
      };
    licenses.asl20 = {
      spdxId = "Apache-2.0";
      shortName = "asl20";
      fullName = "Apache License 2.0";
      free = true;
    };
    platforms.linux = [
      "x86_64-linux"
      "aarch64-linux"
    ];
    literalExpression = text: {
      _type = "literalExpression";
      inherit text;
    };

    # ---------------------------------------------------------------- module system
    showOption = loc: concatStringsSep "." loc;
    showVal =
      v:
      if isString v then
        toJSON v
      else if isInt v || isBool v || v == null then
        toJSON v
      else if isList v then
        "[ ${concatStringsSep " " (map showVal v)} ]"
      else if isDerivation v then
        "<derivation ${v.name or "?"}>"
      else if isAttrs v then
        "{ ${concatStringsSep " " (map (n: "${n} = ${showVal v.${n}};") (attrNames v))} }"
      else
        "<${typeOf v}>";
    showDefs = defs: concatStringsSep "" (map (d: "\n- In `${d.file}': ${showVal d.value}") defs);

    mkOption = attrs: attrs // { _type = "option"; };
    isOption = x: isAttrs x && (x._type or "") == "option";
    mkEnableOption =
      name:
      mkOption {
        type = types.bool;
        default = false;
        example = true;
        description = "Whether to enable ${name}.";
      };

    mkIf = condition: content: {
      _type = "if";
      inherit condition content;
    };
    mkMerge = contents: {
      _type = "merge";
      inherit contents;
    };
    mkOverride = priority: content: {
      _type = "override";
      inherit priority content;
    };
    mkOptionDefault = mkOverride 1500;
    mkDefault = mkOverride 1000;
    mkForce = mkOverride 50;
    defaultOverridePriority = 100;

    # mkMerge and mkIf at an attribute set of options: pushed down to each attribute, without
    # evaluating the condition (that is what lets a module's config depend on its options).
    pushDownProperties =
      cfg:
      if !(isAttrs cfg) then
        [ cfg ]
      else if (cfg._type or "") == "merge" then
        concatMap pushDownProperties cfg.contents
      else if (cfg._type or "") == "if" then
        map (mapAttrs (_: v: mkIf cfg.condition v)) (pushDownProperties cfg.content)
      else if (cfg._type or "") == "override" then
        map (mapAttrs (_: v: mkOverride cfg.priority v)) (pushDownProperties cfg.content)
      else
        [ cfg ];

    # mkMerge and mkIf at an option's value: a list of the definitions that remain.
    dischargeProperties =
      def:
      if isAttrs def && (def._type or "") == "merge" then
        concatMap dischargeProperties def.contents
      else if isAttrs def && (def._type or "") == "if" then
        if !(isBool def.condition) then
          throw "mkIf called with a non-Boolean condition"
        else if def.condition then
          dischargeProperties def.content
        else
          [ ]
      else
        [ def ];

    mergeDefinitions =
      loc: type: defs:
      let
        discharged = concatMap (
          d:
          map (v: {
            inherit (d) file;
            value = v;
          }) (dischargeProperties d.value)
        ) defs;
        isOverride = d: isAttrs d.value && (d.value._type or "") == "override";
        prioOf = d: if isOverride d then d.value.priority else defaultOverridePriority;
        highest = foldl' (acc: d: if prioOf d < acc then prioOf d else acc) 9999 discharged;
        kept = map (d: if isOverride d then d // { value = d.value.content; } else d) (
          filter (d: prioOf d == highest) discharged
        );
        invalid = filter (d: !(type.check d.value)) kept;
        isDefined = kept != [ ];
        mergedValue =
          if !isDefined then
            throw "The option `${showOption loc}' is used but not defined."
          else if invalid != [ ] then
            throw "A definition for option `${showOption loc}' is not of type `${type.description}'. Definition values:${showDefs invalid}"
          else
            type.merge loc kept;
      in
      {
        inherit isDefined mergedValue;
        optionalValue = if isDefined then { value = mergedValue; } else { };
      };

    mergeDefaultOption =
      loc: defs:
      let
        list = map (d: d.value) defs;
      in
      if length list == 1 then
        head list
      else if all isList list then
        concatLists list
      else if all isAttrs list then
        foldl' mergeAttrs { } list
      else if all isBool list then
        any (x: x) list
      else if all isString list then
        concatStringsSep "" list
      else if all isInt list && all (x: x == head list) list then
        head list
      else
        throw "Cannot merge definitions of `${showOption loc}'. Definition values:${showDefs defs}";

    mergeEqualOption =
      loc: defs:
      if defs == [ ] then
        abort "mergeEqualOption: no definitions"
      else
        (foldl' (
          first: def:
          if def.value != first.value then
            throw "The option `${showOption loc}' has conflicting definition values:${showDefs [ first def ]}"
          else
            first
        ) (head defs) (tail defs)).value;

    mergeOneOption =
      loc: defs:
      if length defs == 1 then
        (head defs).value
      else
        throw "The option `${showOption loc}' is defined multiple times while it's expected to be unique.\nDefinition values:${showDefs defs}";

    mkOptionType =
      {
        name,
        description ? name,
        check ? (_: true),
        merge ? mergeDefaultOption,
        ...
      }:
      {
        _type = "option-type";
        inherit
          name
          description
          check
          merge
          ;
      };

    types = rec {
      unspecified = mkOptionType { name = "unspecified"; };
      bool = mkOptionType {
        name = "bool";
        description = "boolean";
        check = isBool;
        merge = mergeEqualOption;
      };
      int = mkOptionType {
        name = "int";
        description = "signed integer";
        check = isInt;
        merge = mergeEqualOption;
      };
      port = mkOptionType {
        name = "port";
        description = "16 bit unsigned integer; between 0 and 65535 (both inclusive)";
        check = x: isInt x && x >= 0 && x <= 65535;
        merge = mergeEqualOption;
      };
      str = mkOptionType {
        name = "str";
        description = "string";
        check = isString;
        merge = mergeEqualOption;
      };
      strMatching =
        pattern:
        mkOptionType {
          name = "strMatching ${toJSON pattern}";
          description = "string matching the pattern ${pattern}";
          check = x: isString x && match pattern x != null;
          merge = mergeEqualOption;
        };
      path = mkOptionType {
        name = "path";
        description = "absolute path";
        check =
          x: (isPath x || isString x || (isAttrs x && x ? outPath)) && substring 0 1 (toString x) == "/";
        merge = mergeEqualOption;
      };
      package = mkOptionType {
        name = "package";
        check = x: isDerivation x || isStorePath x;
        merge = mergeOneOption;
      };
      enum =
        values:
        mkOptionType {
          name = "enum";
          description = "one of ${concatMapStringsSep ", " toJSON values}";
          check = x: elem x values;
          merge = mergeEqualOption;
        };
      listOf =
        elemType:
        mkOptionType {
          name = "listOf";
          description = "list of ${elemType.description}";
          check = isList;
          merge =
            loc: defs:
            map (x: x.value) (
              filter (x: x ? value) (
                concatLists (
                  imap1 (
                    n: def:
                    imap1 (
                      m: v:
                      (mergeDefinitions (loc ++ [ "[definition ${toString n}-entry ${toString m}]" ]) elemType [
                        {
                          inherit (def) file;
                          value = v;
                        }
                      ]).optionalValue
                    ) def.value
                  ) defs
                )
              )
            );
        };
      attrsOf =
        elemType:
        mkOptionType {
          name = "attrsOf";
          description = "attribute set of ${elemType.description}";
          check = isAttrs;
          merge =
            loc: defs:
            mapAttrs (_: v: v.value) (
              filterAttrs (_: v: v ? value) (
                zipAttrsWith (name: defs: (mergeDefinitions (loc ++ [ name ]) elemType defs).optionalValue) (
                  map (
                    def:
                    mapAttrs (_: v: {
                      inherit (def) file;
                      value = v;
                    }) def.value
                  ) defs
                )
              )
            );
        };
      nullOr =
        elemType:
        mkOptionType {
          name = "nullOr";
          description = "null or ${elemType.description}";
          check = x: x == null || elemType.check x;
          merge =
            loc: defs:
            let
              nulls = length (filter (d: d.value == null) defs);
            in
            if nulls == length defs then
              null
            else if nulls != 0 then
              throw "The option `${showOption loc}' is defined both null and not null."
            else
              elemType.merge loc defs;
        };
      either =
        t1: t2:
        mkOptionType {
          name = "either";
          description = "${t1.description} or ${t2.description}";
          check = x: t1.check x || t2.check x;
          merge =
            loc: defs:
            let
              vs = map (d: d.value) defs;
            in
            if all t1.check vs then
              t1.merge loc defs
            else if all t2.check vs then
              t2.merge loc defs
            else
              mergeOneOption loc defs;
        };
      addCheck = t: extra: t // { check = x: t.check x && extra x; };
      submodule =
        modules:
        mkOptionType {
          name = "submodule";
          check = x: isAttrs x || isFunction x || isPath x;
          merge =
            loc: defs:
            (evalModules {
              prefix = loc;
              specialArgs.name = last loc;
              modules =
                toList modules
                ++ map (
                  d:
                  if isAttrs d.value then
                    {
                      _file = d.file;
                      imports = [ d.value ];
                    }
                  else
                    d.value
                ) defs;
            }).config;
        };
    };

    evalModules =
      {
        modules,
        specialArgs ? { },
        prefix ? [ ],
      }:
      let
        args = {
          inherit lib config;
          options = declTree;
        } // specialArgs;

        moduleKeys = [
          "_file"
          "key"
          "imports"
          "options"
          "config"
          "meta"
          "disabledModules"
          "_class"
        ];
        load =
          file: m:
          if isPath m || isString m then
            load (toString m) (import m)
          else if isFunction m then
            load file (m args)
          else if !(isAttrs m) then
            throw "Module `${file}' is a ${typeOf m}, not a function, path or attribute set."
          else
            let
              f = m._file or file;
              unsupported = filter (n: !(elem n moduleKeys)) (attrNames m);
            in
            if m ? options || m ? config then
              if unsupported != [ ] then
                throw "Module `${f}' has an unsupported attribute `${head unsupported}'. This is caused by introducing a top-level `config' or `options' attribute. Add configuration attributes immediately on the top level instead, or move all of them (namely: ${concatStringsSep " " unsupported}) into the explicit `config' attribute."
              else
                {
                  file = f;
                  imports = m.imports or [ ];
                  options = m.options or { };
                  config = m.config or { };
                }
            else
              {
                file = f;
                imports = m.imports or [ ];
                options = { };
                config = removeAttrs m moduleKeys;
              };
        collect =
          file: ms:
          concatMap (
            m:
            let
              n = load file m;
            in
            [ n ] ++ collect n.file n.imports
          ) ms;
        mods = collect "<unknown-file>" modules;

        mergeDecls =
          loc: a: b:
          if isOption a || isOption b then
            throw "The option `${showOption loc}' is declared more than once."
          else
            a // b // mapAttrs (n: _: mergeDecls (loc ++ [ n ]) a.${n} b.${n}) (builtins.intersectAttrs a b);
        declTree = foldl' (acc: m: mergeDecls prefix acc m.options) { } mods;

        evalOption =
          loc: opt: defs:
          let
            res = mergeDefinitions loc (opt.type or types.unspecified) (
              (optional (opt ? default) {
                file = "<default of ${showOption loc}>";
                value = mkOptionDefault opt.default;
              })
              ++ defs
            );
          in
          if opt ? apply then opt.apply res.mergedValue else res.mergedValue;

        evalTree =
          loc: decls: defs:
          let
            pushed = concatMap (
              d:
              map (v: {
                inherit (d) file;
                value = v;
              }) (pushDownProperties d.value)
            ) defs;
            notAttrs = filter (d: !(isAttrs d.value)) pushed;
            unknown = concatMap (
              d:
              map (n: {
                name = n;
                inherit (d) file;
              }) (filter (n: !(decls ? ${n})) (attrNames d.value))
            ) pushed;
            byName =
              n:
              concatMap (
                d:
                if d.value ? ${n} then
                  [
                    {
                      inherit (d) file;
                      value = d.value.${n};
                    }
                  ]
                else
                  [ ]
              ) pushed;
          in
          if notAttrs != [ ] then
            throw "The option path `${showOption loc}' is an attribute set of options, but it is defined to not be an attribute set (in `${(head notAttrs).file}')."
          else if unknown != [ ] then
            throw "The option `${showOption (loc ++ [ (head unknown).name ])}' does not exist. Definition in `${(head unknown).file}'."
          else
            mapAttrs (
              n: decl:
              if isOption decl then
                evalOption (loc ++ [ n ]) decl (byName n)
              else if isAttrs decl then
                evalTree (loc ++ [ n ]) decl (byName n)
              else
                throw "`${showOption (loc ++ [ n ])}' is declared as a ${typeOf decl}: declare options with mkOption."
            ) decls;

        config = evalTree prefix declTree (
          map (m: {
            inherit (m) file;
            value = m.config;
          }) mods
        );
      in
      {
        inherit config;
        options = declTree;
      };
  };
in
lib
