"""timm-nat benchmarks (not part of the package): ``python benchmarks/benchmark.py --help``."""
