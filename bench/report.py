"""Turn benchmark result files into Markdown tables, and optionally into the README.

    python bench/report.py                      # tables of the newest file of each device
    python bench/report.py FILE.json ...        # tables of these files (or bench/e2e.py's FILE.jsonl)
    python bench/report.py --readme docs/benchmarks.md   # rewrite the tables between its bench markers
    python bench/report.py --plots              # a PNG of time and memory per kernel, beside each file
    python bench/report.py --baseline           # write bench/baseline.json from the newest CPU file

Each table is one kernel at one shape: every provider's median time, peak memory and
throughput, and fasttune's time and memory as a ratio of that provider's (< 1: fasttune is
faster / leaner). Ratios only compare numbers from the same run. An end-to-end training step
(bench/e2e.py) gets its own table: tokens/s, trained tokens/s, peak memory, and whether its first
losses agree with the first provider's.
"""

import argparse
import json
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
BASELINE = Path(__file__).resolve().parent / "baseline.json"
# (kernel, slower provider): the same-run speed ratios CI guards (that provider's time / fasttune's).
# Not dpo_step: on the tiny model (V = 260) the two ways take about the same time, and a ratio near 1
# drifts ±20% between runs on 2 shared cores; dpo_loss above guards the fused head's speed.
GUARDED = [("fused_linear_cross_entropy", "naive"), ("dpo_loss", "naive"), ("grpo_loss", "naive"),
           ("varlen_attention", "sdpa_padded")]
START, END = "<!-- bench:start -->", "<!-- bench:end -->"


def _mib(b):
    return "–" if b is None else f"{b / 2**20:,.0f} MiB"


def _time(s):
    return "–" if s is None else f"{s * 1e3:,.1f} ms"


def _num(x, fmt):
    return "–" if not x else format(x, fmt)


def _ratio(a, b):
    return "–" if a is None or b is None or b == 0 else f"{a / b:.2f}"


def is_e2e(r) -> bool:
    """A whole QLoRA training step of bench/e2e.py (its shape names the model)."""
    return r["kernel"].startswith("e2e_")


