"""The flash-attn / vllm-flash-attn attention backend on CPU, against fakes of both libraries.

Neither library runs here (nor installs on the lent GPU machines' torch), so each fake below is
written in plain torch from the library's documented contract, independently of the project's
code: paged K/V [num_blocks, block_size, kv_heads, head_dim] read through int32 block tables, the
causal mask aligned to the bottom right of each sequence, window_size (left, right), softcap, GQA,
rows with no key output as zeros, and the checks the real kernels make (fp16/bf16 only, int32
tables, blocks of a multiple of 256 for flash-attn 2 and of 16 for vllm-flash-attn). They prove
the backend's layout conversion (equal to the torch reference), auto's choice (only importable,
compatible and self-checked), and that a failing or mismatching library is dropped with a warning.
"""

from __future__ import annotations

import logging
import sys
import types
from pathlib import Path

import pytest
import torch

from loraxpy.kernels import attention_flash, attention_triton
from loraxpy.kernels.attention import (
    AttentionBackend,
    AttentionMetadata,
    paged_attention_reference,
    select_attention_backend,
    store_kv,
)
from loraxpy.proto import worker_pb2 as pb
from loraxpy.worker.batch import CachedRequestData, NewRequestData, StepInput
from loraxpy.worker.layers import Shard
from loraxpy.worker.model import CausalLM
from loraxpy.worker.model_config import ModelConfig
from loraxpy.worker.runner import ModelRunner, RunnerOptions
from loraxpy.worker.sampling import SamplingParams
from loraxpy.worker.self_check import SelfCheck, attention_of, relative_error
from loraxpy.worker.server import WorkerServicer

CPU, CUDA = torch.device("cpu"), torch.device("cuda")  # "cuda" only names the device auto chooses for
BF16 = torch.bfloat16

# ---- the fakes: the libraries' documented semantics in plain torch --------------------------------


def _attend_one(q, keys, values, scale, causal, window, softcap):  # type: ignore[no-untyped-def]
    """q [Sq, H, D] against keys/values [L, KVH, D]: query i may see key j when j <= i + L - Sq
    (causal, bottom right) and j >= i + L - Sq - window[0] (window[0] >= 0); unseen rows give 0."""
    sq, heads, _ = q.shape
    length, kv_heads, _ = keys.shape
    out = torch.zeros(sq, heads, values.shape[2])
    for h in range(heads):
        kh = h // (heads // kv_heads)  # heads 0..g-1 read KV head 0, and so on
        for i in range(sq):
            scores = (keys[:, kh].float() @ q[i, h].float()) * scale  # [L]
            if softcap > 0:
                scores = softcap * torch.tanh(scores / softcap)
            seen = [
                j
                for j in range(length)
                if (not causal or j <= i + length - sq)
                and (window[0] < 0 or j >= i + length - sq - window[0])
            ]
            if seen:
                weights = scores[seen].softmax(0)
                out[i, h] = weights @ values[seen, kh].float()
    return out


