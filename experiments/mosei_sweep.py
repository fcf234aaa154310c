"""`python -m experiments.mosei_sweep --help`: EASE / LNLN on MOSEI (see experiments/sweep.py)."""

from experiments.sweep import main

if __name__ == "__main__":
    main("mosei")
