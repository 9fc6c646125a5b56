"""Merge `chess_mlx.evaluate --output` files (runs split over processes) into
one frontier: the Markdown table, the equal-speed-up comparison and the PNG.

    python scripts/frontier.py a.json b.json --speedup 1.25,1.35,1.5 \
        --markdown frontier.md --plot frontier.png
"""

import argparse
import json
from pathlib import Path

from chess_mlx.evaluate import (
    EQUAL_SPEEDUP_TITLE,
    at_equal_speedup,
    equal_speedup_markdown,
    markdown_table,
    plot_quality,
)
from chess_mlx.calibrate import parse_speedups


def merge_rows(reports):
    """One row per (method, target): a configuration measured in several runs
    (perplexity in one, tasks in another) gets the fields of all of them,
    the first run's where both have one. The change against dense stays
    with the perplexity it was measured with."""
    merged = {}
    for report in reports:
        for row in report["rows"]:
            entry = merged.setdefault((row["method"], row["target"]), {})
            for field, value in row.items():
                if field == "tasks":
                    entry["tasks"] = {**value, **entry.get("tasks", {})}
                elif field != "vs_dense":
                    entry.setdefault(field, value)
            if "vs_dense" in row and entry.get("perplexity") is row.get("perplexity"):
                entry["vs_dense"] = row["vs_dense"]
    return list(merged.values())


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", help="JSON files written by chess_mlx.evaluate --output")
    parser.add_argument("--speedup", default="1.25,1.35,1.5", help="Ideal speed-ups to compare methods at")
    parser.add_argument("--markdown", default=None)
    parser.add_argument("--plot", default=None)
    args = parser.parse_args()
    reports = [json.loads(Path(path).read_text()) for path in args.results]
    rows = merge_rows(reports)
    task_names = list(dict.fromkeys(name for report in reports for name in report["tasks"]))
    rows.sort(key=lambda r: (r["method"] != "dense", r["method"], r["ideal_speedup"]))
    text = markdown_table(rows, task_names)
    text += f"\n{EQUAL_SPEEDUP_TITLE}:\n\n" + equal_speedup_markdown(at_equal_speedup(rows, parse_speedups(args.speedup)))
    print(text, end="")
    if args.markdown:
        Path(args.markdown).write_text(text)
    if args.plot:
        plot_quality(rows, args.plot)


if __name__ == "__main__":
    main()
