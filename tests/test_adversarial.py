"""The adversarial pass of benchmarks/adversarial.py (60 cases over compose, convert-pyreft,
gates, router-only training, data, push and compare on files; a few seconds) stays clean:
every case ends in the expected result or one clear line, with no data loss."""

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "adversarial.py"


def test_every_adversarial_case_ends_well():
    proc = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=900)
    summary = proc.stdout.strip().splitlines()[-1]
    assert proc.returncode == 0 and "traceback 0, unclear 0, silent bad 0, data loss 0" in summary, (
        "\n".join(line for line in proc.stdout.splitlines() if line and not line.startswith("ok ")))
