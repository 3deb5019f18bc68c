"""`softpo bench`: the microbenchmarks against the peers, side by side in one run, recorded.

Every case of a set runs with every provider: softpo's Triton and chunked torch paths, torch eager and
torch.compile on materialized logits, Liger-Kernel's two GRPO losses, TRL's chunked log-prob with TRL's
loss formula, and the linear-cross-entropy kernels. A provider that cannot run a case is recorded as
skipped, with the reason; the providers that cannot run here at all (a peer not installed, a kernel that
needs CUDA) are listed once at the start. Each result holds the median and spread of the time (warm-up
excluded), the peak memory above the inputs, and the fraction of a ceiling measured in the same run: the
matmul rate for the hidden path (FLOPs), the device-to-device copy bandwidth for the logits path (bytes).

    softpo bench --quick --device cpu                # a few minutes on a CPU: softpo, torch, the peers
    softpo bench --tiny --device cpu                 # seconds: exercises the harness
    softpo bench --device cuda                       # the GPU set: H=4096, V in {128256, 151936}, bf16
    softpo bench --device cuda --resume --time-limit 540   # the same, in pieces under a time limit
    softpo bench --device cuda --set gpu-headline    # the headline comparisons in one run (bench/gpu_headline.sh)

Writes <out>/<device>-<date>[-<set>].json (out defaults to ./bench/results), a markdown table next to it and
one PNG per family of cases (time and peak memory against N, one line per provider).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import sys
import time
from collections import Counter
from pathlib import Path

import torch

from ..helptext import HelpFormatter
from .cases import SETS, case_set
from .harness import (MIB, WORKER_MARK, add_fractions, best_ceilings, cpu_memory_setup, device_slug, environment,
                      finalize_fractions, measure_ceilings, measure_safely, run_isolated, worker)
from .providers import PROVIDERS, missing_peers
from .report import markdown, plot, write_json

# What a set changes in the defaults. The tiny set checks the harness: few samples, one input set (no
# cache to spill), no fresh process for its memory (kilobytes). The quick set keeps to a few minutes on two
# cores: two input sets, and in process (a fresh process per result costs seconds of imports; with glibc's
# mmap threshold fixed, what a call frees leaves the process, so its peak above the RSS before it holds).
SET_DEFAULTS = {"tiny": {"target_s": 0.05, "isolate": False, "max_input_sets": 1},
                "quick": {"target_s": 1.0, "isolate": False, "max_input_sets": 2}}


EXAMPLES = """examples:
  softpo bench --tiny --device cpu
  softpo bench --quick --device cpu --out bench/results
  softpo bench --device cuda --set gpu-headline
