"""Which layer gets which method: rules, resolution, configs from dicts and TOML.

A `Policy` is a default method plus an ordered list of rules. A rule
matches a module by a glob on its qualified name, by its class, or by a
callable ``(name, module) -> bool``; the first matching rule wins, and
supported layers that no rule matches get the default. Modules that own
parameters but cannot be managed go to the optimizer's fallback rule: norm
layers (by design, silently); unsupported types, ``nn.MultiheadAttention``
(its projections are used through the functional path), parameters shared
by several modules (tied weights) and the layers of a ``batch_first=False``
transformer layer (with one warning at construction).
"""

from __future__ import annotations

import fnmatch
import re
import sys
from collections import defaultdict
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence, Union

import torch
from torch import nn

from ._table import format_bytes, format_table
from .auto import auto_policy
from .curvature import curvature_class
from .layers import Layer, layer_class
from .layers.tied import TiedLayer
from .methods import AUTO, KFAC, METHODS, CurvatureMethod, Method, Skip

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

__all__ = ["Rule", "Policy", "LayerPlan", "DESCRIBE_COLUMNS", "DEFAULT_METHOD", "method_from_dict", "plan_layer", "tied_row"]

Matcher = Union[str, type, Callable[[str, nn.Module], bool]]

#: Parameterised modules that go to the fallback rule by design (no warning).
NORM_TYPES: tuple[type[nn.Module], ...] = tuple(
    cls
    for cls in (
        nn.LayerNorm,
        nn.GroupNorm,
        nn.BatchNorm1d,
        nn.BatchNorm2d,
        nn.BatchNorm3d,
        nn.SyncBatchNorm,
        nn.InstanceNorm1d,
        nn.InstanceNorm2d,
        nn.InstanceNorm3d,
        getattr(nn, "RMSNorm", None),
    )
    if cls is not None
)

#: Class names of normalisation layers in other packages (HF ``LlamaRMSNorm``, ``T5LayerNorm``, timm's
#: ``LayerNorm2d``, ``BatchNormAct2d``, ``RmsNorm``): they go to the fallback rule by design, like `NORM_TYPES`.
NORM_NAME = re.compile(r"(?i)norm(act)?(\dd)?$")


def is_norm(module: nn.Module) -> bool:
    """Whether ``module`` is a normalisation layer: a `NORM_TYPES` instance or a class named like one (`NORM_NAME`)."""
    return isinstance(module, NORM_TYPES) or any(NORM_NAME.search(cls.__name__) for cls in type(module).__mro__[:-1])


#: Transformer layers whose ``batch_first`` decides the layout of their sublayers' inputs.
TRANSFORMER_LAYERS: tuple[type[nn.Module], ...] = (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)


def _type_matches(module: nn.Module, type_name: str) -> bool:
    """Whether ``type_name`` names the module's class or a base: ``"Conv2d"``,
    ``"torch.nn.Conv2d"`` or a full dotted path."""
    for cls in type(module).__mro__:
        full = f"{cls.__module__}.{cls.__qualname__}"
        short_torch = f"torch.nn.{cls.__qualname__}" if cls.__module__.startswith("torch.nn") else None
        if type_name in (cls.__qualname__, full, short_torch):
            return True
    return False


@dataclass(frozen=True)
class Rule:
    """One policy rule: modules that ``match`` get ``method``.

    ``match`` is a glob on the qualified module name (``"features.*"``), a
    module class (subclasses match too), or a callable
    ``(name, module) -> bool``. ``type_name`` (TOML ``type = "Conv2d"``) names
    a class — ``"Conv2d"``, ``"torch.nn.Conv2d"`` or a full dotted path, bases
    included — and must match as well; a rule may give only ``type_name``.
    """

    match: Matcher | None
    method: Method
    type_name: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.method, Method):
            raise ValueError(f"Rule.method must be a method config such as sr.KFAC() (got {self.method!r})")
        if self.match is None and self.type_name is None:
            raise ValueError("Rule needs a match (glob, module class or callable) or a type_name")
        valid = (
            self.match is None
            or isinstance(self.match, str)
            or (isinstance(self.match, type) and issubclass(self.match, nn.Module))
            or callable(self.match)
        )
        if not valid:
            raise ValueError(
                "Rule.match must be a name glob, an nn.Module class or a callable "
                f"(name, module) -> bool (got {self.match!r})"
            )

    def matches(self, name: str, module: nn.Module) -> bool:
        """Whether this rule applies to ``module`` registered as ``name``."""
        if self.type_name is not None and not _type_matches(module, self.type_name):
            return False
        if self.match is None:
            return True
        if isinstance(self.match, str):
            return fnmatch.fnmatchcase(name, self.match)
        if isinstance(self.match, type):
            return isinstance(module, self.match)
        return bool(self.match(name, module))


