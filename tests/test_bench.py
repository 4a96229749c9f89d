"""bench.py's FLOP count for CPU attention, against attention written as matrix products."""
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import bench


def counted(fn, *args):
    with FlopCounterMode(display=False, custom_mapping=bench.ATTENTION_FLOPS) as fc:
        fn(*args).square().sum().backward()
    return fc.get_total_flops()


def matmul_attention(q, k, v):                         # the products the model FLOPs are defined by
    return torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, -1) @ v


def qkv(sq=40, sk=56, d=24, dv=24):                   # dv != d would take torch's math path (bmm)
    g = torch.Generator().manual_seed(0)
    return [torch.randn(2, 3, n, e, generator=g, requires_grad=True) for n, e in ((sq, d), (sk, d), (sk, dv))]


def test_unmasked_attention_counts_as_its_six_products():
    q, k, v = qkv()
    sdpa = counted(F.scaled_dot_product_attention, q, k, v)
    assert sdpa > 0                                    # torch alone counts 0 for the CPU kernel
    assert sdpa == counted(matmul_attention, q, k, v) == 6 * 2 * 3 * 40 * 56 * 48


def test_masked_and_causal_attention_count_only_allowed_pairs():
    q, k, v = qkv()
    mask = torch.rand(2, 1, 40, 56, generator=torch.Generator().manual_seed(1)) < 0.3
    mask[..., 0] = True                                # no empty softmax row
    pairs = int(mask.sum()) * 3                        # broadcast over 3 heads
    assert bench.attention_pairs(q, k, mask=mask) == pairs
    assert counted(lambda *a: F.scaled_dot_product_attention(*a, attn_mask=mask), q, k, v) == 6 * pairs * 48
    additive = torch.zeros(mask.shape).masked_fill(~mask, float("-inf"))
    assert bench.attention_pairs(q, k, mask=additive) == pairs
    q, k, v = qkv(sq=40, sk=40)
    assert bench.attention_pairs(q, k, is_causal=True) == 2 * 3 * 40 * 41 // 2


def test_one_layer_of_a_matrix_set_is_its_first_slice():
    """bench.py muon times one layer and multiplies when a set is slow: the slice must be a whole
    layer (four d x d, one 4d x d, one d x 4d), not six d x d matrices."""
    shapes = bench.hidden_set(16, 3)
    layer = shapes[:len(shapes) // 3]
    assert sorted(layer) == sorted([(16, 16)] * 4 + [(64, 16), (16, 64)]) and layer * 3 == shapes