"""


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="softpo bench", description=__doc__.split("\n\n")[0], epilog=EXAMPLES,
                                     formatter_class=HelpFormatter)
    parser.add_argument("--device", choices=("cuda", "cpu"), default=None,
                        help="default: cuda when available, else cpu")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--set", choices=tuple(SETS), default=None, dest="set_name",
                      help="the cases to run (default full); "
                           + "; ".join(f"{name}: {spec['about']}" for name, spec in SETS.items()))
    size.add_argument("--quick", action="store_const", const="quick", dest="set_name", help="the same as --set quick")
    size.add_argument("--tiny", action="store_const", const="tiny", dest="set_name", help="the same as --set tiny")
    parser.add_argument("--out", default="bench/results", help="output directory (default ./bench/results)")
    parser.add_argument("--providers", default=None, help="comma-separated provider names (default all)")
    parser.add_argument("--only", default=None, help="regular expression: run only the cases whose id matches")
    parser.add_argument("--resume", action="store_true",
                        help="keep the results already in today's file and run only what is missing")
    parser.add_argument("--time-limit", type=float, default=None,
                        help="stop starting new cases after this many seconds (finish with --resume)")
    parser.add_argument("--target-seconds", type=float, default=None,
                        help="timed calls per result until about this long (default 1 on cuda and for --quick, "
                             "2 on cpu, 0.05 for --tiny)")
    parser.add_argument("--min-samples", type=int, default=3, help="fewest timed calls per result")
    parser.add_argument("--max-samples", type=int, default=25, help="most timed calls per result")
    isolate = parser.add_mutually_exclusive_group()
    isolate.add_argument("--isolate", dest="isolate", action="store_true", default=None,
                         help="each (case, provider) in a fresh process (default on cpu, but for --tiny and --quick)")
    isolate.add_argument("--no-isolate", dest="isolate", action="store_false", help="every result in this process")
    parser.add_argument("--case-timeout", type=float, default=1800, help="seconds per isolated (case, provider)")
    parser.add_argument("--no-plots", action="store_true", help="write the JSON and the table only")
    parser.add_argument("--render", metavar="JSON", default=None,
                        help="only rewrite the table and plots of a recorded JSON file, next to it")
    parser.add_argument("--vocab-parallel", type=int, metavar="P", default=None,
                        help="instead of the sets: the vocab-parallel sweep over P CPU processes against one")
    parser.add_argument("--vp-shape", default="512,256,151936", metavar="N,H,V",
                        help="shape of the --vocab-parallel case (default 512,256,151936)")
    parser.add_argument("--vp-samples", type=int, default=3, help="timed calls per process for --vocab-parallel")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.set_name = args.set_name or "full"
    return args


def _choose(args) -> tuple[list, list[str]]:
    """The cases of the set (--only) and the providers (--providers); ValueError names a bad choice."""
    chosen = list(PROVIDERS)
    if args.providers:
        chosen = [p.strip() for p in args.providers.split(",") if p.strip()]
        unknown = sorted(set(chosen) - set(PROVIDERS))
        if unknown:
            raise ValueError(f"providers: unknown {unknown}; choose from {sorted(PROVIDERS)}")
    cases = case_set(args.set_name, tuple(PROVIDERS))
    if args.only:
        cases = [c for c in cases if re.search(args.only, c.id)]
    return cases, chosen


def _new_record(args, argv, device, cases, chosen, isolate, target_s) -> dict:
    """The record's header: device, versions, date, command, ceilings measured now, the cases and providers."""
    dev, versions = environment(device)
    today = dt.datetime.now(dt.timezone.utc)
    print(f"softpo bench: {len(cases)} cases x {len(chosen)} providers on {dev['name']} ({args.set_name} set)")
    for line in missing_peers(chosen, device):
        print(f"  recorded as skipped: {line}")
    ceilings = dict(measure_ceilings(device, small=args.set_name == "tiny"), when=today.isoformat(timespec="seconds"),
                    loadavg_1m=os.getloadavg()[0])
    print(f"  ceilings: matmul {ceilings['matmul_flops_per_s'] / 1e12:.3g} TFLOP/s, "
          f"copy {ceilings['copy_bytes_per_s'] / 1e9:.3g} GB/s")
    return {
        "schema": 1,
        "device": dev,
        "versions": versions,
        "date": today.isoformat(timespec="seconds"),
        "command": "softpo bench " + " ".join(argv),
        "set": args.set_name,
        "complete": False,
        "loadavg_at_start": os.getloadavg(),
        # Measured at the start and the end of every piece of the run; fractions use the best of them.
        "ceilings_measured": [ceilings],
        "ceilings": best_ceilings([ceilings]),
        "timing": {"method": "CUDA events" if device == "cuda" else "perf_counter",
                   "warmup_calls": 1, "target_seconds": target_s, "min_samples": args.min_samples},
        "memory_method": (
            "torch.cuda.max_memory_allocated above the allocation before the call" if device == "cuda" else
            ("peak RSS (VmHWM, reset by /proc/self/clear_refs) above the RSS before the call, "
             + ("one fresh process per (case, provider)" if isolate else "in process"))
        ),
        "providers": {name: PROVIDERS[name].describe() for name in chosen},
        "cases": [c.to_dict() for c in cases],
        "results": [],
    }


def _resume(doc: dict, json_path: Path) -> None:
    """Keep what an earlier piece of today's run recorded (same set and device) in `doc`."""
    if not json_path.exists():
        return
    old = json.loads(json_path.read_text())
    if old.get("set") != doc["set"] or old.get("device", {}).get("name") != doc["device"]["name"]:
        return
    doc["ceilings_measured"] = old.get("ceilings_measured", [old["ceilings"]]) + doc["ceilings_measured"]
    doc["ceilings"] = best_ceilings(doc["ceilings_measured"])
    doc["results"] = old["results"]
    doc["date"] = old["date"]
    # A resumed piece may select fewer cases or providers: the record keeps those of earlier pieces.
    doc["providers"] = {**old.get("providers", {}), **doc["providers"]}
    merged = {c["id"]: c for c in old.get("cases", [])} | {c["id"]: c for c in doc["cases"]}
    order = [c.id for c in case_set(doc["set"])]
    doc["cases"] = [merged[i] for i in order if i in merged] + [c for i, c in merged.items() if i not in order]
    print(f"  resuming {json_path}: {len(doc['results'])} results kept")


