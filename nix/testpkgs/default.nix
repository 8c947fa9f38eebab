# The offline package set of niximage's tests and benchmarks, importable like nixpkgs:
#
#   import ./nix/testpkgs { system ? builtins.currentSystem, bigSizeMB ? 64, debianRoots ? … }
#
# There is no nixpkgs and no network: the packages are Debian 12's files (the build host's
# installed packages, or for another system that architecture's packages unpacked under
# `debianRoots`), imported into the store with builtins.path and re-linked with Debian's
# patchelf against the store's glibc, so that their closures are real (Nix's reference scan
# finds the ELF interpreters, RUNPATHs and script shebangs) and run in a root file system
# holding nothing but their closure. See lib.nix for the helpers and README.md for what
# each package is for.
{ system ? builtins.currentSystem
, bigSizeMB ? 64
  # Debian packages of other architectures, unpacked by scripts/install-arm64.sh.
, debianRoots ? "/var/lib/niximage/debian"
}:

let
  hostSystem = builtins.currentSystem;
  lib = import ./lib.nix { inherit system hostSystem debianRoots; };
  # Packages whose files are the same on every architecture (certificates, /etc files, time
  # zones) are the host set's for every system, as in a binary cache: one store path, and
  # so one layer, shared by the images of all platforms.
  noarch =
    if system == hostSystem then null
    else import ./. { system = hostSystem; inherit bigSizeMB debianRoots; };
  inherit (lib) busybox debFiles libDir mkPackage writeScriptBin;

  # glibc is copied as Debian ships it: its libraries find each other through the loader,
  # and every re-linked file has glibc's lib/ in its RUNPATH. The gconv (iconv) modules are
  # left out (8 MB that nothing here loads).
  glibc = mkPackage {
    name = "glibc";
    src = debFiles { name = "glibc-src"; debs = [ "libc6" ]; root = libDir; exclude = [ "gconv(/.*)?" ]; };
    script = ''
      copy_tree "$src" "$out/lib"
      check_links "$out"
    '';
  };

  # The store's patchelf is itself re-linked; to bootstrap it, Debian's patchelf runs through
  # the store's loader with the imported (not yet re-linked) C++ runtime. Nothing in a build
  # uses the host's /lib or /usr/bin, so the set also builds with `sandbox = true`.
  gccLibsSrc = debFiles { name = "gcc-libs-src"; debs = [ "libgcc-s1" "libstdc++6" ]; root = libDir; };
  bootstrapPatchelf =
    "${glibc}/lib/${lib.host.ldso} --library-path ${gccLibsSrc}:${glibc}/lib "
    + "${debFiles { name = "patchelf-src"; debs = [ "patchelf" ]; root = "/usr/bin"; }}/patchelf";

  mkDebianWith = patchelf: args: lib.mkDebian ({ inherit glibc patchelf; } // args);

  # lib/ from Debian library packages.
  debLib = name: debs: deps: mkDebian {
    inherit name deps;
    copy = [{ inherit debs; root = libDir; to = "lib"; }];
  };

  gcc-libs = mkDebianWith bootstrapPatchelf {
    name = "gcc-libs";
    copy = [{ debs = [ "libgcc-s1" "libstdc++6" ]; root = libDir; to = "lib"; }];
  };

  patchelf = mkDebianWith bootstrapPatchelf {
    name = "patchelf";
    copy = [{ debs = [ "patchelf" ]; root = "/usr/bin"; to = "bin"; }];
    deps = [ gcc-libs ];
  };

  mkDebian = mkDebianWith "${patchelf}/bin/patchelf";

  # --- libraries -------------------------------------------------------------------------
  zlib = debLib "zlib" [ "zlib1g" ] [ ];
  expat = debLib "expat" [ "libexpat1" ] [ ];
  libffi = debLib "libffi" [ "libffi8" ] [ ];
  sqlite = debLib "sqlite" [ "libsqlite3-0" ] [ ];
  bzip2 = debLib "bzip2" [ "libbz2-1.0" ] [ ];
  xz = debLib "xz" [ "liblzma5" ] [ ];
  libuuid = debLib "libuuid" [ "libuuid1" ] [ ];
  libxcrypt = debLib "libxcrypt" [ "libcrypt1" ] [ ];
  oniguruma = debLib "oniguruma" [ "libonig5" ] [ ];
  libjq = debLib "libjq" [ "libjq1" ] [ oniguruma ];
  # libssl.so.3 and libcrypto.so.3 with their engines and providers (Debian's libssl3).
  libssl = debLib "libssl" [ "libssl3" ] [ ];
  acl = debLib "acl" [ "libacl1" ] [ ];
  attr = debLib "attr" [ "libattr1" ] [ ];
  gmp = debLib "gmp" [ "libgmp10" ] [ ];
  pcre2 = debLib "pcre2" [ "libpcre2-8-0" ] [ ];
  libselinux = debLib "libselinux" [ "libselinux1" ] [ pcre2 ];
  readline = debLib "readline" [ "libreadline8" ] [ ncurses ];

  # libtinfo/libncursesw and the base terminfo entries (xterm, linux, screen, vt100, ...).
  ncurses = mkDebian {
    name = "ncurses";
    copy = [
      { debs = [ "libtinfo6" "libncursesw6" ]; root = libDir; to = "lib"; }
      { debs = [ "ncurses-base" ]; root = "/usr/lib/terminfo"; to = "share/terminfo"; }
    ];
  };

  # --- programs --------------------------------------------------------------------------
  # Version and meta as nixpkgs gives them (attributes of the derivation, not of its
  # environment, so the store path does not change): what an image's SBOM reports.
  jq = mkDebian {
    name = "jq";
    copy = [{ debs = [ "jq" ]; root = "/usr/bin"; to = "bin"; }];
    deps = [ libjq ];
  } // {
    pname = "jq";
    version = "1.6";
    meta = { license = { spdxId = "MIT"; shortName = "mit"; }; homepage = "https://jqlang.github.io/jq/"; description = "A lightweight and flexible command-line JSON processor"; };
  };

  openssl = mkDebian {
    name = "openssl";
    copy = [
      # c_rehash is a perl script
      { debs = [ "openssl" ]; root = "/usr/bin"; to = "bin"; exclude = [ "c_rehash" ]; }
      { debs = [ "openssl" ]; root = "/etc/ssl"; to = "etc/ssl"; exclude = [ "certs" "private" ]; }
    ];
    deps = [ libssl ];
  };

  bashWith = name: mkDebian {
    inherit name;
    # bashbug is a /bin/sh script; clear_console a Debian extra.
    copy = [{ debs = [ "bash" ]; root = "/usr/bin"; to = "bin"; exclude = [ "bashbug" "clear_console" ]; }];
    deps = [ ncurses ];
    postInstall = "ln -s bash bin/sh";
  };

  coreutils = mkDebian {
    name = "coreutils";
    copy = [
      { debs = [ "coreutils" ]; root = "/usr/bin"; to = "bin"; }
      { debs = [ "coreutils" ]; root = "/usr/sbin"; to = "bin"; }
    ];
    deps = [ acl attr gmp libselinux ];
  };

  # The compiled programs of moreutils; its perl scripts (chronic, combine, ts, vidir, vipe,
  # zrun) are left out, as there is no perl here.
  moreutils = mkDebian {
    name = "moreutils";
    copy = [{
      debs = [ "moreutils" ];
      root = "/usr/bin";
      to = "bin";
      exclude = [ "chronic" "combine" "ts" "vidir" "vipe" "zrun" ];
    }];
  };

  # nano, wrapped so that ncurses finds the store's terminfo (Debian's libtinfo only looks in
  # /etc/terminfo, /lib/terminfo and /usr/share/terminfo).
  nano = mkDebian {
    name = "nano";
    copy = [
      { debs = [ "nano" ]; root = "/usr/bin"; to = "bin"; exclude = [ "rnano" ]; }
      { debs = [ "nano" ]; root = "/usr/share/nano"; to = "share/nano"; }
      { debs = [ "nano" ]; root = "/etc"; to = "etc"; }
    ];
    deps = [ ncurses ];
    inherit ncurses;
    postInstall = ''
      mv bin/nano bin/.nano-wrapped
      write_script bin/nano "export TERMINFO_DIRS=\"\''${TERMINFO_DIRS:+\$TERMINFO_DIRS:}$ncurses/share/terminfo\"
      exec $out/bin/.nano-wrapped \"\$@\""
    '';
  };

  # CPython 3.11 with Debian's standard library (libpython3.11-minimal and -stdlib) and its
  # compiled extension modules. Left out: the test package, the test extension modules, and
  # nis/_dbm, which need NIS and Berkeley DB libraries not in this set. The standard library
  # is byte-compiled at build time (unchecked-hash pycs: the store is read-only, so Python
  # could not write them later, and store mtimes say nothing).
  python3Unwrapped = mkDebian {
    name = "python3";
    copy = [
      { debs = [ "python3.11-minimal" ]; root = "/usr/bin"; to = "bin"; }
      {
        debs = [ "libpython3.11-minimal" "libpython3.11-stdlib" ];
        root = "/usr/lib/python3.11";
        to = "lib/python3.11";
        exclude = [
          "test(/.*)?"
          "lib-dynload/(_test|_ctypes_test|_xxtestfuzz|xxlimited|nis|_dbm).*"
        ];
      }
    ];
    deps = [ zlib expat libffi sqlite libssl bzip2 xz ncurses readline libuuid libxcrypt ];
    postInstall = ''
      ln -s python3.11 bin/python3
      ln -s python3.11 bin/python
      bin/python3.11 -I -m compileall -q -j 2 --invalidation-mode unchecked-hash lib/python3.11 >/dev/null
    '';
  };

  # python3.pkgs: a small pure-Python package so that dotted attribute paths can be tested.
  python3Packages = {
    pyhello = mkPackage {
      name = "python3.11-pyhello";
      python = python3Unwrapped;
      script = ''
        site=$out/lib/python3.11/site-packages
        mkdir -p $site/pyhello $out/bin
        cat > $site/pyhello/__init__.py <<'EOF'
        """pyhello: the pure-Python test package of niximage's package set."""


        def greeting(name="world"):
            return f"Hello, {name}!"


        def main():
            import sys

            print(greeting(*sys.argv[1:2]))
        EOF
        cat > $out/bin/pyhello <<EOF
        #!$python/bin/python3
        import sys
        sys.path.insert(0, "$site")
        from pyhello import main
        main()
        EOF
        chmod 555 $out/bin/pyhello
      '';
    };
  };

  python3 = python3Unwrapped // {
    pkgs = python3Packages;
    pname = "python3";
    version = "3.11.2";
    meta = { license = { spdxId = "Python-2.0"; }; homepage = "https://www.python.org"; description = "A high-level dynamically-typed programming language"; };
  };

  # The Mozilla CA certificates that Debian ships, concatenated as nixpkgs' cacert does.
  cacert = if noarch != null then noarch.cacert else mkPackage {
    name = "cacert";
    src = debFiles { name = "cacert-src"; debs = [ "ca-certificates" ]; root = "/usr/share/ca-certificates"; };
    script = ''
      mkdir -p $out/etc/ssl/certs
      find $src -name '*.crt' -type f | sort > $TMPDIR/certs
      while read -r crt; do
        cat "$crt"
        [ -z "$(tail -c 1 "$crt")" ] || echo
      done < $TMPDIR/certs > $out/etc/ssl/certs/ca-bundle.crt
      ln -s ca-bundle.crt $out/etc/ssl/certs/ca-certificates.crt
      grep -q 'BEGIN CERTIFICATE' $out/etc/ssl/certs/ca-bundle.crt
    '';
  };

  # /etc/protocols and /etc/services (and rpc, ethertypes) from Debian's netbase.
  iana-etc = if noarch != null then noarch.iana-etc else mkPackage {
    name = "iana-etc";
    src = debFiles { name = "iana-etc-src"; debs = [ "netbase" ]; root = "/etc"; };
    script = ''copy_tree "$src" "$out/etc"'';
  };

  tzdata = if noarch != null then noarch.tzdata else mkPackage {
    name = "tzdata";
    src = debFiles { name = "tzdata-src"; debs = [ "tzdata" ]; root = "/usr/share/zoneinfo"; };
    script = ''
      copy_tree "$src" "$out/share/zoneinfo"
      drop_host_links "$out"
      check_links "$out"
    '';
  };

  # `bigSizeMB` MiB of files for tar/gzip throughput benchmarks: 1 MiB slices of a pool made
  # of the imported (not re-linked) Python standard library, libssl and coreutils, i.e.
  # source text and machine code, compressible about as much as a real store path (gzip -1:
  # ~40%). Each slice starts at another offset; one MiB in eight is cut into 16 files of
  # 64 KiB and one into 64 files of 16 KiB. No store references.
  big = mkPackage {
    name = "big";
    sizeMB = toString bigSizeMB;
    pool = python3Unwrapped.srcs ++ libssl.srcs ++ coreutils.srcs;
    script = ''
      case "$sizeMB" in ""|*[!0-9]*) echo "bigSizeMB must be a whole number: $sizeMB" >&2; exit 1;; esac
      find $pool -type f | sort > $TMPDIR/files
      while read -r file; do cat "$file"; done < $TMPDIR/files > $TMPDIR/pool
      blocks=$(( $(stat -c %s $TMPDIR/pool) / 4096 - 256 ))
      [ "$blocks" -gt 0 ]
      m=0
      while [ $m -lt $sizeMB ]; do
        dir=$out/share/big/$(( m / 64 ))
        mkdir -p $dir
        skip=$(( m * 7919 % blocks ))
        case $(( m % 8 )) in
          3) n=16 ;;
          7) n=64 ;;
          *) n=1 ;;
        esac
        count=$(( 256 / n )) i=0
        while [ $i -lt $n ]; do
          dd if=$TMPDIR/pool of=$dir/$m-$i.dat bs=4096 skip=$(( skip + i * count )) count=$count 2>/dev/null
          i=$(( i + 1 ))
        done
        m=$(( m + 1 ))
      done
    '';
  };

  # A diamond: top -> left, right -> bottom, each a script calling its dependencies.
  diamond = name: deps: body: mkPackage {
    name = "diamond-${name}";
    inherit deps body;
    script = ''write_script $out/bin/$name "$body"'';
  };
  diamond-bottom = diamond "bottom" [ ] "echo bottom";
  diamond-left = diamond "left" [ diamond-bottom ]
    ''echo "left($(${diamond-bottom}/bin/diamond-bottom))"'';
  diamond-right = diamond "right" [ diamond-bottom ]
    ''echo "right($(${diamond-bottom}/bin/diamond-bottom))"'';
  diamond-top = diamond "top" [ diamond-left diamond-right ]
    ''echo "top($(${diamond-left}/bin/diamond-left),$(${diamond-right}/bin/diamond-right))"'';

  # build-tool runs while with-build-dep is built; its output does not mention build-tool, so
  # build-tool is in with-build-dep's build closure but not in its runtime closure.
  build-tool = writeScriptBin "build-tool" ''
    echo "# n n^2 n^3, generated at build time"
    for n in $(seq 1 16); do echo "$n $((n * n)) $((n * n * n))"; done
  '';
  with-build-dep = mkPackage {
    name = "with-build-dep";
    tool = build-tool;
    script = ''
      mkdir -p $out/share/with-build-dep
      $tool/bin/build-tool > $out/share/with-build-dep/powers.txt
      write_script $out/bin/with-build-dep "cat $out/share/with-build-dep/powers.txt"
    '';
  };

in
{
  inherit busybox glibc gcc-libs patchelf;
  inherit zlib expat libffi sqlite bzip2 xz libuuid libxcrypt ncurses readline;
  inherit oniguruma libjq jq libssl openssl;
  inherit acl attr gmp pcre2 libselinux coreutils moreutils nano;
  bash = bashWith "bash";
  # Nixery's `shell` meta-package: bashInteractive, coreutils, moreutils, nano.
  bashInteractive = bashWith "bash-interactive";
  inherit python3 python3Packages cacert iana-etc tzdata big;
  inherit diamond-bottom diamond-left diamond-right diamond-top build-tool with-build-dep;

  # Names for Nixery's name mapping: `1hello` is requested as `_1hello`, `xhello` falls back
  # to `Xhello`.
  hello = writeScriptBin "hello" ''echo "Hello, world!"'';
  _1hello = writeScriptBin "1hello" ''echo "Hello from 1hello!"'';
  Xhello = writeScriptBin "Xhello" ''echo "Hello from Xhello!"'';

  # An attribute that exists but is no package.
  nullpkg = null;
}
