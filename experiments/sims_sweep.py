"""`python -m experiments.sims_sweep --help`: EASE / LNLN on SIMS (see experiments/sweep.py)."""

from experiments.sweep import main

if __name__ == "__main__":
    main("sims")
