"""A run's MLflow record must not say RUNNING after its process is gone, however it went.

Signals and exceptions are handled in-process (:func:`orchestrator.runs._drive` ends the run KILLED or FAILED), but
some deaths leave no chance to run Python: SIGKILL, the out-of-memory killer, or Ray aborting the driver when its
raylet dies. So every run starts this watchdog, a small separate process that waits on a pipe from the run's
process. The run writes ``done`` before it exits normally; if the pipe closes without it, the process died
abruptly: the watchdog takes the run directory's lock (so it never races a ``coalora resume`` that already holds
it), marks the parent run FAILED if it is still RUNNING, says so on the terminal, and exits.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import IO

DONE = b"done\n"


class Watchdog:
    """The run-side handle: start it once the MLflow run is open, :meth:`disarm` it when the run has ended it."""

    def __init__(self, uri: str, mlflow_run_id: str, run_dir: Path):
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "orchestrator.tracking.watchdog", uri, mlflow_run_id, str(run_dir)],
            stdin=subprocess.PIPE, start_new_session=True,  # a Ctrl-C or SIGTERM to the group must not take it too
        )

    def disarm(self) -> None:
        """The run ended its MLflow record itself: tell the watchdog to exit without touching it."""
        stdin: IO[bytes] | None = self._proc.stdin
        try:
            if stdin is not None:
                stdin.write(DONE)
                stdin.close()
            self._proc.wait(timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            self._proc.kill()


def _watch(uri: str, mlflow_run_id: str, run_dir: Path) -> int:
    if sys.stdin.buffer.read() == DONE:  # blocks until the run's process writes done or dies
        return 0
    from mlflow.tracking import MlflowClient

    from ..state import RunInUse, RunLock
    from .tracker import bound_http_waits

    bound_http_waits(10.0)
    try:
        with RunLock(run_dir, holder="the run's watchdog"):
            client = MlflowClient(tracking_uri=uri)
            if client.get_run(mlflow_run_id).info.status != "RUNNING":
                return 0
            client.set_terminated(mlflow_run_id, status="FAILED")
    except RunInUse:  # a resume already holds the directory: its own record keeping takes over
        return 0
    except Exception as err:  # noqa: BLE001 - a watchdog reports and exits, it never raises
        print(f"coalora: the run in {run_dir} ended abruptly and its MLflow run {mlflow_run_id} could not be "
              f"marked FAILED ({err})", file=sys.stderr)
        return 1
    print(f"coalora: the run in {run_dir} ended abruptly (killed, or its Ray died); its MLflow run is marked FAILED. "
          f"Continue it with `coalora resume {run_dir}`", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(_watch(sys.argv[1], sys.argv[2], Path(sys.argv[3])))
