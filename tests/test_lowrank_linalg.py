"""Low-rank linear algebra against independent dense oracles (DESIGN §3.1, §3.2).

The code under test (``singd_rkfac.linalg.kron`` / ``.lowrank``) never forms a
``d × d`` matrix; every oracle here does, in float64, from the definitions:

* an `Eigen` ``(s, U, s⊥)`` stands for ``F̃ = U diag(s) Uᵀ + s⊥ (I − U Uᵀ)``
  (``s⊥ = None``: ``U`` square, ``F̃ = U diag(s) Uᵀ``); its damped inverse is
  ``torch.linalg.inv(F̃ + λI)``;
* the exact-damping solve is ``(Ã ⊗ G̃ + λI)⁻¹ vec(∇)`` with the column-major
  ``vec`` (``vec(X)`` stacks columns, ``(A ⊗ G) vec(X) = vec(G X Aᵀ)``), solved
  with ``torch.linalg.solve`` on the explicit ``torch.kron`` matrix;
* sketches and Brand's update are checked against ``torch.linalg.eigh`` of the
  matrix they approximate (or of the explicit EMA sum).

Test matrices are built from a known spectrum and a random orthogonal basis,
so spectral gaps (and therefore how well eigenvectors are determined) are
under control. Randomness comes from seeded ``torch.Generator``s.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from singd_rkfac.linalg import (
    COMPLEMENTS,
    SKETCHES,
    Eigen,
    brand_update,
    corrected,
    damped_inverse_apply,
    exact_damped_solve,
    range_finder,
    robust_decompose,
    sketch_eigen,
    top,
    with_complement,
)

F64 = torch.float64
SEEDS = st.integers(0, 2**32 - 1)


pytestmark = pytest.mark.usefixtures("one_thread")


# -- oracle helpers ---------------------------------------------------------------------
def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def orthonormal(d: int, r: int, gen: torch.Generator, dtype=F64) -> torch.Tensor:
    """``(d, r)`` with orthonormal columns (Q of a Gaussian), ``r ≤ d``."""
    return torch.linalg.qr(torch.randn(d, r, generator=gen, dtype=F64)).Q.to(dtype)


def from_spectrum(values: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """Symmetric ``Q diag(s) Qᵀ`` (symmetrised exactly)."""
    matrix = (basis * values) @ basis.T
    return (matrix + matrix.T) / 2


def dense(eigen: Eigen) -> torch.Tensor:
    """The ``d × d`` matrix an `Eigen` represents: ``U diag(s) Uᵀ + s⊥ (I − U Uᵀ)``."""
    values, vectors, complement = eigen
    matrix = (vectors * values) @ vectors.T
    if complement is not None:
        eye = torch.eye(vectors.shape[0], dtype=vectors.dtype)
        matrix = matrix + complement * (eye - vectors @ vectors.T)
    return matrix


def damped_inverse(matrix: torch.Tensor, damping: float) -> torch.Tensor:
    """``(M + λI)⁻¹`` in float64."""
    eye = torch.eye(matrix.shape[0], dtype=F64)
    return torch.linalg.inv(matrix.double() + damping * eye)


def vec(x: torch.Tensor) -> torch.Tensor:
    """Column-major vectorisation: stack the columns of ``x``."""
    return x.T.reshape(-1)


def unvec(v: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    return v.reshape(cols, rows).T


def spectral(x: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(x.double(), ord=2))


def projector(vectors: torch.Tensor) -> torch.Tensor:
    return vectors.double() @ vectors.double().T


def assert_orthonormal(vectors: torch.Tensor, atol: float) -> None:
    eye = torch.eye(vectors.shape[1], dtype=vectors.dtype)
    torch.testing.assert_close(vectors.T @ vectors, eye, rtol=0, atol=atol)


def gapped_spectrum(d: int, rank: int, zeros: int, gen: torch.Generator) -> torch.Tensor:
    """Ascending eigenvalues in ``[0, d]``, consecutive gaps ≥ 0.5, the smallest ``zeros`` exactly 0.

    Every eigenvalue is simple (apart from the zeros, which stay below the top
    ``rank`` block), so the top-``rank`` subspace is well determined.
    """
    assert zeros <= d - rank
    values = torch.arange(d, dtype=F64) + 0.5 * torch.rand(d, generator=gen, dtype=F64)
    values[:zeros] = 0.0
    return values


# -- 1. damped inverses and the exact-damping solve ----------------------------------------
def random_eigen(d: int, rank: int, complement: str | None, gen: torch.Generator, dtype=F64) -> Eigen:
    """Random orthonormal ``U`` (``d × rank``), ascending values in ``[0, 1]``, via `with_complement`.

    ``complement=None`` asks for the dense, full-rank case (``rank`` is ignored).
    """
    if complement is None:
        rank = d
    values = torch.rand(rank, generator=gen, dtype=F64).sort().values
    vectors = orthonormal(d, rank, gen)
    eigen = with_complement(values.to(dtype), vectors.to(dtype), complement or "min")
    return eigen


@settings(max_examples=60, deadline=None)
@given(
    d=st.integers(1, 12),
    data=st.data(),
    complement=st.sampled_from([None, *COMPLEMENTS]),
    n=st.integers(1, 4),
    damping=st.floats(1e-3, 10.0),
    seed=SEEDS,
)
def test_damped_inverse_apply_matches_dense_inverse(d, data, complement, n, damping, seed):
    """``x (F̃+λI)⁻¹`` and ``(F̃+λI)⁻¹ x`` equal the dense inverse of the matrix the Eigen represents.

    Also checks `with_complement`: ``s⊥ = min(s)`` / ``0``, and ``None`` exactly
    when ``U`` is square.
    """
    gen = generator(seed)
    rank = data.draw(st.integers(1, d))
    eigen = random_eigen(d, rank, complement, gen)
    if eigen.vectors.shape[1] == d:
        assert eigen.complement is None
    elif complement == "min":
        assert float(eigen.complement) == float(eigen.values.min())
    else:
        assert float(eigen.complement) == 0.0
    inverse = damped_inverse(dense(eigen), damping)
    x_right = torch.randn(n, d, generator=gen, dtype=F64)
    x_left = torch.randn(d, n, generator=gen, dtype=F64)
    scale = 1.0 / damping  # ‖(F̃+λI)⁻¹‖ ≤ 1/λ
    torch.testing.assert_close(
        damped_inverse_apply(x_right, eigen, damping, "right"), x_right @ inverse, rtol=1e-10, atol=1e-12 * scale
    )
    torch.testing.assert_close(
        damped_inverse_apply(x_left, eigen, damping, "left"), inverse @ x_left, rtol=1e-10, atol=1e-12 * scale
    )


def test_damped_inverse_apply_with_an_arbitrary_complement():
    """An explicit complement eigenvalue (neither ``min`` nor ``0``, even above ``max(s)``) is honoured."""
    gen = generator(3)
    d, rank = 9, 4
    values = torch.rand(rank, generator=gen, dtype=F64).sort().values
    vectors = orthonormal(d, rank, gen)
    for floor in (0.37, 5.0):
        eigen = Eigen(values, vectors, torch.tensor(floor, dtype=F64))
        x = torch.randn(d, 3, generator=gen, dtype=F64)
        expected = damped_inverse(dense(eigen), 0.1) @ x
        torch.testing.assert_close(damped_inverse_apply(x, eigen, 0.1, "left"), expected, rtol=1e-10, atol=1e-12)


def test_kronecker_vec_convention_of_the_oracle():
    """Sanity of the oracle itself: ``(A ⊗ G) vec(X) = vec(G X Aᵀ)`` with column-major ``vec``."""
    gen = generator(0)
    a, g, x = (torch.randn(*shape, generator=gen, dtype=F64) for shape in [(4, 4), (3, 3), (3, 4)])
    torch.testing.assert_close(torch.kron(a, g) @ vec(x), vec(g @ x @ a.T))
    torch.testing.assert_close(unvec(vec(x), 3, 4), x)


SIDE_KINDS = ["dense", "min", "zero", "explicit"]


def side_eigen(kind: str, d: int, rank: int, gen: torch.Generator) -> Eigen:
    """One Kronecker factor: dense (square U, no complement) or low-rank with some complement.

    ``"explicit"`` uses a random complement eigenvalue and allows ``rank == d``
    (the complement then has an empty range: the degenerate low-rank case).
    """
    if kind == "dense":
        return random_eigen(d, d, None, gen)
    if kind == "explicit":
        values = torch.rand(rank, generator=gen, dtype=F64).sort().values
        return Eigen(values, orthonormal(d, rank, gen), torch.rand((), generator=gen, dtype=F64))
    rank = min(rank, max(d - 1, 1))
    return random_eigen(d, rank, kind, gen)


@settings(max_examples=80, deadline=None)
@given(
    d_g=st.integers(1, 8),
    d_a=st.integers(1, 8),
    kind_g=st.sampled_from(SIDE_KINDS),
    kind_a=st.sampled_from(SIDE_KINDS),
    data=st.data(),
    damping=st.floats(1e-3, 10.0),
    seed=SEEDS,
)
def test_exact_damped_solve_matches_dense_kronecker_solve(d_g, d_a, kind_g, kind_a, data, damping, seed):
    """``exact_damped_solve`` = ``(Ã ⊗ G̃ + λI)⁻¹ vec(∇)`` for every dense / low-rank combination.

    The dense oracle builds ``Ã``, ``G̃`` from the eigens (complement included),
    then ``kron(Ã, G̃) + λI`` and solves for the column-major ``vec(∇)``; the
    result also satisfies ``G̃ X Ã + λ X = ∇``.
    """
    gen = generator(seed)
    eig_g = side_eigen(kind_g, d_g, data.draw(st.integers(1, d_g)), gen)
    eig_a = side_eigen(kind_a, d_a, data.draw(st.integers(1, d_a)), gen)
    grad = torch.randn(d_g, d_a, generator=gen, dtype=F64)
    g_dense, a_dense = dense(eig_g), dense(eig_a)
    system = torch.kron(a_dense, g_dense) + damping * torch.eye(d_g * d_a, dtype=F64)
    expected = unvec(torch.linalg.solve(system, vec(grad)), d_g, d_a)
    got = exact_damped_solve(grad, eig_g, eig_a, damping)
    scale = float(grad.abs().max()) / damping
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-11 * scale)
    torch.testing.assert_close(g_dense @ got @ a_dense + damping * got, grad, rtol=1e-10, atol=1e-10 * scale * (1 + damping))


# -- 2. full-width sketches are exact -----------------------------------------------------------
@settings(max_examples=60, deadline=None)
@given(
    d=st.integers(1, 12),
    data=st.data(),
    kind=st.sampled_from(SKETCHES),
    power_iters=st.integers(0, 2),
    seed=SEEDS,
)
def test_full_width_sketch_is_the_exact_eigendecomposition(d, data, kind, power_iters, seed):
    """With ``rank + oversample ≥ d`` every sketch returns the exact top-``rank`` eigenpairs.

    Spectrum: simple eigenvalues with gaps ≥ 0.5 (possibly some exact zeros
    below the kept block). Values to 1e-10; the projector ``U Uᵀ`` onto the
    top-``rank`` subspace to 1e-9; ``U`` orthonormal; values ascending.
    """
    gen = generator(seed)
    rank = data.draw(st.integers(1, d))
    oversample = data.draw(st.integers(d - rank, d - rank + 3))
    zeros = data.draw(st.integers(0, d - rank))
    spectrum = gapped_spectrum(d, rank, zeros, gen)
    basis = orthonormal(d, d, gen)
    matrix = from_spectrum(spectrum, basis)
    values, vectors = sketch_eigen(matrix, kind, rank, oversample, power_iters, gen)
    assert values.shape == (rank,) and vectors.shape == (d, rank)
    assert bool((values[1:] >= values[:-1]).all()) and bool((values >= 0).all())
    torch.testing.assert_close(values, spectrum[-rank:], rtol=0, atol=1e-10)
    assert_orthonormal(vectors, 1e-10)
    torch.testing.assert_close(projector(vectors), projector(basis[:, -rank:]), rtol=0, atol=1e-9)
    # each kept vector is an eigenvector for its value
    torch.testing.assert_close(matrix @ vectors, vectors * values, rtol=0, atol=1e-9)


@settings(max_examples=30, deadline=None)
@given(d=st.integers(1, 12), data=st.data(), power_iters=st.integers(0, 3), seed=SEEDS)
def test_range_finder_is_orthonormal_and_exact_at_full_width(d, data, power_iters, seed):
    """``range_finder`` returns orthonormal ``(d, width)``; its range holds the top eigenvectors when ``width = d``…

    …and, for a matrix of rank ``k ≤ width``, the whole range of the matrix.
    """
    gen = generator(seed)
    width = data.draw(st.integers(1, d))
    rank = data.draw(st.integers(1, width))
    basis = orthonormal(d, d, gen)
    spectrum = torch.zeros(d, dtype=F64)
    spectrum[-rank:] = 1.0 + torch.rand(rank, generator=gen, dtype=F64)
    matrix = from_spectrum(spectrum, basis)
    q = range_finder(matrix, width, power_iters, gen)
    assert q.shape == (d, width)
    assert_orthonormal(q, 1e-10)
    # range(F) ⊆ range(Q): Q Qᵀ F = F
    torch.testing.assert_close(projector(q) @ matrix, matrix, rtol=0, atol=1e-9)


# -- 3. decaying spectrum: accuracy, monotone damped-inverse error, resolvent bound -------------
DECAY_D = 60
DECAY_DAMPING = 1e-4
RANKS = list(range(1, 25, 3))


@pytest.fixture(scope="module")
def decaying():
    """``F = Q diag(2⁻ⁱ) Qᵀ``, ``i = 0..59``, with a random orthogonal ``Q``; and ``(F+λI)⁻¹``."""
    gen = generator(1234)
    spectrum = 2.0 ** -torch.arange(DECAY_D, dtype=F64)  # descending
    basis = orthonormal(DECAY_D, DECAY_D, gen)
    matrix = from_spectrum(spectrum, basis)
    return matrix, spectrum, damped_inverse(matrix, DECAY_DAMPING)


@pytest.mark.parametrize("complement", COMPLEMENTS)
@pytest.mark.parametrize("kind", SKETCHES)
def test_sketch_on_decaying_spectrum(decaying, kind, complement):
    """Each sketch (oversample 5, two power iterations) on ``s_i = 2⁻ⁱ``, ``d = 60``, ``λ = 1e-4``.

    * the top-``r`` eigenvalues have relative error ≤ 1e-6;
    * ``e(r) = ‖(F̃_r+λI)⁻¹ − (F+λI)⁻¹‖₂`` is non-increasing in ``r`` (slack: 1 %);
    * ``e(r)`` obeys the resolvent bound: from
      ``(F+λI)⁻¹ − (F̃+λI)⁻¹ = (F+λI)⁻¹ (F̃ − F) (F̃+λI)⁻¹``,
      ``e ≤ ‖F − F̃‖₂ / ((λ + λ_min(F)) (λ + λ_min(F̃)))``.
    """
    matrix, spectrum, inverse = decaying
    eye = torch.eye(DECAY_D, dtype=F64)
    errors = []
    for rank in RANKS:
        gen = generator(rank)
        values, vectors = sketch_eigen(matrix, kind, rank, 5, 2, gen)
        relative = (values.flip(0) - spectrum[:rank]).abs() / spectrum[:rank]
        assert float(relative.max()) <= 1e-6, (rank, relative)
        eigen = with_complement(values, vectors, complement)
        approx = dense(eigen)
        error = spectral(damped_inverse_apply(eye, eigen, DECAY_DAMPING, "left") - inverse)
        lam_min = float(torch.linalg.eigvalsh(matrix)[0])
        lam_min_approx = float(torch.linalg.eigvalsh(approx)[0])
        bound = spectral(matrix - approx) / ((DECAY_DAMPING + lam_min) * (DECAY_DAMPING + lam_min_approx))
        assert error <= bound * (1 + 1e-8) + 1e-9, (rank, error, bound)
        errors.append(error)
    for rank, before, after in zip(RANKS[1:], errors, errors[1:]):
        assert after <= 1.01 * before + 1e-9, (rank, before, after)
    assert errors[-1] < 0.1 * errors[0]


@settings(max_examples=60, deadline=None)
@given(
    d=st.integers(2, 12),
    data=st.data(),
    damping=st.floats(1e-2, 1.0),
    seed=SEEDS,
)
def test_exact_truncation_damped_inverse_error_is_sharp(d, data, damping, seed):
    """With exact top-``r`` eigenpairs the damped-inverse error has a closed form.

    ``F`` and ``F̃`` share the eigenbasis of ``F``; kept modes are exact, a
    discarded ``s_i`` (``i > r``, descending order) is replaced by ``s⊥``, so
    ``(F̃+λI)⁻¹ − (F+λI)⁻¹`` is diagonal there with entries
    ``1/(s⊥+λ) − 1/(s_i+λ)``:

    * ``s⊥ = 0``:  ``e = max_{i>r} (1/λ − 1/(s_i+λ)) = max_{i>r} s_i/(λ(s_i+λ)) = s_{r+1}/(λ(s_{r+1}+λ))``
      (``x/(λ(x+λ))`` increases in ``x``: the largest discarded value decides);
    * ``s⊥ = s_r`` (smallest kept):  ``e = max_{i>r} (1/(s_i+λ) − 1/(s_r+λ)) = 1/(s_d+λ) − 1/(s_r+λ)``
      (every ``s_i ≤ s_r``: the smallest eigenvalue of ``F`` decides).

    Also for ``d = 60``, ``s_i = 2⁻ⁱ`` at every ``r`` (the fixture below).
    """
    gen = generator(seed)
    rank = data.draw(st.integers(1, d - 1))
    spectrum = torch.rand(d, generator=gen, dtype=F64).sort().values  # ascending
    matrix = from_spectrum(spectrum, orthonormal(d, d, gen))
    check_sharp_errors(matrix, rank, damping, atol=1e-9)


def check_sharp_errors(matrix: torch.Tensor, rank: int, damping: float, atol: float) -> None:
    d = matrix.shape[0]
    all_values, all_vectors = torch.linalg.eigh(matrix)
    values, vectors = top(all_values, all_vectors, rank)
    descending = all_values.flip(0)
    kept_min, largest_discarded, smallest = descending[rank - 1], descending[rank], descending[-1]
    expected = {
        "zero": float(largest_discarded / (damping * (largest_discarded + damping))),
        "min": float(1 / (smallest + damping) - 1 / (kept_min + damping)),
    }
    inverse = damped_inverse(matrix, damping)
    eye = torch.eye(d, dtype=F64)
    for complement in COMPLEMENTS:
        eigen = with_complement(values, vectors, complement)
        error = spectral(damped_inverse_apply(eye, eigen, damping, "left") - inverse)
        assert math.isclose(error, expected[complement], rel_tol=1e-8, abs_tol=atol), (complement, error, expected)


def test_exact_truncation_sharp_formula_on_decaying_spectrum(decaying):
    """The closed forms of the previous test on ``s_i = 2⁻ⁱ``, ``d = 60``, ``λ = 1e-4``, every ``r < d``."""
    matrix, _, _ = decaying
    for rank in range(1, DECAY_D):
        check_sharp_errors(matrix, rank, DECAY_DAMPING, atol=1e-7)


# -- 4. Nyström never over-estimates --------------------------------------------------------------
@settings(max_examples=40, deadline=None)
@given(
    d=st.integers(2, 20),
    data=st.data(),
    power_iters=st.integers(0, 2),
    seed=SEEDS,
)
def test_nystrom_is_psd_and_below_the_matrix(d, data, power_iters, seed):
    """``F̃_nys = U diag(s) Uᵀ`` is PSD and ``F − F̃_nys ⪰ 0`` up to rounding (Loewner order).

    Matrices: random spectra, including rank-deficient ones (some exact zeros)
    and ones with fewer nonzero modes than the sketch width.
    """
    gen = generator(seed)
    rank = data.draw(st.integers(1, d))
    oversample = data.draw(st.integers(0, 4))
    nonzero = data.draw(st.integers(1, d))
    spectrum = torch.zeros(d, dtype=F64)
    spectrum[-nonzero:] = torch.rand(nonzero, generator=gen, dtype=F64) ** 3
    matrix = from_spectrum(spectrum, orthonormal(d, d, gen))
    values, vectors = sketch_eigen(matrix, "nystrom", rank, oversample, power_iters, gen)
    assert bool((values >= 0).all())
    assert_orthonormal(vectors, 1e-10)
    approx = (vectors * values) @ vectors.T
    scale = float(spectrum.max())
    assert float(torch.linalg.eigvalsh(approx)[0]) >= -1e-12 * scale
    assert float(torch.linalg.eigvalsh(matrix - approx)[0]) >= -1e-11 * scale


# -- 5. Brand's online update ---------------------------------------------------------------------
def low_rank_state(d: int, k: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact ``F0 = U diag(s) Uᵀ`` with ``k`` orthonormal columns and ascending ``s ≥ 0``."""
    values = torch.rand(k, generator=gen, dtype=F64).sort().values
    return values, orthonormal(d, k, gen)


