"""The ``lit-vlm`` command: LightningCLI (fit / validate / test / predict) plus ``lit-vlm data ...``.

Defaults a researcher expects are built in (TensorBoard under ``runs/``, the resolved config saved
beside each run, samples/s on the progress bar, ``last`` and ``best`` checkpoints written
atomically, learning-rate monitoring, gradient clipping, seed 0, the random state in checkpoints and
a guard against non-finite losses); every one can be overridden from YAML or the command line.
``fit --ckpt_path last`` resumes the newest run in its own directory, mid-epoch included.

Values that must agree between data and model are given once: any ``image_size``,
``vocab_size``, ``context_length``, ``pad_id``, ``tokenizer``, ``template``, ``num_mel_bins`` or
``target_frames`` argument left unset anywhere in the model's config
(the family's own arguments or its towers') is filled from the DataModule's attribute of that
name; a value set in both places that disagrees is an error naming both. Values also flow the
other way: when the model names a language model (``language_model``: a local Hugging Face model
folder), the data's unset ``tokenizer`` and ``context_length`` come from that folder (its tokenizer,
its maximum length), and the model's unset ``vocab_size`` / ``pad_id`` then follow from that tokenizer.

Under ``model accum_freq > 1`` (exact contrastive accumulation, manual optimisation) the trainer's
gradient clipping is handed to the model's ``accum_clip_val``, which clips once per accumulated step.
"""

from __future__ import annotations

import contextlib
import errno
import importlib
import logging
import os
import pickle
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from jsonargparse import Namespace
from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningCLI

from lit_vlm.callbacks.results import Checkpoint
from lit_vlm.errors import MissingFileError, UserError
from lit_vlm.weights import INDEX_FILE, check_checkpoint, run_checkpoint

LINKED_KEYS = ("image_size", "vocab_size", "context_length", "pad_id", "tokenizer", "template", "num_mel_bins", "target_frames")

_DESCRIPTION = """lit-vlm: train and evaluate vision-language models.

subcommands: fit, validate, test, predict (LightningCLI; `lit-vlm fit --help`),
`lit-vlm data {synth,docs,clips,karpathy,vqav2,mmc4,videos,audio,llava,capfilt} ...` (write the synthetic
world, convert datasets, bootstrap captions; `lit-vlm data --help`),
`lit-vlm lm merge ADAPTER --out DIR` (fold a LoRA adapter into its language model),
`lit-vlm eval {vqa,caption} ...` (score a predictions file offline; `lit-vlm eval --help`),
`lit-vlm report RUNS...` (a leaderboard of results.json files: Markdown, CSV, JSON, HTML),
`lit-vlm bench --suite quickstart` (fit and test a suite of configs, then build its report)."""


