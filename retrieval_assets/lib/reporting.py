"""Small renderers for materialization metadata (markdown tables and histograms)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence


def _cell(value: object, width: int = 90) -> str:
    text = "" if value is None else str(value)
    text = text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ⏎ ")
    return text if len(text) <= width else text[: width - 1] + "…"


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def markdown_histogram(buckets: Sequence[tuple[str, int]], width: int = 40) -> str:
    """A bar chart in a markdown code block: label, bar, count."""
    top = max((count for _, count in buckets), default=0) or 1
    label_width = max((len(label) for label, _ in buckets), default=0)
    bars = [
        f"{label:>{label_width}} | {'█' * round(width * count / top):<{width}} {count}"
        for label, count in buckets
    ]
    return "```\n" + "\n".join(bars) + "\n```"
