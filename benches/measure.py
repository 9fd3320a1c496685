"""Runs one command and prints its wall time in seconds and peak RSS in KiB.

Usage: python3 measure.py CMD ARGS...   (exits with the command's status)
"""

import resource
import subprocess
import sys
import time

start = time.monotonic()
code = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL).returncode
wall = time.monotonic() - start
peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
print(f"{wall:.4f} {peak}")
sys.exit(code)