def check_brand(values, vectors, expected, atol=1e-10):
    """Ascending, non-negative values; ``U diag(s) Uᵀ`` reconstructs ``expected``; ``U`` orthonormal."""
    assert bool((values[1:] >= values[:-1]).all()) and bool((values >= 0).all())
    scale = max(1.0, float(expected.abs().max()))
    torch.testing.assert_close((vectors * values) @ vectors.T, expected, rtol=0, atol=atol * scale)
    assert_orthonormal(vectors, 1e-10)


@settings(max_examples=60, deadline=None)
@given(d=st.integers(1, 12), data=st.data(), decay=st.floats(0.0, 1.0), seed=SEEDS)
def test_brand_update_equals_explicit_ema(d, data, decay, seed):
    """``brand_update`` returns the eigendecomposition of ``ρ F0 + X Xᵀ`` (size ``k+m``, no truncation).

    Generic (full column rank) ``X``, ``k + m ≤ d``, ``m = 1`` included: the
    reconstruction to 1e-10, ``U'`` orthonormal, values ascending, ≥ 0, and
    equal to the top ``k+m`` eigenvalues of the explicit matrix (its rank).
    """
    gen = generator(seed)
    k = data.draw(st.integers(0, d - 1))
    m = data.draw(st.integers(1, d - k))
    values, vectors = low_rank_state(d, k, gen)
    rows = torch.randn(d, m, generator=gen, dtype=F64)
    expected = decay * from_spectrum(values, vectors) + rows @ rows.T
    new_values, new_vectors = brand_update(values, vectors, rows, decay)
    assert new_values.shape == (k + m,) and new_vectors.shape == (d, k + m)
    check_brand(new_values, new_vectors, expected)
    torch.testing.assert_close(new_values, torch.linalg.eigvalsh(expected)[-(k + m):], rtol=0, atol=1e-10)


