"""A stage's inputs and the one skip rule every stage (prune included) goes through.

Inputs: {"parent": sha256 of the parent artifact or None, "teacher": sha256 (distill),
"weights": sha256 of Darknet .weights a model was initialised from, "source": sha256 of the file
an adopted baseline is a copy of, "config": the resolved config sections the stage `reads`
(stages.py), less the keys that only say where or how fast (`_IGNORED`)}. They are recorded in
the artifact (`inputs`, also in last.pt) and in metrics.json.

The rule (`reuse_complete`): a stage is complete when its artifact and the metrics.json beside it
exist (metrics.json is written last). A complete stage is reused only if its recorded inputs equal
the current ones. If they differ, nothing is run and nothing is thrown away: one error line names
what changed, and `--force` (redo it, replacing the result) or another experiment name is the
user's choice -- a finished long stage is never silently discarded, a stale one never reused.
An incomplete stage runs; it resumes from last.pt only if last.pt has the same inputs
(`check_resume`). Artifacts of older versions record no inputs: their `parent`, distill teacher
and `config` are compared instead (what they do record), and a notice says so. A setting the
recorded config lacks (added to the package after the stage ran) counts as unchanged while it is
at its default: the rule for adding a setting is that its default keeps the old behaviour.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .artifacts import file_sha256, load_artifact
from .errors import YoloCompressError
from .stages import get_stage

__all__ = ["stage_inputs", "artifact_inputs", "recorded_inputs", "describe_changes",
           "reuse_complete", "check_resume", "artifact_complete"]

# where a run writes, on which device, how often it logs, how many loader processes, whether
# images are cached, model.weights (the parent's / the weights file's sha256 stands for it) and
# sparse.check (read after the stage, by the pipeline): not inputs of the result (a run
# interrupted on one machine may be resumed on another)
_IGNORED = {"train": ("out_dir", "device", "log_interval"), "data": ("workers", "cache_images"),
            "model": ("weights",), "sparse": ("check",)}


def _sections(config_dict: dict, stage: str) -> dict:
    out = {}
    for name in get_stage(stage).reads:
        section = dict(config_dict.get(name) or {})
        for key in _IGNORED.get(name, ()):
            section.pop(key, None)
        out[name] = section
    return out


def stage_inputs(config: Any, stage: str, parent: str | None = None, teacher: str | None = None,
                 source: str | None = None) -> dict:
    """The current inputs of `stage` under `config` (sha256s given by the caller). A model
    initialised from the config (no parent) also records the sha256 of its Darknet weights."""
    if source is not None:      # an adopted copy: the file is the whole input
        return {"source": source}
    inputs: dict[str, Any] = {"parent": parent, "config": _sections(config.to_dict(), stage)}
    if teacher is not None:
        inputs["teacher"] = teacher
    weights = config.weights_path
    if parent is None and weights is not None and weights.suffix != ".pt" and weights.is_file():
        inputs["weights"] = file_sha256(weights)
    return inputs


def artifact_inputs(art: dict, stage: str) -> tuple[dict, bool]:
    """(inputs, recorded): the artifact's own record, else what an older artifact shows."""
    if "inputs" in art:
        return art["inputs"], True
    legacy = {"parent": art.get("parent"), "config": _sections(art.get("config") or {}, stage)}
    teacher = ((art.get("distill") or {}).get("teacher") or {}).get("sha256")
    if teacher:
        legacy["teacher"] = teacher
    return legacy, False


def recorded_inputs(best: Path, stage: str) -> tuple[dict, bool]:
    """The inputs a complete stage at `best` was made from (metrics.json, else the artifact)."""
    try:
        metrics = json.loads((best.parent / "metrics.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise YoloCompressError(f"{best.parent / 'metrics.json'}: unreadable ({e})") from e
    if isinstance(metrics, dict) and "inputs" in metrics:
        return metrics["inputs"], True
    if isinstance(metrics, dict) and "adopted_from" in metrics:    # its sha256 is the source's
        return {"source": metrics.get("sha256")}, True
    return artifact_inputs(load_artifact(best, check=False), stage)


def _flat(d: Any, prefix: str = "") -> dict:
    if not isinstance(d, dict):
        return {prefix: d}
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


# settings added with a default that changes what a stage does: what a record made before the
# key existed was made with (a missing key otherwise means the default)
_BEFORE_KEY = {"prune.reconstruct": 0}


def _defaults() -> dict:
    """{"section.key": the value a record without that key was made with}: the config
    dataclasses' defaults, but _BEFORE_KEY's."""
    from .config import Config
    return {**_flat(Config().to_dict()), **_BEFORE_KEY}


def _short(sha: Any) -> str:
    return sha[:12] if isinstance(sha, str) else str(sha)


def describe_changes(recorded: dict, current: dict, known: bool = True) -> list[str]:
    """What differs, one phrase per input; with `known` False only the recorded keys count."""
    if ("source" in recorded) != ("source" in current):
        return ["it was adopted from a file, now it would be trained" if "source" in recorded
                else "it was trained, now it would be adopted from a file"]
    keys = [k for k in ("source", "parent", "teacher", "weights")
            if k in recorded or (known and k in current)]
    out = [f"{k} sha256 {_short(recorded.get(k))} -> {_short(current.get(k))}"
           for k in keys if recorded.get(k) != current.get(k)]
    old, new = _flat(recorded.get("config", {})), _flat(current.get("config", {}))
    defaults = _defaults()
    added = [k for k in new if k not in old and (k not in defaults or new[k] != defaults[k])]
    for key in (list(old) + added if known else list(old)):
        if old.get(key, "<unset>") != new.get(key, "<unset>"):
            out.append(f"{key} {old.get(key, '<unset>')!r} -> {new.get(key, '<unset>')!r}")
    return out


def artifact_complete(path: Path) -> bool:
    """The artifact and the metrics.json beside it both exist."""
    return path.is_file() and (path.parent / "metrics.json").is_file()


def _refuse_changes(recorded: dict, current: dict, known: bool, what: str, advice: str) -> None:
    """One error line `<what> other inputs (<first three changes>); <advice>` if any differ."""
    changes = describe_changes(recorded, current, known)
    if changes:
        more = f"; and {len(changes) - 3} more" if len(changes) > 3 else ""
        raise YoloCompressError(f"{what} other inputs ({'; '.join(changes[:3]) + more}); {advice}")


def reuse_complete(stage: str, best: Path, current: dict, force: bool = False) -> bool:
    """True if `best` is the complete `stage` made from `current` (skip it); False if it must
    run (forced, or not complete). A complete stage with other inputs is an error naming them."""
    if force or not artifact_complete(best):
        return False
    recorded, known = recorded_inputs(best, stage)
    _refuse_changes(recorded, current, known, f"{best}: the complete {stage} stage was made from",
                    "--force redoes it (replacing it), or set another experiment name")
    if not known:
        print(f"{stage}: {best} records no inputs (written by an older version); its parent and "
              f"config match the current ones")
    print(f"{stage}: {best} is complete, skipping (use --force to run it again)")
    return True


def check_resume(last: Path, art: dict, stage: str, current: dict) -> None:
    """An error unless the interrupted run in `last` (its artifact `art`) has `current` inputs."""
    recorded, known = artifact_inputs(art, stage)
    _refuse_changes(recorded, current, known, f"{last}: an interrupted run from",
                    "move it away or use --force to start over")
