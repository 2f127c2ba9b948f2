#!/usr/bin/env python3
"""Guest instructions by function between two dumps of the tbcount plugin (see README.md).

Usage: symbolize.py DIR FIRST LAST UNITS [--binary BIN] [--kallsyms FILE] [--top N]

DIR holds dump.N files (lines "pc insns execs", cumulative). The difference LAST - FIRST is
divided by UNITS (requests, downloads) and attributed: guest kernel addresses (kernel booted
with nokaslr) to FILE's symbols (`kallsyms-finder vmlinuz`), user addresses to BIN's symbols
at the load address that makes most hot blocks start at a symbol (static-pie under
`norandmaps` loads at a fixed place, which is found rather than assumed).
"""
import argparse
import bisect
import collections
import re
import subprocess


def load(path):
    counts = {}
    for line in open(path):
        pc, insns, execs = line.split()
        counts[(int(pc, 16), int(insns))] = int(execs)
    return counts


def symbols_of(binary):
    out = subprocess.run(["nm", "-n", "-C", "--defined-only", binary], capture_output=True, text=True).stdout
    syms = []
    for line in out.splitlines():
        parts = line.split(" ", 2)
        if len(parts) == 3 and parts[1] in "tTwW":
            syms.append((int(parts[0], 16), re.sub(r"::h[0-9a-f]{16}$", "", parts[2])))
    return sorted(syms)


def find_base(user, syms):
    """The page-aligned load address that puts the most of the 300 hottest blocks at a symbol."""
    starts = [s for s, _ in syms]
    votes = collections.Counter()
    for pc, _ in sorted(user, key=lambda k: -user[k])[:300]:
        for s in starts:
            b = pc - s
            if b >= 0 and b & 0xFFF == 0:
                votes[b] += 1
    return votes.most_common(1)[0][0] if votes else 0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("dir")
    ap.add_argument("first", type=int)
    ap.add_argument("last", type=int)
    ap.add_argument("units", type=float)
    ap.add_argument("--binary")
    ap.add_argument("--kallsyms")
    ap.add_argument("--top", type=int, default=50)
    a = ap.parse_args()
    before, after = load(f"{a.dir}/dump.{a.first}"), load(f"{a.dir}/dump.{a.last}")
    delta = {k: (v - before.get(k, 0)) * k[1] for k, v in after.items() if v > before.get(k, 0)}
    kernel_start = 0xFFFF800000000000
    ksyms = []
    if a.kallsyms:
        for line in open(a.kallsyms):
            p = line.split()
            if len(p) >= 3 and p[1] in "tTwW":
                ksyms.append((int(p[0], 16), p[2]))
        ksyms.sort()
    usyms = symbols_of(a.binary) if a.binary else []
    user = {k: v for k, v in delta.items() if k[0] < kernel_start}
    base = find_base(user, usyms) if usyms else 0
    uaddr = [s + base for s, _ in usyms]
    kaddr = [s for s, _ in ksyms]
    by = collections.Counter()
    for (pc, _), n in delta.items():
        if pc >= kernel_start:
            i = bisect.bisect_right(kaddr, pc) - 1
            by["K " + (ksyms[i][1] if i >= 0 else "[kernel]")] += n
        elif usyms and base <= pc < base + (256 << 20):
            i = bisect.bisect_right(uaddr, pc) - 1
            by["U " + (usyms[i][1][:120] if i >= 0 else "?")] += n
        else:
            by["U [other programs]"] += n
    kernel = sum(n for (pc, _), n in delta.items() if pc >= kernel_start)
    total = sum(delta.values())
    print(f"per unit: {total / a.units:.0f} instructions (guest kernel {kernel / a.units:.0f}, user {(total - kernel) / a.units:.0f}); user load address {base:#x}")
    for name, n in by.most_common(a.top):
        print(f"{n / a.units:12.0f}  {name}")


if __name__ == "__main__":
    main()
