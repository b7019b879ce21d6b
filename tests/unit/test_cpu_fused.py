"""The fused CPU ops (kernels/cpu_fused.cpp) against their torch twins, op by op.

The twins are the code the model runs without them: worker/layers.rms_norm, F.silu(gate) * up,
worker/rotary.apply_rotary + kernels/attention.store_kv, and kernels/attention.paged_attention_reference.
fp32 results agree to float rounding of the reductions' order; elementwise ops (rotary, store) are
bit-for-bit, since the extension is built without fused multiply-adds.
"""

from __future__ import annotations

import shutil

import pytest
import torch
import torch.nn.functional as F

from loraxpy.kernels import cpu_fused
from loraxpy.kernels.attention import AttentionMetadata, paged_attention_reference, store_kv
from loraxpy.worker.layers import rms_norm
from loraxpy.worker.rotary import apply_rotary

pytestmark = pytest.mark.skipif(
    shutil.which("c++") is None and shutil.which("g++") is None, reason="no C++ compiler to build the ops"
)

DTYPES = [torch.float32, torch.bfloat16]
TOL = {torch.float32: dict(atol=2e-6, rtol=2e-6), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


@pytest.fixture(scope="module")
def ops():
    module = cpu_fused.load()
    # With a compiler present the ops must build: a silent fallback would leave them untested.
    assert module is not None, cpu_fused.unavailable_reason()
    return module


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_add_rms_norm(ops, dtype, offset):
    torch.manual_seed(0)
    h = torch.randn(7, 96).to(dtype)
    delta = torch.randn(7, 96).to(dtype)
    weight = torch.randn(96).to(dtype)
    expected_h = h + delta
    expected = rms_norm(expected_h, weight, 1e-5, offset)
    fused_h = h.clone()
    out = ops.add_rms_norm(fused_h, delta, weight, 1e-5, offset)
    assert torch.equal(fused_h, expected_h)  # the residual stream, updated in place
    torch.testing.assert_close(out, expected, **TOL[dtype])
    alone = h.clone()
    torch.testing.assert_close(
        ops.add_rms_norm(alone, None, weight, 1e-5, offset), rms_norm(h, weight, 1e-5, offset), **TOL[dtype]
    )
    assert torch.equal(alone, h)  # no delta: h untouched


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul_on_a_strided_view(ops, dtype):
    torch.manual_seed(1)
    wide = torch.randn(5, 2 * 48 + 8).to(dtype)
    x = wide[:, : 2 * 48]  # rows not contiguous with each other
    gate, up = x.chunk(2, dim=-1)
    torch.testing.assert_close(ops.silu_and_mul(x), F.silu(gate) * up, **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rot", [16, 8])  # whole heads, and partial rotary (Phi-3 style)
def test_rotary_store_equals_apply_rotary_and_store_kv(ops, dtype, rot):
    torch.manual_seed(2)
    heads, kv_heads, head_dim, tokens = 4, 2, 16, 6
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim).to(dtype)
    angles = torch.randn(tokens, rot // 2)
    cos = torch.cat([angles.cos(), angles.cos()], -1).unsqueeze(1).to(dtype)
    sin = torch.cat([angles.sin(), angles.sin()], -1).unsqueeze(1).to(dtype)
    slots = torch.tensor([5, 0, -1, 9, 3, 14])  # one padding row stores nothing
    caches = [torch.zeros(4, 4, kv_heads, head_dim, dtype=dtype) for _ in range(4)]

    q_size, kv_size = heads * head_dim, kv_heads * head_dim
    qk = qkv[:, : q_size + kv_size].view(tokens, heads + kv_heads, head_dim)
    rotated = apply_rotary(qk, (cos, sin))
    v = qkv[:, q_size + kv_size :].view(tokens, kv_heads, head_dim)
    store_kv(rotated[:, heads:], v, caches[0], caches[1], slots)

    fused = qkv.clone()
    ops.rotary_store(fused, heads, kv_heads, head_dim, cos, sin, caches[2], caches[3], slots)
    assert torch.equal(fused[:, : q_size + kv_size].view_as(rotated), rotated)
    assert torch.equal(caches[2], caches[0]) and torch.equal(caches[3], caches[1])


def test_rotary_store_refuses_a_slot_outside_the_cache(ops):
    qkv = torch.zeros(1, 3 * 16)
    cache = torch.zeros(2, 4, 1, 16)
    cos = torch.ones(1, 1, 16)
    with pytest.raises(RuntimeError, match="outside the cache"):
        ops.rotary_store(qkv, 1, 1, 16, cos, cos, cache, cache.clone(), torch.tensor([8]))


@pytest.fixture(params=["per-head", "per-sequence"])
def attention_split(request):
    """decode_attention splits its work per (sequence, KV head) when sequences are fewer than twice
    the threads, else per sequence: 3 sequences on 4 threads take the first path, on 1 the second."""
    before = torch.get_num_threads()
    torch.set_num_threads(4 if request.param == "per-head" else 1)
    yield request.param
    torch.set_num_threads(before)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("window", [0, 5])
@pytest.mark.parametrize("layout", [(4, 4), (9, 3), (2, 2)])  # GQA groups of 1 and 3 (SmolLM2's 9/3)
def test_decode_attention_equals_the_reference(ops, dtype, window, layout, attention_split):
    torch.manual_seed(3)
    heads, kv_heads = layout
    head_dim, block_size, num_blocks = 16, 4, 12
    k_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim).to(dtype)
    v_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim).to(dtype)
    seq_lens = [1, 7, 13]
    tables = [[3], [0, 5], [11, 2, 8, 6]]
    meta = AttentionMetadata.build([1, 1, 1], seq_lens, tables, torch.device("cpu"))
    # q rows strided, as the q part of a qkv projection's output is
    qkv = torch.randn(3, (heads + 2 * kv_heads) * head_dim).to(dtype)
    q = qkv[:, : heads * head_dim]
    expected = paged_attention_reference(
        q.reshape(3, heads, head_dim), k_cache, v_cache, meta, 0.25, window or None
    )
    out = ops.decode_attention(q, k_cache, v_cache, meta.block_tables, meta.seq_lens, heads, 0.25, window)
    torch.testing.assert_close(out.view(3, heads, head_dim), expected, **TOL[dtype])


