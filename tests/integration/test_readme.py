"""Every example in README.md, run against a real server started once with the README's own flags.

Each fenced block is one case: `sh` blocks run in bash with `curl` failing on any HTTP error,
`python` blocks run in a fresh interpreter, `yaml` blocks must parse. A `lorax-launcher` line in a
runnable block is the server this module starts (its flags, with `/srv/adapters` in a temporary
folder), and `localhost:3000` is that server's address. Blocks marked `<!-- README test: skipped -->`
must be listed in SKIPPED with the reason; their lines that call this project's own commands are
still parsed with the real argument parsers, so a renamed flag fails here too.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import openai
import pytest
import torch
import yaml
from launcher_process import Launcher, launcher
from safetensors.torch import save_file

pytestmark = pytest.mark.slow

README = Path(__file__).resolve().parents[2] / "README.md"
SKIP_MARK = "<!-- README test: skipped -->"
ADAPTER_ROOT = "/srv/adapters"  # the README's adapter folder, a temporary one here

# The first line of each skipped block → why it cannot run here.
SKIPPED = {
    "make run     # installs into ./.venv, converts the default model once, serves it on :3000": (
        "`make run` serves until stopped on the fixed port 3000 and `make test` is this suite itself; "
        "the server this module starts is what `make run` starts"
    ),
    "# host A (ranks 0, 1) and host B (ranks 2, 3), MASTER_ADDR reachable from both": (
        "needs two hosts and four GPUs"
    ),
    "# Single node: lorax-launcher (router + shards) on a CUDA base; with no --model-id it serves the": (
        "needs Docker and a GPU"
    ),
    "kubectl create secret generic loraxpy --from-literal=HF_TOKEN=hf_... --from-literal=API_KEY=...": (
        "needs a Kubernetes cluster (tests/unit/test_deploy.py renders the chart)"
    ),
    "lorax-bench                                   # CUDA: 1b and 8b, bf16, the grid below; CPU: tiny, fp32, in seconds": (
        "a benchmark (minutes); tests/unit/test_bench.py runs it small"
    ),
    "lorax-launcher --adapter-root /srv/adapters --adapter-source local &": (
        "a benchmark: 200 requests of 64 tokens; tests/unit/test_bench_serving.py runs it small"
    ),
    "lorax-launcher --port 3000 --speculative-tokens 4 &": (
        "a benchmark against a server left running; tests/unit/test_bench_serving.py runs --copy-task small"
    ),
    "lorax-bench model -v                          # the full grid: several minutes to tens of minutes on 2 cores": (
        "a benchmark (minutes to tens of minutes); tests/unit/test_bench_model.py runs it small"
    ),
    "lorax-bench soak --duration-s 1200 --num-adapters 100 --max-active-adapters 16 --concurrency 32 \\": (
        "a 20-minute soak; tests/integration/test_soak.py runs it for 6 s on a tiny model"
    ),
}
# Text a block's output must contain (besides running without an error).
EXPECTED = {
    "curl localhost:3000/v1/chat/completions -H 'Content-Type: application/json' \\": ["Paris", "Paris"],
    "from lorax import Client  # pip install lorax-client": ["HuggingFaceTB/SmolLM2-135M-Instruct"],
    "lorax-launcher --adapter-root /srv/adapters --adapter-source local": ["generated_text"],
    # Structured output: the parsed JSON, the pydantic object, a tool call.
    "import json": ["{'city': 'Paris'}"],
    "from openai import OpenAI": ["city='Paris'"],
    "curl -s localhost:3000/v1/chat/completions -H 'Content-Type: application/json' -d '{": [
        '"finish_reason": "tool_calls"'
    ],
}
OWN_COMMANDS = ("lorax-launcher", "lorax-router", "lorax-worker", "lorax-bench")


@dataclass(frozen=True)
class Block:
    line: int  # of the opening fence, 1-based
    lang: str
    code: str
    skipped: bool

    @property
    def first_line(self) -> str:
        return next(line for line in self.code.splitlines() if line.strip())


def readme_blocks(text: str) -> list[Block]:
    blocks, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        opening = re.match(r"^(\s*)```(\w*)\s*$", lines[i])
        if not opening:
            i += 1
            continue
        indent, start = len(opening.group(1)), i
        i += 1
        while not re.match(r"^\s*```\s*$", lines[i]):
            i += 1
        code = "\n".join(line[indent:] for line in lines[start + 1 : i])
        previous = next((lines[j] for j in range(start - 1, -1, -1) if lines[j].strip()), "")
        blocks.append(Block(start + 1, opening.group(2), code, previous.strip() == SKIP_MARK))
        i += 1
    return blocks


BLOCKS = readme_blocks(README.read_text())


def commands(code: str) -> Iterator[list[str]]:
    """This project's commands in a shell block, joined over `\\` lines, without env assignments."""
    for line in code.replace("\\\n", " ").splitlines():
        if not re.match(r"^\s*(?:[A-Z_]+=\S*\s+)*lorax-", line):
            continue
        words = shlex.split(line, comments=True)
        while words and re.match(r"^[A-Z_]+=", words[0]):
            words = words[1:]
        if words and words[0] in OWN_COMMANDS:
            yield [w for w in words if w != "&"]


def launcher_flags() -> list[str]:
    """The flags of the `lorax-launcher` lines in the blocks this module runs."""
    flags: list[str] = []
    for block in BLOCKS:
        if block.lang == "sh" and not block.skipped:
            for words in commands(block.code):
                if words[0] == "lorax-launcher":
                    flags += words[1:]
    return flags


