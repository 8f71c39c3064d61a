"""The distributed causal LM: embeddings and LM head run locally, every transformer block on the swarm.

It is a transformers ``PreTrainedModel`` with ``GenerationMixin``, so ``generate()`` (greedy, sampling,
beam search) works as usual; inside ``inference_session()`` each generation step is one step of a
server-side session, whose attention caches live on the servers.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from transformers import GenerationConfig, GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.utils import ModelOutput

from jupyter_swarm.client.batching import remote_blocks_chunked
from jupyter_swarm.client.inference import InferenceSession
from jupyter_swarm.client.remote_blocks import RemoteBlocks
from jupyter_swarm.client.session_cache import SessionCache
from jupyter_swarm.client.speculation import SpeculationStats, cap_candidates
from jupyter_swarm.client.swarm import SwarmClient
from jupyter_swarm.client.tuning import PromptTuning, make_prompt_tuning
from jupyter_swarm.client.verification import DEFAULT_PROBABILITY as DEFAULT_VERIFY, parse_probability
from jupyter_swarm.dht.naming import model_prefix as default_model_prefix
from jupyter_swarm.errors import ConfigurationError
from jupyter_swarm.models import ClientHead, load_model_config
from jupyter_swarm.models.hub import HubOptions, resolve_dtype
from jupyter_swarm.p2p.identity import load_or_create_identity
from jupyter_swarm.p2p.swarm_key import SwarmKey
from jupyter_swarm.wire.protocols import MAX_BATCH_TOKENS
from jupyter_swarm.wire.tensors import Compression, parse_compression

logger = logging.getLogger(__name__)

DEFAULT_MAX_LENGTH = 2048


class DistributedModelForCausalLM(PreTrainedModel, GenerationMixin):
    """A causal LM whose blocks are served by a swarm. Build it with :meth:`from_pretrained`."""

    config_class = PretrainedConfig
    main_input_name = "input_ids"
    base_model_prefix = "head"
    _supports_cache_class = True

    def __init__(self, config: PretrainedConfig, head: ClientHead, swarm: SwarmClient,
                 compression: Compression = Compression.NONE, tuning: PromptTuning | None = None):
        super().__init__(config)
        self.head = head
        self.tuning = tuning
        self.swarm = swarm
        self.remote_blocks = RemoteBlocks(swarm, compression)
        self.max_chunk_tokens = MAX_BATCH_TOKENS  # larger batches go as concurrent chunks of rows (client/batching.py)
        self.active_session: InferenceSession | None = None
        self._pending_beam_idx: torch.Tensor | None = None
        self.speculation: SpeculationStats | None = None  # of the last speculative generate() call

    @classmethod
    def from_pretrained(cls, model: str, *args: Any, initial_peers: Sequence[str] = (),
                        dtype: torch.dtype | str | None = None, torch_dtype: torch.dtype | str | None = None,
                        model_prefix: str | None = None, dht_prefix: str | None = None, compression: str = "none",
                        wait_for_coverage: float = 10.0, request_timeout: float = 180.0,
                        tuning_mode: str | None = None, pre_seq_len: int = 0, active_adapter: str | None = None,
                        allowed_servers: Sequence[str] | None = None, blocked_servers: Sequence[str] = (),
                        allowed_quant_types: Sequence[str] | None = None,
                        swarm_key: str | SwarmKey | None = None, identity: str | None = None,
                        verify: float | bool = DEFAULT_VERIFY, revision: str | None = None, token: str | bool | None = None, cache_dir: str | None = None,
                        local_files_only: bool = False, **kwargs: Any) -> "DistributedModelForCausalLM":
        """Load the local parts of ``model`` (a directory or hub id) and connect to the swarm serving its blocks.

        As in transformers: ``dtype`` (or its older name ``torch_dtype``) is a torch dtype, its name, or "auto"
        (the checkpoint's, also the default); ``revision``, ``token``, ``cache_dir`` and ``local_files_only`` say
        which copy of a hub id to read. As in Petals: ``dht_prefix`` is another name for ``model_prefix``, the
        model's name in the swarm (default: derived from ``model``).
        ``tuning_mode="ptune"`` or ``"deep_ptune"`` adds ``pre_seq_len`` trainable prompts (see
        :mod:`jupyter_swarm.client.tuning`); they are the model's only parameters with ``requires_grad``.
        ``active_adapter``: the name of a LoRA adapter servers host (``serve --adapters``) to run the blocks with;
        see :meth:`use_adapter`.
        ``allowed_servers`` / ``blocked_servers``: peer ids this client may only use / must never use.
        ``allowed_quant_types``: use only servers whose blocks are stored this way, e.g. ``["none", "int8"]``
        (``"none"``, ``"int8"``, ``"nf4"``, ``"fp4"``; each server announces its own); None: any.
        ``swarm_key``: the key file (``jupyter-swarm keygen``) of a private swarm; default: the file named by
        ``$JUPYTER_SWARM_KEY``, else an open swarm. ``identity``: an Ed25519 key file (created if missing) that
        keeps this client's peer id stable, e.g. for servers that accept only listed peer ids (``--allow-peers``).
        ``verify``: the probability that an inference step of a span is re-run on a second server and compared
        (default 0.01; True: every step); a server found wrong is banned for this client's life and reported
        (see :mod:`jupyter_swarm.client.verification`; settable later as :attr:`verify`).
        """
        extra = cls._extra_arguments(kwargs)
        if args or kwargs:
            raise ConfigurationError(f"unexpected arguments {list(kwargs) or args}; "
                                     "supported: initial_peers, dtype, torch_dtype, model_prefix, dht_prefix, "
                                     "compression, wait_for_coverage, request_timeout, tuning_mode, pre_seq_len, "
                                     "allowed_servers, blocked_servers, allowed_quant_types, active_adapter, "
                                     "swarm_key, identity, verify, revision, token, cache_dir, local_files_only"
                                     + "".join(f", {name}" for name in extra))
        if model_prefix is not None and dht_prefix is not None and model_prefix != dht_prefix:
            raise ConfigurationError(f"model_prefix={model_prefix!r} and dht_prefix={dht_prefix!r} disagree: "
                                     "they are two names for the same thing; give one of them")
        hub = HubOptions(revision=revision, token=token, cache_dir=cache_dir, local_files_only=local_files_only)
        config = load_model_config(model, hub)
        head = ClientHead.load(model, dtype=resolve_dtype(dtype, torch_dtype), hub=hub)
        tuning = make_prompt_tuning(tuning_mode, pre_seq_len, head)
        comp = parse_compression(compression)
        swarm = SwarmClient(model_prefix or dht_prefix or default_model_prefix(model), head.num_blocks,
                            list(initial_peers), wait_for_coverage=wait_for_coverage, request_timeout=request_timeout,
                            allowed_servers=allowed_servers, blocked_servers=blocked_servers,
                            allowed_quant_types=allowed_quant_types, swarm_key=swarm_key,
                            identity=load_or_create_identity(identity) if identity else None,
                            verify=parse_probability(verify))
        try:
            instance = cls(config, head, swarm, comp, tuning, **extra)
            instance.use_adapter(active_adapter)
        except BaseException:
            swarm.close()
            raise
        instance.generation_config = _generation_config(model, config, hub)
        instance.eval()
        return instance

    @classmethod
    def _extra_arguments(cls, kwargs: dict[str, Any]) -> dict[str, Any]:
        """Pop the from_pretrained() arguments a subclass adds (passed on to its ``__init__``)."""
        return {}

    def use_adapter(self, name: str | None) -> None:
        """Run the blocks with the servers' LoRA adapter ``name`` from the next request (or session) on.

        Routing then uses only servers that host it (announced in their records); None: the plain blocks.
        """
        if name is not None and (not isinstance(name, str) or not name):
            raise ConfigurationError(f"active_adapter must be an adapter name or None, got {name!r}")
        self.swarm.active_adapter = name

    @property
    def compression(self) -> Compression:
        """How hidden states, prompts and gradients travel to and from servers: ``none``, ``float16``,
        ``bfloat16`` or ``blockwise8`` (8-bit; see :mod:`jupyter_swarm.wire.tensors`). Settable; inference
        sessions take it as their default."""
        return self.remote_blocks.compression

    @compression.setter
    def compression(self, value: Compression | str) -> None:
        self.remote_blocks.compression = parse_compression(value)

    @property
    def verify(self) -> float:
        """The probability that an inference step of a span is re-run on a second server and compared (see
        :mod:`jupyter_swarm.client.verification`). Settable: a number in [0, 1], True (every step) or False."""
        return self.swarm.verifier.probability

    @verify.setter
    def verify(self, value: float | bool) -> None:
        self.swarm.verifier.probability = parse_probability(value)

    # ---- sessions ------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def inference_session(self, max_length: int = DEFAULT_MAX_LENGTH,
                          compression: Compression | str | None = None) -> Iterator[InferenceSession]:
        """A server-side session that several ``generate()`` calls (or manual steps) share.

        ``compression``: of this session's hidden states on the wire (default: :attr:`compression`).
        """
        if self.active_session is not None:
            raise ConfigurationError("an inference session is already open on this model; close it first")
        if self.tuning is not None:
            max_length += self.tuning.pre_seq_len  # the prompts take the session's first positions
        compression = self.compression if compression is None else parse_compression(compression)
        session = InferenceSession(self.swarm, max_length=max_length, compression=compression)
        self.active_session = session
        try:
            yield session
        finally:
            self.active_session = None
            self._pending_beam_idx = None
            session.close()

    @contextlib.contextmanager
    def use_session(self, session: InferenceSession) -> Iterator[InferenceSession]:
        """Make ``session`` (opened earlier with :meth:`inference_session`) this model's session for a while."""
        if session.closed:
            raise ConfigurationError("this inference session is closed; open a new one with model.inference_session()")
        if self.active_session is not None and self.active_session is not session:
            raise ConfigurationError("another inference session is active on this model; use that one, or close it")
        previous, self.active_session = self.active_session, session
        try:
            yield session
        finally:
            self.active_session = previous
            self._pending_beam_idx = None

    def generate(self, inputs: torch.Tensor | None = None, *args: Any, session: InferenceSession | None = None,
                 **kwargs: Any) -> Any:
        """transformers' ``generate()`` through the swarm, with sessions that work as in Petals.

        Without a session, one is opened for this call. Inside ``inference_session()`` (or with ``session=``),
        each call continues where the previous one stopped: ``inputs`` are the tokens that follow (``None``:
        just generate more), transformers sees the whole session's tokens (for ``max_length``, logits
        processors and stopping criteria), the servers get only the tokens they have not seen, and the result
        holds ``inputs`` plus the new tokens (as ``.sequences`` with ``return_dict_in_generate=True``).
        """
        if inputs is None:
            inputs = kwargs.pop("input_ids", None)
        if session is not None:
            context: Any = self.use_session(session)
        elif self.active_session is not None:
            context = contextlib.nullcontext(self.active_session)
        else:
            context = self.inference_session(max_length=self._session_length(inputs, kwargs))
        with context as active:
            return self._generate_in_session(active, inputs, *args, **kwargs)

    def _session_length(self, inputs: torch.Tensor | None, kwargs: dict[str, Any]) -> int:
        config = kwargs.get("generation_config") or self.generation_config
        max_new = kwargs.get("max_new_tokens") or config.max_new_tokens
        prompt_length = inputs.shape[1] if inputs is not None else 1
        return prompt_length + max_new if max_new else (kwargs.get("max_length") or config.max_length)

    def _generate_in_session(self, session: InferenceSession, inputs: torch.Tensor | None, *args: Any,
                             **kwargs: Any) -> Any:
        previous = session.output_ids
        seen = 0 if previous is None else previous.shape[1]
        if previous is not None:
            if kwargs.get("num_beams", self.generation_config.num_beams or 1) > 1:
                raise ConfigurationError("beam search cannot continue an inference session: run it in a new "
                                         "session (or outside one)")
            if inputs is not None and inputs.shape[0] != previous.shape[0]:
                raise ConfigurationError(f"this session holds {previous.shape[0]} sequence(s); got inputs for "
                                         f"{inputs.shape[0]}")
            inputs = previous if inputs is None else torch.cat([previous, inputs.to(previous.device)], dim=1)
            mask = kwargs.get("attention_mask")
            if mask is not None and mask.shape[1] != inputs.shape[1]:  # a mask for the new tokens only
                kwargs["attention_mask"] = torch.cat([torch.ones_like(previous), mask], dim=1)
        self.speculation = None
        result = super().generate(inputs, *args, **kwargs)
        sequences = result.sequences if isinstance(result, ModelOutput) else result
        session.output_ids = sequences
        if seen:  # hand back what this call added, as Petals does
            if isinstance(result, ModelOutput):
                result.sequences = sequences[:, seen:]
            else:
                result = sequences[:, seen:]
        return result

    def prepare_inputs_for_generation(self, input_ids: torch.Tensor, next_sequence_length: int | None = None,
                                      **kwargs: Any) -> dict[str, Any]:
        """transformers' own, except that the first step of a call in a session sends only the tokens the
        servers have not seen yet (the session's earlier tokens are in their attention caches)."""
        session = self.active_session
        if session is not None and kwargs.get("is_first_iteration"):  # the prefill step of a generate() call
            held = session.position - (self.tuning.pre_seq_len if self.tuning is not None and session.position else 0)
            if held >= input_ids.shape[1]:
                raise ConfigurationError(f"the session's servers already hold {held} tokens but generate() got "
                                         f"{input_ids.shape[1]}: steps taken outside generate() cannot be continued")
            if held:
                next_sequence_length = input_ids.shape[1] - held
        return super().prepare_inputs_for_generation(input_ids, next_sequence_length=next_sequence_length, **kwargs)

    def _prepare_cache_for_generation(self, generation_config: GenerationConfig, model_kwargs: dict[str, Any],
                                      *args: Any, **kwargs: Any) -> None:
        """generate()'s cache is the session's, on the servers: a :class:`SessionCache` that can step back, as
        assisted generation (``assistant_model=``, ``prompt_lookup_num_tokens=``) needs."""
        session = self.active_session
        if model_kwargs.get("cache") is None and generation_config.use_cache is not False and session is not None:
            offset = self.tuning.pre_seq_len if self.tuning is not None else 0
            model_kwargs["cache"] = SessionCache(session, offset)
            return None
        return super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)

    def _get_candidate_generator(self, generation_config: GenerationConfig, *args: Any, **kwargs: Any) -> Any:
        """transformers' candidate generator for assisted generation, kept within ``max_length`` (the session's
        size) and counted in :attr:`speculation`."""
        generator = super()._get_candidate_generator(generation_config, *args, **kwargs)
        self.speculation = SpeculationStats()
        return self.speculation.watch(cap_candidates(generator, generation_config.max_length))

    def _reorder_cache(self, cache: Any, beam_idx: torch.Tensor) -> Any:
        """Beam search reorders hypotheses: the servers reorder their caches at the next step."""
        self._pending_beam_idx = beam_idx
        return cache

    # ---- forward ---------------------------------------------------------------------------------------
    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                inputs_embeds: torch.Tensor | None = None, labels: torch.LongTensor | None = None,
                cache: Any = None, **kwargs: Any) -> CausalLMOutputWithPast:
        """Logits for ``input_ids``; inside a session only the new tokens are sent to the servers."""
        if attention_mask is not None and not bool(attention_mask.bool().all()):
            raise ConfigurationError("padded batches are not supported yet: give every row the same length "
                                     "(or generate rows one at a time)")
        hidden = self.blocks_output(input_ids, inputs_embeds)
        logits = self.head.logits(hidden)
        loss = None
        if labels is not None:
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=cache)

    def blocks_output(self, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None) -> torch.Tensor:
        """The last block's output for the real tokens (trainable prompts are added and dropped here).

        ``inputs_embeds`` are token embeddings, as in transformers (BLOOM's embedding LayerNorm is applied here).
        Inside a session the prompts go with the session's first step only, when its cache is empty.
        """
        session = self.active_session
        tuning = self.tuning if session is None or session.position == 0 else None
        if tuning is not None:
            hidden = tuning.input_hidden(self.head, input_ids, inputs_embeds)
            prompts = tuning.block_prompts(hidden.dtype)
        else:
            hidden = self.head.embed(input_ids) if inputs_embeds is None else self._norm_embeds(inputs_embeds)
            prompts = None
        if session is not None:
            beam_idx, self._pending_beam_idx = self._pending_beam_idx, None
            hidden = session.step(hidden, beam_idx=beam_idx, prompts=prompts)
        else:
            hidden = remote_blocks_chunked(self.remote_blocks, hidden, prompts, max_tokens=self.max_chunk_tokens)
        return hidden if tuning is None else hidden[:, tuning.pre_seq_len:]

    def _norm_embeds(self, inputs_embeds: torch.Tensor) -> torch.Tensor:
        norm = self.head.embeddings_norm
        return inputs_embeds if norm is None else norm(inputs_embeds)

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.head.get_input_embeddings() if hasattr(self.head, "get_input_embeddings") else None

    def close(self) -> None:
        """Leave the swarm (closes the libp2p host)."""
        self.swarm.close()


def _generation_config(model: str, config: PretrainedConfig, hub: HubOptions) -> GenerationConfig:
    try:
        return GenerationConfig.from_pretrained(model, **hub.kwargs())
    except (OSError, ValueError):
        return GenerationConfig.from_model_config(config)


class AutoDistributedModelForCausalLM:
    """Petals-style entry point: ``AutoDistributedModelForCausalLM.from_pretrained(path, initial_peers=[...])``."""

    @staticmethod
    def from_pretrained(model: str, **kwargs: Any) -> DistributedModelForCausalLM:
        return DistributedModelForCausalLM.from_pretrained(model, **kwargs)
