"""Wall time of `make run` after the install: the default `kedro run` on a fresh project, and where it goes.

    python bench/make_run.py                 # one fresh run (demo generated, empty data/ and mlflow.db)
    python bench/make_run.py --repeats 3     # the median of three fresh runs
    python bench/make_run.py --target 120    # exit status 1 when the median is above the target

Each repeat copies the project's `conf/` and `pyproject.toml` into a temporary folder with an empty `data/`
and its own SQLite tracking store (as a fresh clone has), then runs the `__default__` pipeline through a
KedroSession in a child process with a timing hook added, so the figure includes the demo catalogue's
generation, ingestion, preprocessing, EDA, every model, compare and the demo search, and the MLflow logging.
It prints the total wall time, its median over repeats, the target and the slowest nodes (seconds, share).

The installed venv is what `make install` built: the project code is the editable install of this checkout.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("KEDRO_DISABLE_TELEMETRY", "1")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

import argparse  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, sys, time
from pathlib import Path
from kedro.framework.hooks import hook_impl
from kedro.framework.session import KedroSession
from kedro.framework.startup import bootstrap_project

class Timer:
    def __init__(self):
        self.started, self.seconds = {}, {}
    @hook_impl
    def before_node_run(self, node):
        self.started[node.name] = time.perf_counter()
    @hook_impl
    def after_node_run(self, node):
        self.seconds[node.name] = time.perf_counter() - self.started[node.name]

project = Path(sys.argv[1])
t0 = time.perf_counter()
bootstrap_project(project)
timer = Timer()
with KedroSession.create(project_path=project) as session:
    session._hook_manager.register(timer)
    session.run()
print("@@" + json.dumps({"wall": time.perf_counter() - t0, "nodes": timer.seconds}))
"""


def fresh_project(where: Path) -> Path:
    project = where / "project"
    project.mkdir()
    for name in ("pyproject.toml", ".telemetry"):
        if (ROOT / name).exists():
            shutil.copy(ROOT / name, project / name)
    shutil.copytree(ROOT / "conf", project / "conf", ignore=shutil.ignore_patterns("local"))
    # Kedro wants a src/ inside the project; the code that runs is the editable install's, as for `make run`
    shutil.copytree(ROOT / "src", project / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    (project / "conf" / "local").mkdir()
    (project / "conf" / "local" / "mlflow.yml").write_text(
        f"server:\n  mlflow_tracking_uri: sqlite:///{project / 'mlflow.db'}\n")
    for sub in sorted(p.relative_to(ROOT) for p in (ROOT / "data").iterdir() if p.is_dir()):
        (project / sub).mkdir(parents=True)
    shutil.rmtree(project / "data" / "01_raw", ignore_errors=True)
    (project / "data" / "01_raw").mkdir()
    return project


def one_run(keep: bool) -> dict:
    where = Path(tempfile.mkdtemp(prefix="partmatch-make-run-"))
    try:
        project = fresh_project(where)
        started = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", CHILD, str(project)], cwd=project, capture_output=True,
                              text=True)
        outside = time.perf_counter() - started
        if proc.returncode != 0:
            sys.stderr.write(proc.stderr[-6000:])
            raise SystemExit(f"kedro run failed (exit {proc.returncode}) in {project}")
        line = next(x for x in proc.stdout.splitlines() if x.startswith("@@"))
        result = json.loads(line[2:])
        result["process"] = outside  # incl. interpreter start and imports, as `make run` pays them
        return result
    finally:
        if not keep:
            shutil.rmtree(where, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--target", type=float, default=120.0, help="seconds; exit 1 if the median is above it")
    ap.add_argument("--top", type=int, default=12, help="slowest nodes to list")
    ap.add_argument("--keep", action="store_true", help="keep the temporary projects")
    args = ap.parse_args()

    runs = []
    for i in range(args.repeats):
        r = one_run(args.keep)
        runs.append(r)
        print(f"run {i + 1}/{args.repeats}: {r['process']:.1f} s (process), {r['wall']:.1f} s (session), "
              f"{sum(r['nodes'].values()):.1f} s in {len(r['nodes'])} nodes", flush=True)
    median = statistics.median(r["process"] for r in runs)
    print(f"\nmake run (after install), default pipeline on the demo: median {median:.1f} s over {len(runs)} run(s); "
          f"target {args.target:.0f} s -> {'OK' if median <= args.target else 'ABOVE TARGET'} "
          f"(ratio {median / args.target:.2f})")
    nodes: dict[str, list[float]] = {}
    for r in runs:
        for name, sec in r["nodes"].items():
            nodes.setdefault(name, []).append(sec)
    total = sum(statistics.median(v) for v in nodes.values())
    print(f"\n{'node':58s} {'median s':>9s} {'share':>6s}")
    for name, sec in sorted(((n, statistics.median(v)) for n, v in nodes.items()), key=lambda x: -x[1])[:args.top]:
        print(f"{name:58s} {sec:9.1f} {sec / median:6.1%}")
    print(f"{'(all nodes)':58s} {total:9.1f} {total / median:6.1%}; the rest is start-up, imports, MLflow and I/O")
    sys.exit(0 if median <= args.target else 1)


if __name__ == "__main__":
    main()
