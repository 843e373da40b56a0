#!/usr/bin/env python3
"""Where a kernel's warps wait, from an ncu report's source page: the stall reasons over all
samples, the instructions that hold the most samples, and the executed instruction mix.

  ncu --set full -o rep ...                        # on the GPU host
  ncu --import rep.ncu-rep --page source --csv --print-source sass > sass.csv
  python3 bench/gpu/ncu_sass_summary.py sass.csv   # a few dozen lines, small enough to return

Addresses are printed by their last five hex digits: a cuobjdump -sass of the same binary puts
an instruction at a fixed offset from them (find one distinctive instruction in both).
"""
import collections
import csv
import sys


def main(path, top_n=25):
    rows = csv.reader(open(path))
    next(rows)  # the kernel's name
    header = next(rows)
    col = {h: i for i, h in enumerate(header)}
    reasons = [h for h in header if h.startswith("stall_") and "Not Issued" not in h]
    stalls, mix, hot = collections.Counter(), collections.Counter(), []
    samples = executed = 0
    for r in rows:
        if len(r) != len(header):
            continue
        n = int(r[col["Warp Stall Sampling (All Samples)"]] or 0)
        ex = int(r[col["Instructions Executed"]].replace(",", "") or 0)
        samples += n
        executed += ex
        for h in reasons:
            stalls[h] += int(r[col[h]] or 0)
        words = [w for w in r[col["Source"]].split() if not w.startswith("@")]
        mix[words[0].split(".")[0] if words else "?"] += ex
        hot.append((n, r[col["Address"]][-5:], " ".join(r[col["Source"]].split())[:72]))
    print(f"samples {samples}, warp instructions executed {executed}")
    for h, v in stalls.most_common(12):
        print(f"  {h:<24} {100 * v / max(samples, 1):5.1f}%")
    print("instructions holding the most samples:")
    for n, addr, src in sorted(hot, reverse=True)[:top_n]:
        print(f"  {100 * n / max(samples, 1):5.2f}%  {addr}  {src}")
    print("executed, by opcode:")
    for op, v in mix.most_common(22):
        print(f"  {op:<10} {100 * v / max(executed, 1):5.1f}%")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])
