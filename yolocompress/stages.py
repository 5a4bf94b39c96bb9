"""The stage registry: one `Stage` object per artifact stage, the single place a stage is declared.

A stage names its artifact `stage`, the parent stages it accepts, the config section it owns and
the sections its result depends on (`reads`: recorded as its inputs, see inputs.py), the plots
its folder gets, whether it is a pipeline step (registry order is pipeline order; `switch`: a
bool config key that turns an optional step on) and which files of its folder the pipeline report
scores (`report_files`; default the step's result), whether it is a benchmark recovery, and its
`yolocompress` sub-command (options + the `module:function` that runs it, so this module imports
nothing heavy). artifacts (valid stages), pipeline (order, plots, steps),
prune (source stages), bench (recovered stages), config (bench arm recoveries) and cli (stage
sub-commands) all read this table: adding a stage is its module plus one `register(Stage(...))`.

A stage module provides `<entry>(config, args) -> Path` for its command, for a training stage
`<build>(config, data, **sources) -> (config, StageParts)` (its model, criterion wrapper, hooks,
artifact extras: train.run), and for a pipeline step `<step>(config, paths, force,
latency_iters) -> Path` (paths: the earlier steps' best.pt).
"""
from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .errors import YoloCompressError

__all__ = ["Option", "Stage", "STAGES", "register", "get_stage", "stage_names",
           "pipeline_stages", "switched_on", "switch_hint", "recovery_stages", "recovered_stage",
           "resolve", "batch_sizes", "Arm", "ARMS"]


@dataclass(frozen=True)
class Option:
    """One argparse option of a stage command: `parser.add_argument(*flags, **kwargs)`."""
    flags: tuple[str, ...]
    kwargs: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Stage:
    name: str                               # the artifact's `stage`; runs/<name>/<stage>/
    parents: tuple[str, ...] | None = ()    # accepted parent stages; None: any stage
    section: str | None = None              # the config section it owns (e.g. "sparse")
    reads: tuple[str, ...] = ()             # config sections its result depends on
    plots: tuple[str, ...] = ()             # files in its folder linked from reports
    pipeline_step: str | None = None        # "module:function" of its pipeline step
    switch: str | None = None               # "section.key" (a bool) or "section.key=value"
    #                                         that turns that step on; None: it always runs
    report_files: tuple[str, ...] = ()      # files in its folder the pipeline report scores, in
    #                                         order; (): the step's result
    recovery: str | None = None             # bench arm recovery name that produces it
    command: str | None = None              # its `yolocompress` sub-command
    help: str = ""
    config_help: str = "experiment YAML"
    example: str = "train.epochs=5"         # an override shown in --help
    options: tuple[Option, ...] = ()
    entry: str | None = None                # "module:function" (config, args) -> Path
    build: str | None = None                # training stages: "module:function"
    #                                         (config, data, **sources) -> (config, StageParts)
    warn_parents: tuple[str, ...] = ()      # accepted with a warning

    def accepts(self, parent_stage: str) -> bool:
        return self.parents is None or parent_stage in self.parents


STAGES: dict[str, Stage] = {}


def register(stage: Stage) -> Stage:
    if stage.name in STAGES:
        raise YoloCompressError(f"stage '{stage.name}' is registered twice")
    STAGES[stage.name] = stage
    return stage


def get_stage(name: str) -> Stage:
    if name not in STAGES:
        raise YoloCompressError(f"unknown stage '{name}' (one of {', '.join(STAGES)})")
    return STAGES[name]


def stage_names() -> tuple[str, ...]:
    return tuple(STAGES)


def pipeline_stages(config: Any = None) -> tuple[Stage, ...]:
    """The stages with a pipeline step, in order; with a `config`, only those switched on."""
    return tuple(s for s in STAGES.values() if s.pipeline_step
                 and (config is None or switched_on(s, config)))


def switched_on(stage: Stage, config: Any) -> bool:
    """Whether `stage`'s pipeline step runs under `config`: its `switch` key, if any, is true, or
    (for "section.key=value") has that value."""
    if stage.switch is None:
        return True
    name, eq, value = stage.switch.partition("=")
    section, _, key = name.partition(".")
    setting = getattr(getattr(config, section), key)
    return str(setting) == value if eq else bool(setting)


def switch_hint(stage: Stage) -> str:
    """The override that turns `stage`'s switched step on ("pipeline.quantize=true")."""
    return stage.switch if "=" in (stage.switch or "") else f"{stage.switch}=true"


def recovery_stages() -> dict[str, Stage]:
    """bench recovery name -> the stage it produces."""
    return {s.recovery: s for s in STAGES.values() if s.recovery}


