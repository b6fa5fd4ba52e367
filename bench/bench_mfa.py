#!/usr/bin/env python3
"""MFA decode benchmark (same as `afdkit bench mfa`); see afdkit/bench/mfa.py."""
import sys

from afdkit.bench.mfa import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
