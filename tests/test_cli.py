"""The lit-vlm command: every shipped config parses, help works, soft links, an end-to-end tiny run
through the real CLI (fit, then test with --ckpt_path best), and clear errors."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from lit_vlm.cli import main

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").rglob("*.yaml"))
TINY = ROOT / "configs" / "clip" / "tiny.yaml"


def run_cli(args, capsys):
    with pytest.raises(SystemExit) as exc:
        main(args)
    out = capsys.readouterr()
    return exc.value.code, out.out


@pytest.mark.parametrize("config", CONFIGS, ids=[str(c.relative_to(ROOT / "configs")) for c in CONFIGS])
def test_every_config_parses(config, capsys):
    # Partial configs (model-only, data-only, trainer-only) are composed on top of the tiny one.
    code, out = run_cli(["fit", "--config", str(TINY), "--config", str(config), "--print_config"], capsys)
    assert code == 0
    printed = yaml.safe_load(out)
    own = yaml.safe_load(config.read_text())
    for group in ("model", "data"):
        if group in own:
            assert printed[group]["class_path"] == own[group]["class_path"]


def test_help(capsys):
    code, out = run_cli(["--help"], capsys)
    assert code == 0 and "fit" in out and "karpathy" in out and "eval" in out
    code, out = run_cli(["fit", "--config", str(TINY), "--help"], capsys)
    assert code == 0
    code, out = run_cli(["fit", "--model", "lit_vlm.models.CLIP", "--model.help", "lit_vlm.models.CLIP"], capsys)
    assert code == 0 and "Dimension of the joint embedding space" in out and "max_logit_scale" in out
    code, out = run_cli(["fit", "--data", "lit_vlm.datamodules.ImageTextDataModule", "--data.help", "lit_vlm.datamodules.ImageTextDataModule"], capsys)
    assert code == 0 and "train_shards" in out


def test_tool_groups_help(capsys):
    assert main(["eval", "--help"]) == 0
    out = capsys.readouterr().out
    assert "vqa" in out and "caption" in out
    assert main(["eval", "nope"]) == 2 and "unknown command 'nope'" in capsys.readouterr().err
    assert main(["eval", "vqa", "--help"]) == 0 and "--predictions" in capsys.readouterr().out
    assert main(["data", "karpathy", "--help"]) == 0 and "--no-pack" in capsys.readouterr().out


def test_data_synth_help(capsys):
    assert main(["data", "--help"]) == 0
    assert "synth" in capsys.readouterr().out


def test_soft_links_fill_and_reject(tmp_path):
    from jsonargparse import Namespace

    from lit_vlm.cli import apply_soft_links

    def cfg(vision_size):
        return Namespace(
            model=Namespace(
                class_path="lit_vlm.models.CLIP",
                init_args=Namespace(
                    vision=Namespace(class_path="lit_vlm.modules.VisionTransformer", init_args=Namespace(preset="tiny", image_size=vision_size)),
                    text=Namespace(class_path="lit_vlm.modules.TextTransformer", init_args=Namespace(preset="tiny", vocab_size=None, context_length=None)),
                ),
            ),
            data=Namespace(
                class_path="lit_vlm.datamodules.ImageTextDataModule",
                init_args=Namespace(root=str(tmp_path / "w"), image_size=48, context_length=12),
            ),
        )

    c = cfg(None)
    apply_soft_links(c)
    assert c.model.init_args.vision.init_args.image_size == 48
    assert c.model.init_args.text.init_args.context_length == 12
    assert c.model.init_args.text.init_args.vocab_size > 50  # the synthetic world's tokenizer
    c = cfg(48)
    apply_soft_links(c)  # agreeing explicit value is fine
    with pytest.raises(ValueError, match="image_size=32 disagrees with data.init_args.image_size=48"):
        apply_soft_links(cfg(32))


def test_bad_option_is_a_short_error(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "lit_vlm", "fit", "--config", str(TINY), "--data.init_args.image_size", "30",
         "--data.init_args.root", str(tmp_path / "w")],
        capture_output=True, text=True, cwd=tmp_path,
    )
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert "image_size" in proc.stderr and "30" in proc.stderr


@pytest.mark.slow
def test_fit_then_test_best_through_the_cli(tmp_path):
    """The user path: fit the tiny config, then test with --ckpt_path best in a new process."""
    world = tmp_path / "world"
    common = ["--config", str(TINY), "--data.init_args.root", str(world), "--trainer.max_epochs", "2",
              "--trainer.enable_progress_bar", "false"]
    fit = subprocess.run([sys.executable, "-m", "lit_vlm", "fit", *common], capture_output=True, text=True, cwd=tmp_path)
    assert fit.returncode == 0, fit.stderr[-3000:]
    run_dir = tmp_path / "runs" / "clip-tiny" / "version_0"
    assert (run_dir / "config.yaml").is_file()
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    index = json.loads((run_dir / "checkpoints" / "index.json").read_text())
    assert Path(index["best"]).is_file() and index["monitor"] == "val/retrieval/mean_R@1"
    events = list(run_dir.glob("events.out.tfevents.*"))
    assert events
    # the checkpoint rebuilds the model alone, from the config LightningCLI recorded
    from lit_vlm.models import CLIP

    model = CLIP.load_from_checkpoint(index["best"], map_location="cpu", weights_only=False)
    assert model.vision.image_size == 32 and model.text.context_length == 32

    test = subprocess.run([sys.executable, "-m", "lit_vlm", "test", *common, "--ckpt_path", "best"], capture_output=True, text=True, cwd=tmp_path)
    assert test.returncode == 0, test.stderr[-3000:]
    results_files = list((tmp_path / "runs" / "clip-tiny").glob("version_*/results.json"))
    assert len(results_files) == 1
    results = json.loads(results_files[0].read_text())
    assert results["family"] == "CLIP"
    assert results["checkpoint"] == index["best"]
    for key in ("test/retrieval/i2t_R@1", "test/retrieval/t2i_R@1", "test/retrieval/mean_R@1", "test/zeroshot/top1", "test/loss"):
        assert key in results["metrics"], key
    assert results["metrics"]["test/retrieval/num_samples"] == 23  # every test image exactly once
    assert results["machine"]["cpu_count"] and results["date"] and "commit" in results
    assert results["config"]["model"]["class_path"] == "lit_vlm.models.CLIP"
    # what a leaderboard reads: schema, task and data identity, metric meaning, size, training
    assert results["schema_version"] == 1
    dataset = results["task"]["dataset"]
    assert dataset["name"] == "lit-vlm synthetic world" and dataset["split"] == "test" and len(dataset["config_sha256"]) == 64
    assert dataset["annotations"]["captions"]["sha256"] and Path(dataset["annotations"]["captions"]["path"]).is_file()
    info = results["metric_info"]
    assert info["test/retrieval/i2t_R@1"] == {"higher_is_better": True, "unit": "fraction"}
    assert info["test/retrieval/i2t_medr"] == {"higher_is_better": False, "unit": "rank"}
    assert info["test/loss"]["higher_is_better"] is False
    assert results["parameters"]["total"] == results["parameters"]["trainable"] > 0
    fit_json = json.loads((run_dir / "fit.json").read_text())
    best_step = torch.load(index["best"], weights_only=True)["global_step"]
    assert results["training"]["global_step"] == best_step and results["training"]["samples_seen"] == best_step * 16
    assert fit_json["samples_seen"] == fit_json["global_step"] * 16 and fit_json["schema_version"] == 1

    # predict writes the embeddings with their sample ids
    pred = subprocess.run([sys.executable, "-m", "lit_vlm", "predict", *common, "--ckpt_path", "best"], capture_output=True, text=True, cwd=tmp_path)
    assert pred.returncode == 0, pred.stderr[-3000:]
    [out] = list((tmp_path / "runs" / "clip-tiny").glob("version_*/predictions"))
    assert f"Predictions: {out}" in pred.stdout + pred.stderr
    index_lines = [json.loads(line) for line in (out / "index.jsonl").read_text().splitlines()]
    assert [r["index"] for r in index_lines] == list(range(23)) and len({r["sample_id"] for r in index_lines}) == 23
    import numpy as np

    image_emb = np.load(out / "image_emb.npy")
    assert image_emb.shape == (23, model.image_projection.out_features)
    assert np.allclose(np.linalg.norm(image_emb, axis=1), 1.0, atol=1e-5)  # normalised embeddings, one row per sample

    # TensorBoard holds the curves a user looks at
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for tag in ("train/loss", "train/logit_scale", "train/samples_per_sec", "val/retrieval/mean_R@1", "val/zeroshot/top1"):
        assert tag in tags, (tag, sorted(tags))
    assert any(t.startswith("lr-") for t in tags), sorted(tags)


def test_ckpt_best_without_a_fit_is_a_clear_error(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "lit_vlm", "test", "--config", str(TINY), "--data.init_args.root", str(tmp_path / "w"), "--ckpt_path", "best"],
        capture_output=True, text=True, cwd=tmp_path,
    )
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "no 'best' checkpoint found" in proc.stderr


MISTAKES = {
    "unknown model class": (["--model", "lit_vlm.models.NoSuchFamily"], "NoSuchFamily"),
    "unknown data class": (["--data", "lit_vlm.datamodules.Nope"], "lit_vlm.datamodules.Nope"),
    "missing data path": (["--data.init_args.root", "null", "--data.init_args.train_shards", "/no/such/dir/s-{0..3}.tar"],
                          "train_shards='/no/such/dir/s-{0..3}.tar': shard pattern '/no/such/dir/s-{0..3}.tar' matches no file"),
    "image size the backbone cannot patchify": (["--data.init_args.image_size", "30"], "image_size"),
    "inconsistent values": (["--model.init_args.vision.init_args.image_size", "48"],
                            "image_size=48 disagrees with data.init_args.image_size=32"),
    "untrusted pickle": (["--ckpt_path", "evil.ckpt"], "refused to load a checkpoint that holds arbitrary Python objects"),
}


@pytest.mark.parametrize("mistake", sorted(MISTAKES))
def test_configuration_mistakes_are_short_errors_before_training(mistake, tmp_path):
    args, message = MISTAKES[mistake]
    if mistake == "untrusted pickle":

        class Evil:
            def __reduce__(self):
                return (print, ("this ran while loading",))

        import torch

        torch.save({"state_dict": {}, "x": Evil()}, tmp_path / "evil.ckpt")  # a whole archive, with a code object
    proc = subprocess.run(
        [sys.executable, "-m", "lit_vlm", "fit", "--config", str(TINY), "--data.init_args.root", str(tmp_path / "w"),
         "--trainer.enable_progress_bar", "false", *args],
        capture_output=True, text=True, cwd=tmp_path, timeout=300,
    )
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert message in proc.stderr, proc.stderr[-3000:]
    assert "this ran while loading" not in proc.stdout + proc.stderr
    assert not list(tmp_path.glob("runs/*/version_*/checkpoints/*.ckpt"))  # nothing trained


def _broken_run(tmp_path: Path) -> Path:
    """A run directory whose index names a truncated ``last`` and an empty ``best``, as a full disk
    or an interrupted copy leaves them."""
    import torch

    ckpts = tmp_path / "runs" / "clip-tiny" / "version_0" / "checkpoints"
    ckpts.mkdir(parents=True)
    whole = tmp_path / "whole.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1000)}, "pytorch-lightning_version": "2.6"}, whole)
    (ckpts / "last.ckpt").write_bytes(whole.read_bytes()[:2000])  # truncated
    (ckpts / "best.ckpt").write_bytes(b"")  # empty
    (ckpts / "index.json").write_text(json.dumps({"best": str(ckpts / "best.ckpt"), "last": str(ckpts / "last.ckpt")}))
    return ckpts


@pytest.mark.parametrize(
    "command, named, problem",
    [("fit", "last", "not a torch.save archive"), ("validate", "best", "empty"), ("test", "PATH", "not a torch.save archive"),
     ("test", "RUN", "empty"), ("fit", "RUN", "not a torch.save archive"), ("predict", "last", "not a torch.save archive")],
)
def test_broken_checkpoint_is_one_paragraph_for_every_command(command, named, problem, tmp_path, monkeypatch, capsys):
    """``last``, ``best``, a file or a run directory (its ``last`` for fit, else its ``best``) naming an
    empty or truncated checkpoint: one paragraph that names it, for every command, before any run starts."""
    ckpts = _broken_run(tmp_path)
    monkeypatch.chdir(tmp_path)
    named = {"PATH": str(ckpts / "last.ckpt"), "RUN": str(ckpts.parent)}.get(named, named)
    code = main([command, "--config", str(TINY), "--data.init_args.root", str(tmp_path / "w"), "--ckpt_path", named])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert f"lit-vlm: error: --ckpt_path {named}" in err and problem in err and ".ckpt cannot be read" in err
    assert sorted(p.name for p in (tmp_path / "runs" / "clip-tiny").iterdir()) == ["version_0"]  # no new run


def test_data_root_that_is_a_file_is_one_paragraph(tmp_path, monkeypatch, capsys):
    (tmp_path / "afile").write_text("not a folder")
    monkeypatch.chdir(tmp_path)
    code = main(["fit", "--config", str(TINY), "--data.init_args.root", "afile"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "lit-vlm: error: data root='afile' is a file, not a folder" in err
    assert not (tmp_path / "runs").exists()


def test_failed_start_leaves_no_empty_run_directory(tmp_path, monkeypatch, capsys):
    """init_from is read in the model's setup, after the run directory exists: a failure there
    removes it (and the runs/<name> folder this start made)."""
    (tmp_path / "trunc.ckpt").write_bytes(b"PK\x03\x04 half a checkpoint")
    monkeypatch.chdir(tmp_path)
    code = main(["fit", "--config", str(TINY), "--data.init_args.root", str(tmp_path / "w"),
                 "--model.init_args.init_from", "trunc.ckpt", "--trainer.enable_progress_bar", "false"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and "model init_from=trunc.ckpt: trunc.ckpt cannot be read" in err
    assert "removed the run directory of the failed start" in err
    assert not (tmp_path / "runs").exists()


def test_user_errors_are_one_type_handled_in_one_place(capsys):
    """A UserError (also wrapped by jsonargparse) is a paragraph; a bug keeps its traceback."""
    from lit_vlm.cli import run_reporting_user_errors
    from lit_vlm.errors import UserError

    def wrapped():
        try:
            raise UserError("data batch_size must be >= 1, got 0")
        except UserError as err:
            raise ValueError("Does not validate against any of the Union subtypes") from err

    assert run_reporting_user_errors(wrapped) == 2
    assert capsys.readouterr().err.startswith("lit-vlm: error: data batch_size must be >= 1, got 0\n")

    def bug():
        raise ZeroDivisionError("a bug")

    with pytest.raises(ZeroDivisionError):
        run_reporting_user_errors(bug)


def test_only_user_errors_lose_their_traceback(capsys):
    """A bug raised ``from None`` inside an ``except OSError`` keeps its traceback, and so does an
    OSError that is not about a path the user gave (a broken pipe)."""
    from lit_vlm.cli import run_reporting_user_errors

    def bug_after_oserror():
        try:
            raise FileNotFoundError(2, "No such file or directory", "x")
        except OSError:
            raise ValueError("a bug") from None

    with pytest.raises(ValueError, match="a bug"):
        run_reporting_user_errors(bug_after_oserror)
    with pytest.raises(BrokenPipeError):
        run_reporting_user_errors(lambda: (_ for _ in ()).throw(BrokenPipeError(32, "Broken pipe")))

    def full_disk():
        import errno

        raise OSError(errno.ENOSPC, "No space left on device", "runs/x/last.ckpt")

    assert run_reporting_user_errors(full_disk) == 2
    assert "No space left on device: runs/x/last.ckpt (OSError; the disk is full or read-only)" in capsys.readouterr().err


def test_ckpt_path_urls_are_refused_and_run_directories_continue_their_own_run(tmp_path):
    from jsonargparse import Namespace

    from lit_vlm.cli import continue_run, resolve_ckpt_path
    from lit_vlm.errors import UserError

    with pytest.raises(UserError, match="never downloads"):
        resolve_ckpt_path("https://example.org/last.ckpt", None, "test")
    trainer = Namespace(logger=Namespace(class_path="TensorBoardLogger", init_args=Namespace(save_dir="runs", name="clip", version=None)))
    ckpt = tmp_path / "elsewhere" / "exp" / "version_3" / "checkpoints" / "last.ckpt"
    continue_run(trainer, str(ckpt))
    init = trainer.logger.init_args
    assert (init.save_dir, init.name, init.version) == (str(tmp_path / "elsewhere"), "exp", "version_3")


def test_a_file_that_is_no_torch_file_is_named_as_such(tmp_path):
    from lit_vlm.errors import UserError
    from lit_vlm.interop import load_clip_state_dict

    page = tmp_path / "open_clip_pytorch_model.bin"
    page.write_text("<html>404 Not Found</html>")
    with pytest.raises(UserError, match="not a torch.save file .neither a zip archive nor a pickle.") as err:
        load_clip_state_dict(page)
    assert "weights_only=False" not in str(err.value)
