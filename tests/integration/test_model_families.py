"""Each model family beyond Llama serves a batch mixing the base model with two PEFT adapters, with
chunked prefill, on one shard and on two: every request's greedy tokens, their log-probs and its prompt's
log-probs are PEFT's (the base rows HF transformers'), so two shards also equal one.

One test per family starts its one-shard worker and its two shards together (their start-ups overlap),
and compares both with references computed once. Besides the families' own switches (conftest's
TINY_CONFIGS: sliding windows shorter than the prompts, soft-caps, q/k norms, Gemma 3's local RoPE
base, query_pre_attn_scalar, shared experts, dense MoE layers), the prompts (5 to 23 tokens, 8 new) start within and beyond Phi-3's
original context of 16 and cross it while decoding, so LongRoPE's switch to the long table is
checked on both shard counts."""

from __future__ import annotations

import json
import random
from pathlib import Path

import grpc
import pytest
import torch
from conftest import build_tiny_model
from worker_driver import Driver, Request, worker_groups, worker_process

from loraxpy.proto import worker_pb2 as pb
from loraxpy.proto import worker_pb2_grpc

# family → the shard counts its workers run. Mistral's tiny model has one KV head, which does not split
# (test_tensor_parallel's refusal); its sliding window runs over two shards in Qwen2, Gemma and Mixtral.
# Qwen2 and Llama (adapters too) run over two shards in test_tensor_parallel.
SHARDS: dict[str, tuple[int, ...]] = {
    "mistral": (1,),
    "qwen2": (1,),
    "qwen3": (1, 2),
    "gemma2": (1, 2),
    "gemma3_text": (1, 2),
    "phi3": (1, 2),
    "mixtral": (1, 2),
    "qwen2_moe": (1, 2),
    "qwen3_moe": (1, 2),
}

ALL_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ADAPTERS = {"qk-r4": (4, ["q_proj", "k_proj"]), "all-r8": (8, ALL_PROJECTIONS)}
# Fused checkpoints (Phi-3) have fused modules, so PEFT adapters target those names.
FUSED_ADAPTERS = {
    "qk-r4": (4, ["qkv_proj"]),
    "all-r8": (8, ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]),
}
FUSED_PARTS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}

# MoE models: attention; Qwen2-MoE also the MLP of its dense layer 1 (named in full: PEFT maps bare
# MLP names onto the experts). Experts, routers and shared experts take no LoRA: refused when loaded.
MOE_ADAPTERS = {"qk-r4": (4, ["q_proj", "k_proj"]), "all-r8": (8, ["q_proj", "k_proj", "v_proj", "o_proj"])}
QWEN2_MOE_ADAPTERS = {
    "qk-r4": MOE_ADAPTERS["qk-r4"],
    "all-r8": (8, [*MOE_ADAPTERS["all-r8"][1], *(f"layers.1.mlp.{p}" for p in ALL_PROJECTIONS[4:])]),
}
FAMILY_ADAPTERS = {
    "phi3": FUSED_ADAPTERS,
    "mixtral": MOE_ADAPTERS,
    "qwen2_moe": QWEN2_MOE_ADAPTERS,
    "qwen3_moe": MOE_ADAPTERS,
}
INDEX = {"qk-r4": 1, "all-r8": 2, "all-r8-split": 3}
NEW_TOKENS = 8
Reference = tuple[list[int], list[float], list[float]]  # tokens, their log-probs, prompt log-probs


def _write_adapters(base: Path, root: Path, adapters: dict[str, tuple[int, list[str]]]) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    for seed, (name, (r, targets)) in enumerate(adapters.items()):
        torch.manual_seed(500 + seed)
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        config = LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, init_lora_weights=False)
        get_peft_model(model, config).save_pretrained(root / name)


def _split_fused_adapter(base: Path, fused: Path, out: Path) -> None:
    """The same adapter with separate target names (q_proj, k_proj, v_proj, gate_proj, up_proj), as
    adapters of unfused Phi-3 copies name them: each part keeps the fused A, its rows of B and the
    scale, so PEFT's outputs with the fused adapter are the reference for it."""
    from safetensors.torch import load_file, save_file

    hf = json.loads((base / "config.json").read_text())
    head_dim = hf["hidden_size"] // hf["num_attention_heads"]
    sizes = {
        "q_proj": hf["num_attention_heads"] * head_dim,
        "k_proj": hf["num_key_value_heads"] * head_dim,
        "v_proj": hf["num_key_value_heads"] * head_dim,
        "gate_proj": hf["intermediate_size"],
        "up_proj": hf["intermediate_size"],
    }
    tensors: dict[str, torch.Tensor] = {}
    for name, t in load_file(fused / "adapter_model.safetensors").items():
        module = next((m for m in FUSED_PARTS if f".{m}." in name), None)
        if module is None:
            tensors[name] = t
            continue
        parts = FUSED_PARTS[module]
        pieces = t.split([sizes[p] for p in parts]) if ".lora_B." in name else [t] * len(parts)
        for part, piece in zip(parts, pieces, strict=True):
            tensors[name.replace(f".{module}.", f".{part}.")] = piece.clone()
    assert tensors.keys() != load_file(fused / "adapter_model.safetensors").keys()
    out.mkdir()
    save_file(tensors, out / "adapter_model.safetensors")
    config = json.loads((fused / "adapter_config.json").read_text())
    targets = config["target_modules"]
    config["target_modules"] = sorted({p for t in targets for p in FUSED_PARTS.get(t, (t,))})
    (out / "adapter_config.json").write_text(json.dumps(config))