@settings(max_examples=30, deadline=None)
@given(d=st.integers(2, 12), data=st.data(), seed=SEEDS)
def test_brand_update_rows_in_the_span_of_the_state_reconstruct(d, data, seed):
    """Rows inside ``span(U)`` (``P = X − U Uᵀ X ≈ 0``): ``U' diag(s') U'ᵀ = ρ F0 + X Xᵀ``, ``U'`` orthonormal."""
    gen = generator(seed)
    k = data.draw(st.integers(1, d - 1))
    m = data.draw(st.integers(1, d - k))
    values, vectors = low_rank_state(d, k, gen)
    rows = vectors @ torch.randn(k, m, generator=gen, dtype=F64)
    expected = 0.9 * from_spectrum(values, vectors) + rows @ rows.T
    check_brand(*brand_update(values, vectors, rows, 0.9), expected)


def deficient_rows(kind: str, d: int, k: int, m: int, gen: torch.Generator, vectors: torch.Tensor) -> torch.Tensor:
    """``(d, m)`` rows whose part outside ``span(U)`` is rank-deficient.

    ``"duplicate"``: columns are multiples of one column; ``"span"``: columns in
    ``span(U)``; ``"zero"``: a generic column followed by all-zero columns
    (an all-zero sample, e.g. a zero input or a dead unit's patch).
    """
    if kind == "duplicate":
        column = torch.randn(d, 1, generator=gen, dtype=F64)
        return column * torch.arange(1, m + 1, dtype=F64)
    if kind == "span":
        return vectors @ torch.randn(k, m, generator=gen, dtype=F64)
    rows = torch.zeros(d, m, dtype=F64)
    rows[:, 0] = torch.randn(d, generator=gen, dtype=F64)
    return rows


