"""The two AdamW implementations (train/optim.py): the flat master-weight one is torch's AdamW op for op, their
state dicts move between them, and with bf16 weights the model computes with views the update rewrites."""

import copy

import pytest
import torch

from megacluster import config
from megacluster.model import GPT
from megacluster.train import optim

SHAPE = ["model.d_model=64", "model.n_layer=2", "model.n_head=4", "model.vocab_size=256", "model.seq_len=16",
         "optim.grad_clip=0.05", "optim.weight_decay=0.5"]  # a small clip: every step clips
CPU = torch.device("cpu")


def pair(dtype=torch.float32):
    """Two identical models, one under torch AdamW and one under MasterAdamW."""
    cfg = config.build("tiny", None, SHAPE)
    master_cfg = config.build("tiny", None, SHAPE + ["optim.master_weights=on"])
    torch.manual_seed(0)
    a = GPT(cfg.model)
    b = copy.deepcopy(a)
    return (a, optim.build(a, cfg.optim, CPU, torch.float32, False),
            b, optim.build(b, master_cfg.optim, CPU, dtype, False))


def steps(models_opts, first, last, seed=1):
    """Same batches for every (model, optimizer); returns the grad norms per step."""
    gen = torch.Generator().manual_seed(seed)
    norms = []
    for step in range(first, last + 1):
        x = torch.randint(0, 256, (4, 17), generator=gen)
        row = []
        for model, opt in models_opts:
            model(x[:, :-1], x[:, 1:]).backward()
            row.append(float(opt.step(1e-2 * step)))
            for p in model.parameters():
                p.grad = None
        norms.append(row)
    return norms


def test_master_adamw_is_torch_adamw_op_for_op():
    a, ta, b, tb = pair()
    assert isinstance(ta, optim.TorchAdamW) and isinstance(tb, optim.MasterAdamW)
    norms = steps([(a, ta), (b, tb)], 1, 5)
    assert all(x == y for x, y in norms) and all(x > 0.05 for x, _ in norms)  # equal, and the clip acted
    wa, wb = ta.weights(), tb.weights()
    assert sorted(wa) == sorted(wb) and "head.weight" in wb  # tied weights keep both names
    assert all(torch.equal(wa[k], wb[k]) for k in wa)  # bit-identical
    sa, sb = ta.state_dict(), tb.state_dict()
    assert [g["params"] for g in sa["param_groups"]] == [g["params"] for g in sb["param_groups"]]
    assert [g["weight_decay"] for g in sb["param_groups"]] == [0.5, 0.0]
    for i in sa["state"]:
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(sa["state"][i][key], sb["state"][i][key]), (i, key)


@pytest.mark.parametrize("direction", ["torch->master", "master->torch"])
def test_state_dicts_move_between_the_implementations(direction):
    a, ta, b, tb = pair()
    steps([(a, ta), (b, tb)], 1, 3)  # the same state in both forms
    src, dst = (ta, tb) if direction == "torch->master" else (tb, ta)
    c, tc, d, td = pair()  # fresh: their state must come entirely from the load
    fresh = tc if isinstance(dst, optim.TorchAdamW) else td
    fresh_model = c if fresh is tc else d
    fresh.load_weights({k: v.clone() for k, v in src.weights().items()})
    fresh.load_state_dict(copy.deepcopy(src.state_dict()))
    steps([(a, ta), (fresh_model, fresh)], 4, 6, seed=2)
    wa, wf = ta.weights(), fresh.weights()
    assert all(torch.equal(wa[k], wf[k]) for k in wa)


