"""Parity: run a reference and a candidate on the same cases and compare them stage by stage.

Generic over backends: both sides are Sessions (or bare Backends plus shared HostAssets), so the
same harness checks a bundle against the checkpoint, or, in tests, the reference against a copy of
itself with one weight perturbed or with its state dropped between decode steps. Images are
preprocessed once and handed to both sides, so any difference comes from the models.

Stages, per case:
- vision   each slice's embeddings: cosine (flattened) and max abs diff.
- prefill  logits at the last prompt position: max abs diff, top-1 agreement, KL(ref || cand).
- state    decoder state after prefill, per tensor (KV caches over the prompt positions only):
           max abs diff and relative error. Reported, never gated: formats may keep state in other
           dtypes, and a state that matters shows up in the decode stage.
- decode   logits of N teacher-forced decode steps (both sides are fed the reference's greedy
           tokens, so they stay on one token path even after their samples would diverge).
           max abs diff and KL cover all N steps; the top-1 gate counts the steps up to the
           reference's first stop token, the ones whose tokens a user sees (as the greedy stage).
- greedy   free-running greedy tokens vs the reference's, up to and including the reference's first
           stop token (at most N): the answer a user sees. Tokens after a stop are never shown, and
           on a trained model they come from near-uniform logits where any quantization flips ties.
The gate table for each quantization lives in GATES, once.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .backends.base import Backend
from .errors import EdgeError, InputError
from .families import case_mode
from .generation import SamplingConfig, check_context, generate, prefill, teacher_forced_logits
from .jsonfile import read_json_file
from .processing.slicing import prepare_image, vision_mode_names
from .session import HostAssets, PreparedInput, Session

SAMPLES_DIR = Path(__file__).resolve().parent / "data" / "samples"
DEFAULT_CASES_FILE = SAMPLES_DIR / "cases.json"
DEFAULT_STEPS = 32
STAGES = ("vision", "prefill", "state", "decode", "greedy")


@dataclass(frozen=True)
class Gates:
    """Thresholds of one quantization (DESIGN.md §Parity gates); None = not gated at that level."""

    vision_cosine: float  # every slice's cosine >= this
    logits_max_abs: float | None  # prefill and every decode step, per case
    top1_rate: float | None  # share of positions whose argmax agrees, per stage over all cases
    identical_cases: float | None  # share of cases whose N greedy tokens are identical
    token_agree: float | None  # per case, share of greedy tokens equal position by position


GATES: dict[str, Gates] = {
    "fp32": Gates(
        vision_cosine=0.99999, logits_max_abs=1e-3, top1_rate=None, identical_cases=1.0, token_agree=None
    ),
    "fp16": Gates(
        vision_cosine=0.999, logits_max_abs=None, top1_rate=1.0, identical_cases=0.9, token_agree=None
    ),
    "int8": Gates(
        vision_cosine=0.99, logits_max_abs=None, top1_rate=0.95, identical_cases=None, token_agree=0.8
    ),
    "int4": Gates(
        vision_cosine=0.98, logits_max_abs=None, top1_rate=0.90, identical_cases=None, token_agree=0.7
    ),
}
GATES["8da4w"] = GATES["int4-channel"] = GATES["int4"]


def gates_for(quantization: str) -> Gates:
    if quantization not in GATES:
        raise InputError(f"no parity gates for quantization {quantization!r} (known: {', '.join(GATES)})")
    return GATES[quantization]


# ---------------------------------------------------------------------------------------------------
# Cases


@dataclass(frozen=True)
class Case:
    name: str
    images: tuple[Path, ...]
    prompt: str
    downsample_mode: str | None = None
    max_slice_nums: int | None = None


def load_cases(path: str | Path) -> list[Case]:
    """A cases file: {"cases": [{name, images, prompt, downsample_mode?, max_slice_nums?}]} (or the bare
    list); image paths are relative to the file. Every problem is one InputError line."""
    path = Path(path)
    raw = read_json_file(path, "cases file", InputError, expect=(dict, list))
    items = raw.get("cases") if isinstance(raw, dict) else raw
    if not isinstance(items, list) or not items:
        raise InputError(f'cases file {path}: expected a non-empty list under "cases"')
    cases, names = [], set()
    for i, item in enumerate(items):
        where = f"cases file {path}: case {i}"
        if not isinstance(item, dict):
            raise InputError(f"{where}: not an object")
        unknown = set(item) - {"name", "images", "prompt", "downsample_mode", "max_slice_nums"}
        if unknown:
            raise InputError(f"{where}: unknown keys {', '.join(sorted(unknown))}")
        name, prompt, images = item.get("name"), item.get("prompt"), item.get("images", [])
        if not isinstance(name, str) or not name or name in names:
            raise InputError(f"{where}: name must be a unique non-empty string")
        if not isinstance(prompt, str) or not prompt:
            raise InputError(f"{where} ({name}): prompt must be a non-empty string")
        if not isinstance(images, list) or not all(isinstance(p, str) for p in images):
            raise InputError(f"{where} ({name}): images must be a list of paths")
        resolved = tuple((path.parent / p).resolve() for p in images)
        for image in resolved:
            if not image.is_file():
                raise InputError(f"{where} ({name}): image {image} does not exist")
        mode = item.get("downsample_mode")
        known = vision_mode_names()
        if mode is not None and mode not in known:
            raise InputError(f"{where} ({name}): downsample_mode must be {' or '.join(known)}, got {mode!r}")
        slices = item.get("max_slice_nums")
        if slices is not None and (type(slices) is not int or slices < 1):
            raise InputError(f"{where} ({name}): max_slice_nums must be an integer >= 1")
        names.add(name)
        cases.append(Case(name, resolved, prompt, mode, slices))
    return cases


def default_cases() -> list[Case]:
    """The shipped sample cases: several sizes, both downsample modes, sliced images, two images."""
    return load_cases(DEFAULT_CASES_FILE)


# ---------------------------------------------------------------------------------------------------
# Metrics


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    x, y = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    denom = np.linalg.norm(x) * np.linalg.norm(y)
    if denom == 0:
        return 1.0 if np.array_equal(x, y) else 0.0
    return float(np.dot(x, y) / denom)


def max_abs(a: np.ndarray, b: np.ndarray) -> float:
    diff = np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))
    return float(diff.max()) if diff.size else 0.0


def kl_divergence(ref_logits: np.ndarray, cand_logits: np.ndarray) -> float:
    """KL(P_ref || P_cand) of the next-token distributions, in nats."""
    p = _log_softmax(ref_logits)
    q = _log_softmax(cand_logits)
    return float(max(np.sum(np.exp(p) * (p - q)), 0.0))


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    x = np.asarray(logits, np.float64)
    x = x - x.max()
    return x - np.log(np.exp(x).sum())


def _finite(value: float) -> float | None:
    """JSON has no NaN/inf: a non-finite figure is reported as null (and fails its gate)."""
    return value if math.isfinite(value) else None


def _or_inf(value: float | None) -> float:
    return math.inf if value is None else value


def _or_minus_inf(value: float | None) -> float:
    return -math.inf if value is None else value


def _worst(values: list[float | None], pick: Callable[[list[float]], float]) -> float | None:
    """min or max over cases; None (a non-finite figure somewhere) wins, as it fails the gate."""
    return None if None in values or not values else pick(values)


# ---------------------------------------------------------------------------------------------------
# Report


@dataclass
class Failure:
    stage: str
    case: str  # a case name, or "*" for a gate over all cases
    gate: str
    value: float | None
    threshold: float | None
    message: str


@dataclass
class CaseResult:
    name: str
    n_slices: int = 0
    n_prompt_tokens: int = 0
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)  # stage -> what went wrong


@dataclass
class ParityReport:
    quantization: str
    gates: Gates
    n_steps: int
    reference: str
    candidate: str
    cases: list[CaseResult]
    failures: list[Failure] = field(default_factory=list)
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return not self.failures

    @property
    def first_failure(self) -> Failure | None:
        order = {s: i for i, s in enumerate(STAGES)}
        return min(self.failures, key=lambda f: order.get(f.stage, -1), default=None)

    def to_json(self) -> dict[str, Any]:
        """The documented `parity --json` object (docs/json.md)."""
        return {
            "passed": self.passed,
            "quantization": self.quantization,
            "gates": asdict(self.gates),
            "n_decode_steps": self.n_steps,
            "reference": self.reference,
            "candidate": self.candidate,
            "failures": [asdict(f) for f in self.failures],
            "first_failed_stage": self.first_failure.stage if self.first_failure else None,
            "stages": self.stages,
            "cases": [asdict(c) for c in self.cases],
        }

    def summary_lines(self) -> list[str]:
        lines = []
        for stage in STAGES:
            info = self.stages.get(stage, {})
            mark = {True: "PASS", False: "FAIL", None: "info"}[info.get("passed")]
            figures = ", ".join(f"{k} {_fmt(v)}" for k, v in info.items() if k not in ("passed", "gated"))
            lines.append(f"{mark:4} {stage:8} {figures}")
        for f in self.failures:
            lines.append(f"gate failed: [{f.stage}] {f.message}")
        verdict = "PASSED" if self.passed else f"FAILED ({len(self.failures)} gate(s))"
        lines.append(
            f"parity {verdict}: {self.candidate} vs {self.reference}, {self.quantization} gates, "
            f"{len(self.cases)} cases, {self.n_steps} decode steps"
        )
        return lines

    def to_markdown(self) -> str:
        out = [
            "# Parity report",
            "",
            f"- candidate: `{self.candidate}`, reference: `{self.reference}`",
            f"- quantization: **{self.quantization}**; result: **{'PASSED' if self.passed else 'FAILED'}**",
            f"- cases: {len(self.cases)}, teacher-forced decode steps and greedy tokens: {self.n_steps}",
            "",
            "## Gates",
            "",
            "| gate | threshold |",
            "|---|---|",
            *(
                f"| {k} | {_fmt(v) if v is not None else 'not gated'} |"
                for k, v in asdict(self.gates).items()
            ),
            "",
            "## Stages",
            "",
            "| stage | result | figures |",
            "|---|---|---|",
        ]
        for stage in STAGES:
            info = self.stages.get(stage, {})
            mark = {True: "pass", False: "**FAIL**", None: "reported"}[info.get("passed")]
            figures = ", ".join(f"{k} {_fmt(v)}" for k, v in info.items() if k not in ("passed", "gated"))
            out.append(f"| {stage} | {mark} | {figures} |")
        out += [
            "",
            "## Cases",
            "",
            "| case | slices | prompt tokens | vision min cos | prefill max abs | decode max abs | "
            "decode top-1 | decode KL mean | greedy agree | errors |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for c in self.cases:
            s = c.stages
            out.append(
                f"| {c.name} | {c.n_slices} | {c.n_prompt_tokens} | {_fmt(s.get('vision', {}).get('min_cosine'))} | "
                f"{_fmt(s.get('prefill', {}).get('max_abs'))} | {_fmt(s.get('decode', {}).get('max_abs'))} | "
                f"{_fmt(s.get('decode', {}).get('top1_rate'))} | {_fmt(s.get('decode', {}).get('kl_mean'))} | "
                f"{_fmt(s.get('greedy', {}).get('agree_rate'))} | {'; '.join(f'{k}: {v}' for k, v in c.errors.items())} |"
            )
        out += ["", "## Failures", ""]
        out += [f"- [{f.stage}] {f.message}" for f in self.failures] or ["none"]
        return "\n".join(out) + "\n"


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


# ---------------------------------------------------------------------------------------------------
# Comparison


Progress = Callable[[str], None]


def compare(
    reference: Session | Backend,
    candidate: Session | Backend,
    cases: Sequence[Case],
    quantization: str,
    assets: HostAssets | None = None,
    n_steps: int = DEFAULT_STEPS,
    progress: Progress | None = None,
) -> ParityReport:
    """Run every case on both sides and apply the quantization's gates. Backends need `assets`."""
    gates = gates_for(quantization)
    if n_steps < 1:
        raise InputError(f"n_steps must be >= 1, got {n_steps}")
    ref, cand = _as_session(reference, assets), _as_session(candidate, assets)
    say = progress or (lambda _msg: None)
    results = []
    for i, case in enumerate(cases):
        say(f"case {i + 1}/{len(cases)}: {case.name}")
        results.append(_run_case(ref, cand, case, n_steps))
    report = ParityReport(quantization, gates, n_steps, ref.backend.name, cand.backend.name, results)
    _apply_gates(report)
    return report


