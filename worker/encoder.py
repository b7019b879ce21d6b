"""BERT-family encoders (BERT, DistilBERT, XLM-RoBERTa) served by the worker: embeddings (pooled as
the model's sentence-transformers config says) and classification (a token- or sequence-
classification head's logits), prefill only, with LoRA on the attention and feed-forward linears.

The model is built from the decoder's parallel linears, so the LoRA slots (worker/lora.py) attach
to it unchanged; `EncoderRunner` is the ModelRunner of such a model: the same adapter store and
RPCs, a step that computes each request's whole input and answers with its vector or logits, and
no KV cache (the router still allocates blocks for a step's inputs, which cost nothing here).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from loraxpy.proto.model_task import TOKEN_CLASSIFICATION, ModelTask
from loraxpy.worker.adapters import LoraAdapter
from loraxpy.worker.batch import (
    Limits,
    RequestOutputData,
    RequestState,
    StepInput,
    WorkerInputError,
    validate_step,
)
from loraxpy.worker.encoder_config import BASE_PREFIXES, BERT_EMBEDDINGS, DISTILBERT_EMBEDDINGS, EncoderConfig
from loraxpy.worker.kv_cache import KVCacheSpec
from loraxpy.worker.layers import ColumnParallelLinear, RowParallelLinear, Shard, VocabParallelEmbedding
from loraxpy.worker.lora import LoraManager, num_adapter_slots
from loraxpy.worker.pooling import Pooling
from loraxpy.worker.quantization import weight_bytes
from loraxpy.worker.runner import ModelRunner, RunnerOptions
from loraxpy.worker.self_check import SelfCheck
from loraxpy.worker.weights import WeightsError, iter_checkpoint

logger = logging.getLogger(__name__)

# The encoder layer's LoRA-carrying linears (worker/lora.py's table for decoders has a gate).
ENCODER_ADAPTED = {
    "self_attn.qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "self_attn.o_proj": ("o_proj",),
    "mlp.up_proj": ("up_proj",),
    "mlp.down_proj": ("down_proj",),
}


class Replicated(nn.Module):
    """A parameter every rank holds whole (norms, position tables, classifier heads)."""

    def __init__(self, *shape: int, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(*shape, dtype=dtype, device=device), requires_grad=False)

    def load(self, slice_name: str, param: str, tensor: torch.Tensor) -> None:
        if tensor.shape != self.weight.shape:
            raise WeightsError(
                f"{slice_name}.{param}: shape {tuple(tensor.shape)} != {tuple(self.weight.shape)}"
            )
        self.weight.data.copy_(tensor)


class LayerNorm(nn.Module):
    def __init__(self, size: int, eps: float, *, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size, dtype=dtype, device=device), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(size, dtype=dtype, device=device), requires_grad=False)

    def load(self, slice_name: str, param: str, tensor: torch.Tensor) -> None:
        (self.weight if param == "weight" else self.bias).data.copy_(tensor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, x.shape[-1:], self.weight, self.bias, self.eps)


class Linear(nn.Module):
    """A replicated y = x W^T + b (classifier heads)."""

    def __init__(self, n_in: int, n_out: int, *, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_out, n_in, dtype=dtype, device=device), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(n_out, dtype=dtype, device=device), requires_grad=False)

    def load(self, slice_name: str, param: str, tensor: torch.Tensor) -> None:
        target = self.weight if param == "weight" else self.bias
        if tensor.shape != target.shape:
            raise WeightsError(f"{slice_name}.{param}: shape {tuple(tensor.shape)} != {tuple(target.shape)}")
        target.data.copy_(tensor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


def _activation(name: str, x: torch.Tensor) -> torch.Tensor:
    if name == "relu":
        return F.relu(x)
    return F.gelu(x, approximate="tanh" if name == "gelu_tanh" else "none")


@dataclass
class EncoderBatch:
    """One step's inputs, concatenated; attention runs over each input alone (padded, masked)."""

    input_ids: torch.Tensor  # [num_tokens]
    positions: torch.Tensor  # [num_tokens]
    seq_lens: list[int]
    pad_index: torch.Tensor  # [num_tokens]: each token's row in the padded [num_seqs * max_len]
    key_mask: torch.Tensor  # [num_seqs, 1, 1, max_len]: True for real tokens

    @classmethod
    def build(cls, inputs: list[list[int]], config: EncoderConfig, device: torch.device) -> EncoderBatch:
        max_len = max(len(ids) for ids in inputs)
        positions: list[int] = []
        pad_index: list[int] = []
        for b, ids in enumerate(inputs):
            if config.model_type == "xlm-roberta":  # HF: cumsum of non-pad tokens, after the pad id
                count = 0
                for t in ids:
                    count += t != config.pad_token_id
                    positions.append(count + config.pad_token_id if t != config.pad_token_id else t)
            else:
                positions.extend(range(len(ids)))
            pad_index.extend(range(b * max_len, b * max_len + len(ids)))
        lens = torch.tensor([len(ids) for ids in inputs], device=device)
        key_mask = torch.arange(max_len, device=device)[None, :] < lens[:, None]

        def tensor(values: list[int]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.int64, device=device)

        return cls(
            input_ids=tensor([t for ids in inputs for t in ids]),
            positions=tensor(positions),
            seq_lens=[len(ids) for ids in inputs],
            pad_index=tensor(pad_index),
            key_mask=key_mask[:, None, None, :],
        )