@dataclass(frozen=True)
class LayerPlan:
    """How one parameter-owning module is treated.

    Attributes:
        name: qualified module name (``""`` is the root module).
        module: the module.
        method: the curvature method, or ``None`` for the fallback rule.
        layer_cls: the adapter class when managed.
        note: why a module goes to the fallback (empty when managed), or how a tied use is served.
        warn: whether the fallback is unexpected enough to warn about.
        tied: for the first module of a tied weight (model order), the other
            uses as ``(name, module, adapter class)``: one curvature serves them all.
        tied_to: for the other uses, the name of that first module (their
            plan is served by its layer; the preconditioner manages no layer of its own for them).
    """

    name: str
    module: nn.Module
    method: CurvatureMethod | None
    layer_cls: type[Layer] | None
    note: str = ""
    warn: bool = False
    tied: tuple[tuple[str, nn.Module, type[Layer]], ...] = ()
    tied_to: str | None = None

    @property
    def manages(self) -> bool:
        """Whether the preconditioner manages a layer for this plan (not the fallback, not a tied follower)."""
        return self.method is not None and self.tied_to is None


def fallback_row(plan: LayerPlan) -> list[str]:
    """A ``describe()`` table row for a module left to the fallback rule."""
    shapes = ", ".join("×".join(map(str, p.shape)) for p in plan.module.parameters(recurse=False) if p.requires_grad)
    return [plan.name or "(root)", type(plan.module).__name__, "", shapes, "fallback", "", plan.note]


def tied_row(plan: LayerPlan) -> list[str]:
    """A ``describe()`` table row for a tied weight's use served by its first use's layer."""
    layer = plan.layer_cls(plan.module)
    return [plan.name, type(plan.module).__name__, layer.adapter_text, layer.shape_text, plan.method.summary(), "", plan.note]


def plan_layer(plan: LayerPlan) -> "Layer | TiedLayer":
    """The adapter of a managed plan: the module's own, or one `TiedLayer` over a tied weight's uses."""
    layer = plan.layer_cls(plan.module)
    if not plan.tied:
        return layer
    return TiedLayer([(plan.name, layer), *((name, cls(module)) for name, module, cls in plan.tied)])


#: The default policy's method: K-FAC, each factor's representation chosen by its width
#: (`singd_rkfac.methods.by_width`), so no default allocates a dense vocabulary-sized factor.
DEFAULT_METHOD = KFAC(a=AUTO, g=AUTO)

#: Columns of every ``describe()`` table (policy and optimizer).
DESCRIBE_COLUMNS = ("layer", "type", "adapter", "shape", "method", "state", "note")


def _owns_trainable_parameters(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters(recurse=False))


@dataclass(frozen=True)
class _ModelFacts:
    """What classifying one module needs to know about the whole model.

    Attributes:
        functional: ``id(out_proj)`` → name of the ``nn.MultiheadAttention`` that
            uses its weight functionally (the module itself is never called).
        owners: ``id(parameter)`` → names of the modules that own it (several: tied).
        seq_first: ``id(module)`` → name of the ``batch_first=False`` transformer
            layer it belongs to.
    """

    functional: dict[int, str]
    owners: dict[int, list[str]]
    seq_first: dict[int, str]
    modules: dict[str, nn.Module]

    def module(self, name: str) -> nn.Module:
        return self.modules[name]

    @classmethod
    def of(cls, model: nn.Module) -> "_ModelFacts":
        functional, owners, seq_first = {}, defaultdict(list), {}
        for name, module in model.named_modules():
            if isinstance(module, nn.MultiheadAttention):
                functional[id(module.out_proj)] = name
            if isinstance(module, TRANSFORMER_LAYERS) and not module.self_attn.batch_first:
                seq_first.update({id(sub): name for sub in module.modules()})
            for param in module.parameters(recurse=False):
                if param.requires_grad:
                    owners[id(param)].append(name)
        return cls(functional, dict(owners), seq_first, dict(model.named_modules()))

    def tied_with(self, name: str, module: nn.Module, param: nn.Parameter | None = None) -> list[str]:
        """Other modules owning ``param`` (default: any parameter of ``module``; tied weights), in model order."""
        params = module.parameters(recurse=False) if param is None else [param]
        others = [other for p in params for other in self.owners.get(id(p), ()) if other != name]
        return list(dict.fromkeys(others))


