"""examples/worker_client.py, run as a user would, drives a real lorax-worker: PEFT's greedy tokens."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import torch
from worker_driver import worker_process

from loraxpy.proto.auth import new_secret

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "worker_client.py"
PROMPT = [5, 17, 42, 9, 100, 3, 77, 21, 8, 64, 11, 2, 90, 33, 6, 250, 19]  # crosses a 16-token block


def _write_adapter(base: Path, folder: Path) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(7)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(model, config).save_pretrained(folder)


def _peft_greedy(base: Path, adapter: Path | None, n: int) -> list[int]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    out = model.generate(torch.tensor([PROMPT]), max_new_tokens=n, do_sample=False)
    return out[0, len(PROMPT) :].tolist()


def test_example_client_matches_peft_over_tcp_with_the_secret(tiny_llama: Path, tmp_path: Path) -> None:
    adapter_root = tmp_path / "adapters"
    _write_adapter(tiny_llama, adapter_root / "my-finetune")
    adapter = _peft_greedy(tiny_llama, adapter_root / "my-finetune", 20)
    base = _peft_greedy(tiny_llama, None, 20)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{probe.getsockname()[1]}"
    secret = new_secret()
    with worker_process(
        tiny_llama,
        tmp_path,
        address=address,
        env={"WORKER_SECRET": secret},
        extra_args=("--adapter-root", str(adapter_root)),
    ):
        run = subprocess.run(
            [sys.executable, str(EXAMPLE), "--address", address, "--prompt-ids", ",".join(map(str, PROMPT)),
             "--adapter-id", "my-finetune", "--max-new-tokens", "20"],
            env={"WORKER_SECRET": secret, "PATH": "/usr/bin:/bin"},
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)
    assert result == {"model_type": "llama", "base": base, "adapter": adapter}
    assert base != adapter, "the adapter changes the output"
