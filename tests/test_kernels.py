"""megacluster/kernels.py: the Triton SwiGLU and RoPE backwards against autograd's, the optimizer's in-place
norm and update against its gather path. On a CUDA machine with Triton it runs on
the GPU, also compiled inside the model; on a CPU machine with Triton installed, through Triton's interpreter (in a
subprocess: the interpreter is chosen when the kernel is defined); without Triton (CI) these skip."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
HAS_TRITON = importlib.util.find_spec("triton") is not None
CUDA = torch.cuda.is_available() and HAS_TRITON


def check_backward(device: str, dtype: torch.dtype, tol: float) -> None:
    from megacluster.model import SwiGLUKernel

    torch.manual_seed(0)
    for shape, f in [((3, 5), 40), ((2, 7, 3), 130), ((4, 64), 256)]:  # ragged tiles, 3-d, whole tiles
        gu = torch.randn(*shape, 2 * f, device=device, dtype=dtype)
        dh = torch.randn(*shape, f, device=device, dtype=dtype)
        ref = gu.float().clone().requires_grad_()
        gate, up = ref.chunk(2, -1)
        (F.silu(gate) * up).backward(dh.float())
        x = gu.clone().requires_grad_()
        y = SwiGLUKernel.apply(x)
        y.backward(dh)
        assert x.grad.dtype == dtype and x.grad.shape == gu.shape
        torch.testing.assert_close(x.grad.float(), ref.grad, atol=tol, rtol=tol)
        torch.testing.assert_close(y.float(), (F.silu(gate) * up).detach(), atol=tol, rtol=tol)


def check_rope_backward(device: str, dtype: torch.dtype, tol: float) -> None:
    """SplitRope (backward: kernels.rope_qkv_backward) against autograd through split_rope: MHA and GQA, a head
    size whose half is not a power of two, a position count that is not a whole tile, and gradients in SDPA's
    (B, h, T, hs) layout seen through a transpose (as the trainer's are) or contiguous."""
    from megacluster.model import SplitRope, rope_cache, split_rope

    torch.manual_seed(0)
    for B, T, nh, nkv, hs, sdpa_layout in [(2, 40, 4, 4, 16, True), (1, 33, 4, 2, 12, False), (2, 64, 2, 1, 64, True)]:
        cos, sin = (t.to(device) for t in rope_cache(T, hs, 10000.0))
        qkv = torch.randn(B, T, (nh + 2 * nkv) * hs, device=device, dtype=dtype)
        grads = [torch.randn(B, h, T, hs, device=device, dtype=dtype).transpose(1, 2) if sdpa_layout else
                 torch.randn(B, T, h, hs, device=device, dtype=dtype) for h in (nh, nkv, nkv)]
        ref = qkv.float().clone().requires_grad_()
        outs = split_rope(ref, cos, sin, nh, nkv)
        torch.autograd.backward(outs, [g.float() for g in grads])
        x = qkv.clone().requires_grad_()
        mine = SplitRope.apply(x, cos, sin, nh, nkv)
        torch.autograd.backward(mine, grads)
        assert x.grad.dtype == dtype and x.grad.shape == qkv.shape
        torch.testing.assert_close(x.grad.float(), ref.grad, atol=tol, rtol=tol)
        for a, b in zip(mine, outs):
            torch.testing.assert_close(a.float(), b.detach(), atol=tol, rtol=tol)


def check_xent(device: str, dtype: torch.dtype, tol: float) -> None:
    """kernels.softmax_xent against torch's cross-entropy and softmax - onehot: a vocabulary smaller than one
    chunk, a ragged one, whole chunks, more rows than programs, the first and last ids as targets; then the
    model's fused loss through it (run.loss_kernel) against the fused loss without it: same loss and gradients."""
    from megacluster import kernels
    from megacluster.config import ModelConfig
    from megacluster.model import GPT

    if device == "cpu":  # only in the interpreter's subprocess, which runs the kernels on CPU tensors
        kernels.available = lambda x: True
    gen = torch.Generator().manual_seed(0)
    for N, V in [(5, 300), (9, 20000), (3, 2 * kernels.XENT_TILE[0])]:
        logits = torch.randn(N, V, generator=gen) * 4
        logits[1] -= 50  # a row whose first chunk holds its maximum, 150 above the rest: a kernel that took
        logits[1, 1] = 100  # each chunk's own maximum would overflow exp(150) in fp32; it keeps a running one
        logits = logits.to(device, dtype)
        if N == 9:  # strided rows, as a view may be: read as dense they would be wrong
            logits = logits.t().contiguous().t()
        targets = torch.randint(0, V, (2 * N,), generator=gen).to(device)[::2]  # strided, as a view may be
        targets[0], targets[-1] = 0, V - 1
        loss, grad = kernels.softmax_xent(logits, targets)
        assert loss.dtype == torch.float32 and grad.dtype == dtype and grad.shape == (N, V)
        want = F.cross_entropy(logits.float(), targets, reduction="none")
        torch.testing.assert_close(loss, want, atol=1e-5, rtol=1e-5)  # fp32 either way: only summation order
        want = torch.softmax(logits.float(), -1) - F.one_hot(targets, V)
        torch.testing.assert_close(grad.float(), want, atol=tol, rtol=tol)
    m = ModelConfig(vocab_size=300, n_layer=1, n_head=2, d_model=32, seq_len=16)
    idx = torch.randint(0, 300, (3, 17), generator=gen).to(device)
    runs = []
    for kernel in (False, True):
        torch.manual_seed(0)
        model = GPT(m, fused_loss=True, loss_kernel=kernel).to(device)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            loss = model(idx[:, :-1], idx[:, 1:])
        loss.backward()
        runs.append((loss.detach(), [p.grad for p in model.parameters()]))
    (l0, g0), (l1, g1) = runs
    torch.testing.assert_close(l1, l0, atol=0, rtol=1e-5)
    for a, b in zip(g1, g0):
        torch.testing.assert_close(a, b, atol=tol * b.abs().max().item(), rtol=tol)


def check_optimizer(device: str) -> None:
    """MasterAdamW reading p.grad in place (kernels.BlockTable) against its gather path (eager update, per-tensor
    norms), fed the same gradients for 3 steps, fp32 and bf16 weights, both parameter groups, clipping on, and
    later a gradient that is not contiguous, one that is misaligned and a missing one: norms and master
    weights/moments equal up to rounding order, and the bf16 weights the rounded master."""
    import copy

    from megacluster import config, kernels
    from megacluster.model import GPT
    from megacluster.train import optim

    if device == "cpu":  # only in the interpreter's subprocess, which runs the kernels on CPU tensors
        kernels.available = lambda x: True
    cfg = config.build("tiny", None, ["model.d_model=64", "model.n_layer=2", "model.n_head=4", "model.vocab_size=256",
                                      "model.seq_len=16", "optim.grad_clip=0.05", "optim.weight_decay=0.5"])
    for dtype in (torch.float32, torch.bfloat16):
        torch.manual_seed(0)
        a = GPT(cfg.model).to(device)
        b = copy.deepcopy(a)
        oa = optim.MasterAdamW(a, cfg.optim, dtype, compiled=False, kernel=False)
        ob = optim.MasterAdamW(b, cfg.optim, dtype, compiled=False, kernel=True)
        assert oa.table is None and ob.table is not None
        gen = torch.Generator().manual_seed(1)
        for step in range(1, 4):
            x = torch.randint(0, 256, (4, 17), generator=gen).to(device)
            with torch.autocast(device, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
                a(x[:, :-1], x[:, 1:]).backward()
            for j, (pa, pb) in enumerate(zip(oa.params, ob.params)):
                g = pa.grad.clone()
                if step >= 2 and j == 0:  # a gradient that is not contiguous: copied first
                    g = g.t().contiguous().t()
                elif step >= 2 and j == 1:  # one not 16-byte aligned: copied first
                    g = torch.empty(g.numel() + 1, dtype=g.dtype, device=device)[1:].copy_(g.reshape(-1)).view(g.shape)
                elif step == 3 and j == len(oa.params) - 1:  # none: zeros, on both paths
                    pa.grad = g = None
                pb.grad = g
            na, nb = oa.step(1e-2 * step), ob.step(1e-2 * step)
            assert float(na) > 0.05  # the clip acts
            torch.testing.assert_close(nb, na, rtol=1e-5, atol=0)
            for ta, tb in ((oa.master, ob.master), (oa.m, ob.m), (oa.v, ob.v)):
                torch.testing.assert_close(tb, ta, rtol=1e-5, atol=1e-7)
            assert all(p.grad is None for p in b.parameters())  # released, as the gather path does
        assert sorted(ob.table.staging) == [0, 1]  # the two it could not read in place, copied to buffers it keeps
        if device == "cuda":
            assert torch.equal(ob.flat, ob.master.to(dtype))
        else:  # Triton's interpreter truncates fp32 -> bf16 where the GPU rounds to nearest: one unit in the last place
            torch.testing.assert_close(ob.flat.float(), ob.master, rtol=2 ** -7, atol=0)


def check_sumsq(device: str) -> None:
    """The sum of squares with 1, 4 and 5 blocks a program: the table padded with empty blocks (6 real blocks
    here: 1 + 3 + 2), the same sum as torch's up to rounding order, and the update's grid unchanged."""
    from megacluster import kernels

    if device == "cpu":
        kernels.available = lambda x: True
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(n, generator=gen).to(device, torch.bfloat16) for n in (8, 2056, 1032)]
    want = sum(float(g.float().pow(2).sum()) for g in grads)
    for group in (1, 4, 5):
        kernels.BlockTable.SUMSQ_GROUP = group
        try:
            table = kernels.BlockTable([g.numel() for g in grads], torch.bfloat16, torch.device(device))
        finally:
            kernels.BlockTable.SUMSQ_GROUP = 1
        assert table.blocks == 6 and table.pidx.numel() == -(-6 // group) * group
        table.point_at(grads)
        got = float(table.grad_sumsq())
        assert abs(got - want) <= 1e-5 * want, (group, got, want)


def test_block_table_refuses_gradients_it_would_misread():
    """The address table is re-sent only when an address moves: a gradient of another dtype or size at a known
    address must still be refused (read as the old one, it would update the weights from garbage)."""
    from megacluster.kernels import BlockTable

    table = BlockTable([8, 16], torch.bfloat16, torch.device("cpu"))
    grads = [torch.ones(8, dtype=torch.bfloat16), torch.ones(4, 4, dtype=torch.bfloat16)]
    assert table.point_at(grads) == grads and table.rel.tolist() != [0, 0]  # in place: no copy, the table set
    with pytest.raises(ValueError, match="bfloat16"):
        table.point_at([grads[0], grads[1].float()])
    with pytest.raises(ValueError, match="sizes"):
        table.point_at([grads[0], torch.ones(8, dtype=torch.bfloat16)])
    staged = table.point_at([grads[0], grads[1].t()])  # not contiguous: copied into a buffer kept for it
    assert staged[1] is table.staging[1] and torch.equal(staged[1], grads[1].t())


@pytest.mark.skipif(not HAS_TRITON or CUDA, reason="needs Triton (run through its interpreter on a CPU machine)")
def test_kernels_in_the_interpreter():
    run_in_a_subprocess("for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):\n"
                        "    t.check_backward('cpu', dtype, tol); t.check_rope_backward('cpu', dtype, tol)\n"
                        "    t.check_xent('cpu', dtype, tol)\n"
                        "t.check_optimizer('cpu'); t.check_sumsq('cpu')", TRITON_INTERPRET="1")


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU and Triton")
def test_kernels_on_the_gpu():
    check_backward("cuda", torch.float32, 1e-5)
    check_backward("cuda", torch.bfloat16, 2e-2)  # one rounding to bf16 at the end, vs fp32 autograd
    check_rope_backward("cuda", torch.float32, 1e-5)
    check_rope_backward("cuda", torch.bfloat16, 2e-2)
    check_optimizer("cuda")
    check_sumsq("cuda")


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU and Triton")
def test_loss_kernel_on_the_gpu():
    """Its own test, after the others: the loss kernel's first GPU run (written without one) must not hide theirs."""
    check_xent("cuda", torch.float32, 1e-5)
    check_xent("cuda", torch.bfloat16, 2e-2)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU and Triton")
@pytest.mark.parametrize("which,n_kv_head", [("swiglu_kernel", 2), ("rope_kernel", 2), ("rope_kernel", 0),
                                             ("loss_kernel", 2)])
def test_compiled_model_with_the_kernel_trains_like_without(which, n_kv_head):
    """The GPU path: compiled, bf16 autocast, grouped-query and plain attention. The loss is the same (the forward
    is the same ops), and every gradient is as close to an fp32 reference as autograd's own backward's is. Not
    equal to it: with grouped-query attention the kernel reads d k rounded to bf16 (the sum over the query heads
    sharing it, as eager autograd rounds it too), where Inductor may fuse that sum into RoPE's backward in fp32.
    A wrong gradient (a misread stride) is off by its own size, hundreds of times the rounding."""
    from megacluster.config import ModelConfig
    from megacluster.model import GPT

    from megacluster import kernels

    assert kernels.available(torch.empty(1, device="cuda"))  # so the model below takes the kernel's path
    m = ModelConfig(vocab_size=512, n_layer=2, n_head=4, n_kv_head=n_kv_head, d_model=128, seq_len=64)
    idx = torch.randint(0, 512, (4, 65), device="cuda")
    runs = []
    for kernel, bf16 in ((False, False), (False, True), (True, True)):  # fp32 eager reference, then compiled
        torch.manual_seed(0)
        model = GPT(m, **{which: kernel}, fused_loss=which == "loss_kernel").cuda()  # the loss kernel's path
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
            loss = (torch.compile(model, fullgraph=True) if bf16 else model)(idx[:, :-1], idx[:, 1:])  # no graph break
        loss.backward()
        runs.append((loss.detach(), [(name, p.grad.float()) for name, p in model.named_parameters()]))
    (_, ref), (l0, g0), (l1, g1) = runs
    torch.testing.assert_close(l1, l0)
    for (name, r), (_, a), (_, b) in zip(ref, g0, g1):
        err_plain, err_kernel = (a - r).norm().item(), (b - r).norm().item()
        print(f"{which} n_kv_head={n_kv_head} {name}: |ref| {r.norm().item():.4g} error plain {err_plain:.4g} "
              f"kernel {err_kernel:.4g}")
        assert err_kernel <= 2 * err_plain + 5e-3 * r.norm().item(), name
        assert err_kernel <= 0.05 * r.norm().item(), name


def run_in_a_subprocess(code: str, **env: str) -> None:
    r = subprocess.run([sys.executable, "-c", f"import torch, tests.test_kernels as t\n{code}\nprint('ok')"], cwd=ROOT,
                       env={**os.environ, **env,
                            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])},
                       capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr


@pytest.mark.skipif(torch.version.cuda is not None or torch.version.hip is not None, reason="a CPU build of torch")
def test_a_cpu_build_imports_no_compiler_for_the_kernels():
    """On a CPU build of torch no kernel can run, and Triton's op machinery imports Inductor and Dynamo (seconds of
    every worker's start): a worker's imports leave them out, wherever Triton is installed."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "MEGACLUSTER_TRITON")}
    code = ("import sys\nfrom megacluster.train import loop\nfrom megacluster import kernels\n"
            "assert kernels.triton is None, 'triton imported'\n"
            "assert 'torch._dynamo' not in sys.modules and 'torch._inductor' not in sys.modules, 'compiler imported'")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr


@pytest.mark.skipif(not HAS_TRITON, reason="needs Triton")
def test_kernels_trace_with_a_dynamic_batch(monkeypatch):
    from megacluster import kernels

    if kernels.triton is None:  # a CPU build defines the kernels only when asked: in a subprocess
        run_in_a_subprocess("from megacluster import kernels\nkernels.available = lambda x: True\n"
                            "t.trace_dynamic_batch(); t.trace_loss_kernel()", MEGACLUSTER_TRITON="1")
        return
    monkeypatch.setattr(kernels, "available", lambda x: True)  # so the model takes the kernels' path on CPU
    trace_dynamic_batch()
    trace_loss_kernel()


def trace_dynamic_batch():
    """The trainer marks the batch dynamic when shares move (run.balance=auto): the model with the kernels must
    still compile to one graph, their grids symbolic. Traced here on CPU (Dynamo + AOTAutograd, the joint
    graph holding the backward's kernel); only the forward runs, the kernel itself needs a GPU."""
    from megacluster.config import ModelConfig
    from megacluster.model import GPT

    torch._dynamo.reset()
    model = GPT(ModelConfig(vocab_size=256, n_layer=1, n_head=2, d_model=32, seq_len=16), swiglu_kernel=True,
                rope_kernel=True)
    graphs = []

    def backend(gm, example_inputs):
        from torch._dynamo.backends.common import aot_autograd

        def keep(g, _):
            graphs.append(g)
            return g.forward  # run the traced graph as is (the joint graph was traced symbolically first)

        return aot_autograd(fw_compiler=keep, bw_compiler=keep)(gm, example_inputs)

    f = torch.compile(model, backend=backend, fullgraph=True)
    for b in (2, 3, 5):
        rows = torch.randint(0, 256, (b, 17))
        x, y = rows[:, :-1], rows[:, 1:]
        torch._dynamo.mark_dynamic(x, 0)  # as Worker.micro_step does
        torch._dynamo.mark_dynamic(y, 0)
        assert f(x, y).detach() > 0
    assert len(graphs) == 2  # one forward and one backward graph for every batch size
    launches = [n for n in graphs[1].graph.nodes if n.target is torch.ops.higher_order.triton_kernel_wrapper_functional]
    assert len(launches) == 2  # both kernels, in the backward graph
    grids = [n.kwargs["grid"][0] for n in launches]  # SwiGLU's (row blocks, ...), RoPE's (..., ..., batch)
    assert isinstance(grids[0][0], torch.fx.Node) and isinstance(grids[1][2], torch.fx.Node)  # follow the batch


def trace_loss_kernel():
    """The fused loss through the loss kernel (run.loss_kernel) compiles to one graph with a dynamic batch: the
    kernel in the forward graph, and, with Inductor's partitioner, the head's two gradient matmuls beside it, so
    that no (N, V) tensor is kept for the backward (at a vocabulary large against the width, as in the presets;
    at toy sizes keeping it is cheaper and the partitioner does). Traced only: a forward holding the kernel
    cannot run without a GPU, so the compiled forward raises a marker instead of running."""
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.partitioners import min_cut_rematerialization_partition

    from megacluster.config import ModelConfig
    from megacluster.model import GPT

    class Traced(Exception):
        pass

    def not_run(*args):
        raise Traced

    graphs = []

    def keep(g, _):
        graphs.append(g)
        return not_run

    torch._dynamo.reset()
    V = 4096
    model = GPT(ModelConfig(vocab_size=V, n_layer=1, n_head=2, d_model=32, seq_len=256), fused_loss=True,
                loss_kernel=True)
    backend = aot_autograd(fw_compiler=keep, bw_compiler=keep, partition_fn=min_cut_rematerialization_partition)
    f = torch.compile(model, backend=backend, fullgraph=True)
    rows = torch.randint(0, V, (2, 257))
    x, y = rows[:, :-1], rows[:, 1:]
    torch._dynamo.mark_dynamic(x, 0)
    torch._dynamo.mark_dynamic(y, 0)
    with pytest.raises(Traced):
        f(x, y)
    assert len(graphs) == 2  # forward and backward (traced together for a dynamic batch)
    fw, bw = ([n for n in g.graph.nodes if n.target is torch.ops.higher_order.triton_kernel_wrapper_functional]
              for g in graphs)
    assert len(fw) == 1 and not bw
    saved = [tuple(n.meta["val"].shape) for n in graphs[1].graph.nodes
             if n.op == "placeholder" and isinstance(n.meta.get("val"), torch.Tensor)]
    assert (V, 32) in saved and not any(V in shape for shape in saved if shape != (V, 32)), saved
