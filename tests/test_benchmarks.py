"""The GPU benchmarks run rarely (only when a device is lent): their CPU modes keep them from rotting between."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
SMOKE = ["--device", "cpu", "--smoke", "--steps", "2", "--warmup", "1"]


def run(*args, **kw):
    return subprocess.run(list(args), cwd=ROOT, env={**ENV, **kw.pop("env", {})}, capture_output=True, text=True,
                          timeout=600, check=False, **kw)


def test_train_mfu_prints_a_row_per_shape_and_a_summary():
    r = run(sys.executable, "benchmarks/train_mfu.py", *SMOKE, "--shapes", "gpt2-124m", "gpt2-350m",
            "--set", "optim.master_weights=on", "--inductor", "coordinate_descent_tuning=True", "--rope", "swap")
    assert r.returncode == 0, r.stderr
    lines = [json.loads(x) for x in r.stdout.splitlines()]
    rows, summary = [x["row"] for x in lines[:-1]], lines[-1]
    assert [x["shape"] for x in rows] == [x["shape"] for x in summary["rows"]] == ["gpt2-124m", "gpt2-350m"]
    assert all(x["tokens_per_s"] > 0 and x["set"] == ["optim.master_weights=on"] and x["rope"] == "swap" for x in rows)
    bad = run(sys.executable, "benchmarks/train_mfu.py", *SMOKE, "--inductor", "no_such_knob=1")
    assert bad.returncode == 2 and "no_such_knob" in bad.stderr


def test_optim_step_times_both_implementations():
    r = run(sys.executable, "benchmarks/optim_step.py", "--device", "cpu", "--preset", "tiny", "--steps", "2")
    assert r.returncode == 0, r.stderr
    rows = [json.loads(x) for x in r.stdout.splitlines()]
    assert [x["master_weights"] for x in rows] == ["off", "on"] and all(x["ms_per_step"] > 0 for x in rows)
    assert rows[0]["params"] == rows[1]["params"] and not any(x["in_place"] for x in rows)  # no Triton kernels on CPU


def test_stragglers_names_a_fast_slowdown_of_one_rank_and_never_a_common_one():
    r = run(sys.executable, "benchmarks/stragglers.py", "--steps", "100", "--seeds", "1", "--sigmas", "0.05",
            "--drift", "0.3", "--drift-steps", "60")
    assert r.returncode == 0, r.stderr
    rows = [json.loads(x) for x in r.stdout.splitlines()]
    noise, drift = [x for x in rows if x["case"] == "noise"], [x for x in rows if x["case"] == "drift"]
    assert len(noise) == 5 and all(x["flagged_steps"] == [0] for x in noise)  # 5% noise, seeded: no false flag
    assert len(drift) == 12 and all((x["first_flag"] is None) == x["common"] for x in drift)
    recover = [x for x in rows if x["case"] == "recover"]
    assert len(recover) == 8 + 2  # with no or small fixed costs the shares come back to equal after a slowdown
    assert all(x["step_vs_equal"] == 1.0 and len(set(x["shares"])) == 1 for x in recover if x["fixed_s"] <= 0.05)
    assert all(x["steps_to_even"] <= 50 for x in recover if x["fixed_s"] <= 0.1)  # noisy (fixed 0.1) too


def test_mfu_variants_keeps_each_finished_shape(tmp_path):
    args = ["--out", str(tmp_path), "--shapes", "gpt2-124m", "--args", " ".join(SMOKE)]
    r = run(sys.executable, "benchmarks/mfu_variants.py", *args, "default", "plain")
    assert r.returncode == 0, r.stderr
    rows = [json.loads(x) for x in (tmp_path / "mfu.jsonl").read_text().splitlines()]
    assert [(x["variant"], x["shape"]) for x in rows] == [("default", "gpt2-124m"), ("plain", "gpt2-124m")]
    assert rows[1]["set"] == ["optim.master_weights=off", "run.fused_loss=off"]
    bad = run(sys.executable, "benchmarks/mfu_variants.py", *args, "default", "nope")  # names checked before any run
    assert bad.returncode == 2 and "unknown variant 'nope'" in bad.stderr and "==" not in bad.stdout
    failing = run(sys.executable, "benchmarks/mfu_variants.py", "--out", str(tmp_path), "--shapes", "gpt2-124m",
                  "--args", " ".join(SMOKE) + " --inductor x=1", "default")
    assert failing.returncode == 1 and "== default gpt2-124m (exit 2)" in failing.stdout  # a failure fails it


def test_mfu_variants_memory_cuts_waves_and_each_times_one_job_at_a_time(tmp_path):
    """--parallel --memory: jobs in order, in waves whose memory estimates fit; every job of a wave warms up
    beside the others, then times alone (train_mfu's Gate); each wave has its own gate."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import mfu_variants as mv
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    jobs = mv.parse_jobs(["default@gpt2-1.5b", "plain@gpt2-1.5b", "default@gpt2-124m", "plain@gpt2-124m"], [], True)
    cut = mv.waves(jobs, 135)  # the H200: two 1.5B jobs and one 124M job, then the last
    assert [[f"{j.variant}@{j.shapes[0]}" for j in w] for w in cut] == [
        ["default@gpt2-1.5b", "plain@gpt2-1.5b", "default@gpt2-124m"], ["plain@gpt2-124m"]]
    assert [len(w) for w in mv.waves(jobs, 40)] == [1, 1, 1, 1] and mv.waves(jobs, 0) == [jobs]
    jobs = mv.parse_jobs(["default@gpt2-1.5b", "default@gpt2-124m", "default@gpt2-774m", "lossk@gpt2-124m"], [], True)
    assert [len(w) for w in mv.waves(jobs, 135)] == [3, 1]  # device_call's default on the H200: lossk's 4 GiB more
    assert [len(w) for w in mv.waves(jobs, 76)] == [2, 2]  # the H100 80GB
    jobs = ["swap@gpt2-124m", "master@gpt2-350m", "default@gpt2-124m"]  # 23 + 27 GiB fit 50, then 23
    r = run(sys.executable, "benchmarks/mfu_variants.py", "--parallel", "--memory", "50", "--out", str(tmp_path),
            "--args", " ".join(SMOKE), *jobs)
    assert r.returncode == 0, r.stderr
    assert "== wave 1/2: swap@gpt2-124m master@gpt2-350m" in r.stdout and "== wave 2/2: default@gpt2-124m" in r.stdout
    rows = [json.loads(x) for x in (tmp_path / "mfu.jsonl").read_text().splitlines()]
    assert sorted(f"{x['variant']}@{x['shape']}" for x in rows) == sorted(jobs)
    gates = sorted((sorted(f.name for f in g.glob("ready.*")) for g in tmp_path.glob("mfu-gate-*")), key=len)
    assert gates == [["ready.default_gpt2-124m"], ["ready.master_gpt2-350m", "ready.swap_gpt2-124m"]]  # both waited


def test_device_call_brings_back_rows_summary_and_profiles(tmp_path):
    """benchmarks/device_call.sh, the acceptance's device call, in its CPU mode: what it leaves in $OUT."""
    import tarfile

    r = run("bash", "benchmarks/device_call.sh", "plain@gpt2-124m",  # one job: several are mfu_variants' tests
            env={"OUT": str(tmp_path), "ARGS": " ".join(SMOKE), "OPTIM": "1",
                 "OPTIM_ARGS": "--device cpu --preset tiny --steps 1 --warmup 0 --tiles 1024x4x4"})
    assert r.returncode == 0, r.stdout + r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mfu.jsonl", "optim.jsonl", "profiles.tgz", "summary.txt"]
    optim = [json.loads(x) for x in (tmp_path / "optim.jsonl").read_text().splitlines()]  # no in-place rows on CPU
    assert [x["master_weights"] for x in optim] == ["off", "on"] and all(x["preset"] == "tiny" for x in optim)
    rows = [json.loads(x) for x in (tmp_path / "mfu.jsonl").read_text().splitlines()]
    assert [x["variant"] for x in rows] == ["plain"]
    summary = (tmp_path / "summary.txt").read_text()
    assert "commit " in summary and "torch " in summary and "gpt2-124m  plain" in summary and "ms/step" in summary
    with tarfile.open(tmp_path / "profiles.tgz") as tar:
        names = tar.getnames()
    assert "./profiles/plain_gpt2-124m/kernels-gpt2-124m.txt" in names and "./mfu-plain_gpt2-124m.log" in names


def test_gate_waits_for_every_job_then_excludes(tmp_path):
    """A process enters only when all expected tags are ready or gone, and only while no other holds the lock."""
    import fcntl
    import threading

    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from train_mfu import Gate
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))

    entered = []
    g = Gate(tmp_path, "a", 3)
    t = threading.Thread(target=lambda: (g.__enter__(), entered.append(1), g.__exit__(None, None, None)))
    with open(tmp_path / "gpu.lock", "w") as other:  # another job is timing
        fcntl.flock(other, fcntl.LOCK_EX)
        t.start()
        t.join(1.0)
        assert not entered and (tmp_path / "ready.a").exists()  # "b" and "c" not there yet
        (tmp_path / "ready.b").touch()
        (tmp_path / "exit.c").touch()  # c crashed: the driver says so
        t.join(1.5)
        assert not entered  # everyone has arrived, but the GPU is still taken
    t.join(5.0)
    assert entered == [1]
    with open(tmp_path / "gpu.lock", "w") as f:  # released after the timed part
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)


