"""Summarises benchmark samples: medians of throughput and peak RSS per
tool and scenario, and each tool's ratio to the gateway's engine, both as
the ratio of the medians and as the median of each round's ratio (the n-th
sample of every tool in a scenario comes from round n, taken minutes apart
from the others: pairing them cancels drift in the machine's speed).

Input lines (file given as argument): SCENARIO TOOL SECONDS PEAK_KIB UNITS
where UNITS is megabytes moved or objects moved. Prints a Markdown table.
"""

import statistics
import sys
from collections import defaultdict

samples = defaultdict(list)
units = {}
for line in open(sys.argv[1]):
    scenario, tool, seconds, peak, amount = line.split()
    samples[(scenario, tool)].append((float(seconds), int(peak)))
    units[scenario] = float(amount)

scenarios = list(dict.fromkeys(s for s, _ in samples))
print("| scenario | tool | median rate | peak RSS | runs | prefab ÷ tool | same round |")
print("| --- | --- | --- | --- | --- | --- | --- |")
for scenario in scenarios:
    unit = "objects/s" if scenario.endswith("x16KiB") else "MB/s"
    rates = {}
    for (s, tool), runs in samples.items():
        if s == scenario:
            rates[tool] = statistics.median(units[s] / t for t, _ in runs)
    for (s, tool), runs in samples.items():
        if s != scenario:
            continue
        rss = statistics.median(p for _, p in runs) / 1024
        ratio = paired = ""
        if "prefab" in rates and rates[tool]:
            ratio = f"{rates['prefab'] / rates[tool]:.2f}×"
            prefab = samples[(s, "prefab")]
            if len(prefab) == len(runs):
                paired = statistics.median(t / p for (t, _), (p, _) in zip(runs, prefab))
                paired = f"{paired:.2f}×"
        print(f"| {s} | {tool} | {rates[tool]:.0f} {unit} | {rss:.0f} MiB | {len(runs)} | {ratio} | {paired} |")
