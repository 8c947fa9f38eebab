# Resolves the requested packages of an image against a package source.
#
# Every input is data passed with --argstr (never spliced into Nix source):
#   packages  JSON list of attribute paths, e.g. ["jq", "python3.pkgs.six"]
#   system    Nix system of the image, e.g. "x86_64-linux"
#   srcType   "path" | "nixpkgs" | "git"
#   srcArgs   JSON object: {path, narHash?} | {channel} | {url, rev?, ref?}
#   nixpkgsArchive  where nixpkgs tarballs come from: <archive>/<channel>.tar.gz (GitHub's
#             archive, or a mirror with the same layout for clusters without GitHub)
#
# `nix-build -A contents` realises the requested packages and prints their store paths;
# if any name does not resolve, evaluation fails with ONE error naming all of them,
# marked `niximage-not-found:<JSON list>` so the caller can report every missing package
# at once (Nix itself would stop at the first). The runtime closure graph is then read
# with `nix path-info --json --recursive` on those paths.
{ packages, system ? builtins.currentSystem, srcType ? "path", srcArgs ? "{}"
, nixpkgsArchive ? "https://github.com/NixOS/nixpkgs/archive" }:

let
  args = builtins.fromJSON srcArgs;
  requested = builtins.fromJSON packages;

  source =
    if srcType == "path" then
      (if args ? narHash && args.narHash != null
       then builtins.path { path = /. + args.path; name = "source"; sha256 = args.narHash; }
       else /. + args.path)
    else if srcType == "nixpkgs" then
      builtins.fetchTarball "${nixpkgsArchive}/${args.channel}.tar.gz"
    else if srcType == "git" then
      builtins.fetchGit ({ url = args.url; }
        // (if args ? rev && args.rev != null then { rev = args.rev; allRefs = true; } else { })
        // (if args ? ref && args.ref != null then { ref = args.ref; } else { }))
    else throw "niximage: unknown package source type ${srcType}";

  pkgs = import source { inherit system; };

  upper = [ "A" "B" "C" "D" "E" "F" "G" "H" "I" "J" "K" "L" "M" "N" "O" "P" "Q" "R" "S" "T" "U" "V" "W" "X" "Y" "Z" ];
  lower = [ "a" "b" "c" "d" "e" "f" "g" "h" "i" "j" "k" "l" "m" "n" "o" "p" "q" "r" "s" "t" "u" "v" "w" "x" "y" "z" ];
  toLower = builtins.replaceStrings upper lower;

  # Candidate attribute names for one part of a path, in order of preference:
  # the name itself, a leading digit prefixed with "_" (Nixery: 1password → _1password),
  # then attributes that match case-insensitively (registry names are lowercase).
  candidates = set: part:
    let
      digitFixed = if builtins.match "[0-9].*" part != null then [ ("_" + part) ] else [ ];
      caseless = builtins.filter (n: toLower n == toLower part) (builtins.attrNames set);
    in [ part ] ++ digitFixed ++ caseless;

  lookup = set: parts:
    if parts == [ ] then { found = true; value = set; }
    else if !(builtins.isAttrs set) then { found = false; }
    else
      let hits = builtins.filter (c: set ? ${c}) (candidates set (builtins.head parts));
      in if hits == [ ] then { found = false; }
         else lookup set.${builtins.head hits} (builtins.tail parts);

  resolve = name:
    let
      result = lookup pkgs (builtins.filter builtins.isString (builtins.split "\\." name));
      # A name that exists but is null, or is not a derivation, is not a package either.
      isPackage = result.found && result.value != null
        && builtins.isAttrs result.value && (result.value.type or null) == "derivation";
    in { inherit name; ok = isPackage; value = result.value or null; };

  resolved = map resolve requested;
  missing = map (r: r.name) (builtins.filter (r: !r.ok) resolved);

  # What the SBOM says of each requested package beyond its store path: Nix's `meta`
  # (licence, homepage, description) and version. A value that fails to evaluate is left
  # out, never an error: the image does not depend on it.
  safe = v: let t = builtins.tryEval (builtins.deepSeq v v); in if t.success then v else null;
  licenseId = l:
    if builtins.isAttrs l then (l.spdxId or l.shortName or l.fullName or null)
    else if builtins.isString l then l else null;
  firstString = v:
    if builtins.isList v then (if v == [ ] then null else firstString (builtins.head v))
    else if builtins.isString v then v else null;
  describe = r:
    let
      meta = r.value.meta or { };
      license = meta.license or [ ];
    in {
      attr = r.name;
      path = safe r.value.outPath;
      pname = safe (r.value.pname or null);
      version = safe (r.value.version or null);
      licenses = safe (builtins.filter (l: l != null)
        (map licenseId (if builtins.isList license then license else [ license ])));
      homepage = safe (firstString (meta.homepage or null));
      description = safe (firstString (meta.description or null));
    };
  # Traced rather than returned: `nix-build -A contents` prints only store paths, and a
  # second evaluation for these few strings would cost as much as the first. The builder
  # reads the line from Nix's stderr (nixcli.package_meta).
  withMeta = builtins.trace "niximage-meta:${builtins.toJSON (map describe resolved)}";
in
{
  inherit missing;
  contents =
    if missing != [ ] then throw "niximage-not-found:${builtins.toJSON missing}"
    else withMeta (map (r: r.value) resolved);
  # What `nix-build -A contents` would realise, without realising it (`nix-instantiate
  # --eval --strict --json -A outputs`): each package's store path and the derivation
  # output that makes it, so a builder can take the paths from a binary cache instead.
  outputs =
    if missing != [ ] then throw "niximage-not-found:${builtins.toJSON missing}"
    else withMeta (map (r: {
      path = r.value.outPath;
      drvPath = r.value.drvPath;
      output = r.value.outputName or "out";
    }) resolved);
}
