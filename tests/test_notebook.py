"""notebooks/glow_demo.ipynb runs top to bottom: it trains a tiny checkpoint, then shows what it learned."""

from __future__ import annotations

import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "notebooks", "glow_demo.ipynb")


@pytest.mark.slow
def test_demo_notebook_runs_clean(cifar_dir, tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    run = tmp_path / "run"
    monkeypatch.setenv("GLOW_DEMO_DATA", cifar_dir)  # the kernel inherits the environment
    monkeypatch.setenv("GLOW_DEMO_RUN", str(run))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbclient.NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()

    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "reconstructions equal their targets: True" in text
    assert f"wrote 16 samples at T=0.7 to {run / 'cli_samples.png'}" in text
    figures = [o for o in outputs if o.output_type == "display_data" and "image/png" in o.data]
    assert "strength 0 is the reconstruction: True" in text
    assert len(figures) == 4 + 1 + 2 + 1 + 1 + 1  # temperatures, recon, interpolations, manipulation, CLI, bpd
    assert (run / "checkpoints" / "last.ckpt").is_file()
    assert "samples_t0.7_epoch001.png" in os.listdir(run / "images")