def _uncompiled(model: nn.Module) -> nn.Module:
    """The module a ``torch.compile`` wrapper holds, so layer names are the model's own (no ``_orig_mod.``)."""
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")  # loaded whenever a compiled module exists
    while eval_frame is not None and isinstance(model, eval_frame.OptimizedModule):
        model = model._orig_mod
    return model


def _fallback(
    name: str, module: nn.Module, method: Method, cls: type[Layer] | None, facts: _ModelFacts
) -> tuple[str, bool] | None:
    """``(note, warn)`` when ``module`` goes to the fallback rule, ``None`` when ``method`` manages it."""
    if isinstance(method, Skip):
        return "skipped by policy", False
    if is_norm(module):
        return "normalisation layer", False
    if id(module) in facts.functional:
        return f"weight used functionally by nn.MultiheadAttention {facts.functional[id(module)]!r} (module never called)", False
    if isinstance(module, nn.MultiheadAttention):
        return "projections used inside F.multi_head_attention_forward, out of the hooks' reach", True
    if cls is None:  # quiet when it owns only vector-like parameters (scales, biases, layer-scale gammas, a class token)
        matrices = any(sum(size > 1 for size in p.shape) > 1 for p in module.parameters(recurse=False) if p.requires_grad)
        return f"{type(module).__name__} is not a supported layer type", matrices
    if (reason := cls.unsupported_reason(module)) is not None:
        return reason, True
    if id(module) in facts.seq_first:
        return (f"inside {facts.seq_first[id(module)]!r} with batch_first=False: the leading input "
                "dimension is the sequence, not the batch (build it with batch_first=True)"), True
    assert isinstance(method, CurvatureMethod)
    if method.row_layout not in cls.layouts:
        return (f"{type(module).__name__} supports the row layout(s) {', '.join(map(repr, cls.layouts))} only, "
                f"{method.summary()} needs {method.row_layout!r}"), True
    return None


def _tie_fallback(
    uses: list[tuple[str, nn.Module]], method: Method, classes: list[type[Layer] | None], facts: _ModelFacts
) -> tuple[str, bool] | None:
    """``(note, warn)`` when a tied weight's uses cannot share one curvature, ``None`` when they can (`_TIE_RULE`)."""
    names = ", ".join(repr(n) for n, _ in uses)
    for (name, module), cls in zip(uses, classes):
        own = _fallback(name, module, method, cls, facts)
        if own is not None:
            note, warn = own
            return (note if name == uses[0][0] else f"tied with {name!r}, which goes to the fallback rule ({note})"), warn
    weight = uses[0][1].weight
    for name, module in uses:
        if getattr(module, "weight", None) is not weight or weight.ndim != 2:
            return (f"weight shared by {names}: a tied weight is preconditioned when it is the 2-D weight "
                    f"of every use (in {name!r} it is not)"), True
    assert isinstance(method, CurvatureMethod)
    if method.row_layout == "sample":
        return (f"weight tied between {names}: {method.summary()} keeps per-sample gradients of one module, "
                "which a weight used by several modules does not have"), True
    return None


