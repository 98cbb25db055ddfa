"""Exploding gradients, for real: a character-level LSTM with and without fastclip.

Trains the same small LSTM twice on Shakespeare's sonnets (``examples/data/sonnets.txt``), from
the same initial weights and on the same batches, with plain SGD at a learning rate that is too
high for it: once without clipping, once with ``fastclip.clip_grad_norm_``. Without clipping the
rare large gradients throw the weights far off and the loss jumps well above its starting value,
where it stays; with clipping each step is bounded and the loss goes down smoothly.

It prints, for each epoch of each run, the mean loss, the median and maximum gradient norm
(before clipping) and the share of steps that were clipped, then a few characters sampled from
each model, and writes a PNG with two panels (loss, gradient norm), each with both runs.

Usage::

    python examples/train_lstm.py --quick            # < 60 s on a 2-core CPU
    python examples/train_lstm.py --plot lstm.png    # the full run (a few minutes)
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import nn

import fastclip

DATA = Path(__file__).resolve().parent / "data" / "sonnets.txt"


@dataclass
class Config:
    """Everything that determines a run; both runs share it, except ``max_norm``."""

    epochs: int = 40
    lr: float = 40.0
    max_norm: float = 0.25
    hidden: int = 64
    embed: int = 32
    batch_size: int = 16
    seq_len: int = 32
    seed: int = 0
    threads: int = 1
    data: Path = DATA


@dataclass
class EpochStats:
    loss: float          # mean training loss over the epoch's steps
    median_norm: float   # median total grad norm (before clipping)
    max_norm: float      # largest total grad norm (before clipping)
    clipped: float       # share of steps whose grads were scaled down (0 without clipping)


@dataclass
class RunResult:
    """One training run: per-step and per-epoch figures."""

    name: str
    clip: Optional[float]
    step_loss: list[float] = field(default_factory=list)
    step_norm: list[float] = field(default_factory=list)
    epochs: list[EpochStats] = field(default_factory=list)
    diverged_at: Optional[int] = None  # step whose loss was NaN/inf (the run stops there)
    sample: str = ""
    seconds: float = 0.0

    @property
    def initial_loss(self) -> float:
        return self.step_loss[0]

    @property
    def final_loss(self) -> float:
        return self.epochs[-1].loss if self.epochs else math.nan

    def verdict(self) -> str:
        """A one-line judgement: diverged (NaN/inf), blew up (final loss above 1.5x the initial),
        converged (below 0.75x), or did not improve."""
        if self.diverged_at is not None:
            return f"diverged: the loss became non-finite at step {self.diverged_at}"
        ratio = self.final_loss / self.initial_loss
        figures = f"final loss {self.final_loss:.2f}, {ratio:.2f}x the initial {self.initial_loss:.2f}"
        if ratio > 1.5:
            return f"blew up: {figures}"
        return f"converged: {figures}" if ratio < 0.75 else f"did not improve: {figures}"


class CharLSTM(nn.Module):
    """Embedding -> one LSTM layer -> linear read-out over the characters."""

    def __init__(self, vocab: int, embed: int, hidden: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, embed)
        self.lstm = nn.LSTM(embed, hidden, batch_first=True)
        self.head = nn.Linear(hidden, vocab)

    def forward(self, x: torch.Tensor, state=None):
        out, state = self.lstm(self.embed(x), state)
        return self.head(out), state


def load_text(path: Path) -> tuple[torch.Tensor, list[str]]:
    text = Path(path).read_text(encoding="utf-8")
    chars = sorted(set(text))
    index = {c: i for i, c in enumerate(chars)}
    return torch.tensor([index[c] for c in text], dtype=torch.long), chars


def batches(data: torch.Tensor, cfg: Config, gen: torch.Generator):
    """One epoch: the text cut into non-overlapping windows, shuffled, in batches."""
    n_windows = (len(data) - 1) // cfg.seq_len
    order = torch.randperm(n_windows, generator=gen) * cfg.seq_len
    offsets = torch.arange(cfg.seq_len + 1)
    for i in range(0, n_windows - cfg.batch_size + 1, cfg.batch_size):
        rows = data[order[i:i + cfg.batch_size, None] + offsets]
        yield rows[:, :-1], rows[:, 1:]


@torch.no_grad()
def sample(model: CharLSTM, chars: list[str], prompt: str, n: int, gen: torch.Generator) -> str:
    index = {c: i for i, c in enumerate(chars)}
    x = torch.tensor([[index[c] for c in prompt]])
    logits, state = model(x)
    out = []
    for _ in range(n):
        probs = torch.softmax(logits[0, -1].double(), dim=0)
        if not torch.isfinite(probs).all():
            return prompt + "".join(out) + " [the model outputs NaN]"
        nxt = int(torch.multinomial(probs, 1, generator=gen))
        out.append(chars[nxt])
        logits, state = model(torch.tensor([[nxt]]), state)
    return prompt + "".join(out)


def train(cfg: Config, clip: Optional[float], name: str, log=print) -> RunResult:
    """Train one model; ``clip=None`` trains without clipping."""
    data, chars = load_text(cfg.data)
    result = RunResult(name=name, clip=clip)
    start = time.perf_counter()
    with torch.random.fork_rng(devices=[]):  # leave the caller's RNG state alone
        torch.manual_seed(cfg.seed)
        model = CharLSTM(len(chars), cfg.embed, cfg.hidden)
        opt = torch.optim.SGD(model.parameters(), lr=cfg.lr)
        data_gen = torch.Generator().manual_seed(cfg.seed + 1)
        step = 0
        for epoch in range(1, cfg.epochs + 1):
            losses, norms, clipped = [], [], 0
            for x, y in batches(data, cfg, data_gen):
                logits, _ = model(x)
                loss = nn.functional.cross_entropy(logits.reshape(-1, len(chars)), y.reshape(-1))
                opt.zero_grad()
                loss.backward()
                if clip is None:
                    # Same measurement, no clipping: the norm the clipped run would have seen.
                    norm = fastclip.get_total_norm([p.grad for p in model.parameters()])
                else:
                    norm = fastclip.clip_grad_norm_(model.parameters(), max_norm=clip)
                    # fastclip scales exactly when torch would: coefficient below 1.
                    clipped += float(fastclip.clip_grad.clip_coefficient(clip, norm)) < 1.0
                loss_v, norm_v = loss.item(), norm.item()
                result.step_loss.append(loss_v)
                result.step_norm.append(norm_v)
                losses.append(loss_v)
                norms.append(norm_v)
                step += 1
                if not (math.isfinite(loss_v) and math.isfinite(norm_v)):
                    result.diverged_at = step
                    break
                opt.step()
            result.epochs.append(EpochStats(
                loss=statistics.fmean(losses), median_norm=statistics.median(norms),
                max_norm=max(norms), clipped=clipped / len(norms)))
            log(format_epoch(name, epoch, result.epochs[-1], clip))
            if result.diverged_at is not None:
                log(f"{name}: loss is non-finite at step {step}; stopping this run")
                break
        model.eval()
        result.sample = sample(model, chars, "Shall I ", 80, torch.Generator().manual_seed(cfg.seed))
    result.seconds = time.perf_counter() - start
    return result


def format_epoch(name: str, epoch: int, s: EpochStats, clip: Optional[float]) -> str:
    share = f"{100 * s.clipped:6.1f}%" if clip is not None else "      -"
    return (f"{name:<10} {epoch:>5} {s.loss:>9.3f} {s.median_norm:>11.3f} {s.max_norm:>9.2f} {share}")


HEADER = f"{'run':<10} {'epoch':>5} {'loss':>9} {'median |g|':>11} {'max |g|':>9} {'clipped':>7}"


def plot(results: Sequence[RunResult], cfg: Config, path: str) -> bool:
    """Two panels, loss and grad norm per step, both runs in each. False without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FormatStrFormatter, LogLocator, NullFormatter
    except ImportError:
        print("matplotlib is not installed (pip install matplotlib): no plot written", file=sys.stderr)
        return False
    colors = {"no clip": "tab:red", "fastclip": "tab:blue"}
    fig, (ax_loss, ax_norm) = plt.subplots(1, 2, figsize=(12, 4.5))
    for r in results:
        steps = range(1, len(r.step_loss) + 1)
        label = r.name if r.clip is None else f"{r.name} (max_norm={r.clip:g})"
        ax_loss.plot(steps, r.step_loss, lw=0.8, color=colors.get(r.name), label=label)
        ax_norm.plot(steps, r.step_norm, lw=0.8, color=colors.get(r.name), label=label)
        if r.diverged_at is not None:
            ax_loss.axvline(r.diverged_at, color=colors.get(r.name), ls=":", lw=1)
    ax_loss.axhline(results[0].initial_loss, color="gray", ls="--", lw=0.8, label="initial loss")
    ax_loss.set(title="training loss", xlabel="step", ylabel="cross-entropy (nats/char)",
                yscale="log")
    ax_norm.axhline(cfg.max_norm, color="black", ls="--", lw=0.8, label=f"max_norm = {cfg.max_norm:g}")
    ax_norm.set(title="total gradient norm (before clipping)", xlabel="step", ylabel="L2 norm",
                yscale="log")
    for ax in (ax_loss, ax_norm):
        # plain numbers (2, 3, 5, 10, 20, ...) on the log axes, not powers of ten
        ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 3.0, 5.0)))
        ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.legend(loc="upper right", fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle(f"char-LSTM on Shakespeare's sonnets, SGD lr={cfg.lr:g}: "
                 "without clipping vs fastclip.clip_grad_norm_", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def parse_args(argv: Optional[Sequence[str]]) -> tuple[Config, argparse.Namespace]:
    d = Config()
    ap = argparse.ArgumentParser(prog="train_lstm.py", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="8 epochs (about 10 s on 2 cores)")
    ap.add_argument("--epochs", type=int, default=None, help=f"epochs per run (default {d.epochs}; 8 with --quick)")
    ap.add_argument("--lr", type=float, default=d.lr, help="SGD learning rate, for both runs")
    ap.add_argument("--max-norm", type=float, default=d.max_norm, help="clipping threshold")
    ap.add_argument("--hidden", type=int, default=d.hidden)
    ap.add_argument("--batch-size", type=int, default=d.batch_size)
    ap.add_argument("--seq-len", type=int, default=d.seq_len)
    ap.add_argument("--seed", type=int, default=d.seed)
    ap.add_argument("--threads", type=int, default=d.threads,
                    help="torch threads (1: the tiny matmuls gain nothing from more, and results "
                         "then do not depend on the core count)")
    ap.add_argument("--data", type=Path, default=d.data, help="a UTF-8 text file")
    ap.add_argument("--plot", default="lstm_clipping.png", help="PNG to write ('' for none)")
    args = ap.parse_args(argv)
    for name in ("epochs", "hidden", "batch_size", "seq_len", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if not (args.lr > 0 and math.isfinite(args.lr)):
        ap.error(f"--lr must be a positive number, got {args.lr}")
    if not (args.max_norm > 0 and math.isfinite(args.max_norm)):
        ap.error(f"--max-norm must be a positive number, got {args.max_norm}")
    if not args.data.is_file():
        ap.error(f"--data: no such file: {args.data}")
    n_chars = len(args.data.read_text(encoding="utf-8"))
    if (n_chars - 1) // args.seq_len < args.batch_size:
        ap.error(f"--data: {args.data} has {n_chars} characters, fewer than one batch of "
                 f"{args.batch_size} x {args.seq_len} (+1)")
    epochs = args.epochs if args.epochs is not None else (8 if args.quick else d.epochs)
    cfg = Config(epochs=epochs, lr=args.lr, max_norm=args.max_norm, hidden=args.hidden,
                 batch_size=args.batch_size, seq_len=args.seq_len, seed=args.seed,
                 threads=args.threads, data=args.data)
    return cfg, args


def main(argv: Optional[Sequence[str]] = None) -> dict:
    """Run both trainings; returns ``{"config", "unclipped", "clipped", "plot"}``."""
    cfg, args = parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        print(f"char-LSTM (hidden {cfg.hidden}) on {cfg.data.name}, SGD lr={cfg.lr:g}, "
              f"{cfg.epochs} epochs, batch {cfg.batch_size} x {cfg.seq_len} chars, seed {cfg.seed}")
        print(HEADER)
        runs = [train(cfg, None, "no clip"), train(cfg, cfg.max_norm, "fastclip")]
    finally:
        torch.set_num_threads(threads)
    print()
    for r in runs:
        print(f"{r.name:<10} {r.verdict()}  [{r.seconds:.1f} s]")
    for r in runs:
        print(f"{r.name:<10} sample: {r.sample!r}")
    written = bool(args.plot) and plot(runs, cfg, args.plot)
    if written:
        print(f"plot written to {os.path.abspath(args.plot)}")
    return {"config": cfg, "unclipped": runs[0], "clipped": runs[1],
            "plot": args.plot if written else None}


if __name__ == "__main__":
    main()