class LitVLMCLI(LightningCLI):
    """LightningCLI with lit-vlm's defaults, soft links and ``--ckpt_path best|last`` resolution."""

    _ckpt_resolved = False  # --ckpt_path named best, last or a run directory (resolved to a file)

    def __init__(self, *args, **kwargs) -> None:
        trainer_defaults = {
            "logger": {
                "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                "init_args": {"save_dir": "runs", "name": "lit-vlm", "default_hp_metric": False},
            },
            "gradient_clip_val": 1.0,
            "log_every_n_steps": 10,
            "callbacks": _default_callbacks(),
        }
        kwargs.setdefault("trainer_defaults", trainer_defaults)
        kwargs.setdefault("seed_everything_default", 0)
        kwargs.setdefault("parser_kwargs", {"description": _DESCRIPTION})
        super().__init__(LightningModule, LightningDataModule, *args, subclass_mode_model=True, subclass_mode_data=True, **kwargs)

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_lightning_class_args(Checkpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.monitor": "val/loss",
                "checkpoint.mode": "min",
                "checkpoint.save_last": True,
                "checkpoint.save_top_k": 1,
                "checkpoint.filename": "epoch{epoch:03d}-step{step:07d}",
                "checkpoint.auto_insert_metric_name": False,
            }
        )

    def before_instantiate_classes(self) -> None:
        cfg = self.config[self.subcommand] if self.subcommand else self.config
        apply_soft_links(cfg)
        fill_optim_defaults(cfg)
        move_gradient_clipping(cfg)
        if self.subcommand == "fit" and self._ckpt_resolved:  # best, last, a run directory: continue that run
            run_dir = continue_run(cfg.trainer, cfg.ckpt_path)
            if run_dir is not None:  # keep the run's config.yaml; record this resume's beside it
                n = 1
                while (run_dir / f"config.resume-{n}.yaml").exists():
                    n += 1
                self.save_config_kwargs = {**self.save_config_kwargs, "config_filename": f"config.resume-{n}.yaml"}

    def _parse_ckpt_path(self) -> None:
        """Resolve ``--ckpt_path`` (``best``, ``last``, a run directory, a file) to a checkpoint file
        and check it is readable, before Lightning reads the hyper-parameters of a named file."""
        subcommand = self.config.get("subcommand")
        cfg = self.config[subcommand] if subcommand else None
        if cfg is None or subcommand not in ("fit", "validate", "test", "predict") or cfg.get("ckpt_path") is None:
            return
        named = cfg.ckpt_path
        self._ckpt_resolved = named in ("best", "last") or Path(named).is_dir()
        cfg.ckpt_path = resolve_ckpt_path(named, cfg.trainer.logger, subcommand)
        if self._ckpt_resolved:
            print(f"Using checkpoint: {cfg.ckpt_path}", file=sys.stderr)
        else:  # a file the user named: Lightning restores the model config from its hyper-parameters
            super()._parse_ckpt_path()

    def _run_subcommand(self, subcommand: str) -> None:
        """Run it; if it fails before a training step, remove the run directory it created (a failed
        start leaves no empty ``version_N`` behind; a resumed or trained run keeps its own)."""
        run_dir = _run_directory(self.trainer)
        new_dirs = [] if run_dir is None else [d for d in (run_dir, *list(run_dir.parents)[:2]) if not d.exists()]
        try:
            super()._run_subcommand(subcommand)
        except Exception:  # not Ctrl-C: an interrupted run keeps what it wrote
            started = self.trainer.global_step > 0 or (run_dir is not None and _holds_outputs(run_dir))
            if run_dir in new_dirs and self.trainer.is_global_zero and not started:
                shutil.rmtree(run_dir, ignore_errors=True)
                for folder in new_dirs[1:]:  # runs/<name>, runs: only if this start made them and they are empty
                    with contextlib.suppress(OSError):
                        folder.rmdir()
                print(f"lit-vlm: removed the run directory of the failed start ({run_dir})", file=sys.stderr)
            raise


def _holds_outputs(run_dir: Path) -> bool:
    """Whether a run directory holds more than a start writes (configs, hyper-parameters, event
    files): a checkpoint, results, predictions, ..."""
    started_files = ("config", "hparams.yaml", "events.out.tfevents")
    return any(p.is_file() and not p.name.startswith(started_files) for p in run_dir.rglob("*"))


def _run_directory(trainer: Any) -> Path | None:
    """The logger's run directory (``runs/<name>/version_N``) as it will be, without creating it."""
    logger = getattr(trainer, "logger", None)
    try:
        return Path(logger.log_dir) if logger is not None and getattr(logger, "log_dir", None) else None
    except (OSError, TypeError, AttributeError):
        return None


def _default_callbacks() -> list:
    from lightning.pytorch.callbacks import LearningRateMonitor

    from lit_vlm.callbacks.monitor import DataStats, SamplesPerSecond
    from lit_vlm.callbacks.predictions import PredictionWriter
    from lit_vlm.callbacks.results import ResultsWriter
    from lit_vlm.callbacks.training import NonFiniteLoss, RandomState

    return [
        LearningRateMonitor(logging_interval="step"), SamplesPerSecond(), DataStats(), ResultsWriter(),
        PredictionWriter(), RandomState(), NonFiniteLoss(),
    ]


# ---- soft links ---------------------------------------------------------------------------------
def _import(class_path: str):
    module, _, name = class_path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def _built(value: Any) -> Any:
    """A config value with every ``{"class_path", "init_args"}`` inside it instantiated."""
    if isinstance(value, dict) and "class_path" in value:
        return _import(value["class_path"])(**{k: _built(v) for k, v in (value.get("init_args") or {}).items()})
    return value


