"""`make bench` (benchmarks/run.py) runs each section's module with --out <results folder>: every module takes it."""

from __future__ import annotations

import runpy
import sys

import pytest

from benchmarks.run import MODULES


@pytest.mark.parametrize("module", sorted(set(MODULES.values())))
def test_every_benchmark_takes_the_results_folder(module, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", [module, "--help"])
    monkeypatch.delitem(sys.modules, module, raising=False)  # run afresh as __main__, as `python -m` does
    with pytest.raises(SystemExit) as exit_:
        runpy.run_module(module, run_name="__main__")
    assert exit_.value.code == 0 and "--out" in capsys.readouterr().out