#: (kind, d, k, m, seed) — rank-deficient rows on a nonempty state (a plain QR of the
#: residual would complete its basis with columns that are not orthogonal to U).
RANK_DEFICIENT_CASES = [
    ("duplicate", 8, 3, 2, 0), ("duplicate", 8, 3, 3, 1), ("duplicate", 12, 5, 4, 2), ("duplicate", 6, 1, 2, 3),
    ("span", 3, 1, 1, 0), ("span", 4, 2, 1, 2), ("span", 5, 1, 2, 1),
    ("zero", 8, 3, 2, 0), ("zero", 6, 2, 3, 1),
]


@pytest.mark.parametrize("kind,d,k,m,seed", RANK_DEFICIENT_CASES)
def test_brand_update_rank_deficient_rows_reconstruct(kind, d, k, m, seed):
    """Rank-deficient new rows: ``U' diag(s') U'ᵀ = ρ F0 + X Xᵀ`` still holds, values ascending, ≥ 0."""
    gen = generator(seed)
    values, vectors = low_rank_state(d, k, gen)
    rows = deficient_rows(kind, d, k, m, gen, vectors)
    expected = 0.9 * from_spectrum(values, vectors) + rows @ rows.T
    check_brand(*brand_update(values, vectors, rows, 0.9), expected)