def e2e_table(kernel, shape, dtype, rows) -> list[str]:
    """One end-to-end case: tokens/s (real and trained), peak memory, and whether the losses agree."""
    ours = next((r for r in rows if r["provider"] == "fasttune" and not r["skipped"]), None)
    s = dict(shape)
    name = s.pop("model")
    ckpt = "gradient checkpointing on" if s.pop("ckpt", False) else "gradient checkpointing off"
    out = ["", f"**{kernel}** ({name}, {', '.join(f'{k}={v}' for k, v in s.items())}, {dtype}, {ckpt}; "
               "forward + backward + AdamW)", "",
           "| provider | median step | tokens/s | trained tokens/s | peak memory | fasttune tokens/s ÷ this "
           "| fasttune memory ÷ this | first losses agree |",
           "|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        if r["skipped"]:
            out.append(f"| {r['provider']} | skipped: {r['skipped']} | | | | | | |")
            continue
        x = r.get("extra", {})
        agree = ("–" if "agrees" not in x else "yes" if x["agrees"] else "**NO**") + (
            f" ({x['max_rel_diff']:.1e} vs {x['agrees_with']})" if "max_rel_diff" in x else "")
        out.append(f"| {r['provider']} | {_time(r['median_s'])} | {_num(r['tokens_per_s'], ',.0f')} | "
                   f"{_num(x.get('trained_tokens_per_s'), ',.0f')} | {_mib(r['peak_bytes'])} | "
                   f"{_ratio(ours and ours['tokens_per_s'], r['tokens_per_s'])} | "
                   f"{_ratio(ours and ours['peak_bytes'], r['peak_bytes'])} | {agree} |")
    for r in rows:
        if r.get("extra", {}).get("split"):
            out.append(f"\n{r['provider']}: median seconds per step: "
                       + ", ".join(f"{k} {v}" for k, v in r["extra"]["split"].items()))
    return out


def load(path: Path) -> dict:
    """A result file: bench/results/*.json ({env, results}) or the JSON lines bench/e2e.py appends."""
    if path.suffix != ".jsonl":
        return json.loads(path.read_text())
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not lines:
        return {"env": {}, "results": []}
    return {"env": lines[0]["env"], "results": [{k: v for k, v in r.items() if k != "env"} for r in lines]}


def tables(data: dict) -> str:
    env = data["env"]
    groups: dict = {}
    for r in data["results"]:
        groups.setdefault((r["kernel"], json.dumps(r["shape"]), r["dtype"]), []).append(r)
    out = [f"Device: {env['device']} · {env['date']} · commit {env['commit']} · "
           + ", ".join(f"{k} {v}" for k, v in env["versions"].items())]
    for (kernel, shape, dtype), rows in groups.items():
        if is_e2e(rows[0]):
            out += e2e_table(kernel, json.loads(shape), dtype, rows)
            continue
        ours = next((r for r in rows if r["provider"] == "fasttune" and not r["skipped"]), None)
        shape_s = ", ".join(f"{k}={v}" for k, v in json.loads(shape).items())
        what = "the whole command" if kernel.endswith("_demo") else "forward + backward"
        out += ["", f"**{kernel}** ({shape_s}, {dtype}, {what})", "",
                "| provider | median time | peak memory | tokens/s | TFLOP/s | fasttune time ÷ this | fasttune memory ÷ this |",
                "|---|---:|---:|---:|---:|---:|---:|"]
        for r in rows:
            if r["skipped"]:
                out.append(f"| {r['provider']} | skipped: {r['skipped']} | | | | | |")
                continue
            out.append(
                f"| {r['provider']} | {_time(r['median_s'])} | {_mib(r['peak_bytes'])} | "
                f"{_num(r['tokens_per_s'], ',.0f')} | {_num(r['tflops'], '.2f')} | "
                f"{_ratio(ours and ours['median_s'], r['median_s'])} | {_ratio(ours and ours['peak_bytes'], r['peak_bytes'])} |"
            )
        for r in rows:
            if r.get("extra", {}).get("split"):
                out.append("\nMean seconds per step: " + ", ".join(f"{k} {v}" for k, v in r["extra"]["split"].items()))
    return "\n".join(out)


def _key(r):
    return f"{r['kernel']}|{json.dumps(r['shape'], sort_keys=True)}|{r['dtype']}"


def speed_ratios(results) -> dict:
    """{case: slower provider's median / fasttune's} for the guarded pairs present in `results`."""
    by = {(_key(r), r["provider"]): r for r in results if not r.get("skipped") and r.get("median_s")}
    out = {}
    for kernel, other in GUARDED:
        for (key, provider), r in by.items():
            if provider == "fasttune" and key.startswith(kernel + "|") and (key, other) in by:
                out[f"{key}|{other}"] = round(by[(key, other)]["median_s"] / r["median_s"], 3)
    return out


def plot(data: dict, png: Path):
    """Time and memory of every provider, one pair of panels per kernel and shape."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: dict = {}
    for r in data["results"]:
        if not r.get("skipped") and r.get("median_s") and r["kernel"] != "alloc":
            groups.setdefault(_key(r), []).append(r)
    if not groups:
        return
    fig, axes = plt.subplots(len(groups), 2, figsize=(10, 2.6 * len(groups)), squeeze=False)
    for row, (key, rows) in zip(axes, groups.items()):
        names = [r["provider"] for r in rows]
        colors = ["tab:green" if n == "fasttune" else "tab:gray" for n in names]
        row[0].barh(names, [r["median_s"] * 1e3 for r in rows], color=colors)
        row[0].set_xlabel("median time (ms)")
        row[1].barh(names, [(r["peak_bytes"] or 0) / 2**20 for r in rows], color=colors)
        row[1].set_xlabel("peak memory (MiB)")
        row[0].set_title(key.split("|")[0] + " " + key.split("|")[1], fontsize=8, loc="left")
    fig.suptitle(f"{data['env']['device']} · {data['env']['date']} · {data['env']['commit']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(png, dpi=90)
    plt.close(fig)


def newest_files() -> list[Path]:
    """The newest result file of each device (and kind: .json from pytest, .jsonl from bench/e2e.py)."""
    by_device: dict = {}
    for p in sorted([*RESULTS.glob("*.json"), *RESULTS.glob("*.jsonl")]):
        by_device[p.stem.split("-", 3)[-1], p.suffix] = p
    return list(by_device.values())


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="*", type=Path)
    ap.add_argument("--readme", type=Path, help="replace the text between the bench markers of this file")
    ap.add_argument("--plots", action="store_true", help="write a PNG beside each result file")
    ap.add_argument("--baseline", action="store_true", help="write bench/baseline.json from these results")
    args = ap.parse_args(argv)
    files = args.files or newest_files()
    if not files:
        sys.exit(f"no result files in {RESULTS}; run `make bench` first")
    if args.plots:
        for f in files:
            plot(load(f), f.with_suffix(".png"))
    if args.baseline:
        base = json.loads(BASELINE.read_text())
        for f in files:
            base["ratios"].update(speed_ratios(load(f)["results"]))
        BASELINE.write_text(json.dumps(base, indent=1) + "\n")
    text = "\n\n".join(tables(load(f)) for f in files)
    if args.readme:
        readme = args.readme.read_text()
        if START not in readme or END not in readme:
            sys.exit(f"{args.readme} has no {START} ... {END} markers")
        head, rest = readme.split(START, 1)
        args.readme.write_text(head + START + "\n" + text + "\n" + END + rest.split(END, 1)[1])
    else:
        print(text)


if __name__ == "__main__":
    main()
