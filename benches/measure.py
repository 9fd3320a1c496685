"""Runs one command and prints its wall time in seconds, peak RSS in KiB and
the CPU time it took (user and system) in seconds.

Usage: python3 measure.py CMD ARGS...   (exits with the command's status)
"""

import resource
import subprocess
import sys
import time

start = time.monotonic()
code = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL).returncode
wall = time.monotonic() - start
usage = resource.getrusage(resource.RUSAGE_CHILDREN)
print(f"{wall:.4f} {usage.ru_maxrss} {usage.ru_utime + usage.ru_stime:.2f}")
sys.exit(code)
