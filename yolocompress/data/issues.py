"""The bad-data report: every problem met while reading a data set, counted per kind.

Readers call `DataIssues.add(kind, file, detail)` and go on; the loader logs ONE `summary()` at the
end. With `strict=True` the first *problem* raises a `YoloCompressError` naming the file; *notes*
(images without objects, kept as negatives) never raise.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

from yolocompress.errors import YoloCompressError

__all__ = ["ISSUE_KINDS", "DataIssues"]

_log = logging.getLogger("yolocompress.data")

# kind -> (what happened to the item, whether it is a problem; notes are valid data)
ISSUE_KINDS: dict[str, tuple[str, bool]] = {
    "outside_root": ("entry points outside the data root, skipped", True),
    "missing_list_entry": ("list entry names no file, skipped", True),
    "missing_image": ("image file missing, skipped", True),
    "unreadable_image": ("image header unreadable, skipped", True),
    "missing_annotation": ("annotation file missing, image skipped", True),
    "missing_label": ("label file missing, image kept without objects (Darknet rule)", True),
    "malformed_annotation": ("annotation file unparsable, image skipped", True),
    "malformed_object": ("object or label line malformed, object skipped", True),
    "unknown_class": ("class not in names, object skipped", True),
    "size_mismatch": ("annotated image size differs from the image file, file size used", True),
    "clipped": ("box outside the image, clipped", True),
    "degenerate": ("box of zero area after clipping, skipped", True),
    "duplicate": ("image listed twice, second entry skipped", True),
    "empty": ("no objects, image kept as a negative", False),
}


@dataclass
class DataIssues:
    """Counts and example file names per issue kind for one data-set split."""

    source: str = ""                 # what is being read, for the summary line
    strict: bool = False
    max_examples: int = 5
    counts: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def add(self, kind: str, file: str, detail: str = "") -> None:
        """Record one issue; in strict mode a problem raises instead."""
        if kind not in ISSUE_KINDS:
            raise KeyError(f"unknown data issue kind {kind!r}")
        what, problem = ISSUE_KINDS[kind]
        if self.strict and problem:
            raise YoloCompressError(f"{file}: {what}" + (f" ({detail})" if detail else "")
                                    + " [strict data loading]")
        self.counts[kind] = self.counts.get(kind, 0) + 1
        shown = self.examples.setdefault(kind, [])
        if len(shown) < self.max_examples:
            shown.append(f"{file} ({detail})" if detail else file)

    @property
    def problems(self) -> int:
        """Number of recorded issues that are problems (not notes)."""
        return sum(n for kind, n in self.counts.items() if ISSUE_KINDS[kind][1])

    def summary(self) -> str:
        """One report: a line per kind with its count and up to `max_examples` files."""
        if not self.counts:
            return f"{self.source}: no data issues"
        lines = [f"{self.source}: {self.problems} data problem(s), "
                 f"{sum(self.counts.values()) - self.problems} note(s)"]
        for kind in ISSUE_KINDS:           # fixed order, so reports diff cleanly
            if kind in self.counts:
                n = self.counts[kind]
                shown = ", ".join(self.examples[kind])
                more = f", ... {n - len(self.examples[kind])} more" if n > len(self.examples[kind]) else ""
                lines.append(f"  {kind} x{n}: {ISSUE_KINDS[kind][0]}: {shown}{more}")
        return "\n".join(lines)

    def log(self) -> None:
        """Emit the summary once: a warning if there are problems, info for notes only."""
        if self.problems:
            _log.warning(self.summary())
        elif self.counts:
            _log.info(self.summary())

    def first_problem(self) -> tuple[str, str] | None:
        """(kind, example) of a recorded problem in `ISSUE_KINDS` order, or None."""
        for kind, (_, problem) in ISSUE_KINDS.items():
            if problem and self.counts.get(kind):
                return kind, self.examples[kind][0]
        return None

    def to_dict(self) -> dict:
        """Plain JSON-able form, for the annotation cache."""
        return {"counts": dict(self.counts), "examples": {k: list(v) for k, v in self.examples.items()}}

    @classmethod
    def from_dict(cls, d: dict, source: str = "", strict: bool = False,
                  max_examples: int = 5) -> "DataIssues":
        """Rebuild a report read from the cache; strict mode raises on a cached problem."""
        counts = {str(k): int(v) for k, v in d["counts"].items() if k in ISSUE_KINDS}
        examples = {str(k): [str(e) for e in v] for k, v in d["examples"].items() if k in counts}
        issues = cls(source, False, max_examples, counts, examples)
        first = issues.first_problem() if strict else None
        if first is not None:
            kind, example = first
            raise YoloCompressError(f"{example}: {ISSUE_KINDS[kind][0]} [strict data loading]")
        issues.strict = strict
        return issues