class EncoderAttention(nn.Module):
    def __init__(self, config: EncoderConfig, shard: Shard, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        h = config.hidden_size
        self.head_dim = h // config.num_heads
        self.num_heads = shard.split(config.num_heads, "num_attention_heads")
        kw = {"shard": shard, "dtype": dtype, "device": device}
        self.qkv_proj = ColumnParallelLinear(h, {"q_proj": h, "k_proj": h, "v_proj": h}, bias=True, **kw)  # type: ignore[arg-type]
        self.o_proj = RowParallelLinear(h, h, bias=True, **kw)  # type: ignore[arg-type]

    def forward(self, x: torch.Tensor, batch: EncoderBatch) -> torch.Tensor:
        n, heads, d = x.shape[0], self.num_heads, self.head_dim
        num_seqs, max_len = batch.key_mask.shape[0], batch.key_mask.shape[-1]

        def padded(t: torch.Tensor) -> torch.Tensor:  # [n, heads * d] → [seqs, heads, max_len, d]
            out = t.new_zeros(num_seqs * max_len, heads, d)
            out[batch.pad_index] = t.reshape(n, heads, d)
            return out.view(num_seqs, max_len, heads, d).transpose(1, 2)

        q, k, v = self.qkv_proj(x).chunk(3, dim=-1)
        out = F.scaled_dot_product_attention(padded(q), padded(k), padded(v), attn_mask=batch.key_mask)
        out = out.transpose(1, 2).reshape(num_seqs * max_len, heads * d)[batch.pad_index]
        return self.o_proj(out)


class EncoderMLP(nn.Module):
    def __init__(self, config: EncoderConfig, shard: Shard, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        h, i = config.hidden_size, config.intermediate_size
        self.activation = config.activation
        self.up_proj = ColumnParallelLinear(
            h, {"up_proj": i}, bias=True, shard=shard, dtype=dtype, device=device
        )
        self.down_proj = RowParallelLinear(i, h, bias=True, shard=shard, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(_activation(self.activation, self.up_proj(x)))


class EncoderLayer(nn.Module):
    """Post-norm: h = norm(h + attention(h)); h = norm(h + mlp(h)), as BERT and DistilBERT."""

    def __init__(self, config: EncoderConfig, shard: Shard, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.self_attn = EncoderAttention(config, shard, dtype, device)
        self.attn_norm = LayerNorm(config.hidden_size, config.layer_norm_eps, dtype=dtype, device=device)
        self.mlp = EncoderMLP(config, shard, dtype, device)
        self.mlp_norm = LayerNorm(config.hidden_size, config.layer_norm_eps, dtype=dtype, device=device)

    def forward(self, h: torch.Tensor, batch: EncoderBatch) -> torch.Tensor:
        h = self.attn_norm(h + self.self_attn(h, batch))
        return self.mlp_norm(h + self.mlp(h))


class Embeddings(nn.Module):
    def __init__(self, config: EncoderConfig, shard: Shard, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        h = config.hidden_size
        self.word = VocabParallelEmbedding(config.vocab_size, h, shard=shard, dtype=dtype, device=device)
        self.position = Replicated(config.max_position_embeddings, h, dtype=dtype, device=device)
        self.token_type = (
            Replicated(config.type_vocab_size, h, dtype=dtype, device=device)
            if config.type_vocab_size
            else None
        )
        self.norm = LayerNorm(h, config.layer_norm_eps, dtype=dtype, device=device)

    def forward(self, batch: EncoderBatch) -> torch.Tensor:
        h = self.word(batch.input_ids) + F.embedding(batch.positions, self.position.weight)
        if self.token_type is not None:  # every token is of type 0 (one segment)
            h = h + self.token_type.weight[0]
        return self.norm(h)


class ClassifierHead(nn.Module):
    """The checkpoint's head, as HF's *ForTokenClassification / *ForSequenceClassification."""

    def __init__(self, config: EncoderConfig, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        h, num_labels = config.hidden_size, len(config.task.labels)
        kw = {"dtype": dtype, "device": device}
        self.per_token = config.task.task == TOKEN_CLASSIFICATION
        self.kind = "token" if self.per_token else config.model_type
        # checkpoint module → ours
        self.names: dict[str, str] = {"classifier": "classifier"}
        if self.kind == "bert":  # pooler (dense, tanh) on [CLS], then the classifier
            self.pooler = Linear(h, h, **kw)  # type: ignore[arg-type]
            self.names = {"pooler.dense": "pooler", "classifier": "classifier"}
        elif self.kind == "distilbert":  # pre_classifier, ReLU on [CLS]
            self.pre_classifier = Linear(h, h, **kw)  # type: ignore[arg-type]
            self.names = {"pre_classifier": "pre_classifier", "classifier": "classifier"}
        elif self.kind == "xlm-roberta":  # dense, tanh, out_proj on <s>
            self.dense = Linear(h, h, **kw)  # type: ignore[arg-type]
            self.names = {"classifier.dense": "dense", "classifier.out_proj": "classifier"}
        self.classifier = Linear(h, num_labels, **kw)  # type: ignore[arg-type]

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [tokens, h] of one input → logits [tokens, labels] or [labels]."""
        if self.per_token:
            return self.classifier(hidden)
        first = hidden[0]
        if self.kind == "bert":
            first = torch.tanh(self.pooler(first))
        elif self.kind == "distilbert":
            first = F.relu(self.pre_classifier(first))
        else:
            first = torch.tanh(self.dense(first))
        return self.classifier(first)


class EncoderModel(nn.Module):
    def __init__(
        self, config: EncoderConfig, *, shard: Shard, dtype: torch.dtype, device: torch.device
    ) -> None:
        super().__init__()
        self.config = config
        self.embeddings = Embeddings(config, shard, dtype, device)
        self.layers = nn.ModuleList(
            EncoderLayer(config, shard, dtype, device) for _ in range(config.num_layers)
        )
        self.head = ClassifierHead(config, dtype, device) if config.task.classifies else None

    @torch.inference_mode()
    def forward(self, batch: EncoderBatch) -> torch.Tensor:
        """The last layer's hidden states [num_tokens, hidden]."""
        h = self.embeddings(batch)
        for layer in self.layers:
            h = layer(h, batch)
        return h


def load_encoder_weights(model: EncoderModel, model_path: Path) -> None:
    """Copies each checkpoint tensor into its module; refuses a checkpoint that misses one."""
    config = model.config
    targets: dict[str, tuple[nn.Module, str]] = {}  # checkpoint module → (our module, slice)
    embeddings = DISTILBERT_EMBEDDINGS if config.distil else BERT_EMBEDDINGS
    for hf, ours in embeddings.items():
        targets[hf] = (model.get_submodule(ours), hf.rpartition(".")[2])
    for i, layer in enumerate(model.layers):
        for hf, (ours, slice_name) in config.layer_names.items():
            targets[f"{config.layer_prefix}.{i}.{hf}"] = (layer.get_submodule(ours), slice_name)
    if model.head is not None:
        for hf, ours in model.head.names.items():
            targets[hf] = (model.head.get_submodule(ours), ours)
    expected = {
        (module_name, param)
        for module_name, (module, _) in targets.items()
        for param in ("weight", "bias")
        if getattr(module, param, None) is not None
    }
    loaded: set[tuple[str, str]] = set()
    for name, tensor in iter_checkpoint(model_path):
        # A checkpoint with a head keeps the base model under a prefix (bert., roberta., distilbert.).
        name = next((name[len(p) :] for p in BASE_PREFIXES if name.startswith(p)), name)
        module_name, _, param = name.rpartition(".")
        param = {"gamma": "weight", "beta": "bias"}.get(param, param)  # old BERT checkpoints
        if module_name not in targets or param not in ("weight", "bias"):
            continue  # a head this server does not serve (masked LM, next sentence), position_ids
        module, slice_name = targets[module_name]
        module.load(slice_name, param, tensor)  # type: ignore[operator]
        loaded.add((module_name, param))
    missing = sorted(f"{m}.{p}" for m, p in expected - loaded)
    if missing:
        raise WeightsError(
            f"the checkpoint has no {', '.join(missing[:5])}{' …' if len(missing) > 5 else ''}"
        )


class EncoderRunner(ModelRunner):
    """The worker's runner for an encoder: embeddings and classification only, in one step each."""

    def __init__(self, model_path: Path, options: RunnerOptions) -> None:
        self.options = options
        self.model_path = model_path
        self.encoder_config = EncoderConfig.from_folder(model_path)
        self.config = self.encoder_config.model_config()
        self.task = self.encoder_config.task
        # Without a sentence-transformers config: the [CLS] state as it is (LoRAX's BERT embeddings).
        self.pooling = Pooling.from_folder(model_path, default=Pooling("cls", normalize=False))
        if options.quantize:
            raise ValueError(f"--quantize is not served for {self.config.model_type} encoders")
        started = time.perf_counter()
        self.model = EncoderModel(
            self.encoder_config, shard=options.shard, dtype=options.dtype, device=options.device
        )
        load_encoder_weights(self.model, model_path)
        self.weight_bytes = weight_bytes(self.model)
        self.quantization = ""
        self.attention_backend = "sdpa"
        self.cpu_ops = ""  # the decoder's fused CPU ops (ModelRunner) do not apply
        # No K/V are kept: a cache of no layers, in the model's dtype (Info reports it).
        head_dim = self.config.head_dim
        self.kv_spec = KVCacheSpec(0, options.block_size, self.config.num_kv_heads, head_dim, options.dtype)
        self.kv_blocks_freed = 0
        logger.info(
            "encoder %s (%s, %s, %s on %s) loaded in %.1f s, %.1f MiB of weights",
            model_path, self.config.model_type, self.task.task, options.dtype, options.device,
            time.perf_counter() - started, self.weight_bytes / 2**20,
        )  # fmt: skip
        o = options
        self.num_adapter_slots = num_adapter_slots(
            self.config, o.shard, o.max_loras, o.max_lora_rank, o.dtype, o.device, o.adapter_memory_fraction
        )
        # The torch LoRA path (the Triton one is checked at warmup against decoders' layers only).
        self.lora = None
        if self.num_adapter_slots > 0:
            self.lora = LoraManager.attach(
                self.model, self.config, o.shard, self.num_adapter_slots, o.max_lora_rank,
                backend="torch", adapted=ENCODER_ADAPTED,
            )  # fmt: skip
        self.adapters = self._adapter_store()
        self.kv_caches: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.limits: Limits | None = None
        self.requests: dict[int, RequestState] = {}
        self.graphs = None
        self.self_check = SelfCheck.for_device(options.device)

    @property
    def can_reuse_prefixes(self) -> bool:
        return False  # every token's state depends on the whole input

    def warmup(self, max_prefill_tokens: int, max_num_seqs: int, num_blocks: int = 0) -> int:
        """Runs the largest step once; reports as many blocks as the router may hand out (none are
        allocated: no K/V are kept)."""
        if max_prefill_tokens < 1 or max_num_seqs < 1:
            raise WorkerInputError("warmup needs max_prefill_tokens >= 1 and max_num_seqs >= 1")
        self.requests.clear()
        max_len = self.encoder_config.max_tokens
        num_seqs = min(max_num_seqs, max_prefill_tokens)
        lens = [min(max_len, max_prefill_tokens // num_seqs)] * num_seqs
        if self.lora is not None:
            self.lora.set_batch([], self.options.device)
        self.model(EncoderBatch.build([[0] * n for n in lens], self.encoder_config, self.options.device))
        block_size = self.options.block_size
        num_blocks = num_blocks or max_num_seqs * -(-max_len // block_size) + -(
            -max_prefill_tokens // block_size
        )
        self.limits = Limits(
            vocab_size=self.config.vocab_size,
            num_blocks=num_blocks,
            block_size=block_size,
            max_model_len=max_len,
            max_step_tokens=max_prefill_tokens,
            can_reuse_prefixes=False,
        )
        return num_blocks

    def step(self, step: StepInput) -> list[RequestOutputData]:
        if self.limits is None:
            raise RuntimeError("Warmup must run before the first Step")
        loaded = self.lora.index_to_slot.keys() if self.lora else ()
        validate_step(step, self.requests, self.limits, loaded)
        for new in step.new_requests:
            if not new.is_embedding or new.num_computed_tokens:
                raise WorkerInputError(
                    f"request {new.id}: {self.config.model_type} is an encoder: it computes embeddings "
                    "and classifications (is_embedding, the whole input in one step), never tokens"
                )
        if step.cached_requests:
            raise WorkerInputError("an encoder keeps no request between steps (cached_requests)")
        for rid in step.finished_ids:
            del self.requests[rid]
        if not step.new_requests:
            return []
        inputs = [list(new.token_ids) for new in step.new_requests]
        for new in step.new_requests:
            self.requests[new.id] = RequestState(
                new.id, list(new.token_ids), len(new.token_ids), new.params, new.adapter_index,
                list(new.block_table), None, num_computed_tokens=len(new.token_ids), is_embedding=True,
            )  # fmt: skip
        if self.lora is not None:
            token_adapters = [new.adapter_index for new in step.new_requests for _ in new.token_ids]
            self.lora.set_batch(token_adapters, self.options.device)
        hidden = self.model(EncoderBatch.build(inputs, self.encoder_config, self.options.device))
        outputs = []
        for new, rows in zip(step.new_requests, hidden.split([len(ids) for ids in inputs]), strict=True):
            outputs.append(
                RequestOutputData(
                    id=new.id, num_computed_tokens=len(new.token_ids), embedding=self._answer(rows)
                )
            )
        return outputs

    @torch.inference_mode()
    def _answer(self, hidden: torch.Tensor) -> tuple[float, ...]:
        """An input's vector (embeddings) or logits (classifiers; a token classifier's flattened
        [tokens × labels], row by row) from its hidden states."""
        if self.model.head is None:
            return tuple(self.pooling.pool(hidden).tolist())
        return tuple(self.model.head(hidden).float().flatten().tolist())

    def _check_base_layers(self, adapter: LoraAdapter) -> LoraAdapter:
        if adapter.base_layers:
            raise WorkerInputError(
                f"adapter saves {', '.join(adapter.base_layers)} weights an encoder does not have"
            )
        return adapter


def is_encoder_folder(model_path: Path) -> bool:
    return not ModelTask.from_folder(model_path).generates
