"""Per-GPU memory breakdown on hand-computable cases (Korthikanti et al. 2022; Megatron distributed optimizer)."""

import pytest

from megacluster.plan import predict
from megacluster.plan.perf import in_flight, stage_layers

# 2 layers, h = 64, 4 heads (no GQA), GELU MLP f = 4h, V = 1000, s = 128: params per layer
# attention h(h + 2h) + h^2 = 16,384, MLP 2 h f = 32,768 -> 49,152; embedding and head 64,000 each (pp = 1).
TINY = {"model": {"layers": 2, "hidden": 64, "ffn_hidden": 256, "mlp": "gelu", "heads": 4, "vocab": 1000,
                  "seq_len": 128},
        "train": {"global_batch": 4, "micro_batch": 1, "dtype": "bf16", "recompute": "none", "zero": 1,
                  "attention": "flash"},
        "parallel": {"tp": 1, "pp": 1, "cp": 1, "dp": 4},
        "fleet": {"gpu": "H100-SXM", "count": 4, "gpus_per_node": 4}}
PARAMS = 2 * 49_152 + 2 * 64_000


def test_tiny_breakdown_by_hand():
    mem = predict(TINY, mc=False).memory  # GB (1e9 B)
    assert mem["weights"] == pytest.approx(PARAMS * 2 / 1e9)  # bf16
    assert mem["grads"] == pytest.approx(PARAMS * 4 / 1e9)  # fp32 accumulation, not sharded by ZeRO-1
    assert mem["optimizer"] == pytest.approx(PARAMS * 12 / 4 / 1e9)  # master + m + v, sharded over dp = 4
    # activations: Korthikanti's 34 s b h per layer (GPT, f = 4h) less the two 1-byte dropout masks (Llama-style
    # models have no dropout) = 32 s b h, no 5 a s^2 b term with flash attention; one micro-batch in flight
    # (pp = 1); plus fp32 logits s x V x 4 B
    per_layer = 32 * 128 * 1 * 64
    assert mem["activations"] == pytest.approx((2 * per_layer + 128 * 1000 * 4) / 1e9)
    assert mem["reserved"] == 2.0


def test_zero_stages_shard_what_they_say():
    def mem(z):
        return predict({**TINY, "train": {**TINY["train"], "zero": z}}, mc=False).memory
    m0, m2, m3 = mem(0), mem(2), mem(3)
    assert m0["optimizer"] == pytest.approx(PARAMS * 12 / 1e9)
    assert m2["grads"] == pytest.approx(PARAMS * 4 / 4 / 1e9) and m2["weights"] == pytest.approx(PARAMS * 2 / 1e9)
    # ZeRO-3 also holds two units gathered whole (in use and prefetched): here the embedding / head, 64,000
    # parameters each, larger than a layer (49,152)
    assert m3["weights"] == pytest.approx((PARAMS * 2 / 4 + 2 * 64_000 * 2) / 1e9)


def test_fp16_keeps_fp16_grads_and_fp32_grad_copy():
    mem = predict({**TINY, "train": {**TINY["train"], "dtype": "fp16", "zero": 0}}, mc=False).memory
    assert mem["grads"] == pytest.approx(PARAMS * 2 / 1e9)
    assert mem["optimizer"] == pytest.approx(PARAMS * 16 / 1e9)  # Megatron: 20 B/param without ZeRO


@pytest.mark.parametrize("pp,vpp", [(4, 1), (8, 2), (16, 4), (16, 8)])
def test_in_flight_matches_korthikanti(pp, vpp):
    """First stage: L (1 + (pp-1)/(pp vpp)) layers' worth interleaved, L (= pp stages x L/pp) without."""
    held = in_flight(pp, vpp, 4 * pp, 0)
    factor = 1 if vpp == 1 else 1 + (pp - 1) / (pp * vpp)
    assert sum(held) / (pp * vpp) == pytest.approx(factor)  # chunk-micro-batches x L/(pp vpp) layers = L x factor
    assert in_flight(pp, vpp, 4 * pp, pp - 1)[-1] == 1  # the last stage runs each micro-batch's backward at once


def test_llama3_126_layers_trim_first_and_last_stage():
    assert stage_layers(126, 16, 4) == (7, 8, 7)  # Llama 3: one layer off the first and the last stage
    assert stage_layers(128, 64, 1) == (2, 2, 2)
    assert stage_layers(105, 35, 1) == (3, 3, 3)


def test_memory_is_the_fullest_stage_even_when_it_is_a_middle_one():
    """10 layers on pp = 4: 2 + 3 + 3 + 2. 1F1B holds 4, 3, 2, 1 micro-batches: 8 layer-micro-batches on stage 0
    against 9 on stage 1. Stage 1 is the fullest (21.5 MB against 19.7: the embedding does not make up the extra
    layer's activations), and it used to be left out: only the first and the last stage were counted."""
    raw = {**TINY, "model": {**TINY["model"], "layers": 10, "seq_len": 1024},
           "train": {**TINY["train"], "global_batch": 8},
           "parallel": {"tp": 1, "pp": 4, "cp": 1, "dp": 1}}
    mem = predict(raw, mc=False).memory
    per_layer = 32 * 1024 * 64  # bytes a layer keeps per micro-batch (as above)
    assert stage_layers(10, 4, 1) == (2, 3, 2)
    assert mem["activations"] == pytest.approx(9 * per_layer / 1e9)  # stage 1: 3 layers x 3 micro-batches
    assert mem["weights"] == pytest.approx(3 * 49_152 * 2 / 1e9)  # no embedding there


