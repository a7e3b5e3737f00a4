"""Merge the rows of comparisons run on the same task and seeds into one comparison.json.

A full 3-seed `compare` of every method takes over an hour on 2 CPU cores; a comparison of new
methods alone (`compare --only ...`) can be merged with an earlier one of the others, provided
both ran the same protocol. This script checks what can be checked: the same task, seeds and
budget, and, seed by seed, the same reward model (its held-out accuracy and hidden reward, which
are deterministic for a seed) and the same reference reward. Methods in a later file replace
the same methods in an earlier one. Then redraw the plots and print the table with
`direct-align compare --plots-only --output-dir OUT`.

    python scripts/merge_comparisons.py docs/comparison/comparison.json runs/new/comparison.json \\
        --output-dir runs/merged
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from direct_align.compare.frontier import aggregate, headline


def _rm_key(rm: dict[str, Any]) -> tuple[int, float]:
    return rm["seed"], round(rm["eval"]["eval/rewards/accuracies"], 9)


def merge(results: list[dict[str, Any]], sources: list[str]) -> dict[str, Any]:
    """One comparison from ``results`` (oldest first); raises SystemExit when they differ in
    task, seeds, budget or reward models."""
    first = results[0]
    for result, source in zip(results[1:], sources[1:]):
        for key in ("task", "quick", "seeds"):
            if result[key] != first[key]:
                raise SystemExit(f"{source}: {key} {result[key]!r} differs from {first[key]!r} "
                                 f"of {sources[0]}")  # fmt: skip
        if sorted(map(_rm_key, result["reward_models"])) != sorted(map(_rm_key, first["reward_models"])):
            raise SystemExit(f"{source}: its reward models differ from those of {sources[0]} "
                             "(not the same protocol)")  # fmt: skip
        refs = {(r["seed"], r["reference_true_reward"]) for r in result["rows"] + first["rows"]}
        if len(refs) != len(first["seeds"]):
            raise SystemExit(f"{source}: the reference's reward differs from {sources[0]}")
    rows: list[dict[str, Any]] = []
    for result in results:
        replaced = {r["method"] for r in result["rows"]}
        rows = [r for r in rows if r["method"] not in replaced] + result["rows"]
    merged = {key: value for key, value in results[-1].items() if key != "plots"}
    merged |= {"rows": rows, "runs": aggregate(rows), "headline": headline(rows),
               "runtime_s": sum(r["runtime_s"] for r in results),
               "merged_from": [{"source": s, "methods": sorted({r["method"] for r in res["rows"]}),
                                "runtime_s": res["runtime_s"]}
                               for s, res in zip(sources, results)]}  # fmt: skip
    return merged


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("inputs", nargs="+", type=Path, help="comparison.json files, oldest first")
    parser.add_argument("--output-dir", type=Path, required=True)
    opts = parser.parse_args()
    results = [json.loads(p.read_text()) for p in opts.inputs]
    merged = merge(results, [str(p) for p in opts.inputs])
    opts.output_dir.mkdir(parents=True, exist_ok=True)
    (opts.output_dir / "comparison.json").write_text(json.dumps(merged, indent=1))
    print(f"{len(merged['rows'])} rows of {len({r['method'] for r in merged['rows']})} methods "
          f"→ {opts.output_dir / 'comparison.json'}")  # fmt: skip


if __name__ == "__main__":
    main()
