"""tools/train_demo.py: the training-only signals and a two-step run of the real script."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))

import train_demo  # noqa: E402

from edge_runtime.demo_task import DIGIT_SHAPE, RELATIONS, TRAIN, make_conversation, make_sample  # noqa: E402
from edge_runtime.models import qwen35_text  # noqa: E402


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("demo-assets")
    train_demo.write_assets(folder)
    return folder


@pytest.fixture(scope="module")
def encoder(assets: Path) -> train_demo.Encoder:
    return train_demo.Encoder(assets)


def test_where_targets_bin_each_token_centre() -> None:
    got = train_demo.where_targets((3, 2))
    bins = train_demo.WHERE_BINS
    assert got.shape == (6, 2)
    assert got[:, 0].tolist() == [bins // 6, bins // 6, bins // 2, bins // 2, 5 * bins // 6, 5 * bins // 6]
    assert got[:, 1].tolist() == [bins // 4, 3 * bins // 4] * 3


@pytest.mark.parametrize("extra", [2, 4])
def test_train_items_add_number_images_to_every_balanced_block(extra: int) -> None:
    block = 10 + extra
    items = [train_demo.train_item(k, extra) for k in range(3 * block)]
    indices = [index for index, _ in items]
    assert len(set(indices)) == len(indices)
    for b in range(3):
        chunk = items[b * block : (b + 1) * block]
        assert {mode for _, mode in chunk} == {train_demo.MODES[b % 2]}
        samples = [make_sample(TRAIN, index) for index, _ in chunk]
        assert [s.qtype for s in samples].count("text") == 2 + extra  # two of the balanced ten
        extras = samples[10:]
        assert all(s.qtype == "text" for s in extras)
        assert [s.lang for s in extras] == ["en", "zh"] * (extra // 2)
    if extra == 2:  # the mapping every earlier recipe trained on
        assert indices[10:12] == [train_demo.EXTRA_TEXT_OFFSET + 4, train_demo.EXTRA_TEXT_OFFSET + 9]


def _position_example(encoder: train_demo.Encoder) -> train_demo.Encoded:
    """A position question (it names two objects), train split, 16x, one follow-up turn."""
    index = 3  # question types cycle colour, shape, count, position, text
    sample, follow = make_conversation(TRAIN, index, turns=2)
    assert sample.qtype == "position"
    return encoder(sample, "16x", 32, follow, train_demo.make_scene(TRAIN, index)[1])


def _probs_on(ex: train_demo.Encoded, pick, heads: int = 2) -> torch.Tensor:
    """[1, heads, T, T] attention putting all of row `row`'s mass in head `h` on source token `pick(row, h)`."""
    t = ex.ids.shape[0]
    probs = torch.zeros(1, heads, t, t)
    for head in range(heads):
        for row in range(t):
            probs[0, head, row, ex.source_start + pick(row, head)] = 1.0
    return probs


def test_attention_terms_send_each_head_to_its_named_object(encoder: train_demo.Encoder) -> None:
    ex = _position_example(encoder)
    colour_of_token = (ex.aux[:, 0] - 1).tolist()
    named = ex.lookup[:, 0]
    first_turn = ex.answer_objects[0][1]
    assert len(first_turn) == 2 and bool((named != -100).any())

    def looking(swap: bool):
        def pick(row: int, head: int) -> int:
            wanted = int(named[row]) if int(named[row]) != -100 else first_turn[0]
            for pos, colours in ex.answer_objects:
                if row == pos and head < len(colours):
                    wanted = colours[(head + swap) % len(colours)]
            return colour_of_token.index(wanted)

        return pick

    n_terms = 1 + sum(len(colours) for _, colours in ex.answer_objects)
    right = train_demo.attention_terms(
        [ex], {2: _probs_on(ex, looking(False)), 5: _probs_on(ex, looking(False))}, 2, 5
    )
    swapped = train_demo.attention_terms(
        [ex], {2: _probs_on(ex, looking(True)), 5: _probs_on(ex, looking(True))}, 2, 5
    )
    assert len(right) == len(swapped) == n_terms
    assert max(float(x) for x in right) < 1e-4
    # heads 0 and 1 of the position answer looking at each other's object: both penalised
    assert float(swapped[1]) > 10.0 and float(swapped[2]) > 10.0
    background = colour_of_token.index(-1)
    nowhere = train_demo.attention_terms([ex], {2: _probs_on(ex, lambda r, h: background)}, 2, 5)
    assert len(nowhere) == 1 and float(nowhere[0]) > 10.0