def test_a_layout_the_first_and_last_stage_cannot_absorb_is_refused():
    """126 layers on pp 16 x vpp 6 = 96 chunks of 2 leave 66 slots empty: the first and last stage can give up one
    layer each. It was planned as 11 + 14 x 12 + 0 = 179 layers, 50% more compute than the model has."""
    from megacluster.plan.scenario import ScenarioError
    raw = {**TINY, "model": {**TINY["model"], "layers": 126}, "train": {**TINY["train"], "global_batch": 32},
           "parallel": {"tp": 1, "pp": 16, "cp": 1, "dp": 1, "vpp": 6}, "fleet": {**TINY["fleet"], "count": 16}}
    with pytest.raises(ScenarioError, match="parallel.vpp = 6: model.layers = 126 in 96 chunks of 2 layers leave 66"):
        predict(raw, mc=False)
    assert predict({**raw, "parallel": {**raw["parallel"], "vpp": 4}}, mc=False).step_time_s > 0  # 7 + 14 x 8 + 7
    searched = {**raw, "parallel": {"pp": 24, "search": True}, "model": {**raw["model"], "layers": 32},
                "fleet": {**raw["fleet"], "count": 24}}  # vpp left to the search: the reason, not "no valid plan"
    with pytest.raises(ScenarioError, match="parallel.pp = 24, parallel.vpp = 1: model.layers = 32 in 24 chunks"):
        predict(searched, mc=False)


def test_zero_shards_over_dp_times_cp():
    """Context-parallel ranks hold the same weights: Megatron's distributed optimizer shards over dp x cp."""
    cp2 = {**TINY, "parallel": {"tp": 1, "pp": 1, "cp": 2, "dp": 2}}
    mem = predict(cp2, mc=False).memory
    assert mem["optimizer"] == pytest.approx(PARAMS * 12 / 4 / 1e9)  # 4 ranks: dp 2 x cp 2
    z3 = predict({**cp2, "train": {**TINY["train"], "zero": 3}}, mc=False).memory
    assert z3["weights"] == pytest.approx((PARAMS * 2 / 4 + 2 * 64_000 * 2) / 1e9)  # + two gathered units
    assert z3["grads"] == pytest.approx(PARAMS * 4 / 4 / 1e9)


def test_gradients_are_reduced_over_context_parallel_ranks_too():
    """dp = 1, cp = 8: the 8 ranks of the one replica each hold a partial gradient; it must be reduced."""
    raw = {"model": {"layers": 32, "hidden": 4096, "ffn_hidden": 14336, "heads": 32, "kv_heads": 8,
                     "vocab": 128256, "seq_len": 65536},
           "train": {"global_batch": 16, "micro_batch": 1, "recompute": "none", "overlap_grad_reduce": False},
           "parallel": {"tp": 8, "pp": 1, "cp": 8, "dp": 1},
           "fleet": {"gpu": "H100-SXM", "count": 64}}
    p = predict(raw, mc=False)
    assert p.breakdown["dp_comm_s"] > 0
    # the same bytes over the same scale-out links as dp = 8, cp = 1 reduces (8 ranks, tp 8 fills a node)
    dp8 = predict({**raw, "model": {**raw["model"], "seq_len": 8192}, "train": {**raw["train"], "global_batch": 128},
                   "parallel": {"tp": 8, "pp": 1, "cp": 1, "dp": 8}}, mc=False)
    assert p.breakdown["dp_comm_s"] == pytest.approx(dp8.breakdown["dp_comm_s"])


def test_selective_recompute_with_unfused_attention_holds_one_layers_scores():
    """Selective recompute does not keep the unfused score matrices, but rebuilds them whole, one layer at a time:
    5 a s^2 b / t bytes live (Korthikanti). They were not counted: a 64K-token plan was reported as fitting in
    40 GB while one layer's scores alone took 86 GB (and full recompute, which keeps less, did not fit)."""
    unfused = {**TINY, "train": {**TINY["train"], "attention": "unfused"}}
    per_layer = 32 * 128 * 1 * 64  # as in the breakdown above: selective keeps all but the attention core
    scores = 2.5 * 4 * 128 * 128 * 2  # 2.5 a s^2 b elements of 2 B, a = 4 heads
    logits = 128 * 1000 * 4
    sel = predict({**unfused, "train": {**unfused["train"], "recompute": "selective"}}, mc=False).memory
    assert sel["activations"] == pytest.approx((2 * per_layer + scores + logits) / 1e9)
    none = predict({**unfused, "train": {**unfused["train"], "recompute": "none"}}, mc=False).memory
    assert none["activations"] == pytest.approx((2 * (per_layer + scores) + logits) / 1e9)  # kept for each layer


def test_zero3_gathers_nothing_when_nothing_is_sharded():
    """dp x cp = 1: the ZeRO-3 shards are the whole weights; no gathered copy on top (a review)."""
    one = {**TINY, "parallel": {"tp": 1, "pp": 1, "cp": 1, "dp": 1}, "fleet": {**TINY["fleet"], "count": 1},
           "train": {**TINY["train"], "global_batch": 1, "zero": 3}}
    assert predict(one, mc=False).memory["weights"] == pytest.approx(PARAMS * 2 / 1e9)
