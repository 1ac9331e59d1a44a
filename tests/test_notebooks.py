"""Every ``notebooks/*.ipynb`` runs top to bottom without an error.

Each notebook is executed with nbclient in a fresh IPython kernel started from *this*
interpreter (``sys.executable -m ipykernel_launcher``), so the kernel sees the same
environment (a CI venv included) whatever ``python3`` kernelspec is installed. The test
sets ``JQUANT_NB_QUICK=1``; notebooks read it to shrink sizes and epochs. The committed
notebooks keep their outputs, so they are also checked to stay light. The QAT notebooks'
printed results are checked too (int8 accuracy near float, export round trip exact).
"""
from __future__ import annotations

import os
import pathlib
import re
import sys

import nbformat
import pytest
from jupyter_client.kernelspec import KernelSpec, KernelSpecManager
from jupyter_client.manager import AsyncKernelManager
from nbclient import NotebookClient

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
CELL_TIMEOUT_S = 600
MAX_BYTES = 400_000


class _ThisInterpreter(KernelSpecManager):
    """Every kernel name resolves to an ipykernel run by ``sys.executable``."""

    def get_kernel_spec(self, kernel_name):
        return KernelSpec(argv=[sys.executable, "-m", "ipykernel_launcher", "-f",
                                "{connection_file}"],
                          display_name=f"Python ({sys.executable})", language="python",
                          resource_dir=str(ROOT))


def _execute(path: pathlib.Path, env: dict[str, str]) -> nbformat.NotebookNode:
    nb = nbformat.read(path, as_version=4)
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)          # the kernel process inherits this environment
    try:
        km = AsyncKernelManager(kernel_name="python3", kernel_spec_manager=_ThisInterpreter())
        NotebookClient(nb, km=km, timeout=CELL_TIMEOUT_S, allow_errors=False,
                       resources={"metadata": {"path": str(path.parent)}}).execute()
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return nb


def _stream_text(nb) -> str:
    return "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                   for o in c.get("outputs", []) if o.get("output_type") == "stream")


def _imports_torch(path: pathlib.Path) -> bool:
    nb = nbformat.read(path, as_version=4)
    return any(re.search(r"^\s*(import torch|from torch)", c.source, re.M)
               for c in nb.cells if c.cell_type == "code")


TORCH_NOTEBOOKS = [p for p in NOTEBOOKS if _imports_torch(p)]


def _check_qat_results(text: str):
    """02 / 03: the accuracy / bytes table and the jax.export round trip."""
    rows = {name: (float(acc), int(nbytes.replace(",", ""))) for name, acc, nbytes in re.findall(
        r"^(float|QAT \(fake quant\)|converted \(int8\))\s+([01]\.\d{4})\s+([\d,]+)\s*$",
        text, re.M)}
    assert set(rows) == {"float", "QAT (fake quant)", "converted (int8)"}, rows
    (f_acc, f_bytes), (q_acc, _), (i_acc, i_bytes) = (
        rows["float"], rows["QAT (fake quant)"], rows["converted (int8)"])
    assert f_acc > 0.9, rows
    assert q_acc >= f_acc - 0.03 and i_acc >= f_acc - 0.03, rows
    assert 3.0 < f_bytes / i_bytes < 4.2, rows                 # int8 weights
    assert "restored forward == converted model, bit for bit: True" in text


RESULT_CHECKS = {"02_qat_linen": _check_qat_results, "03_qat_nnx": _check_qat_results}


def test_there_are_notebooks():
    assert NOTEBOOKS, "notebooks/*.ipynb not found"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_executes(path):
    nb = _execute(path, {"JQUANT_NB_QUICK": "1"})
    assert any(c.get("outputs") for c in nb.cells if c.cell_type == "code")
    text = _stream_text(nb)
    assert "Traceback" not in text
    if path.stem in RESULT_CHECKS:
        RESULT_CHECKS[path.stem](text)


@pytest.mark.slow
@pytest.mark.parametrize("path", TORCH_NOTEBOOKS, ids=[p.stem for p in TORCH_NOTEBOOKS])
def test_notebook_executes_without_torch(path, tmp_path):
    """torch is only an oracle: the notebooks run (showing jquant alone) when it is absent.

    Only notebooks that import torch (the others never see it)."""
    hidden = tmp_path / "torch"
    hidden.mkdir()
    (hidden / "__init__.py").write_text(
        "raise ImportError('torch hidden by tests/test_notebooks.py')\n")
    pythonpath = os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")]))
    _execute(path, {"JQUANT_NB_QUICK": "1", "PYTHONPATH": pythonpath})


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_committed_notebook_is_light_and_clean(path):
    """Committed with outputs (they render on GitHub), but small and free of errors."""
    assert path.stat().st_size < MAX_BYTES, f"{path.name}: {path.stat().st_size} bytes"
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert outputs, f"{path.name} is committed without outputs"
    assert not [o for o in outputs if o.get("output_type") == "error"]
    if path.stem in RESULT_CHECKS:          # the committed (full-size) results hold too
        RESULT_CHECKS[path.stem](_stream_text(nb))