def recovered_stage(config: Any) -> str:
    """The stage the pipeline's recovery after pruning produces (`pipeline.recovery`: finetune ->
    finetuned, distill -> distilled)."""
    return recovery_stages()[config.pipeline.recovery].name


def resolve(ref: str) -> Callable[..., Any]:
    """The function a "module:function" reference names."""
    module, _, name = ref.partition(":")
    return getattr(importlib.import_module(module), name)


def batch_sizes(text: str) -> list[int]:
    """argparse type of a comma-separated list of batch sizes (`1,8`)."""
    import argparse

    try:
        sizes = [int(v) for v in text.split(",")]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"expected batch sizes like 1,8, got {text!r}")
    return sizes


_TRAIN_READS = ("model", "data", "train", "augment", "eval")
_FROM_TRAINED = Option(("--from",), {"dest": "from_artifact", "metavar": "ARTIFACT",
                                     "help": "start from this artifact, e.g. "
                                             "runs/<name>/baseline/best.pt (default: "
                                             "model.weights)"})
_STUDENT = Option(("--student",), {"required": True,
                                   "help": "pruned artifact, e.g. runs/<name>/pruned/best.pt"})

register(Stage("imported", help="an AlexeyAB cfg (+ weights) as an artifact (import-darknet)"))
register(Stage(
    "baseline", parents=None, reads=_TRAIN_READS,
    plots=("training_curves.png", "pr_curves.png"),
    pipeline_step="yolocompress.pipeline:baseline_step", command="train",
    help="train a detector (the baseline) from an experiment YAML",
    config_help="experiment YAML, e.g. cfg/experiments/demo.yaml",
    entry="yolocompress.train.run:train_command", build="yolocompress.train.run:build_baseline"))
register(Stage(
    "sparse", parents=("imported", "baseline", "sparse"), section="sparse",
    reads=_TRAIN_READS + ("sparse",),
    plots=("training_curves.png", "gamma_histograms.png", "pr_curves.png"),
    pipeline_step="yolocompress.compress.sparse_stage:pipeline_step", command="sparse",
    help="stage 1: sparse training of the prunable BN gammas (L1)",
    config_help="experiment YAML (its `sparse` section)", example="sparse.s=1e-4",
    options=(_FROM_TRAINED,),
    entry="yolocompress.compress.sparse_stage:command",
    build="yolocompress.compress.sparse_stage:build_sparse"))
register(Stage(
    "pruned", parents=("sparse", "baseline", "imported", "finetuned"),
    warn_parents=("baseline", "imported"),
    section="prune", reads=("model", "data", "train", "eval", "prune"),
    plots=("channels_kept.png", "gamma_thresholds.png", "pr_curves.png"),
    pipeline_step="yolocompress.compress.prune_stage:pipeline_step", command="prune",
    help="stage 2: group channel pruning of a sparse-trained artifact",
    config_help="experiment YAML (its `prune` section)", example="prune.budget_target=flops",
    options=(
        Option(("--from",), {"dest": "from_artifact", "metavar": "ARTIFACT",
                             "help": "the artifact to prune (default: runs/<name>/sparse/"
                                     "best.pt)"}),
        Option(("--out",), {"help": "pruned artifact (default: runs/<name>/pruned/best.pt); "
                                    "metrics.json, report.md and plots go beside it"}),
        Option(("--latency-iters",), {"type": int, "default": 20,
                                      "help": "timed CPU forward passes per batch size, before "
                                              "and after (0: skip)"}),
        Option(("--latency-batches",), {"type": batch_sizes, "default": [1, 8],
                                        "metavar": "B[,B...]",
                                        "help": "batch sizes of the latency measurement "
                                                "(default: 1,8)"}),
        Option(("--latency-threads",), {"type": int, "default": 1,
                                        "help": "torch threads while timing (default 1, the most "
                                                "repeatable; 0: torch's default)"})),
    entry="yolocompress.compress.prune_stage:command"))
register(Stage(
    "distilled", parents=("pruned",), section="distill", reads=_TRAIN_READS + ("distill",),
    plots=("training_curves.png", "pr_curves.png"),
    pipeline_step="yolocompress.compress.distill_stage:pipeline_step",
    switch="pipeline.recovery=distill", recovery="distill",
    command="distill", help="stage 3: spatial-attention distillation into a pruned model",
    config_help="experiment YAML (its `distill` section)", example="distill.fg_mask=true",
    options=(_STUDENT, Option(("--teacher",), {"help": "teacher artifact (default: the student's "
                                                       "parent, the sparse model)"})),
    entry="yolocompress.compress.distill_stage:distill_command",
    build="yolocompress.compress.distill_stage:build_distill"))
