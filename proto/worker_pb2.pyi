from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class InfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class InfoResponse(_message.Message):
    __slots__ = ("model_id", "model_path", "model_type", "dtype", "device_type", "rank", "world_size", "vocab_size", "max_position_embeddings", "block_size", "num_blocks", "attention_backend", "supports_adapters", "eos_token_ids", "num_adapter_slots", "kernel_paths", "self_check_failures", "can_reuse_prefixes", "quantize", "weight_bytes", "kv_cache_dtype", "kv_blocks_freed")
    class KernelPathsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    class SelfCheckFailuresEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_PATH_FIELD_NUMBER: _ClassVar[int]
    MODEL_TYPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_TYPE_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    WORLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_POSITION_EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    NUM_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    ATTENTION_BACKEND_FIELD_NUMBER: _ClassVar[int]
    SUPPORTS_ADAPTERS_FIELD_NUMBER: _ClassVar[int]
    EOS_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    NUM_ADAPTER_SLOTS_FIELD_NUMBER: _ClassVar[int]
    KERNEL_PATHS_FIELD_NUMBER: _ClassVar[int]
    SELF_CHECK_FAILURES_FIELD_NUMBER: _ClassVar[int]
    CAN_REUSE_PREFIXES_FIELD_NUMBER: _ClassVar[int]
    QUANTIZE_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_BYTES_FIELD_NUMBER: _ClassVar[int]
    KV_CACHE_DTYPE_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCKS_FREED_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    model_path: str
    model_type: str
    dtype: str
    device_type: str
    rank: int
    world_size: int
    vocab_size: int
    max_position_embeddings: int
    block_size: int
    num_blocks: int
    attention_backend: str
    supports_adapters: bool
    eos_token_ids: _containers.RepeatedScalarFieldContainer[int]
    num_adapter_slots: int
    kernel_paths: _containers.ScalarMap[str, str]
    self_check_failures: _containers.ScalarMap[str, str]
    can_reuse_prefixes: bool
    quantize: str
    weight_bytes: int
    kv_cache_dtype: str
    kv_blocks_freed: int
    def __init__(self, model_id: _Optional[str] = ..., model_path: _Optional[str] = ..., model_type: _Optional[str] = ..., dtype: _Optional[str] = ..., device_type: _Optional[str] = ..., rank: _Optional[int] = ..., world_size: _Optional[int] = ..., vocab_size: _Optional[int] = ..., max_position_embeddings: _Optional[int] = ..., block_size: _Optional[int] = ..., num_blocks: _Optional[int] = ..., attention_backend: _Optional[str] = ..., supports_adapters: _Optional[bool] = ..., eos_token_ids: _Optional[_Iterable[int]] = ..., num_adapter_slots: _Optional[int] = ..., kernel_paths: _Optional[_Mapping[str, str]] = ..., self_check_failures: _Optional[_Mapping[str, str]] = ..., can_reuse_prefixes: _Optional[bool] = ..., quantize: _Optional[str] = ..., weight_bytes: _Optional[int] = ..., kv_cache_dtype: _Optional[str] = ..., kv_blocks_freed: _Optional[int] = ...) -> None: ...

class HealthRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class HealthResponse(_message.Message):
    __slots__ = ("ready",)
    READY_FIELD_NUMBER: _ClassVar[int]
    ready: bool
    def __init__(self, ready: _Optional[bool] = ...) -> None: ...

class WarmupRequest(_message.Message):
    __slots__ = ("max_prefill_tokens", "max_num_seqs", "num_blocks")
    MAX_PREFILL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_NUM_SEQS_FIELD_NUMBER: _ClassVar[int]
    NUM_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    max_prefill_tokens: int
    max_num_seqs: int
    num_blocks: int
    def __init__(self, max_prefill_tokens: _Optional[int] = ..., max_num_seqs: _Optional[int] = ..., num_blocks: _Optional[int] = ...) -> None: ...

class WarmupResponse(_message.Message):
    __slots__ = ("num_blocks", "block_size")
    NUM_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    num_blocks: int
    block_size: int
    def __init__(self, num_blocks: _Optional[int] = ..., block_size: _Optional[int] = ...) -> None: ...

