"""Issue 25's table over samplers, built from the evaluate runs' JSON (nothing typed in).

    python docs/results/recommended/table.py            # Markdown to stdout (docs/results.md)
    python docs/results/recommended/table.py --summary  # one line per sampler (README)

Each row of a block names the JSON file and the config it was read from; the FP row of every file of
a block must be the same to the printed (third) decimal (the same seeds: rows compare sample by sample), which
is checked. A file that is missing (a run not yet done) prints as "not run".
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
RES = HERE.parent

# (block title, [(row label, file relative to docs/results, config)])
NEW = "W8A8 **recommended** (with `reconstruct`; the default)"
FAST = "W8A8 recommended-fast (no `reconstruct`; the default of 2026-12-03)"
PAPER = "W8A8 PTQ4DM, the paper's full setting"
MINMAX = "W8A8 NDTC + min-max ranges"
OUT8EF = ("W8A8, the paper's full setting (8-bit mean / variance / x_{t-1}) on the recommended passes "
          "+ `error_feedback` (float32 residual)")
OUT8EF2 = "... the same with `error_feedback{residual_bits=2}` (8-bit x_{t-1} + 2-bit residual)"
BLOCKS = [
    ("DDPM-100, N = 1,000, `--seed 0`", [
        (NEW, "recommended/ddpm100-1000-s0.json", "recommended"),
        (FAST, "ddim/ddpm100-1000-s0.json", "recommended"),
        (PAPER + " (2026-11-26 draw)", "quality-1000-cosine.json", "ptq4dm-w8a8"),
        (MINMAX + " (2026-11-26 draw)", "quality-1000-cosine.json", "minmax-w8a8")]),
    ("DDPM-100, N = 1,000, `--seed 100`", [
        (NEW, "recommended/ddpm100-1000-s100.json", "w8a8-reconstruct"),
        (FAST, "ddim/ddpm100-1000-s100.json", "recommended"),
        (PAPER + " (2026-11-26 draw)", "schedule/quality-1000-cosine-14000-seed100.json", "ptq4dm-w8a8"),
        (MINMAX + " (2026-11-26 draw)", "schedule/quality-1000-cosine-14000-seed100.json", "minmax-w8a8")]),
    ("DDIM-50, N = 1,000, `--seed 1000`", [
        (NEW, "w4/ddim50-1000-s1000-w4.json", "w8a8-reconstruct"),
        (FAST, "ddim/ddim50-1000-s1000-widen4.json", "recommended"),
        (PAPER, "ddim/ddim50-1000-s1000.json", "paper"),
        (MINMAX, "ddim/ddim50-1000-s1000.json", "minmax-w8a8"),
        (OUT8EF, "recommended/ddim50-1000-s1000-out8-ef.json", "recommended-out8-ef"),
        (OUT8EF2, "recommended/ddim50-1000-s1000-out8-ef.json", "recommended-out8-ef2")]),
    ("DDIM-50, N = 1,000, `--seed 2000`", [
        (NEW, "w4/ddim50-1000-s2000-w4.json", "w8a8-reconstruct"),
        (FAST, "ddim/ddim50-1000-s2000.json", "recommended"),
        (PAPER, "ddim/ddim50-1000-s2000.json", "paper"),
        (MINMAX, "ddim/ddim50-1000-s2000.json", "minmax-w8a8"),
        (OUT8EF, "recommended/ddim50-1000-s2000-out8-ef.json", "recommended-out8-ef"),
        (OUT8EF2, "recommended/ddim50-1000-s2000-out8-ef.json", "recommended-out8-ef2")]),
    ("DDIM-100, N = 500, `--seed 700`", [
        (NEW, "recommended/ddim100-500-s700.json", "w8a8-reconstruct"),
        (FAST, "ddim/ddim100-500-s700.json", "recommended"),
        (PAPER, "recommended/ddim100-500-s700-paper.json", "paper"),
        (MINMAX, "ddim/ddim100-500-s700.json", "minmax-w8a8")]),
    ("DDIM-20, N = 500, `--seed 500`", [
        (NEW, "recommended/ddim20-500-s500.json", "w8a8-reconstruct"),
        (FAST, "ddim/ddim20-500-s500.json", "recommended"),
        (PAPER, "ddim/ddim20-500-s500.json", "paper"),
        (MINMAX, "ddim/ddim20-500-s500.json", "minmax-w8a8")]),
    ("DDIM-50 eta 1, N = 500, `--seed 600`", [
        (NEW, "recommended/ddim50eta1-500-s600.json", "w8a8-reconstruct"),
        (FAST, "ddim/ddim50eta1-500-s600.json", "recommended"),
        (PAPER, "ddim/ddim50eta1-500-s600.json", "paper"),
        (MINMAX, "ddim/ddim50eta1-500-s600.json", "minmax-w8a8")]),
]


def _rows(path: Path) -> dict | None:
    if not path.exists():
        return None
    return {r["config"]: r for r in json.loads(path.read_text())["rows"]}


def table() -> str:
    out = ["| sampler, N, seed set | configuration | FID (MNIST-clf) | vs FP | PSNR vs FP (dB) | digit changes | run |",
           "|---|---|---|---|---|---|---|"]
    for title, rows in BLOCKS:
        fps = {}
        for _, f, _ in rows:
            got = _rows(RES / f)
            if got and "fp" in got:
                fps[f] = round(got["fp"]["fid"], 3)   # to the printed digit (thread counts move the 5th)
        if len(set(fps.values())) > 1:
            raise SystemExit(f"{title}: the FP rows differ between runs ({fps}): they do not share seeds")
        fp = next(iter(fps.values()), None)
        out.append(f"| **{title}** | FP32 | {fp:.3f} | — | — | — | |" if fp is not None else f"| **{title}** | FP32 | not run | | | | |")
        for label, f, cfg in rows:
            got = _rows(RES / f)
            r = got.get(cfg) if got else None
            if r is None:
                out.append(f"| | {label} | not run | | | | `{f}` |")
                continue
            gap = (r["fid"] / fp - 1) * 100
            out.append(f"| | {label} | {r['fid']:.3f} | {gap:+.1f}% | {r['psnr_vs_fp']:.2f} | "
                       f"{100 * r['label_changed_vs_fp']:.1f}% | `{f}` |")
    return "\n".join(out)


def summary() -> str:
    """One line per block (README): FP's FID, then each configuration's gap to FP (PSNR for the
    recommended row); the first four rows of each block (the columns every block has)."""
    out = ["| sampler, N, seed set | FP FID | **recommended** vs FP | PSNR vs FP (dB) | digit changes | recommended-fast | paper's full setting | min-max |",
           "|---|---|---|---|---|---|---|---|"]
    for title, rows in BLOCKS:
        cells, fp = [], None
        for _, f, cfg in rows[:4]:
            got = _rows(RES / f)
            fp = fp if fp is not None else (got or {}).get("fp", {}).get("fid")
            cells.append((got or {}).get(cfg))
        gap = lambda r: "not run" if r is None else f"{(r['fid'] / fp - 1) * 100:+.1f}%"
        new = cells[0]
        out.append(f"| {title} | {fp:.3f} | **{gap(new)}** | "
                   + (f"{new['psnr_vs_fp']:.2f} | {100 * new['label_changed_vs_fp']:.1f}% | " if new else "| | ")
                   + " | ".join(gap(r) for r in cells[1:]) + " |")
    return "\n".join(out)


if __name__ == "__main__":
    sys.stdout.write((summary() if "--summary" in sys.argv else table()) + "\n")