def test_bf16_weights_are_views_of_one_buffer_the_update_rewrites():
    _, _, b, tb = pair(torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in b.parameters())
    assert all(p.untyped_storage().data_ptr() == tb.flat.untyped_storage().data_ptr() for p in b.parameters())
    assert b.rope_cos.dtype == torch.float32  # buffers are not weights: untouched
    before = tb.master.clone()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        steps([(b, tb)], 1, 2)
    assert not torch.equal(before, tb.master)
    assert torch.equal(tb.flat, tb.master.to(torch.bfloat16))  # the model computes with the rounded master
    w = tb.weights()
    assert all(t.dtype == torch.float32 for t in w.values())  # checkpoints hold the fp32 master
    assert torch.equal(w["embed.weight"].to(torch.bfloat16), b.embed.weight)


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")  # torch's own
def test_compiled_update_equals_the_eager_one():
    """The update the GPU runs is adamw_update through torch.compile; here compiled for CPU (Inductor's C++
    backend, not Triton), it must give the eager result."""
    gen = torch.Generator().manual_seed(0)
    n = 4099  # not a multiple of any vector width
    master, m, v = (torch.randn(n, generator=gen) for _ in range(3))
    v = v.abs()
    grad = torch.randn(n, generator=gen).to(torch.bfloat16)
    scalars = [torch.tensor(x) for x in (2.0, 0.999, 0.01, 0.3)]
    outs = []
    for fn in (optim.adamw_update, torch.compile(optim.adamw_update, dynamic=True)):  # as MasterAdamW compiles it
        st = [t.clone() for t in (master, m, v)]
        out = torch.empty(n, dtype=torch.bfloat16)
        fn(st[0], grad, st[1], st[2], out, *scalars, 0.9, 0.95, 1e-8)
        outs.append((*st, out))
    for eager, compiled in zip(*outs):
        torch.testing.assert_close(compiled, eager, rtol=1e-6, atol=1e-7)
    assert torch.equal(outs[1][3], outs[1][0].to(torch.bfloat16))