class SamplingParams(_message.Message):
    __slots__ = ("do_sample", "temperature", "top_k", "top_p", "typical_p", "repetition_penalty", "frequency_penalty", "presence_penalty", "seed", "top_logprobs", "prompt_logprobs")
    DO_SAMPLE_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    TYPICAL_P_FIELD_NUMBER: _ClassVar[int]
    REPETITION_PENALTY_FIELD_NUMBER: _ClassVar[int]
    FREQUENCY_PENALTY_FIELD_NUMBER: _ClassVar[int]
    PRESENCE_PENALTY_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    TOP_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    do_sample: bool
    temperature: float
    top_k: int
    top_p: float
    typical_p: float
    repetition_penalty: float
    frequency_penalty: float
    presence_penalty: float
    seed: int
    top_logprobs: int
    prompt_logprobs: bool
    def __init__(self, do_sample: _Optional[bool] = ..., temperature: _Optional[float] = ..., top_k: _Optional[int] = ..., top_p: _Optional[float] = ..., typical_p: _Optional[float] = ..., repetition_penalty: _Optional[float] = ..., frequency_penalty: _Optional[float] = ..., presence_penalty: _Optional[float] = ..., seed: _Optional[int] = ..., top_logprobs: _Optional[int] = ..., prompt_logprobs: _Optional[bool] = ...) -> None: ...

class NewRequest(_message.Message):
    __slots__ = ("id", "token_ids", "num_prompt_tokens", "params", "adapter_index", "block_table", "num_scheduled_tokens", "allowed_token_mask", "is_embedding", "num_computed_tokens")
    ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    NUM_PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_INDEX_FIELD_NUMBER: _ClassVar[int]
    BLOCK_TABLE_FIELD_NUMBER: _ClassVar[int]
    NUM_SCHEDULED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    ALLOWED_TOKEN_MASK_FIELD_NUMBER: _ClassVar[int]
    IS_EMBEDDING_FIELD_NUMBER: _ClassVar[int]
    NUM_COMPUTED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    id: int
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    num_prompt_tokens: int
    params: SamplingParams
    adapter_index: int
    block_table: _containers.RepeatedScalarFieldContainer[int]
    num_scheduled_tokens: int
    allowed_token_mask: bytes
    is_embedding: bool
    num_computed_tokens: int
    def __init__(self, id: _Optional[int] = ..., token_ids: _Optional[_Iterable[int]] = ..., num_prompt_tokens: _Optional[int] = ..., params: _Optional[_Union[SamplingParams, _Mapping]] = ..., adapter_index: _Optional[int] = ..., block_table: _Optional[_Iterable[int]] = ..., num_scheduled_tokens: _Optional[int] = ..., allowed_token_mask: _Optional[bytes] = ..., is_embedding: _Optional[bool] = ..., num_computed_tokens: _Optional[int] = ...) -> None: ...

class CachedRequest(_message.Message):
    __slots__ = ("id", "new_block_ids", "num_scheduled_tokens", "allowed_token_mask", "draft_token_ids")
    ID_FIELD_NUMBER: _ClassVar[int]
    NEW_BLOCK_IDS_FIELD_NUMBER: _ClassVar[int]
    NUM_SCHEDULED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    ALLOWED_TOKEN_MASK_FIELD_NUMBER: _ClassVar[int]
    DRAFT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    id: int
    new_block_ids: _containers.RepeatedScalarFieldContainer[int]
    num_scheduled_tokens: int
    allowed_token_mask: bytes
    draft_token_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, id: _Optional[int] = ..., new_block_ids: _Optional[_Iterable[int]] = ..., num_scheduled_tokens: _Optional[int] = ..., allowed_token_mask: _Optional[bytes] = ..., draft_token_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class StepRequest(_message.Message):
    __slots__ = ("finished_ids", "new_requests", "cached_requests", "step_id", "after_step_id", "num_proposed_tokens")
    FINISHED_IDS_FIELD_NUMBER: _ClassVar[int]
    NEW_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    CACHED_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    STEP_ID_FIELD_NUMBER: _ClassVar[int]
    AFTER_STEP_ID_FIELD_NUMBER: _ClassVar[int]
    NUM_PROPOSED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    finished_ids: _containers.RepeatedScalarFieldContainer[int]
    new_requests: _containers.RepeatedCompositeFieldContainer[NewRequest]
    cached_requests: _containers.RepeatedCompositeFieldContainer[CachedRequest]
    step_id: int
    after_step_id: int
    num_proposed_tokens: int
    def __init__(self, finished_ids: _Optional[_Iterable[int]] = ..., new_requests: _Optional[_Iterable[_Union[NewRequest, _Mapping]]] = ..., cached_requests: _Optional[_Iterable[_Union[CachedRequest, _Mapping]]] = ..., step_id: _Optional[int] = ..., after_step_id: _Optional[int] = ..., num_proposed_tokens: _Optional[int] = ...) -> None: ...

class TokenLogprob(_message.Message):
    __slots__ = ("token_id", "logprob")
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    token_id: int
    logprob: float
    def __init__(self, token_id: _Optional[int] = ..., logprob: _Optional[float] = ...) -> None: ...

