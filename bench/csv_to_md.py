"""Turn a results CSV from `python -m ssm_kernels bench` into markdown tables (one per op) with the
ratio of each impl's time to a chosen baseline impl in the same (shape, dtype, mode) group.
Usage: python bench/csv_to_md.py results.csv [--ops linear_scan ...]"""
import argparse
import csv
from collections import defaultdict

p = argparse.ArgumentParser()
p.add_argument("csv")
p.add_argument("--ops", nargs="*")
args = p.parse_args()
rows = [r for r in csv.DictReader(open(args.csv)) if r["op"] != "ceiling"]
ceil = [r for r in csv.DictReader(open(args.csv)) if r["op"] == "ceiling"]
if ceil:
    print("Ceilings measured in the same run: " + ", ".join(f"{r['mode']} {r['note']}" for r in ceil)
          + f" ({ceil[0].get('device', '')})\n")
groups = defaultdict(list)
for r in rows:
    if args.ops and r["op"] not in args.ops:
        continue
    groups[r["op"]].append(r)
for op, rs in groups.items():
    print(f"### {op}\n")
    print("| shape | dtype | mode | impl | ms | GB/s | TFLOP/s | % of floor | vs fastest peer |")
    print("|---|---|---|---|---|---|---|---|---|")
    by = defaultdict(list)
    for r in rs:
        by[(r["shape"], r["dtype"], r["mode"])].append(r)
    for key, grp in by.items():
        peers = [float(r["ms"]) for r in grp if not r["impl"].startswith("ssm_kernels")]
        best_peer = min(peers) if peers else None
        for r in grp:
            ratio = ""
            if best_peer and r["impl"].startswith("ssm_kernels"):
                ratio = f"{best_peer / float(r['ms']):.2f}x"
            print(f"| {key[0]} | {key[1]} | {key[2]} | {r['impl']} | {float(r['ms']):.4f} | {r['GB/s']} | "
                  f"{r['TFLOP/s']} | {r['pct_of_floor']} | {ratio} |")
    print()