def _data_values(data_cfg: Namespace) -> dict[str, Any]:
    """Instantiate the DataModule once (cheap: no data is read) to read the linked attributes."""
    init_args = data_cfg.init_args.as_dict() if isinstance(data_cfg.init_args, Namespace) else dict(data_cfg.init_args or {})
    dm = _import(data_cfg.class_path)(**{k: _built(v) for k, v in init_args.items()})
    values = {k: getattr(dm, k) for k in LINKED_KEYS if getattr(dm, k, None) is not None}
    if "tokenizer" in values:  # a Tokenizer object links as the spec it loads from ("synth" or a path)
        name = getattr(values["tokenizer"], "name", values["tokenizer"])
        if isinstance(name, str):
            values["tokenizer"] = name
        else:
            del values["tokenizer"]
    return values


def _fill(node: Any, values: dict[str, Any], path: str) -> None:
    if not isinstance(node, Namespace) or "class_path" not in node or "init_args" not in node:
        return
    init_args = node.init_args
    if init_args is None:
        return
    for key, value in values.items():
        if key in init_args:
            current = init_args[key]
            if current is None:
                init_args[key] = value
            elif current != value:
                raise UserError(
                    f"{path}.init_args.{key}={current!r} disagrees with data.init_args.{key}={value!r}; "
                    f"set {key} once, in the data config (leave the model's unset)"
                )
    for key, child in vars(init_args).items():  # direct children (keys() would flatten nested ones)
        if isinstance(child, Namespace):
            _fill(child, values, f"{path}.init_args.{key}")


def move_gradient_clipping(cfg: Namespace) -> None:
    """Under ``model accum_freq > 1`` (manual optimisation) Lightning cannot clip gradients: hand
    ``trainer.gradient_clip_val`` and its algorithm to the model's ``accum_clip_val`` /
    ``accum_clip_algorithm``, which clip once per accumulated step. A value the model already has
    is kept (the trainer's, often the CLI default, is then dropped)."""
    model, trainer = cfg.get("model"), cfg.get("trainer")
    if not isinstance(model, Namespace) or not isinstance(trainer, Namespace):
        return
    init_args = model.get("init_args")
    if not isinstance(init_args, Namespace) or "accum_freq" not in init_args:
        return
    accum = init_args.accum_freq
    if not isinstance(accum, int) or accum <= 1 or not trainer.get("gradient_clip_val"):
        return
    if "accum_clip_val" not in init_args:
        raise UserError(
            f"model accum_freq={accum} runs manual optimisation, where trainer.gradient_clip_val cannot act, "
            f"and {model.class_path} has no accum_clip_val to take it: set trainer.gradient_clip_val null"
        )
    if init_args.get("accum_clip_val") is None:
        init_args.accum_clip_val = trainer.gradient_clip_val
        init_args.accum_clip_algorithm = trainer.get("gradient_clip_algorithm") or "norm"
        print(
            f"model accum_freq={accum}: gradient clipping ({init_args.accum_clip_algorithm} "
            f"{init_args.accum_clip_val}) is applied by the model once per accumulated step (model.accum_clip_val)",
            file=sys.stderr,
        )
    trainer.gradient_clip_val = None


def fill_optim_defaults(cfg: Namespace) -> None:
    """Write the family's own optimiser defaults (``optim_defaults``) into the model config where
    it leaves them unset, so the saved ``config.yaml`` and the checkpoint say what was used."""
    model = cfg.get("model")
    if not isinstance(model, Namespace) or not isinstance(model.get("init_args"), Namespace):
        return
    defaults = getattr(_import(model.class_path), "optim_defaults", None) or {}
    for key, value in defaults.items():
        if key in model.init_args and model.init_args[key] is None:
            model.init_args[key] = list(value) if isinstance(value, tuple) else value


