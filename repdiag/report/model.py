"""The ``Report``: one typed object for everything ``repdiag analyze`` produced, and its JSON file.

``report.json`` is canonical: a baseline is just an earlier ``report.json``. It is written
deterministically (sorted keys, ``inf`` as ``"inf"``, no timestamp, no wall-clock time); timings go
to a sidecar ``timings.json`` beside it. ``schema_version`` is ``"MAJOR.MINOR"``: readers accept any
minor version of their major and refuse another major.

Sections whose content is "policy -> key -> number" (``bounds``, ``measured``, ``predicted``,
``stderr``, ``quality``) are plain dicts, open to any key; the top-level layout is fixed
(``schema.json``). Section objects with known fields (``model``, ``matrix``, ...) keep any other key
in ``extra`` and write it back beside the known ones, so producers can add information without a
schema change.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar, Mapping, Sequence

from .. import __version__
from .._atomic import dumps_json, write_json, write_text
from ..errors import BadInputError

__all__ = [
    "SCHEMA_VERSION",
    "SCHEMA_MAJOR",
    "NUMBER_SECTIONS",
    "ToolInfo",
    "ModelInfo",
    "EnvironmentInfo",
    "Settings",
    "PromptsInfo",
    "MatrixInfo",
    "Prediction",
    "LoopCycle",
    "LoopMap",
    "AttributionEntry",
    "Attribution",
    "Example",
    "Report",
    "load_report",
    "save_report",
    "timings_path_for",
    "schema",
    "validate_report_dict",
    "higher_is_better",
    "parse_number",
    "format_number",
]

SCHEMA_VERSION = "1.0"
SCHEMA_MAJOR = 1

#: sections holding ``{policy: {key: number}}``
NUMBER_SECTIONS = ("bounds", "measured", "predicted", "quality")

_NONFINITE = {"inf": math.inf, "-inf": -math.inf, "nan": math.nan}


# --------------------------------------------------------------------------------------------------
# metric directions: the one table that says which way is better
# --------------------------------------------------------------------------------------------------

#: exact keys whose larger value is *better* (less repetition, more diversity, better quality)
_HIGHER_IS_BETTER_KEYS = frozenset(
    {
        # metrics (spec §9.7)
        "uniq_seq", "uniq", "acc", "simctg_diversity", "simctg_diversity_code_quirk", "loop_onset",
        # bounds / policy-case quantities (spec §12): more termination, more spread rows
        "mean_p_eos", "zeta_n", "zeta", "terminate_fraction",
        # quality price of a mitigation
        "mean_logprob", "chrf", "bleu",
        # prediction quality
        "rho",
    }
)
#: exact keys whose larger value is *worse* (more repetition, tighter loops)
_LOWER_IS_BETTER_KEYS = frozenset(
    {
        "rep_r", "seq_rep_pooled_1_4", "rep_sen", "rep_sen_ditto_code", "TP", "IP", "WR", "nonterminated",
        "su_R", "su_R_avg", "fu_arp", "fu_arp_corrected", "rho_Q", "rho_B", "rho_B2",
        "occupation_lsr", "occupation_lsr_trunc", "lsr", "lsr_trunc", "greedy_cycle_occupancy",
        "greedy_loop_fraction", "loop_fraction", "row_collision_full", "su_dominant_term",
        "su_upper_bound_cyclic", "su_upper_bound_n", "su_lower_bound_trace_cs", "su_lower_bound_diag_cs",
        "su_estimate_r2", "su_estimate_r3", "thm1_bound", "cor11_bound", "cor12_bound", "p_nonterminate",
        "states_on_cycles", "calibration_error",
    }
)
#: key patterns whose larger value is worse
_LOWER_IS_BETTER_PATTERNS = (
    re.compile(r"rep_w\d*"),
    re.compile(r"seq_rep_\d+"),
    re.compile(r"simctg_rep_\d+(_code_quirk)?"),
    re.compile(r"w?rep_l\d+"),
    re.compile(r"(greedy_matrix_|mc_|fu_bounds_)?(su_R|fu_arp)(_trunc_exact|_trunc_mc)?"),
)


def higher_is_better(key: str) -> bool | None:
    """Direction of a metric or bound key: True (higher is better), False (lower is better), None.

    Repetition metrics and repetition bounds are lower-is-better; diversity, uniqueness,
    termination and quality are higher-is-better; anything else (``length``, counts) has no
    direction. ``POLICY.KEY`` and section prefixes are stripped first.
    """
    key = key.rsplit(".", 1)[-1]
    if key in _HIGHER_IS_BETTER_KEYS:
        return True
    if key in _LOWER_IS_BETTER_KEYS:
        return False
    if any(p.fullmatch(key) for p in _LOWER_IS_BETTER_PATTERNS):
        return False
    return None


# --------------------------------------------------------------------------------------------------
# plain-value helpers
# --------------------------------------------------------------------------------------------------


def parse_number(value: Any) -> Any:
    """``"inf"``/``"-inf"``/``"nan"`` → float; numpy scalars → Python; others unchanged."""
    if isinstance(value, str) and value in _NONFINITE:
        return _NONFINITE[value]
    if hasattr(value, "item") and not isinstance(value, (list, dict, str)):
        try:
            return value.item()
        except (TypeError, ValueError):
            return value
    return value


def format_number(x: Any, digits: int = 4) -> str:
    """Short, deterministic text for a number: ``n/a``, ``inf``, integers as such, else ``.4g``."""
    if x is None:
        return "n/a"
    if isinstance(x, bool):
        return str(x).lower()
    if isinstance(x, int):
        return str(x)
    if isinstance(x, str):
        return x
    x = float(x)
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    if x == 0:
        return "0"
    return f"{x:.{digits}g}"


def _plain(value: Any) -> Any:
    """Dataclasses, mappings and sequences to JSON-ready Python (numbers left as floats)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return value.to_dict()  # type: ignore[attr-defined]
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        return _plain(value.tolist())
    return parse_number(value)


