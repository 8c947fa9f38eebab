# Helpers of the offline test package set: import files of installed Debian packages into the
# store (content-addressed, with builtins.path) and re-link their ELF files with patchelf so
# that they load the store's glibc and libraries, never the host's.
#
# There is no stdenv: every derivation is a plain `derivation` whose builder is Debian's
# static busybox `sh`, sourcing ./setup.sh for its shell helpers.
{ system, hostSystem }:

let
  inherit (builtins)
    concatMap concatStringsSep elemAt filter hasAttr head isString listToAttrs
    map match pathExists readFile removeAttrs split stringLength substring;

  # The host's Debian architecture. Files are always the host's; `system` only labels the
  # derivations (aarch64-linux derivations evaluate on an x86_64 host but cannot be built).
  hosts = {
    x86_64-linux = { debArch = "amd64"; triple = "x86_64-linux-gnu"; ldso = "ld-linux-x86-64.so.2"; };
    aarch64-linux = { debArch = "arm64"; triple = "aarch64-linux-gnu"; ldso = "ld-linux-aarch64.so.1"; };
  };
  host = hosts.${hostSystem} or (throw "testpkgs: unsupported build host ${hostSystem}");

  hasPrefix = prefix: s: substring 0 (stringLength prefix) s == prefix;
  lines = s: filter (l: isString l && l != "") (split "\n" s);

  # Debian 12 has a merged /usr: /bin, /sbin and /lib are symlinks into /usr, but dpkg's file
  # lists still name many files by their old paths.
  normalize = p:
    let m = match "/(bin|sbin|lib|lib64)(/.*)?" p;
    in if m == null then p
       else "/usr/${head m}${if elemAt m 1 == null then "" else elemAt m 1}";

  # Every path (files, symlinks, directories) that dpkg installed for Debian package `deb`.
  debFileList = deb:
    let
      lists = filter pathExists [
        "/var/lib/dpkg/info/${deb}:${host.debArch}.list"
        "/var/lib/dpkg/info/${deb}.list"
      ];
    in
    if lists == [ ] then
      throw "testpkgs: Debian package ${deb} is not installed (apt-get install ${deb})"
    else map normalize (lines (readFile (head lists)));

in
rec {
  inherit host;
  libDir = "/usr/lib/${host.triple}";

  # debFiles { name, debs, root, exclude }: the files of the Debian packages `debs` below the
  # host directory `root`, as one store path (builtins.path: content-addressed, so a package
  # rebuilds exactly when the host's files change). Taking exactly dpkg's list keeps out what
  # other packages put in the same directory and keeps a library's symlink together with the
  # file it points at (a store import of a lone symlink would dangle). `exclude` holds
  # regular expressions on the path relative to `root`.
  debFiles = { name, debs, root, exclude ? [ ] }:
    let
      prefix = root + "/";
      relative = p: substring (stringLength prefix) (stringLength p) p;
      excluded = p: filter (re: match re (relative p) != null) exclude != [ ];
      wanted = filter (p: hasPrefix prefix p && !excluded p) (concatMap debFileList debs);
      keep = listToAttrs (map (p: { name = p; value = true; }) wanted);
    in
    if wanted == [ ] then
      throw "testpkgs: Debian packages ${concatStringsSep ", " debs} have no files below ${root}"
    else
      builtins.path {
        inherit name;
        path = /. + root;
        filter = p: _type: hasAttr p keep;
      };

  # Debian's static busybox, imported inside a directory as a file named `busybox`: busybox
  # picks its applet from argv[0]'s base name, and a store file would be `<hash>-busybox`.
  busyboxSrc = debFiles { name = "busybox-static-src"; debs = [ "busybox-static" ]; root = "/usr/bin"; };

  busybox = derivation {
    name = "busybox";
    inherit system hostSystem;
    builder = "${busyboxSrc}/busybox";
    args = [ "sh" "-euc" ''
      bb=${busyboxSrc}/busybox
      [ "$hostSystem" = "$system" ] || { echo "testpkgs: busybox is the $hostSystem host's" >&2; exit 1; }
      $bb mkdir -p $out/bin
      $bb cp $bb $out/bin/busybox
      for applet in $($bb --list); do
        [ "$applet" = busybox ] || $bb ln -s busybox "$out/bin/$applet"
      done
    '' ];
  };

  # mkPackage { name, script, ... }: a derivation built by busybox sh running `script` after
  # ./setup.sh; other attributes become environment variables.
  mkPackage = { name, script, ... }@attrs:
    derivation (removeAttrs attrs [ "script" ] // {
      inherit name system hostSystem busybox;
      builder = "${busybox}/bin/sh";
      args = [ "-c" ". ${./setup.sh}\n${script}" ];
      PATH = "${busybox}/bin";
    });

  # writeScriptBin name text: $out/bin/<name>, a busybox sh script.
  writeScriptBin = name: text: mkPackage {
    inherit name text;
    script = ''write_script "$out/bin/$name" "$text"'';
  };

  # mkDebian: files of Debian packages copied into $out and re-linked.
  #   copy:     list of { debs, root, to, exclude ? [] }: files of `debs` below host `root`
  #             land in $out/<to>
  #   deps:     store packages whose lib/ directories make the RUNPATH (glibc is implicit);
  #             RUNPATHs are shrunk to what each file needs, so only real needs become
  #             store references
  #   patchelf: command used to re-link (the store's patchelf, except while bootstrapping it)
  #   postInstall: shell run last, in $out
  mkDebian = { name, copy, deps ? [ ], glibc, patchelf, postInstall ? "", ... }@attrs:
    let
      sources = map
        (c: {
          src = debFiles {
            name = "${name}-src-${baseNameOf c.root}";
            inherit (c) debs root;
            exclude = c.exclude or [ ];
          };
          inherit (c) to;
        })
        copy;
    in
    mkPackage (removeAttrs attrs [ "copy" "deps" "patchelf" "postInstall" ] // {
      inherit glibc;
      inherit (host) ldso;
      PATCHELF = patchelf;
      runtimeDeps = deps ++ [ glibc ];
      script = ''
        ${concatStringsSep "\n" (map (s: ''copy_tree ${s.src} "$out/${s.to}"'') sources)}
        drop_host_links "$out"
        relink_tree "$out" "$(lib_path "$out" $runtimeDeps)"
        cd "$out"
        ${postInstall}
        check_links "$out"
      '';
    }) // {
      # The imported host trees (store paths), e.g. as raw material for `big`.
      srcs = map (s: s.src) sources;
    };
}
