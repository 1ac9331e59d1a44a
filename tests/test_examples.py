"""The README's demo (examples/qat_digits.py) runs in quick mode: every stage is in the
printed table with numbers, the accuracies are sane and the histogram PNG is written."""
import importlib.util
import pathlib
import re

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
