"""The one table of benchmark cases: gradient sets, steps and methods.

Both ``fastclip-bench`` and the pytest-benchmark suite in ``benchmarks/`` read this module, so
they always time the same things. A *gradient set* here is only a list of shapes: nothing is
allocated until ``fastclip.bench.gradsets.materialize`` builds it.

Example:
    >>> from fastclip.bench import cases
    >>> spec = cases.GRAD_SETS["gpt2-124m"]
    >>> len(spec.shapes()), spec.numel()
    (148, 124439808)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch

import fastclip
from fastclip.clip_grad import TORCH_CLIP_GRAD_NORM, TORCH_CLIP_GRAD_VALUE, TORCH_GET_TOTAL_NORM

Shape = tuple[int, ...]


# --- gradient sets --------------------------------------------------------------------------


def gpt2_shapes(d_model: int = 768, n_layers: int = 12, vocab: int = 50257, n_ctx: int = 1024) -> list[Shape]:
    """The parameter shapes of a GPT-2 model, in Hugging Face's order (Conv1D weights are in x out).

    The LM head is tied to ``wte``, so it has no tensor of its own.
    """
    d, h = d_model, 4 * d_model
    shapes: list[Shape] = [(vocab, d), (n_ctx, d)]  # wte, wpe
    for _ in range(n_layers):
        shapes += [
            (d,), (d,),                # ln_1 weight, bias
            (d, 3 * d), (3 * d,),      # attn.c_attn weight, bias
            (d, d), (d,),              # attn.c_proj weight, bias
            (d,), (d,),                # ln_2 weight, bias
            (d, h), (h,),              # mlp.c_fc weight, bias
            (h, d), (d,),              # mlp.c_proj weight, bias
        ]
    shapes += [(d,), (d,)]  # ln_f weight, bias
    return shapes


def many_small_shapes(n: int = 2000, low: int = 64, high: int = 65536, seed: int = 0) -> list[Shape]:
    """``n`` 1-D tensors whose sizes are log-uniform in ``[low, high]``, from a fixed seed."""
    rng = np.random.default_rng(seed)
    sizes = np.exp(rng.uniform(math.log(low), math.log(high), size=n))
    return [(int(s),) for s in np.clip(np.rint(sizes), low, high)]


def one_large_shapes(numel: int = 64 << 20) -> list[Shape]:
    """One tensor of 64M (2**26) elements."""
    return [(numel,)]


def lstm_shapes(vocab: int = 32000, embed: int = 512, hidden: int = 1024, n_layers: int = 2) -> list[Shape]:
    """An LSTM language model: embedding, ``nn.LSTM`` layers, and a Linear decoder to the vocab."""
    shapes: list[Shape] = [(vocab, embed)]
    inputs = embed
    for _ in range(n_layers):
        gates = 4 * hidden  # weight_ih, weight_hh, bias_ih, bias_hh as nn.LSTM stores them
        shapes += [(gates, inputs), (gates, hidden), (gates,), (gates,)]
        inputs = hidden
    shapes += [(vocab, hidden), (vocab,)]
    return shapes


def resnet50_shapes(n_classes: int = 1000) -> list[Shape]:
    """torchvision's ``resnet50()`` parameters (convs without bias, BatchNorm weight and bias).

    Bottleneck blocks of widths 64, 128, 256, 512 (expansion 4) repeated 3, 4, 6, 3 times; the
    first block of each stage has a 1x1 downsample conv + BatchNorm.
    """
    def conv(cout: int, cin: int, k: int) -> list[Shape]:
        return [(cout, cin, k, k)]

    def bn(c: int) -> list[Shape]:
        return [(c,), (c,)]

    shapes = conv(64, 3, 7) + bn(64)
    inplanes = 64
    for width, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        out = 4 * width
        for b in range(blocks):
            shapes += conv(width, inplanes, 1) + bn(width)
            shapes += conv(width, width, 3) + bn(width)
            shapes += conv(out, width, 1) + bn(out)
            if b == 0:
                shapes += conv(out, inplanes, 1) + bn(out)
            inplanes = out
    return shapes + [(n_classes, 2048), (n_classes,)]


@dataclass(frozen=True)
class GradSetSpec:
    """A named gradient set.

    Attributes:
        name: the ``--preset`` name.
        description: one line for ``--help`` and the report.
        shapes: builds the list of shapes (cheap; allocates nothing).
        large: needs a GPU, or ``--allow-large`` on the CPU.
        n_tensors, n_values: the counts the shapes must give (checked by ``shapes()``).
    """

    name: str
    description: str
    build: Callable[[], list[Shape]]
    n_tensors: int
    n_values: int
    large: bool = False

    def shapes(self) -> list[Shape]:
        shapes = self.build()
        n_values = sum(math.prod(s) for s in shapes)
        if len(shapes) != self.n_tensors or n_values != self.n_values:
            raise RuntimeError(f"gradient set {self.name!r} has {len(shapes)} tensors and {n_values} values, "
                               f"expected {self.n_tensors} and {self.n_values}")
        return shapes

    def numel(self) -> int:
        return self.n_values


GRAD_SETS: dict[str, GradSetSpec] = {s.name: s for s in [
    GradSetSpec("gpt2-124m", "GPT-2 small: 148 tensors, 124.4M values", gpt2_shapes, 148, 124_439_808),
    GradSetSpec("many-small", "2000 tensors of 64..65536 values, log-uniform (seed 0)", many_small_shapes,
                2000, 18_985_190),
    GradSetSpec("one-large", "one tensor of 64M (2**26) values", one_large_shapes, 1, 1 << 26),
    GradSetSpec("lstm-2x1024", "LSTM LM: embedding 32000x512, 2 LSTM layers of 1024, decoder 1024->32000",
                lstm_shapes, 11, 63_880_448),
    GradSetSpec("resnet50", "torchvision resnet50: 161 tensors, 25.6M values", resnet50_shapes,
                161, 25_557_032),
    GradSetSpec("gpt2-xl", "GPT-2 XL: d=1600, 48 layers, 580 tensors, 1.56B values (GPU, or --allow-large)",
                lambda: gpt2_shapes(d_model=1600, n_layers=48), 580, 1_557_611_200, large=True),
]}

# The four CPU sets of the core issue: the pytest-benchmark suite and the default CPU run.
ISSUE_SETS = ("gpt2-124m", "many-small", "one-large", "lstm-2x1024")
DEFAULT_SETS = {"cpu": ISSUE_SETS, "cuda": tuple(GRAD_SETS)}


# --- steps ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Step:
    """A clipping step uses ``max_norm = factor * norm`` with factor well below 1, a non-clipping
    step one well above, so the coefficient is far from the 1.0 boundary either way."""

    name: str
    factor: float

    def max_norm(self, norm: float) -> float:
        return self.factor * norm


STEPS: dict[str, Step] = {s.name: s for s in [Step("clipping", 0.1), Step("non-clipping", 10.0)]}


@dataclass(frozen=True)
class ValueStep:
    """A ``clip_grad_value_`` step: ``clip_value = factor * max |g|``. A clamping step (factor
    0.1) changes a share of the values that the report states; a non-clamping one (factor 2)
    changes none, so fastclip's pass only reads while torch's still writes every value."""

    name: str
    factor: float

    def clip_value(self, max_abs: float) -> float:
        return self.factor * max_abs


VALUE_STEPS: dict[str, ValueStep] = {s.name: s for s in [ValueStep("clamping", 0.1),
                                                         ValueStep("non-clamping", 2.0)]}
ALL_STEPS = (*STEPS, *VALUE_STEPS)  # display order: clip_grad_norm_'s steps, then clip_grad_value_'s
FUNCTIONS = ("clip_grad_norm_", "clip_grad_value_")
# --step names a kind of step; --function picks whose steps: (function, kind) -> step name.
STEP_OF = {("clip_grad_norm_", "clipping"): "clipping",
           ("clip_grad_norm_", "non-clipping"): "non-clipping",
           ("clip_grad_value_", "clipping"): "clamping",
           ("clip_grad_value_", "non-clipping"): "non-clamping"}


# --- methods --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Method:
    """One implementation under test.

    Attributes:
        name: short id (used in JSON and test ids).
        label: for tables and plots.
        clip: ``clip(parameters, max_norm) -> norm``, a full ``clip_grad_norm_`` step.
        norm: ``norm(grads) -> norm``, the norm pass alone.
        clamp: ``clamp(parameters, clip_value)``, a ``clip_grad_value_`` step.
    """

    name: str
    label: str
    clip: Callable[[list[torch.Tensor], float], torch.Tensor]
    norm: Callable[[list[torch.Tensor]], torch.Tensor]
    clamp: Optional[Callable[[list[torch.Tensor], float], None]] = None


# torch's functions as captured by fastclip at import: the real torch, even under fastclip.patch().
METHODS: dict[str, Method] = {m.name: m for m in [
    Method("fastclip", "fastclip",
           lambda ps, mn: fastclip.clip_grad_norm_(ps, mn),
           lambda gs: fastclip.get_total_norm(gs),
           lambda ps, cv: fastclip.clip_grad_value_(ps, cv)),
    Method("torch-foreach", "torch foreach=True",
           lambda ps, mn: TORCH_CLIP_GRAD_NORM(ps, mn, foreach=True),
           lambda gs: TORCH_GET_TOTAL_NORM(gs, foreach=True),
           lambda ps, cv: TORCH_CLIP_GRAD_VALUE(ps, cv, foreach=True)),
    Method("torch-loop", "torch foreach=False",
           lambda ps, mn: TORCH_CLIP_GRAD_NORM(ps, mn, foreach=False),
           lambda gs: TORCH_GET_TOTAL_NORM(gs, foreach=False),
           lambda ps, cv: TORCH_CLIP_GRAD_VALUE(ps, cv, foreach=False)),
]}
BASELINE = "fastclip"  # the method whose speedup over each torch variant is reported
TORCH_METHODS = ("torch-foreach", "torch-loop")


# --- the case table -------------------------------------------------------------------------

# Yardsticks timed next to the methods, on the same memory (see ``memloops``).
YARDSTICKS = {"read-loop": "read loop", "copy-loop": "copy loop"}
# Norm-pass rows: fastclip's read pass and torch's, to set against the read loop.
NORM_PASS_METHODS = ("fastclip", "torch-foreach")


@dataclass(frozen=True)
class Case:
    """One timed operation on one gradient set.

    ``method`` is a ``METHODS`` key or a ``YARDSTICKS`` key; ``step`` is a ``STEPS`` key for a
    full clipping step, or None for a norm pass (methods) or a yardstick.
    """

    grad_set: str
    method: str
    step: Optional[str] = None  # a STEPS or VALUE_STEPS key

    @property
    def kind(self) -> str:
        if self.method in YARDSTICKS:
            return self.method
        return "step" if self.step is not None else "norm-pass"

    @property
    def id(self) -> str:
        if self.method in YARDSTICKS:
            return f"{self.grad_set}-{self.method}"
        return f"{self.grad_set}-{self.step or 'norm-pass'}-{self.method}"


def set_cases(grad_set: str, steps=tuple(STEPS), methods=tuple(METHODS)) -> list[Case]:
    """Everything timed on one set: yardsticks, norm passes (when a ``clip_grad_norm_`` step is
    timed), then every (step, method). ``steps`` are ``STEPS`` or ``VALUE_STEPS`` keys."""
    norm_passes = any(s in STEPS for s in steps)
    return ([Case(grad_set, y) for y in YARDSTICKS]
            + [Case(grad_set, m) for m in NORM_PASS_METHODS if m in methods and norm_passes]
            + [Case(grad_set, m, s) for s in steps for m in methods])


def all_cases(sets=ISSUE_SETS, steps=tuple(STEPS), methods=tuple(METHODS)) -> list[Case]:
    """``set_cases`` of every set, set-major (one set needs to be in memory at a time)."""
    return [c for g in sets for c in set_cases(g, steps, methods)]
