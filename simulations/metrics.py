"""What a run counts and samples (`Metrics`), and the percentiles the summary reports."""

from __future__ import annotations

from typing import Any

import numpy as np


def pct(values, qs=(50, 90, 99)) -> dict:
    if len(values) == 0:
        return {f"p{q}": None for q in qs}
    a = np.asarray(values, dtype=np.float64)
    return {f"p{q}": round(float(np.percentile(a, q)), 3) for q in qs}


class Metrics:
    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self.neg_fail: dict[str, dict[str, int]] = {"renter": {}, "provider": {}}
        self.hb_rejects: dict[str, int] = {}
        self.receipt_rejects: dict[str, int] = {}
        self.requests = 0
        self.gave_up = 0
        self.time_to_rent_ms: list[int] = []
        self.prop_samples: list[int] = []
        self.prop_coverage: list[float] = []
        self.prop_t99: list[int] = []
        self.new_renter_full_view_ms: list[int] = []
        self.new_renter_incomplete = 0
        self.invalid_hops: dict[int, int] = {}
        self.invalid_published = 0
        self.invalid_reasons: dict[str, int] = {}
        self.book_sizes: list[int] = []
        self.stores = 0

    def count(self, key: str, n: int = 1) -> None:
        self.counts[key] = self.counts.get(key, 0) + n

    def fail(self, role: str, reason: str) -> None:
        d = self.neg_fail[role]
        d[reason] = d.get(reason, 0) + 1

    def report(self, agent: Any, e: Any) -> None:
        ev = e.event
        self.count("report." + ev)
        if ev == "negotiation_failed":
            if e.detail["reason"] == "CANCELLED" and e.detail["fault"] == "local":
                self.count("negotiation_cancelled_after_win")
            else:
                self.fail(e.detail["role"], e.detail["reason"])
        elif ev == "heartbeat_rejected":
            self.hb_rejects[e.detail["code"]] = self.hb_rejects.get(e.detail["code"], 0) + 1
        elif ev == "receipt_rejected":
            self.receipt_rejects[e.detail["code"]] = self.receipt_rejects.get(e.detail["code"], 0) + 1
