"""``fastclip-bench``: time fastclip against torch's clip_grad_norm_ (and clip_grad_value_) on
model-sized gradient sets.

Exit status: 0 when every norm agrees with the exact reference (and every clip_grad_value_ step
leaves torch's clamped values), 1 when one does not, 2 for bad arguments (one line on stderr, no
traceback).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Callable, Optional, Sequence

import torch

from fastclip.bench import cases as C

DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16,
          "bfloat16": torch.bfloat16}
DEFAULT_REPEAT = 5
DEFAULT_WARMUP = 1


class UsageError(Exception):
    """A bad argument: reported as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse would print the whole usage block first
        raise UsageError(message)


def _count(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {value}")
        return value
    return parse


def build_parser() -> argparse.ArgumentParser:
    sets = "\n".join(f"  {s.name:<12} {s.description}" for s in C.GRAD_SETS.values())
    p = _Parser(
        prog="fastclip-bench",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Time fastclip.clip_grad_norm_ against torch.nn.utils.clip_grad_norm_ "
                    "(foreach=True and foreach=False) on gradient sets the size of real models; "
                    "--function clip_grad_value_ times clip_grad_value_ the same way.",
        epilog=f"gradient sets (--preset):\n{sets}\n\nWith no --preset and no --model: "
               f"{', '.join(C.DEFAULT_SETS['cpu'])} on the CPU; every preset on CUDA.")
    p.add_argument("--preset", nargs="+", metavar="NAME", choices=[*C.GRAD_SETS, "all"],
                   help="gradient sets to time ('all' = every preset the device allows)")
    p.add_argument("--model", metavar="PKG.MODULE:FACTORY",
                   help="time your own model: FACTORY() must return an nn.Module; its grads get seeded "
                        "random values")
    p.add_argument("--dtype", choices=list(DTYPES), default="float32", help="grad dtype (default float32)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where the grads live (default cpu)")
    p.add_argument("--function", choices=[*C.FUNCTIONS, "both"], default="clip_grad_norm_",
                   help="the function to time (default clip_grad_norm_)")
    p.add_argument("--step", choices=["clipping", "non-clipping", "both"], default="both",
                   help="a clipping step (max_norm = 0.1 x norm; for clip_grad_value_, clip_value = "
                        "0.1 x max |g|), a non-clipping one (10 x norm; 2 x max |g|), or both")
    p.add_argument("--repeat", type=_count(1), default=DEFAULT_REPEAT, metavar="N",
                   help=f"timed calls per operation; the median is reported (default {DEFAULT_REPEAT})")
    p.add_argument("--warmup", type=_count(0), default=DEFAULT_WARMUP, metavar="N",
                   help=f"untimed calls first (default {DEFAULT_WARMUP})")
    p.add_argument("--json", metavar="PATH", help="write every figure to PATH as JSON")
    p.add_argument("--plot", metavar="PATH", help="write a PNG bar chart of the speedups (needs matplotlib)")
    p.add_argument("--allow-large", action="store_true",
                   help="allow gpt2-xl on the CPU (about 12.5 GB of memory in float32)")
    p.add_argument("--seed", type=_count(0), default=0, metavar="N", help="seed of the grads' values (default 0)")
    p.add_argument("--cold-start-runs", type=_count(0), default=3, metavar="N",
                   help="fresh processes timing import + first clip; 0 skips it (default 3)")
    p.add_argument("--no-cold-start", action="store_true", help="skip the cold-start measurement")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def load_factory(spec: str) -> Callable[[], torch.nn.Module]:
    """Resolve ``package.module:factory`` (the factory may be a dotted attribute path)."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise UsageError(f"--model {spec!r}: expected PACKAGE.MODULE:FACTORY, e.g. mypkg.models:build")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())  # as `python -m` does, so a module in the cwd imports
    try:
        obj = importlib.import_module(module_name)
    except Exception as e:  # ImportError, or anything the module raises while importing
        raise UsageError(f"--model {spec!r}: cannot import module {module_name!r} ({_one_line(e)})") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise UsageError(f"--model {spec!r}: module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise UsageError(f"--model {spec!r}: {attr!r} is a {type(obj).__name__}, not a callable factory")
    return obj


def build_model(spec: str) -> torch.nn.Module:
    factory = load_factory(spec)
    try:
        model = factory()
    except Exception as e:
        raise UsageError(f"--model {spec!r}: calling the factory raised {_one_line(e)}") from None
    if not isinstance(model, torch.nn.Module):
        raise UsageError(f"--model {spec!r}: the factory returned a {type(model).__name__}, not a torch.nn.Module")
    if not any(p.requires_grad for p in model.parameters()):
        raise UsageError(f"--model {spec!r}: the model has no trainable parameters")
    return model


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def _check_path(option: str, path: Optional[str]) -> None:
    """Refuse, before the run, a path the results could not be written to at its end."""
    if path is None:
        return
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise UsageError(f"{option} {path!r}: directory {parent!r} does not exist")
    if os.path.isdir(path):
        raise UsageError(f"{option} {path!r}: is a directory; give a file name")
    existed = os.path.exists(path)
    try:
        with open(path, "a"):  # appends nothing: an existing file stays as it is
            pass
        if not existed:
            os.remove(path)
    except OSError as exc:
        raise UsageError(f"{option} {path!r}: cannot be written ({exc.strerror})") from None


def resolve(args: argparse.Namespace) -> list[str]:
    """Check the arguments against the machine; return the preset names to run."""
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device cuda: CUDA is not available to torch {torch.__version__} here")
    from fastclip.bench import runner  # (numba's import: not before the arguments are read)

    if args.device == "cuda" and not runner.cuda_backend_usable():
        # fastclip would hand CUDA grads to torch: its rows would time torch against itself.
        raise UsageError("--device cuda: fastclip's CUDA kernels cannot run here (numba-cuda missing "
                         "or unusable: pip install 'fastclip[cuda]'; see any fastclip warning above)")
    presets = args.preset or ([] if args.model else list(C.DEFAULT_SETS[args.device]))
    if "all" in presets:
        presets = [n for n, s in C.GRAD_SETS.items() if not s.large or args.device == "cuda" or args.allow_large]
    presets = list(dict.fromkeys(presets))
    for name in presets:
        spec = C.GRAD_SETS[name]
        if spec.large and args.device == "cpu" and not args.allow_large:
            gb = 2 * spec.numel() * DTYPES[args.dtype].itemsize / 1e9
            raise UsageError(f"--preset {name}: {spec.numel():,} values need about {gb:.1f} GB for the grads "
                             "and their saved copy; it runs on --device cuda, or on the CPU with --allow-large")
    _check_path("--json", args.json)
    _check_path("--plot", args.plot)
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise UsageError("--plot needs matplotlib: pip install 'fastclip[bench]'") from None
    return presets


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the benchmark; see ``fastclip-bench --help``.

    Args:
        argv: the arguments (default ``sys.argv[1:]``).

    Returns:
        The exit status: 0 ok, 1 a norm disagreed with the exact reference (or a clip_grad_value_
        result with torch's), 2 bad arguments.

    Example:
        >>> from fastclip.bench import main
        >>> main(["--preset", "many-small", "--repeat", "1", "--no-cold-start"])  # doctest: +SKIP
        0
    """
    try:
        args = build_parser().parse_args(argv)
        presets = resolve(args)
        model = build_model(args.model) if args.model else None
    except UsageError as e:
        print(f"fastclip-bench: error: {e}", file=sys.stderr)
        return 2
    except SystemExit as e:  # --help
        return e.code if isinstance(e.code, int) else 0
    from fastclip.bench.run import run  # after parsing: bad arguments fail fast

    return run(args, presets, model)