def _number_table(value: Any, where: str) -> dict[str, dict[str, Any]]:
    """Validate and normalise ``{policy: {key: number}}``."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise BadInputError(f"report section {where!r} must be an object policy -> key -> number")
    out: dict[str, dict[str, Any]] = {}
    for policy, row in value.items():
        if not isinstance(row, Mapping):
            raise BadInputError(f"report section {where}.{policy} must be an object key -> number")
        clean: dict[str, Any] = {}
        for key, v in row.items():
            v = parse_number(v)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
                raise BadInputError(
                    f"report value {where}.{policy}.{key} is {v!r}: expected a number, \"inf\" or null"
                )
            clean[str(key)] = v
        out[str(policy)] = clean
    return out


# --------------------------------------------------------------------------------------------------
# sections
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class _Section:
    """A section with known fields; unknown keys live in ``extra`` and are written beside them."""

    extra: Mapping[str, Any] = field(default_factory=dict)

    _list_fields: ClassVar[tuple[str, ...]] = ()

    def to_dict(self) -> dict[str, Any]:
        out = {k: _plain(v) for k, v in self.extra.items()}
        for f in fields(self):
            if f.name != "extra":
                out[f.name] = _plain(getattr(self, f.name))
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None, where: str = ""):
        if data is None:
            return cls()
        if not isinstance(data, Mapping):
            raise BadInputError(f"report section {where or cls.__name__!r} must be an object")
        known = {f.name for f in fields(cls)} - {"extra"}
        kwargs = {k: cls._convert(k, v) for k, v in data.items() if k in known}
        extra = {k: v for k, v in data.items() if k not in known}
        return cls(**kwargs, extra=extra)

    @classmethod
    def _convert(cls, name: str, value: Any) -> Any:
        return parse_number(value)


@dataclass(frozen=True, kw_only=True)
class ToolInfo(_Section):
    name: str = "repdiag"
    version: str = __version__


@dataclass(frozen=True, kw_only=True)
class ModelInfo(_Section):
    id: str | None = None
    revision: str | None = None
    kind: str | None = None  # "seq2seq" | "causal"
    architecture: str | None = None
    n_parameters: int | None = None
    vocab_size: int | None = None
    tokenizer_fingerprint: str | None = None
    dtype: str | None = None
    device: str | None = None
    default_generation_config: Mapping[str, Any] = field(default_factory=dict)

    def identity(self) -> tuple[Any, ...]:
        """What ``--same-model`` compares: id, revision and tokenizer fingerprint."""
        return (self.id, self.revision, self.tokenizer_fingerprint)


@dataclass(frozen=True, kw_only=True)
class EnvironmentInfo(_Section):
    python: str | None = None
    torch: str | None = None
    transformers: str | None = None
    numpy: str | None = None
    platform: str | None = None
    threads: int | None = None

    @classmethod
    def current(cls) -> "EnvironmentInfo":
        """The running interpreter's versions (imports torch and transformers if installed)."""
        import platform as _platform

        def version(mod: str) -> str | None:
            try:
                return __import__(mod).__version__
            except Exception:  # noqa: BLE001 - absent or broken optional package
                return None

        threads = None
        try:
            import torch

            threads = int(torch.get_num_threads())
        except Exception:  # noqa: BLE001
            pass
        return cls(
            python=_platform.python_version(),
            torch=version("torch"),
            transformers=version("transformers"),
            numpy=version("numpy"),
            platform=_platform.platform(),
            threads=threads,
        )


