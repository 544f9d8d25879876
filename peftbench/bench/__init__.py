"""Speed and memory benchmark: peftbench's methods against HF PEFT's, on the same model, batch and precision.

    python -m peftbench.bench methods=[lora,lora_fa] model=tiny_llama bench.out=experiments/bench/x.json

For each method (`conf/method/<name>.yaml`, plus `method_overrides`) the run builds a fresh copy of one base
model for peftbench, then one for HF PEFT (`peft_side.py`), each measured alone in its memory window, and
trains both on the same seeded random batch (`bench.batch_size` x `bench.seq_len`, the last
`bench.label_fraction` of every row labelled, like an SFT response). It reports

- step time: forward, backward, optimizer step (plus the method's after-step hook), zero_grad; warm-up
  excluded, `bench.repeats` repeats of `bench.timed_steps` steps, the two sides' repeats interleaved so a
  change in the machine's load hits both, median and spread (`timing.py`);
- tokens/s: the batch's real (attended) tokens per second; with the default batch every position is real
  (padding fraction 0); `bench.min_seq_len` draws row lengths in [min_seq_len, seq_len] instead, a cycle of
  `bench.timed_steps` right-padded batches, batched at random or length-grouped (`bench.group_by_length`:
  the run's `task.group_by_length` sampler), and reports the padding fraction;
- memory: peak, split into weights / gradients / optimizer state / activations (`memory_split.py`);
- nominal model FLOPs per step and, on CUDA with known peak FLOPs, model FLOPs utilisation;
- the ratios peftbench / PEFT.

peftbench's loss is `peftbench.tasks.objectives.target_token_loss` (the output head on the labelled
positions only); PEFT's is `model(input_ids, attention_mask, labels=labels).loss` (full logits). The JSON
(`bench.json` in the Hydra output directory, optionally `bench.out`) states both, with the machine, the
versions, the git commit and the command. `bench.compile` compiles both sides' models in place as the
run's `trainer.compile` does (`peftbench.compiling`); `bench.gradient_checkpointing` is the run's
`model.gradient_checkpointing`, on both sides. `bench.sweep` repeats selected methods over sequence
lengths, ranks and model shapes and plots how the cost grows (`report.py`).
"""

from __future__ import annotations

import contextlib
import logging
import shlex
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from peftbench.bench.batches import batch_info, make_batch, make_batches, widest
from peftbench.bench.measure import RATIO_KEYS, SideRun, bench_method, prime, ratios, summary_values
from peftbench.bench.memory_split import peak_source
from peftbench.bench.peft_side import LOSS_PATH as PEFT_LOSS_PATH
from peftbench.bench.settings import (
    CONF_DIR,
    DEVICES,
    PRECISIONS,
    Settings,
    method_config,
    method_options,
    parse_settings,
    resolve_methods,
)
from peftbench.bench.sides import PEFTBENCH_LOSS_PATH, PretrainedDir, build_context, build_ours
from peftbench.bench.sweeps import SWEEP_AXES, check_sweep, load_model_config, run_sweeps
from peftbench.bench.timing import ModelShape, model_flops

SCHEMA_VERSION = 1


@dataclass
class BenchRun:
    """Everything one `run_bench` produced: the JSON payload and where it was written."""

    payload: dict[str, Any]
    paths: list[Path] = field(default_factory=list)


def _settings_dict(settings: Settings) -> dict[str, Any]:
    import dataclasses

    data = dataclasses.asdict(settings)
    data["device"] = str(settings.device)
    data["dtype"] = str(settings.dtype).removeprefix("torch.")
    data["autocast"] = (
        str(settings.autocast_dtype).removeprefix("torch.") if settings.autocast_dtype else None
    )
    return data


