"""Bad scenarios: one clear error naming the key; exit 2 from the CLI."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from megacluster.errors import InputError
from megacluster.plan import ScenarioError, load_scenario

REPO = Path(__file__).resolve().parents[2]

BASE = {"model": {"layers": 32, "hidden": 4096, "ffn_hidden": 14336, "heads": 32, "kv_heads": 8, "vocab": 128256,
                  "seq_len": 8192},
        "train": {"global_batch": 512, "micro_batch": 1},
        "parallel": {"tp": 8, "pp": 1, "cp": 1, "dp": 8},
        "fleet": {"gpu": "H100-SXM", "count": 64}}


def with_(section, **kw):
    d = json.loads(json.dumps(BASE))
    d[section] = {**d[section], **kw}
    return d


@pytest.mark.parametrize("raw, needle", [
    (with_("fleet", gpu="H900"), "fleet.gpu"),
    (with_("parallel", dp=16), "!= fleet GPU count 64"),
    (with_("fleet", count=-8), "fleet.count"),
    (with_("parallel", tp=3, dp=None), "parallel.tp"),
    (with_("model", heads=30), "model.hidden"),
    (with_("train", dtype="fp64"), "train.dtype"),
    (with_("train", recompute="sometimes"), "train.recompute"),
    (with_("train", zero=4), "train.zero"),
    (with_("model", mlp="relu"), "model.mlp"),
    (with_("model", layerz=3), "model.layerz"),
    (with_("fleet", balance="random"), "fleet.balance"),
    (with_("fleet", rail_switch_nodes=0), "fleet.rail_switch_nodes"),
    (with_("train", global_batch=1.5), "train.global_batch"),
    (with_("parallel", tp=16, dp=4), "NVLink domain"),
    ({**BASE, "bogus": {}}, "[bogus]"),
])
def test_bad_values_name_the_key(raw, needle):
    raw = {k: ({kk: vv for kk, vv in v.items() if vv is not None} if isinstance(v, dict) else v) for k, v in raw.items()}
    with pytest.raises(ScenarioError) as e:
        load_scenario(raw)
    assert needle in str(e.value)
    assert isinstance(e.value, InputError)


def test_allowed_values_listed():
    with pytest.raises(ScenarioError, match="A100-40GB.*H100-SXM.*GB200"):
        load_scenario(with_("fleet", gpu="TPU"))
    with pytest.raises(ScenarioError, match="'none', 'selective', 'full'"):
        load_scenario(with_("train", recompute="x"))


def test_mixed_pools_and_defaults():
    d = with_("fleet")
    d["fleet"] = {"pools": [{"gpu": "H100-SXM", "count": 32}, {"gpu": "A100-80GB", "count": 32}],
                  "balance": "throughput"}
    sc = load_scenario(d)
    assert sc.fleet.count == 64 and sc.model.kv_heads == 8 and sc.train.attention == "flash"
    with pytest.raises(ScenarioError, match=r"fleet.pools\[1\].gpu"):
        d["fleet"]["pools"][1]["gpu"] = "Z100"
        load_scenario(d)


def _cli(*args, cwd=REPO):
    return subprocess.run([sys.executable, "-m", "megacluster", "plan", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=60)


def test_cli_bad_scenario_exits_2(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[model]\nlayers = 32\nhidden = 4096\nffn_hidden = 14336\nheads = 32\nvocab = 1000\n'
                   'seq_len = 2048\n[train]\nglobal_batch = 64\n[parallel]\ntp = 8\npp = 2\ncp = 1\ndp = 8\n'
                   '[fleet]\ngpu = "H100-SXM"\ncount = 64\n')
    r = _cli(str(bad), "--json")
    assert r.returncode == 2
    assert "tp x pp x cp x dp" in r.stderr and r.stdout == ""
    r = _cli("--preset", "nope")
    assert r.returncode == 2 and "colossus-1" in r.stderr
    r = _cli("--preset", "")  # an empty name is not the default preset
    assert r.returncode == 2 and "--preset '' is unknown" in r.stderr
    r = _cli("")  # nor is an empty scenario path (Path("") is the working directory)
    assert r.returncode == 2 and "scenario: an empty path" in r.stderr


def test_cli_scenario_and_preset_together_exit_2():
    r = _cli("llama3-405b", "--preset", "colossus-1", "--json")
    assert r.returncode == 2 and r.stdout == ""
    assert "give a SCENARIO file or --preset NAME, not both" in r.stderr


def test_cli_unknown_gpu_exit_2(tmp_path):
    p = tmp_path / "s.json"
    p.write_text(json.dumps(with_("fleet", gpu="H900")))
    r = _cli(str(p))
    assert r.returncode == 2 and "fleet.gpu" in r.stderr


def test_auto_is_the_same_as_leaving_the_key_out():
    from dataclasses import asdict
    auto = with_("train", micro_batch="auto", recompute="auto", attention="auto", overlap_grad_reduce="auto")
    auto["parallel"] = {**BASE["parallel"], "vpp": "auto"}
    auto["reliability"] = {"checkpoint_interval_s": "auto"}
    out = with_("train")
    del out["train"]["micro_batch"]
    a, b = load_scenario(auto), load_scenario(out)
    assert {k: v for k, v in asdict(a).items() if k != "raw"} == {k: v for k, v in asdict(b).items() if k != "raw"}
    assert a.train.recompute is None and a.train.attention == "flash" and a.parallel.vpp is None
    assert a.train.overlap_grad_reduce is True
    with pytest.raises(ScenarioError, match='train.overlap_grad_reduce = 1 is invalid: must be true or false or "auto"'):
        load_scenario(with_("train", overlap_grad_reduce=1))
    with pytest.raises(ScenarioError, match="train.recompute = 'x' is invalid: must be one of 'none', 'selective', "
                                            "'full', 'auto'"):
        load_scenario(with_("train", recompute="x"))


@pytest.mark.parametrize("parallel", [{"tp": 8, "pp": 1, "vpp": 2}, {"tp": 8, "vpp": 2}])
def test_interleaving_without_a_pipeline_is_refused(parallel):
    """vpp > 1 needs pp > 1, also when pp is left out of a fixed plan (it is then 1)."""
    with pytest.raises(ScenarioError, match=r"parallel.vpp = 2 is invalid with parallel.pp = 1.*must be 1"):
        load_scenario({**BASE, "parallel": parallel})


def test_cli_interleaving_without_a_pipeline_exits_2(tmp_path):
    p = tmp_path / "s.json"
    p.write_text(json.dumps({**BASE, "parallel": {"tp": 8, "vpp": 4}}))
    r = _cli(str(p), "--json")
    assert r.returncode == 2 and r.stdout == ""
    assert "parallel.vpp = 4" in r.stderr and "parallel.pp = 1" in r.stderr


def test_search_with_a_given_vpp_only_tries_pipelines_it_can_interleave():
    from megacluster.plan.search import candidates
    sc = load_scenario({**BASE, "train": {"global_batch": 512}, "parallel": {"search": True, "vpp": 4}})
    plans = candidates(sc)
    assert plans and all(p.vpp == 4 and p.pp > 1 and p.pp * p.vpp <= 32 for p in plans)


@pytest.mark.parametrize("name, content, needle", [
    ("list.json", b"[1, 2]", "the top level must be a table"),
    ("text.json", b'"model"', "got a str"),
    ("latin1.toml", "[model]\nname = 'caf\u00e9'\n".encode("latin-1"), "is not UTF-8 text"),
    ("dir.toml", None, "is a directory"),
])
def test_unreadable_scenario_files_name_the_path(tmp_path, name, content, needle):
    path = tmp_path / name
    if content is None:
        path.mkdir()
    else:
        path.write_bytes(content)
    with pytest.raises(ScenarioError, match=needle) as e:
        load_scenario(str(path))
    assert str(path) in str(e.value)


def test_cli_scenario_directory_and_report_on_a_file_exit_2(tmp_path):
    r = _cli(str(tmp_path), "--json")
    assert r.returncode == 2 and r.stdout == "" and f"scenario {tmp_path}: is a directory" in r.stderr
    afile = tmp_path / "report"
    afile.write_text("not a directory")
    r = _cli("--preset", "llama3-405b", "--no-mc", "--json", "--report", str(afile))
    assert r.returncode == 2 and r.stdout == "" and f"--report {afile}: exists and is not a directory" in r.stderr
    r = _cli("--preset", "llama3-405b", "--no-mc", "--json", "--report", str(afile / "sub"))
    assert r.returncode == 2 and r.stdout == "" and f"--report {afile / 'sub'}: cannot write" in r.stderr
    assert afile.read_text() == "not a directory"


def test_monte_carlo_trials_are_capped_at_what_fits_in_memory():
    """~15 KB per trial: 100,000 trials take ~1.5 GB and ~5 s; 10**6 (the old cap) would take ~15 GB."""
    assert load_scenario({**BASE, "reliability": {"trials": 100_000}}).reliability.trials == 100_000
    with pytest.raises(ScenarioError, match=r"reliability.trials = 100001 is invalid: must be an integer >= 1 "
                                            r"and <= 100000"):
        load_scenario({**BASE, "reliability": {"trials": 100_001}})