def _as_session(side: Session | Backend, assets: HostAssets | None) -> Session:
    if isinstance(side, Session):
        return side
    if assets is None:
        raise InputError("comparing bare backends needs HostAssets (tokenizer, prompts, slicing)")
    return Session(side, assets)


def _error_text(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if not isinstance(exc, EdgeError) else text


def _run_case(ref: Session, cand: Session, case: Case, n_steps: int) -> CaseResult:
    """One case through every stage; a candidate failure ends the case with the stage named."""
    result = CaseResult(case.name)
    try:
        mode = case_mode(ref.backend.info.family, case.downsample_mode)
    except ValueError as exc:
        raise InputError(f"case {case.name}: {exc}") from None
    config = ref.slice_config(mode, case.max_slice_nums)
    images = [prepare_image(path, config) for path in case.images]
    ref_in = ref.prepare(case.prompt, images, downsample_mode=mode, max_slice_nums=case.max_slice_nums)
    result.n_slices, result.n_prompt_tokens = ref_in.n_slices, len(ref_in.prompt.ids)
    try:  # a case that cannot fit is bad input for the whole run, not a finding about the candidate
        for side in (ref, cand):
            check_context(side.backend, len(ref_in.embeds), n_steps + 1)
    except InputError as exc:
        raise InputError(f"case {case.name}: {exc}") from None
    # Reference: N + 1 greedy tokens give the free-running path and, recorded, the logits of
    # prefill plus N teacher-forced steps on that same path.
    sampling = SamplingConfig(max_new_tokens=n_steps + 1, stop_ids=())
    ref_run = generate(ref.backend, ref_in.embeds, sampling, record_logits=True, rope=ref_in.rope)
    ref_tokens, ref_logits = ref_run.token_ids, ref_run.logits or []

    stage = "vision"
    try:
        cand_in = cand.prepare(case.prompt, images, downsample_mode=mode, max_slice_nums=case.max_slice_nums)
        result.stages["vision"] = _vision_stage(ref_in, cand_in)
        if list(cand_in.prompt.ids) != list(ref_in.prompt.ids):
            raise InputError("prompt token ids differ: the bundle's host files (tokenizer, template) differ")

        shown = _until_stop(ref_tokens[:n_steps], ref.assets.stop_ids)
        stopped = bool(shown) and shown[-1] in ref.assets.stop_ids
        stage = "prefill"
        cand_logits = teacher_forced_logits(
            cand.backend, cand_in.embeds, ref_tokens[:n_steps], rope=cand_in.rope
        )
        result.stages["prefill"] = _logits_stage(ref_logits[:1], cand_logits[:1])
        stage = "state"
        result.stages["state"] = _state_stage(ref, cand, ref_in, cand_in)
        stage = "decode"  # decode step i predicts token i: steps 1..s reach the stop token s
        shown_steps = len(shown) - 1 if stopped else n_steps
        result.stages["decode"] = _logits_stage(ref_logits[1:], cand_logits[1:], shown_steps)
        stage = "greedy"
        greedy = SamplingConfig(max_new_tokens=n_steps, stop_ids=())
        cand_run = generate(cand.backend, cand_in.embeds, greedy, rope=cand_in.rope)
        result.stages["greedy"] = _greedy_stage(shown, cand_run.token_ids[: len(shown)])
    except Exception as exc:  # a broken candidate is a finding, reported per stage, not a crash
        result.errors[stage] = _error_text(exc)
    return result


def _vision_stage(ref_in: PreparedInput, cand_in: PreparedInput) -> dict[str, Any]:
    if cand_in.n_slices != ref_in.n_slices:
        raise ValueError(f"candidate produced {cand_in.n_slices} slices, reference {ref_in.n_slices}")
    slices = []
    for i, (a, b) in enumerate(zip(ref_in.slice_embeds, cand_in.slice_embeds, strict=True)):
        if a.shape != b.shape:
            raise ValueError(f"slice {i}: candidate embeddings {b.shape} vs reference {a.shape}")
        slices.append(
            {"cosine": _finite(cosine(a, b)), "max_abs": _finite(max_abs(a, b)), "tokens": int(a.shape[0])}
        )
    cosines = [s["cosine"] for s in slices]
    diffs = [s["max_abs"] for s in slices]
    return {  # a non-finite slice (None) makes the case's figure None, which fails the gate
        "slices": slices,
        "min_cosine": None if None in cosines else min(cosines, default=None),
        "max_abs": None if None in diffs else max(diffs, default=None),
    }


def _top2_margin(logits: np.ndarray) -> float | None:
    """The reference's top-1 minus top-2 logit: how close to a tie the flipped position was."""
    flat = np.asarray(logits, dtype=np.float64).ravel()
    if flat.size < 2:
        return None
    top2 = np.partition(flat, flat.size - 2)[-2:]
    return _finite(float(top2[1] - top2[0]))


def _mismatch_site(case: str, stage: str, figures: dict[str, Any]) -> str:
    """`case (first at step N, reference top-2 margin M logits)` for a gate message (no step in prefill)."""
    step = "" if stage == "prefill" else f"first at step {figures['first_top1_mismatch'] + 1}, "
    margin = figures["first_mismatch_ref_margin"]
    return f"{case} ({step}reference top-2 margin {'-' if margin is None else f'{margin:.3g} logits'})"


def _logits_stage(
    ref: Sequence[np.ndarray], cand: Sequence[np.ndarray], top1_positions: int | None = None
) -> dict[str, Any]:
    """Per-position comparison; top-1 agreement over the first `top1_positions` (default: all)."""
    if len(ref) != len(cand):
        raise ValueError(f"candidate gave {len(cand)} logit vectors, reference {len(ref)}")
    diffs = [max_abs(a, b) for a, b in zip(ref, cand, strict=True)]
    agree_all = [int(np.argmax(a)) == int(np.argmax(b)) for a, b in zip(ref, cand, strict=True)]
    agree = agree_all[: len(ref) if top1_positions is None else top1_positions]
    kls = [kl_divergence(a, b) for a, b in zip(ref, cand, strict=True)]
    first_bad = next((i for i, ok in enumerate(agree) if not ok), None)
    return {
        "positions": len(ref),
        "max_abs": _finite(max(diffs, default=0.0)),
        "max_abs_per_position": [_finite(d) for d in diffs],
        "top1_positions": len(agree),
        "top1_agree": int(sum(agree)),
        "top1_rate": sum(agree) / len(agree) if agree else None,
        "top1_rate_all_positions": sum(agree_all) / len(agree_all) if agree_all else None,
        "first_top1_mismatch": first_bad,
        "first_mismatch_ref_margin": None if first_bad is None else _top2_margin(ref[first_bad]),
        "kl_mean": _finite(float(np.mean(kls))) if kls else None,
        "kl_max": _finite(max(kls, default=0.0)),
    }


def _prefill_state(session: Session, prepared: PreparedInput):
    """The decoder state after the prompt, positioned as the generation loop positions it."""
    rows = None if prepared.rope is None else prepared.rope.positions
    return prefill(session.backend, prepared.embeds, session.backend.new_state(), positions=rows)[1]


def _state_stage(
    ref: Session, cand: Session, ref_in: PreparedInput, cand_in: PreparedInput
) -> dict[str, Any]:
    """State after prefill, per tensor; KV caches compared over the prompt positions only (the rest is
    unused cache whose contents no format has to agree on)."""
    ref_state = ref.backend.state_arrays(_prefill_state(ref, ref_in))
    cand_state = cand.backend.state_arrays(_prefill_state(cand, cand_in))
    if ref_state is None or cand_state is None:
        return {"available": False}
    n_prompt = len(ref_in.prompt.ids)
    tensors = {}
    for name, a in ref_state.items():
        if name not in cand_state:
            tensors[name] = {"missing": True}
            continue
        b = cand_state[name]
        if name.endswith(("k_cache", "v_cache")) and a.ndim == 4:
            a, b = a[:, :, :n_prompt], b[:, :, :n_prompt]
        if a.shape != b.shape:
            tensors[name] = {"shape_mismatch": [list(a.shape), list(b.shape)]}
            continue
        norm = float(np.linalg.norm(a.astype(np.float64)))
        err = float(np.linalg.norm(a.astype(np.float64) - b)) / norm if norm > 0 else max_abs(a, b)
        tensors[name] = {"max_abs": _finite(max_abs(a, b)), "rel_err": _finite(err)}
    numeric = {k: v for k, v in tensors.items() if "rel_err" in v}
    worst = max(numeric, key=lambda k: _or_inf(numeric[k]["rel_err"]), default=None)
    return {
        "available": True,
        "tensors": tensors,
        "max_abs": _worst([v["max_abs"] for v in numeric.values()], max),
        "max_rel_err": numeric[worst]["rel_err"] if worst else None,
        "worst_tensor": worst,
        "mismatched_tensors": sorted(set(tensors) - set(numeric)),
    }


def _until_stop(tokens: Sequence[int], stop_ids: Sequence[int]) -> list[int]:
    """`tokens` up to and including the first stop id (all of them when none occurs)."""
    stops = set(stop_ids)
    for i, token in enumerate(tokens):
        if token in stops:
            return list(tokens[: i + 1])
    return list(tokens)


def _greedy_stage(ref_tokens: Sequence[int], cand_tokens: Sequence[int]) -> dict[str, Any]:
    n = len(ref_tokens)
    same = [i < len(cand_tokens) and cand_tokens[i] == t for i, t in enumerate(ref_tokens)]
    first = next((i for i, ok in enumerate(same) if not ok), None)
    return {
        "identical": list(ref_tokens) == list(cand_tokens),
        "agree_rate": sum(same) / n if n else 1.0,
        "first_divergence": first,
        "reference_tokens": list(ref_tokens),
        "candidate_tokens": list(cand_tokens),
    }


# ---------------------------------------------------------------------------------------------------
# Gates


def _apply_gates(report: ParityReport) -> None:
    """Turn the figures into failures (each one readable on its own) and per-stage summaries."""
    g, cases, fails = report.gates, report.cases, report.failures
    for c in cases:
        for stage, text in c.errors.items():
            fails.append(
                Failure(stage, c.name, "error", None, None, f"case {c.name}: {stage} stage failed: {text}")
            )

    # vision: every slice of every case
    vision = [(c, c.stages["vision"]) for c in cases if "vision" in c.stages and c.stages["vision"]["slices"]]
    for c, v in vision:
        if v["min_cosine"] is None or v["min_cosine"] < g.vision_cosine:
            i = min(range(len(v["slices"])), key=lambda k: _or_minus_inf(v["slices"][k]["cosine"]))
            fails.append(Failure(
                "vision", c.name, "vision_cosine", v["min_cosine"], g.vision_cosine,
                f"case {c.name}: slice {i} embeddings cosine {_fmt(v['min_cosine'])} < {g.vision_cosine} "
                f"(max abs diff {_fmt(v['max_abs'])})",
            ))  # fmt: skip
    report.stages["vision"] = {
        "passed": not any(f.stage == "vision" for f in fails),
        "min_cosine": _worst([v["min_cosine"] for _, v in vision], min),
        "max_abs": _worst([v["max_abs"] for _, v in vision], max),
        "slices": sum(len(v["slices"]) for _, v in vision),
        "cases": len(vision),
    }

    for stage in ("prefill", "decode"):
        _gate_logits(report, stage)

    states = [c.stages["state"] for c in cases if c.stages.get("state", {}).get("available")]
    report.stages["state"] = {
        "passed": None,
        "gated": False,
        "max_abs": _worst([s["max_abs"] for s in states], max),
        "max_rel_err": _worst([s["max_rel_err"] for s in states], max),
        "cases": len(states),
    }

    greedy = [(c, c.stages["greedy"]) for c in cases if "greedy" in c.stages]
    if g.token_agree is not None:
        for c, s in greedy:
            if s["agree_rate"] < g.token_agree:
                fails.append(Failure(
                    "greedy", c.name, "token_agree", s["agree_rate"], g.token_agree,
                    f"case {c.name}: {s['agree_rate']:.0%} of greedy tokens agree < {g.token_agree:.0%} "
                    f"(first divergence at token {s['first_divergence']})",
                ))  # fmt: skip
    identical_rate = sum(s["identical"] for _, s in greedy) / len(greedy) if greedy else None
    if g.identical_cases is not None and identical_rate is not None and identical_rate < g.identical_cases:
        differing = ", ".join(
            f"{c.name} (token {s['first_divergence']})" for c, s in greedy if not s["identical"]
        )
        fails.append(Failure(
            "greedy", "*", "identical_cases", identical_rate, g.identical_cases,
            f"greedy tokens identical on {identical_rate:.0%} of cases < {g.identical_cases:.0%}; "
            f"diverging: {differing}",
        ))  # fmt: skip
    report.stages["greedy"] = {
        "passed": not any(f.stage == "greedy" for f in fails),
        "identical_cases": identical_rate,
        "min_agree_rate": min((s["agree_rate"] for _, s in greedy), default=None),
        "cases": len(greedy),
    }
    for f in fails:  # a stage that errored in some case has not passed
        if f.gate == "error" and f.stage in report.stages:
            report.stages[f.stage]["passed"] = False


def _gate_logits(report: ParityReport, stage: str) -> None:
    """max abs per case (fp32), top-1 over all positions of the stage (pooled across cases)."""
    g, fails = report.gates, report.failures
    rows = [(c, c.stages[stage]) for c in report.cases if stage in c.stages]
    where = "prefill" if stage == "prefill" else "decode step"
    if g.logits_max_abs is not None:
        for c, s in rows:
            if s["max_abs"] is None or s["max_abs"] > g.logits_max_abs:
                pos = int(np.nanargmax([d if d is not None else np.inf for d in s["max_abs_per_position"]]))
                at = "the last prompt position" if stage == "prefill" else f"{where} {pos + 1}"
                fails.append(Failure(
                    stage, c.name, "logits_max_abs", s["max_abs"], g.logits_max_abs,
                    f"case {c.name}: {stage} logits max abs diff {_fmt(s['max_abs'])} > {g.logits_max_abs} "
                    f"at {at}",
                ))  # fmt: skip
    positions = sum(s["top1_positions"] for _, s in rows)
    agree = sum(s["top1_agree"] for _, s in rows)
    rate = agree / positions if positions else None
    if g.top1_rate is not None and rate is not None and rate < g.top1_rate:
        worst = [_mismatch_site(c.name, stage, s) for c, s in rows if s["first_top1_mismatch"] is not None]
        fails.append(Failure(
            stage, "*", "top1_rate", rate, g.top1_rate,
            f"{stage} top-1 agreement {rate:.1%} of {positions} positions < {g.top1_rate:.0%}; "
            f"mismatches in {', '.join(worst)}",
        ))  # fmt: skip
    kls = [s["kl_mean"] for _, s in rows if s["kl_mean"] is not None]
    report.stages[stage] = {
        "passed": not any(f.stage == stage for f in fails),
        "max_abs": _worst([s["max_abs"] for _, s in rows], max),
        "top1_rate": rate,
        "kl_mean": float(np.mean(kls)) if kls else None,
        "kl_max": _worst([s["kl_max"] for _, s in rows], max),
        "positions": sum(s["positions"] for _, s in rows),
        "top1_positions": positions,
        "cases": len(rows),
    }
