import pytest
import torch

from megacluster.config import ModelConfig, ffn_hidden
from megacluster.model import GPT, apply_rope, flops_per_token, rope_cache


def tiny(**kw):
    base = dict(vocab_size=97, n_layer=2, n_head=4, d_model=32, seq_len=16)
    base.update(kw)
    return ModelConfig(**base)


@pytest.mark.parametrize("kv", [0, 2, 1])
def test_shapes_and_loss(kv):
    torch.manual_seed(0)
    m = GPT(tiny(n_kv_head=kv))
    idx = torch.randint(0, 97, (3, 16))
    assert m(idx).shape == (3, 16, 97)
    loss = m(idx, torch.randint(0, 97, (3, 16)))
    assert loss.shape == () and loss.dtype == torch.float32
    # initial loss near ln(V) per token: the sum is over 3*16 tokens
    assert abs(loss.item() / 48 - torch.log(torch.tensor(97.0)).item()) < 0.5


def test_grouped_query_attention_is_multi_head_with_shared_kv_heads():
    """n_kv_head=2 of 4 heads: query heads 0-1 read kv head 0, heads 2-3 kv head 1. The same model with 4 kv heads
    whose k/v weights repeat each group's gives the same logits (a wrong grouping, e.g. repeat instead of
    repeat_interleave, pairs heads 0 and 2 instead)."""
    torch.manual_seed(0)
    gqa, mha = GPT(tiny(n_kv_head=2)), GPT(tiny(n_kv_head=0))
    state, hs = gqa.state_dict(), 8
    for name, w in list(state.items()):
        if name.endswith("attn.qkv.weight"):  # rows: q (4 heads) | k (2) | v (2), hs rows each
            q, k, v = w.split([4 * hs, 2 * hs, 2 * hs])
            state[name] = torch.cat([q] + [t.view(2, hs, -1).repeat_interleave(2, 0).reshape(4 * hs, -1) for t in (k, v)])
    mha.load_state_dict(state)
    idx = torch.randint(0, 97, (2, 16))
    assert torch.allclose(gqa(idx), mha(idx), atol=1e-5)


def test_causal_future_tokens_do_not_change_past_logits():
    torch.manual_seed(0)
    m = GPT(tiny(n_kv_head=2)).eval()
    a = torch.randint(0, 97, (1, 16))
    b = a.clone()
    b[0, 10:] = (b[0, 10:] + 1) % 97  # change only positions >= 10
    la, lb = m(a), m(b)
    assert torch.allclose(la[0, :10], lb[0, :10], atol=1e-6)
    assert not torch.allclose(la[0, 10:], lb[0, 10:], atol=1e-3)


