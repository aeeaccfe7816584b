"""The model: shapes, parameter and FLOP counts against the formulas, init, softcap, losses, GQA."""

import math

import pytest
import torch

from nanoforge.model.gpt import GPT, GPTConfig, build_model, config_for_depth


def expected_params(depth: int, vocab: int, n_kv_head: int | None = None) -> int:
    width = 64 * depth
    heads = math.ceil(width / 128)
    head_dim = width // heads
    kv = n_kv_head or heads
    padded = math.ceil(vocab / 64) * 64
    per_layer = width * heads * head_dim + 2 * width * kv * head_dim + width * width + 8 * width * width
    return 2 * padded * width + depth * per_layer


@pytest.mark.parametrize("depth,vocab", [(1, 300), (2, 512), (3, 1000), (4, 4096), (6, 65536)])
def test_param_and_flop_counts_follow_the_formulas(depth, vocab):
    cfg = config_for_depth(depth, vocab, sequence_len=128)
    assert cfg.n_embd == 64 * depth and cfg.n_head == math.ceil(64 * depth / 128)
    if depth % 2 == 0:
        assert cfg.head_dim == 128  # nanochat's head_dim for even depths
    with torch.device("meta"):
        model = GPT(cfg)
    padded = math.ceil(vocab / 64) * 64
    assert model.num_params() == expected_params(depth, vocab)
    assert model.num_embedding_params() == padded * cfg.n_embd
    attention = 12 * depth * cfg.n_head * cfg.head_dim * 128
    assert model.estimate_flops() == 6 * (model.num_params() - padded * cfg.n_embd) + attention


def test_nanochat_d20_numbers():
    # the speedrun model: 20 layers, width 1280, 10 heads, vocab 65536, T 2048
    with torch.device("meta"):
        model = GPT(config_for_depth(20, 65536, 2048))
    assert model.num_params() == 560_988_160
    assert model.estimate_flops() == 6 * (560_988_160 - 65536 * 1280) + 12 * 20 * 10 * 128 * 2048


def test_gqa_counts_and_runs():
    cfg = config_for_depth(4, 300, 32, n_kv_head=1)
    assert cfg.n_head == 2 and cfg.n_kv_head == 1
    torch.manual_seed(0)
    model = build_model(cfg)
    assert model.num_params() == expected_params(4, 300, n_kv_head=1)
    idx = torch.randint(0, 300, (2, 32))
    assert model(idx).shape == (2, 32, 300)


def test_forward_shapes_softcap_and_cropped_vocab():
    torch.manual_seed(0)
    cfg = GPTConfig(sequence_len=16, vocab_size=300, n_layer=2, n_head=2, n_kv_head=2, n_embd=64)
    model = build_model(cfg)
    assert model.lm_head.weight.shape[0] == 320  # padded to a multiple of 64
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 50.0)  # huge logits: the softcap must bound them
    idx = torch.randint(0, 300, (3, 16))
    logits = model(idx)
    assert logits.shape == (3, 16, 300) and logits.dtype == torch.float32
    assert logits.abs().max() <= 15.0
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model(idx).dtype == torch.float32  # fp32 logits under autocast too


def test_init_matches_nanochat():
    torch.manual_seed(0)
    model = build_model(config_for_depth(4, 512, 64))
    assert model.lm_head.weight.abs().sum() == 0
    for block in model.transformer.h:
        assert block.attn.c_proj.weight.abs().sum() == 0 and block.mlp.c_proj.weight.abs().sum() == 0
    assert model.transformer.wte.weight.std().item() == pytest.approx(1.0, rel=0.05)
    fc = model.transformer.h[0].mlp.c_fc.weight  # fan_in 256, fan_out 1024: std 1/sqrt(256)
    assert fc.std().item() == pytest.approx(1 / 16, rel=0.05)
    q = model.transformer.h[0].attn.c_q.weight  # square: 1/sqrt(256)
    assert q.std().item() == pytest.approx(1 / 16, rel=0.05)
    # zero head: uniform prediction, loss = ln(vocab)
    idx = torch.randint(0, 512, (2, 64))
    assert model(idx, idx).item() == pytest.approx(math.log(512), rel=1e-5)


def test_loss_reductions_and_ignore_index():
    torch.manual_seed(0)
    model = build_model(GPTConfig(sequence_len=8, vocab_size=100, n_layer=1, n_head=1, n_kv_head=1, n_embd=64))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    idx = torch.randint(0, 100, (2, 8))
    tgt = torch.randint(0, 100, (2, 8))
    per_token = model(idx, tgt, loss_reduction="none")
    assert per_token.shape == (2, 8)
    assert model(idx, tgt).item() == pytest.approx(per_token.mean().item(), rel=1e-5)
    assert model(idx, tgt, loss_reduction="sum").item() == pytest.approx(per_token.sum().item(), rel=1e-5)
    masked = tgt.clone()
    masked[:, :4] = -1
    assert model(idx, masked).item() == pytest.approx(per_token[:, 4:].mean().item(), rel=1e-5)
    assert (model(idx, masked, loss_reduction="none")[:, :4] == 0).all()


@pytest.mark.parametrize("T", [7, 128, 300])
def test_cpu_attention_is_sdpa_causal(T):
    # causal_attention_cpu (the CPU training path) against PyTorch's kernel: values and gradients,
    # at a length inside one block, exactly one, and over blocks of uneven size (128, 128, 44)
    from nanoforge.model.gpt import causal_attention_cpu

    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, T, 16, dtype=torch.float64, requires_grad=True) for _ in range(3))
    ours = causal_attention_cpu(q, k, v)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert ours.dtype == q.dtype and torch.allclose(ours, ref, atol=1e-6)
    g = torch.randn_like(ref)
    assert all(torch.allclose(a, b, atol=1e-6)
               for a, b in zip(torch.autograd.grad(ours, (q, k, v), g), torch.autograd.grad(ref, (q, k, v), g)))
    # bf16: within what bf16 flash attention itself is off from the fp64 answer (x3)
    qb, kb, vb = (t.detach().bfloat16() for t in (q, k, v))
    flash = (torch.nn.functional.scaled_dot_product_attention(qb, kb, vb, is_causal=True).double() - ref).abs().max()
    assert (causal_attention_cpu(qb, kb, vb).double() - ref).abs().max() <= 3 * flash + 1e-3


def test_causal_and_rotary_positions():
    # a later token never changes earlier logits; the same token at another position gets other logits
    torch.manual_seed(0)
    model = build_model(GPTConfig(sequence_len=16, vocab_size=64, n_layer=2, n_head=1, n_kv_head=1, n_embd=64))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    idx = torch.randint(0, 64, (1, 16))
    changed = idx.clone()
    changed[0, -1] = (idx[0, -1] + 1) % 64
    assert torch.allclose(model(idx)[0, :-1], model(changed)[0, :-1], atol=1e-5)
    same = torch.full((1, 4), 7)
    out = model(same)
    assert not torch.allclose(out[0, 1], out[0, 3])


def test_bad_configs_are_named():
    with pytest.raises(ValueError, match="n_kv_head=3 must divide n_head=4"):
        GPTConfig(n_head=4, n_kv_head=3, n_embd=256)
    with pytest.raises(ValueError, match="not divisible by n_head"):
        GPTConfig(n_head=3, n_kv_head=3, n_embd=320)