def apply_language_model_links(cfg: Namespace) -> None:
    """Fill the data config's unset ``tokenizer`` / ``context_length`` from the model's
    ``language_model`` folder (see the module docstring); a data value that disagrees is an error."""
    model, data = cfg.get("model"), cfg.get("data")
    if not isinstance(model, Namespace) or not isinstance(data, Namespace):
        return
    model_args, data_args = model.get("init_args"), data.get("init_args")
    if not isinstance(model_args, Namespace) or not isinstance(data_args, Namespace):
        return
    folder = model_args.get("language_model")
    if not isinstance(folder, str) or not folder or not (Path(folder) / "config.json").is_file():
        return  # no LM (yet): nothing to link; building the model says what is missing
    from lit_vlm.modules.language_model import language_model_facts

    facts = language_model_facts(folder)
    if "tokenizer" in data_args:
        given = data_args.tokenizer
        if given is None:
            data_args.tokenizer = facts["tokenizer"]
        elif not (isinstance(given, str) and Path(given).resolve() == Path(folder).resolve()):
            raise UserError(
                f"data.init_args.tokenizer={given!r} disagrees with model.init_args.language_model={folder!r}: the data must "
                "be tokenised as the language model reads it; leave data.tokenizer unset"
            )
    if "context_length" in data_args and facts["context_length"] is not None:
        if data_args.context_length is None:
            data_args.context_length = facts["context_length"]
        elif data_args.context_length > facts["context_length"]:
            raise UserError(
                f"data.init_args.context_length={data_args.context_length} is longer than the language model "
                f"{folder!r} reads ({facts['context_length']} tokens)"
            )


def apply_soft_links(cfg: Namespace) -> None:
    """Fill the model config's unset linked keys from the DataModule (see the module docstring)."""
    if cfg.get("model") is None or cfg.get("data") is None:
        return
    apply_language_model_links(cfg)
    values = _data_values(cfg.data)
    data_args = cfg.data.get("init_args") if isinstance(cfg.data, Namespace) else None
    if isinstance(data_args, Namespace):  # the data's own unset values, resolved: the saved config says what was used
        for key in LINKED_KEYS:
            if key in data_args and data_args[key] is None and key in values:
                data_args[key] = values[key]
    _fill(cfg.model, values, "model")


# ---- checkpoint resolution ----------------------------------------------------------------------
def _logger_location(logger_cfg: Any) -> tuple[str, str]:
    init = {}
    if isinstance(logger_cfg, Namespace):
        init = logger_cfg.get("init_args") or {}
    elif isinstance(logger_cfg, dict):
        init = logger_cfg.get("init_args", {})
    elif isinstance(logger_cfg, list) and logger_cfg:
        return _logger_location(logger_cfg[0])
    get = init.get if hasattr(init, "get") else (lambda k, d=None: d)
    return str(get("save_dir", "runs") or "runs"), str(get("name", "lit-vlm") or "lit-vlm")


def continue_run(trainer_cfg: Namespace, ckpt_path: str) -> Path | None:
    """``fit --ckpt_path last|best`` resumes a run: keep logging (and checkpointing) in that run's
    own ``version_N`` directory instead of starting a new one, so its curves continue. Returns that
    directory (None when the logger config has no ``version`` to set)."""
    logger_cfg = trainer_cfg.get("logger")
    if isinstance(logger_cfg, list) and len(logger_cfg) == 1:
        logger_cfg = logger_cfg[0]
    init = logger_cfg.get("init_args") if isinstance(logger_cfg, Namespace) else None
    if not isinstance(init, Namespace) or "version" not in init or init.get("version") is not None:
        return None
    version_dir = Path(ckpt_path).resolve().parent.parent
    init.version = version_dir.name
    if "save_dir" in init and "name" in init:  # the run the checkpoint belongs to, wherever the config points
        init.save_dir, init.name = str(version_dir.parent.parent), version_dir.parent.name
    print(f"Resuming in {version_dir}", file=sys.stderr)
    return version_dir


def resolve_checkpoint(which: str, logger_cfg: Any) -> str:
    """Path of the ``best`` or ``last`` checkpoint of the newest fit run under the logger's
    ``save_dir/name`` (read from ``checkpoints/index.json``, written by :class:`Checkpoint`)."""
    save_dir, name = _logger_location(logger_cfg)
    indexes = sorted(Path(save_dir, name).glob(f"version_*/checkpoints/{INDEX_FILE}"), key=lambda p: p.stat().st_mtime)
    for index in reversed(indexes):
        try:
            return str(run_checkpoint(index.parent, (which,), f"--ckpt_path {which}"))
        except MissingFileError:
            continue
    raise MissingFileError(
        f"--ckpt_path {which}: no '{which}' checkpoint found under {Path(save_dir, name)}/version_*/checkpoints/ "
        f"(run `lit-vlm fit` with the same config first, or pass a checkpoint path)"
        + (" (a run has no 'best' until its first validation: use 'last')" if which == "best" else "")
    )


