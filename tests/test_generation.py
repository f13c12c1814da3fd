"""The shared generation loop, on a toy numpy backend whose outputs depend on every token, its position
and the carried state, so wrong chunking, wrong positions or a state reset all change the logits."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from edge_runtime.backends.base import Backend, DecoderState, ModelInfo
from edge_runtime.errors import ContextOverflowError, InputError
from edge_runtime.generation import (
    MAX_NEW_TOKENS,
    STOP_TOKEN,
    GenerationResult,
    Sampler,
    SamplingConfig,
    apply_repetition_penalty,
    apply_temperature,
    apply_top_k,
    apply_top_p,
    build_input_embeddings,
    generate,
    greedy_token,
    prefill,
    process_logits,
    softmax,
    stream,
    teacher_forced_logits,
)

VOCAB, DIM = 32, 8
IMAGE_ID, VIDEO_ID = VOCAB - 2, VOCAB - 1


class ToyBackend(Backend):
    """acc <- 0.7 * acc + tanh(W e + sin(0.37 pos + k)); logits = acc @ W_out, computed token by token in
    float64 so any chunking of the same sequence gives bit-identical results."""

    name = "toy"

    def __init__(self, chunk_size: int = 4, max_context: int = 64, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.info = ModelInfo(
            family="toy",
            hidden_size=DIM,
            vocab_size=VOCAB,
            max_context=max_context,
            chunk_size=chunk_size,
            patch_size=14,
            image_token_id=IMAGE_ID,
            video_token_id=VIDEO_ID,
        )
        self.table = rng.normal(size=(VOCAB, DIM)).astype(np.float32)
        self.w_in = rng.normal(size=(DIM, DIM)) / np.sqrt(DIM)
        self.w_out = rng.normal(size=(DIM, VOCAB)) * 2.0
        self.prefill_calls: list[tuple[int, int]] = []  # (start_pos, n_valid)
        self.decode_positions: list[int] = []

    def vision_encoder(self, patches, position_ids, mode):
        raise NotImplementedError

    def token_embedding(self, ids: np.ndarray) -> np.ndarray:
        assert ids.dtype == np.int64
        return self.table[ids]

    def new_state(self) -> DecoderState:
        return DecoderState({"acc": np.zeros(DIM)})

    def step(self, acc: np.ndarray, embed: np.ndarray, pos: int) -> np.ndarray:
        return 0.7 * acc + np.tanh(embed.astype(np.float64) @ self.w_in + np.sin(0.37 * pos + np.arange(DIM)))

    def logits(self, acc: np.ndarray) -> np.ndarray:
        return (acc @ self.w_out).astype(np.float32)

    def prefill_chunk(self, embeds, n_valid, start_pos, state):
        assert embeds.shape == (self.info.chunk_size, DIM) and embeds.dtype == np.float32
        assert 1 <= n_valid <= self.info.chunk_size
        assert not embeds[n_valid:].any(), "padding rows must be zeros"
        self.prefill_calls.append((start_pos, n_valid))
        acc = state.tensors["acc"]
        for i in range(n_valid):
            acc = self.step(acc, embeds[i], start_pos + i)
        return self.logits(acc), DecoderState({"acc": acc})

    def decode_step(self, embed, pos, state):
        assert embed.shape == (1, DIM)
        self.decode_positions.append(pos)
        acc = self.step(state.tensors["acc"], embed[0], pos)
        return self.logits(acc), DecoderState({"acc": acc})


def reference_logits(backend: ToyBackend, embeds: np.ndarray) -> list[np.ndarray]:
    """Logits after every position of one unchunked pass: what prefill + decode must reproduce."""
    acc, out = np.zeros(DIM), []
    for pos, row in enumerate(embeds):
        acc = backend.step(acc, row, pos)
        out.append(backend.logits(acc))
    return out


def prompt_embeds(backend: ToyBackend, n: int, seed: int = 1) -> np.ndarray:
    ids = np.random.default_rng(seed).integers(0, VOCAB - 2, size=n)
    return backend.token_embedding(ids)


# ---------------------------------------------------------------------------------------------------
# prefill / positions / state


@pytest.mark.parametrize("chunk_size", [1, 3, 4, 5, 64])
def test_chunked_prefill_equals_unchunked(chunk_size):
    backend = ToyBackend(chunk_size=chunk_size)
    embeds = prompt_embeds(backend, 13)
    logits, state, stats = prefill(backend, embeds, backend.new_state())
    want = reference_logits(backend, embeds)[-1]
    np.testing.assert_array_equal(logits, want)
    assert stats.n_chunks == -(-13 // chunk_size) and stats.n_tokens == 13
    big = ToyBackend(chunk_size=64)
    np.testing.assert_array_equal(
        state.tensors["acc"], prefill(big, embeds, big.new_state())[1].tensors["acc"]
    )


def test_prefill_chunk_calls_positions_and_padding():
    backend = ToyBackend(chunk_size=4)
    prefill(backend, prompt_embeds(backend, 10), backend.new_state())
    assert backend.prefill_calls == [(0, 4), (4, 4), (8, 2)]  # the toy asserts shape and zero padding


def test_prefill_continues_from_start_pos():
    """A second prefill on the carried state (multi-turn) equals one prefill of both parts."""
    backend = ToyBackend(chunk_size=3)
    embeds = prompt_embeds(backend, 11)
    _, state, _ = prefill(backend, embeds[:7], backend.new_state())
    logits, _, _ = prefill(backend, embeds[7:], state, start_pos=7)
    np.testing.assert_array_equal(logits, reference_logits(backend, embeds)[-1])


def test_teacher_forced_logits_match_one_pass():
    backend = ToyBackend(chunk_size=4)
    embeds = prompt_embeds(backend, 9)
    forced = [3, 7, 7, 1, 20]
    got = teacher_forced_logits(backend, embeds, forced)
    full = np.concatenate([embeds, backend.token_embedding(np.array(forced))])
    want = reference_logits(backend, full)[len(embeds) - 1 :]
    assert len(got) == len(forced) + 1
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(g, w)
    assert backend.decode_positions == [9, 10, 11, 12, 13]


def test_generate_logits_follow_positions_and_state():
    """Recorded logits of a generation equal a single pass over prompt + generated tokens."""
    backend = ToyBackend(chunk_size=4)
    embeds = prompt_embeds(backend, 10)
    result = generate(backend, embeds, SamplingConfig(max_new_tokens=8), record_logits=True)
    full = np.concatenate([embeds, backend.token_embedding(np.array(result.token_ids))])
    want = reference_logits(backend, full)[len(embeds) - 1 : -1]
    for g, w in zip(result.logits, want, strict=True):
        np.testing.assert_array_equal(g, w)
    assert backend.decode_positions == list(range(10, 17))


def test_generation_is_independent_of_chunk_size():
    runs = []
    for chunk_size in (1, 3, 64):
        backend = ToyBackend(chunk_size=chunk_size)
        cfg = SamplingConfig(max_new_tokens=12, temperature=0.9, top_k=10, seed=5)
        runs.append(generate(backend, prompt_embeds(backend, 13), cfg).token_ids)
    assert runs[0] == runs[1] == runs[2]


# ---------------------------------------------------------------------------------------------------
# sampling


def test_greedy_picks_argmax_every_step():
    backend = ToyBackend()
    result = generate(
        backend, prompt_embeds(backend, 6), SamplingConfig(max_new_tokens=10), record_logits=True
    )
    assert result.token_ids == [int(np.argmax(lg)) for lg in result.logits]


def test_greedy_ties_take_first_index():
    assert greedy_token(np.array([1.0, 3.0, 3.0, 0.0], np.float32)) == 1


def test_same_seed_same_samples_different_seed_differs():
    backend = ToyBackend()
    embeds = prompt_embeds(backend, 6)

    def run(seed):
        return generate(
            backend, embeds, SamplingConfig(max_new_tokens=24, temperature=1.0, seed=seed)
        ).token_ids

    assert run(0) == run(0)
    assert run(0) != run(1)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_top_k_one_and_tiny_top_p_equal_greedy(seed):
    backend = ToyBackend()
    embeds = prompt_embeds(backend, 7)
    greedy = generate(backend, embeds, SamplingConfig(max_new_tokens=16)).token_ids
    top_k = generate(backend, embeds, SamplingConfig(max_new_tokens=16, temperature=1.5, top_k=1, seed=seed))
    top_p = generate(
        backend, embeds, SamplingConfig(max_new_tokens=16, temperature=1.5, top_p=1e-6, seed=seed)
    )
    assert top_k.token_ids == greedy
    assert top_p.token_ids == greedy


def test_temperature_scales_logits_and_sampling_distribution():
    logits = np.array([2.0, 1.0, 0.5, -1.0, 0.0], np.float32)
    cfg = SamplingConfig(temperature=2.0, seed=3)
    np.testing.assert_allclose(process_logits(logits, cfg, np.array([], np.int64)), logits / 2.0)
    sampler = Sampler(cfg)
    draws = np.array([sampler(logits) for _ in range(20000)])
    freq = np.bincount(draws, minlength=len(logits)) / len(draws)
    np.testing.assert_allclose(freq, softmax(logits / 2.0), atol=0.015)
    cold = Sampler(SamplingConfig(temperature=0.01, seed=3))
    assert all(cold(logits) == 0 for _ in range(100))


def test_sampling_never_draws_filtered_tokens():
    logits = np.linspace(-1, 1, 16).astype(np.float32)
    sampler = Sampler(SamplingConfig(temperature=1.0, top_k=3, seed=0))
    assert {sampler(logits) for _ in range(500)} == {13, 14, 15}


def test_repetition_penalty_applies_in_greedy_and_counts_prompt_and_samples():
    logits = np.array([0.0, 3.0, 2.0, 1.8], np.float32)
    sampler = Sampler(SamplingConfig(repetition_penalty=2.0), prompt_ids=[1, 1])
    assert sampler(logits) == 2  # 3.0 / 2 < 2.0
    assert sampler(logits) == 3  # 2 was sampled and is penalised now too
    assert Sampler(SamplingConfig())(logits) == 1


# ---------------------------------------------------------------------------------------------------
# against transformers' processors


def _hf(processor, ids: np.ndarray, logits: np.ndarray) -> np.ndarray:
    torch = pytest.importorskip("torch")
    return processor(torch.from_numpy(ids)[None], torch.from_numpy(logits.copy())[None])[0].numpy()


def _assert_same_scores(got: np.ndarray, want: np.ndarray) -> None:
    np.testing.assert_array_equal(np.isneginf(got), np.isneginf(want))
    finite = np.isfinite(want)
    np.testing.assert_allclose(got[finite], want[finite], rtol=1e-6, atol=0)


def _random_case(seed: int, vocab: int = 100, zeros: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Random logits and ids. zeros=True plants exact zeros (the penalty's sign-rule edge case); they
    tie, and HF's top-p keeps or drops tied tokens by torch.sort's unspecified tie order."""
    rng = np.random.default_rng(seed)
    logits = (rng.normal(size=vocab) * 3).astype(np.float32)
    if zeros:
        logits[rng.integers(0, vocab, size=3)] = 0.0
    ids = rng.integers(0, vocab, size=40).astype(np.int64)  # with repeats
    return logits, ids