def test_a_loaded_state_keeps_this_runs_kernel_choice_and_hyperparameters(monkeypatch):
    """A checkpoint written without the fused kernel (CPU) resumed where it is used (CUDA): the saved groups
    must not switch it off (the clip is handed over as grad_scale, which only the fused kernel takes), and torch
    must place `step` by *this* run's groups (fused: on the parameter's device, where the kernel reads it). A
    hyperparameter changed for the resumed run is used, not the saved one."""
    a, ta, _, _ = pair()
    steps([(a, ta)], 1, 2)
    saved = copy.deepcopy(ta.state_dict())
    assert not any(g["fused"] for g in saved["param_groups"])
    b, tb, _, _ = pair()
    groups = [{"params": g["params"], "weight_decay": g["weight_decay"]} for g in tb.opt.param_groups]
    tb.opt = torch.optim.AdamW(groups, lr=1e-3, betas=(0.5, 0.6), fused=True)  # the CUDA kind, new betas
    placed = []  # the param groups torch decides each state value's device by
    policy = torch.optim.Optimizer._process_value_according_to_param_policy
    monkeypatch.setattr(torch.optim.Optimizer, "_process_value_according_to_param_policy",
                        staticmethod(lambda param, value, param_id, param_groups, key=None:
                                     placed.append(param_groups) or policy(param, value, param_id, param_groups, key)))
    tb.load_state_dict(saved)
    assert placed and all(g["fused"] is True for groups in placed for g in groups)
    assert all(g["fused"] is True and g["betas"] == (0.5, 0.6) for g in tb.opt.param_groups)
    assert [g["weight_decay"] for g in tb.opt.param_groups] == [0.5, 0.0]
    assert torch.equal(tb.opt.state[tb.params[0]]["exp_avg"], saved["state"][0]["exp_avg"])
    steps([(b, tb)], 3, 3)  # the clip acts (norm > 0.05) through grad_scale: fails on a non-fused group
    assert tb.opt.grad_scale is not None


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")  # torch's own
def test_one_compiled_update_serves_every_segment_and_model():
    """Compiled, the update must not specialise on sizes: two segments per model and several models in one
    process (the benchmark runs four shapes) stay within a couple of graphs, far from dynamo's recompile limit,
    past which it would silently fall back to the eager update."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    for d in (32, 48, 64):
        cfg = config.build("tiny", None, [f"model.d_model={d}", "model.n_layer=1", "model.n_head=2",
                                          "model.vocab_size=128", "model.seq_len=8", "optim.master_weights=on"])
        torch.manual_seed(0)
        models = [GPT(cfg.model) for _ in range(2)]
        models[1].load_state_dict(models[0].state_dict())
        opts = [optim.build(m, cfg.optim, CPU, torch.float32, compiled) for m, compiled in zip(models, (False, True))]
        gen = torch.Generator().manual_seed(d)
        for step in (1, 2):
            x = torch.randint(0, 128, (2, 9), generator=gen)
            for m, o in zip(models, opts):
                m(x[:, :-1], x[:, 1:]).backward()
                o.step(1e-2)
        torch.testing.assert_close(opts[1].master, opts[0].master, rtol=1e-5, atol=1e-6)
    assert 1 <= counters["stats"]["unique_graphs"] <= 2, dict(counters["stats"])


def test_micro_batches_are_summed_in_fp32():
    """Three micro-batches of bf16 gradients, 1 + 2^-9 + 2^-9 times a random pattern: summed in bf16 p.grad the
    small ones would vanish (1 + 2^-9 rounds to 1); the sum must be the fp32 one, and the update must equal the
    one given that sum directly."""
    _, _, b, tb = pair(torch.bfloat16)
    _, _, c, tc = pair(torch.bfloat16)
    tb.cfg.grad_clip = tc.cfg.grad_clip = 0.0  # no clip: the update's size follows the sum's
    gen = torch.Generator().manual_seed(0)
    pattern = [torch.randn(p.shape, generator=gen).to(torch.bfloat16) for p in tb.params]

    def micro_batches():
        tb.begin_step()
        for i, scale in enumerate((1.0, 2.0 ** -9, 2.0 ** -9)):
            for p, g in zip(tb.params, pattern):
                p.grad = g * scale  # bf16, like a micro-batch's backward
            if i < 2:
                tb.accumulate()  # as the trainer does after every micro-batch but the last

    exact = torch.cat([g.float().reshape(-1) * (1 + 2 * 2.0 ** -9) for g in pattern])
    assert not torch.equal(exact.to(torch.bfloat16).float(), exact)  # a bf16 sum could not be exact
    micro_batches()
    taken = tb.take_accumulated()
    assert taken.dtype == torch.float32 and torch.equal(taken, exact)
    micro_batches()
    tb.step(1e-2)  # takes the sum itself
    tc.step(1e-2, exact)
    assert torch.equal(tb.master, tc.master) and torch.equal(tb.m, tc.m) and torch.equal(tb.v, tc.v)
    assert tb.acc_count == 0 and all(p.grad is None for p in tb.params)


def test_a_checkpoint_of_another_shape_is_refused_not_broadcast():
    """copy_ would broadcast a (1, d) tensor into (n, d): MasterAdamW refuses it, as the model's load_state_dict
    (TorchAdamW's path) does."""
    a, ta, b, tb = pair()
    steps([(a, ta), (b, tb)], 1, 1)
    weights = {k: v.clone() for k, v in tb.weights().items()}
    weights["blocks.0.attn.qkv.weight"] = weights["blocks.0.attn.qkv.weight"][:1]
    with pytest.raises(ValueError, match=r"blocks\.0\.attn\.qkv\.weight: shape \(1, 64\) in the checkpoint"):
        tb.load_weights(weights)
    with pytest.raises(RuntimeError, match="size mismatch"):
        ta.load_weights(weights)
    sd = copy.deepcopy(tb.state_dict())
    sd["state"][0]["exp_avg"] = sd["state"][0]["exp_avg"][:1]
    with pytest.raises(ValueError, match=r"optimizer state 0\.exp_avg: shape"):
        tb.load_state_dict(sd)


def test_torch_adamw_leaves_a_parameter_without_gradient_alone():
    a, ta, _, _ = pair()
    x = torch.randint(0, 256, (4, 17))
    a(x[:, :-1], x[:, 1:]).backward()
    last = ta.params[-1]
    last.grad, before = None, last.detach().clone()
    norm = ta.step(1e-2)
    assert torch.equal(last, before) and float(norm) > 0  # torch's AdamW skips it; the norm is over the others
