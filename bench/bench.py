"""The lab's one speed and memory benchmark: every figure a ratio of timings taken in this one run.

    python bench/bench.py                      # both shape sets, table on stdout
    python bench/bench.py --json               # one JSON object keyed "bundled" and "dit-xl2"
    python bench/bench.py --device cuda        # GPU: FP16 / BF16 too, DiT-XL/2's 28 blocks at batch 32

The same as `dqlab bench` (see analysis/evaluation/speed.py for what is measured and how).
"""
import sys

from analysis.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
