"""Checkpoint converter; see the ``timm_nat.convert`` package (also ``timm-nat-convert``)."""
import sys

from timm_nat.convert import main

if __name__ == "__main__":
    sys.exit(main())
