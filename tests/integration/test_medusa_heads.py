"""Medusa heads shipped with an adapter, on the worker (the ModelRunner in process, tiny Llama, fp32):

- every guess the heads propose equals a plain-torch computation of the heads (the Medusa / LoRAX
  formula) over the hidden state PEFT's model gives at the position the sampled token came from,
  for heads with their own vocabulary projection (v1) and heads through the LoRA-adapted LM head (v2);
- sent back as draft tokens every step, as the router does, the greedy tokens stay PEFT's (HF's for
  the base row) in one batch of two Medusa adapters, the same LoRA without heads, and the base;
- rows without heads get no guesses; a malformed heads file is refused naming the problem.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from test_worker_lora import make_adapters, peft_greedy

from loraxpy.worker.adapters import AdapterError
from loraxpy.worker.batch import CachedRequestData, NewRequestData, StepInput
from loraxpy.worker.runner import ModelRunner, RunnerOptions
from loraxpy.worker.sampling import SamplingParams

NEW_TOKENS = 12
NUM_PROPOSED = 3
# name → (the LoRA it copies, Medusa heads, layers per head, own vocabulary projection)
MEDUSA = {"qv-r4-medusa": ("qv-r4", 3, 1, True), "head-r4-medusa": ("head-r4", 2, 2, False)}
ROWS = {
    None: [5, 17, 3, 99, 41, 8],
    "qv-r4": [7, 60, 2, 33],
    "qv-r4-medusa": [7, 60, 2, 33, 150],
    "head-r4-medusa": [9, 11, 40, 2, 77],
}


def write_heads(
    folder: Path, model: Path, num_heads: int, num_layers: int, own_out: bool, seed: int
) -> dict[str, torch.Tensor]:
    """Random heads in the Medusa / LoRAX files: config.json and medusa_lm_head.safetensors."""
    from safetensors.torch import save_file

    config = json.loads((model / "config.json").read_text())
    h, vocab = config["hidden_size"], config["vocab_size"]
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for i in range(num_heads):
        for j in range(num_layers):
            tensors[f"{i}.{j}.linear.weight"] = torch.randn(h, h, generator=g) * 0.3
            tensors[f"{i}.{j}.linear.bias"] = torch.randn(h, generator=g) * 0.1
        if own_out:
            tensors[f"{i}.{num_layers}.weight"] = torch.randn(vocab, h, generator=g) * 0.2
    save_file(tensors, str(folder / "medusa_lm_head.safetensors"))
    (folder / "config.json").write_text(
        json.dumps({"medusa_num_heads": num_heads, "medusa_num_layers": num_layers, "version": 2})
    )
    return tensors


@pytest.fixture(scope="module")
def medusa(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[ModelRunner, Path, dict]:
    root = tmp_path_factory.mktemp("medusa-adapters")
    make_adapters(tiny_llama, root)
    heads = {}
    for k, (name, (lora, num_heads, num_layers, own_out)) in enumerate(MEDUSA.items()):
        shutil.copytree(root / lora, root / name)
        heads[name] = write_heads(root / name, tiny_llama, num_heads, num_layers, own_out, seed=7 + k)
    options = RunnerOptions(dtype=torch.float32, device=torch.device("cpu"), max_loras=5, adapter_root=root)
    r = ModelRunner(tiny_llama, options)
    r.warmup(max_prefill_tokens=2048, max_num_seqs=64, num_blocks=200)
    for index, name in enumerate(ROWS, start=0):
        if name is not None:
            r.load_adapter(index, name, "local")
    return r, root, heads


def reference_guesses(
    tiny_llama: Path, root: Path, name: str, tensors: dict[str, torch.Tensor], tokens: list[int]
) -> list[tuple[int, ...]]:
    """The heads in plain torch over PEFT's last hidden states: row p guesses what follows tokens[p + 1]
    (the token sampled from position p)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    _, num_heads, num_layers, own_out = MEDUSA[name]
    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32), root / name
    )
    with torch.no_grad():
        out = model(torch.tensor([tokens]), output_hidden_states=True)
        hidden = out.hidden_states[-1][0]  # after the final norm: the LM head's input
        lm_head = model.base_model.model.lm_head  # with the adapter's LoRA on it, where it has one
        assert torch.allclose(lm_head(hidden), out.logits[0], atol=1e-5)
        guesses = []
        for i in range(num_heads):
            y = hidden
            for j in range(num_layers):
                y = y + F.silu(y @ tensors[f"{i}.{j}.linear.weight"].T + tensors[f"{i}.{j}.linear.bias"])
            logits = y @ tensors[f"{i}.{num_layers}.weight"].T if own_out else lm_head(y)
            guesses.append(logits.argmax(-1))
    return [tuple(row) for row in torch.stack(guesses, dim=1).tolist()]


