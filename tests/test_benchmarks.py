"""Smoke tests of the benchmark scripts (``benchmarks/``) and ``singd-rkfac bench``.

They check that each benchmark runs in ``--quick`` mode and writes valid JSON
with its raw numbers and a PNG — never how fast anything was. One thread: the
numbers do not matter here, and two threads on a busy two-core machine spend
most of their time waiting for each other.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
import warnings
from pathlib import Path

import pytest
import torch

import singd_rkfac as sr
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
    lowrank = {"RKFAC", "SREKFAC", "NystromKFAC", "BKFAC", "BRKFAC", "BKFACC"}
    assert {"AdamW", "SGD", "KFAC", "SINGD-diagonal", "SINGD-toeplitz", *lowrank} <= set(methods)
    for d in ("32", "64"):
        for name in methods:
            times = payload["raw"][d]["seconds_per_iteration"][name]
            assert len(times) == payload["config"]["repeats"] and _positive_times(times)
            assert payload["raw"][d]["finite"][name]
    assert payload["summary"]["methods"]["AdamW"]["ratio_to_adamw"] == [1.0, 1.0]
    for name in ("KFAC", *lowrank):  # ours also report the time inside curvature.update / precondition
        row = payload["summary"]["methods"][name]
        assert len(row["update_seconds_per_iteration"]) == 2 and len(row["apply_seconds_per_iteration"]) == 2
        for d in ("32", "64"):
            assert _positive_times(payload["raw"][d]["phase_seconds_per_iteration"][name]["update"])
    assert set(payload["summary"]["targets"]) == {"BKFAC", "RKFAC", "SREKFAC"}
    assert returned["raw"].keys() == payload["raw"].keys()
    assert "slope" in capsys.readouterr().out


def test_scaling_reduced_widths(tmp_path: Path) -> None:
    argv = ["--threads", "1", "--widths", "32", "--reduced-widths", "48", "--methods", "KFAC", "SINGD-diagonal",
            "--reduced-methods", "BKFAC", "--repeats", "1", "--reduced-repeats", "1", "--iters", "2",
            "--rank", "4", "--out", str(tmp_path)]
    cli.load_benchmark("scaling").main(argv)
    payload = _results(tmp_path, "scaling")
    assert payload["config"]["widths"] == [32, 48]
    assert payload["config"]["reduced_widths"] == {"48": {"methods": ["AdamW", "SGD", "BKFAC"], "repeats": 1}}
    assert set(payload["raw"]["48"]["seconds_per_iteration"]) == {"AdamW", "SGD", "BKFAC"}
    methods = payload["summary"]["methods"]
    assert methods["KFAC"]["widths_timed"] == [32] and methods["KFAC"]["seconds_per_iteration"][1] is None
    assert methods["BKFAC"]["widths_timed"] == [48]


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


def test_lowrank_quick_through_the_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["bench", "lowrank", *QUICK, "--out", str(tmp_path)]) == 0
    payload = _results(tmp_path, "lowrank")
    config, raw, summary = payload["config"], payload["raw"], payload["summary"]
    widths = [str(w) for w in config["spectrum_widths"]]
    assert str(config["width"]) in widths and set(raw["spectra"]) == set(widths)
    for run in raw["spectra"].values():
        assert set(run["factors"]) == {"fc1.A", "fc1.G", "fc2.A", "fc2.G", "head.A", "head.G"}
        for spectrum in run["factors"].values():
            values = spectrum["normalised"]
            assert len(values) == spectrum["dim"] and values[0] == 1.0
            assert all(0.0 <= b <= a for a, b in zip(values, values[1:]))  # descending, normalised by s1
            assert spectrum["count_above_0.001"] >= spectrum["count_above_0.01"] >= 1
    expected = {"eigh-top-r", "brand", "brand-refresh", "brand-correct", *(f"{k}-q{q}" for k in ("rsvd", "sre", "nystrom") for q in (0, 2))}
    for factor, record in raw["errors"].items():
        assert record["ranks"] == [r for r in config["ranks"] if r < record["dim"]]
        assert set(record["errors"]) == expected
        for by_complement in record["errors"].values():
            assert set(by_complement) == {"min", "zero"}
            for by_x in by_complement.values():
                assert set(by_x) == {"random", "gradient"}
                for errors in by_x.values():
                    assert len(errors) == len(record["ranks"])
                    assert all(e is None or (math.isfinite(e) and e >= 0) for e in errors)
        if record.get("replay_rel_diff") is not None:  # the replayed rows rebuild the optimizer's factor
            assert record["replay_rel_diff"] < 1e-4, factor
    # exact top-r eigenpairs with complement "min" never err by more than the exact result (DESIGN §3.2)
    for record in raw["errors"].values():
        assert all(e < 1.0 for e in record["errors"]["eigh-top-r"]["min"]["gradient"])
    assert set(summary["spectrum_counts"]) == set(raw["spectra"]["32"]["factors"])
    assert "eigenvalues above" in capsys.readouterr().out


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
            assert entry["flops_per_iteration"][name] > 0
        if entry["structure"] == "dense":  # the same algorithm: never more product flops than the package
            assert entry["flops_per_iteration"]["ours"] <= 1.05 * entry["flops_per_iteration"]["singd"]
        trajectory = entry["trajectory"]
        assert all(trajectory["finite"].values())
        # same trajectory to within float32 rounding, and the weights really moved
        assert trajectory["max_abs_diff_singd_vs_ours"] < 1e-4 < trajectory["max_abs_move_from_init"]
    assert {row["T"] for row in written["summary"]["rows"]} == {1, 10}


def test_speed_quick(tmp_path: Path) -> None:
    """One kfac-pytorch row (or its skip note, when the anchor is absent), one singd row and every method's step."""
    if importlib.util.find_spec("singd") is None:
        pytest.skip("the reference package singd is not installed")
    argv = [*QUICK, "--out", str(tmp_path), "--rows", "kfac-inverse-mlp", "singd-dense-mlp", "--periods", "10"]
    cli.load_benchmark("speed").main(argv)
    written = _results(tmp_path, "speed")
    has_kfac = importlib.util.find_spec("kfac") is not None
    measured = {entry["row"] for entry in written["raw"]["anchors"]}
    assert measured == ({"kfac-inverse-mlp"} if has_kfac else set()) | {"singd-dense-mlp"}
    assert bool(written["summary"]["skipped"]) is not has_kfac
    for entry in written["raw"]["anchors"]:
        assert all(entry["finite"].values())
        for name in ("floor", "AdamW", "anchor", "ours"):
            assert _positive_times(entry["seconds_per_iteration"][name])
    small = written["summary"]["small"]
    assert {"floor", "AdamW", "KFAC", "BKFAC", "SINGD-dense", "SENG", "default policy"} <= set(small)
    assert all(v["seconds"] > 0 for v in small.values())


