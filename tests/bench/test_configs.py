"""Every shipped benchmark file (conf/bench/*.yaml) loads, each of its jobs builds a valid run configuration at each
of its seeds, and each paired job is scored on the same examples as its partner: a typo in a file that takes an
hour to run is caught here, in a second."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.accuracy.jobs import check_pairing, job_config, job_seeds, load_bench

ROOT = Path(__file__).resolve().parents[2]
FILES = sorted((ROOT / "conf" / "bench").glob("*.yaml"))


def test_the_files_are_found():
    assert {"full.yaml", "quick.yaml", "minilm-theta-lr.yaml"} <= {f.name for f in FILES}


@pytest.mark.parametrize("path", FILES, ids=[f.stem for f in FILES])
def test_every_job_of_every_bench_file_is_valid(path, tmp_path):
    jobs = {j["name"]: j for j in load_bench(path)["jobs"]}
    for job in jobs.values():
        for seed in job_seeds(job):
            cfg, _ = job_config(job, [], tmp_path, "sqlite:///unused.db", seed)
            other = job.get("bench", {}).get("paired_with")
            if other is not None:
                partner = jobs[other]
                check_pairing(job, cfg, partner, job_config(partner, [], tmp_path, "sqlite:///unused.db", seed)[0])
