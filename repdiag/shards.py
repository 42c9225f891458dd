"""Finished shards on disk (``--shard-dir DIR``), so that an interrupted run resumes where it stopped.

A shard folder holds one job:

* ``DIR/manifest.json``: ``{"format", "version", "job", "fingerprint", "resolved"}``. ``job`` lists what
  the shards depend on (model id / revision / weights, prompts or training examples, the row range or
  training shard layout, the settings, torch's version and thread count); ``fingerprint`` is its
  sha256. ``resolved`` holds choices made once per job (the gradient backend that ``auto`` picked),
  so a resumed run makes the same choice as the run that wrote the first shards.
* ``DIR/<name>.npz``: one finished shard, plain arrays only (loaded with ``allow_pickle=False``), plus a
  ``__fingerprint__`` entry naming the job it belongs to. Every file is written to a temporary name and
  renamed (``repdiag._atomic``), so a killed run leaves whole shards or none.

``per_job=True`` (``repdiag analyze --shard-dir DIR``, which runs several jobs): each job gets its own
subfolder ``DIR/<job folder>/`` holding that job's manifest and shards (:meth:`ShardStore.job`); the
folder names are chosen by the caller (``trace``, ``measure-<policy>``, ``probe-<fingerprint>``).

A rerun with the same DIR loads the shards present and computes the others; the merge is the same
as in an uninterrupted run, so the output is the same bytes. A DIR whose manifest describes another
job is refused (:class:`~repdiag.errors.UsageError`, exit 2): shards are never mixed across jobs.
"""

from __future__ import annotations

import hashlib
import json
import re
import zipfile
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ._atomic import atomic_path, dumps_json, write_json
from .errors import UsageError

__all__ = ["ShardStore", "fingerprint", "pack_probe_shard", "unpack_probe_shard", "pack_trace_job",
           "unpack_trace_job", "pack_generate_shard", "unpack_generate_shard", "FORMAT", "VERSION"]

FORMAT = "repdiag-shards"
VERSION = 1
_FP_KEY = "__fingerprint__"


def fingerprint(job: dict[str, Any]) -> str:
    """sha256 of the job description (deterministic JSON)."""
    return hashlib.sha256(dumps_json(job, indent=None).encode("utf-8")).hexdigest()


def _first_difference(old: Any, new: dict[str, Any]) -> str:
    """The first job field whose value differs (for the error message)."""
    if not isinstance(old, dict):
        return "format"
    for key in sorted(set(old) | set(new)):
        if dumps_json(old.get(key), indent=None) != dumps_json(new.get(key), indent=None):
            return key
    return "fingerprint"


class ShardStore:
    """A folder of finished shards of one job. ``probe_shards``: the probe's shard count per job."""

    def __init__(self, root: str | Path, *, probe_shards: int = 16, per_job: bool = False) -> None:
        self.root = Path(root)
        if self.root.exists() and not self.root.is_dir():
            raise UsageError(f"--shard-dir {str(self.root)!r} is a file: pass a folder")
        self.probe_shards = max(1, int(probe_shards))
        self.per_job = bool(per_job)
        self.fingerprint: str | None = None

    def job(self, folder: str | None) -> "ShardStore":
        """The store of one job: ``self`` (one job per folder), or with ``per_job`` the subfolder ``folder``."""
        if not self.per_job or not folder:
            return self
        if not re.fullmatch(r"[A-Za-z0-9._-]+", folder) or folder in (".", ".."):
            raise ValueError(f"bad job folder name {folder!r}")
        return ShardStore(self.root / folder, probe_shards=self.probe_shards)

    @property
    def manifest_path(self) -> Path:
        return self.root / "manifest.json"

    def begin(self, job: dict[str, Any], resolve: Callable[[], dict[str, Any]] | None = None) -> dict[str, Any]:
        """Open the folder for ``job``; returns the job's ``resolved`` choices.

        A new folder gets a manifest (``resolve()`` is called to make the once-per-job choices); an
        existing manifest must describe the same job, and its stored choices are returned.
        """
        fp = fingerprint(job)
        if self.manifest_path.is_file():
            try:
                old = json.loads(self.manifest_path.read_text(encoding="utf-8"))
            except json.JSONDecodeError:
                old = None
            if not isinstance(old, dict) or old.get("format") != FORMAT or old.get("fingerprint") != fp:
                field = _first_difference(old.get("job") if isinstance(old, dict) else None, job)
                raise UsageError(f"--shard-dir {str(self.root)!r} holds shards of another job (differs in {field!r}): "
                                 "pass an empty folder, or delete this one to start over")
            self.fingerprint = fp
            return dict(old.get("resolved") or {})
        resolved = resolve() if resolve is not None else {}
        write_json(self.manifest_path, {"format": FORMAT, "version": VERSION, "job": job, "fingerprint": fp,
                                        "resolved": resolved})
        self.fingerprint = fp
        return resolved

    def _path(self, name: str) -> Path:
        return self.root / f"{name}.npz"

    def load(self, name: str) -> dict[str, np.ndarray] | None:
        """The arrays of shard ``name`` when it is present and belongs to this job, else ``None``."""
        path = self._path(name)
        if self.fingerprint is None or not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
        except (OSError, ValueError, zipfile.BadZipFile):
            return None  # unreadable: recomputed and rewritten
        if str(arrays.pop(_FP_KEY, "")) != self.fingerprint:
            return None
        return arrays

    def save(self, name: str, arrays: dict[str, np.ndarray]) -> None:
        """Write shard ``name`` atomically (temporary file, then rename)."""
        if self.fingerprint is None:
            raise RuntimeError("ShardStore.begin() must be called before save()")
        with atomic_path(self._path(name), suffix=".npz") as tmp:
            np.savez(tmp, **arrays, **{_FP_KEY: np.array(self.fingerprint)})