def test_pair_terms_ask_for_both_named_objects_in_question_order(encoder: train_demo.Encoder) -> None:
    index = 3
    sample, _ = make_conversation(TRAIN, index, turns=1)
    objects = train_demo.make_scene(TRAIN, index)[1]
    ex = encoder(sample, "16x", 32, (), objects)
    first, second = (o for _, o in train_demo.named_objects(sample.question, sample.lang, objects))
    assert ex.answer_places == [(ex.answer_start - 1, (first.row, first.col, second.row, second.col))]
    aux = train_demo.AuxHeads(16, 6, 4)
    residual = torch.randn(1, ex.ids.shape[0], 16)

    def loss_when_probe_says(places: tuple[int, ...]) -> float:
        with torch.no_grad():
            aux.pair.weight.zero_()
            aux.pair.bias.fill_(-20.0)
            for slot, cls in enumerate(places):
                aux.pair.bias[4 * slot + cls] = 20.0
        (term,) = train_demo.pair_terms(aux, [ex], residual)
        return float(term)

    right = ex.answer_places[0][1]
    assert loss_when_probe_says(right) < 1e-4
    assert loss_when_probe_says(right[2:] + right[:2]) > 10.0  # the two objects swapped
    colour_question = encoder(make_sample(TRAIN, 0), "16x", 32, (), train_demo.make_scene(TRAIN, 0)[1])
    assert colour_question.answer_places == []  # names one object: nothing to compare


def test_position_answers_differ_at_their_first_token(encoder: train_demo.Encoder) -> None:
    """The answer is decided where its first token is predicted (and where the pair probe reads).
    The tokenizer corpus carries the Chinese position answers as words of their own, so each is one
    token: from byte pieces, 左边 and 右边 began with the same token (0xE5)."""
    english = [encoder.tokenizer.encode(a) for a in ("left", "right", "above", "below")]
    chinese = [encoder.tokenizer.encode(a) for a in RELATIONS.values()]
    assert len({ids[0] for ids in english}) == 4
    assert all(len(ids) == 1 for ids in chinese) and len({ids[0] for ids in chinese}) == 4


def test_pair_probe_can_read_every_position_that_predicts_an_answer_token(
    encoder: train_demo.Encoder, assets: Path
) -> None:
    """With pair_every_answer_token the pair probe reads every position that predicts a token of a
    multi-token answer (no position answer has several tokens now, so this one is made longer)."""
    index = next(i for i in range(3, 400, 5) if make_sample(TRAIN, i).qtype == "position")
    sample = dataclasses.replace(make_sample(TRAIN, index), answer="在左边还是右边")
    objects = train_demo.make_scene(TRAIN, index)[1]
    n_answer = len(encoder.tokenizer.encode(sample.answer))
    assert n_answer > 1
    first_only = encoder(sample, "16x", 32, (), objects)
    assert [pos for pos, _ in first_only.answer_places] == [first_only.answer_start - 1]
    every = train_demo.Encoder(assets, pair_every_answer_token=True)(sample, "16x", 32, (), objects)
    start = every.answer_start
    assert [pos for pos, _ in every.answer_places] == list(range(start - 1, start - 1 + n_answer))
    assert {places for _, places in every.answer_places} == {first_only.answer_places[0][1]}


def test_attention_terms_for_a_number_look_at_each_digit(encoder: train_demo.Encoder) -> None:
    sample = make_sample(TRAIN, 4)
    assert sample.qtype == "text"
    ex = encoder(sample, "16x", 32)
    digit_map = ex.digit_map.tolist()
    first = next(i for i, d in enumerate(digit_map) if 1 <= d < 11)
    second = next(i for i, d in enumerate(digit_map) if d >= 11)
    probs = _probs_on(ex, lambda row, head: second if row == ex.answer_start else first)
    terms = train_demo.attention_terms([ex], {5: probs}, 2, 5)
    assert len(terms) == 2 and max(float(x) for x in terms) < 1e-4
    swapped = _probs_on(ex, lambda row, head: first if row == ex.answer_start else second)
    assert min(float(x) for x in train_demo.attention_terms([ex], {5: swapped}, 2, 5)) > 10.0


