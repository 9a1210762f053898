"""The GPU benchmarks run rarely (only when a device is lent): their CPU modes keep them from rotting between."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
SMOKE = ["--device", "cpu", "--smoke", "--steps", "2", "--warmup", "1"]


def run(*args, **kw):
    return subprocess.run(list(args), cwd=ROOT, env={**ENV, **kw.pop("env", {})}, capture_output=True, text=True,
                          timeout=600, check=False, **kw)


def test_train_mfu_prints_a_row_per_shape_and_a_summary():
    r = run(sys.executable, "benchmarks/train_mfu.py", *SMOKE, "--shapes", "gpt2-124m", "gpt2-350m",
            "--set", "optim.master_weights=on", "--inductor", "coordinate_descent_tuning=True")
    assert r.returncode == 0, r.stderr
    lines = [json.loads(x) for x in r.stdout.splitlines()]
    rows, summary = [x["row"] for x in lines[:-1]], lines[-1]
    assert [x["shape"] for x in rows] == [x["shape"] for x in summary["rows"]] == ["gpt2-124m", "gpt2-350m"]
    assert all(x["tokens_per_s"] > 0 and x["set"] == ["optim.master_weights=on"] for x in rows)
    bad = run(sys.executable, "benchmarks/train_mfu.py", *SMOKE, "--inductor", "no_such_knob=1")
    assert bad.returncode == 2 and "no_such_knob" in bad.stderr


def test_optim_step_times_both_implementations():
    r = run(sys.executable, "benchmarks/optim_step.py", "--device", "cpu", "--preset", "tiny", "--steps", "2")
    assert r.returncode == 0, r.stderr
    rows = [json.loads(x) for x in r.stdout.splitlines()]
    assert [x["master_weights"] for x in rows] == ["off", "on"] and all(x["ms_per_step"] > 0 for x in rows)
    assert rows[0]["params"] == rows[1]["params"]


def test_mfu_variants_keeps_each_finished_shape(tmp_path):
    env = {"OUT": str(tmp_path), "SHAPES": "gpt2-124m", "ARGS": " ".join(SMOKE)}
    r = run("bash", "benchmarks/mfu_variants.sh", "default", "master+fused", env=env)
    assert r.returncode == 0, r.stderr
    rows = [json.loads(x) for x in (tmp_path / "mfu.jsonl").read_text().splitlines()]
    assert [(x["variant"], x["shape"]) for x in rows] == [("default", "gpt2-124m"), ("master+fused", "gpt2-124m")]
    assert rows[1]["set"] == ["optim.master_weights=on", "run.fused_loss=on"]
    bad = run("bash", "benchmarks/mfu_variants.sh", "default", "nope", env=env)  # names checked before any run
    assert bad.returncode == 2 and "unknown variant 'nope'" in bad.stderr and "==" not in bad.stdout
    failing = run("bash", "benchmarks/mfu_variants.sh", "default", env={**env, "ARGS": env["ARGS"] + " --inductor x=1"})
    assert failing.returncode == 1 and "== default (exit 2)" in failing.stdout  # a failed variant fails the script
