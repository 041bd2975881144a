#!/usr/bin/env python3
"""Summarizes an Nsight Compute source page (`ncu ... --page source --print-source sass
--csv`): where a kernel's warps stall, what its instructions are, and the instructions
with the most stall samples.

    python3 ncu-summary.py ncu-sass.csv [top]
"""
import collections
import csv
import sys


def num(x):
    try:
        return float(x.replace(",", ""))
    except ValueError:
        return 0.0


def main():
    path = sys.argv[1]
    top = int(sys.argv[2]) if len(sys.argv) > 2 else 15
    rows = list(csv.reader(open(path, newline="")))
    start = next((i for i, r in enumerate(rows) if "Source" in r and len(r) > 5), None)
    if start is None:
        sys.exit(f"{path}: no source table (did ncu profile a kernel?)")
    head = rows[start]
    data = [dict(zip(head, r)) for r in rows[start + 1:] if len(r) == len(head)]
    samples = "Warp Stall Sampling (All Samples)"
    total = sum(num(d[samples]) for d in data) or 1.0
    executed = sum(num(d["Instructions Executed"]) for d in data) or 1.0
    print(f"{len(data)} SASS instructions, {executed:.4g} warp instructions executed, "
          f"{total:.0f} stall samples")

    print("\nstall reasons (share of samples):")
    reasons = [k for k in head if k.startswith("stall_") and "Not Issued" not in k]
    sums = {k: sum(num(d[k]) for d in data) for k in reasons}
    for k, v in sorted(sums.items(), key=lambda kv: -kv[1])[:8]:
        print(f"  {k[6:]:<18} {v / total * 100:5.1f}%")

    print("\ninstruction mix (share of executed):")
    mix = collections.Counter()
    for d in data:
        words = d["Source"].split()
        if words and words[0].startswith("@"):
            words = words[1:]
        if words:
            mix[words[0].split(".")[0]] += num(d["Instructions Executed"])
    for op, n in mix.most_common(12):
        print(f"  {op:<10} {n / executed * 100:5.1f}%")

    print(f"\nthe {top} instructions with the most stall samples:")
    for d in sorted(data, key=lambda d: -num(d[samples]))[:top]:
        worst = max(reasons, key=lambda k: num(d[k]))
        print(f"  {num(d[samples]) / total * 100:5.1f}%  {worst[6:]:<14} {d['Source'].strip()[:60]}")


if __name__ == "__main__":
    main()