def test_trace_gaps_splits_idle_into_host_late_and_device_gaps():
    """Three kernels: a 2 us gap whose next kernel was launched long before (device-side), then a 30 us gap
    whose next kernel's launch started only after the GPU went idle (host-late), with a sync and a pin_memory
    on the host meanwhile."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import trace_gaps
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))

    def ev(cat, name, ts, dur, corr=None):
        return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, **({"args": {"correlation": corr}}
                                                                               if corr is not None else {})}
    events = [ev("kernel", "a", 0, 10, 1), ev("kernel", "b", 12, 8, 2), ev("kernel", "c", 50, 10, 3),
              ev("cuda_runtime", "cudaLaunchKernel", 1, 1, 2), ev("cuda_runtime", "cudaLaunchKernel", 45, 2, 3),
              ev("cuda_runtime", "cudaStreamSynchronize", 21, 3), ev("cpu_op", "aten::pin_memory", 25, 15),
              ev("cpu_op", "before_idle", 0, 5), ev("Trace", "PyTorch Profiler (0)", -5, 100),
              ev("gpu_user_annotation", "Optimizer.step#AdamW.step", 0, 60)]
    found, span, busy = trace_gaps.gaps(events)
    assert (span, busy) == (60, 28)
    assert [(g.us, g.before, g.after, g.host_late) for g in found] == [(2, "a", "b", False), (30, "b", "c", True)]
    during = trace_gaps.host_during(events, [(g.start, g.end) for g in found if g.host_late])
    assert during == {"cudaStreamSynchronize": 3, "aten::pin_memory": 15, "cudaLaunchKernel": 2}  # host work only
    text = trace_gaps.summary(events, steps=2)
    assert text.startswith("per step (2 traced): span 0.03 ms, GPU busy 0.01 ms, idle 0.02 ms in 1.0 gaps; "
                           "host-late 0.01 ms in 0.5 gaps")
    assert "cudaStreamSynchronize" in text.split("can block the host")[1]
    # two streams: b and c run inside a's time, so the only gap is after a; d and e start together after it, and
    # e was launched before the GPU went idle: not host-late
    streams = [ev("kernel", "a", 0, 100, 1), ev("kernel", "b", 10, 10, 2), ev("kernel", "c", 30, 10, 3),
               ev("kernel", "d", 150, 10, 4), ev("kernel", "e", 150, 5, 5),
               ev("cuda_runtime", "cudaLaunchKernel", 120, 1, 4), ev("cuda_runtime", "cudaLaunchKernel", 90, 1, 5)]
    found, span, busy = trace_gaps.gaps(streams)
    assert (span, busy) == (160, 110)
    assert [(g.start, g.end, g.host_late) for g in found] == [(100, 150, False)]


def test_kernel_compare_scales_each_class_by_its_ratio_and_brackets_the_gap(tmp_path):
    """Two cards' tables of one shape: matmuls equal, attention 1.1x, memory-bound kernels 1.4x (the median of
    1.4, 1.4 and an outlier 3.0; a kernel under --min-ms and one only A ran are not compared). The projection of a
    third table (newer code of B's card) scales each kernel by its class: 100 + 10 x 0.1 + 20 x 0.4 = 9 ms more."""
    def table(name, device, rows):
        body = "\n".join(f"{50.0:5.1f}%  {ms:8.3f} ms/step  x48   {k}" for k, ms in rows)
        (tmp_path / name).write_text(f"device time over 3 steps: {3 * device:.1f} ms ({device:.1f} ms/step)\n"
                                     f"  matmul 50.0% 1.0 ms/step\n\n{body}\n")
    gemm, attn = "nvjet_sm90_tst_192x192_64x3_1x2_h_bz_coopB_NNN", "cudnn_generated_fort_native_sdpa_sm90_flash_bprop"
    table("a.txt", 0, [(gemm, 30.0), (attn, 11.0), ("triton_poi_silu", 2.8), ("_adamw_kernel", 14.0),
                       ("dot_do_o", 3.0), ("Memset (Device)", 0.4), ("only_a", 5.0)])
    table("b.txt", 0, [(gemm, 30.0), (attn, 10.0), ("triton_poi_silu", 2.0), ("_adamw_kernel", 10.0),
                       ("dot_do_o", 1.0), ("Memset (Device)", 0.2)])
    table("c.txt", 130.0, [(gemm, 100.0), (attn, 10.0), ("_swiglu_backward_kernel", 20.0)])
    r = run(sys.executable, "benchmarks/kernel_compare.py", str(tmp_path / "a.txt"), str(tmp_path / "b.txt"),
            "--project", str(tmp_path / "c.txt"), "--wall", "135", "--mfu", "50")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[:3] == ["matmul       1 kernels in both  time ratio A/B 1.000",
                         "attention    1 kernels in both  time ratio A/B 1.100",
                         "memory       3 kernels in both  time ratio A/B 1.400"]
    # 135 + 9 = 144 ms with C's 5 ms gap kept (50 x 135 / 144 = 46.875%), 139 ms without (48.56%)
    assert lines[3] == ("projected: device 139.0 ms/step; wall 144.0 ms (46.9% MFU) with C's gap, "
                        "139.0 ms (48.6%) without")
    (tmp_path / "x.txt").write_text("not a table\n")
    bad = run(sys.executable, "benchmarks/kernel_compare.py", str(tmp_path / "x.txt"), str(tmp_path / "b.txt"))
    assert bad.returncode == 2 and "x.txt: not a train_mfu.py kernel table" in bad.stderr
    half = run(sys.executable, "benchmarks/kernel_compare.py", str(tmp_path / "a.txt"), str(tmp_path / "b.txt"),
               "--project", str(tmp_path / "c.txt"))
    assert half.returncode == 2 and "--project needs --wall and --mfu" in half.stderr


def test_trace_gaps_names_the_host_op_behind_each_small_kernel():
    """Memsets and short kernels grouped by the innermost host op (and its parent) around their launch call, on
    that call's thread: a zeros inside attention's backward, a fill inside zero_ on another thread, and a launch
    after the enclosing ops closed."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import trace_gaps
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))

    def ev(cat, name, ts, dur, corr=None, tid=1):
        return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "tid": tid,
                **({"args": {"correlation": corr}} if corr is not None else {})}
    events = [ev("cpu_op", "aten::_cudnn_attention_backward", 0, 50), ev("cpu_op", "aten::zeros", 2, 5),
              ev("cpu_op", "aten::zero_", 3, 3), ev("cuda_runtime", "cudaMemsetAsync", 4, 1, 1),
              ev("cpu_op", "aten::mm", 10, 5), ev("cuda_runtime", "cudaLaunchKernel", 12, 1, 2),
              ev("cuda_runtime", "cudaLaunchKernel", 20, 1, 3),  # inside the backward only: its child has closed
              ev("user_annotation", "## Call CompiledFxGraph ##", 300, 20), ev("cpu_op", "aten::mm", 302, 2),
              ev("cuda_runtime", "cudaLaunchKernel", 310, 1, 6),  # a compiled graph's own launch: no aten op
              ev("cpu_op", "aten::fill_", 0, 100, tid=2), ev("cuda_runtime", "cudaMemsetAsync", 30, 1, 4, tid=2),
              ev("cuda_runtime", "cudaMemsetAsync", 200, 1, 5),  # no op open any more
              ev("gpu_memset", "Memset (Device)", 60, 1.0, 1), ev("kernel", "nvjet_big", 62, 40.0, 2),
              ev("kernel", "tiny_dot", 103, 2.0, 3), ev("gpu_memset", "Memset (Device)", 106, 1.5, 4),
              ev("gpu_memset", "Memset (Device)", 210, 1.0, 5), ev("kernel", "triton_poi_fused", 320, 1.0, 6)]
    assert trace_gaps.issuers(events) == {1: "aten::zero_ < aten::zeros",
                                          2: "aten::mm < aten::_cudnn_attention_backward",
                                          3: "aten::_cudnn_attention_backward", 4: "aten::fill_", 5: "(no op)",
                                          6: "## Call CompiledFxGraph ##"}
    assert trace_gaps.small_kernels(events, 3.0) == {
        ("Memset", "aten::zero_ < aten::zeros"): (1, 1.0), ("tiny_dot", "aten::_cudnn_attention_backward"): (1, 2.0),
        ("Memset", "aten::fill_"): (1, 1.5), ("Memset", "(no op)"): (1, 1.0),
        ("triton_poi_fused", "## Call CompiledFxGraph ##"): (1, 1.0)}  # nvjet_big: 40 us, not small
    assert "GPU events under 3 us by the host op that launched them" in trace_gaps.summary(events)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs Triton (its interpreter on a CPU)")
def test_loss_kernel_times_the_reference_and_each_tile():
    r = run(sys.executable, "benchmarks/loss_kernel.py", "--device", "cpu", "--rows", "6", "--vocab", "700",
            "--iters", "1", "--compile", "off", "--tiles", "512x4x1", "256x2x3", env={"TRITON_INTERPRET": "1"})
    assert r.returncode == 0, r.stderr
    rows = [json.loads(x) for x in r.stdout.splitlines()]
    assert [x["impl"] for x in rows] == ["eager", "kernel", "kernel"] and [x.get("tile") for x in rows[1:]] == [
        "512x4x1", "256x2x3"]
    assert all(x["ms"] > 0 and x["loss_rel_diff"] < 1e-6 and x["grad_max_diff"] < 1e-2 for x in rows[1:])
    bad = run(sys.executable, "benchmarks/loss_kernel.py", "--tiles", "1000x4x1")
    assert bad.returncode == 2 and "powers of two" in bad.stderr


def test_mfu_variants_stopped_by_sigterm_still_reports(tmp_path):
    """device_call.sh stops the driver at its time budget (SIGTERM): it stops the running job, collects what it
    measured, and prints the table, so the finished shapes come back (the device tool's own kill loses all)."""
    import signal
    import time

    proc = subprocess.Popen([sys.executable, "benchmarks/mfu_variants.py", "--parallel", "--out", str(tmp_path),
                             "--args", "--device cpu --smoke --steps 5000 --warmup 1", "plain@gpt2-124m"],
                            cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(8)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert "== plain gpt2-124m (exit -15: driver stopped)" in out and "shape      variant" in out
    assert (tmp_path / "mfu.jsonl").exists()
