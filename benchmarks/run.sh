#!/usr/bin/env bash
# Runs every benchmark with its reference, on this machine, in one go. Figures are ratios
# against the reference measured in the same run (the machine is shared and noisy).
#   benchmarks/run.sh [layering|update|pack|cold|rebuild|cache|registry|operator|restart]...
set -euo pipefail
cd "$(dirname "$0")/.."
selected=("$@")
((${#selected[@]})) || selected=(layering update pack cold rebuild cache registry operator restart)

for name in "${selected[@]}"; do
  echo "=== $name"
  case "$name" in
    layering) python3 benchmarks/layering.py ;;
    update) python3 benchmarks/layering_update.py ;;
    pack)
      # An 800 MB closure: the offline set's big package raised to 800 MiB, plus python3.
      big=$(nix-build nix/testpkgs -A big --arg bigSizeMB 800 --no-out-link)
      python=$(nix-build nix/testpkgs -A python3 --no-out-link)
      python3 benchmarks/pack.py "$big" "$python" --repeat 2 ;;
    cold) python3 benchmarks/cold_build.py ;;
    rebuild) python3 benchmarks/warm_rebuild.py ;;
    cache) python3 benchmarks/binary_cache.py ;;
    registry) python3 benchmarks/registry.py ;;
    operator) python3 benchmarks/operator.py ;;
    restart) python3 benchmarks/operator_restart.py ;;
    *) echo "unknown benchmark $name" >&2; exit 2 ;;
  esac
done
