"""The command line, the demo and the digits helpers behind them."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from singd_rkfac.cli import main
from singd_rkfac.data import digits_cnn, digits_mlp, load_digits
from singd_rkfac.demo import QUICK_STEPS, run_demo

POLICY_TOML = """
[default]
method = "kfac"
damping_mode = "exact"

[[rules]]
match = "head"
method = "skip"

[[rules]]
type = "Conv2d"
method = "kfac"
kfac_approx = "reduce"
"""


@pytest.fixture
def policy_file(tmp_path: Path) -> Path:
    path = tmp_path / "policy.toml"
    path.write_text(POLICY_TOML)
    return path


def test_help_lists_subcommands(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "demo" in out and "policy" in out


def test_python_dash_m_runs_the_cli() -> None:
    done = subprocess.run([sys.executable, "-m", "singd_rkfac", "demo", "--help"], capture_output=True, text=True)
    assert done.returncode == 0
    assert "--quick" in done.stdout


def test_load_digits_splits_and_standardises() -> None:
    pytest.importorskip("sklearn")
    data = load_digits(test_fraction=0.25, images=True)
    assert data.x_train.shape[1:] == (1, 8, 8) and data.x_train.dtype == torch.float32
    assert len(data.x_train) + len(data.x_test) == 1797 and len(data.y_test) == len(data.x_test)
    mean = data.x_train.flatten(1).mean(dim=0)
    assert mean.abs().max() < 1e-5  # the scaler is fitted on the train split
    assert digits_cnn()(data.x_test[:3]).shape == (3, 10)
    flat = load_digits()
    assert torch.equal(flat.x_train, data.x_train.flatten(1))
    assert digits_mlp()(flat.x_train[:3]).shape == (3, 10)


def test_demo_rows_are_finite(capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("sklearn")
    rows = run_demo(quick=True, plot=False)
    assert [r["optimizer"] for r in rows] == ["AdamW", "K-FAC", "K-FAC exact + AdamW head", "SINGD diagonal, bf16 state"]
    for row in rows:
        assert len(row["losses"]) == QUICK_STEPS
        assert all(math.isfinite(x) for x in row["losses"])
        assert math.isfinite(row["train_loss"]) and 0.0 <= row["test_accuracy"] <= 1.0
        assert row["state_bytes"] > 0
    out = capsys.readouterr().out
    assert "optimizer state" in out and "test accuracy" in out


def test_demo_command_writes_plot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    assert main(["demo", "--quick", "--out", str(tmp_path / "out")]) == 0
    png = tmp_path / "out" / "loss.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "K-FAC exact + AdamW head" in capsys.readouterr().out


def test_demo_without_tqdm_and_matplotlib(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("sklearn")
    for name in ("tqdm", "tqdm.auto", "matplotlib", "matplotlib.figure"):
        monkeypatch.setitem(sys.modules, name, None)  # makes `import name` raise ImportError
    assert main(["demo", "--steps", "5", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "AdamW: step 5/5" in out
    assert "matplotlib is not installed" in out
    assert not (tmp_path / "loss.png").exists()


def test_demo_without_sklearn_is_a_clean_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "sklearn", None)
    assert main(["demo", "--quick", "--no-plot"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "pip install scikit-learn" in err


@pytest.mark.parametrize(("model", "expected"), [("mlp", "fc2"), ("cnn", "conv2")])
def test_policy_command_prints_the_resolution(
    policy_file: Path, model: str, expected: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["policy", str(policy_file), "--model", model]) == 0
    out = capsys.readouterr().out
    assert expected in out and "skipped by policy" in out and "curvature state" in out
    assert ("damping_mode='exact'" in out) == (model == "mlp")


@pytest.mark.parametrize(
    ("toml", "args", "fragment"),
    [
        (None, ["policy", "missing.toml"], "not found"),
        (POLICY_TOML, ["--model", "resnet"], "invalid choice"),
        ('[default]\nmethod = "shampoo"\n', [], "unknown method"),
        ('[default]\nmethod = "kfac"\ndamping = -1.0\n', [], "KFAC.damping"),
        ('[default]\nmethod = "kfac"\nrank = 4\n', [], "unknown key"),
        ("[default\n", [], "policy.toml"),
        (None, ["frobnicate"], "invalid choice"),
        (None, ["demo", "--steps", "0"], "positive integer"),
        (None, [], "required"),
    ],
)
def test_bad_input_exits_2_with_one_line(
    tmp_path: Path, toml: str | None, args: list[str], fragment: str, capsys: pytest.CaptureFixture[str]
) -> None:
    if toml is not None:
        (tmp_path / "policy.toml").write_text(toml)
        args = ["policy", str(tmp_path / "policy.toml"), *args]
    assert main(args) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("error:") and captured.err.count("\n") == 1
    assert fragment in captured.err
    assert captured.out == ""