@dataclass(frozen=True, kw_only=True)
class Settings(_Section):
    seed: int | None = None
    max_new_tokens: int | None = None
    n_prompts: int | None = None
    mitigations: Sequence[str] = ()


@dataclass(frozen=True, kw_only=True)
class PromptsInfo(_Section):
    source: str | None = None
    split_rule: str | None = None
    n_trace: int | None = None
    n_measure: int | None = None
    trace_indices: Sequence[int] = ()
    measure_indices: Sequence[int] = ()


@dataclass(frozen=True, kw_only=True)
class MatrixInfo(_Section):
    builder: str | None = None
    order: int | None = None
    top_k: int | None = None
    n_states: int | None = None
    coverage_rows: float | None = None
    coverage_mass: float | None = None


@dataclass(frozen=True, kw_only=True)
class Prediction(_Section):
    predictor: str = "simulation"
    policies: Sequence[str] = ()
    #: metric -> {"rho", "p", "n_policies"}
    spearman: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    #: closed-form explanations, e.g. family -> metric -> {"rho", "p", "n_policies"}
    closed_form: Mapping[str, Any] = field(default_factory=dict)
    #: metric -> mean absolute |predicted - measured| over policies
    calibration_error: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def _convert(cls, name: str, value: Any) -> Any:
        if name == "spearman" and isinstance(value, Mapping):
            return {m: {k: parse_number(v) for k, v in (d or {}).items()} for m, d in value.items()}
        if name == "calibration_error" and isinstance(value, Mapping):
            return {k: parse_number(v) for k, v in value.items()}
        return parse_number(value)


@dataclass(frozen=True, kw_only=True)
class LoopCycle(_Section):
    tokens: Sequence[int | str] = ()  # token ids (preferred) or pieces
    text: str = ""
    basin_size: int = 0


@dataclass(frozen=True, kw_only=True)
class LoopMap(_Section):
    policy: str = "greedy"
    n_states: int | None = None
    cycles: Sequence[LoopCycle] = ()
    loop_fraction: float | None = None

    @classmethod
    def _convert(cls, name: str, value: Any) -> Any:
        if name == "cycles":
            if not isinstance(value, list):
                raise BadInputError("report section loop_map.cycles must be a list")
            return tuple(LoopCycle.from_dict(c, "loop_map.cycles[]") for c in value)
        return parse_number(value)