def run_bench(
    cfg: DictConfig, out_dir: Path, log: Callable[[str], None] | None = None, console: Any = None
) -> BenchRun:
    """Validate, run every method on both sides, write `bench.json` (+ plots) and print the tables."""
    from peftbench.bench import report
    from peftbench.models import load_model

    log = log or _progress
    settings = parse_settings(cfg)
    methods = resolve_methods(cfg, r=settings.r)
    sweep = check_sweep(cfg)
    if settings.threads is not None:
        torch.set_num_threads(settings.threads)
    started = time.perf_counter()
    machine = report.machine_info(settings.device)
    with _quiet_transformers():
        base, _tokenizer = load_model(cfg.model)
        base.requires_grad_(False)
        shape = ModelShape.of(base)
        batch = make_batches(base.config.vocab_size, settings)
        pretrained = PretrainedDir(base, cfg.model)
        results = []
        try:
            log(f"priming: one discarded step of {methods[0].name} on both sides")
            prime(methods[0], base, batch, settings, shape, pretrained)
            for method in methods:
                log(f"bench {method.name}: peftbench and HF PEFT, timed repeats interleaved")
                results.append(bench_method(method, base, batch, settings, shape, pretrained))
        finally:
            pretrained.cleanup()
        sweeps = run_sweeps(cfg, sweep, base, settings, log) if sweep["enabled"] else {}
    machine["load_average_end"] = report.load_average()
    payload = {
        "schema_version": SCHEMA_VERSION,
        "command": shlex.join(["python", "-m", "peftbench.bench", *sys.argv[1:]]),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine,
        "model": {
            "name": str(cfg.model.name),
            "name_or_path": str(cfg.model.name_or_path),
            "params": shape.total_params,
            "linear_params": shape.linear_params,
            "layers": shape.layers,
            "vocab_size": shape.vocab_size,
        },
        "settings": _settings_dict(settings),
        "batch": batch_info(batch, settings),
        "loss_path": {"peftbench": PEFTBENCH_LOSS_PATH, "peft": PEFT_LOSS_PATH},
        "memory_method": {
            "peak": peak_source(settings.device),
            "peak_bytes": "peak over the measured step and the warm-up steps minus the memory held before "
            "the model copy was built (the other side's model, idle, is below that baseline)",
            "activation_bytes": "autograd saved tensors of one forward (saved_tensors_hooks), each storage "
            "once, the model's own weights excluded (under gradient checkpointing, what checkpointed layers "
            "recompute is not saved and not counted)",
            "weights_bytes": "peftbench.models.parameter_bytes (parameters, buffers, quantization stats)",
            "grad_bytes": ".grad of every parameter after backward",
            "optimizer_state_bytes": "tensors in optimizer.state after a step",
            "priming": "before the first row, one discarded build and step of the first method on both sides",
        },
        "flops_method": model_flops.__doc__ and " ".join(model_flops.__doc__.split()),
        "results": results,
        "sweeps": sweeps,
        "wall_s": time.perf_counter() - started,
    }
    paths = report.write_outputs(payload, out_dir, settings.out, plot=settings.plot)
    report.print_report(payload, console=console)
    return BenchRun(payload, paths)


def _progress(message: str) -> None:
    """A progress line on stderr (a full CPU benchmark takes tens of minutes) and in the run's log file."""
    logging.getLogger("peftbench.bench").info(message)
    print(message, file=sys.stderr, flush=True)


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """No weight-loading progress bars in the benchmark's output."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:  # pragma: no cover
        yield
        return
    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


__all__ = [
    "CONF_DIR",
    "DEVICES",
    "PEFTBENCH_LOSS_PATH",
    "PRECISIONS",
    "RATIO_KEYS",
    "SCHEMA_VERSION",
    "SWEEP_AXES",
    "BenchRun",
    "ModelShape",
    "PretrainedDir",
    "Settings",
    "SideRun",
    "batch_info",
    "bench_method",
    "build_context",
    "build_ours",
    "check_sweep",
    "load_model_config",
    "make_batch",
    "make_batches",
    "method_config",
    "method_options",
    "parse_settings",
    "prime",
    "ratios",
    "resolve_methods",
    "run_bench",
    "run_sweeps",
    "summary_values",
    "widest",
]
