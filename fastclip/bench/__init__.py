"""``fastclip-bench``: fastclip against torch's ``clip_grad_norm_``, on model-sized gradient sets.

Run ``fastclip-bench`` (or ``python -m fastclip.bench``); ``--help`` lists the options. The
cases live in ``fastclip.bench.cases``, shared with the pytest-benchmark suite in ``benchmarks/``.

Example:
    >>> from fastclip.bench import main
    >>> main(["--preset", "many-small", "--repeat", "3"])  # doctest: +SKIP
    0
"""

from fastclip.bench.cli import main

__all__ = ["main"]