@dataclass(frozen=True, kw_only=True)
class AttributionEntry(_Section):
    #: training pair id (int or str), or an object {id, source, target}
    pair: Any = None
    contribution: float = 0.0
    source: str | None = None
    target: str | None = None

    def label(self) -> str:
        """Human text of the pair: ``source → target`` when known, else its id."""
        src, tgt = self.source, self.target
        if isinstance(self.pair, Mapping):
            src = src or self.pair.get("source") or self.pair.get("text")
            tgt = tgt or self.pair.get("target")
        if src and tgt:
            return f"{src} → {tgt}"
        if src or tgt:
            return str(src or tgt)
        return f"pair {self.ident()}"

    def ident(self) -> Any:
        """The pair's id: ``pair`` itself when scalar, else ``pair.id``, else the ``index`` or ``rank`` extra."""
        if self.pair is not None and not isinstance(self.pair, Mapping):
            return self.pair
        if isinstance(self.pair, Mapping) and self.pair.get("id") is not None:
            return self.pair["id"]
        for k in ("id", "index", "rank"):
            if self.extra.get(k) is not None:
                return self.extra[k]
        return "?"


@dataclass(frozen=True, kw_only=True)
class Attribution(_Section):
    mode: str | None = None
    query: Any = None
    completeness_residual: float | None = None
    delta_m: float | None = None
    #: the proponents, largest contribution first (may also hold opponents when ``opponents`` is empty)
    top: Sequence[AttributionEntry] = ()
    #: the opponents, most negative first (optional)
    opponents: Sequence[AttributionEntry] = ()

    @classmethod
    def _convert(cls, name: str, value: Any) -> Any:
        if name in ("top", "opponents"):
            if not isinstance(value, list):
                raise BadInputError(f"report section attribution.{name} must be a list")
            return tuple(AttributionEntry.from_dict(e, f"attribution.{name}[]") for e in value)
        return parse_number(value)

    def entries(self) -> list[AttributionEntry]:
        """Proponents and opponents together, sorted by contribution (largest first), without duplicates."""
        seen: set[Any] = set()
        out = []
        for e in [*self.top, *self.opponents]:
            key = (repr(e.ident()), e.label(), e.contribution)
            if key not in seen:
                seen.add(key)
                out.append(e)
        return sorted(out, key=lambda e: -float(e.contribution if isinstance(e.contribution, (int, float)) else 0.0))


@dataclass(frozen=True, kw_only=True)
class Example(_Section):
    policy: str = ""
    prompt: str = ""
    output: str = ""


_SECTION_TYPES: dict[str, type[_Section]] = {
    "tool": ToolInfo,
    "model": ModelInfo,
    "environment": EnvironmentInfo,
    "settings": Settings,
    "prompts": PromptsInfo,
    "matrix": MatrixInfo,
    "prediction": Prediction,
    "loop_map": LoopMap,
}