def resolve_ckpt_path(named: str, logger_cfg: Any, subcommand: str) -> str:
    """The checkpoint file ``--ckpt_path`` names, checked readable: ``best`` / ``last`` of the newest
    run with this logger config, a run directory (its ``last`` for ``fit``, which resumes it, else its
    ``best``), or a file. Lightning's own keys (``hpc``, ``registry``...) and URLs pass unchanged."""
    option = f"--ckpt_path {named}"
    if named in ("best", "last"):
        file = Path(resolve_checkpoint(named, logger_cfg))
    elif str(named).startswith(("http://", "https://")):
        raise UserError(
            f"{option}: lit-vlm never downloads (and Lightning would unpickle a downloaded checkpoint with code "
            "execution): fetch the file first and pass its local path"
        )
    elif "://" in str(named) or named in ("hpc", "registry") or str(named).startswith("registry:"):
        return named  # remote storage (s3://, ...) and Lightning's own keys
    elif Path(named).is_dir():
        file = run_checkpoint(named, ("last",) if subcommand == "fit" else ("best", "last"), "--ckpt_path")
    elif Path(named).exists():
        file = Path(named)
    else:
        raise MissingFileError(f"{option}: no such file or directory (give a .ckpt file, a run directory, 'last' or 'best')")
    return str(check_checkpoint(file, option))


# ---- entry point --------------------------------------------------------------------------------
#: ``lit-vlm <group> <command>``: tool groups beside LightningCLI's subcommands.
#: command -> (module, function, one-line help).
TOOL_GROUPS: dict[str, dict[str, tuple[str, str, str]]] = {
    "data": {
        "synth": ("lit_vlm.datamodules.synth", "main", "write the synthetic world (shards + annotation JSON)"),
        "docs": ("lit_vlm.datamodules.world_docs", "main", "write the synthetic world's interleaved documents (MMC4 layout)"),
        "clips": ("lit_vlm.datamodules.world_clips", "main",
                  "write the synthetic world's clips with sound (mp4 + flac + json, video2dataset's layout)"),
        "videos": ("lit_vlm.datamodules.convert_clips", "main_videos",
                   "convert a folder of videos with captions (MSR-VTT's JSON, or a CSV) into clip shards"),
        "audio": ("lit_vlm.datamodules.convert_clips", "main_audio",
                  "convert a folder of audio clips with a label CSV (ESC-50's layout) into clip shards"),
        "karpathy": ("lit_vlm.datamodules.convert", "karpathy_main",
                     "convert COCO / Flickr30k Karpathy-split JSON + images into shards + caption annotations"),
        "vqav2": ("lit_vlm.datamodules.convert", "vqav2_main",
                  "convert VQAv2 questions + annotations + images into shards + the official annotation files"),
        "mmc4": ("lit_vlm.datamodules.mmc4", "main",
                 "convert MMC4 JSON lines + its image folder into shards (each image's bytes in its image_info, as OpenFlamingo's conversion)"),
        "llava": ("lit_vlm.datamodules.conversations", "llava_main",
                  "convert LLaVA-format instruction JSON + images into shards (malformed records left out and reported)"),
        "capfilt": ("lit_vlm.capfilt", "main",
                    "BLIP's CapFilt: caption shards with a trained captioner, filter captions with its ITM head, write new shards"),
    },
    "lm": {
        "merge": ("lit_vlm.models.bridge", "merge_main",
                  "fold a bridge run's LoRA adapter (peft format) into its language model: a full Hugging Face folder"),
    },
    "eval": {
        "vqa": ("lit_vlm.vqa", "main", "score a VQAv2 results file with the official VQA accuracy"),
        "caption": ("lit_vlm.captioning", "main", "score a COCO-format captions results file (BLEU, METEOR, ROUGE-L, CIDEr)"),
    },
}


#: Single-command tools: ``lit-vlm <name> ...`` runs ``<module>.main``.
TOOLS: dict[str, str] = {"report": "lit_vlm.report", "bench": "lit_vlm.report.bench"}


def run_reporting_user_errors(fn: Callable[[], Any]) -> int:
    """Run ``fn``; a :class:`UserError`, a refused unsafe checkpoint or a file-system error (a path
    that is a file, a folder that cannot be written, a full disk) becomes one paragraph on stderr
    and exit code 2, also when jsonargparse wrapped it while instantiating a class. Everything else
    keeps its traceback: it is a bug. ``LIT_VLM_DEBUG=1`` re-raises."""
    try:
        return int(fn() or 0)
    except Exception as err:
        cause = _user_cause(err)
        if cause is None or os.environ.get("LIT_VLM_DEBUG"):
            raise
        print(f"lit-vlm: error: {_paragraph(cause)}\n(set LIT_VLM_DEBUG=1 to see the traceback)", file=sys.stderr)
        return 2