def test_decode_attention_padding_rows_and_bad_tables(ops):
    k_cache = torch.randn(4, 4, 1, 8)
    meta = AttentionMetadata.build([1, 1], [3, 1], [[1], [2]], torch.device("cpu"))
    q = torch.randn(2, 8)
    lens = meta.seq_lens.clone()
    lens[1] = 0  # a padding row of a decode graph's bucket attends to nothing
    out = ops.decode_attention(q, k_cache, k_cache, meta.block_tables, lens, 1, 1.0, 0)
    assert torch.equal(out[1], torch.zeros(8))
    bad = meta.block_tables.clone()
    bad[0, 0] = 99
    with pytest.raises(RuntimeError, match="outside the cache"):
        ops.decode_attention(q, k_cache, k_cache, bad, meta.seq_lens, 1, 1.0, 0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("outs", [(24,), (24, 8, 8)])  # one slice, and a fused q/k/v-like layer
def test_lora_rows_equals_the_grouped_torch_path(ops, dtype, outs):
    """lora_rows against kernels/lora.lora_add_fused over the same transposed slot layout."""
    from loraxpy.kernels import lora

    torch.manual_seed(4)
    num_slots, in_features, max_rank, n = 5, 40, 8, len(outs)
    ranks = {1: 8, 2: 4, 3: 1, 4: 6}
    a_t = torch.zeros(num_slots, in_features, max_rank * n)
    b_t = torch.zeros(num_slots, max_rank, sum(outs))
    for slot, rank in ranks.items():  # rank-padded, as LoraSlots.write leaves them
        a_t.view(num_slots, in_features, max_rank, n)[slot, :, :rank] = torch.randn(in_features, rank, n)
        b_t[slot, :rank] = torch.randn(rank, sum(outs))
    a_t, b_t = a_t.to(dtype), b_t.to(dtype)
    # base rows, every rank; slot 1 on eleven rows (kernel items of 8 + 3), slot 2 on two apart
    slots = [2, 0, 1, 1, 4, 3, 0, 2, 1, 1, 1, 1, 1, 1, 1, 1, 1]
    x = torch.randn(len(slots), in_features + 6).to(dtype)[:, :in_features]  # strided rows
    y0 = torch.randn(len(slots), sum(outs) + 4).to(dtype)
    starts = [sum(outs[:i]) for i in range(n)]
    offsets = [s + 4 for s in starts]  # slices placed past y's first columns
    b_slices = [(b_t[:, :, s : s + o], off) for s, o, off in zip(starts, outs, offsets, strict=True)]
    plan = lora.LoraPlan.build(slots, ranks, max_rank, x.device)
    expected = lora.lora_add_fused(x, y0.clone(), a_t, b_slices, plan)
    got = y0.clone()
    rank_table = torch.tensor([ranks.get(s, max_rank) for s in range(num_slots)])
    ops.lora_rows(x, got, a_t, b_t, torch.tensor(slots), rank_table, list(outs), offsets)
    # sums of 40 products of unit-scale values, summed in another order: test_lora_kernels' tolerance
    tol = dict(rtol=1e-5, atol=1e-4) if dtype == torch.float32 else TOL[dtype]
    torch.testing.assert_close(got, expected, **tol)
    assert torch.equal(got[torch.tensor(slots) == 0], y0[torch.tensor(slots) == 0])  # base rows untouched
    assert torch.equal(got[:, :4], y0[:, :4])  # columns outside the slices untouched


def test_lora_rows_refuses_a_slot_outside_the_stack(ops):
    a_t, b_t = torch.zeros(2, 4, 2), torch.zeros(2, 2, 3)
    with pytest.raises(RuntimeError, match="outside the stack"):
        ops.lora_rows(
            torch.zeros(1, 4), torch.zeros(1, 3), a_t, b_t, torch.tensor([2]), torch.tensor([2, 2]), [3], [0]
        )


def test_a_lock_left_by_a_killed_build_does_not_block_the_next_load(ops):
    """torch's build lock is a plain file: a worker killed mid-build leaves it, and torch's own
    loader would then wait for it forever. Our loader (under an flock) clears it and loads."""
    import subprocess
    import sys

    directory = cpu_fused.build_dir() / cpu_fused._name()
    (directory / "lock").touch()
    code = "from loraxpy.kernels import cpu_fused; assert cpu_fused.load() is not None"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    assert not (directory / "lock").exists()


def test_a_build_held_by_another_process_is_waited_for_only_so_long(ops, tmp_path):
    """A process stopped or hung mid-build holds the build's flock: the next loader waits at most
    LORAX_KERNEL_BUILD_WAIT_S, then keeps the torch twins with a message instead of blocking."""
    import fcntl
    import os
    import subprocess
    import sys

    cache = tmp_path / "kernels"
    directory = cache / cpu_fused._name()
    directory.mkdir(parents=True)
    env = {**os.environ, "LORAX_KERNEL_CACHE": str(cache), "LORAX_KERNEL_BUILD_WAIT_S": "1"}
    code = "from loraxpy.kernels import cpu_fused; print(cpu_fused.load(), cpu_fused.unavailable_reason())"
    with open(directory / "loraxpy.flock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # this process plays the one building
        out = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
        )
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(
        "None TimeoutError: another process has been building the fused CPU ops for over 1 s"
    )


@pytest.mark.parametrize("vocab", [1, 50, 64 * 3 + 7])
def test_greedy_logsumexp_equals_argmax_and_logsumexp(ops, vocab):
    """The twin: torch.argmax (its first maximum on ties) and torch.logsumexp, NaN and inf included."""
    torch.manual_seed(6)
    logits = torch.randn(7, vocab) * 8
    logits[1, -1] = 100.0  # the maximum last
    logits[2] = logits[2, 0]  # every logit tied: the first wins
    logits[3, vocab // 2 :] = float("-inf")  # masked tokens
    logits[4] = float("-inf")  # every token masked
    logits[5, vocab // 2] = float("inf")
    logits[6, vocab // 3] = float("nan")
    ids, norms = ops.greedy_logsumexp(logits)
    assert ids.tolist() == logits.argmax(dim=-1).tolist()
    torch.testing.assert_close(norms, logits.logsumexp(dim=-1), rtol=1e-6, atol=1e-5, equal_nan=True)
    with pytest.raises(RuntimeError, match="contiguous fp32"):
        ops.greedy_logsumexp(logits.double())
