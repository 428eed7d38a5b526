"""GhostServe installed like any library: its wheel is built, installed into a fresh virtual environment
(SGLang and the other dependencies come from this environment's site-packages, as from a system
installation), and a protected TP=2 server is started from there, outside the checkout, with
``python -m ghostserve_sglang.launch``. The server is also the smoke test of an SGLang release
(``make check-sglang``): a fault is rebuilt and a killed rank replaced, every token unchanged."""

from __future__ import annotations

import json
import os
import pathlib
import random
import shutil
import subprocess
import sys
import sysconfig

import pytest

from ghostserve_sglang.testing.campaign import LONG_PROMPT, request_mix, run_kill_trial, run_trial
from ghostserve_sglang.testing.local_server import launched

CHECKOUT = pathlib.Path(__file__).resolve().parents[1]
GHOST = ["--ghost-code", "xor", "--ghost-enable-fault-injection", "1", "--ghost-strict", "1",
         "--ghost-rejoin-timeout-seconds", "240"]


def run(*command, cwd) -> str:
    result = subprocess.run([str(c) for c in command], cwd=cwd, capture_output=True, text=True,
                            env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert result.returncode == 0, f"{command}: {result.stdout[-2000:]}{result.stderr[-3000:]}"
    return result.stdout


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> pathlib.Path:
    """The python of a fresh environment holding GhostServe's wheel; it starts in a folder of its own."""
    root = tmp_path_factory.mktemp("wheel")
    source = root / "source"  # a copy, so that the build leaves nothing in the checkout
    shutil.copytree(CHECKOUT, source, ignore=shutil.ignore_patterns(
        ".git", "__pycache__", "*.egg-info", "build", ".*_cache", ".hypothesis", "*.safetensors",
        "tokenizer*.json", "results", "dashboards"))
    run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", root / "dist",
        source, cwd=root)
    wheel = next((root / "dist").glob("ghostserve_sglang-*.whl"))
    shutil.rmtree(source)
    env = root / "env"
    run(sys.executable, "-m", "venv", env, cwd=root)
    python = env / "bin" / "python"
    run(python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", wheel, cwd=root)
    # Then SGLang and the rest from this environment, as a system site-packages would give them.
    site = pathlib.Path(run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])",
                            cwd=root).strip())
    (site / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return python


def test_the_wheel_carries_the_declarations_and_models(installed):
    cwd = installed.parents[2]
    where = json.loads(run(installed, "-c", "import json, ghostserve_sglang, sglang; print(json.dumps("
                           "[ghostserve_sglang.__file__, sglang.__file__]))", cwd=cwd))
    assert where[0].startswith(str(installed.parents[1])), where  # the wheel's copy, not the checkout
    assert not where[0].startswith(str(CHECKOUT))
    checked = subprocess.run([installed.parent / "ghostserve", "check-sglang"], cwd=cwd, capture_output=True,
                             text=True)
    assert checked.returncode == 0 and "supported; all" in checked.stdout, checked.stderr[-2000:]
    model = pathlib.Path(run(installed, "-m", "ghostserve_sglang.models", "tiny-llama", cwd=cwd).strip())
    assert model.is_relative_to(installed.parents[1]) and (model / "model.safetensors").exists()


def test_a_tp2_server_from_the_wheel_rebuilds_a_fault_and_replaces_a_killed_rank(installed, tmp_path):
    cwd = installed.parents[2]
    model = run(installed, "-m", "ghostserve_sglang.models", "tiny-llama", cwd=cwd).strip()
    with launched(2, GHOST, ["--chunked-prefill-size", "128"], log_dir=str(tmp_path), model=model,
                  python=str(installed), cwd=str(cwd)) as server:
        status = subprocess.run([installed.parent / "ghostserve", "--port", str(server.port), "status",
                                 "--json"], capture_output=True, text=True, cwd=cwd)
        assert status.returncode == 0, status.stderr
        assert [r["code"] for r in json.loads(status.stdout)["ranks"]] == ["xor", "xor"]

        trial = run_trial(server, seed=7, ranks=2)
        assert trial.ok and trial.running_at_fault > 0, trial
        assert trial.recovery["outcome"] == "rebuilt" and trial.recovery["slots_rebuilt"] > 0, trial
        assert trial.scrub["mismatching"] == 0 and trial.scrub["not_durable"] == 0, trial.scrub

        mix = request_mix(random.Random(8), requests=7) + [LONG_PROMPT]
        killed = run_kill_trial(server, 8, ranks=[1], how="KILL", after_steps=12, mix=mix)
        assert killed.running_at_kill >= 4, killed
        assert killed.lost_requests == 0 and killed.wrong_tokens == 0, killed
        assert killed.restart["restart"] and killed.restart["slots_rebuilt"] > 0, killed.restart
        assert killed.scrub["mismatching"] == 0 and killed.scrub["not_durable"] == 0, killed.scrub
