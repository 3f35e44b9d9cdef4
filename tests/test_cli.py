"""The lit-vlm command: every shipped config parses, help works, soft links, an end-to-end tiny run
through the real CLI (fit, then test with --ckpt_path best), and clear errors."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
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
        import pickle

        class Evil:
            def __reduce__(self):
                return (print, ("this ran while loading",))

        (tmp_path / "evil.ckpt").write_bytes(pickle.dumps({"state_dict": {}, "x": Evil()}))
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