def test_rope_rotates_pairs_by_position_and_keeps_relative_scores():
    """apply_rope is the rotation of each pair (j, j + hs/2) by pos * theta^(-2j/hs) (checked against complex
    multiplication), so a query-key dot product depends only on the distance between their positions."""
    T, hs = 12, 8
    cos, sin = rope_cache(T, hs, 10000.0)
    x = torch.randn(2, T, 3, hs)
    angle = torch.arange(T)[:, None] * 10000.0 ** (-torch.arange(0, hs, 2) / hs)  # (T, hs/2)
    z = torch.complex(x[..., : hs // 2], x[..., hs // 2:]) * torch.polar(torch.ones_like(angle), angle)[None, :, None]
    assert torch.allclose(apply_rope(x, cos, sin), torch.cat((z.real, z.imag), dim=-1), atol=1e-5)
    q, k = torch.randn(hs), torch.randn(hs)
    rq = apply_rope(q.expand(1, T, 1, hs), cos, sin)[0, :, 0]  # (T, hs): q at every position
    rk = apply_rope(k.expand(1, T, 1, hs), cos, sin)[0, :, 0]
    assert torch.allclose(rq[7] @ rk[4], rq[3] @ rk[0], atol=1e-5)  # distance 3 at both places
    assert not torch.allclose(rq[7] @ rk[4], rq[4] @ rk[0], atol=1e-3)


def test_tied_and_untied_head():
    tied, untied = GPT(tiny(tie_embeddings=True)), GPT(tiny(tie_embeddings=False))
    assert tied.head.weight is tied.embed.weight
    assert untied.num_params() - tied.num_params() == 97 * 32


def test_rejects_too_long_sequence():
    with pytest.raises(ValueError, match="seq_len"):
        GPT(tiny())(torch.zeros(1, 17, dtype=torch.long))


def test_flops_formula_matches_hand_count():
    # d=32, 4 heads (hs 8), 2 kv heads, ffn explicit 64, L=2, V=97, T=16
    m = tiny(n_kv_head=2, ffn_hidden=64)
    qkv = 32 * (4 + 2 * 2) * 8  # 2048
    out = 32 * 32  # 1024
    mlp = 3 * 32 * 64  # 6144
    n_matmul = 2 * (qkv + out + mlp) + 32 * 97  # 18432 + 3104
    attn = 12 * 2 * 16 * 32  # 12 L T d
    assert flops_per_token(m) == 6 * n_matmul + attn == 141_504
    # every matmul weight of the model is in N_matmul (tied head counted once as the head)
    model = GPT(m)
    matrices = sum(p.numel() for n, p in model.named_parameters() if p.dim() == 2)
    assert n_matmul == matrices  # tied: the embedding *is* the head matrix


def test_flops_counted_by_torch_match_formula():
    """Forward FLOPs measured by torch's FlopCounterMode (matmuls + SDPA) = one third of the formula."""
    from torch.utils.flop_counter import FlopCounterMode

    m = tiny(ffn_hidden=64, tie_embeddings=False)
    model = GPT(m)
    idx = torch.randint(0, 97, (2, 16))
    from torch.nn.attention import SDPBackend, sdpa_kernel

    # the math backend runs attention as plain matmuls, which the counter sees (the fused CPU kernel it does not)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        model(idx)
    assert fc.get_total_flops() == flops_per_token(m) // 3 * 2 * 16


def test_gpt2_124m_parameter_count():
    from megacluster.config import build

    cfg = build("gpt2-124m")
    assert ffn_hidden(cfg.model) == 2048  # SwiGLU 8/3 d: same FLOPs as GPT-2's 4d GELU MLP
    with torch.device("meta"):
        n = GPT(cfg.model).num_params()
    assert 123e6 < n < 125e6


@pytest.mark.parametrize("kw", [{}, {"n_kv_head": 2}, {"n_kv_head": 1, "tie_embeddings": False},
                                {"ffn_hidden": 40}])
def test_config_parameter_count_matches_the_model(kw):
    """config.n_params (used to refuse a model too large for the machine before anything is built) counts
    what GPT builds."""
    from megacluster.config import n_params

    assert n_params(tiny(**kw)) == GPT(tiny(**kw)).num_params()


def test_residual_stream_follows_autocast_dtype():
    """Under bf16 autocast the residual stream is bf16 (half the bytes per norm/add); the loss stays fp32."""
    m = GPT(tiny())
    idx = torch.randint(0, m.config.vocab_size, (2, 16))
    seen = []
    m.blocks[0].register_forward_hook(lambda mod, inp, out: seen.append(out.dtype))
    full = m(idx, idx)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        half = m(idx, idx)
    assert seen == [torch.float32, torch.bfloat16]
    assert half.dtype == torch.float32 and half.item() == pytest.approx(full.item(), rel=2e-2)


@pytest.mark.parametrize("tie", [True, False])
def test_fused_head_loss_equals_the_plain_loss_and_gradients(tie):
    """HeadLoss (logits gradient written in the forward, the scale applied after the head's matmuls) gives the
    plain cross-entropy's loss and every parameter's gradient (fp32: to rounding); without grad it is the
    plain path itself."""
    torch.manual_seed(0)
    plain = GPT(tiny(tie_embeddings=tie, n_kv_head=2))
    fused = GPT(tiny(tie_embeddings=tie, n_kv_head=2), fused_loss=True)
    fused.load_state_dict(plain.state_dict())
    idx, tgt = torch.randint(0, 97, (3, 16)), torch.randint(0, 97, (3, 16))
    a, b = plain(idx, tgt), fused(idx, tgt)
    assert b.item() == pytest.approx(a.item(), rel=1e-6)
    (a / 48).backward()
    (b * 0.37 / 48).backward()  # any incoming gradient: it is applied in the backward
    for (name, p), q in zip(plain.named_parameters(), fused.parameters()):
        assert torch.allclose(q.grad, 0.37 * p.grad, rtol=1e-4, atol=1e-7), name
    with torch.no_grad():
        assert fused(idx, tgt).item() == plain(idx, tgt).item()


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("compiled", [True, False])
def test_fused_head_loss_under_bf16_autocast(tie, compiled):
    """The path the GPU runs: bf16 autocast, with torch.compile (Inductor on CPU here) and without. Loss and
    gradients match the plain path to bf16 rounding, and, compiled, the graph keeps no (tokens, vocab)-sized
    tensor for the backward (the plain one keeps the logits): the partitioner moves the head's two gradient
    matmuls into the forward, which is where the pass is saved."""
    torch.manual_seed(0)
    V = 1031  # the logits (64 x V) are then the largest tensor of the model
    plain, fused = GPT(tiny(tie_embeddings=tie, vocab_size=V)), GPT(tiny(tie_embeddings=tie, vocab_size=V), fused_loss=True)
    fused.load_state_dict(plain.state_dict())
    idx, tgt = torch.randint(0, V, (4, 16)), torch.randint(0, V, (4, 16))
    losses, kept = [], []
    for model in (plain, fused):
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = (torch.compile(model) if compiled else model)(idx, tgt)
        (loss / 64).backward()  # a power of two, as the trainer's 1/tokens usually is: rounding commutes with it
        losses.append(loss.item())
        kept.append([n for n in saved if n >= 64 * V])
    if compiled:
        assert kept[0] and not kept[1]
    assert losses[1] == pytest.approx(losses[0], rel=1e-3)
    for (name, p), q in zip(plain.named_parameters(), fused.parameters()):
        assert q.grad.dtype == p.grad.dtype, name
        err = (q.grad - p.grad).norm() / p.grad.norm()
        assert err < 1e-3, (name, err.item())  # a 1% scale error fails