def _measure_all(doc, json_path, todo, device, isolate, measure_kwargs, args) -> bool:
    """Run every (case, provider) of `todo`, writing the record after each; True if the time limit stopped it.
    Skips print nothing here: the record and its table hold each reason, the end a count."""
    from tqdm import tqdm

    start = time.monotonic()
    skipped = Counter()
    with tqdm(total=len(todo), desc="softpo bench", unit="run", dynamic_ncols=True) as bar:
        for case, provider in todo:
            if args.time_limit and time.monotonic() - start > args.time_limit:
                tqdm.write(f"time limit reached with {len(todo) - bar.n} runs left: run the same command with --resume")
                return True
            bar.set_postfix_str(f"{case.id} {provider.name}")
            reason = provider.skip_reason(case, device)
            if reason is not None:
                result = {"case": case.id, "provider": provider.name, "status": "skipped", "reason": reason}
                skipped[provider.unavailable(device) is None] += 1
            elif isolate:
                spec = {"case": case.to_dict(), "provider": provider.name, "device": device, "measure": measure_kwargs}
                result = run_isolated(spec, args.case_timeout)
            else:
                result = measure_safely(case, provider, device, **measure_kwargs)
            add_fractions(result, case.to_dict(), provider.describe(), doc["ceilings"])
            if result["status"] == "error":
                tqdm.write(f"  error: {case.id} {provider.name}: {result['reason']}")
            elif result["status"] == "ok":
                tqdm.write(f"  {case.id} {provider.name}: {result['time_median_s'] * 1e3:.3g} ms, "
                           f"{result['peak_mem_bytes'] / MIB:.1f} MiB, {100 * result['ceiling_fraction']:.1f}% "
                           f"of {result['ceiling']}")
            doc["results"].append(result)
            write_json(doc, json_path)
            bar.update(1)
    if skipped[True]:
        print(f"  {skipped[True]} (case, provider) pairs skipped for a reason of their own (a peer without the "
              "objective, a case left out of the set): the table says which and why")
    return False


def _finish(doc, json_path, device, stopped, args) -> None:
    """The end-of-piece ceilings, the fractions against the best ceilings, the table and the plots."""
    end = measure_ceilings(device, small=args.set_name == "tiny")
    doc["ceilings_measured"].append(dict(end, when=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                                         loadavg_1m=os.getloadavg()[0]))
    finalize_fractions(doc)
    recorded = {(r["case"], r["provider"]) for r in doc["results"]}
    doc["complete"] = not stopped and all((c["id"], p) in recorded for c in doc["cases"] for p in doc["providers"])
    write_json(doc, json_path)
    md_path = json_path.with_suffix(".md")
    md_path.write_text(markdown(doc))
    pngs = [] if args.no_plots else plot(doc, json_path.parent, json_path.stem)
    print(f"wrote {json_path}, {md_path}" + (f" and {len(pngs)} plots" if pngs else ""))


def _render(path: Path) -> int:
    doc = json.loads(path.read_text())
    path.with_suffix(".md").write_text(markdown(doc))
    pngs = plot(doc, path.parent, path.stem)
    print(f"wrote {path.with_suffix('.md')} and {len(pngs)} plots")
    return 0


def main(argv: list[str] | None = None) -> int:
    """`softpo bench [options]`; returns the exit status (2 for a bad choice)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.worker:
        cpu_memory_setup()
        print(WORKER_MARK + json.dumps(worker(json.loads(sys.stdin.read()))), flush=True)
        return 0
    if args.vocab_parallel is not None:
        from . import vocab_parallel

        return vocab_parallel.main(args.vocab_parallel, args.vp_shape, args.out, args.vp_samples)
    if args.render:
        return _render(Path(args.render))

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        print("softpo bench: --device cuda but CUDA is not available", file=sys.stderr)
        return 2
    try:
        cases, chosen = _choose(args)
    except ValueError as error:
        print(f"softpo bench: {error}", file=sys.stderr)
        return 2
    defaults = SET_DEFAULTS.get(args.set_name, {})
    isolate = args.isolate if args.isolate is not None else defaults.get("isolate", device == "cpu")
    target_s = args.target_seconds or defaults.get("target_s") or (1.0 if device == "cuda" else 2.0)
    measure_kwargs = {"target_s": target_s, "min_samples": args.min_samples, "max_samples": args.max_samples,
                      "max_input_sets": defaults.get("max_input_sets", 8)}
    if device == "cpu" and not isolate:
        cpu_memory_setup()

    doc = _new_record(args, argv, device, cases, chosen, isolate, target_s)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    # The full set owns the plain name; the other sets never overwrite it.
    stem = f"{device_slug(doc['device'])}-{doc['date'][:10]}" + ("" if args.set_name == "full" else f"-{args.set_name}")
    json_path = out_dir / f"{stem}.json"
    if args.resume:
        _resume(doc, json_path)
    done = {(r["case"], r["provider"]) for r in doc["results"]}
    todo = [(c, PROVIDERS[p]) for c in cases for p in chosen if (c.id, p) not in done]
    stopped = _measure_all(doc, json_path, todo, device, isolate, measure_kwargs, args)
    _finish(doc, json_path, device, stopped, args)
    return 0
