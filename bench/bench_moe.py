#!/usr/bin/env python3
"""MoE benchmark (same as `afdkit bench moe`); see afdkit/bench/moe.py."""
import sys

from afdkit.bench.moe import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
