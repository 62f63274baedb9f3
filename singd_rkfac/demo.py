"""``singd-rkfac demo``: AdamW, K-FAC and SINGD policies side by side on the digits MLP.

Every optimizer starts from the same initial weights and sees the same
minibatches in the same order, so the differences in the table and the plot
come from the optimizers alone.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from . import KFAC, SINGD, Optimizer, Policy, Skip
from ._table import format_bytes, format_table
from .data import Digits, batch_order, digits_mlp, load_digits
from .optimizer import state_bytes

__all__ = ["run_demo"]

BATCH_SIZE = 64
DEFAULT_STEPS = 200
QUICK_STEPS = 25
PROGRESS_PRINTS = 5
ADAMW_LR = 3e-3
KFAC_LR = 0.1
SINGD_LR = 0.01


@dataclass(frozen=True)
class Contender:
    """One optimizer of the comparison: a label and how to build it for a model."""

    name: str
    build: Callable[[nn.Module], torch.optim.Optimizer]


def contenders() -> list[Contender]:
    """AdamW; K-FAC everywhere with the default `KFAC` settings; a mixed policy; SINGD-diagonal in bf16.

    The mixed policy gives the hidden layers exact-damped K-FAC and leaves the
    head to the AdamW fallback rule. Both K-FAC runs keep the optimizer's
    default KL-style clip (1e-3), without which the default damping diverges
    here during the first ``inverse_every`` steps. SINGD keeps diagonal ``K``,
    ``C`` and their momenta in bf16: optimizer state about half of AdamW's.
    """
    mixed = Policy(default=KFAC(damping_mode="exact"), rules=[("head", Skip())])
    return [
        Contender("AdamW", lambda m: torch.optim.AdamW(m.parameters(), lr=ADAMW_LR)),
        Contender("K-FAC", lambda m: Optimizer(m, Policy(), lr=KFAC_LR)),
        Contender(
            "K-FAC exact + AdamW head",
            lambda m: Optimizer(
                m, mixed, lr=KFAC_LR, fallback="adamw", fallback_options={"lr": ADAMW_LR}
            ),
        ),
        Contender(
            "SINGD diagonal, bf16 state",
            lambda m: Optimizer(
                m, Policy(SINGD(structure="diagonal", dtype=torch.bfloat16)), lr=SINGD_LR, momentum=0.9
            ),
        ),
    ]


class _Progress:
    """Per-step progress: a tqdm bar, or a few plain prints when tqdm is missing."""

    def __init__(self, total: int, label: str) -> None:
        self.total, self.label, self.step = total, label, 0
        try:
            from tqdm.auto import tqdm
        except ImportError:
            self.bar = None
        else:
            self.bar = tqdm(total=total, desc=label, unit="step")

    def update(self, loss: float) -> None:
        """Record one finished step and its minibatch loss."""
        self.step += 1
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.3g}", refresh=False)
            self.bar.update()
        elif self.step % max(1, self.total // PROGRESS_PRINTS) == 0 or self.step == self.total:
            print(f"{self.label}: step {self.step}/{self.total}  loss {loss:.3g}", flush=True)

    def __enter__(self) -> "_Progress":
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.close()


def _evaluate(model: nn.Module, x: Tensor, y: Tensor) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` on ``(x, y)``."""
    with torch.no_grad():
        logits = model(x)
        loss = nn.functional.cross_entropy(logits, y).item()
        accuracy = (logits.argmax(dim=1) == y).float().mean().item()
    return loss, accuracy


def train(contender: Contender, data: Digits, batches: Sequence[Tensor], seed: int) -> dict:
    """Train a freshly seeded digits MLP with ``contender``; return its losses and summary figures."""
    torch.manual_seed(seed)
    model = digits_mlp()
    opt = contender.build(model)
    losses: list[float] = []
    start = time.perf_counter()
    with _Progress(len(batches), contender.name) as progress:
        for index in batches:
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(data.x_train[index]), data.y_train[index])
            loss.backward()
            opt.step()
            losses.append(loss.item())
            progress.update(losses[-1])
    seconds = time.perf_counter() - start
    train_loss, _ = _evaluate(model, data.x_train, data.y_train)
    _, test_accuracy = _evaluate(model, data.x_test, data.y_test)
    return {
        "optimizer": contender.name,
        "losses": losses,
        "train_loss": train_loss,
        "test_accuracy": test_accuracy,
        "seconds": seconds,
        "state_bytes": state_bytes(opt),
    }


def summary_table(rows: list[dict]) -> str:
    """The final comparison as a plain-text table."""
    headers = ["optimizer", "final train loss", "test accuracy", "wall time", "optimizer state"]
    body = [
        [r["optimizer"], f"{r['train_loss']:.3g}", f"{100 * r['test_accuracy']:.1f} %",
         f"{r['seconds']:.2f} s", format_bytes(r["state_bytes"])]
        for r in rows
    ]
    return format_table(headers, body)


def plot_losses(rows: list[dict], path: Path) -> bool:
    """Write training loss vs step for every row to ``path``; ``False`` if matplotlib is missing.

    Draws on a bare ``Figure`` (Agg canvas) rather than through pyplot, so the
    caller's matplotlib backend and open figures are left alone.
    """
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return False
    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots()
    for row in rows:
        ax.plot(range(1, len(row["losses"]) + 1), row["losses"], label=row["optimizer"], linewidth=1.2)
    ax.set(xlabel="step", ylabel="training loss (minibatch)", yscale="log", title="digits MLP 64-128-128-10")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def run_demo(
    steps: int | None = None,
    out_dir: str | Path = "demo_out",
    seed: int = 0,
    quick: bool = False,
    plot: bool = True,
) -> list[dict]:
    """Train the digits MLP with every contender, print the table, write ``loss.png``.

    Args:
        steps: optimizer steps per contender (default: a few epochs, or a few
            seconds' worth with ``quick``).
        out_dir: folder for ``loss.png`` (created if needed).
        seed: seed of the weights and the minibatch order (shared by all contenders).
        quick: a short run, for smoke tests.
        plot: write ``loss.png``.

    Returns:
        One dict per contender: ``optimizer``, ``losses`` (per step),
        ``train_loss``, ``test_accuracy``, ``seconds``, ``state_bytes``.
    """
    steps = (QUICK_STEPS if quick else DEFAULT_STEPS) if steps is None else steps
    if steps < 1:
        raise ValueError(f"steps must be >= 1 (got {steps})")
    data = load_digits(seed=seed)
    batches = batch_order(len(data.y_train), steps, BATCH_SIZE, seed)
    epochs = steps * BATCH_SIZE / len(data.y_train)
    print(f"digits: {len(data.y_train)} train / {len(data.y_test)} test samples; "
          f"{steps} steps of batch {BATCH_SIZE} (~{epochs:.1f} epochs)")
    rows = [train(c, data, batches, seed) for c in contenders()]
    print(summary_table(rows))
    if plot:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        if plot_losses(rows, out / "loss.png"):
            print(f"wrote {out / 'loss.png'}")
        else:
            print("note: matplotlib is not installed (pip install matplotlib); skipped the plot")
    return rows