def write_adapter(folder: Path, model: Path) -> None:
    """A random rank-4 PEFT LoRA on q_proj and v_proj of the default model."""
    config = json.loads((model / "config.json").read_text())
    hidden, layers = config["hidden_size"], config["num_hidden_layers"]
    kv = config["num_key_value_heads"] * hidden // config["num_attention_heads"]
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for i in range(layers):
        for target, out in (("q_proj", hidden), ("v_proj", kv)):
            prefix = f"base_model.model.model.layers.{i}.self_attn.{target}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(4, hidden, generator=g) * 0.05
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(out, 4, generator=g) * 0.05
    folder.mkdir(parents=True)
    save_file(tensors, folder / "adapter_model.safetensors")
    peft = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}
    (folder / "adapter_config.json").write_text(json.dumps({**peft, "task_type": "CAUSAL_LM"}))


@pytest.fixture(scope="module")
def server(default_model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Launcher]:
    """What the README's quick start serves (no --model-id: the packaged default model), with the
    flags of its runnable `lorax-launcher` lines. Test-only flags: fewer adapter slots (a faster
    start) and the launcher helper's small KV cache and fp32."""
    root = tmp_path_factory.mktemp("readme-adapters")
    write_adapter(root / "my-finetune", default_model_path)
    flags = [str(root) if f == ADAPTER_ROOT else f for f in launcher_flags()]
    cache = default_model_path.parents[1]  # the folder the default model was converted into
    with launcher(
        None,
        tmp_path_factory.mktemp("readme-launcher"),
        *flags,
        "--max-active-adapters",
        "2",
        env={"LORAX_CACHE": str(cache)},
    ) as s:
        yield s


def run_sh(code: str, server: Launcher) -> str:
    address = server.url.removeprefix("http://")
    code = code.replace("localhost:3000", address).replace("127.0.0.1:3000", address)
    lines = [line for line in code.splitlines() if not line.lstrip().startswith("lorax-launcher ")]
    script = 'set -euo pipefail\ncurl() { command curl --fail-with-body -sS "$@"; echo; }\n' + "\n".join(
        lines
    )
    done = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout}\n{done.stderr}"
    return done.stdout


def run_python(code: str, server: Launcher) -> str:
    code = code.replace("http://127.0.0.1:3000", server.url).replace("http://localhost:3000", server.url)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout}\n{done.stderr}"
    return done.stdout


def parse_own_commands(code: str) -> None:
    """A skipped block's calls of this project's commands must parse with their real parsers."""
    from loraxpy.bench.cli import build_parser, build_serve_parser
    from loraxpy.bench.model_cli import build_model_parser
    from loraxpy.bench.soak_cli import build_soak_parser
    from loraxpy.router.config import parse_args as router_args
    from loraxpy.worker.config import parse_args as worker_args

    for words in commands(code):
        name, argv = words[0], words[1:]
        if name in ("lorax-launcher", "lorax-router"):
            router_args(argv, prog=name)
        elif name == "lorax-worker":
            worker_args(argv)
        elif argv[:1] == ["serve"]:
            build_serve_parser().parse_args(argv[1:])
        elif argv[:1] == ["model"]:
            build_model_parser().parse_args(argv[1:])
        elif argv[:1] == ["soak"]:
            build_soak_parser().parse_args(argv[1:])
        else:
            build_parser().parse_args(argv)


def test_every_skipped_block_is_listed_with_its_reason() -> None:
    skipped = {b.first_line for b in BLOCKS if b.skipped}
    assert skipped == set(SKIPPED), "mark a block skipped in README.md and give the reason in SKIPPED"
    assert set(EXPECTED) <= {b.first_line for b in BLOCKS if not b.skipped}
    assert {b.lang for b in BLOCKS} <= {"sh", "python", "yaml"}, "teach this test the new language"


@pytest.mark.parametrize("block", [b for b in BLOCKS if b.skipped], ids=lambda b: f"line{b.line}")
def test_skipped_blocks_call_this_projects_commands_with_flags_that_exist(
    block: Block, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WORKER_SECRET", "a-secret-standing-in-for-the-file")  # the block exports a file
    monkeypatch.delenv("WORKER_SECRET_FILE", raising=False)
    parse_own_commands(block.code)


@pytest.mark.parametrize(
    "block",
    [
        pytest.param(b, marks=pytest.mark.skip(reason=SKIPPED.get(b.first_line, "unlisted")))
        if b.skipped
        else b
        for b in BLOCKS
    ],
    ids=lambda b: f"line{b.line}-{b.lang}",
)
def test_readme_example_runs(block: Block, request: pytest.FixtureRequest) -> None:
    if block.lang == "yaml":  # a Kubernetes manifest: it must at least be one
        manifest = yaml.safe_load(block.code)
        assert {"apiVersion", "kind", "metadata"} <= set(manifest)
        return
    server = request.getfixturevalue("server")
    output = run_sh(block.code, server) if block.lang == "sh" else run_python(block.code, server)
    for text in EXPECTED.get(block.first_line, []):
        assert text in output, output
        output = output.replace(text, "", 1)  # listed twice: must appear twice


def test_the_base_model_answers_to_its_id_and_a_wrong_model_name_says_which_it_is(server: Launcher) -> None:
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    base = client.models.list().data[0].id
    assert base == "HuggingFaceTB/SmolLM2-135M-Instruct"
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    chat = client.chat.completions.create(model=base, messages=messages, temperature=0, max_tokens=12)
    assert "Paris" in (chat.choices[0].message.content or "")
    with pytest.raises(openai.APIStatusError) as e:  # LoRAX's reading: `base` names an adapter
        client.chat.completions.create(model="base", messages=messages, max_tokens=4)
    assert e.value.status_code in (400, 404) and repr(base) in e.value.message
    assert e.value.body["param"] == "model"  # type: ignore[index]