@pytest.mark.parametrize("kind,d,k,m,seed", RANK_DEFICIENT_CASES)
def test_brand_update_rank_deficient_rows_stay_orthonormal(kind, d, k, m, seed):
    """Rank-deficient new rows on a nonempty state: ``U'`` stays orthonormal (the residual basis is rank-revealing)."""
    gen = generator(seed)
    values, vectors = low_rank_state(d, k, gen)
    _, new_vectors = brand_update(values, vectors, deficient_rows(kind, d, k, m, gen, vectors), 0.9)
    assert_orthonormal(new_vectors, 1e-10)


def test_brand_update_after_a_zero_sample_gives_eigenvalues():
    """``d = 8``, ``k = 3`` state, a batch ``[x, 0]`` then a generic batch ``Y`` (``m = 2``), ``ρ = 0.9``:
    the values after the second update must be the top eigenvalues of the explicit EMA."""
    gen = generator(0)
    d, k = 8, 3
    values, vectors = low_rank_state(d, k, gen)
    rows = deficient_rows("zero", d, k, 2, gen, vectors)
    ema = 0.9 * from_spectrum(values, vectors) + rows @ rows.T
    values, vectors = brand_update(values, vectors, rows, 0.9)
    more = torch.randn(d, 2, generator=gen, dtype=F64)
    ema = 0.9 * ema + more @ more.T
    values, vectors = brand_update(values, vectors, more, 0.9)
    torch.testing.assert_close(values, torch.linalg.eigvalsh(ema)[-values.shape[0]:], rtol=0, atol=1e-10)


