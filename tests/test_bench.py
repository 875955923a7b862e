"""The benchmark must keep running: one quick pass (real kernels, every row), no timing
thresholds here (those are bench/'s business)."""
import json
import os
import subprocess
import sys

import pytest

BENCH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "bench", "run.py")


# Every way a kernel starts, cold and warm, a user's first kernel and three scale runs: a
# loaded machine takes minutes.
@pytest.mark.timeout(600)
def test_bench_quick_runs_every_row(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, BENCH, "--quick", "--json", str(out),
                           "--log", str(tmp_path / "kernels.log")],
                          capture_output=True, text=True, timeout=540, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for row in ("start, default (warm), argv", "start, default (warm), provisioner",
                "start, --cold, argv", "start, a user's first kernel", "round trip p50, bridge",
                "round trip p50, direct ipc", "print 4 MB, bridge", "display 2 MB, direct ipc",
                "memory PSS per kernel (template over", "memory PSS, one kernel alone",
                "memory PSS per kernel, --cold", "4 starts at once", "4 starts at once, --cold",
                "start, argv, --seccomp off", "round trip p50, bridge, --seccomp off",
                "download 4 MB, proxy (vs --network host)", "launcher CPU per GB, proxy"):
        assert row in proc.stdout, proc.stdout
    raw = json.loads(out.read_text())
    assert raw["start"]["plain"] and raw["start"]["isolated"]
    for lane in ("plain tcp", "bridge", "plain ipc", "direct ipc"):
        assert len(raw["rtt"][lane]) == 20 and min(raw["rtt"][lane]) > 0
        assert raw["pss_mb"][lane] > 1
    for kind in ("isolated", "cold"):
        assert all(elapsed > 0 and pss > 0 for elapsed, _, pss in raw["scale"][kind])
    assert raw["pss_mb alone"]["isolated"] > 1
    # (The proxy's CPU for 12 MB is below the clock tick /proc counts in: no check here.)
    assert len(raw["download"]["proxy"]) == len(raw["download"]["host"]) == 3
    assert min(raw["download"]["proxy"]) > 0


def test_bench_soak_runs(tmp_path):
    proc = subprocess.run([sys.executable, BENCH, "--soak", "4", "--alive", "2",
                           "--log", str(tmp_path / "kernels.log")],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("started | template RSS MB") and lines[-1].startswith("4 kernels")
    # After 2 and 4 starts, and once all stopped: below the template then only the pair
    # it keeps forked for the next request.
    assert [line.split(" | ")[0] for line in lines[1:4]] == ["2", "4", "all stopped"]
    assert lines[3].split(" | ")[5] == "2", lines[3]