def test_training_script_writes_a_loadable_checkpoint(tmp_path: Path) -> None:
    """Two vision steps and three question-answering steps of the real script, end to end."""
    from edge_runtime.checkpoint import load_checkpoint

    out = tmp_path / "ckpt"
    args = [
        "--out",
        str(out),
        "--oracle-steps",
        "2",
        "--vision-steps",
        "2",
        "--steps",
        "3",
        "--eval-every",
        "3",
    ]
    threads = torch.get_num_threads()
    assert train_demo.main([*args, "--eval-samples", "10", "--oracle-eval", "10", "--threads", "1"]) == 0
    # process-wide knobs are restored (a later test in this process saw chunk 16 once)
    assert qwen35_text.DELTANET_CHUNK == 64 and torch.get_num_threads() == threads
    assert not torch.are_deterministic_algorithms_enabled()
    config = json.loads((out / "config.json").read_text())
    assert config["text_config"]["layer_types"].count("full_attention") == 2
    model = load_checkpoint(out).model  # checks every tensor's name and shape against the config
    n_params = sum(p.numel() for p in model.parameters())
    assert abs((out / "model.safetensors").stat().st_size - 2 * n_params) < 64 * 1024  # fp16


def test_decoder_oracle_runs_and_reports_every_shape_question_type(capsys: pytest.CaptureFixture) -> None:
    import decoder_oracle

    assert (
        decoder_oracle.main(
            ["--steps", "2", "--batch", "3", "--eval-every", "2", "--eval-samples", "20"]
            + ["--pair-weight", "1", "--lookup-layer", "2"]
        )
        == 0
    )
    assert qwen35_text.DELTANET_CHUNK == 64  # restored (tools/train_demo.training_knobs)
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("step 2 loss ")
    for name in ("colour", "shape", "count", "position", "16x", "4x"):
        assert f" {name} " in f" {line.split('|')[1]} "
    assert " text " not in line


def test_training_script_runs_every_optional_signal(tmp_path: Path) -> None:
    """The off-by-default training signals (oracle phase, feature target, attention supervision,
    location probe, extra number images, smaller position table) run end to end."""
    from edge_runtime.checkpoint import load_checkpoint

    out = tmp_path / "ckpt"
    sizes = ["--batch", "3", "--vision-batch", "4", "--vision-numbers", "2", "--sheets", "1"]
    steps = [
        "--oracle-steps",
        "2",
        "--vision-steps",
        "2",
        "--steps",
        "2",
        "--eval-every",
        "2",
        "--eval-samples",
        "4",
        "--oracle-eval",
        "4",
    ]
    signals = [
        "--feature-weight",
        "1",
        "--oracle-ordinal",
        "--attend-weight",
        "1",
        "--pair-weight",
        "1",
        "--where-weight",
        "1",
        "--image-size",
        "448",
    ]
    assert train_demo.main(["--out", str(out), "--threads", "1", *sizes, *steps, *signals]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["vision_config"]["image_size"] == 448
    load_checkpoint(out)


TINY_RUN = ["--threads", "1", "--batch", "3", "--vision-batch", "4", "--sheets", "1", "--eval-samples", "2"]
TINY_STEPS = ["--oracle-steps", "2", "--vision-steps", "2", "--steps", "2"]


@pytest.mark.parametrize(
    ("state_flag", "later_setting"),
    [("--phase-state", ["--qa-lr", "3e-3"]), ("--oracle-state", ["--vision-numbers", "1"])],
)
def test_resuming_from_a_saved_state_writes_the_same_weights_as_one_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], state_flag: str, later_setting: list[str]
) -> None:
    """--phase-state saves the training state after the vision phase, --oracle-state after the
    oracle phase; a run that resumes from it (to try settings of the later phases) continues
    exactly where the straight run went on, and a setting of a later phase still takes effect."""
    common = [*TINY_RUN, "--eval-every", "2", "--oracle-eval", "2", *TINY_STEPS]
    common += [state_flag, str(tmp_path / "state.pt")]
    assert train_demo.main(["--out", str(tmp_path / "straight"), *common]) == 0
    assert (tmp_path / "state.pt").exists()
    capsys.readouterr()
    assert train_demo.main(["--out", str(tmp_path / "resumed"), *common]) == 0
    assert "resumed from" in "".join(capsys.readouterr())
    straight = (tmp_path / "straight" / "model.safetensors").read_bytes()
    assert (tmp_path / "resumed" / "model.safetensors").read_bytes() == straight
    assert train_demo.main(["--out", str(tmp_path / "other"), *common, *later_setting]) == 0
    assert (tmp_path / "other" / "model.safetensors").read_bytes() != straight


