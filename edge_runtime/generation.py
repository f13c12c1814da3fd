"""The one generation loop every backend shares: chunked prefill, sampling, decode, stop rules.

numpy only, so the torch reference and every bundle backend (onnxruntime, executorch, coreml) run the
very same host code and parity compares models, not loops. Sampling follows Hugging Face `generate`:
the same processors in the same order (repetition penalty -> temperature -> top-k -> top-p -> softmax
-> draw), so each knob means here what it means in transformers.

Differences from `generate`, on purpose:
- A stop token ends generation but is not part of `token_ids` (HF appends it to the output sequence);
  it is reported as `GenerationResult.stop_token_id` instead, so callers never strip it themselves.
- Draws come from SplitMix64 (edge_runtime/portable_rng.py) seeded by `SamplingConfig.seed`:
  deterministic for a seed, the same on every backend and in every app (docs/conformance.md), but
  not the same stream as torch.multinomial.
- The repetition penalty counts prompt tokens only when `prompt_ids` is given (HF counts them when
  `input_ids` is passed, and only generated tokens when called with `inputs_embeds` alone).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Generator, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from edge_runtime.backends.base import Backend, DecoderState
from edge_runtime.errors import ContextOverflowError, InputError
from edge_runtime.portable_rng import SplitMix64
from edge_runtime.processing.canvas_positions import CanvasLayout

STOP_TOKEN = "stop_token"
MAX_NEW_TOKENS = "max_new_tokens"

TokenCallback = Callable[[int], None]


# ---------------------------------------------------------------------------------------------------
# Sampling


@dataclass(frozen=True)
class SamplingConfig:
    """Decoding knobs with Hugging Face `generate` semantics; the defaults are greedy decoding."""

    max_new_tokens: int = 64
    temperature: float = 0.0  # 0: greedy (argmax); top_k / top_p are then ignored, as in HF
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1.0: off
    repetition_penalty: float = 1.0  # 1.0: off; applied in greedy mode too, as in HF
    seed: int | None = 0  # None: fresh OS entropy (not reproducible)
    stop_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop_ids", tuple(int(i) for i in self.stop_ids))
        problems = _sampling_problems(self)
        if problems:
            raise InputError("bad sampling settings: " + "; ".join(problems))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _sampling_problems(cfg: SamplingConfig) -> list[str]:
    """Every bad value at once, so a user fixes all flags in one go."""
    problems = []
    if not isinstance(cfg.max_new_tokens, int) or cfg.max_new_tokens < 1:
        problems.append(f"max_new_tokens must be an integer >= 1, got {cfg.max_new_tokens!r}")
    if not (math.isfinite(cfg.temperature) and cfg.temperature >= 0):
        problems.append(f"temperature must be >= 0 (0 = greedy), got {cfg.temperature!r}")
    if not isinstance(cfg.top_k, int) or cfg.top_k < 0:
        problems.append(f"top_k must be an integer >= 0 (0 = off), got {cfg.top_k!r}")
    if not (0 < cfg.top_p <= 1):
        problems.append(f"top_p must be in (0, 1] (1 = off), got {cfg.top_p!r}")
    if not (math.isfinite(cfg.repetition_penalty) and cfg.repetition_penalty > 0):
        problems.append(f"repetition_penalty must be > 0 (1 = off), got {cfg.repetition_penalty!r}")
    return problems


def apply_repetition_penalty(logits: np.ndarray, seen_ids: np.ndarray, penalty: float) -> np.ndarray:
    """HF RepetitionPenaltyLogitsProcessor: seen tokens' logits < 0 are multiplied by the penalty, the
    rest divided; each token once however often it was seen; ids outside the vocabulary are ignored."""
    if penalty == 1.0 or len(seen_ids) == 0:
        return logits
    ids = np.unique(np.asarray(seen_ids, dtype=np.int64))
    ids = ids[(ids >= 0) & (ids < logits.shape[-1])]
    out = logits.copy()
    scores = out[ids]
    out[ids] = np.where(scores < 0, scores * penalty, scores / penalty)
    return out


def apply_temperature(logits: np.ndarray, temperature: float) -> np.ndarray:
    """HF TemperatureLogitsWarper (a no-op at 1.0, skipped there like HF does)."""
    return logits if temperature == 1.0 else logits / temperature


def apply_top_k(logits: np.ndarray, top_k: int) -> np.ndarray:
    """HF TopKLogitsWarper: drop every logit below the k-th largest (ties with it survive)."""
    vocab = logits.shape[-1]
    if top_k <= 0 or top_k >= vocab:
        return logits
    kth = np.partition(logits, vocab - top_k)[vocab - top_k]
    return np.where(logits < kth, np.float32(-np.inf), logits)


def apply_top_p(logits: np.ndarray, top_p: float) -> np.ndarray:
    """HF TopPLogitsWarper: sort ascending, drop the tokens whose cumulative probability is <= 1 - top_p,
    always keep the most likely token."""
    if top_p >= 1.0:
        return logits
    order = np.argsort(logits, kind="stable")
    cumulative = np.cumsum(softmax(logits[order]))
    remove_sorted = cumulative <= 1 - top_p
    remove_sorted[-1] = False
    remove = np.empty_like(remove_sorted)
    remove[order] = remove_sorted
    return np.where(remove, np.float32(-np.inf), logits)


def softmax(logits: np.ndarray) -> np.ndarray:
    """float64 softmax that tolerates -inf (filtered) entries."""
    x = np.asarray(logits, dtype=np.float64)
    top = x.max()
    if not np.isfinite(top):
        raise ValueError(f"cannot sample: the largest logit is {top} (non-finite logits from the backend?)")
    e = np.exp(x - top)
    return e / e.sum()


def process_logits(logits: np.ndarray, cfg: SamplingConfig, seen_ids: np.ndarray) -> np.ndarray:
    """The scores one step samples from, in HF's processor order; greedy applies only the penalty."""
    scores = np.asarray(logits, dtype=np.float32)
    scores = apply_repetition_penalty(scores, seen_ids, cfg.repetition_penalty)
    if cfg.greedy:
        return scores
    scores = apply_temperature(scores, cfg.temperature)
    scores = apply_top_k(scores, cfg.top_k)
    return apply_top_p(scores, cfg.top_p)


