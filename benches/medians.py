#!/usr/bin/env python3
"""Print the medians of the last `cargo bench --bench engine` run as the
Markdown tables of BENCHMARKS.md, with the ratios issue 4 asks for.

Reads target/criterion/<group>/<bench>/<parameter>/new/{benchmark,estimates}.json.
Usage: python3 benches/medians.py [target/criterion]
"""
import json
import pathlib
import sys

root = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else "target/criterion")
med = {}  # (group, function, value) -> (median, lower, upper) in ns
for bench in root.glob("*/**/new/benchmark.json"):
    b = json.loads(bench.read_text())
    e = json.loads((bench.parent / "estimates.json").read_text())["median"]
    ci = e["confidence_interval"]
    med[(b["group_id"], b["function_id"], b["value_str"])] = (
        e["point_estimate"], ci["lower_bound"], ci["upper_bound"])


def ns(x):
    return f"{x / 1000:.2f} µs" if x >= 1000 else f"{x:.1f} ns"


def cell(key):
    if key not in med:
        return "–"
    m, lo, hi = med[key]
    return f"{ns(m)} ({ns(lo)}–{ns(hi)})"


SUBJECTS = ["1", "10000", "1000000"]
print("### subjects: median per call (95 % CI of the median)\n")
print("| bench | " + " | ".join(f"{int(n):,} subject" + ("s" if n != "1" else "") for n in SUBJECTS) + " |")
print("| --- |" + " --- |" * len(SUBJECTS))
funcs = ["tollgate_admit", "tollgate_check", "tollgate_record", "tollgate_reserve_commit",
         "governor_check_key", "floor_u64", "floor_string", "hand_four_limits",
         "seed002_check_then_increment"]
for f in funcs:
    print(f"| `{f}` | " + " | ".join(cell(("subjects", f, n)) for n in SUBJECTS) + " |")

print("\n### ratios of medians\n")
print("| ratio | " + " | ".join(f"{int(n):,}" for n in SUBJECTS) + " |")
print("| --- |" + " --- |" * len(SUBJECTS))
for num in ["tollgate_admit", "tollgate_check", "tollgate_record"]:
    for den in ["governor_check_key", "floor_u64", "floor_string", "hand_four_limits"]:
        row = []
        for n in SUBJECTS:
            a, b = med.get(("subjects", num, n)), med.get(("subjects", den, n))
            row.append(f"{a[0] / b[0]:.1f}×" if a and b else "–")
        print(f"| {num} / {den} | " + " | ".join(row) + " |")

row = []
for n in SUBJECTS:
    a, b = med.get(("subjects", "hand_four_limits", n)), med.get(("subjects", "governor_check_key", n))
    row.append(f"{a[0] / b[0]:.1f}×" if a and b else "–")
print("| hand_four_limits / governor_check_key | " + " | ".join(row) + " |")

print("\n### events: median per call against events recorded per subject\n")
print("| bench | 10 events | 1,000 events | 1,000 / 10 |")
print("| --- | --- | --- | --- |")
fnames = sorted({f for (g, f, _) in med if g == "events"},
                key=lambda f: (int(f.split("_")[2]), f))
for f in fnames:
    a, b = med.get(("events", f, "10")), med.get(("events", f, "1000"))
    ratio = f"{b[0] / a[0]:.2f}×" if a and b else "–"
    print(f"| `{f}` | {cell(('events', f, '10'))} | {cell(('events', f, '1000'))} | {ratio} |")

print("\n### threads (10,000 subjects): wall time per call, all threads together\n")
print("| bench | 1 thread | 2 threads, distinct subjects | 2 threads, one hot subject | speed-up distinct | speed-up hot |")
print("| --- | --- | --- | --- | --- | --- |")
for f in ["tollgate_admit", "governor_check_key", "floor_string"]:
    one = med.get(("threads", f, "1_thread"))
    dis = med.get(("threads", f, "2_threads_distinct"))
    hot = med.get(("threads", f, "2_threads_hot"))
    sd = f"{one[0] / dis[0]:.2f}×" if one and dis else "–"
    sh = f"{one[0] / hot[0]:.2f}×" if one and hot else "–"
    print(f"| `{f}` | {cell(('threads', f, '1_thread'))} | {cell(('threads', f, '2_threads_distinct'))} "
          f"| {cell(('threads', f, '2_threads_hot'))} | {sd} | {sh} |")
