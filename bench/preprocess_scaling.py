"""Ingestion + preprocessing on 1 process against N: wall time, speed-up and identical outputs (issue 11).

    python bench/preprocess_scaling.py                  # the shared car parts (7,310 photos), 1 vs 2 workers
    python bench/preprocess_scaling.py --quick          # a 4,000-photo subset, 3 repeats (~1 minute)
    python bench/preprocess_scaling.py --workers 4 --repeats 5 --source PATH

What is timed is what ``kedro run --pipelines=ingestion,preprocessing`` runs, through the node functions as the
pipelines call them: ``scan_and_decode`` (every file read, hashed, verified with one full decode that also
preprocesses it, on ``ingestion.workers`` processes) -> ``clean_manifest`` -> ``preprocess_images`` (every clean
file's bytes checked against the manifest's sha256, its pixels taken from ingestion's decode). Listing the
source (``ImageSourceDataset.load``) and saving the datasets are not timed: both are the same for any number
of workers. Every file is read once before timing, so each configuration runs on a warm page cache.

Each repeat runs 1 worker and then N workers (alternating which goes first); the medians and the ratio
(target >= 1.7x with 2 workers on 2 cores) come from this one run. The outputs of the two configurations must be
identical: same manifest, quarantine and dropped rows in the same order, byte-identical decoded and preprocessed
arrays, same image index. ``--baseline`` also times the previous design (a verification decode in ingestion,
then a second full decode in preprocessing, 1 process) to show what decoding once saves.

The machine is shared: numbers are noisy, read the ratio of medians, and re-run in a quiet window.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TQDM_DISABLE", "1")  # progress bars off: they would be timed too

import argparse
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from partmatch.datasets import ImageSourceDataset
from partmatch.pipelines.ingestion.decoding import cpu_count
from partmatch.pipelines.ingestion.nodes import (
    clean_manifest,
    scan_and_decode,
    scan_source,
)
from partmatch.pipelines.preprocessing.nodes import preprocess_images

ROOT = Path(__file__).resolve().parents[1]
CARPARTS = ROOT.parent / "shared" / "datasets" / "carparts"


def cpu_seconds(who: int) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def run_data_pipelines(source, workers: int) -> tuple[float, tuple[float, float], dict]:
    """ingestion + preprocessing as the pipelines call them; (seconds, (main CPU s, workers CPU s), outputs)."""
    ingestion, preprocessing = {"workers": workers}, {}
    main0, kids0 = cpu_seconds(resource.RUSAGE_SELF), cpu_seconds(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    raw, quarantine, decoded = scan_and_decode(source, ingestion, preprocessing)
    clean, dropped = clean_manifest(raw, quarantine, ingestion)
    images, index = preprocess_images(source, clean, preprocessing, decoded, ingestion)
    seconds = time.perf_counter() - t0
    cpu = (cpu_seconds(resource.RUSAGE_SELF) - main0, cpu_seconds(resource.RUSAGE_CHILDREN) - kids0)
    return seconds, cpu, {"raw_manifest": raw, "quarantine": quarantine, "decoded_images": np.asarray(decoded),
                     "clean_manifest": clean, "dropped_files": dropped, "image_array": np.asarray(images),
                     "image_index": index}


def run_two_decodes(source) -> tuple[float, float]:
    """The design before decode-once: verification decode, then a second full decode, one process;
    (seconds, CPU seconds)."""
    cpu0, t0 = cpu_seconds(resource.RUSAGE_SELF), time.perf_counter()
    raw, quarantine = scan_source(source, {"workers": 1})
    clean, _ = clean_manifest(raw, quarantine, {})
    preprocess_images(source, clean, {}, None, {"workers": 1})
    return time.perf_counter() - t0, cpu_seconds(resource.RUSAGE_SELF) - cpu0


def differences(a: dict, b: dict) -> list[str]:
    out = []
    for name, x in a.items():
        y = b[name]
        same = np.array_equal(x, y) and x.dtype == y.dtype if isinstance(x, np.ndarray) else x.equals(y)
        if not same:
            out.append(name)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--source", default=str(CARPARTS), help="folder or CSV (default: the shared car parts)")
    ap.add_argument("--workers", type=int, default=2, help="the pool size compared with 1 (default 2)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--limit", type=int, default=None, help="only the first N files of the source")
    ap.add_argument("--quick", action="store_true", help="the first 4,000 files (fixed costs such as starting the pool weigh on fewer)")
    ap.add_argument("--baseline", action="store_true", help="also time decode-twice on 1 process")
    args = ap.parse_args(argv)
    if args.quick:
        args.limit = args.limit or 4000
    source = ImageSourceDataset(path=args.source).load()
    if args.limit:
        source.records = source.records.iloc[: args.limit].reset_index(drop=True)
    for key in source.records["path"].unique():  # warm the page cache: every configuration reads from memory
        try:
            source.read_bytes(key)
        except OSError:
            pass
    print(f"source: {args.source} ({len(source.records)} files); cores available: {cpu_count()}; "
          f"load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())}; python {sys.version.split()[0]}")
    times: dict[int, list[float]] = {1: [], args.workers: []}
    cpus: dict[int, list[tuple[float, float]]] = {1: [], args.workers: []}
    twice: list[tuple[float, float]] = []
    outputs: dict[int, dict] = {}
    configs = [1, args.workers] + (["twice"] if args.baseline else [])
    for r in range(args.repeats):
        order = configs[r % len(configs):] + configs[: r % len(configs)]   # each configuration goes first in turn
        for w in order:
            if w == "twice":
                twice.append(run_two_decodes(source))
                continue
            seconds, cpu, out = run_data_pipelines(source, w)
            times[w].append(seconds)
            cpus[w].append(cpu)
            outputs.setdefault(w, out)
        print(f"  repeat {r + 1}: 1 worker {times[1][-1]:.2f} s, {args.workers} workers {times[args.workers][-1]:.2f} s"
              + (f", decode twice {twice[-1][0]:.2f} s" if twice else ""))
    one, many = statistics.median(times[1]), statistics.median(times[args.workers])
    n_images = len(outputs[1]["image_array"])
    print(f"\ningestion + preprocessing, median (best) of {args.repeats}:")
    print(f"  1 worker : {one:7.2f} s ({min(times[1]):.2f})  ({len(source.records) / one:6.0f} files/s)")
    print(f"  {args.workers} workers: {many:7.2f} s ({min(times[args.workers]):.2f})  "
          f"({len(source.records) / many:6.0f} files/s)")
    print(f"  speed-up : {one / many:.2f}x of the medians, {min(times[1]) / min(times[args.workers]):.2f}x of the best "
          f"(target >= 1.7x with 2 workers on 2 free cores)")
    cpu_one = statistics.median(a + b for a, b in cpus[1])
    main_cpu = statistics.median(a for a, _ in cpus[args.workers])
    kids_cpu = statistics.median(b for _, b in cpus[args.workers])
    bound = cpu_one / max(main_cpu, (main_cpu + kids_cpu) / args.workers)
    print(f"  CPU seconds (median): 1 worker {cpu_one:.2f}; {args.workers} workers: this process {main_cpu:.2f} + "
          f"workers {kids_cpu:.2f}. On {args.workers} idle cores the CPU split allows at most {bound:.2f}x "
          "(a loaded machine inflates CPU time too)")
    if twice:
        base, base_cpu = statistics.median(t for t, _ in twice), statistics.median(c for _, c in twice)
        print(f"  decode twice, 1 process (before): {base:7.2f} s ({min(t for t, _ in twice):.2f}), CPU "
              f"{base_cpu:.2f} s -> decode once, 1 worker: {base / one:.2f}x faster (CPU {base_cpu / cpu_one:.2f}x "
              "less)")
    diff = differences(outputs[1], outputs[args.workers])
    print(f"\noutputs 1 vs {args.workers} workers ({len(outputs[1]['raw_manifest'])} manifest rows, "
          f"{len(outputs[1]['quarantine'])} quarantined, {n_images} images "
          f"{tuple(outputs[1]['image_array'].shape)}): " + ("IDENTICAL" if not diff else f"DIFFERENT: {diff}"))
    return 1 if diff else 0


if __name__ == "__main__":
    sys.exit(main())
