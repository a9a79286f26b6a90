#!/usr/bin/env bash
# Runs the README's walkthrough block exactly as written (only the build directory differs) and
# checks that the seed reached FOSSILIZED and Evaluate printed esper's standard configs.
# usage: readme_walkthrough.sh <source dir> <build dir>
set -euo pipefail
src=$1 build=$2
script=$(sed -n '/<!-- walkthrough:begin -->/,/<!-- walkthrough:end -->/p' "$src/README.md" |
         sed '/^<!--/d; /^```/d')
[ -n "$script" ] || { echo "no walkthrough block in README.md"; exit 1; }
script=${script/B=.\/build /B=$build }
out=$(cd "$src" && bash -e -c "$script" 2>&1) || { echo "$out"; echo "walkthrough failed"; exit 1; }
echo "$out"
grep -q 'FOSSILIZED' <<<"$out" || { echo "no FOSSILIZED in the output"; exit 1; }
grep -q '^solo_on:r0c1' <<<"$out" || { echo "no standard configs in the evaluate output"; exit 1; }
grep -q 'SEED_FOSSILIZED' <<<"$out" || { echo "no SEED_FOSSILIZED event"; exit 1; }
echo "walkthrough ok"