def test_precision_quick_through_the_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["bench", "precision", *QUICK, "--out", str(tmp_path)]) == 0
    payload = _results(tmp_path, "precision")
    steps = payload["config"]["steps"]
    runs = payload["raw"]["mlp"]
    assert {"AdamW", "KFAC", "SINGD-diagonal", "SINGD-dense", "KFAC-lowprec", "KFAC-lowprec-NS"} <= runs.keys()
    assert {"fp32", "bf16", "fp16", "fp32-reorder"} <= runs["KFAC"].keys()
    assert "bf16-fp32state" in runs["SINGD-diagonal"] and "fp32" not in runs["KFAC-lowprec"]
    expected_state = {"bf16": ["bfloat16"], "fp16": ["float16"], "fp32": ["float32"], "bf16-fp32state": ["float32"]}
    for name, per_regime in runs.items():
        for regime, run in per_regime.items():
            if run.get("unsupported"):  # fp16 autocast missing on this device
                assert regime == "fp16" and run["losses"] == []
                continue
            assert len(run["losses"]) == steps and run["error"] is None, (name, regime)
            assert isinstance(run["skipped_steps"], int) and isinstance(run["nonfinite_losses"], int)
            assert 0.0 <= run["test_accuracy"] <= 1.0
            if name.startswith(("SINGD", "KFAC-lowprec")) and regime in expected_state:
                assert run["state_dtypes"] == expected_state[regime], (name, regime)
            elif name != "AdamW":
                assert run["state_dtypes"] == ["float32"], (name, regime)  # K-FAC factors fp32 in every regime
    rows = payload["summary"]["rows"]
    assert all(r["ratio_to_fp32"] == 1.0 for r in rows if r["regime"] == "fp32" and r["ratio_to_fp32"] is not None)
    assert {r["method"] for r in rows} == set(runs)
    assert payload["summary"]["target"]["runs"] == 3  # bf16 SINGD: diagonal, dense, block
    assert "× fp32" in capsys.readouterr().out