def _pack_rows(prefix: str, rows: dict[str, Any], out: dict[str, np.ndarray]) -> None:
    """Flatten one probe shard's rows (ragged top-K tokens / probabilities) into plain arrays."""
    out[f"{prefix}lengths"] = np.array([len(t) for t in rows["tokens"]], dtype=np.int64)
    out[f"{prefix}tokens"] = np.concatenate([np.asarray(t, dtype=np.int64) for t in rows["tokens"]]) \
        if rows["tokens"] else np.zeros(0, dtype=np.int64)
    out[f"{prefix}probs"] = np.concatenate([np.asarray(p, dtype=np.float64) for p in rows["probs"]]) \
        if rows["probs"] else np.zeros(0, dtype=np.float64)
    out[f"{prefix}residual"] = np.asarray(rows["residual"], dtype=np.float64)


def _unpack_rows(prefix: str, arrays: dict[str, np.ndarray]) -> dict[str, Any]:
    """The inverse of :func:`_pack_rows`."""
    cuts = np.cumsum(arrays[f"{prefix}lengths"])[:-1]
    return {"tokens": np.split(arrays[f"{prefix}tokens"], cuts) if len(arrays[f"{prefix}lengths"]) else [],
            "probs": np.split(arrays[f"{prefix}probs"], cuts) if len(arrays[f"{prefix}lengths"]) else [],
            "residual": arrays[f"{prefix}residual"]}


def pack_probe_shard(shard: dict[str, Any]) -> dict[str, np.ndarray]:
    """A :func:`repdiag.transition.probe_shard` result as plain arrays (for :meth:`ShardStore.save`)."""
    out = {"ids": np.asarray(shard["ids"], dtype=np.int64), "shift": np.asarray(shard["shift"], dtype=np.float64),
           "n_per_prompt": np.array(-1 if shard["per_prompt"] is None else len(shard["per_prompt"]))}
    _pack_rows("rows/", shard["rows"], out)
    for j, rows in enumerate(shard["per_prompt"] or []):
        _pack_rows(f"prompt{j}/", rows, out)
    return out


def unpack_probe_shard(arrays: dict[str, np.ndarray]) -> dict[str, Any]:
    """The probe shard that :func:`pack_probe_shard` flattened (same values, same dtypes)."""
    n_pp = int(arrays["n_per_prompt"])
    return {"ids": arrays["ids"], "shift": arrays["shift"], "rows": _unpack_rows("rows/", arrays),
            "per_prompt": None if n_pp < 0 else [_unpack_rows(f"prompt{j}/", arrays) for j in range(n_pp)]}


def _pack_ragged(prefix: str, seqs: list, out: dict[str, np.ndarray]) -> None:
    """Token lists as a flat int64 array plus their lengths."""
    out[f"{prefix}lengths"] = np.array([len(t) for t in seqs], dtype=np.int64)
    out[f"{prefix}tokens"] = np.array([int(t) for seq in seqs for t in seq], dtype=np.int64)


def _unpack_ragged(prefix: str, arrays: dict[str, np.ndarray]) -> list[list[int]]:
    """The token lists of :func:`_pack_ragged` (Python ints)."""
    flat = arrays[f"{prefix}tokens"].tolist()
    out, pos = [], 0
    for n in arrays[f"{prefix}lengths"].tolist():
        out.append(flat[pos:pos + n])
        pos += n
    return out


#: the numpy arrays a trace block may hold (see :func:`repdiag.transition.trace_job`)
_TRACE_ARRAYS = ("ctx", "lse", "sq", "probs", "top_v", "top_i", "eos_p")