def _write_expert_adapter(base: Path, path: Path) -> None:
    """A PEFT adapter on the first layer's experts (transformers 5 stacks them into parameters)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = LoraConfig(r=4, target_modules=[], target_parameters=["layers.0.mlp.experts.gate_up_proj"])
    get_peft_model(model, config).save_pretrained(path)


def _references(base: Path, root: Path, asks: list[tuple[str | None, list[int]]]) -> list[Reference]:
    """PEFT's (HF transformers' without an adapter) greedy tokens, their log-probs and the prompt's."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    models: dict[str | None, torch.nn.Module] = {}
    out = []
    for name, prompt in asks:
        if name not in models:
            model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
            models[name] = PeftModel.from_pretrained(model, root / name) if name else model
        model = models[name]
        ids = torch.tensor([prompt])
        gen = model.generate(
            ids,
            max_new_tokens=NEW_TOKENS,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
        )
        tokens = gen.sequences[0, len(prompt) :].tolist()
        logprobs = [torch.log_softmax(s[0], -1)[t].item() for s, t in zip(gen.logits, tokens, strict=True)]
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0]
        prompt_lp = torch.log_softmax(logits[:-1], -1).gather(1, ids[0, 1:, None]).squeeze(1).tolist()
        out.append((tokens, logprobs, prompt_lp))
    return out


def _load(stubs: list[worker_pb2_grpc.WorkerStub], name: str, index: int) -> None:
    spec = pb.AdapterSpec(adapter_id=name, source="local")
    for f in [s.LoadAdapter.future(pb.LoadAdapterRequest(adapter=spec, adapter_index=index)) for s in stubs]:
        f.result()


@pytest.mark.parametrize("kind", list(SHARDS))
def test_mixed_adapter_batch_matches_peft_on_one_and_two_shards(kind: str, tmp_path: Path) -> None:
    base = build_tiny_model(kind, tmp_path / kind)
    root = tmp_path / "adapters"
    _write_adapters(base, root, FAMILY_ADAPTERS.get(kind, ADAPTERS))
    # Each request's adapter, and which adapter's PEFT outputs it must equal.
    names: list[str | None] = [None, "qk-r4", "all-r8", "qk-r4", None, "all-r8"]
    if kind == "phi3":
        _split_fused_adapter(base, root / "all-r8", root / "all-r8-split")
        names.append("all-r8-split")
    moe = kind in FAMILY_ADAPTERS and kind != "phi3"
    if moe:
        _write_expert_adapter(base, root / "experts")
    rng = random.Random(5)
    prompts = [[rng.randrange(200) for _ in range(5 + 3 * j)] for j in range(len(names))]
    args = ("--adapter-root", str(root), "--max-loras", "3")
    runs: dict[int, list[Request]] = {}
    # One group of workers per shard count, started together.
    with worker_groups(base, tmp_path, SHARDS[kind], extra_args=args) as groups:
        for num_shard, stubs in zip(SHARDS[kind], groups, strict=True):
            assert [s.Info(pb.InfoRequest()).model_type for s in stubs] == [kind] * num_shard
            warmup = pb.WarmupRequest(max_prefill_tokens=64, max_num_seqs=8, num_blocks=32)
            for f in [s.Warmup.future(warmup) for s in stubs]:
                f.result()
            for name in dict.fromkeys(n for n in names if n):
                _load(stubs, name, INDEX[name])
            if moe:
                with pytest.raises(grpc.RpcError) as e:
                    _load(stubs, "experts", 3)
                assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert "model.layers.0.mlp.experts, part of a mixture-of-experts layer" in e.value.details()
            requests = [
                Request(
                    id=j + 1,
                    prompt=prompt,
                    max_new_tokens=NEW_TOKENS,
                    join_step=j // 2,
                    adapter_index=INDEX[name] if name else 0,
                    params=pb.SamplingParams(prompt_logprobs=True),
                )
                for j, (name, prompt) in enumerate(zip(names, prompts, strict=True))
            ]
            Driver(stubs, num_blocks=32, block_size=16, step_token_budget=64, chunk_size=8).run(requests)
            runs[num_shard] = requests
    peft_names = [name.removesuffix("-split") if name else None for name in names]
    references = _references(base, root, [*zip(peft_names, prompts, strict=True), ("all-r8", prompts[0])])
    for num_shard, requests in runs.items():
        for name, r, (tokens, logprobs, prompt_lp) in zip(names, requests, references[:-1], strict=True):
            where = (kind, num_shard, name, len(r.prompt))
            assert r.generated == tokens, where
            assert r.logprobs == pytest.approx(logprobs, abs=1e-4), where
            assert [r.prompt_logprobs[i] for i in range(1, len(r.prompt))] == pytest.approx(
                prompt_lp, abs=1e-4
            )
    if 2 in runs:
        assert [r.generated for r in runs[2]] == [r.generated for r in runs[1]]
    assert references[-1][0] != runs[1][0].generated, "the adapter changes the output"


def test_an_unsupported_model_type_is_refused_at_startup_with_the_supported_list(tmp_path: Path) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    sizes = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, vocab_size=64
    )
    AutoModelForCausalLM.from_config(AutoConfig.for_model("gpt_neox", **sizes)).save_pretrained(
        tmp_path / "neox"
    )
    supported = "llama, mistral, qwen2, qwen3, gemma2, gemma3_text, phi3, mixtral, qwen2_moe, qwen3_moe"
    with (
        pytest.raises(RuntimeError, match=f"model_type 'gpt_neox' is not supported; supported: {supported}"),
        worker_process(tmp_path / "neox", tmp_path),
    ):
        pass