def _gather(cache, table, length):  # type: ignore[no-untyped-def]
    block = cache.shape[1]
    return torch.stack([cache[int(table[j // block]), j % block] for j in range(length)])


def _check_paged(q, k_cache, block_table, lengths, multiple):  # type: ignore[no-untyped-def]
    if q.dtype not in (torch.float16, torch.bfloat16):
        raise RuntimeError("FlashAttention only support fp16 and bf16 data type")
    if k_cache.dtype != q.dtype:
        raise RuntimeError("query and key must have the same dtype")
    if block_table.dtype != torch.int32 or lengths.dtype != torch.int32:
        raise RuntimeError("block_table and sequence lengths must have dtype torch.int32")
    if k_cache.shape[1] % multiple:
        raise RuntimeError(f"Paged KV cache block size must be divisible by {multiple}")


def fake_flash_attn_with_kvcache(
    q, k_cache, v_cache, k=None, v=None, rotary_cos=None, rotary_sin=None, cache_seqlens=None,
    cache_batch_idx=None, cache_leftpad=None, block_table=None, softmax_scale=None, causal=False,
    window_size=(-1, -1), softcap=0.0, rotary_interleaved=True, alibi_slopes=None, num_splits=0,
    return_softmax_lse=False,
):  # type: ignore[no-untyped-def]  # fmt: skip
    """flash_attn.flash_attn_with_kvcache: q [batch, seqlen_q, heads, dim] -> the same shape."""
    assert k is None and v is None and block_table is not None and cache_seqlens is not None
    _check_paged(q, k_cache, block_table, cache_seqlens, 256)
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    out = torch.stack([
        _attend_one(
            q[b], _gather(k_cache, block_table[b], int(n)), _gather(v_cache, block_table[b], int(n)),
            scale, causal, window_size, softcap,
        )
        for b, n in enumerate(cache_seqlens)
    ])  # fmt: skip
    return out.to(q.dtype)


def fake_flash_attn_varlen_func(
    q, k, v, max_seqlen_q, cu_seqlens_q, max_seqlen_k, cu_seqlens_k=None, seqused_k=None, q_v=None,
    dropout_p=0.0, softmax_scale=None, causal=False, window_size=None, softcap=0.0, alibi_slopes=None,
    deterministic=False, return_attn_probs=False, block_table=None, return_softmax_lse=False, out=None,
    fa_version=2,
):  # type: ignore[no-untyped-def]  # fmt: skip
    """vllm_flash_attn.flash_attn_varlen_func with a block table: q [total_q, heads, dim]."""
    assert block_table is None or seqused_k is not None, (
        "seqused_k must be provided if block_table is provided"
    )
    assert cu_seqlens_k is None, "cu_seqlens_k and seqused_k cannot be provided at the same time"
    _check_paged(q, k, block_table, seqused_k, 16)
    assert cu_seqlens_q.dtype == torch.int32
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    window = tuple(window_size) if window_size is not None else (-1, -1)
    pieces = []
    for b, n in enumerate(seqused_k):
        start, end = int(cu_seqlens_q[b]), int(cu_seqlens_q[b + 1])
        assert end - start <= max_seqlen_q and int(n) <= max_seqlen_k
        keys, values = _gather(k, block_table[b], int(n)), _gather(v, block_table[b], int(n))
        pieces.append(_attend_one(q[start:end], keys, values, scale, causal, window, softcap))
    return torch.cat(pieces).to(q.dtype)


def fake_module(name: str, **functions: object) -> types.ModuleType:
    module = types.ModuleType(name)
    for key, value in functions.items():
        setattr(module, key, value)
    return module


FLASH_ATTN = fake_module("flash_attn", flash_attn_with_kvcache=fake_flash_attn_with_kvcache)
VLLM_FLASH_ATTN = fake_module("vllm_flash_attn", flash_attn_varlen_func=fake_flash_attn_varlen_func)


def _top_left_causal(q, k_cache, v_cache, **kwargs):  # type: ignore[no-untyped-def]
    """A library whose causal mask is aligned to the top left (flash-attn < 2.1): wrong for chunks."""
    lengths = kwargs["cache_seqlens"]
    out = fake_flash_attn_with_kvcache(q, k_cache, v_cache, **kwargs)
    for b, n in enumerate(lengths):
        if int(n) > q.shape[1]:  # rows that should see more keys than their index: recompute as i
            kwargs2 = {**kwargs, "cache_seqlens": torch.tensor([q.shape[1]], dtype=torch.int32)}
            kwargs2["block_table"] = kwargs["block_table"][b : b + 1]
            out[b] = fake_flash_attn_with_kvcache(q[b : b + 1], k_cache, v_cache, **kwargs2)[0]
    return out


def _no_kernel_image(*args: object, **kwargs: object) -> torch.Tensor:
    raise RuntimeError("CUDA error: no kernel image is available for execution on the device")


@pytest.fixture
def with_library(monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    """Installs fake modules by name (None: not importable) for one test."""

    def install(**modules: types.ModuleType | None) -> None:
        for name in ("flash_attn", "vllm_flash_attn", "vllm.vllm_flash_attn", "vllm"):
            monkeypatch.setitem(sys.modules, name, modules.get(name.replace(".", "__")))

    return install


# ---- the layout conversion: the backend equals the torch reference --------------------------------

# (query tokens, cached tokens after the step): a one-token prompt, decodes, a chunk past a block
# boundary, a whole prompt, a long decode over several blocks.
MIXED = ((1, 1), (1, 37), (6, 40), (9, 9), (1, 300))


def _case(block_size: int, seqs: tuple[tuple[int, int], ...], dtype: torch.dtype, seed: int):  # type: ignore[no-untyped-def]
    g = torch.Generator().manual_seed(seed)
    heads, kv_heads, dim = 4, 2, 16
    per_seq = [-(-s // block_size) for _, s in seqs]
    order = torch.randperm(sum(per_seq) + 2, generator=g).tolist()  # shuffled, two unused blocks
    tables, start = [], 0
    for n in per_seq:
        tables.append(order[start : start + n])
        start += n
    meta = AttentionMetadata.build([q for q, _ in seqs], [s for _, s in seqs], tables, CPU)
    shape = (len(order), block_size, kv_heads, dim)
    k_cache, v_cache = (torch.randn(shape, generator=g).to(dtype) for _ in range(2))
    query = torch.randn(sum(q for q, _ in seqs), heads, dim, generator=g).to(dtype)
    return query, k_cache, v_cache, meta


@pytest.mark.parametrize(
    ("library", "block_size"), [("flash_attn", 256), ("vllm_flash_attn", 16)], ids=["flash-attn", "vllm"]
)
@pytest.mark.parametrize("dtype", [torch.float16, BF16], ids=["fp16", "bf16"])
@pytest.mark.parametrize(("window", "softcap"), [(None, None), (8, None), (None, 5.0)])
def test_the_backend_equals_the_torch_reference(
    with_library, library: str, block_size: int, dtype: torch.dtype, window: int | None, softcap: float | None
) -> None:
    with_library(flash_attn=FLASH_ATTN, vllm_flash_attn=VLLM_FLASH_ATTN if library != "flash_attn" else None)
    found = attention_flash.find_library()
    assert (
        found is not None
        and found.name == {"flash_attn": "flash-attn", "vllm_flash_attn": "vllm-flash-attn"}[library]
    )
    backend = attention_flash.flash_backend(found)
    for seqs in (MIXED, ((1, 5), (1, 270), (1, 17))):  # mixed rows (padded for flash-attn), decode only
        query, k_cache, v_cache, meta = _case(block_size, seqs, dtype, seed=len(seqs))
        got = backend.attend(query, k_cache, v_cache, meta, 0.25, window, softcap)
        want = paged_attention_reference(query, k_cache, v_cache, meta, 0.25, window, softcap)
        assert got.shape == query.shape and got.dtype == dtype
        assert relative_error(got, want) < 1e-2, (seqs, relative_error(got, want))


# ---- choosing it ---------------------------------------------------------------------------------


def test_auto_chooses_an_importable_compatible_library_and_says_why_not_otherwise(
    with_library, caplog: pytest.LogCaptureFixture
) -> None:
    with_library()  # neither importable: as before, Triton where installed, else SDPA
    plain = select_attention_backend(CUDA, "auto", dtype=BF16, block_size=16).name
    assert plain == ("triton" if attention_triton.available() else "sdpa")
    with pytest.raises(ValueError, match="needs flash-attn or vllm-flash-attn"):
        select_attention_backend(CUDA, "flash", dtype=BF16, block_size=16)

    with_library(flash_attn=FLASH_ATTN)
    chosen = select_attention_backend(CUDA, "auto", dtype=BF16, block_size=256)
    assert chosen.name == "flash-attn"
    assert chosen.fallback is None or chosen.fallback.name == "triton"  # the self-check's next try
    assert select_attention_backend(CPU, "auto", dtype=BF16, block_size=256).name == "sdpa"  # CPU: torch
    with caplog.at_level(logging.INFO, logger="loraxpy.kernels.attention"):
        assert select_attention_backend(CUDA, "auto", dtype=BF16, block_size=16).name == plain
        assert select_attention_backend(CUDA, "auto", dtype=torch.float32, block_size=256).name == plain
    assert "flash-attn is installed but not used" in caplog.text
    assert "--block-size 256" in caplog.text and "float16 and bfloat16 only" in caplog.text
    with pytest.raises(ValueError, match="multiple of 256 tokens"):
        select_attention_backend(CUDA, "flash", dtype=BF16, block_size=16)
    with pytest.raises(ValueError, match="flash attention kernels read only"):
        select_attention_backend(CUDA, "flash", "fp8", dtype=BF16, block_size=256)

    with_library(flash_attn=FLASH_ATTN, vllm_flash_attn=VLLM_FLASH_ATTN)  # vLLM's takes 16-token blocks
    assert select_attention_backend(CUDA, "auto", dtype=BF16, block_size=16).name == "vllm-flash-attn"
    # Decode graphs capture the Triton kernels only: with graphs asked for, auto keeps Triton.
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="loraxpy.kernels.attention"):
        with_graphs = select_attention_backend(CUDA, "auto", dtype=BF16, block_size=16, graphs=True).name
    assert with_graphs == plain if attention_triton.available() else with_graphs == "vllm-flash-attn"
    assert ("capture the Triton attention only" in caplog.text) == attention_triton.available()


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> ModelConfig:
    from transformers import LlamaConfig

    folder = tmp_path_factory.mktemp("llama")
    LlamaConfig(
        vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2,
    ).save_pretrained(folder)  # fmt: skip
    return ModelConfig.from_folder(Path(folder))


GOOD_TRITON = AttentionBackend("triton", paged_attention_reference, store_kv)  # a correct next try


@pytest.mark.parametrize(
    ("function", "why"),
    [(_top_left_causal, "relative error"), (_no_kernel_image, "no kernel image")],
    ids=["mismatch", "launch-error"],
)
def test_a_failing_library_is_dropped_for_triton_then_sdpa_with_a_warning(
    config: ModelConfig, function: object, why: str, caplog: pytest.LogCaptureFixture
) -> None:
    library = attention_flash.FlashLibrary(
        "flash-attn",
        fake_module("flash_attn", flash_attn_with_kvcache=function),
        "flash_attn_with_kvcache",
        256,
    )
    for fallback, kept in ((GOOD_TRITON, "triton"), (None, "sdpa")):
        backend = attention_flash.flash_backend(library, fallback)
        model = CausalLM(config, shard=Shard(), attention=backend, dtype=BF16, device=CPU)
        check = SelfCheck(is_enabled=True)  # as on CUDA
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            check.check_kernels(model, None, block_size=256)
        assert all(layer.self_attn.attention.name == kept for layer in model.layers)
        assert why in check.failures["attention"]
        assert "the flash-attn attention path failed against its twin (" in caplog.text and why in caplog.text
        assert f"using {kept} instead" in caplog.text


def test_a_correct_library_passes_the_self_check_and_info_and_the_metric_name_it(
    with_library, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """A runner asked for `flash` serves through it after warmup's check, with SDPA's token."""
    from prometheus_client import generate_latest
    from transformers import LlamaConfig, LlamaForCausalLM

    from loraxpy.router.metrics import Metrics

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-llama-flash")
    LlamaForCausalLM(
        LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2)
    ).save_pretrained(path)  # fmt: skip
    with_library(flash_attn=FLASH_ATTN)
    tokens = {}
    for backend in ("flash", "sdpa"):
        options = RunnerOptions(
            dtype=BF16, device=CPU, max_loras=0, block_size=256, attention_backend=backend
        )
        runner = ModelRunner(path, options)
        runner.self_check.is_enabled = True  # as on CUDA
        runner.warmup(max_prefill_tokens=64, max_num_seqs=2, num_blocks=2)
        assert runner.self_check.failures == {}
        info = WorkerServicer(runner, None).Info(pb.InfoRequest(), None)  # type: ignore[arg-type]
        name = "flash-attn" if backend == "flash" else "sdpa"
        assert info.attention_backend == name == attention_of(runner.model).name
        assert info.kernel_paths["attention"] == name
        metrics = Metrics()
        metrics.set_kernel_paths(dict(info.kernel_paths))
        assert (
            f'lorax_kernel_path{{implementation="{name}",path="attention"}} 1.0'
            in generate_latest(metrics.registry).decode()
        )
        new = NewRequestData(1, (5, 9, 2, 33, 7, 11, 40), 7, SamplingParams(), 0, (1,), 7)
        first = runner.step(StepInput(new_requests=(new,)))[0].token
        second = runner.step(StepInput(cached_requests=(CachedRequestData(1, (), 1),)))[
            0
        ].token  # a decode step over the cached prompt
        tokens[backend] = (first, second)
    assert tokens["flash"] == tokens["sdpa"]
