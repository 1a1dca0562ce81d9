"""notebooks/glow_demo.ipynb runs top to bottom: it trains a tiny checkpoint, then shows what it learned."""

from __future__ import annotations

import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "notebooks", "glow_demo.ipynb")


def run_notebook(tmp_path, monkeypatch, **env: str) -> tuple[list, str]:
    """Execute the notebook with ``GLOW_DEMO_*`` settings; returns its outputs and their printed text."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    for name, value in env.items():
        monkeypatch.setenv(f"GLOW_DEMO_{name}", value)  # the kernel inherits the environment
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbclient.NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    errors = [f"{o.ename}: {o.evalue}" for o in outputs if o.output_type == "error"]
    assert not errors, errors
    return outputs, "".join(o.get("text", "") for o in outputs if o.output_type == "stream")


@pytest.mark.slow
def test_demo_notebook_runs_clean(cifar_dir, tmp_path, monkeypatch):
    run = tmp_path / "run"
    outputs, text = run_notebook(tmp_path, monkeypatch, DATA=cifar_dir, RUN=str(run))
    assert "reconstructions equal their targets: True" in text
    assert f"wrote 16 samples at T=0.7 to {run / 'cli_samples.png'}" in text
    figures = [o for o in outputs if o.output_type == "display_data" and "image/png" in o.data]
    assert "strength 0 is the reconstruction: True" in text
    assert len(figures) == 4 + 1 + 2 + 1 + 1 + 1  # temperatures, recon, interpolations, manipulation, CLI, bpd
    assert (run / "checkpoints" / "last.ckpt").is_file()
    assert "samples_t0.7_epoch001.png" in os.listdir(run / "images")


@pytest.mark.slow
def test_demo_notebook_takes_an_mnist_checkpoint(tiny_mnist_run, tmp_path, monkeypatch):
    """``GLOW_DEMO_CKPT`` of another dataset: the images come from the checkpoint's own datamodule (1 channel),
    and the curves from both log folders of its resumed training."""
    ckpt = os.path.join(tiny_mnist_run, "checkpoints", "last.ckpt")
    outputs, text = run_notebook(tmp_path, monkeypatch, CKPT=ckpt, RUN=str(tmp_path / "run"))
    assert "datamodule: glow_lightning.data.MNISTDataModule" in text
    assert "reconstructions equal their targets: True" in text
    logs = [os.path.join(tiny_mnist_run, "lightning_logs", v) for v in ("version_0", "version_1")]
    assert f"log folders of this checkpoint's training: {logs}" in text
