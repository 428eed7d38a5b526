"""The commands the README shows run and say what the README says they say."""

import subprocess
import sys
from pathlib import Path

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
    out = run("benchmarks/drain_bench.py", "--seconds", "0.3", "--rate", "50")
    assert "throughput:" in out and "ratio" in out
    assert "p50" in out and "p99" in out and "drops 0" in out
