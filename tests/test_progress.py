"""Progress when stderr is not a terminal (SLURM logs, nohup): lines with step, loss, images/s and ETA, also kept
in the run's train.log."""

import os
import re
import subprocess
import sys

import yaml

LINE = re.compile(r"step (\d+)/(\d+)  epoch \d+  loss (-?\d+\.\d+)  (\d+\.\d) images/s  ETA (\d\d:\d\d|\?)")


def test_progress_lines_when_stderr_is_a_file(tmp_path, tiny_recipe):
    raw = tiny_recipe(trainer={"epochs": 2, "progress": True, "progress_every_seconds": 0, "log_every_steps": 1})
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(raw))
    err = tmp_path / "stderr.txt"
    with err.open("w") as f:
        proc = subprocess.run([sys.executable, "-m", "sslkit.cli", "pretrain", str(path)], stderr=f,
                              stdout=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "2"}, timeout=600)
    assert proc.returncode == 0, err.read_text()[-2000:]
    text = err.read_text()
    steps = [int(m.group(1)) for m in LINE.finditer(text)]
    assert steps == list(range(1, 9)), text[-2000:]  # a line per step at interval 0, and no tqdm bar
    assert "\r" not in text
    last = LINE.findall(text)[-1]
    assert last[1] == "8" and float(last[3]) > 0
    log = (tmp_path / "runs" / "tiny" / "train.log").read_text()
    assert "run directory:" in log and len(LINE.findall(log)) == 8 and "finished at step 8" in log