def run_sequential(d: int, batches: list[torch.Tensor], decay: float):
    values, vectors = torch.zeros(0, dtype=F64), torch.zeros(d, 0, dtype=F64)
    ema = torch.zeros(d, d, dtype=F64)
    for rows in batches:
        values, vectors = brand_update(values, vectors, rows, decay)
        ema = decay * ema + rows @ rows.T
    return values, vectors, ema


@pytest.mark.parametrize("decay", [0.95, 0.5, 1.0])
def test_brand_sequential_from_empty_equals_ema(decay):
    """Updates from the empty state (``(0,)``, ``(d, 0)``) over batches of generic rows (``m = 1, 2, 3``).

    After each batch the state reconstructs the explicit EMA ``Σ ρ^{T−t} X_t X_tᵀ``,
    stays orthonormal, and its values are the EMA's top eigenvalues.
    """
    d, gen = 12, generator(7)
    batches = [torch.randn(d, m, generator=gen, dtype=F64) for m in (1, 2, 3, 1, 2)]
    values, vectors = torch.zeros(0, dtype=F64), torch.zeros(d, 0, dtype=F64)
    ema = torch.zeros(d, d, dtype=F64)
    for rows in batches:
        values, vectors = brand_update(values, vectors, rows, decay)
        ema = decay * ema + rows @ rows.T
        check_brand(values, vectors, ema)
        torch.testing.assert_close(values, torch.linalg.eigvalsh(ema)[-values.shape[0]:], rtol=0, atol=1e-10)
    assert values.shape == (9,)


def test_brand_sequential_rank_deficient_batches_reconstruct():
    """From empty, batches with duplicate columns: the reconstruction is still the EMA."""
    d, gen = 10, generator(0)
    batches = [torch.cat([x, x, torch.randn(d, 1, generator=gen, dtype=F64)], 1)
               for x in (torch.randn(d, 1, generator=gen, dtype=F64) for _ in range(3))]
    values, vectors, ema = run_sequential(d, batches, 0.8)
    check_brand(values, vectors, ema)


def test_brand_sequential_rank_deficient_batches_give_eigenvalues():
    """From empty, three batches ``[x, x, y]`` (``d = 10``, ``ρ = 0.8``): the values must be the EMA's eigenvalues."""
    d, gen = 10, generator(0)
    batches = [torch.cat([x, x, torch.randn(d, 1, generator=gen, dtype=F64)], 1)
               for x in (torch.randn(d, 1, generator=gen, dtype=F64) for _ in range(3))]
    values, _, ema = run_sequential(d, batches, 0.8)
    torch.testing.assert_close(values, torch.linalg.eigvalsh(ema)[-values.shape[0]:], rtol=0, atol=1e-10)


# -- 6. B-KFAC-c correction -----------------------------------------------------------------------
@settings(max_examples=40, deadline=None)
@given(d=st.integers(2, 12), data=st.data(), fraction=st.floats(0.05, 1.0), seed=SEEDS)
def test_corrected_rotates_a_subset_inside_the_span(d, data, fraction, seed):
    """``corrected`` on arbitrary ``U`` (orthonormal) with sentinel (negative) values.

    * ``U'`` orthonormal, ``span(U') = span(U)`` (same projector), values ascending;
    * columns not chosen are returned unchanged with their value (sentinels identify them);
    * the chosen ones (value ≥ 0 now) span what the replaced columns spanned and are
      Ritz pairs there: ``U_Sᵀ F U_S = diag(σ)``;
    * between 1 and ``r`` columns are chosen, about ``fraction · r`` (within one).
    """
    gen = generator(seed)
    rank = data.draw(st.integers(1, d))
    matrix = from_spectrum(torch.rand(d, generator=gen, dtype=F64), orthonormal(d, d, gen))
    vectors = orthonormal(d, rank, gen)
    sentinels = -1.0 - torch.arange(rank, dtype=F64).flip(0)  # ascending, all < 0
    values, new_vectors = corrected(sentinels, vectors, matrix, fraction, gen)
    assert bool((values[1:] >= values[:-1]).all())
    assert_orthonormal(new_vectors, 1e-10)
    torch.testing.assert_close(projector(new_vectors), projector(vectors), rtol=0, atol=1e-10)
    chosen = values >= 0
    count = int(chosen.sum())
    assert 1 <= count <= rank and abs(count - fraction * rank) <= 1
    untouched = set()
    for value, column in zip(values[~chosen], new_vectors[:, ~chosen].T):
        index = rank + int(round(float(value)))  # sentinel of column i is −(rank − i)
        assert torch.equal(column, vectors[:, index])
        untouched.add(index)
    replaced = [i for i in range(rank) if i not in untouched]
    subset = new_vectors[:, chosen]
    torch.testing.assert_close(projector(subset), projector(vectors[:, replaced]), rtol=0, atol=1e-10)
    torch.testing.assert_close(subset.T @ matrix @ subset, torch.diag(values[chosen]), rtol=0, atol=1e-10)