def test_the_oracle_phase_report_leaves_the_weights_alone(tmp_path: Path) -> None:
    """--oracle-eval only logs: a run with the report writes the same weights as one without it."""
    for name, samples in (("with", "6"), ("without", "0")):
        args = [
            "--out",
            str(tmp_path / name),
            *TINY_RUN,
            "--eval-every",
            "0",
            *TINY_STEPS,
            "--oracle-eval",
            samples,
        ]
        assert train_demo.main(args) == 0
    weights = [(tmp_path / name / "model.safetensors").read_bytes() for name in ("with", "without")]
    assert weights[0] == weights[1]


def test_oracle_features_cover_every_image_token(encoder: train_demo.Encoder) -> None:
    oracle = train_demo.OracleFeatures(16, 6, 4, seed=0)
    scene = _position_example(encoder)
    number = encoder(make_sample(TRAIN, 4), "4x", 32)
    for ex in (scene, number):
        n_image = int((ex.ids == encoder.image_token_id).sum())
        source = oracle.source(ex)
        assert source.shape == (ex.grid[0] * ex.grid[1], 16)
        assert oracle(ex, n_image).shape == (n_image, 16)
    # a digit on a number image gets the same shape code as that digit on a sheet
    d = int(number.digits[0])
    token = int((number.digit_map == 1 + d).nonzero()[0])
    where = train_demo.where_targets(number.grid)[token]
    expected = (
        oracle.codes["row"][where[0]]
        + oracle.codes["col"][where[1]]
        + oracle.codes["colour"][0]
        + oracle.codes["shape"][DIGIT_SHAPE + 1 + d]
    )
    assert torch.allclose(oracle.source(number)[token], expected)


def test_oracle_eval_scores_each_type_and_language_as_one_example_at_a_time() -> None:
    """The oracle-phase report batches examples of different lengths; each score must be what the
    examples get alone (teacher-forced exact match with oracle features), keyed by type and language.
    The shipped model with fresh oracle codes answers some of them right and some wrong."""
    from edge_runtime.checkpoint import load_checkpoint
    from edge_runtime.commands.options import DEFAULT_CHECKPOINT
    from edge_runtime.demo_task import EVAL, eval_samples, make_scene

    model = load_checkpoint(DEFAULT_CHECKPOINT).model.float()
    encoder = train_demo.Encoder(DEFAULT_CHECKPOINT)
    oracle = train_demo.OracleFeatures(model.cfg.text.hidden_size, 6, 4, seed=2)
    nps = model.cfg.vision.num_patches_per_side
    examples = [
        encoder(s, train_demo.sample_mode(i), nps, (), make_scene(EVAL, s.index)[1])
        for i, s in enumerate(eval_samples(40))
    ]
    scores = train_demo.oracle_eval(model, oracle, examples)
    alone: dict[str, list[bool]] = {}
    with torch.no_grad():
        for ex in examples:
            hidden = train_demo.hidden_batched(model, [ex], oracle=oracle)[0]
            logits = model.lm_head(hidden[ex.answer_start - 1 : ex.answer_end - 1])
            ok = bool((logits.argmax(-1) == ex.ids[ex.answer_start : ex.answer_end]).all())
            alone.setdefault(f"{ex.qtype} {ex.lang}", []).append(ok)
    assert len(scores) == 10  # five question types x two languages
    assert scores == {k: 100.0 * sum(v) / len(v) for k, v in alone.items()}
    assert 0 < sum(scores.values()) < 100 * len(scores)


