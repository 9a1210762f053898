import os
import subprocess
import sys

import pytest

from megacluster import config
from megacluster.errors import InputError


def test_presets_build_and_have_nanogpt_shapes():
    shapes = {"gpt2-124m": (768, 12, 12), "gpt2-350m": (1024, 24, 16), "gpt2-774m": (1280, 36, 20),
              "gpt2-1.5b": (1600, 48, 25)}
    for name, (d, L, h) in shapes.items():
        m = config.build(name).model
        assert (m.d_model, m.n_layer, m.n_head, m.seq_len) == (d, L, h, 1024)
    llama = config.build("llama-1b").model
    assert (llama.n_kv_head, llama.tie_embeddings) == (8, False)


def test_toml_then_set_then_validate(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('[model]\nd_model = 64\nn_head = 2\n[optim]\nschedule = "wsd"\n[data]\npaths = ["a.txt"]\n')
    cfg = config.build("tiny", str(f), ["optim.lr=1e-3", "run.resume=true", "data.paths=x.txt,y.txt"])
    assert (cfg.model.d_model, cfg.model.n_head, cfg.optim.schedule) == (64, 2, "wsd")
    assert cfg.optim.lr == 1e-3 and cfg.run.resume is True and cfg.data.paths == ["x.txt", "y.txt"]
    as_toml = config.build("tiny", None, ["data.paths=['x,1.txt', \"y.txt\"]"]).data.paths  # as the file writes it
    assert as_toml == ["x,1.txt", "y.txt"]
    assert config.build("tiny", None, ["data.paths=[draft].txt,b"]).data.paths == ["[draft].txt", "b"]  # not TOML
    with pytest.raises(InputError, match="data.paths: expected a list of strings, got \\[1\\]"):
        config.build("tiny", None, ["data.paths=[1]"])
    assert config.build("tiny", None, ["data.paths=[]"]).data.paths == []  # the default corpus (was the path "[]")
    with pytest.raises(InputError, match="data.paths: empty; give values separated by commas, or \\[\\] for none"):
        config.build("tiny", None, ["data.paths="])  # an empty shell variable silently meant the default corpus


@pytest.mark.parametrize("override, needle", [
    ("model.widht=3", "unknown config key 'model.widht'"),
    ("modle.d_model=3", "section one of"),
    ("model.n_layer=abc", "model.n_layer: expected an integer"),
    ("model.n_layer=0", "model.n_layer: must be > 0"),
    ("optim.schedule=linear", "optim.schedule: 'linear' is not allowed; choose one of cosine, wsd, constant"),
    ("run.balance=fast", "run.balance"),
    ("model.n_head=3", "divisible by model.n_head"),
    ("run.resume=maybe", "expected true or false"),
    ("data.val_fraction=1.5", "data.val_fraction: must be in (0, 1), got 1.5"),
    ("data.val_fraction=0", "data.val_fraction: must be in (0, 1), got 0.0"),
    ("optim.min_lr_ratio=-0.5", "optim.min_lr_ratio: must be in [0, 1), got -0.5"),
    ("optim.min_lr_ratio=1", "optim.min_lr_ratio: must be in [0, 1), got 1.0"),
    ("noequals", "expected section.key=value"),
    ("optim.eps=-1", "optim.eps: must be > 0"),
    ("run.max_steps=0", "run.max_steps: must be > 0"),
    ("model.norm_eps=nan", "model.norm_eps: expected a finite number"),
    ("run.hang_timeout=inf", "run.hang_timeout: expected a finite number"),
    ("run.run_dir=", "run.run_dir (--run-dir): must name a directory"),
    ("run.seed=9223372036854775808", "run.seed: '9223372036854775808' is out of range (a 64-bit integer)"),
    ("run.hang_timeout=0.01", "run.hang_timeout: must be >= 1"),  # every worker would count as hung
    # upper bounds: past them a typo crashed deep inside (lr_at's float overflow, a timedelta overflow in every
    # worker, a BPE trainer abort, a MemoryError) instead of exiting 2
    ("optim.warmup_steps=1" + "0" * 400, "optim.warmup_steps: '1" + "0" * 400 + "' is out of range (a 64-bit"),
    ("optim.lr=1e300", "optim.lr: '1e300' is out of range (at most 3.403e+38"),
    ("model.vocab_size=100000000000", "model.vocab_size: must be <= 16,777,216, got 100000000000"),
    ("run.batch_size=100000000000", "run.batch_size: must be <= 16,777,216"),
    ("run.hang_timeout=1e12", "run.hang_timeout: must be <= 1,000,000.0"),
    ("model.init_std=1e30", "model.init_std: must be <= 1.0"),  # diverged at step 2, blaming the lr
    ("model.norm_eps=1e30", "model.norm_eps: must be <= 1.0"),  # trained at exactly ln V, exit 0
])
def test_bad_overrides_name_the_key(override, needle):
    with pytest.raises(InputError, match=None) as e:
        config.build("tiny", None, [override])
    assert needle in str(e.value)


def test_a_blank_chaos_spec_is_no_chaos():
    """Only separators: no fault, so not a supervised run for nothing (it used to start one)."""
    assert config.build("tiny", None, ["run.chaos= ; ;"]).run.chaos == ""


def test_each_key_has_one_range_check():
    tables = [config.POSITIVE, config.NON_NEGATIVE, config.UNIT_INTERVAL, config.OPEN_UNIT_INTERVAL]
    keys = [k for t in tables for k in t]
    assert len(keys) == len(set(keys)), "a key in two range tables is checked twice"
    fields = {f"{s}.{f}" for s, sec in config.Config().to_dict().items() for f in sec}
    assert set(keys) <= fields
    numeric = {f"{s}.{f}" for s, sec in config.Config().to_dict().items() for f, v in sec.items()
               if type(v) in (int, float)}
    assert numeric == set(keys), "every number has a range (add it to one table)"


@pytest.mark.parametrize("table, bad, words", [
    ("POSITIVE", 0, "must be > 0"), ("NON_NEGATIVE", -1, "must be >= 0"),
    ("UNIT_INTERVAL", 1, "must be in [0, 1)"), ("OPEN_UNIT_INTERVAL", 0, "must be in (0, 1)"),
])
def test_every_key_of_a_range_table_refuses_a_value_outside_it(table, bad, words):
    for key in sorted(getattr(config, table)):
        with pytest.raises(InputError) as e:
            config.build("tiny", None, [f"{key}={bad}"])
        assert f"{key}: {words}" in str(e.value), key


def test_bad_toml_and_preset(tmp_path):
    with pytest.raises(InputError, match="unknown preset 'gpt5'"):
        config.build("gpt5")
    f = tmp_path / "bad.toml"
    f.write_text("[model\n")
    with pytest.raises(InputError, match="invalid TOML"):
        config.build("tiny", str(f))
    f.write_text("lr = 3\n")
    with pytest.raises(InputError, match="must be a \\[section\\] table"):
        config.build("tiny", str(f))
    f.write_bytes(b"\xff\xfe[run]\n")
    with pytest.raises(InputError, match="not UTF-8 text"):
        config.build("tiny", str(f))
    with pytest.raises(InputError, match="is a directory; give a TOML file"):
        config.build("tiny", str(tmp_path))
    os.mkfifo(tmp_path / "fifo.toml")  # read, it would block until a writer came: forever
    for special in (tmp_path / "fifo.toml", "/dev/zero"):  # /dev/zero read whole filled the memory (OOM-killed)
        with pytest.raises(InputError, match=f"--config {special}: is not a regular file"):
            config.build("tiny", str(special))
    f.write_text("# " + "x" * (1 << 20) + "\n")
    with pytest.raises(InputError, match="is larger than 1024 KiB"):
        config.build("tiny", str(f))


def test_roundtrip_dict():
    cfg = config.build("llama-1b", None, ["run.seed=7"])
    assert config.from_dict(cfg.to_dict()) == cfg


# `megacluster` that says at exit whether it imported torch
TELLS_TORCH = ("import atexit, sys; atexit.register(lambda: print('torch imported:', 'torch' in sys.modules, "
               "file=sys.stderr)); from megacluster.cli import main; sys.exit(main(sys.argv[1:]))")


@pytest.mark.parametrize("argv, needle", [
    (["--set", "model.nope=1"], "unknown config key 'model.nope'"),
    (["--preset", "huge"], "unknown preset"),
    (["--workers", "0"], "run.workers: must be > 0"),
    (["--device", "tpu"], "invalid choice: 'tpu'"),
    (["--data", "/no/such/file.txt"], "--data: no such file"),
    (["--chaos", "bogus"], "--chaos (run.chaos): bad fault 'bogus'"),  # refused before a worker starts
    (["--workers", "2", "--chaos", "kill:rank=2,step=3"], "names rank 2, but the run has 2 worker(s)"),
    (["--chaos", "flap:step=2"], "a flap needs --workers 2 or more"),  # one worker: no link to break
    (["--set", "optim.lr=inf"], "optim.lr: expected a finite number"),
    (["--set", "model.vocab_size=100"], "model.vocab_size: text data needs at least 257"),  # before tokenizing
    (["--workers", "100000"], "run.workers=100000: at most"),
    (["--data", ""], "--data (data.paths): an empty path"),  # Path("") is the working directory
    (["--set", "model.n_layer=1000000000"], "parameters need at least"),  # it built layers until out of memory
    # a single-value flag given twice: the last one won, and an invalid first --chaos was never checked
    (["--chaos", "kill:rank=5,step=1", "--chaos", ""], "--chaos given more than once"),
    (["--config", "a.toml", "--config", "b.toml"], "--config given more than once"),
    (["--max-steps", "3", "--max-steps", "4"], "--max-steps given more than once"),
])
def test_cli_bad_input_exits_2(argv, needle, tmp_path):
    """Refused (exit 2) at once: before torch is imported (3 s), a worker starts or any text is tokenized."""
    r = subprocess.run([sys.executable, "-c", TELLS_TORCH, "train", "--run-dir", str(tmp_path), *argv],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert needle in r.stderr and "torch imported: False" in r.stderr


@pytest.mark.parametrize("flag, needle", [("--run-dir", "run.run_dir (--run-dir): cannot create"),
                                          ("--set data.cache_dir=", "data.cache_dir: cannot create")])
def test_cli_refuses_a_directory_it_cannot_create(flag, needle, tmp_path):
    (tmp_path / "file").write_text("")
    where = str(tmp_path / "file" / "sub")  # under a regular file: mkdir fails (as root too)
    argv = ["--run-dir", where] if flag == "--run-dir" else ["--run-dir", str(tmp_path / "run"), "--set",
                                                             f"data.cache_dir={where}"]
    r = subprocess.run([sys.executable, "-c", TELLS_TORCH, "train", *argv], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and needle in r.stderr and "torch imported: False" in r.stderr, r.stderr


def test_a_refused_run_makes_no_cache_directory(tmp_path):
    text = tmp_path / "a.txt"
    text.write_text("x = 1\n")
    r = subprocess.run([sys.executable, "-m", "megacluster", "train", "--run-dir", str(tmp_path / "run"), "--data",
                        str(text), "--set", f"data.cache_dir={tmp_path / 'pc' / 'cache'}", "--set",
                        "model.n_layer=1000000000"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "parameters need at least" in r.stderr, r.stderr
    assert not (tmp_path / "pc").exists() and not (tmp_path / "run").exists()


def test_a_cpu_run_whose_activations_cannot_fit_is_refused(monkeypatch):
    """llama-1b's training state (16.5 GiB) fits a 24 GiB machine, but a micro-batch of 4 x 2048 tokens does not:
    the kernel's OOM killer ended that run after ~3 minutes. Activations are now counted (a lower bound)."""
    from megacluster.train.inputs import check_fits, local_micro_sequences, sequence_bytes

    ram = {"SC_PAGE_SIZE": 4096, "SC_PHYS_PAGES": 24 * 2**30 // 4096}
    monkeypatch.setattr(os, "sysconf", lambda name: ram[name])
    cfg = config.build("llama-1b")  # batch 16, micro-batch 4
    per_token = 16 * (8 * 2048 + 4 * 8192) + 32000  # elements: 8 d + 4 f per layer, the logits gradient
    assert sequence_bytes(cfg) == 2048 * per_token * 4
    with pytest.raises(InputError, match=r"parameters need at least 41\.4 GiB to train \(training state 16\.5 GiB "
                                         r"at 16 bytes a parameter; activations 25\.0 GiB for micro-batches of up to "
                                         r"4 x 2048 tokens.* check run\.micro_batch, model\.seq_len or the model"):
        check_fits(cfg, "cpu")
    cfg.run.micro_batch = 1  # 16.5 + 6.2 GiB
    check_fits(cfg, "cpu")
    cfg.run.workers = 2  # two copies of the state (33 GiB) do not fit, whatever the micro-batch
    with pytest.raises(InputError, match=r"45\.4 GiB to train with 2 workers on this machine .* check run\.workers "
                                         r"\(torchrun: --nproc-per-node\) or the model"):
        check_fits(cfg, "cpu")
    cfg.run.compile = "on"  # Inductor keeps less: 2 d + 2 f a layer, no (N, V) tensor
    assert sequence_bytes(cfg) == 2048 * 16 * (2 * 2048 + 2 * 8192) * 4


@pytest.mark.parametrize("gib, fits", [(40, True), (32, False)])
def test_a_gpu_run_counts_the_compiled_activations_of_its_own_share(monkeypatch, gib, fits):
    """gpt2-1.5b at nanoGPT's batch of 8 on one GPU: 23.5 GiB of state and 8.7 GiB of compiled bf16 activations
    counted (the H200 measured 46.9 GB at peak); an A100-40GB fits, a 32 GiB card does not. (A GPU that is not
    here: torch.cuda's device properties are replaced.)"""
    import types

    import torch

    from megacluster.train.inputs import check_fits, sequence_bytes

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: types.SimpleNamespace(total_memory=gib * 2**30))
    cfg = config.build("gpt2-1.5b")
    assert sequence_bytes(cfg, "cuda") == 1024 * 48 * (2 * 1600 + 2 * 4352) * 2  # bf16, compiled: 2 d + 2 f
    if fits:
        check_fits(cfg, "cuda")
    else:
        with pytest.raises(InputError, match=r"need at least 32\.2 GiB to train .* activations 8\.7 GiB for "
                                             r"micro-batches of up to 8 x 1024 tokens.* this GPU has 32\.0 GiB"):
            check_fits(cfg, "cuda")


@pytest.mark.parametrize("batch, workers, env, seqs", [
    (16, 1, {}, [4]),  # the micro-batch caps the share
    (9, 8, {}, [2, 1, 1, 1, 1, 1, 1, 1]),  # shares differ by one: 9 sequences in flight, not 8 x 2
    (2, 8, {}, [1, 1, 0, 0, 0, 0, 0, 0]),  # batch < workers: the rest hold the state, no activations
    (9, 1, {"WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "2", "RANK": "3", "LOCAL_RANK": "1"}, [1, 1]),  # torchrun node 2
    (9, 1, {"WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}, [2, 1]),
])
def test_activations_are_counted_for_the_workers_on_this_machine(monkeypatch, batch, workers, env, seqs):
    from megacluster.train.inputs import local_micro_sequences

    for key in ("WORLD_SIZE", "LOCAL_WORLD_SIZE", "RANK", "LOCAL_RANK", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    cfg = config.build("llama-1b", overrides=[f"run.batch_size={batch}", f"run.workers={workers}"])
    assert local_micro_sequences(cfg) == seqs


def test_cli_refuses_a_run_dir_it_cannot_write_in():
    """sysfs takes no new files, as root too: the run dir exists but a run could write nothing there."""
    if not os.path.isdir("/sys/kernel"):
        pytest.skip("no sysfs here")
    r = subprocess.run([sys.executable, "-c", TELLS_TORCH, "train", "--run-dir", "/sys/kernel"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and "run.run_dir (--run-dir): cannot write in /sys/kernel (" in r.stderr, r.stderr
    assert "torch imported: False" in r.stderr


def test_a_file_operation_the_machine_refuses_is_one_line_and_exit_1(monkeypatch, capsys, tmp_path):
    """A full disk mid-run is not bad input (exit 1, not 2), and no traceback: the message names the file."""
    from megacluster import cli, files
    from megacluster.train import cli as train_cli

    def full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError):
        files.atomic_write(tmp_path / "config.json", b"{}")
    assert list(tmp_path.iterdir()) == []  # no temp file left behind

    def run(args):
        raise OSError(28, "No space left on device", "runs/x/config.json")

    monkeypatch.setattr(train_cli, "run", run)
    assert cli.main(["train"]) == 1
    assert capsys.readouterr().err == ("megacluster train: failed: [Errno 28] No space left on device: "
                                       "'runs/x/config.json'\n")


def test_repeated_data_flags_add_up():
    """`--data a --data b c` trains on all three: the last --data used to replace the earlier ones."""
    import argparse

    from megacluster.train import cli as train_cli
    p = argparse.ArgumentParser()
    train_cli.add_arguments(p)
    assert train_cli.build_config(p.parse_args(["--data", "a", "--data", "b", "c"])).data.paths == ["a", "b", "c"]


@pytest.mark.parametrize("env, needle", [
    ({"RANK": "0", "WORLD_SIZE": "abc"}, "WORLD_SIZE='abc': a launcher's rank variables must be integers"),
    ({"RANK": "0", "WORLD_SIZE": "2"}, "MASTER_ADDR and MASTER_PORT not set"),  # torch's traceback before
    ({"RANK": "2", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}, "RANK=2 must be below"),
    ({"OMP_NUM_THREADS": "abc"}, "OMP_NUM_THREADS='abc': must be a positive integer"),  # every worker's traceback
    ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "abc"},
     "MASTER_PORT='abc': must be a TCP port"),
    # one alone (a stale one): it was read as this process's rank or world, a traceback in torch's rendezvous or
    # the step (a user audit)
    ({"RANK": "abc"}, "RANK='abc' is set without WORLD_SIZE: a launcher such as torchrun sets both"),
    ({"RANK": "1"}, "RANK='1' is set without WORLD_SIZE"),
    ({"WORLD_SIZE": "2"}, "WORLD_SIZE='2' is set without RANK"),
])
@pytest.mark.parametrize("workers", ["1", "2"])
def test_stale_launcher_and_thread_variables_exit_2_naming_them(env, needle, tmp_path, workers):
    clean = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                               "MASTER_PORT", "OMP_NUM_THREADS")}
    r = subprocess.run([sys.executable, "-c", TELLS_TORCH, "train", "--run-dir", str(tmp_path / "run"), "--workers",
                        workers], capture_output=True, text=True, timeout=120, env={**clean, **env})
    assert r.returncode == 2 and needle in r.stderr and "torch imported: False" in r.stderr, r.stderr
    assert not (tmp_path / "run").exists()  # a refused run leaves no directory made for it


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_run_dir_in_use_is_refused_before_torch_is_imported(tmp_path, workers):
    """README: refused "within a third of a second, before torch is imported". The lock was taken after the
    trainer's imports (3-4 s; with --workers 2 the zygote started first), a user audit found."""
    import fcntl

    run = tmp_path / "run"
    run.mkdir()
    with open(run / ".lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        held.write("4242")
        held.flush()
        r = subprocess.run([sys.executable, "-c", TELLS_TORCH, "train", "--run-dir", str(run), "--resume",
                            "--workers", workers], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "is in use by another run (pid 4242)" in r.stderr, r.stderr
    assert "torch imported: False" in r.stderr, r.stderr


def test_valid_launcher_and_thread_variables_pass():
    """One rank forms no process group (no MASTER_ADDR needed); OpenMP's per-level list is a valid thread count."""
    from megacluster.train.inputs import check_environment
    env = {"RANK": "0", "WORLD_SIZE": "1", "OMP_NUM_THREADS": "4,2"}
    saved = {k: os.environ.pop(k, None) for k in ("MASTER_ADDR", "MASTER_PORT", *env)}
    os.environ.update(env)
    try:
        check_environment()
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None)
            if v is not None:
                os.environ[k] = v


def test_a_tilde_in_paths_is_the_home_directory(monkeypatch, tmp_path):
    """The shell does not expand "~" inside --set values or TOML strings: the config does, for run.run_dir and
    data.paths (data.cache_dir is expanded where it is used), so "~/run" is not a directory named "~"."""
    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = config.build("tiny", None, ["run.run_dir=~/runs/a", 'data.paths=["~/corpus", "plain"]'])
    assert cfg.run.run_dir == str(tmp_path / "runs" / "a") and cfg.data.paths == [str(tmp_path / "corpus"), "plain"]
