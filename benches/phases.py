"""Runs `prefab run --json …` and prints, on one line, its wall time and
when (seconds from the start, as the client saw the events arrive) the run
was accepted, its last input staged, the runtime invoked, and the run
completed; `-` for an event that did not come.

Usage: python3 phases.py PREFAB-RUN-COMMAND…   (exits with its status)
"""

import json
import subprocess
import sys
import time

EVENTS = ("accepted", "staged", "invoking", "runCompleted")

start = time.monotonic()
seen = {}
with subprocess.Popen(sys.argv[1:], stdout=subprocess.PIPE, text=True) as run:
    for line in run.stdout:
        try:
            event = json.loads(line)
        except ValueError:
            continue
        for name in EVENTS:
            if name in event:
                # The last input's staging is the one the runtime waits for.
                if name == "staged" or name not in seen:
                    seen[name] = time.monotonic() - start
wall = time.monotonic() - start
print(f"{wall:.4f} " + " ".join(f"{seen[n]:.4f}" if n in seen else "-" for n in EVENTS))
sys.exit(run.returncode)
