"""The ``pretrain`` command: contrastive pre-training on labelled datasets whose label sets differ.

Order of work (nothing is written before every input has been checked):
method settings -> datasets -> shared class vocabulary -> preprocessing ->
run folder -> network -> the method's objective and sample stream -> trainer.

A method is a module of :mod:`ContrastiveSegLib.methods` with

* ``DEFAULTS``: every setting of the method with its default (saved in
  ``config.json`` under ``"method"``, each overridable with ``--set KEY=VALUE``);
* ``TRAINS_DECODER`` (optional, default False): whether its loss goes through
  the decoder; if not, only the encoder is trained;
* ``check(config, sources)`` (optional): raises ``InputError`` for bad
  method-specific input, called before the run folder is written;
* ``build(config, backbone, sources, length) -> (objective, dataset)``: the
  trainer's objective (``forward(batch) -> (loss, logs)``, holding
  ``.backbone``) and a map-style dataset whose item ``i`` is sample ``i`` of
  the run, drawn from ``numpy.random.default_rng([seed, i])`` so ``--resume``
  continues exactly.

The checkpoint (``RUN/checkpoints/last.pt``, kind ``"pretrain"``) feeds
``finetune --init`` and ``selftrain --init``, which load its encoder.
"""

from __future__ import annotations

import importlib
import json
from typing import Any, Callable, Dict, Iterable, Mapping, Optional

import torch

from .config import RunConfig, resumed_config, software_versions
from .data.catalog import load_datasets
from .data.labels import output_label_map
from .data.preprocess import CasePreparer
from .data.sources import prepare_sources, vocabulary
from .engine.device import DistributedContext, distributed
from .engine.events import EventLog
from .engine.runfolder import RunFolder, check_writable_folder, write_json_atomic
from .engine.trainer import Trainer
from .errors import InputError
from .finetune import prepare_intensity_statistics
from .models import build_backbone

METHODS = {"mixcl": "ContrastiveSegLib.methods.mixcl", "gcl": "ContrastiveSegLib.methods.gcl"}


def method_module(name: str):
    if name not in METHODS:
        raise InputError(f"unknown pre-training method {name!r}", path="--method",
                         fix=f"choose one of {', '.join(sorted(METHODS))}")
    return importlib.import_module(METHODS[name])


def parse_setting(text: str, defaults: Mapping[str, Any], method: str):
    """``KEY=VALUE`` -> ``(key, value)`` typed like the default (JSON for lists and null)."""
    key, sep, raw = text.partition("=")
    key = key.strip().replace("-", "_")
    if not sep or key not in defaults:
        known = ", ".join(f"{k}={json.dumps(v)}" for k, v in defaults.items())
        raise InputError(f"{text!r} is not a setting of {method}", path="--set",
                         details=f"settings and defaults: {known}", fix="write --set KEY=VALUE with a key listed above")
    default = defaults[key]
    raw = raw.strip()
    try:
        if isinstance(default, bool):
            if raw.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError
            value: Any = raw.lower() in ("true", "1", "yes")
        elif isinstance(default, int):
            value = int(raw)
        elif isinstance(default, float):
            value = float(raw)
        elif isinstance(default, (list, tuple)):
            value = json.loads(raw) if raw.startswith("[") else [v.strip() for v in raw.split(",") if v.strip()]
        elif default is None:
            value = None if raw.lower() in ("", "none", "null") else json.loads(raw) if raw[:1] in "[{" else _number_or_text(raw)
        else:
            value = raw
    except ValueError:
        raise InputError(f"{raw!r} is not a valid value for {key} (default {json.dumps(default)})",
                         path="--set") from None
    return key, value


def _number_or_text(raw: str):
    for kind in (int, float):
        try:
            return kind(raw)
        except ValueError:
            pass
    return raw


