"""The written half of `softpo bench`: a record's markdown table and its plots, and the JSON file itself."""

from __future__ import annotations

import json
from pathlib import Path

from .harness import MIB, recomputes_logits


def _fmt_time(s):
    ms = s * 1e3
    return f"{ms:.3g}" if ms < 100 else f"{ms:.0f}"


def _best_softpo(results_by_provider):
    times = [r["time_median_s"] for name, r in results_by_provider.items()
             if name.startswith("softpo") and r.get("status") == "ok"]
    return min(times) if times else None


def markdown(doc: dict) -> str:
    dev, versions, ceil = doc["device"], doc["versions"], doc["ceilings"]
    lines = [
        f"# softpo benchmarks: {dev['name']} ({dev['type']})",
        "",
        f"- date: {doc['date']}; set: `{doc['set']}`; complete: {doc['complete']}",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()),
        f"- reproduce: `{doc['command']}`",
        f"- ceilings, the best of the measurements at the start and end of the run: matmul "
        f"{ceil['matmul_flops_per_s'] / 1e12:.3g} TFLOP/s ({ceil['matmul']['dtype']} "
        f"{'x'.join(map(str, ceil['matmul']['shape']))}), copy {ceil['copy_bytes_per_s'] / 1e9:.3g} GB/s "
        "(read + write); each measurement (TFLOP/s, GB/s, load average): "
        + "; ".join(f"{m['matmul_flops_per_s'] / 1e12:.3g}, {m['copy_bytes_per_s'] / 1e9:.3g}, "
                    f"{m.get('loadavg_1m', float('nan')):.1f}" for m in doc.get("ceilings_measured", [])),
        f"- time: median of {doc['timing']['method']} samples after one warm-up call, IQR in brackets; memory: "
        f"{doc['memory_method']}",
        "- % of ceiling: hidden path counts 2NHV FLOPs forward, 6NHV forward+backward against the matmul rate "
        "(providers marked * recompute the logits in backward, executing 8NHV); logits path counts "
        "N x V elements read forward, read + written backward, against the copy bandwidth.",
        "- x softpo: time / the fastest softpo provider on that case.",
    ]
    loads = [r["loadavg_1m"] for r in doc["results"] if "loadavg_1m" in r]
    if loads:
        cpus = dev.get("cpus") or dev.get("threads") or "?"
        lines.append(f"- machine load (1-minute load average) while measuring: {min(loads):.1f} to {max(loads):.1f} "
                     f"on {cpus} CPUs; other work on a shared machine slows and spreads the times")
    lines.append("")
    by_case: dict[str, dict] = {}
    for r in doc["results"]:
        by_case.setdefault(r["case"], {})[r["provider"]] = r
    for case in doc["cases"]:
        rows = by_case.get(case["id"])
        if not rows:
            continue
        best = _best_softpo(rows)
        lines += [f"## {case['id']}", "",
                  "| provider | time ms [IQR] | peak MiB above inputs | same, less gradients | % of ceiling "
                  "| x softpo |", "|---|---|---|---|---|---|"]
        for name in doc["providers"]:
            r = rows.get(name)
            if r is None:
                continue
            star = "*" if recomputes_logits(doc["providers"][name], case) and case["path"] == "hidden" else ""
            if r["status"] != "ok":
                lines.append(f"| {name}{star} | {r['status']}: {r['reason']} | | | | |")
                continue
            iqr = f"[{_fmt_time(r['time_q25_s'])}, {_fmt_time(r['time_q75_s'])}]"
            ratio = f"{r['time_median_s'] / best:.2f}" if best else ""
            less_grads = (r["peak_mem_bytes"] - r.get("grad_bytes", 0)) / MIB
            lines.append(
                f"| {name}{star} | {_fmt_time(r['time_median_s'])} {iqr} | {r['peak_mem_bytes'] / MIB:.1f} | "
                f"{less_grads:.1f} | {100 * r['ceiling_fraction']:.1f} | {ratio} |"
            )
        lines.append("")
    lines += _core_memory_lines(doc, by_case)
    return "\n".join(lines) + "\n"


def _core_memory_lines(doc, by_case) -> list[str]:
    """softpo's chunked torch path against materialized log_softmax(hidden @ weight.T) on the CPU sets'
    large-vocabulary cases, where materializing the logits costs the most memory."""
    out = []
    for case in doc["cases"]:
        if not (case["path"] == "hidden" and case["V"] >= 100000 and case["dtype"] == "fp32"):
            continue
        rows = by_case.get(case["id"], {})
        ours, eager = rows.get("softpo-torch"), rows.get("torch-eager")
        if not (ours and eager and ours["status"] == eager["status"] == "ok"):
            continue
        if not out:
            out += ["## Large vocabulary: softpo's chunked torch path against materialized logits", "",
                    "| case | peak memory, softpo / eager | time, softpo / eager |", "|---|---|---|"]
        mem = ours["peak_mem_bytes"] / eager["peak_mem_bytes"] if eager["peak_mem_bytes"] > 0 else float("nan")
        out.append(f"| {case['id']} | {100 * mem:.1f}% | {ours['time_median_s'] / eager['time_median_s']:.2f}x |")
    return out + [""] if out else []


def plot(doc: dict, out_dir: Path, stem: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = {c["id"]: c for c in doc["cases"]}
    families: dict[str, list] = {}
    for r in doc["results"]:
        case = cases.get(r["case"])
        if r["status"] == "ok" and case:
            families.setdefault(case["family"], []).append((case["N"], r))
    written = []
    for family, points in sorted(families.items()):
        if len({n for n, _ in points}) < 2:
            continue
        fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.2))
        for name in doc["providers"]:
            mine = sorted((n, r) for n, r in points if r["provider"] == name)
            if not mine:
                continue
            ns = [n for n, _ in mine]
            ax_t.plot(ns, [r["time_median_s"] * 1e3 for _, r in mine], marker="o", label=name)
            # A log axis needs positive values; peaks under 0.1 MiB are below what RSS resolves anyway.
            ax_m.plot(ns, [max(r["peak_mem_bytes"] / MIB, 0.1) for _, r in mine], marker="o", label=name)
        for ax, ylabel in ((ax_t, "median time (ms)"), (ax_m, "peak memory above inputs (MiB)")):
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("N (tokens)")
            ax.set_ylabel(ylabel)
            ax.grid(True, which="both", alpha=0.3)
        ax_t.legend(fontsize=8)
        fig.suptitle(f"{family} on {doc['device']['name']} ({doc['date'][:10]})", fontsize=10)
        fig.tight_layout()
        path = out_dir / f"{stem}-{family}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def write_json(doc: dict, path: Path) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=1))
    tmp.replace(path)