class Policy:
    """A default method and ordered rules: which curvature method each layer gets.

    Args:
        default: method for supported layers no rule matches; ``None`` gives
            `DEFAULT_METHOD`, K-FAC with each factor's representation chosen
            by its width (``sr.KFAC(a="auto", g="auto")``: dense up to 1024,
            SRE-KFAC rank 64 up to 8192, diagonal above). Ask for
            ``sr.KFAC()`` to get dense factors everywhere.
        rules: ``Rule`` objects or ``(match, method)`` tuples; first match wins.
    """

    def __init__(self, default: Method | None = None, rules: Sequence[Rule | tuple] = ()) -> None:
        self.default = DEFAULT_METHOD if default is None else default
        if not isinstance(self.default, Method):
            raise ValueError(f"Policy.default must be a method config such as sr.KFAC() (got {self.default!r})")
        self.rules: tuple[Rule, ...] = tuple(self._as_rule(r, i) for i, r in enumerate(rules))

    @staticmethod
    def _as_rule(rule: Rule | tuple, index: int) -> Rule:
        if isinstance(rule, Rule):
            return rule
        if isinstance(rule, tuple) and len(rule) == 2:
            return Rule(*rule)
        raise ValueError(f"Policy.rules[{index}] must be a sr.Rule or a (match, method) tuple (got {rule!r})")

    def __repr__(self) -> str:
        return f"Policy(default={self.default!r}, rules={list(self.rules)!r})"

    # -- resolution -------------------------------------------------------
    def method_for(self, name: str, module: nn.Module) -> Method:
        """The method the first matching rule (or the default) gives ``module``."""
        for rule in self.rules:
            if rule.matches(name, module):
                return rule.method
        return self.default

    def plan(self, model: nn.Module) -> list[LayerPlan]:
        """A `LayerPlan` for every module that owns trainable parameters (of the model inside a ``torch.compile`` wrapper)."""
        model = _uncompiled(model)
        facts = _ModelFacts.of(model)
        modules = dict(model.named_modules())
        plans: list[LayerPlan] = []
        followers: dict[str, LayerPlan] = {}
        for name, module in modules.items():
            if not _owns_trainable_parameters(module):
                continue
            if name in followers:
                plans.append(followers.pop(name))
                continue
            method = self.method_for(name, module)
            cls = layer_class(module)
            weight = getattr(module, "weight", None)
            tied = facts.tied_with(name, module, weight) if isinstance(weight, nn.Parameter) else []
            if tied:  # its weight is shared: one layer for the weight's uses (other shared parameters: fallback)
                head, rest = self._plan_tie(name, [(n, modules[n]) for n in tied], method, facts)
                plans.append(head)
                followers.update((p.name, p) for p in rest)
                continue
            shared = facts.tied_with(name, module)
            if shared:  # a parameter other than its weight is shared: its gradient holds the other uses'
                others = ", ".join(map(repr, shared))
                matrices = any(p.ndim > 1 for p in module.parameters(recurse=False) if p.requires_grad)
                note = f"a parameter other than its weight is shared with {others}: fallback rule, updated once"
                plans.append(LayerPlan(name, module, None, None, note, matrices))  # only vectors (a shared bias): quiet
                continue
            fallback = _fallback(name, module, method, cls, facts)
            if fallback is None:
                plans.append(LayerPlan(name, module, method, cls))
            else:
                plans.append(LayerPlan(name, module, None, None, *fallback))
        return plans

    def _plan_tie(
        self, name: str, others: list[tuple[str, nn.Module]], method: Method, facts: _ModelFacts
    ) -> tuple[LayerPlan, list[LayerPlan]]:
        """The plans of a tied weight's first use ``name`` and of its other uses (model order)."""
        uses = [(name, facts.module(name)), *others]
        classes = [layer_class(m) for _, m in uses]
        fallback = _tie_fallback(uses, method, classes, facts)
        if fallback is not None:
            note, warn = fallback
            shared = ", ".join(repr(n) for n, _ in others)
            head = LayerPlan(name, uses[0][1], None, None, f"{note}; shared with {shared}: fallback rule, updated once", warn)
            rest = [LayerPlan(n, m, None, None, f"tied with {name!r}: fallback rule, updated once") for n, m in others]
            return head, rest
        disagree = [n for n, m in others if self.method_for(n, m) != method]
        note = f"tied weight, also used by {', '.join(repr(n) for n, _ in others)}"
        if disagree:
            note += f" (the policy's method for {', '.join(map(repr, disagree))} is not used: the first use's serves all)"
        followers = tuple((n, m, cls) for (n, m), cls in zip(others, classes[1:]))
        head = LayerPlan(name, uses[0][1], method, classes[0], note, bool(disagree), tied=followers)
        rest = [LayerPlan(n, m, method, cls, f"tied to {name!r}: preconditioned with it", tied_to=name)
                for n, m, cls in followers]
        return head, rest

    def resolve(self, model: nn.Module) -> dict[str, CurvatureMethod | None]:
        """Every parameter-owning module's method (``None`` = fallback rule)."""
        return {p.name: p.method for p in self.plan(model)}

    def describe(self, model: nn.Module) -> str:
        """A table of layer, type, adapter (`singd_rkfac.layers`), shape, method and estimated curvature-state bytes."""
        rows = []
        total = 0
        for p in self.plan(model):
            if p.method is None:
                rows.append(fallback_row(p))
                continue
            if p.tied_to is not None:
                rows.append(tied_row(p))
                continue
            layer = plan_layer(p)
            implementation = curvature_class(p.method)
            dtype = implementation.state_dtype(p.method, layer.weight.dtype)
            size = implementation.estimate_bytes(p.method, layer.dims, dtype)
            total += size
            note = "; ".join(filter(None, (implementation.describe_note(p.method, layer.dims), p.note)))
            rows.append([p.name, type(p.module).__name__, layer.adapter_text, layer.shape_text, p.method.summary(),
                         format_bytes(size), note])
        table = format_table(list(DESCRIBE_COLUMNS), rows)
        return f"{table}\ncurvature state (estimated): {format_bytes(total)}"

    #: A K-FAC-family representation per layer and factor from sizes and a
    #: memory budget (`singd_rkfac.auto.auto_policy`).
    auto = staticmethod(auto_policy)

    # -- configs ------------------------------------------------------------
    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> "Policy":
        """Build a policy from ``{"default": {...}, "rules": [{...}, ...]}``.

        A method is ``{"method": "kfac", <field>: value, ...}`` (or just the
        name). A rule adds ``"match"`` (name glob) and/or ``"type"`` (class
        name such as ``"Conv2d"``) to its method's keys.
        """
        if not isinstance(config, Mapping):
            raise ValueError(f"policy config must be a mapping (got {type(config).__name__})")
        unknown = set(config) - {"default", "rules"}
        if unknown:
            raise ValueError(f"unknown policy key(s) {sorted(unknown)}; allowed: 'default', 'rules'")
        default = method_from_dict(config["default"], where="default") if "default" in config else None
        raw_rules = config.get("rules", [])
        if not isinstance(raw_rules, Sequence) or isinstance(raw_rules, (str, bytes)):
            raise ValueError("policy 'rules' must be a list of tables")
        rules = []
        for i, raw in enumerate(raw_rules):
            where = f"rules[{i}]"
            if not isinstance(raw, Mapping):
                raise ValueError(f"{where} must be a table (got {raw!r})")
            body = dict(raw)
            match, type_name = body.pop("match", None), body.pop("type", None)
            if match is None and type_name is None:
                raise ValueError(f"{where} needs 'match' (name glob) or 'type' (class name)")
            for key, value in (("match", match), ("type", type_name)):
                if value is not None and not isinstance(value, str):
                    raise ValueError(f"{where}.{key} must be a string (got {value!r})")
            rules.append(Rule(match, method_from_dict(body, where=where), type_name=type_name))
        return cls(default=default, rules=rules)

    @classmethod
    def from_toml(cls, path: str | Path) -> "Policy":
        """Build a policy from a TOML file with a ``[default]`` table and ``[[rules]]``.

        A ``[policy]`` table holding both is accepted too, so a policy can live
        inside a larger config file.
        """
        with open(path, "rb") as handle:
            config = tomllib.load(handle)
        if "policy" in config:
            config = config["policy"]
        return cls.from_dict(config)


