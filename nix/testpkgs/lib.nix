# Helpers of the offline test package set: import files of Debian packages into the store
# (content-addressed, with builtins.path) and re-link their ELF files with patchelf so that
# they load the store's glibc and libraries, never the host's.
#
# For the build host's own system the files are the installed packages' (dpkg's lists in
# /var/lib/dpkg/info). For another system they are that architecture's packages unpacked
# under `debianRoots`/<debian arch> (root/ and info/<package>.list, as
# scripts/install-arm64.sh makes them), and the derivations build where Nix can run that
# system's programs (extra-platforms with qemu-user's binfmt_misc handler, or a native
# builder).
#
# There is no stdenv: every derivation is a plain `derivation` whose builder is Debian's
# static busybox `sh` of the derivation's own system, sourcing ./setup.sh for its helpers.
{ system, hostSystem, debianRoots }:

let
  inherit (builtins)
    concatMap concatStringsSep elemAt filter hasAttr head isString listToAttrs
    map match pathExists readFile removeAttrs split stringLength substring;

  # The Debian architecture of the derivations' system.
  systems = {
    x86_64-linux = { debArch = "amd64"; triple = "x86_64-linux-gnu"; ldso = "ld-linux-x86-64.so.2"; };
    aarch64-linux = { debArch = "arm64"; triple = "aarch64-linux-gnu"; ldso = "ld-linux-aarch64.so.1"; };
  };
  host = systems.${system} or (throw "testpkgs: unsupported system ${system}");

  # Where the Debian files are: "" (the host's own /) for the host's system, else the
  # unpacked tree of that architecture.
  native = system == hostSystem;
  foreign = "${debianRoots}/${host.debArch}";
  rootDir = if native then "" else "${foreign}/root";

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
      lists = filter pathExists (
        if native then [
          "/var/lib/dpkg/info/${deb}:${host.debArch}.list"
          "/var/lib/dpkg/info/${deb}.list"
        ] else [ "${foreign}/info/${deb}.list" ]);
      missing =
        if native then "is not installed (apt-get install ${deb})"
        else "is not unpacked in ${foreign} for ${system} (scripts/install-arm64.sh)";
    in
    if lists == [ ] then throw "testpkgs: Debian package ${deb} ${missing}"
    else map normalize (lines (readFile (head lists)));

in
rec {
  inherit host;
  libDir = "/usr/lib/${host.triple}";

  # debFiles { name, debs, root, exclude }: the files of the Debian packages `debs` below the
  # directory `root` (of the host, or of the unpacked tree), as one store path (builtins.path: content-addressed, so a package
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
      keep = listToAttrs (map (p: { name = rootDir + p; value = true; }) wanted);
    in
    if wanted == [ ] then
      throw "testpkgs: Debian packages ${concatStringsSep ", " debs} have no files below ${root}"
    else
      builtins.path {
        inherit name;
        path = /. + (rootDir + root);
        filter = p: _type: hasAttr p keep;
      };

  # Debian's static busybox, imported inside a directory as a file named `busybox`: busybox
  # picks its applet from argv[0]'s base name, and a store file would be `<hash>-busybox`.
  busyboxSrc = debFiles { name = "busybox-static-src"; debs = [ "busybox-static" ]; root = "/usr/bin"; };

  busybox = derivation {
    name = "busybox";
    inherit system;
    builder = "${busyboxSrc}/busybox";
    args = [ "sh" "-euc" ''
      bb=${busyboxSrc}/busybox
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
      inherit name system busybox;
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
