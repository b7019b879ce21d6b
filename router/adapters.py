"""The adapter registry: a dense index per adapter (base model = 0) and which adapters hold device slots.

A request naming an adapter acquires it before it is queued: if the adapter holds a slot it runs at
once; otherwise the registry loads it into a free slot, or offloads the least recently used
adapter that no request is using. When every slot is in use by in-flight requests, the request
waits its turn (first come, first served) while everyone else keeps decoding. Loads run outside
the registry's lock, so requests for adapters already on the device never wait for a download;
an offload runs between two engine steps (see `Engine.between_steps`). An adapter that fails to
load fails only the requests that asked for it, with the worker's message.

Every adapter a request touches (each part of a merge too) is named by its canonical form (`./x`,
`x/`, `x/.` are `x`), checked against the operator's policy, and — for hub adapters, the only
per-tenant ones — authorized for the request's `api_token` by the workers, at the hub, the first
time that token asks for it: no token owns an adapter id, and a token nobody checked never shares a
slot another token loaded. Not found and not allowed are the same 404.

No adapter starves: once an adapter has held its slot for `cycle_time_s` while requests for other
adapters wait for one, its new requests queue behind them; it drains, yields its slot, and comes
back in turn (LoRAX's --adapter-cycle-time-s).

Memory stays bounded whatever ids clients send: an adapter off the device that no request holds
or waits for leaves the registry, and its index goes to the next new adapter. Reuse is safe
because an index reaches a step only once its new adapter's LoadAdapter succeeded, and a worker's
load under an index replaces whatever that index held.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import functools
import hashlib
import heapq
import itertools
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field

import grpc

from loraxpy.proto.adapter_policy import (
    AdapterIdError,
    AdapterNotAllowedError,
    AdapterPolicy,
    AdapterRef,
    SourceNotAllowedError,
    not_found_message,
)
from loraxpy.router.errors import (
    NotFoundError,
    OverloadedError,
    RouterError,
    UnavailableError,
    ValidationError,
)
from loraxpy.router.worker_client import AdapterMerge, WorkerClient, WorkerError

logger = logging.getLogger(__name__)

# Remembered (hub adapter, token digest) pairs the workers accepted; a forgotten one is checked again.
MAX_GRANTS = 4096
MAX_CHAT_TEMPLATES = 1024  # adapters' own chat templates remembered (LRU); a forgotten one is asked again


class AdapterState(enum.Enum):
    OFFLOADED = "offloaded"
    LOADING = "loading"
    READY = "ready"  # on the device
    OFFLOADING = "offloading"  # still on the device, leaving it


@dataclass
class AdapterEntry:
    adapter_id: str  # canonical
    source: str
    index: int
    state: AdapterState = AdapterState.OFFLOADED
    num_active: int = 0  # requests holding it
    num_pending: int = 0  # requests in `acquire` for it (authorized, waiting for a slot or loading)
    last_used: float = field(default_factory=time.monotonic)
    # A token of a request allowed to use it, for (re)loading after an offload; never logged.
    load_token: str = field(default="", repr=False)
    ref: AdapterRef | None = None  # None for a merge
    merge: AdapterMerge | None = None  # a per-request merge of other adapters (adapter_id is its key)
    loaded_at: float = 0.0  # when it last reached the device (monotonic)


class AdapterRegistry:
    def __init__(
        self,
        client: WorkerClient,
        num_slots: int,
        between_steps: Callable[[], AbstractAsyncContextManager[None]] | None = None,
        cycle_time_s: float | None = None,
        policy: AdapterPolicy | None = None,
        max_concurrent_loads: int | None = None,
    ) -> None:
        self.client = client
        # The workers refuse loads past their cap (--max-concurrent-adapter-loads): the router's own
        # loads queue here instead, so a burst of new adapters waits rather than failing with 429.
        self._loads = asyncio.Semaphore(max_concurrent_loads) if max_concurrent_loads else None
        self.policy = policy or AdapterPolicy()
        self._grants: OrderedDict[tuple[AdapterRef, str], None] = OrderedDict()
        self._checks: dict[tuple[AdapterRef, str], asyncio.Future[int]] = {}
        self._chat_templates: OrderedDict[tuple[AdapterRef, str], str] = OrderedDict()
        self.cycle_time_s = cycle_time_s
        # Workers keep a finished request until a step releases it: offloads wait for that.
        self.between_steps = between_steps
        self.num_slots = num_slots
        self.entries: dict[tuple[str, str], AdapterEntry] = {}
        self._indices = itertools.count(1)
        self._free_indices: list[int] = []  # of adapters that left the registry, smallest first
        self._changed = asyncio.Condition()
        self._queue: list[tuple[int, AdapterEntry]] = []  # (ticket, wanted) waiting, in arrival order
        self._tickets = itertools.count()
        self._background: set[asyncio.Future[None]] = set()
        # Cleared while the workers are healed (router/healing.py): loads and offloads wait for them.
        self.workers_up = asyncio.Event()
        self.workers_up.set()

    def loaded(self) -> list[AdapterEntry]:
        return [e for e in self.entries.values() if e.state is AdapterState.READY]

    def public(self) -> list[AdapterEntry]:
        """Adapters on the device that a request without any token may use (what /v1/models lists)."""
        return [e for e in self.loaded() if e.ref is not None and self._is_public(e.ref)]

    def _is_public(self, ref: AdapterRef) -> bool:
        return ref.source != "hub" or self.policy.is_operators(ref) or (ref, "") in self._grants

    async def acquire(
        self, adapter_id: str, source: str, api_token: str = "", merge: AdapterMerge | None = None
    ) -> int:
        """Returns the adapter's index once it holds a device slot; the caller must `release` it.

        With `merge`, the adapter is that merge of other adapters and `adapter_id` its key.
        """
        refs = [self._ref(part, source) for part in (merge.adapter_ids if merge else (adapter_id,))]
        for ref in refs:
            await self._authorize(ref, api_token)
        if merge is not None:
            merge = dataclasses.replace(merge, adapter_ids=tuple(str(r) for r in refs))
        key = (merge.key if merge else str(refs[0]), source)
        entry = self.entries.get(key)
        if entry is None:
            ref = None if merge else refs[0]
            entry = self.entries[key] = AdapterEntry(key[0], source, self._new_index(), merge=merge, ref=ref)
        entry.load_token = api_token  # authorized above: a (re)load may use it
        entry.last_used = time.monotonic()
        entry.num_pending += 1
        try:
            await self._ensure_loaded(entry)  # on success, this request holds the adapter
        finally:
            entry.num_pending -= 1
            self._forget_if_unused(entry)  # a failed load leaves no trace (nor its token)
        return entry.index

    def prefix_identity(
        self, adapter_id: str, source: str, api_token: str = "", merge: AdapterMerge | None = None
    ) -> str:
        """Whose requests may share K/V cached under this adapter (router/kv_blocks.py): its
        canonical name and source, or a merge's parts, weights and options — never its index — and
        for a hub adapter the server does not serve on its own token, the tenant (token digest)."""
        refs = [self._ref(part, source) for part in (merge.adapter_ids if merge else (adapter_id,))]
        if merge is not None:
            key = dataclasses.replace(merge, adapter_ids=tuple(str(r) for r in refs)).key
        else:
            key = str(refs[0])
        is_private = any(r.source == "hub" and not self.policy.is_operators(r) for r in refs)
        tenant = hashlib.sha256(api_token.encode()).hexdigest() if is_private and api_token else ""
        return f"adapter|{source}|{key}|{tenant}"

    async def chat_template(self, adapter_id: str, source: str, api_token: str = "") -> str | None:
        """The adapter's own chat template (a tokenizer_config.json in its folder), None when it has
        none. The workers fetch the adapter and check the token's access, as for a load, once per
        adapter and tenant; the answer is remembered."""
        ref = self._ref(adapter_id, source)
        is_tenants = ref.source == "hub" and not self.policy.is_operators(ref)
        key = (ref, hashlib.sha256(api_token.encode()).hexdigest() if is_tenants and api_token else "")
        if key in self._chat_templates:
            self._chat_templates.move_to_end(key)
        else:
            try:
                self._chat_templates[key] = await self.client.adapter_chat_template(
                    str(ref), ref.source, api_token
                )
            except WorkerError as e:
                raise _adapter_error(str(ref), e) from None
            while len(self._chat_templates) > MAX_CHAT_TEMPLATES:
                self._chat_templates.popitem(last=False)
        return self._chat_templates[key] or None

    def _new_index(self) -> int:
        return heapq.heappop(self._free_indices) if self._free_indices else next(self._indices)

    def _forget_if_unused(self, entry: AdapterEntry) -> None:
        """Drops an adapter that is off the device and that no request holds or waits for; its
        index is free again. The next adapter given it is loaded under it before any step uses it."""
        if entry.state is not AdapterState.OFFLOADED or entry.num_active or entry.num_pending:
            return
        key = (entry.adapter_id, entry.source)
        if self.entries.get(key) is entry:
            del self.entries[key]
            heapq.heappush(self._free_indices, entry.index)

    def _ref(self, adapter_id: str, source: str) -> AdapterRef:
        try:
            ref = AdapterRef.parse(adapter_id, source)
            self.policy.check(ref)
        except AdapterIdError as e:
            raise ValidationError(str(e), param="adapter_id") from None
        except SourceNotAllowedError as e:
            raise ValidationError(str(e), param="adapter_source") from None
        except AdapterNotAllowedError:
            raise NotFoundError(not_found_message(adapter_id), param="adapter_id") from None
        return ref

    async def _authorize(self, ref: AdapterRef, api_token: str) -> None:
        """A hub adapter is per tenant: the first time a token asks for it, the workers check at the
        hub that the token can read it (DownloadAdapter). Local and s3 adapters are the operator's:
        the policy alone decides (the workers check it again)."""
        if ref.source != "hub" or self.policy.is_operators(ref):
            return
        key = (ref, hashlib.sha256(api_token.encode()).hexdigest() if api_token else "")
        if key in self._grants:
            self._grants.move_to_end(key)
            return
        check = self._checks.get(key)
        if check is None:  # one check per (adapter, token) however many requests wait for it
            check = asyncio.ensure_future(self.client.download_adapter(str(ref), ref.source, api_token))
            self._checks[key] = check
            check.add_done_callback(functools.partial(self._check_done, key))
        try:
            await asyncio.shield(check)
        except WorkerError as e:
            raise _adapter_error(str(ref), e) from None
        self._grants[key] = None
        while len(self._grants) > MAX_GRANTS:
            self._grants.popitem(last=False)

    def _check_done(self, key: tuple[AdapterRef, str], check: asyncio.Future[int]) -> None:
        self._checks.pop(key, None)
        if not check.cancelled():
            check.exception()  # retrieved here, so a check whose requests all left logs no warning

    async def release(self, index: int) -> None:
        async with self._changed:
            entry = next((e for e in self.entries.values() if e.index == index), None)  # one per index
            if entry is not None:
                entry.num_active -= 1
                entry.last_used = time.monotonic()
                self._forget_if_unused(entry)  # e.g. its reload failed after the workers restarted
            self._changed.notify_all()

    async def _ensure_loaded(self, entry: AdapterEntry) -> None:
        """Waits until `entry` is usable and takes a hold on it (num_active), without yielding between."""
        if self._usable(entry):
            entry.num_active += 1
            return
        ticket = (next(self._tickets), entry)
        async with self._changed:
            self._queue.append(ticket)
            try:
                while True:
                    if self._usable(entry):
                        entry.num_active += 1
                        return
                    if entry.state is AdapterState.OFFLOADED and self._next_to_load() is ticket:
                        victim = self._pick_slot()
                        if victim is not False:
                            break
                    await self._changed.wait()
                entry.state = AdapterState.LOADING
                if isinstance(victim, AdapterEntry):
                    victim.state = AdapterState.OFFLOADING
            finally:
                self._queue.remove(ticket)
                self._changed.notify_all()
        # The swap hands its loader a hold as the adapter becomes READY, before anyone can pick it as
        # a victim. A client that leaves mid-load must not leave the worker's slots and ours
        # disagreeing: the swap runs on, and the hold it hands over is dropped.
        swap = asyncio.ensure_future(self._swap(victim if isinstance(victim, AdapterEntry) else None, entry))
        try:
            await asyncio.shield(swap)
        except asyncio.CancelledError:
            swap.add_done_callback(functools.partial(self._drop_abandoned_hold, entry))
            raise

    def _drop_abandoned_hold(self, entry: AdapterEntry, swap: asyncio.Future[None]) -> None:
        if swap.cancelled() or swap.exception() is not None:
            return  # no hold was handed over
        entry.num_active -= 1
        task = asyncio.ensure_future(self._notify())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    def _next_to_load(self) -> tuple[int, AdapterEntry] | None:
        """The longest-waiting request whose adapter needs a slot (first come, first served)."""
        return next((t for t in self._queue if t[1].state is AdapterState.OFFLOADED), None)

    def _usable(self, entry: AdapterEntry) -> bool:
        """On the device and not yielding its slot to adapters that have waited for one."""
        if entry.state is not AdapterState.READY:
            return False
        if self.cycle_time_s is None or time.monotonic() - entry.loaded_at < self.cycle_time_s:
            return True
        return not any(e is not entry and e.state is AdapterState.OFFLOADED for _, e in self._queue)

    def _pick_slot(self) -> AdapterEntry | bool | None:
        """None: a slot is free; an entry: the idle adapter to offload; False: all slots are busy."""
        on_device = [e for e in self.entries.values() if e.state is not AdapterState.OFFLOADED]
        if len(on_device) < self.num_slots:
            return None
        idle = [e for e in on_device if e.state is AdapterState.READY and e.num_active == 0]
        return min(idle, key=lambda e: e.last_used) if idle else False

    async def workers_restarted(self) -> None:
        """The workers came back with empty slots. Adapters that requests hold are loaded again into
        their index; the rest are marked offloaded (loaded again on their next use), so no step runs
        against weights the workers no longer have. A swap in flight finishes on its own."""
        held: list[AdapterEntry] = []
        for e in list(self.entries.values()):
            if e.state is AdapterState.READY and e.num_active > 0:
                e.state = AdapterState.LOADING
                held.append(e)
            elif e.state in (AdapterState.READY, AdapterState.OFFLOADING):
                e.state = AdapterState.OFFLOADED
                self._forget_if_unused(e)
        for e in held:
            try:
                await self.client.load_adapter(e.index, e.adapter_id, e.source, e.load_token, e.merge)
                e.state, e.loaded_at = AdapterState.READY, time.monotonic()
                logger.info("loaded adapter %s (index %d) again", e.adapter_id, e.index)
            except WorkerError as err:  # its requests are refused by the workers (index not loaded)
                e.state = AdapterState.OFFLOADED
                logger.error("loading adapter %s again failed: %s", e.adapter_id, err.details)
        async with self._changed:
            self._changed.notify_all()

    async def _swap(self, victim: AdapterEntry | None, entry: AdapterEntry) -> None:
        await self.workers_up.wait()
        try:
            if victim is not None and victim.state is AdapterState.OFFLOADING:
                try:
                    await self._offload(victim)
                except BaseException:
                    victim.state = AdapterState.READY
                    raise
            async with self._loads or contextlib.nullcontext():
                await self.client.load_adapter(
                    entry.index, entry.adapter_id, entry.source, entry.load_token, entry.merge
                )
            entry.state = AdapterState.READY
            entry.loaded_at = time.monotonic()
            entry.num_active += 1  # the loader's hold
            logger.info("loaded adapter %s (index %d)", entry.adapter_id, entry.index)
        except BaseException as e:
            entry.state = AdapterState.OFFLOADED
            if isinstance(e, WorkerError):
                raise _adapter_error(entry.adapter_id, e) from None
            raise
        finally:
            self._forget_if_unused(entry)  # a load whose requests all left, and that failed
            async with self._changed:
                self._changed.notify_all()

    async def _offload(self, victim: AdapterEntry) -> None:
        if self.between_steps is None:
            await self.client.offload_adapter(victim.index)
        else:
            async with self.between_steps():
                await self.client.offload_adapter(victim.index)
        victim.state = AdapterState.OFFLOADED
        logger.info("offloaded adapter %s (index %d)", victim.adapter_id, victim.index)
        self._forget_if_unused(victim)


def _adapter_error(adapter_id: str, e: WorkerError) -> RouterError:
    if e.code is grpc.StatusCode.NOT_FOUND:  # the workers' one message for missing and not allowed
        return NotFoundError(e.details, param="adapter_id")
    if e.code in (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.DEADLINE_EXCEEDED):
        return OverloadedError(
            f"adapter {adapter_id!r} cannot be loaded now: {e.details}", param="adapter_id"
        )
    if e.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.FAILED_PRECONDITION):  # lost, or restarted
        logger.error("loading adapter %s failed: %s", adapter_id, e.details)
        return UnavailableError(
            f"adapter {adapter_id!r} cannot be loaded now: the workers are being restarted"
        )
    if not e.is_refusal:  # not the worker's message for users but an exception's text: log it only
        logger.error("loading adapter %s failed: %s", adapter_id, e.details)
        message = f"adapter {adapter_id!r} cannot be loaded; the server log has the details"
        return ValidationError(message, param="adapter_id")
    return ValidationError(f"adapter {adapter_id!r} cannot be loaded: {e.details}", param="adapter_id")
