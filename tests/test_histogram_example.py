"""examples/histogram_vs_minmax.py runs (quick mode) and shows the histogram observer's gain."""
import importlib.util
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_histogram_vs_minmax_quick(capsys):
    result = _load("histogram_vs_minmax").main(["--quick"])
    out = capsys.readouterr().out
    assert "MinMax MSE" in out and "Histogram MSE" in out and "Test accuracy" in out
    mse = result["mse"]
    # dense, long-tailed conv activations: the L2 search lowers the error
    for layer in ("conv1", "conv2"):
        assert mse[layer]["Histogram"] < 0.97 * mse[layer]["MinMax"], (layer, mse[layer])
    # sparse fc1 (half exact zeros) and the tail-free logits: torch's error model lands
    # within a few percent of the full range (see the example's docstring)
    for layer in ("fc1", "logits"):
        assert mse[layer]["Histogram"] <= 1.1 * mse[layer]["MinMax"], (layer, mse[layer])
    acc = result["accuracy"]
    assert acc["float"] > 0.85
    assert acc["Histogram"] >= acc["float"] - 0.02 and acc["MinMax"] >= acc["float"] - 0.02
