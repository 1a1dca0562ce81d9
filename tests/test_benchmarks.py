"""The benchmark scripts still run (tiny sizes, a few steps): a figure in BENCHMARKS.md must stay reproducible
with the command it names. The figures themselves are measured by hand, never asserted here."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
TINY = ["--levels", "1", "--steps-per-level", "1", "--hidden-channels", "8", "--batch-size", "4"]


@pytest.fixture
def benchmarks_on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setenv("OMP_NUM_THREADS", str(torch.get_num_threads()))  # the scripts set it: restored after
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)  # the scripts set the thread count of the process


@pytest.mark.parametrize("part", ["ratio", "hooks"])
def test_fitloop_runs(benchmarks_on_path, capsys, part):
    import fitloop

    fitloop.main(["--part", part, *TINY, "--steps", "3", "--warmup", "1"])
    out = capsys.readouterr().out
    if part == "ratio":
        assert "# fit / raw throughput:" in out and "# 3 fit batches" in out
    else:
        assert "NonFiniteGuard.on_before_optimizer_step" in out and "on_after_batch_transfer" in out


def test_benchmark_runs(benchmarks_on_path, capsys):
    import benchmark

    benchmark.main([*TINY, "--impl", "ours", "--steps", "2", "--warmup", "1", "--threads", "1"])
    assert "ours" in capsys.readouterr().out