@settings(max_examples=40, deadline=None)
@given(d=st.integers(1, 12), data=st.data(), seed=SEEDS)
def test_corrected_on_the_exact_span_recovers_the_eigenpairs(d, data, seed):
    """``U`` = exact top-``r`` eigenvectors times a random ``r × r`` rotation, values wrong:
    ``fraction = 1`` gives the exact top-``r`` eigenvalues and eigenvectors (simple spectrum)."""
    gen = generator(seed)
    rank = data.draw(st.integers(1, d))
    spectrum = gapped_spectrum(d, rank, 0, gen)
    basis = orthonormal(d, d, gen)
    matrix = from_spectrum(spectrum, basis)
    rotated = basis[:, -rank:] @ orthonormal(rank, rank, gen)
    wrong = torch.rand(rank, generator=gen, dtype=F64).sort().values * 100
    values, vectors = corrected(wrong, rotated, matrix, 1.0, gen)
    torch.testing.assert_close(values, spectrum[-rank:], rtol=0, atol=1e-10)
    assert_orthonormal(vectors, 1e-10)
    # eigenvectors up to sign: |⟨u'_i, q_i⟩| = 1
    overlap = (vectors * basis[:, -rank:]).sum(0).abs()
    torch.testing.assert_close(overlap, torch.ones(rank, dtype=F64), rtol=0, atol=1e-9)


@pytest.mark.parametrize(
    "rank,fraction",
    [
        (10, 0.2),
        (5, 1.0),
        (4, 0.5),
        (1, 0.2),
        (3, 0.01),
        (7, 0.2),
        (5, 0.5),
    ],
)
def test_corrected_refreshes_ceil_fraction_columns(rank, fraction):
    """The number of refreshed columns is ``⌈fraction · r⌉`` as the docstring says (at least 1)."""
    gen = generator(0)
    d = 12
    matrix = from_spectrum(torch.rand(d, generator=gen, dtype=F64) + 0.1, orthonormal(d, d, gen))
    sentinels = -1.0 - torch.arange(rank, dtype=F64).flip(0)
    values, _ = corrected(sentinels, orthonormal(d, rank, gen), matrix, fraction, gen)
    assert int((values >= 0).sum()) == max(1, math.ceil(fraction * rank))


# -- top ----------------------------------------------------------------------------------------------
@settings(max_examples=20, deadline=None)
@given(d=st.integers(1, 10), data=st.data(), seed=SEEDS)
def test_top_keeps_the_largest_pairs(d, data, seed):
    """``top`` of ascending eigh output = the ``rank`` largest pairs, still ascending."""
    gen = generator(seed)
    rank = data.draw(st.integers(1, d))
    matrix = from_spectrum(torch.rand(d, generator=gen, dtype=F64), orthonormal(d, d, gen))
    values, vectors = torch.linalg.eigh(matrix)
    kept_values, kept_vectors = top(values, vectors, rank)
    assert kept_values.shape == (rank,) and kept_vectors.shape == (d, rank)
    torch.testing.assert_close(kept_values, values.sort().values[-rank:], rtol=0, atol=0)
    torch.testing.assert_close(matrix @ kept_vectors, kept_vectors * kept_values, rtol=0, atol=1e-12)


# -- 7. reproducibility ------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", SKETCHES)
def test_sketches_are_reproducible_from_the_generator(kind):
    """Same generator state → bitwise identical sketches (and range finders, corrections);
    different seeds → different test matrices Ω, but the same full-width answer."""
    gen = generator(5)
    d, rank = 20, 4
    spectrum = gapped_spectrum(d, rank, 0, gen)
    matrix = from_spectrum(spectrum, orthonormal(d, d, gen))

    first = sketch_eigen(matrix, kind, rank, 3, 1, generator(11))
    again = sketch_eigen(matrix, kind, rank, 3, 1, generator(11))
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    state = generator(11).get_state()
    gen = torch.Generator()
    gen.set_state(state)
    restored = sketch_eigen(matrix, kind, rank, 3, 1, gen)
    assert all(torch.equal(a, b) for a, b in zip(first, restored))

    assert torch.equal(range_finder(matrix, 7, 1, generator(3)), range_finder(matrix, 7, 1, generator(3)))
    assert not torch.allclose(range_finder(matrix, 7, 0, generator(3)), range_finder(matrix, 7, 0, generator(4)))
    values, vectors = torch.linalg.eigh(matrix)
    args = (values[-6:], vectors[:, -6:] @ orthonormal(6, 6, generator(1)), matrix, 0.5)
    c1, c2 = corrected(*args, generator(9)), corrected(*args, generator(9))
    assert all(torch.equal(a, b) for a, b in zip(c1, c2))

    full = [sketch_eigen(matrix, kind, rank, d - rank, 1, generator(seed)) for seed in (21, 22)]
    torch.testing.assert_close(full[0][0], full[1][0], rtol=0, atol=1e-10)
    torch.testing.assert_close(projector(full[0][1]), projector(full[1][1]), rtol=0, atol=1e-10)
    torch.testing.assert_close(full[0][0], spectrum[-rank:], rtol=0, atol=1e-10)


# -- 8. float32 -----------------------------------------------------------------------------------------
F32 = torch.float32


def close32(got: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-4) -> None:
    """float32 result vs float64 oracle: ``|got − expected| ≤ rtol · max|expected|``."""
    assert got.dtype == F32
    scale = float(expected.abs().max()) if expected.numel() else 1.0
    torch.testing.assert_close(got.double(), expected.double(), rtol=0, atol=rtol * max(scale, 1e-30))


