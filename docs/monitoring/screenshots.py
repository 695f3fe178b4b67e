"""Screenshots of a coalora run in the MLflow UI, as a user sees it (docs/monitoring.md).

    python docs/monitoring/screenshots.py --store runs/mlflow.db [--out docs/monitoring]

Starts ``mlflow server`` on the run's SQLite store (127.0.0.1, a free port; what ``mlflow ui`` runs), finds the
newest coalora parent run, and photographs four pages with headless Chromium (Debian's ``chromium`` package:
``apt-get install chromium``): the experiment's run list, the run's overview, its metric charts and one round's
Pareto plot among its artifacts. The pages are single-page apps, so each shot waits for the page's scripts
(``--virtual-time-budget``). Writes runs.png, overview.png, metrics.png and artifacts.png.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

# MLflow 3.17's UI opens in its GenAI mode unless the address (or the browser's memory of the last click on "Model
# training") says otherwise: ?workflowType=machine_learning.
PAGES = {
    "runs": "#/experiments/{exp}?workflowType=machine_learning",
    "overview": "#/experiments/{exp}/runs/{run}?workflowType=machine_learning",
    "metrics": "#/experiments/{exp}/runs/{run}/model-metrics?workflowType=machine_learning",
    "artifacts": "#/experiments/{exp}/runs/{run}/artifacts/rounds/round-{last:04d}/pareto.png"
                 "?workflowType=machine_learning",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    raise SystemExit("no Chromium found: apt-get install chromium (Debian) or put google-chrome on PATH")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", type=Path, default=Path("runs/mlflow.db"), help="the run's MLflow SQLite file")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent)
    parser.add_argument("--size", default="1900,1150", help="window width,height")
    args = parser.parse_args()
    if not args.store.is_file():
        raise SystemExit(f"{args.store}: no such MLflow store (run `make demo` first, or pass --store)")
    browser = chromium()
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{args.store.resolve()}"
    client = MlflowClient(uri)
    parents = [r for e in client.search_experiments()
               for r in client.search_runs([e.experiment_id], "tags.`coalora.role` = 'parent'")]
    if not parents:
        raise SystemExit(f"{args.store} holds no coalora run")
    run = max(parents, key=lambda r: r.info.start_time)
    rounds = [m.step for m in client.get_metric_history(run.info.run_id, "hypervolume")]
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri, "--host",
                               "127.0.0.1", "--port", str(port), "--workers", "1"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        base = f"http://127.0.0.1:{port}/"
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(base + "health", timeout=2):
                    break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise SystemExit("mlflow server did not start")
                time.sleep(0.5)
        args.out.mkdir(parents=True, exist_ok=True)
        for name, page in PAGES.items():
            url = base + page.format(exp=run.info.experiment_id, run=run.info.run_id, last=max(rounds, default=0))
            shot = args.out / f"{name}.png"
            subprocess.run([browser, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                            f"--window-size={args.size}", "--virtual-time-budget=90000", "--run-all-compositor-stages-before-draw", f"--screenshot={shot}", url],
                           check=True, capture_output=True, timeout=180)
            print(f"{shot}  {url}")
    finally:
        server.terminate()
        server.wait(30)


if __name__ == "__main__":
    main()
