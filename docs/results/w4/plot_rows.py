"""(docs/results/w4/plot_rows.py) Every N = 1,000 row of the default model measured so far on DDPM-100 and DDIM-50, in one
picture: FID change vs FP (with its ~90% interval over half-samples, `models.metrics.fid_change_interval`) against the samples' PSNR vs FP, one marker per weight
precision. It reads the evaluate.py records under docs/results (nothing is re-run) and draws issue 26's two bars (+10%,
+3%). Written atomically.

    python docs/results/w4/plot_rows.py --out docs/img/w4-rows.png
"""
import argparse, glob, json, os, pathlib, tempfile

try:
    import matplotlib
except ImportError as e:   # make setup installs it (through the data extra's mlxtend)
    raise SystemExit(f"plot_rows.py needs matplotlib ({e}): run `make setup`, or `pip install matplotlib`")
matplotlib.use("Agg")
import matplotlib.pyplot as plt

REPO = pathlib.Path(__file__).resolve().parents[3]
DEFAULT_WEIGHTS = "mnist-small-ddpm-cosine"

# (family, marker, colour): the first prefix that matches a row's config names its family
FAMILIES = [
    ("w4a8", "W4A8 (4-bit weights)", "v", "tab:red"),
    ("mixed5", "mixed, <= 5 bits per weight", "o", "tab:orange"),
    ("w5a8", "W5A8", "s", "tab:purple"),
    ("w8a8-reconstruct", "W8A8 + reconstruct", "^", "tab:green"),
    ("recommended", "W8A8 recommended", "D", "tab:blue"),
]


FIRST_SEED_SETS = {0, 1000}      # filled markers; the other seed sets (100, 2000) hollow


def order(row):
    """Legend order: the families as listed above."""
    return [f[1] for f in FAMILIES].index(row[3][0])


def family(config: str):
    for prefix, *rest in FAMILIES:
        if config.startswith(prefix):
            return rest
    return None


def setting(meta: dict):
    s = meta.get("sampler", {})
    if s.get("kind") == "ddpm" and s.get("num_inference_steps") == 100:
        return "DDPM-100"
    if s.get("kind") == "ddim" and s.get("num_inference_steps") == 50 and not s.get("eta"):
        return "DDIM-50 (eta 0)"
    return None


def collect(root: pathlib.Path):
    """(setting, seed set, config, family, psnr, fid change, low, high, file) for every complete N = 1,000 row of the
    default model; a row copied into several records counts once."""
    rows, seen = [], set()
    for f in sorted(glob.glob(str(root / "docs" / "results" / "**" / "*.json"), recursive=True)):
        try:
            d = json.loads(pathlib.Path(f).read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(d, dict) or "rows" not in d or not isinstance(d.get("meta"), dict):
            continue
        meta = d["meta"]
        where = setting(meta)
        if where is None or DEFAULT_WEIGHTS not in str(meta.get("model", {}).get("weights", DEFAULT_WEIGHTS)):
            continue
        fp = [r["fid"] for r in d["rows"] if r.get("config") == "fp" and r.get("n") == 1000]
        if not fp:
            continue
        fp = fp[0]
        for r in d["rows"]:
            fam = family(r.get("config", ""))
            if fam is None or r.get("n") != 1000 or r.get("psnr_vs_fp") is None:
                continue
            key = (where, meta.get("seed"), r["config"], round(r["psnr_vs_fp"], 3), round(r["fid"], 4))
            if key in seen:      # the same row copied into several records (a reference row)
                continue
            seen.add(key)
            change = 100 * (r["fid"] / fp - 1)
            # records before 2026-12-07 have no interval: drawn without a bar
            lo, hi = (100 * v for v in r["fid_vs_fp_interval"]) if r.get("fid_vs_fp_interval") else (change, change)
            rows.append((where, meta.get("seed"), r["config"], fam, r["psnr_vs_fp"], change, lo, hi, os.path.relpath(f, root)))
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(REPO / "docs" / "img" / "w4-rows.png"))
    args = ap.parse_args()
    rows = collect(REPO)
    if not rows:
        raise SystemExit(f"no N = 1,000 rows of the default model under {REPO / 'docs' / 'results'}")
    settings = ["DDPM-100", "DDIM-50 (eta 0)"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 5), sharey=True)
    for ax, where in zip(axes, settings):
        seen = set()
        for w, seed, config, (name, marker, colour), psnr, change, lo, hi, _ in sorted(rows, key=order):
            if w != where:
                continue
            first = seed in FIRST_SEED_SETS
            ax.errorbar(psnr, change, yerr=[[change - lo], [hi - change]], fmt=marker, color=colour, ms=6, capsize=2,
                        alpha=0.8, mfc=colour if first else "white", label=None if name in seen else name)
            seen.add(name)
        for bar, style in ((10, "--"), (3, ":")):
            ax.axhline(bar, color="grey", ls=style, lw=1)
            ax.text(19.2, bar + 1, f"+{bar}% (issue 26)", color="grey", fontsize=8)
        ax.axhline(0, color="black", lw=0.5)
        ax.set_title(f"{where}, N = 1,000 (every seed set)")
        ax.set_xlabel("PSNR of the samples vs FP (dB)")
        ax.set_xlim(19, 38)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper right")
    axes[0].set_ylabel("FID vs FP (%), ~90% interval (sampling noise only)")
    axes[0].set_ylim(-20, 120)
    fig.suptitle("Every measured row of the default model: FID change against how closely the samples follow FP "
                 "(rows above 120% clipped; "
                 "filled: seed set 0 / 1000, hollow: 100 / 2000)", fontsize=10)
    fig.tight_layout()
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, suffix=".png")
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=110)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    for r in sorted(rows):
        print(f"{r[0]:16s} seed {r[1]!s:5s} {r[2]:32s} {r[4]:6.2f} dB {r[5]:+7.1f}% [{r[6]:+.1f}, {r[7]:+.1f}]  {r[8]}")
    print(f"wrote {out} ({len(rows)} rows)")


if __name__ == "__main__":
    main()