@pytest.mark.parametrize("seed", [0, 1])
def test_float32_damped_inverse_and_exact_solve(seed):
    """float32 eigens: `with_complement`, `damped_inverse_apply` (both sides), `exact_damped_solve`
    return float32 and agree with the float64 dense oracle to 1e-4 relative."""
    gen = generator(seed)
    damping = 0.1
    eig_g = random_eigen(7, 3, "min", gen, F32)
    eig_a = random_eigen(5, 2, "zero", gen, F32)
    eig_a_dense = random_eigen(5, 5, None, gen, F32)
    assert eig_g.complement.dtype == F32 and eig_a.complement.dtype == F32
    eig_g64 = Eigen(*(t.double() if t is not None else None for t in eig_g))
    x = torch.randn(4, 7, generator=gen, dtype=F32)
    inverse = damped_inverse(dense(eig_g64), damping)
    close32(damped_inverse_apply(x, eig_g, damping, "right"), x.double() @ inverse)
    close32(damped_inverse_apply(x.T, eig_g, damping, "left"), inverse @ x.T.double())
    grad = torch.randn(7, 5, generator=gen, dtype=F32)
    for eig_a_side in (eig_a, eig_a_dense):
        a64 = dense(Eigen(*(t.double() if t is not None else None for t in eig_a_side)))
        system = torch.kron(a64, dense(eig_g64)) + damping * torch.eye(35, dtype=F64)
        expected = unvec(torch.linalg.solve(system, vec(grad.double())), 7, 5)
        close32(exact_damped_solve(grad, eig_g, eig_a_side, damping), expected)


@pytest.mark.parametrize("kind", SKETCHES)
def test_float32_sketches(kind):
    """float32 sketches (full width and decaying spectrum) and `range_finder` return float32 and
    match float64 ``eigh`` to 1e-4 relative (values) / 1e-3 (projectors)."""
    gen = generator(2)
    d, rank = 16, 4
    spectrum = gapped_spectrum(d, rank, 0, gen)
    matrix = from_spectrum(spectrum, orthonormal(d, d, gen))
    q = range_finder(matrix.float(), 6, 1, gen)
    assert q.dtype == F32
    assert_orthonormal(q, 1e-5)
    values, vectors = sketch_eigen(matrix.float(), kind, rank, d - rank, 1, gen)
    assert vectors.dtype == F32
    close32(values, spectrum[-rank:])
    close32(projector(vectors).float(), projector(torch.linalg.eigh(matrix)[1][:, -rank:]), rtol=1e-3)

    decaying_spectrum = 2.0 ** -torch.arange(40, dtype=F64)
    decaying_matrix = from_spectrum(decaying_spectrum, orthonormal(40, 40, gen))
    values, vectors = sketch_eigen(decaying_matrix.float(), kind, 6, 5, 2, gen)
    assert values.dtype == F32 and vectors.dtype == F32
    relative = (values.double().flip(0) - decaying_spectrum[:6]).abs() / decaying_spectrum[:6]
    assert float(relative.max()) <= 1e-3


def test_float32_brand_update_corrected_and_top():
    """float32 `brand_update` (reconstruction, orthonormality), `corrected` (Ritz values on the exact
    span) and `top` return float32 and agree with the float64 oracle to 1e-4 relative."""
    gen = generator(4)
    d = 10
    values, vectors = low_rank_state(d, 3, gen)
    rows = torch.randn(d, 4, generator=gen, dtype=F64)
    new_values, new_vectors = brand_update(values.float(), vectors.float(), rows.float(), 0.9)
    assert new_values.dtype == F32 and new_vectors.dtype == F32
    expected = 0.9 * from_spectrum(values, vectors) + rows @ rows.T
    close32((new_vectors * new_values) @ new_vectors.T, expected)
    assert_orthonormal(new_vectors, 1e-5)
    close32(new_values, torch.linalg.eigvalsh(expected)[-7:])

    spectrum = gapped_spectrum(d, 4, 0, gen)
    basis = orthonormal(d, d, gen)
    matrix = from_spectrum(spectrum, basis)
    rotated = basis[:, -4:] @ orthonormal(4, 4, gen)
    fixed_values, fixed_vectors = corrected(torch.ones(4, dtype=F32), rotated.float(), matrix.float(), 1.0, gen)
    assert fixed_vectors.dtype == F32
    close32(fixed_values, spectrum[-4:])
    assert_orthonormal(fixed_vectors, 1e-5)

    kept_values, kept_vectors = top(fixed_values, fixed_vectors, 2)
    assert kept_values.dtype == F32 and kept_vectors.dtype == F32
    close32(kept_values, spectrum[-2:])


def test_float32_robust_decompose_with_sketches():
    """`robust_decompose` around a sketch: a float32 success comes back unchanged (float32);
    a float32 failure is retried in float64 and returned as float32; non-finite input gives ``None``."""
    gen = generator(6)
    d, rank = 12, 3
    spectrum = gapped_spectrum(d, rank, 0, gen)
    matrix = from_spectrum(spectrum, orthonormal(d, d, gen)).float()

    direct = sketch_eigen(matrix, "nystrom", rank, d - rank, 1, generator(1))
    fresh = generator(1)
    wrapped = robust_decompose(lambda m: sketch_eigen(m, "nystrom", rank, d - rank, 1, fresh), matrix)
    assert all(torch.equal(a, b) for a, b in zip(direct, wrapped))

    def only_in_float64(m):
        if m.dtype != F64:
            raise torch.linalg.LinAlgError("simulated float32 failure")
        return sketch_eigen(m, "sre", rank, d - rank, 1, generator(2))

    values, vectors = robust_decompose(only_in_float64, matrix)
    assert values.dtype == F32 and vectors.dtype == F32
    close32(values, spectrum[-rank:])

    broken = matrix.clone()
    broken[0, 0] = float("nan")
    assert robust_decompose(lambda m: sketch_eigen(m, "rsvd", rank, 2, 1, generator(3)), broken) is None