@dataclass(frozen=True, kw_only=True)
class Report:
    """Everything one analysis produced; ``to_dict()`` is exactly the body of ``report.json``.

    Number sections: ``bounds``/``measured``/``predicted``/``quality`` are ``{policy: {key: number}}``
    (``float('inf')`` allowed, written ``"inf"``; ``None`` for "not defined"); ``stderr`` is
    ``{"measured"|"predicted": {policy: {key: se}}}``; ``spectrum`` is ``{policy: [[re, im], ...]}``
    (eigenvalues of Q for the HTML plot).
    """

    schema_version: str = SCHEMA_VERSION
    tool: ToolInfo = field(default_factory=ToolInfo)
    model: ModelInfo = field(default_factory=ModelInfo)
    environment: EnvironmentInfo = field(default_factory=EnvironmentInfo)
    settings: Settings = field(default_factory=Settings)
    prompts: PromptsInfo = field(default_factory=PromptsInfo)
    matrix: MatrixInfo = field(default_factory=MatrixInfo)
    bounds: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    spectrum: Mapping[str, Sequence[Sequence[float]]] = field(default_factory=dict)
    measured: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    predicted: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    stderr: Mapping[str, Mapping[str, Mapping[str, Any]]] = field(default_factory=dict)
    prediction: Prediction = field(default_factory=Prediction)
    loop_map: LoopMap = field(default_factory=LoopMap)
    attribution: Attribution | None = None
    examples: Sequence[Example] = ()
    quality: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    #: one-line statements a reader must see (e.g. "the correlation is weak on this model because ...")
    notes: Sequence[str] = ()
    #: open-ended extra information (anything that fits no section); never compared
    extra: Mapping[str, Any] = field(default_factory=dict)

    # ---- views -----------------------------------------------------------------------------------

    @property
    def schema_major(self) -> int:
        return _major(self.schema_version)

    def policies(self) -> list[str]:
        """Policy names in report order: ``prediction.policies`` first, then any others seen."""
        seen: dict[str, None] = {}
        for p in [*self.prediction.policies, *self.settings.mitigations]:
            seen.setdefault(str(p), None)
        for table in (self.measured, self.predicted, self.bounds, self.quality):
            for p in table:
                seen.setdefault(p, None)
        return [p for p in seen if any(p in t for t in (self.measured, self.predicted, self.bounds, self.quality))]

    def section(self, name: str) -> Mapping[str, Mapping[str, Any]]:
        """A number section by name (``bounds``, ``measured``, ``predicted``, ``quality``)."""
        if name not in NUMBER_SECTIONS:
            raise KeyError(name)
        return getattr(self, name)

    def se(self, section: str, policy: str, key: str) -> float | None:
        """Standard error of ``section.policy.key`` if the report has one."""
        v = self.stderr.get(section, {}).get(policy, {}).get(key)
        return v if isinstance(v, (int, float)) else None

    # ---- (de)serialisation -----------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "schema_version": self.schema_version,
            "tool": self.tool.to_dict(),
            "model": self.model.to_dict(),
            "environment": self.environment.to_dict(),
            "settings": self.settings.to_dict(),
            "prompts": self.prompts.to_dict(),
            "matrix": self.matrix.to_dict(),
            "bounds": _plain(self.bounds),
            "spectrum": {p: [[float(z[0]), float(z[1])] for z in eig] for p, eig in self.spectrum.items()},
            "measured": _plain(self.measured),
            "predicted": _plain(self.predicted),
            "stderr": _plain(self.stderr),
            "prediction": self.prediction.to_dict(),
            "loop_map": self.loop_map.to_dict(),
            "attribution": None if self.attribution is None else self.attribution.to_dict(),
            "examples": [e.to_dict() for e in self.examples],
            "quality": _plain(self.quality),
            "notes": [str(n) for n in self.notes],
            "extra": _plain(self.extra),
        }
        return out

    def to_json(self) -> str:
        """Deterministic JSON text (sorted keys, 2-space indent, ``"inf"`` for infinities)."""
        return dumps_json(self.to_dict())

    @classmethod
    def from_dict(cls, data: Any) -> "Report":
        """Build a Report from a parsed ``report.json``; raises ``BadInputError`` on a bad layout."""
        if not isinstance(data, Mapping):
            raise BadInputError("a report must be a JSON object with a 'schema_version'")
        version = data.get("schema_version")
        major = _major(version)
        if major != SCHEMA_MAJOR:
            raise BadInputError(
                f"report schema version {version!r} is not supported (this repdiag reads {SCHEMA_MAJOR}.x): "
                "regenerate the report with this repdiag version"
            )
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown and _minor(version) <= _minor(SCHEMA_VERSION):
            raise BadInputError(f"report has unknown top-level section(s) {', '.join(unknown)}: not a repdiag report?")
        kwargs: dict[str, Any] = {"schema_version": str(version)}
        for name, typ in _SECTION_TYPES.items():
            if name in data:
                kwargs[name] = typ.from_dict(data[name], name)
        for name in NUMBER_SECTIONS:
            if name in data:
                kwargs[name] = _number_table(data[name], name)
        if "stderr" in data:
            se = data["stderr"]
            if not isinstance(se, Mapping):
                raise BadInputError("report section 'stderr' must be an object")
            kwargs["stderr"] = {k: _number_table(v, f"stderr.{k}") for k, v in se.items()}
        if "spectrum" in data:
            kwargs["spectrum"] = _spectrum(data["spectrum"])
        if data.get("attribution") is not None:
            kwargs["attribution"] = Attribution.from_dict(data["attribution"], "attribution")
        if "examples" in data:
            ex = data["examples"]
            if not isinstance(ex, list):
                raise BadInputError("report section 'examples' must be a list")
            kwargs["examples"] = tuple(Example.from_dict(e, "examples[]") for e in ex)
        if "notes" in data:
            kwargs["notes"] = tuple(str(n) for n in (data["notes"] or ()))
        if "extra" in data:
            if not isinstance(data["extra"], Mapping):
                raise BadInputError("report section 'extra' must be an object")
            kwargs["extra"] = dict(data["extra"])
        return cls(**kwargs)

    @classmethod
    def from_json(cls, text: str, *, source: str = "report") -> "Report":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise BadInputError(
                f"{source} is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg}): "
                "regenerate it with `repdiag analyze`"
            ) from None
        return cls.from_dict(data)

    def replace(self, **changes: Any) -> "Report":
        """A copy with some fields changed (frozen dataclass)."""
        return dataclasses.replace(self, **changes)


