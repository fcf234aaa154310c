"""`python -m experiments.mosi_sweep --help`: EASE / LNLN on MOSI (see experiments/sweep.py)."""

from experiments.sweep import main

if __name__ == "__main__":
    main("mosi")
