#!/usr/bin/env bash
# Runs the pin_scaling benchmark against the page cache of an earlier commit (default: the
# commit before the lock-free pin path) in the same session, alternating the two builds
# run by run, and prints medians and ranges per build.
#
#   pagecache/benches/pin_scaling_vs_base.sh [BASE_COMMIT] [RUNS]
#
# The base tree is exported with `git archive` into a temporary directory and built into this
# checkout's target directory (the dependencies are shared, only pagecache is rebuilt); its
# bench is this one, with `pin_locked` (which the base does not have) replaced by `pin`, so
# the base's rows are the base's only pin path. Each run is one round (PIN_ROUNDS=1) of every
# scenario; RUNS (default 5) runs per build.
set -euo pipefail

base=${1:-2bdda56}
runs=${2:-5}
repo=$(git -C "$(dirname "$0")" rev-parse --show-toplevel)
target=${CARGO_TARGET_DIR:-$repo/target}
tmp=$(mktemp -d "${TMPDIR:-/tmp}/pin-base.XXXXXX")
trap 'rm -rf "$tmp"' EXIT

git -C "$repo" archive "$base" | tar -x -C "$tmp"
cp "$repo/pagecache/benches/pin_scaling.rs" "$tmp/pagecache/benches/pin_scaling.rs"
sed -i 's/\.pin_locked(/.pin(/' "$tmp/pagecache/benches/pin_scaling.rs"
printf '\n[[bench]]\nname = "pin_scaling"\nharness = false\n' >>"$tmp/pagecache/Cargo.toml"
# Another version, so that its artifacts get other names than this checkout's in the shared
# target directory (cargo names workspace members by name, version and path in the workspace).
sed -i 's/^version.workspace = true/version = "0.0.0-base"/' "$tmp/pagecache/Cargo.toml"

build() { # dir -> path of the bench executable
    (cd "$1" && CARGO_TARGET_DIR=$target nice -n 5 cargo bench -p pagecache --bench pin_scaling \
        --no-run --message-format=json 2>/dev/null) |
        python3 -c 'import json,sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "pin_scaling" and m.get("executable"):
        print(m["executable"])'
}
# Keep a copy of each executable (a later build may reuse the name).
cp "$(build "$repo")" "$tmp/new_exe"
cp "$(build "$tmp")" "$tmp/base_exe"
new_exe=$tmp/new_exe
base_exe=$tmp/base_exe
echo "new:  $new_exe ($(git -C "$repo" rev-parse --short HEAD))"
echo "base: $base_exe ($base)"

out=$tmp/runs.csv
for i in $(seq "$runs"); do
    # Alternate which build goes first.
    if ((i % 2)); then order="new base"; else order="base new"; fi
    for which in $order; do
        exe=new_exe
        [[ $which == base ]] && exe=base_exe
        PIN_ROUNDS=1 PIN_CSV=1 nice -n 5 "${!exe}" --bench | grep '^csv;' | sed "s/^csv;/$which;/" >>"$out"
    done
done

python3 - "$out" <<'EOF'
import csv, statistics, sys
rows = {}
for build, scenario, threads, path, rate in csv.reader(open(sys.argv[1]), delimiter=";"):
    if build == "base" and path == "lock-free":
        continue  # the base has one path; its "locked" rows are it
    name = "base pin" if build == "base" else f"new {path}"
    rows.setdefault((scenario, int(threads), name), []).append(float(rate))
med = {k: statistics.median(v) for k, v in rows.items()}
for scenario in dict.fromkeys(k[0] for k in rows):
    print(f"\n{scenario}:")
    for threads in sorted({k[1] for k in rows if k[0] == scenario}):
        for name in ("base pin", "new locked", "new lock-free"):
            v = rows.get((scenario, threads, name))
            if not v:
                continue
            one = med[(scenario, 1, name)]
            print(f"  {threads} thr  {name:>13}: {med[(scenario, threads, name)] / 1e6:6.2f} Mpins/s "
                  f"[{min(v) / 1e6:5.2f}-{max(v) / 1e6:5.2f}] n={len(v)}  vs 1 thr {med[(scenario, threads, name)] / one:4.2f}x")
        if (scenario, threads, "base pin") in med and (scenario, threads, "new lock-free") in med:
            print(f"  {threads} thr  new lock-free / base = "
                  f"{med[(scenario, threads, 'new lock-free')] / med[(scenario, threads, 'base pin')]:.2f}x")
EOF
