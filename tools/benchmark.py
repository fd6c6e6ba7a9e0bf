"""Whole-model speed and memory table; see ``timm_nat/benchmark.py`` (also ``timm-nat-benchmark``)."""
import sys

from timm_nat.benchmark import main

if __name__ == "__main__":
    sys.exit(main())
