"""GGUF served as it is: the default model's Q4_1 blocks stay blocks in the worker and give the tokens
of transformers' own GGUF loading (which dequantizes with the gguf package), with PEFT adapters."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, quants
from worker_driver import Driver, Request, worker_process

from loraxpy.proto import worker_pb2 as pb
from loraxpy.worker.gguf_weights import dequantize
from loraxpy.worker.model_source import default_gguf_path

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q4_1", "Q5_0"])
def test_gguf_blocks_dequantize_as_the_gguf_package_does(qtype: str) -> None:
    """Q8_0 / Q4_0 / Q4_1 run in torch, Q5_0 (like every other type) through the gguf package."""
    kind = GGMLQuantizationType[qtype]
    w = np.random.default_rng(0).standard_normal((12, 256)).astype(np.float32)
    raw = quants.quantize(w, kind)
    ours = dequantize(int(kind), torch.from_numpy(raw), 256).numpy()
    assert np.array_equal(ours, quants.dequantize(raw, kind))
    assert not np.array_equal(ours, w)


def test_default_gguf_served_in_its_blocks_matches_transformers_gguf_loading_with_adapters(
    default_model_path: Path, tmp_path: Path
) -> None:
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(7)
    hf = AutoModelForCausalLM.from_pretrained(default_model_path, dtype=torch.float32)
    config = LoraConfig(
        r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False
    )
    get_peft_model(hf, config).save_pretrained(tmp_path / "adapters" / "lora")
    args = ("--adapter-root", str(tmp_path / "adapters"), "--kv-cache-memory-mib", "64")
    prompt = [1, 9690, 198, 2683, 314, 260, 3575, 282, 4649, 47, 2, 198, 1, 520, 9531, 198]
    with worker_process(default_gguf_path(), tmp_path, extra_args=args) as stub:
        stub.Warmup(pb.WarmupRequest(max_prefill_tokens=64, max_num_seqs=4, num_blocks=16))
        stub.LoadAdapter(
            pb.LoadAdapterRequest(adapter=pb.AdapterSpec(adapter_id="lora", source="local"), adapter_index=1)
        )
        batch = [Request(id=i + 1, prompt=prompt, max_new_tokens=4, adapter_index=i) for i in range(2)]
        Driver(stub, num_blocks=16, block_size=16, step_token_budget=64).run(batch)
        info = stub.Info(pb.InfoRequest())
    assert info.quantize == "gguf"
    assert (
        info.weight_bytes < (default_model_path / "model.safetensors").stat().st_size
    )  # the fp32 checkpoint
    log = (tmp_path / "worker.log").read_text()
    assert "linear tensors kept in their GGUF blocks: {'Q4_1': 210}" in log
    base = AutoModelForCausalLM.from_pretrained(default_model_path, dtype=torch.float32)
    expected = base.generate(torch.tensor([prompt]), max_new_tokens=4, do_sample=False)[0, len(prompt) :]
    assert batch[0].generated == expected.tolist()
    adapted = PeftModel.from_pretrained(base, tmp_path / "adapters" / "lora")
    expected = adapted.generate(torch.tensor([prompt]), max_new_tokens=4, do_sample=False)[0, len(prompt) :]
    assert batch[1].generated == expected.tolist()
    assert batch[0].generated != batch[1].generated


def test_each_shard_takes_its_rows_or_whole_block_columns_of_a_gguf_linear() -> None:
    from loraxpy.worker.gguf_weights import GgufLinear, _my_blocks
    from loraxpy.worker.layers import ColumnParallelLinear, RowParallelLinear, Shard

    kind = GGMLQuantizationType.Q4_1
    w = np.random.default_rng(1).standard_normal((96, 192)).astype(np.float32)
    raw = torch.from_numpy(quants.quantize(w, kind))
    full = torch.from_numpy(quants.dequantize(raw.numpy(), kind))
    cpu, f32 = torch.device("cpu"), torch.float32
    for rank in range(3):
        shard = Shard(rank, 3)
        column = ColumnParallelLinear(192, {"up_proj": 96}, bias=False, shard=shard, dtype=f32, device=cpu)
        rows = GgufLinear([(int(kind), _my_blocks(column, "up_proj", raw, int(kind)))], 192).dequantize()
        assert torch.equal(rows, full[rank * 32 : (rank + 1) * 32])
        row = RowParallelLinear(192, 96, bias=False, shard=shard, dtype=f32, device=cpu)
        cols = GgufLinear([(int(kind), _my_blocks(row, "down_proj", raw, int(kind)))], 64).dequantize()
        assert torch.equal(cols, full[:, rank * 64 : (rank + 1) * 64])
    row = RowParallelLinear(
        192, 96, bias=False, shard=Shard(0, 2), dtype=f32, device=cpu
    )  # 96 columns: 3 blocks
    assert _my_blocks(row, "down_proj", raw, int(kind)).shape == (96, 3 * 20)
    row = RowParallelLinear(
        192, 96, bias=False, shard=Shard(0, 4), dtype=f32, device=cpu
    )  # 48: not whole blocks
    with pytest.raises(ValueError, match="do not hold whole GGUF blocks of 32"):
        _my_blocks(row, "down_proj", raw, int(kind))