@pytest.mark.parametrize("penalty", [1.3, 0.7])
def test_repetition_penalty_matches_hf(penalty):
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    for seed in range(5):
        logits, ids = _random_case(seed)
        want = _hf(RepetitionPenaltyLogitsProcessor(penalty), ids, logits)
        _assert_same_scores(apply_repetition_penalty(logits, ids, penalty), want)


def test_temperature_top_k_top_p_match_hf():
    from transformers.generation.logits_process import (
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    for seed in range(5):
        logits, ids = _random_case(seed, zeros=False)
        _assert_same_scores(apply_temperature(logits, 0.7), _hf(TemperatureLogitsWarper(0.7), ids, logits))
        for k in (1, 5, 50, 100, 200):
            _assert_same_scores(apply_top_k(logits, k), _hf(TopKLogitsWarper(k), ids, logits))
        for p in (1e-6, 0.1, 0.5, 0.8, 0.99):
            _assert_same_scores(apply_top_p(logits, p), _hf(TopPLogitsWarper(p), ids, logits))


def test_full_processor_chain_matches_hf_order():
    from transformers.generation.logits_process import (
        LogitsProcessorList,
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    cfg = SamplingConfig(temperature=0.7, top_k=20, top_p=0.8, repetition_penalty=1.05)
    chain = LogitsProcessorList(
        [
            RepetitionPenaltyLogitsProcessor(1.05),
            TemperatureLogitsWarper(0.7),
            TopKLogitsWarper(20),
            TopPLogitsWarper(0.8),
        ]
    )
    for seed in range(10):
        logits, ids = _random_case(seed, zeros=False)
        _assert_same_scores(process_logits(logits, cfg, ids), _hf(chain, ids, logits))


# ---------------------------------------------------------------------------------------------------
# stop rules, limits, streaming, timings


def test_stop_id_ends_generation_and_is_not_output():
    backend = ToyBackend()
    embeds = prompt_embeds(backend, 6)
    cfg = SamplingConfig(max_new_tokens=20, temperature=1.0, seed=4)
    free = generate(backend, embeds, cfg).token_ids
    stop = free[5]
    cut = free.index(stop)
    result = generate(backend, embeds, replace(cfg, stop_ids=(stop, 999)))
    assert result.token_ids == free[:cut]
    assert result.stop_reason == STOP_TOKEN and result.stop_token_id == stop


def test_stop_on_first_token_yields_nothing():
    backend = ToyBackend()
    embeds = prompt_embeds(backend, 6)
    first = generate(backend, embeds, SamplingConfig(max_new_tokens=1)).token_ids[0]
    result = generate(
        backend, embeds, SamplingConfig(max_new_tokens=8, stop_ids=(first,)), record_logits=True
    )
    assert result.token_ids == [] and result.stop_token_id == first and len(result.logits) == 1
    assert result.timings.decode_tok_s == 0.0 and result.timings.step_ms == []


@pytest.mark.parametrize("n", [1, 2, 9])
def test_max_new_tokens_respected(n):
    backend = ToyBackend()
    result = generate(backend, prompt_embeds(backend, 6), SamplingConfig(max_new_tokens=n, temperature=1.0))
    assert (
        len(result.token_ids) == n and result.stop_reason == MAX_NEW_TOKENS and result.stop_token_id is None
    )
    assert len(backend.decode_positions) == n - 1  # the last token is never fed back


def test_context_overflow_raises_before_any_compute():
    backend = ToyBackend(max_context=20)
    embeds = prompt_embeds(backend, 15)
    with pytest.raises(ContextOverflowError) as err:
        generate(backend, embeds, SamplingConfig(max_new_tokens=6))
    message = str(err.value)
    assert "\n" not in message and all(str(n) in message for n in (15, 6, 21, 20))
    with pytest.raises(ContextOverflowError):
        stream(backend, embeds, SamplingConfig(max_new_tokens=6))  # raises on the call, not on next()
    with pytest.raises(ContextOverflowError):
        teacher_forced_logits(backend, embeds, [1] * 6)
    assert backend.prefill_calls == []
    assert len(generate(backend, embeds, SamplingConfig(max_new_tokens=5)).token_ids) == 5  # exactly fits


def test_stream_and_callback_see_the_same_tokens():
    backend = ToyBackend()
    embeds = prompt_embeds(backend, 6)
    cfg = SamplingConfig(max_new_tokens=10, temperature=1.0, seed=7)
    seen: list[int] = []
    result = generate(backend, embeds, cfg, on_token=seen.append)
    tokens = stream(backend, embeds, cfg)
    streamed = list(tokens)
    assert seen == streamed == result.token_ids


def test_timings_and_result_dict():
    backend = ToyBackend(chunk_size=4)
    result = generate(backend, prompt_embeds(backend, 10), SamplingConfig(max_new_tokens=6))
    t = result.timings
    assert isinstance(result, GenerationResult) and result.n_prompt_tokens == 10
    assert len(t.prefill_chunk_ms) == 3 and len(t.step_ms) == 5
    assert 0 < t.prefill_ms <= t.ttft_ms and t.first_sample_ms >= 0
    assert t.decode_ms == pytest.approx(sum(t.step_ms)) and t.decode_tok_s == pytest.approx(
        5 / (t.decode_ms / 1e3)
    )
    assert "logits" not in result.to_dict() and result.to_dict()["timings"]["step_ms"] == t.step_ms


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_new_tokens": 0},
        {"temperature": -1.0},
        {"top_k": -1},
        {"top_p": 0.0},
        {"repetition_penalty": 0.0},
    ],
)
def test_bad_sampling_settings_raise_input_error(kwargs):
    with pytest.raises(InputError):
        SamplingConfig(**kwargs)