@pytest.mark.parametrize(("k", "extra", "qa_extra"), [(18300, 4, 6), (18300, 4, 2), (23, 2, 8), (0, 4, 6)])
def test_question_answering_layout_starts_past_every_used_conversation(
    k: int, extra: int, qa_extra: int
) -> None:
    """--qa-extra-numbers changes the block layout mid-run: the question-answering phase must not
    reuse a scene or number image the earlier phases trained on (the training-split index is what
    train_item hands out), and must start on a block boundary so both modes stay balanced."""
    start = train_demo.qa_start_item(k, extra, qa_extra)
    assert start % (10 + qa_extra) == 0
    used = {train_demo.train_item(j, extra)[0] for j in range(k)}
    upcoming = {train_demo.train_item(j, qa_extra)[0] for j in range(start, start + 5 * (10 + qa_extra))}
    assert not used & upcoming
    if qa_extra >= extra:  # then the next block of the new layout is already past every used index
        assert start == -(-k // (10 + extra)) * (10 + qa_extra)


def test_blended_oracle_codes_mix_both_digits_only_where_both_are_inked(encoder: train_demo.Encoder) -> None:
    """--oracle-blend-digits: a token with ink of only one digit keeps that digit's code, a mixed
    token gets both codes in proportion to its ink, and an ink-free token the empty code."""

    def mixed(ex: train_demo.Encoded) -> torch.Tensor:
        return (ex.digit_left > 0.2) & (ex.digit_left < 0.8)

    number = next(
        ex for i in range(40) if mixed(ex := encoder(make_sample(TRAIN, 10 * i + 4), "16x", 70)).any()
    )
    oracle = train_demo.OracleFeatures(32, 6, 4, seed=0)
    single = oracle.source(number)
    oracle.blend_digits = True
    blended = oracle.source(number)
    share = number.digit_left
    pure = (share == 0.0) | (share == 1.0) | (share < 0)
    assert pure.any() and torch.allclose(blended[pure], single[pure])
    first, second = oracle.codes["shape"][DIGIT_SHAPE + 1 + number.digits]
    token = int(mixed(number).nonzero()[0])
    expected = (
        single[token] - oracle.codes["shape"][DIGIT_SHAPE + 1 + (int(number.digit_map[token]) - 1) % 10]
    )
    expected = expected + share[token] * first + (1 - share[token]) * second
    assert torch.allclose(blended[token], expected, atol=1e-5)


@pytest.mark.parametrize("share", [0.75, 0.5, 1.0])
def test_number_images_take_16x_at_the_requested_share(share: float) -> None:
    """--numbers-16x: the extra number images of consecutive blocks take 16x at `share`, evenly
    spread; the balanced ten of each block keep the block's mode and every index is unchanged."""
    extra = 6
    items = [train_demo.train_item(k, extra, share) for k in range(8 * (10 + extra))]
    default = [train_demo.train_item(k, extra) for k in range(8 * (10 + extra))]
    assert [index for index, _ in items] == [index for index, _ in default]
    numbers = [mode for k, (_, mode) in enumerate(items) if k % (10 + extra) >= 10]
    assert numbers.count("16x") == share * len(numbers)
    for start in range(0, len(numbers), 4):  # evenly spread: the share holds in every run of four
        assert numbers[start : start + 4].count("16x") == int(share * 4)
    balanced = [
        (mode, d)
        for k, ((_, mode), (_, d)) in enumerate(zip(items, default, strict=True))
        if k % (10 + extra) < 10
    ]
    assert all(mode == d for mode, d in balanced)


def test_bf16_vision_forward_gives_fp32_features_close_to_the_fp32_ones(encoder: train_demo.Encoder) -> None:
    """--vision-bf16 / --qa-vision-bf16 run only the vision tower under bfloat16 autocast: the
    features that reach the probes and the decoder stay fp32 and within bfloat16's precision of
    the fp32 forward; the switch is back off after a run."""
    cfg = train_demo.demo_config(encoder.tokenizer.vocab_size, encoder.image_token_id, 0)
    model = train_demo.init_model(cfg, 0)
    nps = cfg.vision.num_patches_per_side
    for mode in train_demo.MODES:
        ex = encoder(make_sample(TRAIN, 4, 0), mode, nps)
        reference = train_demo.vision_batched(model, ex.slices, mode)
        with train_demo.vision_bf16(True):
            fast = train_demo.vision_batched(model, ex.slices, mode)
        assert train_demo.VISION_BF16 is False
        for a, b in zip(reference, fast, strict=True):
            assert b.dtype == torch.float32 and b.shape == a.shape
            assert not torch.equal(a, b)  # it did run in bfloat16
            assert (a - b).abs().max() < 0.05 * a.abs().max()


def test_bf16_vision_is_the_default_and_can_be_turned_off(tmp_path: Path) -> None:
    """The shipped recipe runs the vision tower in bfloat16 in both phases; --no-vision-bf16
    --no-qa-vision-bf16 trains it in fp32 (other weights), and no run leaves the switch on."""
    common = ["--eval-every", "0", "--oracle-eval", "0", *TINY_RUN, *TINY_STEPS]
    for name, flags in (("fp32", ["--no-vision-bf16", "--no-qa-vision-bf16"]), ("bf16", [])):
        assert train_demo.main(["--out", str(tmp_path / name), *common, *flags]) == 0
        assert train_demo.VISION_BF16 is False
    weights = [(tmp_path / name / "model.safetensors").read_bytes() for name in ("fp32", "bf16")]
    assert weights[0] != weights[1]