class RequestOutput(_message.Message):
    __slots__ = ("id", "num_computed_tokens", "token", "top_logprobs", "prompt_logprobs_start", "prompt_logprobs", "embedding", "accepted_draft_tokens", "proposed_draft_tokens")
    ID_FIELD_NUMBER: _ClassVar[int]
    NUM_COMPUTED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    TOP_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_LOGPROBS_START_FIELD_NUMBER: _ClassVar[int]
    PROMPT_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_DRAFT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PROPOSED_DRAFT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    id: int
    num_computed_tokens: int
    token: TokenLogprob
    top_logprobs: _containers.RepeatedCompositeFieldContainer[TokenLogprob]
    prompt_logprobs_start: int
    prompt_logprobs: _containers.RepeatedScalarFieldContainer[float]
    embedding: _containers.RepeatedScalarFieldContainer[float]
    accepted_draft_tokens: _containers.RepeatedCompositeFieldContainer[TokenLogprob]
    proposed_draft_tokens: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, id: _Optional[int] = ..., num_computed_tokens: _Optional[int] = ..., token: _Optional[_Union[TokenLogprob, _Mapping]] = ..., top_logprobs: _Optional[_Iterable[_Union[TokenLogprob, _Mapping]]] = ..., prompt_logprobs_start: _Optional[int] = ..., prompt_logprobs: _Optional[_Iterable[float]] = ..., embedding: _Optional[_Iterable[float]] = ..., accepted_draft_tokens: _Optional[_Iterable[_Union[TokenLogprob, _Mapping]]] = ..., proposed_draft_tokens: _Optional[_Iterable[int]] = ...) -> None: ...

class StepResponse(_message.Message):
    __slots__ = ("outputs", "step_time_us")
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    STEP_TIME_US_FIELD_NUMBER: _ClassVar[int]
    outputs: _containers.RepeatedCompositeFieldContainer[RequestOutput]
    step_time_us: int
    def __init__(self, outputs: _Optional[_Iterable[_Union[RequestOutput, _Mapping]]] = ..., step_time_us: _Optional[int] = ...) -> None: ...

class AdapterSpec(_message.Message):
    __slots__ = ("adapter_id", "source", "api_token", "merge")
    ADAPTER_ID_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    API_TOKEN_FIELD_NUMBER: _ClassVar[int]
    MERGE_FIELD_NUMBER: _ClassVar[int]
    adapter_id: str
    source: str
    api_token: str
    merge: MergeSpec
    def __init__(self, adapter_id: _Optional[str] = ..., source: _Optional[str] = ..., api_token: _Optional[str] = ..., merge: _Optional[_Union[MergeSpec, _Mapping]] = ...) -> None: ...

class MergeSpec(_message.Message):
    __slots__ = ("adapter_ids", "weights", "strategy", "density", "majority_sign_method")
    ADAPTER_IDS_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    STRATEGY_FIELD_NUMBER: _ClassVar[int]
    DENSITY_FIELD_NUMBER: _ClassVar[int]
    MAJORITY_SIGN_METHOD_FIELD_NUMBER: _ClassVar[int]
    adapter_ids: _containers.RepeatedScalarFieldContainer[str]
    weights: _containers.RepeatedScalarFieldContainer[float]
    strategy: str
    density: float
    majority_sign_method: str
    def __init__(self, adapter_ids: _Optional[_Iterable[str]] = ..., weights: _Optional[_Iterable[float]] = ..., strategy: _Optional[str] = ..., density: _Optional[float] = ..., majority_sign_method: _Optional[str] = ...) -> None: ...

class DownloadAdapterRequest(_message.Message):
    __slots__ = ("adapter",)
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    adapter: AdapterSpec
    def __init__(self, adapter: _Optional[_Union[AdapterSpec, _Mapping]] = ...) -> None: ...

class DownloadAdapterResponse(_message.Message):
    __slots__ = ("size_bytes", "chat_template")
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    CHAT_TEMPLATE_FIELD_NUMBER: _ClassVar[int]
    size_bytes: int
    chat_template: str
    def __init__(self, size_bytes: _Optional[int] = ..., chat_template: _Optional[str] = ...) -> None: ...

class LoadAdapterRequest(_message.Message):
    __slots__ = ("adapter", "adapter_index")
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_INDEX_FIELD_NUMBER: _ClassVar[int]
    adapter: AdapterSpec
    adapter_index: int
    def __init__(self, adapter: _Optional[_Union[AdapterSpec, _Mapping]] = ..., adapter_index: _Optional[int] = ...) -> None: ...

class LoadAdapterResponse(_message.Message):
    __slots__ = ("memory_bytes",)
    MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    memory_bytes: int
    def __init__(self, memory_bytes: _Optional[int] = ...) -> None: ...

class OffloadAdapterRequest(_message.Message):
    __slots__ = ("adapter_index",)
    ADAPTER_INDEX_FIELD_NUMBER: _ClassVar[int]
    adapter_index: int
    def __init__(self, adapter_index: _Optional[int] = ...) -> None: ...

class OffloadAdapterResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