# ---------------------------------------------------------------------------------------------------
# placeholder splicing


def test_build_input_embeddings_replaces_placeholders_in_order():
    backend = ToyBackend()
    ids = np.array([1, IMAGE_ID, IMAGE_ID, 2, VIDEO_ID, IMAGE_ID, VIDEO_ID, 3])
    images = [np.full((2, DIM), 10.0, np.float32), np.full((1, DIM), 11.0, np.float32)]
    videos = [np.arange(2 * DIM, dtype=np.float32).reshape(2, DIM)]
    out = build_input_embeddings(backend, ids, images, IMAGE_ID, videos, VIDEO_ID)
    want = backend.table[ids].copy()
    want[[1, 2, 5]] = np.concatenate(images)
    want[[4, 6]] = videos[0]
    np.testing.assert_array_equal(out, want)
    assert not np.shares_memory(out, backend.table)
    np.testing.assert_array_equal(build_input_embeddings(backend, ids, images, video_embeds=videos), want)


def test_placeholder_count_mismatch_raises():
    backend = ToyBackend()
    ids = np.array([1, IMAGE_ID, IMAGE_ID, IMAGE_ID, 2])
    with pytest.raises(InputError, match=r"3 image placeholder tokens .* 4 rows"):
        build_input_embeddings(backend, ids, [np.zeros((4, DIM), np.float32)], IMAGE_ID)
    with pytest.raises(InputError, match="0 video placeholder"):
        build_input_embeddings(backend, ids, [np.zeros((3, DIM))], IMAGE_ID, [np.zeros((2, DIM))], VIDEO_ID)
    with pytest.raises(InputError, match="shape"):
        build_input_embeddings(backend, ids, [np.zeros((3, DIM + 1))], IMAGE_ID)