def test_distributed_quick_through_the_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("needs torch.distributed with the gloo backend")
    assert cli.main(["bench", "distributed", *QUICK, "--out", str(tmp_path)]) == 0
    payload = _results(tmp_path, "distributed")
    config, summary = payload["config"], payload["summary"]
    assert config["worlds"] == summary["worlds"] == [1, 2] and config["threads_per_process"] == 1
    ours = {"KFAC", "KFAC-MEM-OPT", "BKFAC", "SINGD-diagonal", "SINGD-dense"}
    assert set(summary["methods"]) == {"AdamW", "SGD", *ours}
    for name, row in summary["methods"].items():
        assert _positive_times(row["seconds_per_step"]) and _positive_times(row["optimizer_step_seconds"])
        assert row["finite"] == [True, True]
        assert row["bytes_per_step_per_rank"][0] == 0 < row["bytes_per_step_per_rank"][1]  # 1 process sends nothing
        assert row["max_abs_diff_across_ranks"][1] == 0.0  # identical replicas
        assert row["max_abs_diff_vs_one_process"][1] < 1e-10  # float64: the one-process run
        if name in ours:  # statistics and results on top of DDP's gradients; counted twice, the same
            assert row["bytes_per_step_per_rank"][1] > summary["methods"]["AdamW"]["bytes_per_step_per_rank"][1]
            assert row["driver_bytes_match"][1] is True and row["balance"][1] >= 1.0
            assert set(row["owners"][1].values()) == {0, 1}
    assert summary["methods"]["KFAC-MEM-OPT"]["bytes_by_kind_per_rank"][1]["gradients"] > 0  # owners broadcast them
    assert "gradients" not in summary["methods"]["KFAC"]["bytes_by_kind_per_rank"][1]
    assert "bytes/step/rank" in capsys.readouterr().out
    assert cli.main(["bench", "--list"]) == 0
    listed = capsys.readouterr().out
    assert "distributed" in listed and "_distributed_ranks" not in listed  # the ranks' helper module



def test_lm_quick_through_the_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.warns(UserWarning, match="go to the fallback rule") as caught:  # attention
        assert cli.main(["bench", "lm", *QUICK, "--out", str(tmp_path)]) == 0
    assert any("self_attn" in str(w.message) for w in caught)
    payload = _results(tmp_path, "lm")
    config, raw, summary = payload["config"], payload["raw"], payload["summary"]
    steps, vocab = config["size"]["steps"], config["size"]["vocab"]
    assert config["methods"] == ["AdamW", "KFAC", "SINGD-bf16+KFAC-head", "BKFAC"] and set(raw) == {"untied", "tied"}
    for tying, runs in raw.items():
        assert 0 < runs["oracle_loss"] < math.log(vocab)  # the process is far from uniform
        for name in config["methods"]:
            run = runs[name]
            assert len(run["losses"]) == steps and run["finite"] and _positive_times(run["seconds_per_step"])
            assert run["state_bytes"] > 0 and run["final_loss"] is not None
            if name != "AdamW":
                assert {"blocks.0.linear1", "blocks.0.linear2", "pos"} <= set(run["managed"])
                assert {"blocks.0.self_attn", "blocks.0.norm1", "norm"} <= set(run["fallback"])
                assert "embed" in run["managed"] and "head" not in run["fallback"]  # tied: one layer for both
    rows = summary["rows"]
    assert len(rows) == 2 * len(config["methods"])
    assert all(r["ratio_to_adamw"] == 1.0 for r in rows if r["method"] == "AdamW")
    assert "× AdamW" in capsys.readouterr().out


