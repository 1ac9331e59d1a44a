"""The examples run in quick mode. The README's demo (examples/qat_digits.py): every stage is
in the printed table with numbers, the accuracies are sane and the histogram PNG is written.
examples/embedding_bag_4bit.py (a subprocess): every method's accuracy / AUC / bytes row,
QAT within 2 points of float, 4-bit < 8-bit < float bytes."""
import importlib.util
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
STAGES = ("float", "PTQ MinMax -> int8", "PTQ Histogram -> int8", "QAT (fake quant)",
          "QAT -> int8")


def _load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_qat_digits_quick(capsys, tmp_path):
    png = tmp_path / "hist.png"
    result = _load("qat_digits").main(["--quick", "--png", str(png)])
    out = capsys.readouterr().out
    for stage in STAGES:   # each stage's row: accuracy, correct/360, parameter bytes, ...
        assert re.search(re.escape(stage) + r"\s+[01]\.\d{4}\s+\d+/360\s+\d+\s", out), stage
    assert result["float"] > 0.85
    assert result["qat"] >= result["float"] - 0.02           # QAT keeps the float accuracy
    assert result["qat_int8"] >= result["float"] - 0.02      # ... after convert too
    for k in ("ptq_minmax", "ptq_histogram"):
        assert result[k] >= result["float"] - 0.05, k
    nbytes = result["param_bytes"]
    assert 3.5 <= nbytes["float"] / nbytes["QAT -> int8"] <= 4.1   # int8 weights
    assert png.stat().st_size > 10_000 and png.read_bytes()[:4] == b"\x89PNG"


EB_METHODS = ("float", "PTQ 4-bit (no training)", "QAT 8-bit (fake quant)", "QAT 8-bit -> int8",
              "QAT 4-bit (fake quant)", "QAT 4-bit -> int4")


def test_embedding_bag_4bit_quick():
    """examples/embedding_bag_4bit.py --quick in a subprocess: the table has every method with
    accuracy, AUC and parameter bytes; QAT keeps the float accuracy; 4-bit < 8-bit < float."""
    import subprocess
    import sys
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "embedding_bag_4bit.py"),
                           "--quick"], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    rows = {}
    for name in EB_METHODS:
        m = re.search(re.escape(name) + r"\s+([01]\.\d{4})\s+([01]\.\d{4})\s+(\d+)\s*$", out,
                      re.MULTILINE)
        assert m, (name, out)
        rows[name] = (float(m.group(1)), float(m.group(2)), int(m.group(3)))
    acc, auc, nbytes = rows["float"]
    assert acc > 0.65 and auc > 0.7, rows                  # it learned the hidden model
    for name in EB_METHODS[1:]:
        assert rows[name][0] >= acc - 0.02, (name, rows)    # quantization keeps the accuracy
        assert rows[name][1] >= auc - 0.02, (name, rows)
    int8, int4 = rows["QAT 8-bit -> int8"][2], rows["QAT 4-bit -> int4"][2]
    assert int4 < int8 < nbytes, rows
    assert rows["PTQ 4-bit (no training)"][2] == int4


@pytest.mark.slow
def test_embedding_bag_4bit_quick_nnx():
    """The NNX front end of the same example (slow step: one more ~25 s subprocess)."""
    import subprocess
    import sys
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "embedding_bag_4bit.py"),
                           "--quick", "--front", "nnx"], capture_output=True, text=True,
                          timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    accs = {name: float(m.group(1)) for name in EB_METHODS
            for m in [re.search(re.escape(name) + r"\s+([01]\.\d{4})\s+[01]\.\d{4}\s+\d+\s*$",
                                proc.stdout, re.MULTILINE)] if m}
    assert set(accs) == set(EB_METHODS), proc.stdout
    assert all(a >= accs["float"] - 0.02 for a in accs.values()), accs
