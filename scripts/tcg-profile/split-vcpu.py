#!/usr/bin/env python3
"""Splits QEMU's vCPU-thread samples inside client windows: guest / NIC model / host kernel.

Usage: split-vcpu.py WINDOWS PERF_SCRIPT [MIN:MAX seconds, default 0.1:0.8]

WINDOWS is curl-windows.py's output, PERF_SCRIPT the text of `perf script -F
comm,tid,time,ip,sym,dso` from `perf record -a -k CLOCK_MONOTONIC` (QEMU built with symbols,
README.md). Per vCPU thread (one per boot): samples per window (a 64 MiB download) that are the
guest (translated code, the TCG runtime), the NIC model (QEMU's device code, its DMA, libc's
copies and the TAP writev) and the host kernel (the TAP write and the client's TCP receive in
the same system call). Windows outside MIN:MAX seconds are left out (start-up checks).
"""
import sys, collections, re, bisect
wins = [tuple(map(float, l.split())) for l in open(sys.argv[1])]
lo, hi = map(float, (sys.argv[3] if len(sys.argv) > 3 else "0.1:0.8").split(":"))
wins = [w for w in wins if lo < w[1]-w[0] < hi]
starts = [w[0] for w in wins]
tcg_rt = re.compile(r'^(helper_|qht_|tb_|cpu_|tlb_|victim_tlb|probe_access|mmu_translate|get_page_addr|.*_mmu$|cpu_exec|cpu_loop|page_|do_ld|do_st|store_|load_|full_|qemu_plugin|cpu_get_tb|tcg_|gen_|translator_|float|x86_|do_interrupt|raise_)')
per = collections.defaultdict(lambda: [collections.Counter(), set(), collections.Counter()])
for line in open(sys.argv[2]):
    m = re.match(r'\s*(.+?)\s+(\d+)\s+(\d+\.\d+):\s+(\S+)\s+(.*?)\s+\((.*)\)\s*$', line)
    if not m: continue
    comm, tid, t, ip, sym, dso = m.groups(); t = float(t)
    i = bisect.bisect_right(starts, t) - 1
    if i < 0 or t > wins[i][1] or 'TCG' not in comm: continue
    sym = re.sub(r'\+0x[0-9a-f]+$', '', sym)
    d = dso.split('/')[-1]
    if d in ('[unknown]', 'unknown') or d.startswith('perf-') or d.startswith('[anon'):
        c = 'guest'
    elif d.startswith('[kernel'):
        c = 'host kernel'
    elif d.startswith('qemu-system') and tcg_rt.match(sym):
        c = 'guest'
    elif d.startswith('qemu-system') or d.startswith('libc') or d.startswith('libglib'):
        c = 'NIC model'
        per[tid][2][sym] += 1
    else:
        c = 'other'
    per[tid][0][c] += 1; per[tid][1].add(i)
for tid, (cats, ws, nic) in per.items():
    n = len(ws); tot = sum(cats.values())
    print(f"tid {tid}: {n} downloads, {tot/n:.0f} samples/download: " + ", ".join(f"{c} {v/n:.0f} ({100*v/tot:.0f}%)" for c, v in cats.most_common()))
    print("   NIC model top:", ", ".join(f"{s} {v/n:.0f}" for s, v in nic.most_common(8)))