def test_medusa_guesses_are_the_heads_and_greedy_tokens_stay_pefts(
    medusa: tuple[ModelRunner, Path, dict], tiny_llama: Path
) -> None:
    r, root, heads = medusa
    names = list(ROWS)
    new = tuple(
        NewRequestData(
            id=i + 1,
            token_ids=tuple(ROWS[name]),
            num_prompt_tokens=len(ROWS[name]),
            params=SamplingParams(repetition_penalty=1.0),
            adapter_index=i,
            block_table=tuple(range(i * 4, i * 4 + 4)),
            num_scheduled_tokens=len(ROWS[name]),
        )
        for i, name in enumerate(names)
    )
    got: dict[int, list[int]] = {i + 1: [] for i in range(len(names))}
    proposed: dict[int, list[tuple[int, tuple[int, ...]]]] = {i + 1: [] for i in range(len(names))}
    outputs = r.step(StepInput(new_requests=new, num_proposed_tokens=NUM_PROPOSED))
    num_sent = num_accepted = 0
    while True:
        cached = []
        for out in outputs:
            got[out.id] += [t for t, _ in out.accepted_draft_tokens] + [out.token[0]]
            num_accepted += len(out.accepted_draft_tokens)
            proposed[out.id].append((len(got[out.id]), out.proposed_draft_tokens))
            left = NEW_TOKENS - len(got[out.id])
            if left > 0:
                draft = out.proposed_draft_tokens[: left - 1]
                num_sent += len(draft)
                cached.append(CachedRequestData(out.id, (), 1 + len(draft), draft_token_ids=draft))
        if not cached:
            break
        outputs = r.step(StepInput(cached_requests=tuple(cached), num_proposed_tokens=NUM_PROPOSED))
    r.step(StepInput(finished_ids=tuple(got)))

    for i, name in enumerate(names):
        rid = i + 1
        lora = MEDUSA[name][0] if name in MEDUSA else name
        expected = peft_greedy(tiny_llama, root, lora, ROWS[name], NEW_TOKENS)
        assert got[rid][:NEW_TOKENS] == expected, f"row {name}: the guesses changed the greedy tokens"
        if name not in MEDUSA:
            assert all(p == () for _, p in proposed[rid]), f"row {name} has no heads, so no guesses"
            continue
        tokens = ROWS[name] + got[rid]
        reference = reference_guesses(tiny_llama, root, name, heads[name], tokens)
        num_heads = MEDUSA[name][1]
        for num_generated, guess in proposed[rid]:
            sampled_at = len(ROWS[name]) + num_generated - 2  # the position its last token came from
            assert guess == reference[sampled_at][: min(NUM_PROPOSED, num_heads)], (name, num_generated)
    assert num_sent > 20, "the heads' guesses were sent back and verified"
    print(f"Medusa guesses sent {num_sent}, accepted {num_accepted}")


def test_malformed_medusa_heads_are_refused(medusa: tuple[ModelRunner, Path, dict]) -> None:
    r, root, _ = medusa

    def variant(name: str, config: dict, keep_weights: bool = True) -> str:
        folder = root / name
        shutil.copytree(root / "qv-r4-medusa", folder)
        (folder / "config.json").write_text(json.dumps(config))
        if not keep_weights:
            (folder / "medusa_lm_head.safetensors").unlink()
        return name

    with pytest.raises(AdapterError, match="does not hold 4 heads"):
        r.read_adapter(variant("four-heads", {"medusa_num_heads": 4, "medusa_num_layers": 1}), "local")
    with pytest.raises(AdapterError, match="medusa_num_heads must be an integer"):
        r.read_adapter(variant("not-a-number", {"medusa_num_heads": "three"}), "local")
    with pytest.raises(AdapterError, match="need both"):
        r.read_adapter(variant("no-weights", {"medusa_num_heads": 3}, keep_weights=False), "local")
    plain = variant("other-config", {"architectures": ["LlamaForCausalLM"]}, keep_weights=False)
    assert r.read_adapter(plain, "local").medusa is None  # someone else's config.json: no heads
