"""The block history a W&B run charts: per-step MGN, probabilities and active blocks.

Kept by the W&B sink as the steps arrive and turned, at the end, into a table
(thinned to what W&B logs), per-block series and active counts.
"""

from __future__ import annotations

from typing import Any

from grass_cli.telemetry import Event

# W&B logs at most this many rows of a table; the block history is thinned to fit.
MAX_TABLE_ROWS = 10_000


class BlockHistory:
    """Per-step importance, probabilities and active blocks, for the charts at the end.

    A step whose MGN did not change shares the previous step's list, so a long run
    costs a reference per step, not a copy of every block's value.
    """

    def __init__(self) -> None:
        self.steps: list[dict[str, Any]] = []  # step-event-shaped, what plots.py reads
        self.num_blocks = 0

    def add(self, event: Event) -> None:
        last = self.steps[-1] if self.steps else {}
        imp, prob = event.get("importance"), event.get("probabilities")
        row = {
            "event": "step",
            "step": int(event["step"]),
            "active": list(event.get("active") or []),
            "importance": last.get("importance") if imp == last.get("importance") else imp,
            "probabilities": last.get("probabilities")
            if prob == last.get("probabilities")
            else prob,
        }
        self.steps.append(row)
        widths = [len(imp or []), len(prob or []), max(row["active"], default=-1) + 1]
        self.num_blocks = max(self.num_blocks, *widths)

    def changes(self) -> list[dict[str, Any]]:
        """The steps where the MGN, the probabilities or the active set changed."""
        out, prev = [], None
        for row in self.steps:
            key = (id(row["importance"]), id(row["probabilities"]), row["active"])
            if key != prev:
                out.append(row)
            prev = key
        return out

    def picked_changes(self) -> list[dict[str, Any]]:
        """The changes, thinned to W&B's table limit (every k-th, always the last)."""
        changes = self.changes()
        fits = max(1, MAX_TABLE_ROWS // max(1, self.num_blocks) - 1)  # changes, less the last
        picked = changes[:: max(1, -(-len(changes) // fits))]
        if changes and picked[-1] is not changes[-1]:
            picked.append(changes[-1])
        return picked

    def table_rows(self, picked: list[dict[str, Any]]) -> list[list[Any]]:
        """(step, block, importance, probability, active) for every block at each change."""
        rows = []
        for row in picked:
            imp, prob = row["importance"] or [], row["probabilities"] or []
            for b in range(self.num_blocks):
                rows.append(
                    [
                        row["step"],
                        b,
                        imp[b] if b < len(imp) else None,
                        prob[b] if b < len(prob) else None,
                        b in row["active"],
                    ]
                )
        return rows

    def importance_series(
        self, picked: list[dict[str, Any]]
    ) -> list[tuple[int, list[int], list[float]]]:
        """(block, steps, MGN) per block, at the changes where its MGN is known."""
        series = []
        for b in range(self.num_blocks):
            points = [
                (row["step"], row["importance"][b])
                for row in picked
                if row["importance"] is not None
                and b < len(row["importance"])
                and row["importance"][b] is not None
            ]
            if points:
                series.append((b, [x for x, _ in points], [y for _, y in points]))
        return series

    def active_counts(self) -> list[int]:
        counts = [0] * self.num_blocks
        for row in self.steps:
            for b in row["active"]:
                counts[b] += 1
        return counts