def pack_trace_job(blocks: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    """A :func:`repdiag.transition.trace_job` result (blocks of arrays, ``sequences`` dicts, an optional
    ``first`` tuple) as plain arrays; :func:`unpack_trace_job` gives back the same values and types."""
    out: dict[str, np.ndarray] = {"n_blocks": np.array(len(blocks), dtype=np.int64)}
    for j, block in enumerate(blocks):
        p = f"b{j}/"
        unknown = set(block) - {"sequences", "first", *_TRACE_ARRAYS}
        if unknown:  # a new field would be lost silently: refuse instead
            raise ValueError(f"trace block field(s) {sorted(unknown)} cannot be stored in a shard")
        out[f"{p}keys"] = np.array(list(block), dtype=np.str_)  # the block's key order, kept
        seqs = block["sequences"]
        out[f"{p}seq_mode"] = np.array([str(s["mode"]) for s in seqs], dtype=np.str_) if seqs \
            else np.zeros(0, dtype="<U1")
        out[f"{p}seq_prompt"] = np.array([int(s["prompt_index"]) for s in seqs], dtype=np.int64)
        _pack_ragged(f"{p}seq_", [s["tokens"] for s in seqs], out)
        if "first" in block:
            first_sum, first_lse, first_count = block["first"]
            out[f"{p}first_sum"] = np.asarray(first_sum)
            out[f"{p}first_lse"] = np.array(float(first_lse), dtype=np.float64)
            out[f"{p}first_count"] = np.array(int(first_count), dtype=np.int64)
        for key in _TRACE_ARRAYS:
            if key in block:
                out[f"{p}{key}"] = np.asarray(block[key])
    return out


def unpack_trace_job(arrays: dict[str, np.ndarray]) -> list[dict[str, Any]]:
    """The trace job that :func:`pack_trace_job` flattened."""
    blocks = []
    for j in range(int(arrays["n_blocks"])):
        p = f"b{j}/"
        tokens = _unpack_ragged(f"{p}seq_", arrays)
        block: dict[str, Any] = {"sequences": [
            {"mode": str(m), "prompt_index": int(i), "tokens": t}
            for m, i, t in zip(arrays[f"{p}seq_mode"].tolist(), arrays[f"{p}seq_prompt"].tolist(), tokens)]}
        if f"{p}first_sum" in arrays:
            block["first"] = (arrays[f"{p}first_sum"], float(arrays[f"{p}first_lse"]), int(arrays[f"{p}first_count"]))
        for key in _TRACE_ARRAYS:
            if f"{p}{key}" in arrays:
                block[key] = arrays[f"{p}{key}"]
        blocks.append({str(k): block[str(k)] for k in arrays[f"{p}keys"].tolist()})
    return blocks


def _json_exact(x: Any) -> bool:
    """Whether ``json.loads(json.dumps(x))`` gives ``x`` back with the same types (floats: exact repr)."""
    if x is None or type(x) in (bool, int, float, str):
        return True
    if type(x) is list:
        return all(_json_exact(v) for v in x)
    if type(x) is dict:
        return all(type(k) is str and _json_exact(v) for k, v in x.items())
    return False


def pack_generate_shard(part: dict[int, tuple[list, list, list]]) -> dict[str, np.ndarray]:
    """``{batch index: measure.generate_batch(...)}`` as plain arrays: the sequences flat + lengths, the
    terminated flags, and each loop event as its JSON text (``"null"`` for none; Python's JSON writes
    floats exactly and the events hold only JSON values)."""
    out: dict[str, np.ndarray] = {"batches": np.array(sorted(part), dtype=np.int64)}
    for b in sorted(part):
        seqs, term, events = part[b]
        _pack_ragged(f"{b}/", seqs, out)
        out[f"{b}/terminated"] = np.array([bool(t) for t in term], dtype=np.bool_)
        if not all(_json_exact(e) for e in events):  # a value JSON would change (tuple, int key, numpy): refuse
            raise ValueError("a loop event does not survive JSON exactly; it cannot be stored in a shard")
        texts = [json.dumps(e, allow_nan=True) for e in events]
        out[f"{b}/events"] = np.array(texts, dtype=np.str_) if texts else np.zeros(0, dtype="<U1")
    return out


def unpack_generate_shard(arrays: dict[str, np.ndarray]) -> dict[int, tuple[list, list, list]]:
    """The ``{batch index: (sequences, terminated, events)}`` that :func:`pack_generate_shard` flattened."""
    out = {}
    for b in arrays["batches"].tolist():
        seqs = [tuple(t) for t in _unpack_ragged(f"{b}/", arrays)]
        term = [bool(t) for t in arrays[f"{b}/terminated"].tolist()]
        events = [json.loads(t) for t in arrays[f"{b}/events"].tolist()]
        out[int(b)] = (seqs, term, events)
    return out
