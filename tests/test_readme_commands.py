"""The commands the README shows run and say what the README says they say."""

import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ghostserve_sglang import control
from ghostserve_sglang.control import ControlError
from ghostserve_sglang.testing.local_server import eventually, free_port

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str) -> str:
    done = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_readme_opens_with_the_two_commands():
    lines = [line for line in (ROOT / "README.md").read_text().splitlines() if line.strip()]
    block = lines[lines.index("```sh") + 1 : lines.index("```")]
    assert [line.split("#")[0].strip() for line in block] == ["make run", "make test"]
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in ci


@dataclasses.dataclass
class MakeRun:
    port: int
    process: subprocess.Popen
    log_path: Path
    banner: str = ""


@pytest.fixture(scope="module")
def make_run(tmp_path_factory):
    """The server ``make run`` starts, once its banner is out; stopped at the end if a test did not."""
    port = free_port()
    log_path = tmp_path_factory.mktemp("make-run") / "make-run.log"
    with open(log_path, "w") as log:
        make = subprocess.Popen(["make", "run", f"RUN_PORT={port}"], cwd=ROOT, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 600
        while "server ready at" not in log_path.read_text():
            assert make.poll() is None and time.monotonic() < deadline, log_path.read_text()[-3000:]
            time.sleep(0.2)
        yield MakeRun(port, make, log_path, log_path.read_text().split("server ready at", 1)[1])
    finally:
        if make.poll() is None:
            os.killpg(make.pid, signal.SIGTERM)
            make.wait(timeout=120)


def test_drills_are_refused_unless_enabled(make_run):
    """``make run`` starts without --ghost-enable-fault-injection: every drill is refused, in one line
    naming the flag. (Runs before the next test, which stops this server.)"""
    for op, args in (("inject-fault", {"ranks": [0]}), ("kill-rank", {"rank": 0}),
                     ("corrupt-parity", {"rank": 0, "slots": 1}), ("drain", {"pause": True})):
        with pytest.raises(ControlError, match="ghost-enable-fault-injection"):
            control.call(str(make_run.port), op, args)


def test_make_run_serves_a_protected_tp2_server_and_prints_how_to_use_it(make_run):
    """The banner's text request, chat request, metrics and scrub commands all work as printed; a stop of
    the whole process group leaves nothing behind."""
    port, make, log_path, banner = make_run.port, make_run.process, make_run.log_path, make_run.banner
    try:

        def command(label: str) -> str:
            return re.search(rf"{label}:\s+(.*)", banner).group(1)

        def shell(line: str) -> str:
            return subprocess.run(line, shell=True, capture_output=True, text=True, timeout=300).stdout

        reply = json.loads(shell(command("try")))
        assert '"text": ' in command("try") and reply["text"].strip(), reply
        assert reply["meta_info"]["completion_tokens"] > 0
        chat = json.loads(shell(command("chat")))
        assert chat["choices"][0]["message"]["content"].strip(), chat
        metrics = shell(command("metrics"))
        assert "ghostserve_steps_captured_total" in metrics, metrics[:2000]
        done = subprocess.run(command("check").split(), capture_output=True, text=True, timeout=300)
        assert done.returncode == 0 and " 0 mismatching" in done.stdout, done.stdout + done.stderr
    finally:
        os.killpg(make.pid, signal.SIGTERM)  # as Ctrl-C in a terminal: every process of the group
        make.wait(timeout=120)
    def files_removed() -> bool:  # the group's last processes may still be removing their files
        left = [n for n in os.listdir("/dev/shm") if n.startswith(f"ghostserve-{port}")]
        assert not left, left
        return True

    eventually(files_removed, timeout_s=10)
    assert "fail stop" not in log_path.read_text()  # stopping the whole server is not a fault


def test_readme_documents_every_ghost_flag_and_its_variable():
    from ghostserve_sglang.settings import OPTIONS

    readme = (ROOT / "README.md").read_text()
    for option in OPTIONS:
        assert f"| `{option.flag}` | `{option.env}` |" in readme


def test_benchmark_report_renders_from_its_committed_results(tmp_path):
    import shutil

    committed = ROOT / "benchmarks" / "results" / "cpu"
    for name in ("results.json", "codec.txt"):
        shutil.copy(committed / name, tmp_path / name)
    run("benchmarks/report.py", "--render-only", "--out", str(tmp_path))
    report = (tmp_path / "report.md").read_text()
    assert "## Against the paper's claims" in report and "- command: `python benchmarks/report.py" in report
    assert len(list(tmp_path.glob("fig*.png"))) == 4
    readme = (ROOT / "README.md").read_text()
    assert "python benchmarks/report.py" in readme and "benchmarks/results/cpu/report.md" in readme


def test_codec_demo_rebuilds_lost_ranks_bit_exact():
    out = run("-m", "ghostserve_sglang.codec.demo", "--tokens", "64")
    assert "bit-exact: True" in out


def test_codec_benchmark_prints_a_row_per_geometry_backend_and_op():
    out = run("benchmarks/codec_bench.py", "--sizes", "64KiB", "--min-seconds", "0")
    rows = [line for line in out.splitlines() if line.startswith(("| encode-", "| rebuild-"))]
    backends = {row.split("|")[2].strip() for row in rows}
    assert {"torch", "isal"} <= backends
    assert len(rows) == 9 * 2 * len(backends)
    assert "command: python benchmarks/codec_bench.py --sizes 64KiB" in out


def test_drain_benchmark_reports_throughput_ratio_and_lag():
    out = run("benchmarks/drain_bench.py", "--seconds", "0.3", "--rate", "50", "--gil-steps", "2")
    assert "python record writes:" in out and "native record writes:" in out and "ratio" in out
    assert "beside a busy Python thread" in out and "of its speed" in out
    assert "p50" in out and "p99" in out and "drops 0" in out
