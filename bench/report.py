"""Turn benchmark result files into Markdown tables, and optionally into the README.

    python bench/report.py                      # tables of the newest file of each device
    python bench/report.py FILE.json ...        # tables of these files
    python bench/report.py --readme README.md   # rewrite the README between its bench markers

Each table is one kernel at one shape: every provider's median time, peak memory and
throughput, and fasttune's time and memory as a ratio of that provider's (< 1: fasttune is
faster / leaner). Ratios only compare numbers from the same run.
"""

import argparse
import json
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
START, END = "<!-- bench:start -->", "<!-- bench:end -->"


def _mib(b):
    return "–" if b is None else f"{b / 2**20:,.0f} MiB"


def _time(s):
    return "–" if s is None else f"{s * 1e3:,.1f} ms"


def _num(x, fmt):
    return "–" if not x else format(x, fmt)


def _ratio(a, b):
    return "–" if a is None or b is None or b == 0 else f"{a / b:.2f}"


def tables(data: dict) -> str:
    env = data["env"]
    groups: dict = {}
    for r in data["results"]:
        groups.setdefault((r["kernel"], json.dumps(r["shape"]), r["dtype"]), []).append(r)
    out = [f"Device: {env['device']} · {env['date']} · commit {env['commit']} · "
           + ", ".join(f"{k} {v}" for k, v in env["versions"].items())]
    for (kernel, shape, dtype), rows in groups.items():
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


def newest_files() -> list[Path]:
    """The newest result file of each device."""
    by_device: dict = {}
    for p in sorted(RESULTS.glob("*.json")):
        by_device[p.stem.split("-", 3)[-1]] = p
    return list(by_device.values())


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="*", type=Path)
    ap.add_argument("--readme", type=Path, help="replace the text between the bench markers of this file")
    args = ap.parse_args(argv)
    files = args.files or newest_files()
    if not files:
        sys.exit(f"no result files in {RESULTS}; run `make bench` first")
    text = "\n\n".join(tables(json.loads(f.read_text())) for f in files)
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
