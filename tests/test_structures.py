"""SINGD structures against an independent dense oracle (DESIGN §3.3).

Every operation of every structure is compared with its dense counterpart on
random, non-symmetric structured matrices. The oracle is written here from the
structures' definitions (sparsity pattern, projection convention Π, Toeplitz
coefficient means); it never calls ``spec.project`` or the structures' parts.

Tolerances scale with the same oracle evaluated on absolute values
(``|K|ᵀ|X|`` instead of ``KᵀX``, …): a bound on the magnitudes that enter each
result, so cancellation in a random draw cannot make a check flaky.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from singd_rkfac.structures import (
    STRUCTURES,
    ArrowMatrix,
    Block,
    Dense,
    Diagonal,
    Hierarchical,
    LowRank,
    StructuredMatrix,
    Toeplitz,
)

SPECS = {
    "dense": st.just(Dense()),
    "diagonal": st.just(Diagonal()),
    "block": st.builds(Block, st.integers(1, 10)),
    "lowrank": st.builds(LowRank, st.integers(1, 10), st.booleans()),
    "hierarchical": st.builds(Hierarchical, st.integers(0, 8), st.integers(0, 8)),
    "toeplitz": st.builds(Toeplitz, st.booleans()),
}
KINDS = list(SPECS)

#: rtol relative to the largest magnitude entering a result (see module docstring).
RTOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}


def tolerance(dtype: torch.dtype, scale) -> float:
    """``rtol · max scale``, plus a few of the smallest normals (fp16 results can be subnormal)."""
    return RTOL[dtype] * float(torch.as_tensor(scale).abs().max()) + 4 * torch.finfo(dtype).tiny

#: Hand-picked shapes hypothesis might only reach by chance: dims below the block
#: size / rank / k1+k2, blocks dividing the dim or not, empty middles, d = 1.
EDGE_CASES = [
    (Block(5), 3), (Block(4), 8), (Block(4), 10), (Block(1), 5), (Block(10), 10), (Block(3), 1),
    (LowRank(10, True), 3), (LowRank(10, False), 3), (LowRank(4, True), 4), (LowRank(2, False), 9),
    (Hierarchical(8, 8), 10), (Hierarchical(3, 2), 5), (Hierarchical(0, 0), 4), (Hierarchical(8, 0), 5),
    (Hierarchical(0, 8), 5), (Hierarchical(2, 3), 1), (Hierarchical(6, 8), 7),
    (Dense(), 1), (Diagonal(), 1), (Toeplitz(True), 1), (Toeplitz(False), 2), (Dense(), 7), (Toeplitz(False), 13),
]


pytestmark = pytest.mark.usefixtures("one_thread")


# -- oracle ---------------------------------------------------------------------------
def corner_sizes(spec, d: int) -> tuple[int, int, int]:
    """``(k1', m, k2')`` of a hierarchical / low-rank spec at dimension ``d``."""
    k1, k2 = (spec.k1, spec.k2) if isinstance(spec, Hierarchical) else (0, spec.rank) if spec.lower else (spec.rank, 0)
    k1 = min(k1, d)
    k2 = min(k2, d - k1)
    return k1, d - k1 - k2, k2


def pattern(spec, d: int) -> torch.Tensor:
    """Boolean ``d × d``: True where the structure can hold a nonzero."""
    i = torch.arange(d)
    r, c = i[:, None], i[None, :]
    if isinstance(spec, Dense):
        return torch.ones(d, d, dtype=torch.bool)
    if isinstance(spec, Diagonal):
        return (r == c).expand(d, d)
    if isinstance(spec, Block):
        b = min(spec.size, d)
        return r // b == c // b
    if isinstance(spec, Toeplitz):
        return r >= c if spec.lower else r <= c
    k1, m, _ = corner_sizes(spec, d)
    return (r < k1) | ((r >= k1) & (r < k1 + m) & (r == c)) | ((r >= k1 + m) & (c >= k1))


def oracle_project(spec, mat: torch.Tensor) -> torch.Tensor:
    """Dense ``Π(mat)`` of a symmetric ``mat`` (float64)."""
    d = mat.shape[0]
    if isinstance(spec, Toeplitz):
        t = [mat.diagonal().mean()] + [(mat.diagonal(-k).sum() + mat.diagonal(k).sum()) / (d - k) for k in range(1, d)]
        lag = torch.arange(d)[:, None] - torch.arange(d)[None, :]
        low = torch.where(lag >= 0, torch.stack(t)[lag.clamp(min=0)], torch.zeros((), dtype=mat.dtype))
        return low if spec.lower else low.T
    p = pattern(spec, d)
    zero = torch.zeros((), dtype=mat.dtype)
    return torch.where(p & p.T, mat, torch.where(p, mat + mat.T, zero))


def expected_numel(spec, d: int) -> int:
    if isinstance(spec, Dense):
        return d * d
    if isinstance(spec, (Diagonal, Toeplitz)):
        return d
    if isinstance(spec, Block):
        b = min(spec.size, d)
        n, r = divmod(d, b)
        return n * b * b + r * r
    k1, m, k2 = corner_sizes(spec, d)
    return k1 * k1 + k1 * (d - k1) + m + k2 * m + k2 * k2


def random_matrix(spec, d: int, gen: torch.Generator, dtype=torch.float64) -> StructuredMatrix:
    """``spec.zeros(d)`` with every part filled with standard normal numbers."""
    mat = spec.zeros(d, dtype=dtype, device="cpu")
    for t in mat.tensors().values():
        t.copy_(torch.randn(t.shape, generator=gen, dtype=torch.float64))
    return mat


# -- operations: (name, structured call, dense oracle) ---------------------------------
def _proj(o, mat):
    return oracle_project(o.spec, mat)


OPS = [
    ("matmul", lambda s: s.K.matmul(s.K2), lambda o: o.K @ o.K2),
    ("@ matrix", lambda s: s.K @ s.K2, lambda o: o.K @ o.K2),
    ("mv", lambda s: s.K.mv(s.X), lambda o: o.K @ o.X),
    ("@ tensor", lambda s: s.K @ s.X, lambda o: o.K @ o.X),
    ("rmatmat", lambda s: s.K.rmatmat(s.X), lambda o: o.K.T @ o.X),
    ("rmul", lambda s: s.K.rmul(s.X.T), lambda o: o.X.T @ o.K),
    ("apply_outer", lambda s: s.K.apply_outer(s.X), lambda o: o.K @ (o.K.T @ o.X)),
    ("from_inner(X)", lambda s: s.K.from_inner(s.X), lambda o: _proj(o, o.K.T @ o.X @ o.X.T @ o.K)),
    ("from_inner()", lambda s: s.K.from_inner(), lambda o: _proj(o, o.K.T @ o.K)),
    ("inner_self", lambda s: s.K.inner_self(), lambda o: _proj(o, o.K.T @ o.K)),
    ("project_gram", lambda s: s.K.project_gram(s.S), lambda o: _proj(o, o.S @ o.S.T)),
    ("spec.project", lambda s: s.spec.project(s.M), lambda o: _proj(o, o.M)),
    ("add_()", lambda s: s.K.clone().add_(s.K2), lambda o: o.K + o.K2),
    ("add_(float)", lambda s: s.K.clone().add_(s.K2, s.a), lambda o: o.K + o.a * o.K2),
    ("add_(0-d)", lambda s: s.K.clone().add_(s.K2, torch.tensor(s.a, dtype=torch.float64)), lambda o: o.K + o.a * o.K2),
    ("mul_(float)", lambda s: s.K.clone().mul_(s.a), lambda o: o.a * o.K),
    ("mul_(0-d)", lambda s: s.K.clone().mul_(torch.tensor(s.a, dtype=torch.float64)), lambda o: o.a * o.K),
    ("diag_add_(float)", lambda s: s.K.clone().diag_add_(s.a), lambda o: o.K + o.a * o.I),
    ("diag_add_(0-d)", lambda s: s.K.clone().diag_add_(torch.tensor(s.a, dtype=s.dtype)), lambda o: o.K + o.a * o.I),
    ("trace", lambda s: s.K.trace(), lambda o: o.K.trace()),
    ("average_trace", lambda s: s.K.average_trace(), lambda o: o.K.trace() / o.d),
    ("max_abs", lambda s: s.K.max_abs(), lambda o: o.K.abs().max()),
    ("frobenius_norm", lambda s: s.K.frobenius_norm(), lambda o: o.K.square().sum().sqrt()),
    ("to_dense", lambda s: s.K.to_dense(), lambda o: o.K),
    ("clone", lambda s: s.K.clone(), lambda o: o.K),
    ("zeros_like", lambda s: s.K.zeros_like(), lambda o: 0 * o.K),
    ("eye", lambda s: s.spec.eye(s.d, dtype=s.dtype, device="cpu"), lambda o: o.I),
    ("zeros", lambda s: s.spec.zeros(s.d, dtype=s.dtype, device="cpu"), lambda o: 0 * o.I),
]


def check_all(spec, d: int, n: int, seed: int, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(seed)
    K, K2 = random_matrix(spec, d, gen, dtype), random_matrix(spec, d, gen, dtype)
    X, S, A = (torch.randn(*shape, generator=gen, dtype=torch.float64) for shape in ((d, n), (d, n), (d, d)))
    a = torch.randn((), generator=gen, dtype=torch.float64).item()
    X, S, M = X.to(dtype), S.to(dtype), (A + A.T).to(dtype)
    s = SimpleNamespace(spec=spec, d=d, dtype=dtype, K=K, K2=K2, X=X, S=S, M=M, a=a)
    o = SimpleNamespace(spec=spec, d=d, K=K.to_dense().double(), K2=K2.to_dense().double(),
                        X=X.double(), S=S.double(), M=M.double(), a=a, I=torch.eye(d, dtype=torch.float64))
    mag = SimpleNamespace(**{k: v.abs() if isinstance(v, torch.Tensor) and k != "I" else v for k, v in vars(o).items()})
    mag.a = abs(a)
    tag = f"{spec.summary()} d={d} n={n} seed={seed} {dtype}"

    # The oracle pattern is the structure's: random parts fill exactly P, and products stay in it.
    p = pattern(spec, d)
    assert torch.equal(o.K != 0, p), f"{tag}: to_dense outside / short of the pattern"
    assert not (o.K @ o.K2)[~p].any(), f"{tag}: the dense product leaves the pattern (not closed)"
    assert K.dim == d and K.dtype == dtype

    before = [t.clone() for t in K.tensors().values()]
    for name, call, oracle in OPS:
        out = call(s)
        if isinstance(out, StructuredMatrix):
            assert type(out) is type(K) and out.dim == d, f"{tag}: {name} changed layout"
            assert all(t.dtype == dtype for t in out.tensors().values()), f"{tag}: {name} part dtype"
            out = out.to_dense()
        assert out.dtype == dtype, f"{tag}: {name} returned {out.dtype}"
        expected, scale = oracle(o), oracle(mag)
        torch.testing.assert_close(
            out.double(), expected, rtol=0, atol=tolerance(dtype, scale), msg=lambda m: f"{tag}: {name}: {m}"
        )
    assert all(torch.equal(b, t) for b, t in zip(before, K.tensors().values())), f"{tag}: an op mutated K"

    # In-place ops return self; clones are independent.
    c = K.clone()
    assert c.add_(K2, 0.5) is c and c.mul_(2.0) is c and c.diag_add_(1.0) is c
    c.mul_(0.0)
    assert torch.equal(K.to_dense().double(), o.K)

    # total(): a 0-d sum in at least fp32 that is non-finite iff some stored entry is.
    work = torch.promote_types(dtype, torch.float32)
    total = K.total()
    assert total.dtype == work and total.dim() == 0
    exact = sum(t.double().sum() for t in K.tensors().values())
    bound = sum(t.double().abs().sum() for t in K.tensors().values())
    assert abs(float(total) - float(exact)) <= tolerance(torch.float32, bound), f"{tag}: total"
    for bad in (float("nan"), float("inf"), -float("inf")):
        for name, t in K.tensors().items():
            if t.numel():
                c = K.clone()
                c.tensors()[name].view(-1)[-1] = bad
                assert not bool(torch.isfinite(c.total())), f"{tag}: {bad} in {name} not caught by total"

    # select_(ok, other) keeps the matrix or takes the other's values, part by part, in place.
    for ok in (True, False):
        kept = K.clone()
        storage = [t.data_ptr() for t in kept.tensors().values()]
        assert kept.select_(torch.tensor(ok), K2) is kept
        assert [t.data_ptr() for t in kept.tensors().values()] == storage
        assert torch.equal(kept.to_dense().double(), o.K if ok else o.K2), f"{tag}: select_({ok})"

    # where_(ok) keeps or zeroes every part without a host sync, in place (also a non-finite part).
    for ok in (True, False):
        c = K.clone()
        storage = [t.data_ptr() for t in c.tensors().values()]
        if not ok:
            for t in c.tensors().values():
                t.view(-1)[:1] = float("nan")
        assert c.where_(torch.tensor(ok)) is c
        assert [t.data_ptr() for t in c.tensors().values()] == storage
        assert all(t.dtype == dtype for t in c.tensors().values())
        assert torch.equal(c.to_dense().double(), o.K if ok else 0 * o.K), f"{tag}: where_({ok})"

    # outer_self: S Sᵀ for every structure but Toeplitz — dense, block, diagonal in their own
    # structure, hierarchical and low-rank as an arrow matrix — applied by one product.
    outer = K.outer_self()
    assert (outer is not None) != isinstance(spec, Toeplitz), f"{tag}: outer_self availability"
    if outer is not None:
        arrow = isinstance(spec, (Hierarchical, LowRank))
        assert type(outer) is (ArrowMatrix if arrow else type(K)) and outer.dtype == dtype
        into = K2.outer_self() if arrow else K2.clone()
        written = K.outer_self(out=into)
        assert [t.data_ptr() for t in written.tensors().values()] == [t.data_ptr() for t in into.tensors().values()]
        assert all(torch.equal(a, b) for a, b in zip(written.tensors().values(), outer.tensors().values()))
        gram, gram_magnitude = o.K @ o.K.T, mag.K @ mag.K.T
        for name, got, expected, scale in (
            ("to_dense", outer.to_dense(), gram, gram_magnitude),
            ("mv", outer.mv(X), gram @ o.X, gram_magnitude @ mag.X),
            ("rmul", outer.rmul(X.T), o.X.T @ gram, mag.X.T @ gram_magnitude),
            ("mv of a transposed input", outer.mv(X.T.contiguous().T), gram @ o.X, gram_magnitude @ mag.X),
        ):
            torch.testing.assert_close(got.double(), expected, rtol=0, atol=tolerance(dtype, scale),
                                       msg=lambda m: f"{tag}: outer_self {name}: {m}")


# -- tests ----------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", list(RTOL), ids=str)
@pytest.mark.parametrize("kind", KINDS)
@settings(max_examples=40, deadline=None)
@given(data=st.data(), d=st.integers(1, 24), n=st.integers(1, 6), seed=st.integers(0, 2**32 - 1))
def test_ops_match_dense_oracle(kind, dtype, data, d, n, seed):
    check_all(data.draw(SPECS[kind], label="spec"), d, n, seed, dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize(("spec", "d"), EDGE_CASES, ids=lambda v: v.summary() if hasattr(v, "summary") else str(v))
def test_edge_shapes_match_dense_oracle(spec, d, dtype):
    for seed, n in ((0, 1), (1, 4)):
        check_all(spec, d, n, seed, dtype)


@pytest.mark.parametrize("kind", KINDS)
@settings(max_examples=30, deadline=None)
@given(data=st.data(), d=st.integers(1, 24), seed=st.integers(0, 2**32 - 1))
def test_sizes_and_load(kind, data, d, seed):
    spec = data.draw(SPECS[kind], label="spec")
    count = expected_numel(spec, d)
    assert spec.numel(d) == count
    if not isinstance(spec, Toeplitz):
        assert count == int(pattern(spec, d).sum())
    src = random_matrix(spec, d, torch.Generator().manual_seed(seed))
    for dtype in (torch.float64, torch.float32, torch.bfloat16, torch.float16):
        dst = spec.zeros(d, dtype=dtype, device="cpu")
        assert dst.numel() == count and dst.nbytes() == count * torch.finfo(dtype).bits // 8
        dst.load_(src.tensors())
        assert all(t.dtype == dtype for t in dst.tensors().values())
        assert torch.equal(dst.to_dense(), src.to_dense().to(dtype))
    back = spec.zeros(d, dtype=torch.float64, device="cpu")
    back.load_({k: v.clone() for k, v in src.tensors().items()})
    assert torch.equal(back.to_dense(), src.to_dense())
    # load_ copies: later changes to the source do not leak in.
    src.mul_(2.0)
    assert torch.equal(back.to_dense() * 2, src.to_dense())
    # A part of the wrong shape is refused (a structure of another dimension).
    other = spec.zeros(d + 1, dtype=torch.float64, device="cpu")
    with pytest.raises(ValueError, match="part"):
        back.load_(other.tensors())


@pytest.mark.parametrize(
    ("make", "field"),
    [
        (lambda: Block(0), "size"),
        (lambda: Block(-1), "size"),
        (lambda: Block(2.5), "size"),
        (lambda: Block(True), "size"),
        (lambda: Block("4"), "size"),
        (lambda: LowRank(0), "rank"),
        (lambda: LowRank(True), "rank"),
        (lambda: LowRank(2, lower=1), "lower"),
        (lambda: Hierarchical(-1, 2), "k1"),
        (lambda: Hierarchical(2, -1), "k2"),
        (lambda: Hierarchical(1.0, 2), "k1"),
        (lambda: Toeplitz(lower="yes"), "lower"),
    ],
)
def test_validation_names_the_field(make, field):
    with pytest.raises(ValueError, match=rf"\.{field}\b"):
        make()


@pytest.mark.parametrize("kind", KINDS)
@settings(max_examples=40, deadline=None)
@given(data=st.data(), d=st.integers(1, 24))
def test_clip_note(kind, data, d):
    spec = data.draw(SPECS[kind], label="spec")
    clipped = {
        "block": lambda: spec.size > d,
        "lowrank": lambda: spec.rank > d,
        "hierarchical": lambda: spec.k1 + spec.k2 > d,
    }.get(kind, lambda: False)()
    note = spec.clip_note(d)
    assert isinstance(note, str) and bool(note) == clipped, (spec, d, note)


def test_summary_and_registry():
    assert STRUCTURES == {
        "dense": Dense, "diagonal": Diagonal, "block": Block,
        "lowrank": LowRank, "hierarchical": Hierarchical, "toeplitz": Toeplitz,
    }
    assert all(cls.name == name for name, cls in STRUCTURES.items())
    assert Dense().summary() == "dense"
    assert Block(4).summary() == "block(4)"
    assert LowRank(3, lower=False).summary() == "lowrank(3, false)"
    assert Hierarchical(2, 5).summary() == "hierarchical(2, 5)"
    assert Toeplitz().summary() == "toeplitz(true)"
    # Specs are frozen and hashable (a policy can key on them).
    assert Block(4) == Block(4) and hash(Block(4)) == hash(Block(4)) and Block(4) != Block(5)
    with pytest.raises(AttributeError):
        Block(4).size = 5
