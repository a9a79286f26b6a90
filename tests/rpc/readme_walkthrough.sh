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

# The Python walkthrough: the installed package in a fresh virtualenv, against a real daemon.
script=$(sed -n '/<!-- python-walkthrough:begin -->/,/<!-- python-walkthrough:end -->/p' \
           "$src/README.md" | sed '/^<!--/d; /^```/d')
[ -n "$script" ] || { echo "no python-walkthrough block in README.md"; exit 1; }
script=${script/B=.\/build /B=$build }
out=$(cd "$src" && bash -e -c "$script" 2>&1) || { echo "$out"; echo "python walkthrough failed"; exit 1; }
echo "$out"
grep -q '^kasmina_client [0-9.]* from .*/venv/lib/.*/kasmina_client/__init__.py' <<<"$out" ||
  { echo "the package was not imported from the virtualenv"; exit 1; }
grep -q '^load .pt: this looks like a PyTorch torch.save file' <<<"$out" ||
  { echo "no torch.save refusal"; exit 1; }
grep -q '^shapley r0c1 ' <<<"$out" || { echo "no Shapley values"; exit 1; }
grep -q '^gate GATE_G2 passed False' <<<"$out" || { echo "no failed G2"; exit 1; }
grep -q 'failed: seed_not_ready - epochs_in_current_stage 0 < 10' <<<"$out" ||
  { echo "no failed check detail"; exit 1; }
echo "walkthrough ok"
