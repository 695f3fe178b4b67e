"""Suite-wide set-up: offline, deterministic, and single-threaded where BoTorch runs beside other work; a tiny local
model, a template MLflow SQLite store (migrations run once) and a small run configuration on that model that
exercises every phase of a run in seconds (used by the driver, fault and adversarial tests)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # Two tests at a time on two cores (make test): one torch thread each, in this process and the coalora
    # processes it starts (Numba's kernels follow torch's count); threads of two tests spinning against each other
    # cost more CPU than they save. Tests of thread counts set their own.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("MKL_NUM_THREADS", "1")

import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

if not torch.cuda.is_available():
    # The GPU quantizer kernels (workers/quant/fused_triton.py) run in Triton's interpreter here. The flag must be
    # set before anything imports triton (bitsandbytes and peft may, while the suite is collected): triton's own
    # library functions are made interpreted or compiled when it is first imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from search.space import SearchSpace  # noqa: E402


REPO = Path(__file__).resolve().parents[1]


def cli_command(*args: str) -> list[str]:
    """The ``coalora`` command line as a subprocess runs it (the repository's code, this interpreter)."""
    return [sys.executable, "-m", "orchestrator.cli", *args]


def cli_env(fault: str | None = None, **extra: str) -> dict[str, str]:
    """The environment for a ``coalora`` subprocess: no inherited fault injection unless ``fault`` is given."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("COALORA_FAULT")}
    if fault:
        env["COALORA_FAULT_AT"] = fault
    return {**env, **extra}


@pytest.fixture(scope="session")
def cli():
    """``cli(*args, fault=None, timeout=300)`` → the finished ``coalora ARGS`` subprocess (text output captured);
    ``fault`` is a ``COALORA_FAULT_AT`` commit point (orchestrator/faults.py)."""

    def run(*args: str, fault: str | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run(cli_command(*args), cwd=REPO, env=cli_env(fault), text=True, capture_output=True,
                              timeout=timeout)

    return run


@pytest.fixture(scope="session")
def cli_start():
    """``cli_start(*args, log=PATH, pause=None)`` → a running ``coalora ARGS`` subprocess, stdout and stderr into
    ``log``; ``pause`` (``point:seconds``) holds it at a commit point (``COALORA_FAULT_SLEEP``)."""

    def start(*args: str, log: Path, pause: str | None = None) -> subprocess.Popen:
        env = cli_env(**({"COALORA_FAULT_SLEEP": pause} if pause else {}))
        return subprocess.Popen(cli_command(*args), cwd=REPO, env=env, stdout=log.open("w"),
                                stderr=subprocess.STDOUT, text=True)

    return start


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny random BERT saved with the packaged MiniLM tokenizer: a real local model path, loaded the way users'
    models are, that runs a whole coalora job in seconds."""
    from transformers import BertConfig, BertForSequenceClassification

    from workers.models import load_tokenizer, resolve_model

    out = tmp_path_factory.mktemp("tiny-bert")
    tokenizer = load_tokenizer(resolve_model("minilm"))
    torch.manual_seed(0)
    model = BertForSequenceClassification(
        BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                   intermediate_size=64, max_position_embeddings=64, num_labels=2)
    )
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_chat_model_dir(tmp_path_factory) -> Path:
    """A tiny random Llama saved with the packaged SmolLM2's tokenizer and chat template: instruction-tuning runs
    with the real template in seconds."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from workers.models import load_tokenizer, resolve_model

    out = tmp_path_factory.mktemp("tiny-chat-llama")
    tokenizer = load_tokenizer(resolve_model("smollm2"))
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
                                         max_position_embeddings=256))
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def mlflow_template(tmp_path_factory) -> Path:
    from mlflow.tracking import MlflowClient

    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def tracking_uri(tmp_path, mlflow_template) -> str:
    db = tmp_path / "mlflow" / "mlflow.db"
    db.parent.mkdir()
    shutil.copy(mlflow_template, db)
    return f"sqlite:///{db}"


def tiny_run_config(model_dir: Path, root: Path, tracking_uri: str, **sections: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "run": {"name": "tiny", "root": str(root), "seed": 0},
        "model": {"name": str(model_dir), "task": "classification"},
        "data": {"dataset": "reviews", "max_length": 24, "train_examples": 64, "val_examples": 32,
                 "score_examples": 16, "batch_size": 16},
        "adapter": {"rank": 4, "alpha": 8},
        "training": {"steps_per_round": 2, "configs_per_step": 2, "lr": 0.005, "warmup_steps": 1},
        "search": {"rounds": 2, "initial_budgets": 4, "proposals_per_round": 2, "segments": 10,
                   "fisher_examples": 4},
        "evaluation": {"targets": [2.5, 4.0], "unseen": 1, "baselines": ["no_adapter"]},
        "cluster": {"executor": "local", "workers": 1},
        "tracking": {"uri": tracking_uri, "experiment": "tests"},
    }
    for section, values in sections.items():
        config.setdefault(section, {}).update(values)
    return config


@pytest.fixture
def make_config(tiny_model_dir, tmp_path, tracking_uri):
    """``make_config(**sections)`` → (dict, path of its YAML) for a tiny run under tmp_path/runs."""

    def make(**sections: Any) -> tuple[dict[str, Any], Path]:
        config = tiny_run_config(tiny_model_dir, tmp_path / "runs", tracking_uri, **sections)
        path = tmp_path / "run.yaml"
        path.write_text(yaml.safe_dump(config))
        return config, path

    return make


@pytest.fixture(scope="session")
def write_run_config(tiny_model_dir, mlflow_template):
    """``write_run_config(directory, **sections)`` → YAML path of a tiny run rooted in ``directory`` with its own
    copy of the MLflow template store (for tests that need module-scoped runs or several runs side by side)."""

    def write(directory: Path, **sections: Any) -> Path:
        directory.mkdir(parents=True, exist_ok=True)
        db = directory / "mlflow.db"
        shutil.copy(mlflow_template, db)
        config = tiny_run_config(tiny_model_dir, directory / "runs", f"sqlite:///{db}", **sections)
        path = directory / "run.yaml"
        path.write_text(yaml.safe_dump(config))
        return path

    return write


def _synthetic_loss(space: SearchSpace, sens: np.ndarray, X: np.ndarray) -> np.ndarray:
    X = np.atleast_2d(X)
    n = sens.size
    flat = np.ravel_multi_index(tuple(X.reshape(len(X), n, 5)[..., j] for j in range(5)), space.cardinalities)
    return 1.0 + (sens[None, :] * 2.0 ** (-2 * space.setting_bits[flat])).sum(1)


@pytest.fixture(scope="session")
def synthetic_loss():
    """loss(space, sens, X) = 1 + Σ_i sens_i · 2^(−2·bits_i): a smooth, known loss for search tests."""
    return _synthetic_loss


# ---- real matrices with real calibration inputs (GPTQ, ProjQ) ----------------------------------------------------
CALIBRATION_TEXTS = 48
CALIBRATION_TARGETS = ("encoder.layer.1.attention.self.query", "encoder.layer.1.output.dense")
"""An attention input (384 wide) and a down projection (1536 wide, post-GELU inputs: strongly anisotropic)."""


@pytest.fixture
def one_thread():
    """GPTQ's column sweep is thousands of small ops: on 2 shared cores a second torch thread spins against other
    processes (measured 20x slower under load). Restored after the test."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def minilm_calibration() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """name → (W out×in, Σ in×in float64): each target's weight and the second moment of the inputs it saw on 48
    review snippets (workers/calibration.py, as a run gathers it)."""
    from workers import data
    from workers.calibration import input_covariances
    from workers.data.packaged import packaged_source
    from workers.models import load_model, load_tokenizer, resolve_model

    source = resolve_model("minilm")
    model, tokenizer = load_model(source, "base").eval(), load_tokenizer(source)
    rows = data.read_source(packaged_source("reviews")[0]).train[:CALIBRATION_TEXTS]
    batch = tokenizer([r["text"] for r in rows], truncation=True, max_length=64, padding=True, return_tensors="pt")
    sigmas = input_covariances(model, CALIBRATION_TARGETS, [dict(batch)])
    return {n: (model.get_submodule(n).weight.detach().clone(), sigmas[n].double()) for n in CALIBRATION_TARGETS}
