"""benchmarks/gpu.sh --smoke: the GPU check's whole path at toy sizes on the CPU, so it cannot rot before a GPU
session runs it for real."""
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_gpu_check_runs_at_smoke_sizes():
    result = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu.sh"), "--smoke"], capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    table = result.stdout
    for row in ("student tiny eager fp32", "loader 0 worker(s)", "loader 1 worker(s)",
                "precompute: teachers' forward", "precompute: end to end", "offline student (stored targets)",
                "online student (live teachers)"):
        assert f"| {row}" in table, row
    assert "losses equal bit for bit" in table, "the killed and resumed run matches the uninterrupted one"
    assert "| jpeg: 16 mosaics decoded on cpu against the CPU" in table and "| 16 bit for bit; largest difference 0," in table
