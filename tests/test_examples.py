"""The README's demo runs (quick mode) and its QAT accuracy is sane."""
import importlib.util
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_qat_digits_quick(capsys):
    result = _load("qat_digits").main(["--quick"])
    out = capsys.readouterr().out
    assert "float" in out and "QAT" in out
    assert result["float"] > 0.85
    assert result["qat"] >= result["float"] - 0.02