#: File-system errors that come from what the user gave or from the machine (a path that is a
#: file, a missing or unwritable folder, a full or read-only disk), not from a bug.
_USER_OS_ERRORS = (FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError, NotADirectoryError)
_USER_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EDQUOT}


def _is_user_error(err: BaseException) -> bool:
    if isinstance(err, (UserError, pickle.UnpicklingError, *_USER_OS_ERRORS)):
        return True
    return isinstance(err, OSError) and err.errno in _USER_ERRNOS


def _user_cause(err: BaseException | None) -> BaseException | None:
    """``err`` if it is a user error, else the user error that a wrapper (jsonargparse's
    ``ValueError`` / ``TypeError`` around a class's own error) was raised ``from``; None for
    anything else."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if _is_user_error(err):
            return err
        if not isinstance(err, (ValueError, TypeError)):
            return None
        err = err.__cause__
    return None


def _paragraph(err: BaseException) -> str:
    if isinstance(err, UserError):
        return str(err)
    if isinstance(err, pickle.UnpicklingError):  # torch.load(weights_only=True) met arbitrary objects
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        return (
            "refused to load a checkpoint that holds arbitrary Python objects (lit-vlm and Lightning load "
            f"checkpoints with torch.load(weights_only=True), which runs no pickled code): {first}. Convert a "
            "checkpoint you trust to plain tensors (a state dict or safetensors) and pass that instead"
        )
    where = " -> ".join(str(f) for f in (err.filename, err.filename2) if f)  # OSError
    hint = "the disk is full or read-only" if err.errno in _USER_ERRNOS else "check the path and its permissions"
    return f"{err.strerror or err}{f': {where}' if where else ''} ({type(err).__name__}; {hint})"


def tool_main(group: str, argv: list[str]) -> int:
    """``lit-vlm data <command>`` / ``lit-vlm eval <command>``: dataset and scoring tools."""
    commands = TOOL_GROUPS[group]
    if not argv or argv[0] in ("-h", "--help"):
        width = max(map(len, commands))
        lines = "\n".join(f"  {name:<{width}}  {help_}" for name, (_, _, help_) in commands.items())
        print(f"usage: lit-vlm {group} {{{','.join(commands)}}} ...\n\n{lines}\n\n`lit-vlm {group} <command> --help` lists its options.")
        return 0 if argv else 2
    if argv[0] not in commands:
        print(f"lit-vlm {group}: unknown command '{argv[0]}' (choose from: {', '.join(commands)})", file=sys.stderr)
        return 2
    module, function, _ = commands[argv[0]]
    try:
        return run_reporting_user_errors(lambda: getattr(importlib.import_module(module), function)(argv[1:]))
    except SystemExit as exit_:  # argparse's --help and usage errors
        return exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 2)


class _StderrHandler(logging.StreamHandler):
    """A stream handler that writes to whatever ``sys.stderr`` is now (a redirected or captured
    stderr included), not the one it was created with."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def configure_logging() -> None:
    """Show lit-vlm's INFO messages (data skips per reason, resumed positions, ...) on stderr, as
    Lightning does for its own logger; a handler the user installed is left alone."""
    logger = logging.getLogger("lit_vlm")
    if logger.handlers:
        return
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)


def main(argv: list[str] | None = None) -> int:
    configure_logging()
    explicit = argv is not None
    argv = list(argv if explicit else sys.argv[1:])
    if argv and argv[0] in TOOL_GROUPS:
        return tool_main(argv[0], argv[1:])
    if argv and argv[0] in TOOLS:
        module = importlib.import_module(TOOLS[argv[0]])
        try:
            return run_reporting_user_errors(lambda: module.main(argv[1:]))
        except SystemExit as exit_:  # argparse's --help and usage errors
            return exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 2)

    def run() -> None:
        LitVLMCLI(args=argv if explicit else None)

    return run_reporting_user_errors(run)


if __name__ == "__main__":
    sys.exit(main())
