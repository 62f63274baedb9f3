"""Policy rules, resolution, configs (dict / TOML) and validation errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import singd_rkfac as sr


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3, groups=2))
        self.body = nn.Sequential(nn.Linear(16, 32), nn.Linear(32, 32))
        self.embed = nn.Embedding(10, 4)
        self.pair = nn.Bilinear(4, 4, 2)
        self.head = nn.Linear(32, 10)


def test_first_matching_rule_wins_and_matchers_work():
    damped = sr.KFAC(damping=0.1)
    exact = sr.KFAC(damping_mode="exact")
    policy = sr.Policy(
        default=sr.KFAC(),
        rules=[
            ("features.*", damped),
            (nn.Conv2d, exact),  # never reached for features.* (first match wins)
            sr.Rule("head", sr.Skip()),
            (lambda name, module: getattr(module, "in_features", 0) >= 32, exact),
        ],
    )
    resolved = policy.resolve(Net())
    assert resolved == {
        "features.0": damped,
        "features.1": None,  # normalisation layer → fallback
        "features.3": damped,  # grouped conv: managed
        "body.0": sr.KFAC(),
        "body.1": exact,
        "embed": sr.KFAC(),
        "pair": None,  # unsupported type → fallback
        "head": None,  # skipped
    }


def test_plan_notes_say_why_a_module_falls_back():
    notes = {p.name: (p.note, p.warn) for p in sr.Policy().plan(Net())}
    assert notes["features.1"] == ("normalisation layer", False)
    assert notes["features.3"] == ("", False)  # grouped conv: managed
    assert notes["pair"] == ("Bilinear is not a supported layer type", True)
    assert notes["body.0"] == ("", False)


def test_unsupported_layers_warn_once_at_construction():
    with pytest.warns(UserWarning, match=r"pair \(Bilinear"):
        sr.Optimizer(Net())


def test_describe_lists_layers_methods_and_bytes():
    text = sr.Policy(sr.KFAC(), rules=[("head", sr.Skip())]).describe(Net())
    lines = text.splitlines()
    assert lines[0].split() == ["layer", "type", "adapter", "shape", "method", "state", "note"]
    body = next(line for line in lines if line.startswith("body.0"))
    # float32 factors: A (16+1)², G 32², each stored with its inverse
    assert "LinearLayer" in body and "16→32" in body and "kfac" in body and f"{4 * 2 * (17**2 + 32**2) / 1024:.1f} KiB" in body
    assert any(line.startswith("head") and "skipped by policy" in line for line in lines)


TOML = """
[default]
method = "kfac"
damping = 0.01
inverse_every = 5

[[rules]]
match = "features.*"
type = "Conv2d"
method = "kfac"
damping_mode = "exact"

[[rules]]
match = "head"
method = "skip"
"""


def test_toml_and_dict_build_the_same_policy(tmp_path):
    path = tmp_path / "policy.toml"
    path.write_text(TOML)
    from_toml = sr.Policy.from_toml(path)
    wrapped = tmp_path / "wrapped.toml"
    wrapped.write_text(TOML.replace("[default]", "[policy.default]").replace("[[rules]]", "[[policy.rules]]"))
    from_dict = sr.Policy.from_dict(
        {
            "default": {"method": "kfac", "damping": 0.01, "inverse_every": 5},
            "rules": [
                {"match": "features.*", "type": "Conv2d", "method": "kfac", "damping_mode": "exact"},
                {"match": "head", "method": "skip"},
            ],
        }
    )
    python = sr.Policy(
        sr.KFAC(damping=0.01, inverse_every=5),
        rules=[sr.Rule("features.*", sr.KFAC(damping_mode="exact"), type_name="Conv2d"), ("head", sr.Skip())],
    )
    net = Net()
    expected = python.resolve(net)
    assert expected["features.0"] == sr.KFAC(damping_mode="exact")
    for policy in (from_toml, sr.Policy.from_toml(wrapped), from_dict):
        assert policy.resolve(net) == expected


@pytest.mark.parametrize(
    "config,message",
    [
        ({"defaults": {}}, "unknown policy key"),
        ({"default": {"method": "kfca"}}, "unknown method 'kfca'"),
        ({"default": {"method": "kfac", "dampin": 1.0}}, r"unknown key\(s\) \['dampin'\]"),
        ({"default": {"method": "kfac", "damping": -1.0}}, "KFAC.damping"),
        ({"default": {"damping": 1.0}}, "missing 'method'"),
        ({"rules": [{"method": "kfac"}]}, r"rules\[0\] needs 'match'"),
        ({"rules": [{"match": 3, "method": "kfac"}]}, r"rules\[0\]\.match must be a string"),
        ({"rules": "head"}, "must be a list"),
    ],
)
def test_bad_configs_raise_value_errors_naming_the_problem(config, message):
    with pytest.raises(ValueError, match=message):
        sr.Policy.from_dict(config)


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"damping": 0.0}, "damping"),
        ({"damping": float("nan")}, "damping"),
        ({"kfac_approx": "average"}, "kfac_approx"),
        ({"loss_average": "mean"}, "loss_average"),
        ({"ema": 1.0}, "ema"),
        ({"stats_every": 0}, "stats_every"),
        ({"inverse_every": 2.5}, "inverse_every"),
        ({"inverse_every": True}, "inverse_every"),
        ({"damping_mode": "heuristic"}, "damping_mode"),
        ({"inverse": "svd"}, "inverse"),
        ({"a": "qr"}, "KFAC.a "),
        ({"damping_mode": "exact", "inverse": "cholesky"}, "inverse"),
        ({"damping_mode": "exact", "g": "cholesky"}, "KFAC.g "),
    ],
)
def test_bad_method_fields_raise_value_error_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        sr.KFAC(**kwargs)


def test_bad_policy_objects_raise_value_error():
    with pytest.raises(ValueError, match="Policy.default"):
        sr.Policy(default="kfac")
    with pytest.raises(ValueError, match="Rule.method"):
        sr.Policy(rules=[("head", "skip")])
    with pytest.raises(ValueError, match=r"Policy.rules\[0\]"):
        sr.Policy(rules=["head"])
    with pytest.raises(ValueError, match="Rule.match"):
        sr.Rule(3.5, sr.KFAC())
    with pytest.raises(ValueError, match="policy must be a sr.Policy"):
        sr.Optimizer(Net(), {"default": "kfac"})


def test_methods_are_frozen_and_summarise_their_changes():
    method = sr.KFAC(damping=0.1)
    with pytest.raises(AttributeError):
        method.damping = 1.0  # type: ignore[misc]
    assert method.summary() == "kfac(damping=0.1)"
    assert sr.Skip().summary() == "skip"
    assert method.to_dict()["method"] == "kfac"
    assert sr.Policy.from_dict({"default": method.to_dict()}).default == method


def test_dtype_names_convert_in_configs():
    from singd_rkfac.policy import _field_value

    assert _field_value(sr.KFAC, "torch.dtype | None", "bfloat16") is torch.bfloat16
    with pytest.raises(ValueError, match="not a torch dtype"):
        _field_value(sr.KFAC, "torch.dtype | None", "bf17")
