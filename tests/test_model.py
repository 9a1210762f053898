import pytest
import torch

from megacluster.config import ModelConfig, ffn_hidden
from megacluster.model import GPT, flops_per_token


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


def test_causal_future_tokens_do_not_change_past_logits():
    torch.manual_seed(0)
    m = GPT(tiny(n_kv_head=2)).eval()
    a = torch.randint(0, 97, (1, 16))
    b = a.clone()
    b[0, 10:] = (b[0, 10:] + 1) % 97  # change only positions >= 10
    la, lb = m(a), m(b)
    assert torch.allclose(la[0, :10], lb[0, :10], atol=1e-6)
    assert not torch.allclose(la[0, 10:], lb[0, 10:], atol=1e-3)


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