def _field_value(method_cls: type[Method], field_type: str, value: Any) -> Any:
    """TOML-friendly values: dtype names to ``torch.dtype``, lists to tuples, tables to method configs."""
    if isinstance(value, Mapping):
        return method_from_dict(value, where=f"{method_cls.__name__} field")
    if "dtype" in field_type and isinstance(value, str):
        dtype = getattr(torch, value.removeprefix("torch."), None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"{method_cls.__name__}: {value!r} is not a torch dtype name")
        return dtype
    if isinstance(value, list):
        return tuple(value)
    return value


def method_from_dict(config: Mapping[str, Any] | str, *, where: str = "method") -> Method:
    """A method config from ``{"method": name, field: value, ...}`` or a bare name."""
    body = {"method": config} if isinstance(config, str) else dict(config)
    name = body.pop("method", None)
    if name is None:
        raise ValueError(f"{where}: missing 'method' (one of {sorted(METHODS)})")
    method_cls = METHODS.get(str(name).lower())
    if method_cls is None:
        raise ValueError(f"{where}: unknown method {name!r}; known: {sorted(METHODS)}")
    known = {f.name: f for f in fields(method_cls) if f.init}
    unknown = sorted(set(body) - set(known))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown} for method {name!r}; allowed: {sorted(known)}")
    kwargs = {key: _field_value(method_cls, str(known[key].type), value) for key, value in body.items()}
    return method_cls(**kwargs)
