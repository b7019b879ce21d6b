"""How a decoder's hidden states pool into an embedding: sentence-transformers' config read from
the model folder (last token or mean, Normalize or not), last token normalised without one, and
pooling modes this server does not serve refused by name."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from loraxpy.worker.pooling import Pooling

POOLING = "sentence_transformers.models.Pooling"
NORMALIZE = "sentence_transformers.models.Normalize"


def folder(tmp_path: Path, flags: dict[str, bool] | None, normalize: bool) -> Path:
    modules = [{"idx": 0, "path": "", "type": "sentence_transformers.models.Transformer"}]
    if flags is not None:
        modules.append({"idx": 1, "path": "1_Pooling", "type": POOLING})
        (tmp_path / "1_Pooling").mkdir()
        (tmp_path / "1_Pooling" / "config.json").write_text(
            json.dumps({"word_embedding_dimension": 4, **flags})
        )
    if normalize:
        modules.append({"idx": 2, "path": "2_Normalize", "type": NORMALIZE})
    (tmp_path / "modules.json").write_text(json.dumps(modules))
    return tmp_path


def test_without_a_sentence_transformers_config_the_last_token_is_pooled_and_normalised(
    tmp_path: Path,
) -> None:
    pooling = Pooling.from_folder(tmp_path)
    hidden = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    assert pooling == Pooling("last", normalize=True)
    torch.testing.assert_close(pooling.pool(hidden), torch.tensor([0.6, 0.8]))


@pytest.mark.parametrize(
    ("flags", "normalize", "expected"),
    [
        ({"pooling_mode_mean_tokens": True, "pooling_mode_cls_token": False}, True, Pooling("mean", True)),
        ({"pooling_mode_lasttoken": True}, False, Pooling("last", False)),
        ({"pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False}, True, Pooling("cls", True)),
        (None, False, Pooling("last", False)),
    ],
)
def test_the_config_chooses_the_mode_and_normalisation(
    tmp_path: Path, flags: dict[str, bool] | None, normalize: bool, expected: Pooling
) -> None:
    assert Pooling.from_folder(folder(tmp_path, flags, normalize)) == expected


def test_mean_pooling_averages_every_token(tmp_path: Path) -> None:
    hidden = torch.tensor([[1.0, 2.0], [3.0, 6.0]])
    torch.testing.assert_close(Pooling("mean", normalize=False).pool(hidden), torch.tensor([2.0, 4.0]))


@pytest.mark.parametrize(
    "flags",
    [{"pooling_mode_max_tokens": True}, {"pooling_mode_mean_tokens": True, "pooling_mode_cls_token": True}],
)
def test_a_pooling_this_server_does_not_serve_is_refused(tmp_path: Path, flags: dict[str, bool]) -> None:
    with pytest.raises(ValueError, match="not served"):
        Pooling.from_folder(folder(tmp_path, flags, normalize=True))


@pytest.mark.parametrize(("num_computed", "num_scheduled"), [(0, 4), (4, 6)])
def test_the_worker_refuses_an_embedding_that_would_not_compute_its_whole_prompt_in_one_step(
    num_computed: int, num_scheduled: int
) -> None:
    from loraxpy.worker.batch import Limits, NewRequestData, StepInput, WorkerInputError, validate_step
    from loraxpy.worker.sampling import SamplingParams

    def step(num_computed: int, num_scheduled: int) -> StepInput:
        request = NewRequestData(
            id=1,
            token_ids=tuple(range(1, 11)),
            num_prompt_tokens=10,
            params=SamplingParams(),
            adapter_index=0,
            block_table=(0, 1, 2),
            num_scheduled_tokens=num_scheduled,
            num_computed_tokens=num_computed,
            is_embedding=True,
        )
        return StepInput(new_requests=(request,))

    limits = Limits(vocab_size=32, num_blocks=8, block_size=4, max_model_len=64, max_step_tokens=64)
    validate_step(step(0, 10), {}, limits)
    with pytest.raises(WorkerInputError, match="whole prompt in one step"):
        validate_step(step(num_computed, num_scheduled), {}, limits)


def test_cls_pooling_takes_the_first_token_and_encoders_default_to_it_unnormalised(tmp_path: Path) -> None:
    hidden = torch.tensor([[3.0, 4.0], [1.0, 0.0]])
    torch.testing.assert_close(Pooling("cls", normalize=True).pool(hidden), torch.tensor([0.6, 0.8]))
    encoder_default = Pooling("cls", normalize=False)
    assert Pooling.from_folder(tmp_path, default=encoder_default) == encoder_default  # no modules.json
    assert Pooling.from_folder(folder(tmp_path, None, True), default=encoder_default) == Pooling("cls", True)
