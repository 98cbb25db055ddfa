"""Telemetry from the clipping pass. Placeholder: see issue 5."""

from __future__ import annotations


class ClipStats:
    def _record_pass(self, plan, results, norm, p):
        raise NotImplementedError("fastclip: `stats=` is not implemented yet")

    def _record_coef(self, coef):
        raise NotImplementedError("fastclip: `stats=` is not implemented yet")