register(Stage(
    "finetuned", parents=("pruned",), section="distill", reads=_TRAIN_READS + ("distill",),
    plots=("training_curves.png", "pr_curves.png"),
    pipeline_step="yolocompress.compress.distill_stage:finetune_step",
    switch="pipeline.recovery=finetune", recovery="finetune",
    command="finetune", help="plain fine-tuning of a pruned model (the pipeline's default "
                             "recovery; distillation's control)",
    config_help="experiment YAML (distill.epochs / distill.lr)", example="distill.epochs=10",
    options=(_STUDENT,), entry="yolocompress.compress.distill_stage:finetune_command",
    build="yolocompress.compress.distill_stage:build_finetune"))
register(Stage(
    "scratch", parents=("pruned",), reads=_TRAIN_READS,
    plots=("training_curves.png", "pr_curves.png"), recovery="scratch", command="scratch",
    help="train a pruned architecture from random initialisation (pruning's control)",
    config_help="experiment YAML (the train section: epochs, lr)", example="train.epochs=85",
    options=(Option(("--student",), {"required": True,
                                     "help": "pruned artifact whose architecture is trained, "
                                             "e.g. runs/<name>/pruned/best.pt"}),),
    entry="yolocompress.compress.scratch_stage:command",
    build="yolocompress.compress.scratch_stage:build_scratch"))
register(Stage(
    "quantized", parents=None, section="quantize", reads=("model", "data", "quantize"),
    pipeline_step="yolocompress.compress.quantize_stage:pipeline_step", switch="pipeline.quantize",
    report_files=("model-fp32.onnx", "model-int8.onnx"), command="quantize",
    help="stage 4: INT8 ONNX (ONNX Runtime static quantization) of a model",
    config_help="experiment YAML (its training split and `quantize` section)",
    example="quantize.method=percentile",
    options=(Option(("--from",), {"dest": "from_artifact", "metavar": "MODEL",
                                  "help": "artifact .pt (exported to ONNX first) or an exported "
                                          ".onnx (default: the pipeline's recovered model, "
                                          "runs/<name>/finetuned/best.pt or distilled/)"}),
             Option(("--out",), {"help": "the INT8 model (default: runs/<name>/quantized/"
                                         "model-int8.onnx)"}),
             Option(("--fp32",), {"metavar": "PATH", "help": "also keep the FP32 export of an "
                                                             "artifact here (default: model-fp32"
                                                             ".onnx beside --out)"})),
    entry="yolocompress.compress.quantize_stage:command"))

register(Stage(
    "gated", parents=("imported", "baseline", "sparse"), section="gate",
    reads=_TRAIN_READS + ("gate",),
    plots=("training_curves.png", "channel_usage.png", "pr_curves.png"), command="gate",
    help="FBS dynamic channel gating: per image, keep each prunable conv's most salient channels",
    config_help="experiment YAML (its `gate` section)", example="gate.density=0.5",
    options=(_FROM_TRAINED,),
    entry="yolocompress.compress.gate_stage:command",
    build="yolocompress.compress.gate_stage:build_gate"))


@dataclass(frozen=True)
class Arm:
    """A benchmark arm (bench/arms.py): a pruning method, then a registered stage's recovery."""
    name: str
    pruning: str        # ours (the prune section as configured) | iterative (ours in steps)
    #                     | global | torch_pruning
    recovery: str       # the `recovery` of a registered stage: distill | finetune | scratch;
    #                     or "pipeline": the experiment's pipeline.recovery
    label: str

    def recovery_of(self, config: Any) -> str:
        """The recovery this arm runs under `config`."""
        return config.pipeline.recovery if self.recovery == "pipeline" else self.recovery


ARMS = {a.name: a for a in (
    Arm("ours", "ours", "pipeline", "ours (pipeline defaults, pipeline.recovery)"),
    Arm("ours_finetune", "ours", "finetune", "ours + plain fine-tune"),
    Arm("ours_distill", "ours", "distill", "ours + attention distillation (the method's stage 3)"),
    Arm("ours_iterative", "iterative", "pipeline", "ours in k prunes, fine-tunes between, "
                                                   "+ pipeline.recovery (same total epochs)"),
    Arm("torch_pruning", "torch_pruning", "finetune",
        "Torch-Pruning, BN-scale importance, global + fine-tune"),
    Arm("global", "global", "finetune", "one global |gamma| threshold + fine-tune "
                                        "(network slimming)"),
    Arm("scratch", "ours", "scratch", "ours' architecture from random init, all the epochs "
                                      "(Liu et al. 2019)"),
)}
