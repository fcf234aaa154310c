"""Tests of the benchmark command's arguments (its tables: tests/test_report.py; the measurements
themselves are benchmarks, run by hand: README "Speed")."""

from __future__ import annotations

import pytest

from experiments import benchmark as B


def test_population_arguments():
    a = B.parse_args(["--population", "1,3,9", "--epoch-steps", "3"])
    assert a.population_list == [1, 3, 9] and a.epoch_steps == 3 and a.run_batch is None
    assert B.parse_args([]).population_list == [] and B.parse_args([]).epoch_steps == 1
    for bad in (["--population", "0"], ["--population", "x"], ["--epoch-steps", "0"]):
        with pytest.raises(SystemExit):
            B.parse_args(bad)