def _spectrum(value: Any) -> dict[str, list[list[float]]]:
    if not isinstance(value, Mapping):
        raise BadInputError("report section 'spectrum' must be an object policy -> [[re, im], ...]")
    out: dict[str, list[list[float]]] = {}
    for policy, eig in value.items():
        if not isinstance(eig, list) or not all(
            isinstance(z, (list, tuple)) and len(z) == 2 and all(isinstance(c, (int, float)) for c in z) for z in eig
        ):
            raise BadInputError(f"report spectrum.{policy} must be a list of [re, im] number pairs")
        out[str(policy)] = [[float(z[0]), float(z[1])] for z in eig]
    return out


def _major(version: Any) -> int:
    if not isinstance(version, str) or not re.fullmatch(r"\d+\.\d+", version):
        raise BadInputError(
            f"report has no valid schema_version (found {version!r}, expected \"MAJOR.MINOR\"): not a repdiag report?"
        )
    return int(version.split(".")[0])


def _minor(version: Any) -> int:
    return int(str(version).split(".")[1]) if isinstance(version, str) and "." in version else 0


# --------------------------------------------------------------------------------------------------
# files
# --------------------------------------------------------------------------------------------------


def timings_path_for(report_path: str | Path) -> Path:
    """The sidecar of ``report.json`` is ``timings.json``; of ``X.json`` it is ``X.timings.json``."""
    report_path = Path(report_path)
    if report_path.name == "report.json":
        return report_path.with_name("timings.json")
    return report_path.with_name(f"{report_path.stem}.timings.json")


def save_report(report: Report, path: str | Path, *, timings: Mapping[str, float] | None = None) -> Path:
    """Write ``report.json`` atomically and deterministically; timings (seconds) to the sidecar."""
    path = Path(path)
    write_text(path, report.to_json())
    if timings is not None:
        write_json(timings_path_for(path), {"seconds": {k: float(v) for k, v in timings.items()}})
    return path


def load_report(path: str | Path, *, what: str = "report") -> Report:
    """Read and check a ``report.json``; every problem is a one-line ``BadInputError`` (exit 2)."""
    path = Path(path)
    if not path.exists():
        raise BadInputError(f"{what} {str(path)!r} does not exist: check the path")
    if path.is_dir():
        raise BadInputError(f"{what} {str(path)!r} is a folder: pass the report.json inside it")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise BadInputError(f"{what} {str(path)!r} cannot be read ({exc.__class__.__name__}): check the file") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BadInputError(
            f"{what} {str(path)!r} is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg}): "
            "regenerate it with `repdiag analyze`"
        ) from None
    try:
        return Report.from_dict(data)
    except BadInputError as exc:
        raise BadInputError(f"{what} {str(path)!r}: {exc.message}") from None


def schema() -> dict[str, Any]:
    """The JSON Schema of ``report.json`` (``repdiag/report/schema.json``)."""
    from importlib import resources

    return json.loads(resources.files("repdiag.report").joinpath("schema.json").read_text(encoding="utf-8"))


def validate_report_dict(data: Any) -> None:
    """Validate a parsed report against ``schema.json`` (needs ``jsonschema``, a test extra)."""
    try:
        import jsonschema
    except ImportError as exc:  # pragma: no cover - jsonschema is in the test extra
        from ..errors import MissingExtraError

        raise MissingExtraError("validating against the schema needs jsonschema: pip install 'repdiag[test]'") from exc
    jsonschema.Draft202012Validator(schema()).validate(data)