def merge_settings(defaults: Mapping[str, Any], name: str, overrides: Iterable[str] = (),
                   explicit: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """``defaults`` updated with ``--set KEY=VALUE`` strings, then explicit (typed) values; None keeps a default."""
    settings = dict(defaults)
    for text in overrides:
        key, value = parse_setting(text, defaults, name)
        settings[key] = value
    for key, value in (explicit or {}).items():
        if value is not None:
            if key not in defaults:
                raise InputError(f"{key} is not a setting of {name}", path="command line")
            settings[key] = value
    settings["name"] = name
    return settings


def method_settings(name: str, overrides: Iterable[str] = (), **explicit) -> Dict[str, Any]:
    """The method's ``DEFAULTS`` updated with ``--set`` strings and explicit (already typed) values."""
    return merge_settings(method_module(name).DEFAULTS, name, overrides, explicit)


def freeze_untrained(backbone: torch.nn.Module, trains_decoder: bool) -> None:
    """Stop gradients to the parts of the network a pre-training method does not use.

    The class-logit head is never used in pre-training, and the decoder only by
    methods that declare ``TRAINS_DECODER = True`` (MixCL's reconstruction).
    DistributedDataParallel requires every trainable parameter to get a gradient
    each step, and frozen ones are also skipped by the optimiser.
    """
    encoder = tuple(backbone.encoder_parameter_prefixes())
    head = tuple(backbone.segmentation_head_prefixes())
    for name, parameter in backbone.named_parameters():
        if name.startswith(head) or (not trains_decoder and not name.startswith(encoder)):
            parameter.requires_grad_(False)


def run_pretrain(config: RunConfig, out: str, resume: bool = False, events_stdout: bool = False,
                 listeners: Iterable[Callable[[dict], None]] = (), progress: bool = True) -> Dict:
    """Pre-train as ``config`` says (``config.method["name"]`` picks the method), into the run folder ``out``."""
    run = RunFolder(out)
    if resume:
        config = resumed_config(run.read_json(run.config), config)
    with distributed(config.device) as context:
        return _pretrain(config, run, context, resume, events_stdout, listeners, progress)


def _pretrain(config: RunConfig, run: RunFolder, context: DistributedContext, resume: bool, events_stdout: bool,
              listeners, progress: bool) -> Dict:
    config.command = "pretrain"
    config.versions = software_versions()
    name = config.method.get("name")
    module = method_module(name)
    settings = dict(module.DEFAULTS)
    settings.update(config.method)
    config.method = settings
    if not config.data.datasets:
        raise InputError("no pre-training data given", path="--data",
                         fix="give --data DATASET (a dataset.json or folder), once per dataset")
    datasets = load_datasets(config.data.datasets)
    available = {label for dataset in datasets for label in dataset.label_map}
    unknown = [label for label in config.data.labels if label not in available]
    if unknown:
        raise InputError(f"unknown label name(s): {', '.join(unknown)}", path="--labels",
                         details="\n".join(f"{d.name}: {', '.join(d.label_names())}" for d in datasets),
                         fix="choose names from the lists above, or leave --labels out to use every label")
    names = vocabulary(datasets, config.data.labels)
    if not names:
        raise InputError("the datasets name no labels", path="--data",
                         fix="pre-training needs labelled datasets: give each a labels map")
    if context.is_main:
        check_writable_folder(run.root, what="run folder")

    config.model.out_channels = len(names) + 1
    config.model.validate()
    # ct_zscore: the sources' foreground statistics, computed once and saved with the run's config.
    prepare_intensity_statistics(config, [case for dataset in datasets for case in dataset.cases], names)
    preparer = CasePreparer(config.preprocess, names, pad_to=config.model.patch_size, cache_dir=config.data.cache_dir)
    sources = prepare_sources(datasets, preparer, progress=progress and context.is_main)
    if not sources.cases:
        raise InputError("no case labels any of the chosen organs", path="--data",
                         fix="check the datasets' label files and --labels")
    if hasattr(module, "check"):
        module.check(config, sources)   # method-specific input (e.g. GCL's --meta-csv) fails before anything is written

    run.create()
    events = EventLog(run.events, to_stdout=events_stdout, enabled=context.is_main)
    for listener in listeners:
        events.listeners.append(listener)
    labels = output_label_map(names)
    torch.manual_seed(config.train.seed)  # the initial weights are part of what a seed reproduces
    backbone = build_backbone(config.model)
    length = config.train.max_steps * config.train.batch_size * config.train.grad_accumulation * context.world_size
    objective, dataset = module.build(config, backbone, sources, length)
    freeze_untrained(backbone, trains_decoder=getattr(module, "TRAINS_DECODER", False))
    gradient_log = getattr(objective, "gradient_log", None)
    if gradient_log is not None:
        gradient_log.events = events   # term_gradients events (methods/term_gradients.py)
    if context.is_main:
        write_json_atomic(run.config, config.to_dict())
        write_json_atomic(run.labels, labels)
        for index, dataset_name in enumerate(sources.dataset_names):
            events.message(f"dataset {dataset_name}: {len(sources.by_dataset[index])} case(s), labels "
                           f"{', '.join(sources.dataset_labels(index)) or '(none usable)'}")
        events.message(f"{name} pre-training, settings: " + ", ".join(
            f"{k}={json.dumps(v)}" for k, v in settings.items() if k != "name"))
    trainer = Trainer(run, config, objective, dataset, context, events, kind="pretrain", labels=labels,
                      collate=getattr(module, "collate", None))
    summary = trainer.fit(resume=resume)
    if gradient_log is not None and gradient_log.label_gradient_share() is not None:
        summary["label_gradient_share"] = gradient_log.label_gradient_share()
        events.emit("label_gradients", share=summary["label_gradient_share"],
                    batches=gradient_log.counted_batches, with_gradient=gradient_log.active_batches)
    summary["run_dir"] = run.root
    return summary