def test_models_quick_through_the_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Real models: a family whose package does not import is recorded as skipped; the rest ran and counted."""
    assert cli.main(["bench", "models", *QUICK, "--out", str(tmp_path)]) == 0
    payload = _results(tmp_path, "models")
    config, raw, summary = payload["config"], payload["raw"], payload["summary"]
    assert config["sections"] == ["coverage", "timing", "memory"]
    coverage = raw["coverage"]
    assert {"gpt2", "bert", "llama", "timm-resnet18", "torchvision-resnet18", "tiny-resnet"} <= set(coverage)
    for name, entry in coverage.items():
        importable = importlib.util.find_spec(entry["family"]) is not None
        if entry["skipped"] is not None:  # only for a package that does not import here
            assert entry["family"] != "torch" and "not importable" in entry["skipped"], (name, entry["skipped"])
            continue
        assert importable and set(entry["policies"]) == {"KFAC", "SINGD-diagonal", "default"}
        for row in entry["policies"].values():
            assert 0 < row["managed_parameters"] <= row["trainable_parameters"] == entry["trainable_parameters"]
            assert row["share"] == pytest.approx(row["managed_parameters"] / row["trainable_parameters"])
            for run in row["runs"].values():
                if "not_run" in run:
                    continue
                assert run["error"] is None and len(run["losses"]) == config["coverage"]["steps"], (name, run)
                assert run["optimizer_managed_parameters"] == row["managed_parameters"]  # plan = the built optimizer
                assert run["finite"], name
    tiny = coverage["tiny-resnet"]["policies"]["KFAC"]
    assert set(tiny["fallback"].values()) == {"normalisation layer"}  # every conv and the head managed
    assert all(r["skipped"] is None or r["policy"] is None for r in summary["coverage"])
    timing = raw["timing"]["tiny-resnet"]
    assert set(timing["contenders"]) == {"AdamW", "default", "KFAC"}
    for row in timing["contenders"].values():
        assert row["error"] is None and row["finite"] and _positive_times(row["seconds_per_step"])
        assert all(len(period) == timing["steps_per_period"] for period in row["period_step_seconds"])
    assert timing["contenders"]["AdamW"]["ratio_to_adamw"] == 1.0
    memory = raw["memory"]
    if importlib.util.find_spec("transformers") is None:
        assert "not importable" in memory["skipped"]
    else:
        for key in ("tied/AdamW", "untied/AdamW"):
            assert memory["configurations"][key]["adamw_state_bytes"] > 0  # exp_avg + exp_avg_sq
        for row in summary["memory"]:
            assert row["estimated_bytes"] > 0
            assert row["skipped"] is not None or row["error"] is not None or row["curvature_bytes"] > 0
    assert "share of trainable parameters managed" in capsys.readouterr().out

# -- the bench subcommand ------------------------------------------------------------------------------
def test_bench_list(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["bench", "--list"]) == 0
    out = capsys.readouterr().out
    for name in ("scaling", "memory", "anchors", "lowrank", "lm", "train"):
        assert name in out
    assert "common" not in out and "_readme" not in out


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


def test_train_quick(tmp_path: Path) -> None:
    train = cli.load_benchmark("train")
    with pytest.warns(UserWarning, match="go to the fallback rule"):  # the LM's attention
        payload = train.main([*QUICK, "--out", str(tmp_path)])
    written = _results(tmp_path, "train")
    config = written["config"]
    assert written["summary"].keys() == payload["summary"].keys() == {"classifier", "autoencoder", "lm"}
    for problem, block in written["summary"].items():
        assert set(block["methods"]) == {"AdamW", "KFAC", "SENG", "Mixed", "KFAC-2L-nicolaides"}
        for label, runs in written["raw"][problem].items():
            assert [r["lr"] for r in runs] == config["methods"][label]["lrs"]
            assert all(len(r["losses"]) == config["steps"] and r["finite"] for r in runs)
            assert all(r["evaluations"][-1][0] == config["steps"] for r in runs)
        assert block["methods"]["AdamW"]["best_lr"] in config["methods"]["AdamW"]["lrs"]
        for row in block["methods"].values():
            assert row["all_finite"] and math.isfinite(row["final_metric"]) and row["state_bytes"] > 0
    # the LM: the metric is a held-out cross-entropy between the process's floor and a uniform guess
    floor, vocab = config["problems"]["lm"]["oracle_loss"], train.LM_SIZE.vocab
    assert 0 < floor < config["problems"]["lm"]["target"] < math.log(vocab)
    for row in written["summary"]["lm"]["methods"].values():
        assert floor < row["final_metric"] < math.log(vocab) + 0.5  # 6 steps from a near-uniform start


@pytest.mark.parametrize(("problem", "head"), [("classifier", "fc3"), ("autoencoder", "fc8"), ("lm", "head")])
def test_train_mixed_puts_kfac_on_the_last_linear(problem: str, head: str) -> None:
    train = cli.load_benchmark("train")
    model = train.PROBLEMS[problem].build()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the LM's attention goes to the fallback
        optimizer = train.methods()["Mixed"].build(model, 0.01, train.PROBLEMS[problem].clip)
    layers = optimizer.preconditioner.layers
    assert isinstance(layers[head].method, sr.KFAC)
    singd = [m.method for name, m in layers.items() if name != head]
    assert singd and all(isinstance(m, sr.SINGD) and m.dtype == torch.bfloat16 for m in singd)
    lrs = {group["name"]: group["lr"] for group in optimizer.param_groups if group["rule"] == "curvature"}
    assert lrs.pop(head) == pytest.approx(0.1) and set(lrs.values()) == {0.01}
    fallback = [group for group in optimizer.param_groups if group["name"] == "fallback"]
    assert [group["rule"] for group in fallback] == (["adamw"] if problem == "lm" else [])  # attention, norms


# -- the README's table ----------------------------------------------------------------------------------------------
def _readme():
    """``benchmarks/_readme.py`` (not a benchmark; loading ``train`` puts the benchmarks folder on ``sys.path``)."""
    cli.load_benchmark("train")
    return importlib.import_module("_readme")


def test_readme_table_matches_the_committed_train_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert _readme().main(["--check"]) == 0, capsys.readouterr().err


def test_readme_check_fails_when_stale(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    readme = _readme()
    stale = tmp_path / "README.md"
    stale.write_text(f"# x\n{readme.START}\nold numbers\n{readme.END}\nrest\n")
    monkeypatch.setattr(readme, "README", stale)
    assert readme.main(["--check"]) == 1 and "old numbers" in stale.read_text()
    assert readme.main([]) == 0 and readme.main(["--check"]) == 0
    text = stale.read_text()
    assert text.startswith(f"# x\n{readme.START}\nGenerated by") and text.endswith(f"{readme.END}\nrest\n")


def _fake_run(lr: float, steps_to_target: int | None, metric: float, finite: bool = True) -> dict:
    seconds = None if steps_to_target is None else 0.05 * steps_to_target
    return {"lr": lr, "losses": [1.0] * 100, "evaluations": [[100, metric]], "finite": finite, "seconds": 5.0,
            "steps_to_target": steps_to_target, "seconds_to_target": seconds, "final_metric": metric, "state_bytes": 8}


def test_readme_renders_missing_baselines_and_unreached_targets() -> None:
    readme = _readme()
    raw = {"classifier": {
        "AdamW": [_fake_run(1e-3, None, 0.9), _fake_run(3e-3, 40, 0.97)],
        "SENG": [_fake_run(0.1, 20, 0.5, finite=False), _fake_run(0.3, None, 0.95)],  # a diverged run, then a miss
    }}
    payload = json.loads(readme.RESULTS.read_text())
    payload["config"].update(problems={"classifier": {"metric": "test accuracy", "target": 0.96}},
                             methods={"AdamW": {"lrs": [1e-3, 3e-3]}, "SENG": {"lrs": [0.1, 0.3]}}, steps=100)
    payload["summary"] = readme.train.summarize(["classifier"], ["AdamW", "SENG"], raw)  # no K-FAC
    lines = readme.render(payload).splitlines()
    assert "| AdamW | 0.003 | 40 | 2 s | 1.00 | — | 0.97 |" in lines  # no K-FAC to compare with
    assert "| SENG † | 0.3 | — | — | — | — | 0.95 |" in lines  # the finite run that missed the target
    assert "Command: `python benchmarks/train.py --problems classifier --methods AdamW SENG --steps 100`" in lines
    assert not any("autoencoder" in line for line in lines)


@pytest.mark.parametrize("with_tqdm", [True, False], ids=["tqdm", "plain"])
def test_progress_names_every_item(
    with_tqdm: bool, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bar on stderr that counts every item (also those added on the way); plain lines without tqdm."""
    if with_tqdm:
        pytest.importorskip("tqdm")
    else:
        monkeypatch.setitem(__import__("sys").modules, "tqdm.auto", None)  # import fails
    common = cli.load_benchmark("memory").common
    with common.Progress(2, "demo-bench") as progress:
        progress.next("first")
        progress.next("second")
        progress.extend(1)
        progress.next("third")
    out, err = capsys.readouterr()
    if with_tqdm:
        assert out == "" and "demo-bench" in err and "3/3" in err and "third" in err
    else:
        assert out.splitlines() == ["first …", "second …", "third …"]