def draw(probs: np.ndarray, rng: SplitMix64 | np.random.Generator) -> int:
    """One draw by inverse CDF over the non-zero entries: one uniform per token, never a filtered token."""
    candidates = np.flatnonzero(probs > 0)
    cdf = np.cumsum(probs[candidates])
    k = int(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"))
    return int(candidates[min(k, len(candidates) - 1)])


def greedy_token(scores: np.ndarray) -> int:
    """argmax, first index on ties (as torch.argmax); NaN logits are an error, not a token."""
    token = int(np.argmax(scores))
    if np.isnan(scores[token]):
        raise ValueError("cannot pick a token: the backend returned NaN logits")
    return token


class Sampler:
    """Turns each step's logits into a token id, remembering the ids seen for the repetition penalty."""

    def __init__(self, cfg: SamplingConfig, prompt_ids: Sequence[int] | np.ndarray | None = None):
        self.cfg = cfg
        self.rng = SplitMix64(cfg.seed)  # portable: every app draws the same tokens (docs/conformance.md)
        self._seen: set[int] = (
            set() if prompt_ids is None else {int(i) for i in np.asarray(prompt_ids).ravel()}
        )
        self._seen_array = np.fromiter(self._seen, dtype=np.int64, count=len(self._seen))

    @property
    def seen_ids(self) -> np.ndarray:
        return self._seen_array

    def process(self, logits: np.ndarray) -> np.ndarray:
        return process_logits(logits, self.cfg, self._seen_array)

    def __call__(self, logits: np.ndarray) -> int:
        scores = self.process(logits)
        token = greedy_token(scores) if self.cfg.greedy else draw(softmax(scores), self.rng)
        self.observe(token)
        return token

    def observe(self, token: int) -> None:
        """Count a token as seen (sampled ones are counted automatically)."""
        if token not in self._seen:
            self._seen.add(token)
            self._seen_array = np.append(self._seen_array, np.int64(token))


# ---------------------------------------------------------------------------------------------------
# Input embeddings


def build_input_embeddings(
    backend: Backend,
    prompt_ids: Sequence[int] | np.ndarray,
    image_embeds: Sequence[np.ndarray],
    image_token_id: int | None = None,
    video_embeds: Sequence[np.ndarray] | None = None,
    video_token_id: int | None = None,
) -> np.ndarray:
    """Token embeddings of the prompt with the placeholder rows replaced, in order, by the concatenated
    visual features (HF's masked_scatter). Token ids default to the backend's ModelInfo."""
    ids = np.asarray(prompt_ids, dtype=np.int64).reshape(-1)
    embeds = np.array(backend.token_embedding(ids), dtype=np.float32)  # a writable copy
    if embeds.shape != (len(ids), backend.info.hidden_size):
        raise ValueError(
            f"{backend.name}.token_embedding returned shape {embeds.shape}, "
            f"expected ({len(ids)}, {backend.info.hidden_size})"
        )
    image_id = backend.info.image_token_id if image_token_id is None else image_token_id
    video_id = backend.info.video_token_id if video_token_id is None else video_token_id
    _scatter(embeds, ids, image_id, image_embeds, "image")
    _scatter(embeds, ids, video_id, video_embeds or [], "video")
    return embeds


def _scatter(
    embeds: np.ndarray, ids: np.ndarray, token_id: int, features: Sequence[np.ndarray], kind: str
) -> None:
    """Write features into the rows holding token_id; the counts must agree exactly."""
    rows = np.flatnonzero(ids == token_id)
    n_features = sum(int(f.shape[0]) for f in features)
    if len(rows) != n_features:
        raise InputError(
            f"the prompt has {len(rows)} {kind} placeholder tokens (id {token_id}) but the {kind} features "
            f"have {n_features} rows ({len(features)} {kind} slices); processor and model disagree "
            "(downsample mode or slicing?)"
        )
    if n_features == 0:
        return
    stacked = np.concatenate([np.asarray(f, dtype=np.float32) for f in features], axis=0)
    if stacked.ndim != 2 or stacked.shape[1] != embeds.shape[1]:
        raise InputError(f"{kind} features have shape {stacked.shape}, expected (N, {embeds.shape[1]})")
    embeds[rows] = stacked


# ---------------------------------------------------------------------------------------------------
# Prefill, decode, generate


@dataclass
class PrefillStats:
    n_tokens: int
    chunk_size: int
    chunk_ms: list[float]
    total_ms: float

    @property
    def n_chunks(self) -> int:
        return len(self.chunk_ms)


@dataclass
class Timings:
    """Host wall-clock timings (time.perf_counter). TTFT here starts at prefill: the caller adds
    preprocessing and vision. Decode covers the steps after the first token, without consumer time."""

    prefill_ms: float = 0.0
    first_sample_ms: float = 0.0
    ttft_ms: float = 0.0  # prefill start -> first token sampled
    decode_ms: float = 0.0  # sum of step_ms
    decode_tok_s: float = 0.0  # decode steps / decode time; 0.0 when there was no decode step
    step_ms: list[float] = field(default_factory=list)  # embed + decode_step + sample, per step
    prefill_chunk_ms: list[float] = field(default_factory=list)


@dataclass
class GenerationResult:
    """token_ids never include the stop token; logits[i] (when recorded) are the raw logits token i was
    drawn from, plus a last entry for the stop token when generation stopped on one."""

    token_ids: list[int]
    stop_reason: str  # STOP_TOKEN | MAX_NEW_TOKENS
    stop_token_id: int | None
    n_prompt_tokens: int
    timings: Timings
    logits: list[np.ndarray] | None = None

    def to_dict(self) -> dict:
        """JSON-ready summary (no logits)."""
        out = asdict(self)
        out.pop("logits")
        return out


def check_context(backend: Backend, n_prompt: int, n_new: int, start_pos: int = 0) -> None:
    """Fail before any compute when the sequence cannot fit the model's context."""
    limit = backend.info.max_context
    total = start_pos + n_prompt + n_new
    if total > limit:
        offset = f"{start_pos} earlier tokens + " if start_pos else ""
        raise ContextOverflowError(
            f"context overflow: {offset}prompt of {n_prompt} tokens + {n_new} new tokens = {total} "
            f"> max context {limit}; shorten the prompt, use fewer or smaller images, or lower max_new_tokens"
        )


def prefill(
    backend: Backend,
    embeds: np.ndarray,
    state: DecoderState,
    start_pos: int = 0,
    positions: np.ndarray | None = None,
) -> tuple[np.ndarray, DecoderState, PrefillStats]:
    """Run embeds [T, D] through the decoder in chunks of C (the last zero-padded), starting at
    start_pos; return the logits of the last prompt position, the state and per-chunk timings.

    `positions` int64 [3, T]: the prompt's RoPE rows where they are not the cache index (Canvas
    M-RoPE); each chunk gets its columns, the padding repeating the last valid column."""
    embeds = _check_embeds(backend, embeds)
    n_tokens, width = embeds.shape
    check_context(backend, n_tokens, 0, start_pos)
    if positions is not None:
        positions = _check_positions(positions, n_tokens)
    chunk = backend.info.chunk_size
    chunk_ms: list[float] = []
    logits = None
    t_start = time.perf_counter()
    for begin in range(0, n_tokens, chunk):
        n_valid = min(chunk, n_tokens - begin)
        block = embeds[begin : begin + n_valid]
        if n_valid < chunk:
            block = np.concatenate([block, np.zeros((chunk - n_valid, width), np.float32)])
        rows = None
        if positions is not None:
            rows = np.pad(positions[:, begin : begin + n_valid], ((0, 0), (0, chunk - n_valid)), mode="edge")
        t0 = time.perf_counter()
        if rows is None:  # bundle backends without position rows keep their four-argument call
            logits, state = backend.prefill_chunk(block, n_valid, start_pos + begin, state)
        else:
            logits, state = backend.prefill_chunk(block, n_valid, start_pos + begin, state, positions=rows)
        chunk_ms.append(_ms_since(t0))
        logits = _check_logits(backend, logits, "prefill_chunk")
    stats = PrefillStats(n_tokens=n_tokens, chunk_size=chunk, chunk_ms=chunk_ms, total_ms=_ms_since(t_start))
    return logits, state, stats


def decode_one(
    backend: Backend, token: int, pos: int, state: DecoderState, rope: CanvasLayout | None = None
) -> tuple[np.ndarray, DecoderState]:
    """Feed one token id at cache index pos: its embedding, then one decoder step. With a canvas
    layout the step's RoPE rows are its `decode_position(pos)` in all three rows."""
    embed = np.asarray(backend.token_embedding(np.array([token], dtype=np.int64)), dtype=np.float32)
    if rope is None:
        logits, state = backend.decode_step(embed.reshape(1, -1), pos, state)
    else:
        rows = np.full((3, 1), rope.decode_position(pos), dtype=np.int64)
        logits, state = backend.decode_step(embed.reshape(1, -1), pos, state, positions=rows)
    return _check_logits(backend, logits, "decode_step"), state


def stream(
    backend: Backend,
    embeds: np.ndarray,
    sampling: SamplingConfig,
    prompt_ids: Sequence[int] | np.ndarray | None = None,
    record_logits: bool = False,
    rope: CanvasLayout | None = None,
) -> Generator[int, None, GenerationResult]:
    """Yield token ids as they are sampled; the generator's return value (StopIteration.value) is the
    GenerationResult. The context check runs now, before the first next(). `rope` is the prompt's
    canvas layout (Canvas M-RoPE families); None = positions are the cache index."""
    embeds = _check_embeds(backend, embeds)
    check_context(backend, len(embeds), sampling.max_new_tokens)
    if rope is not None:
        _check_positions(rope.positions, len(embeds))
    return _generation_loop(backend, embeds, sampling, prompt_ids, record_logits, rope)


def generate(
    backend: Backend,
    embeds: np.ndarray,
    sampling: SamplingConfig,
    on_token: TokenCallback | None = None,
    prompt_ids: Sequence[int] | np.ndarray | None = None,
    record_logits: bool = False,
    rope: CanvasLayout | None = None,
) -> GenerationResult:
    """Generate until a stop id or max_new_tokens; on_token(id) sees each output token as it comes (e.g. a
    tokenizer's StreamDecoder), and its time is not counted in the decode timings."""
    tokens = stream(backend, embeds, sampling, prompt_ids, record_logits, rope)
    while True:
        try:
            token = next(tokens)
        except StopIteration as done:
            return done.value
        if on_token is not None:
            on_token(token)


def _generation_loop(
    backend: Backend,
    embeds: np.ndarray,
    sampling: SamplingConfig,
    prompt_ids: Sequence[int] | np.ndarray | None,
    record_logits: bool,
    rope: CanvasLayout | None = None,
) -> Generator[int, None, GenerationResult]:
    """prefill -> first token -> (feed token i at position T+i -> sample) until stop or the limit."""
    sampler = Sampler(sampling, prompt_ids)
    stop_ids = set(sampling.stop_ids)
    n_prompt = len(embeds)
    timings = Timings()
    recorded: list[np.ndarray] | None = [] if record_logits else None
    state = backend.new_state()  # allocation is load-time work in an app, so it is outside TTFT

    t_start = time.perf_counter()
    logits, state, stats = prefill(backend, embeds, state, positions=None if rope is None else rope.positions)
    t_sample = time.perf_counter()
    token = sampler(logits)
    timings.first_sample_ms = _ms_since(t_sample)
    timings.ttft_ms = _ms_since(t_start)
    timings.prefill_ms, timings.prefill_chunk_ms = stats.total_ms, stats.chunk_ms

    out: list[int] = []
    while True:
        if recorded is not None:
            recorded.append(np.array(logits, copy=True))
        if token in stop_ids:
            stop_reason, stop_token = STOP_TOKEN, token
            break
        out.append(token)
        yield token
        if len(out) == sampling.max_new_tokens:
            stop_reason, stop_token = MAX_NEW_TOKENS, None
            break
        t0 = time.perf_counter()
        logits, state = decode_one(backend, token, n_prompt + len(out) - 1, state, rope)
        token = sampler(logits)
        timings.step_ms.append(_ms_since(t0))

    timings.decode_ms = sum(timings.step_ms)
    if timings.step_ms and timings.decode_ms > 0:
        timings.decode_tok_s = len(timings.step_ms) / (timings.decode_ms / 1000)
    return GenerationResult(out, stop_reason, stop_token, n_prompt, timings, recorded)


def teacher_forced_logits(
    backend: Backend,
    embeds: np.ndarray,
    forced_ids: Sequence[int] | np.ndarray,
    state: DecoderState | None = None,
    start_pos: int = 0,
    rope: CanvasLayout | None = None,
) -> list[np.ndarray]:
    """Prefill logits, then the logits after feeding each forced id in turn (len(forced_ids) + 1 arrays):
    parity compares two backends on the same token path even where their samples would diverge.
    `rope`: the prompt's canvas layout, which describes a sequence from cache index 0."""
    embeds = _check_embeds(backend, embeds)
    forced = [int(i) for i in np.asarray(forced_ids).reshape(-1)]
    check_context(backend, len(embeds), len(forced), start_pos)
    if rope is not None and start_pos != 0:
        raise ValueError("a canvas layout positions a whole sequence: start_pos must be 0")
    state = backend.new_state() if state is None else state
    logits, state, _ = prefill(backend, embeds, state, start_pos, None if rope is None else rope.positions)
    collected = [np.array(logits, copy=True)]
    pos = start_pos + len(embeds)
    for i, token in enumerate(forced):
        logits, state = decode_one(backend, token, pos + i, state, rope)
        collected.append(np.array(logits, copy=True))
    return collected


def _check_embeds(backend: Backend, embeds: np.ndarray) -> np.ndarray:
    embeds = np.ascontiguousarray(embeds, dtype=np.float32)
    if embeds.ndim != 2 or embeds.shape[1] != backend.info.hidden_size or embeds.shape[0] == 0:
        raise ValueError(
            f"embeddings must have shape (T >= 1, {backend.info.hidden_size}), got {embeds.shape}"
        )
    return embeds


def _check_positions(positions: np.ndarray, n_tokens: int) -> np.ndarray:
    """RoPE rows must be int64 [3, T] for the T prompt tokens they position."""
    positions = np.asarray(positions)
    if positions.shape != (3, n_tokens) or not np.issubdtype(positions.dtype, np.integer):
        raise ValueError(
            f"RoPE positions must be integer rows of shape (3, {n_tokens}), got {positions.dtype} {positions.shape}"
        )
    return positions.astype(np.int64, copy=False)


def _check_logits(backend: Backend, logits: np.ndarray, call: str) -> np.ndarray:
    logits = np.asarray(logits)
    if logits.ndim != 1:
        raise ValueError(f"{backend.name}.{call} returned logits of shape {logits.shape}, expected [V]")
    return logits


def _ms_since(t0: float) -> float:
    return (time.perf_counter() - t0) * 1000.0
