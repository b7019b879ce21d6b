"""Tiny random BERT-family checkpoints written by HF transformers (BERT, DistilBERT, XLM-RoBERTa;
bare or with a token- or sequence-classification head), a WordPiece tokenizer saved beside them,
and PEFT LoRA adapters trained on nothing (random A and B)."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import torch

FAMILIES = ("bert", "distilbert", "xlm-roberta")
HEADS = {"": "Model", "token": "ForTokenClassification", "sequence": "ForSequenceClassification"}
CLASSES = {"bert": "Bert", "distilbert": "DistilBert", "xlm-roberta": "XLMRoberta"}
# IOB tags, so token classification aggregates into entity groups as HF's pipeline does
NER_LABELS = ("O", "B-PER", "I-PER", "B-LOC", "I-LOC")
WORDS = (
    "paris",
    "london",
    "anna",
    "lives",
    "in",
    "new",
    "york",
    "city",
    "the",
    "big",
    "##s",
    "##er",
    ".",
    ",",
)
VOCAB = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, *(f"w{i}" for i in range(60)))
# Which linears of each family an adapter targets (PEFT's module names): attention and feed-forward
ADAPTER_TARGETS = {
    "bert": ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"],
    "xlm-roberta": ["query", "value", "intermediate.dense"],
    "distilbert": ["q_lin", "k_lin", "v_lin", "out_lin", "lin1", "lin2"],
}


def config(family: str, head: str = "", labels: tuple[str, ...] = (), **extra: Any) -> Any:
    from transformers import AutoConfig

    sizes: dict[str, Any] = (
        {"dim": 32, "hidden_dim": 48, "n_layers": 2, "n_heads": 4}
        if family == "distilbert"
        else {"hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4}
    )
    if head:
        labels = labels or (NER_LABELS if head == "token" else ("negative", "neutral", "positive"))
        sizes["id2label"] = dict(enumerate(labels))
        sizes["label2id"] = {label: i for i, label in enumerate(labels)}
    cfg = AutoConfig.for_model(family, vocab_size=len(VOCAB), max_position_embeddings=80, **sizes, **extra)
    cfg.architectures = [CLASSES[family] + HEADS[head]]
    return cfg


def build(path: Path, family: str, head: str = "", seed: int = 0, labels: tuple[str, ...] = ()) -> Path:
    """A random checkpoint of `family` (with `head`) and its tokenizer in `path`."""
    import transformers
    from transformers import BertTokenizerFast

    torch.manual_seed(seed)
    cls = getattr(transformers, CLASSES[family] + HEADS[head])
    model = cls(config(family, head, labels)).eval()
    with torch.no_grad():  # biases and norms away from their 0 / 1 init, so loading them is proven
        for name, p in model.named_parameters():
            if "LayerNorm" in name or "layer_norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
        if head == "token":  # labels that vary over the tokens (B- splits, I- joins, O left out)
            model.classifier.bias.zero_()
            model.classifier.weight.mul_(3)
    model.save_pretrained(path)
    path.mkdir(parents=True, exist_ok=True)
    vocab = path / "vocab.txt"
    vocab.write_text("\n".join(VOCAB) + "\n")
    BertTokenizerFast(vocab_file=str(vocab), do_lower_case=True).save_pretrained(path)
    return path


def sentence_transformers_pooling(path: Path, mode: str, normalize: bool) -> None:
    """modules.json and 1_Pooling/config.json as sentence-transformers writes them."""
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]
    if normalize:
        modules.append(
            {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}
        )
    (path / "modules.json").write_text(json.dumps(modules))
    (path / "1_Pooling").mkdir(exist_ok=True)
    flags = {f"pooling_mode_{m}": m == mode for m in ("cls_token", "mean_tokens", "max_tokens", "lasttoken")}
    (path / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 32, **flags}))


def adapter(model_path: Path, family: str, out: Path, seed: int, head: str = "") -> Path:
    """A PEFT LoRA adapter with random A and B (rank 4, alpha 8) on the family's linears."""
    import transformers
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = getattr(transformers, CLASSES[family] + HEADS[head]).from_pretrained(model_path)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=ADAPTER_TARGETS[family], init_lora_weights=False)
    get_peft_model(model, lora).save_pretrained(out)
    return out


@functools.lru_cache(maxsize=8)
def _hf_model(model_path: Path, class_name: str, adapter_path: Path | None) -> Any:
    """HF's model of the checkpoint (PEFT-wrapped with an adapter), loaded once per test module."""
    import transformers

    model = getattr(transformers, class_name).from_pretrained(model_path, dtype=torch.float32).eval()
    if adapter_path is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter_path).eval()
    return model


def hf_hidden(
    model_path: Path, family: str, ids: list[int], adapter_path: Path | None = None
) -> torch.Tensor:
    """The last hidden states of HF's base model (PEFT-wrapped with an adapter): [tokens, hidden]."""
    model = _hf_model(model_path, CLASSES[family] + "Model", adapter_path)
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).last_hidden_state[0]


def hf_logits(
    model_path: Path, family: str, head: str, ids: list[int], adapter_path: Path | None = None
) -> torch.Tensor:
    """A classifier's logits from HF's model with its head (PEFT-wrapped with an adapter)."""
    model = _hf_model(model_path, CLASSES[family] + HEADS[head], adapter_path)
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0]
