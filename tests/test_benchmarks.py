"""Smoke tests of the benchmark scripts (``benchmarks/``) and ``singd-rkfac bench``.

They check that each benchmark runs in ``--quick`` mode and writes valid JSON
with its raw numbers and a PNG — never how fast anything was. One thread: the
numbers do not matter here, and two threads on a busy two-core machine spend
most of their time waiting for each other.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

from singd_rkfac import cli

pytest.importorskip("matplotlib")

PNG = b"\x89PNG\r\n\x1a\n"
QUICK = ["--quick", "--threads", "1"]


def _results(out: Path, name: str) -> dict:
    payload = json.loads((out / f"{name}.json").read_text())
    for key in ("benchmark", "machine", "torch", "device", "threads", "config", "raw", "summary"):
        assert key in payload, key
    assert payload["benchmark"] == name and payload["device"] == "cpu" and payload["threads"] == 1
    assert payload["machine"]["torch"] == payload["torch"]
    assert (out / f"{name}.png").read_bytes()[:8] == PNG
    return payload


def _positive_times(values: list) -> bool:
    return len(values) > 0 and all(isinstance(t, float) and math.isfinite(t) and t > 0 for t in values)


def test_scaling_quick(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    returned = cli.load_benchmark("scaling").main([*QUICK, "--out", str(tmp_path)])
    payload = _results(tmp_path, "scaling")
    assert payload["summary"]["widths"] == [32, 64] == payload["config"]["widths"]
    methods = payload["config"]["methods"]
    assert {"AdamW", "SGD", "KFAC", "SINGD-diagonal", "SINGD-toeplitz"} <= set(methods)
    for d in ("32", "64"):
        for name in methods:
            times = payload["raw"][d]["seconds_per_iteration"][name]
            assert len(times) == payload["config"]["repeats"] and _positive_times(times)
            assert payload["raw"][d]["finite"][name]
    assert payload["summary"]["methods"]["AdamW"]["ratio_to_adamw"] == [1.0, 1.0]
    assert returned["raw"].keys() == payload["raw"].keys()
    assert "slope" in capsys.readouterr().out


def test_memory_quick_through_the_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["bench", "memory", *QUICK, "--out", str(tmp_path)]) == 0
    payload = _results(tmp_path, "memory")
    raw = payload["raw"]
    for d in ("32", "64"):
        assert {"AdamW", "SGD", "SINGD-diagonal", "SINGD-diagonal-bf16"} <= raw[d].keys()
        for row in raw[d].values():
            assert isinstance(row["state_bytes"], int) and row["state_bytes"] > 0
        sgd = raw[d]["SGD"]
        assert sgd["state_bytes"] == sgd["parameter_bytes"]  # one momentum buffer
        assert raw[d]["AdamW"]["state_bytes"] >= 2 * sgd["state_bytes"]  # two moments (+ step counters)
        assert raw[d]["SINGD-dense-bf16"]["curvature_bytes"] < raw[d]["SINGD-dense"]["curvature_bytes"]
    assert "×AdamW" in capsys.readouterr().out


def test_anchors_quick(tmp_path: Path) -> None:
    if importlib.util.find_spec("singd") is None:
        pytest.skip("the reference package singd is not installed")
    returned = cli.load_benchmark("anchors").main([*QUICK, "--out", str(tmp_path)])
    written = _results(tmp_path, "anchors")
    assert len(returned["summary"]["rows"]) == len(written["summary"]["rows"])
    assert len(written["raw"]) == 12  # 6 structure pairs × T ∈ {1, 10}
    for entry in written["raw"]:
        for name in ("AdamW", "singd", "ours"):
            assert _positive_times(entry["seconds_per_iteration"][name])
        trajectory = entry["trajectory"]
        assert all(trajectory["finite"].values())
        # same trajectory to within float32 rounding, and the weights really moved
        assert trajectory["max_abs_diff_singd_vs_ours"] < 1e-4 < trajectory["max_abs_move_from_init"]
    assert {row["T"] for row in written["summary"]["rows"]} == {1, 10}


# -- the bench subcommand ------------------------------------------------------------------------------
def test_bench_list(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["bench", "--list"]) == 0
    out = capsys.readouterr().out
    for name in ("scaling", "memory", "anchors"):
        assert name in out
    assert "common" not in out


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["bench", "nope"], "unknown benchmark 'nope'"),
        (["bench"], "--list"),
        (["bench", "memory", "--widths", "0"], "positive integer"),
        (["bench", "scaling", "--methods", "Shampoo"], "unknown Shampoo"),
    ],
)
def test_bench_bad_input_exits_2_with_one_line(
    args: list[str], fragment: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(args) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("error:") and captured.err.count("\n") == 1
    assert fragment in captured.err


def test_bench_without_checkout_is_a_clean_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(cli, "BENCHMARKS_DIR", tmp_path / "missing")
    assert cli.main(["bench", "scaling", "--quick"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "benchmarks folder not found" in err
