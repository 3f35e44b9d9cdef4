"""End-to-end runs through the real `lit-vlm` command: corrupt shards train through with their
skip counts reported, and evaluation metrics are identical on 1 and 2 CPU DDP processes."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_image_text_data import write_bad_world

from lit_vlm.models import CLIP
from lit_vlm.modules import TextTransformer, VisionTransformer

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "clip" / "tiny.yaml")


def lit_vlm(*args, cwd):
    proc = subprocess.run([sys.executable, "-m", "lit_vlm", *args], capture_output=True, text=True, cwd=cwd, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def scalars(run_dir: Path) -> dict[str, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    return {tag: acc.Scalars(tag)[-1].value for tag in acc.Tags()["scalars"]}


@pytest.mark.slow
def test_corrupt_shards_train_through_and_are_counted(tmp_path):
    shards, good, expected = write_bad_world(tmp_path / "bad")
    lit_vlm(
        "fit", "--config", TINY, "--data.init_args.root", str(tmp_path / "world"),
        "--data.init_args.train_shards", str(tmp_path / "bad" / "shard-{000000..000001}.tar"),
        "--data.init_args.max_image_pixels", str(100 * 100),
        "--data.init_args.shuffle_buffer", "0",
        "--data.init_args.batch_size", str(len(good) + 1),
        "--data.init_args.train_epoch_samples", str(len(good) + 1),
        "--trainer.enable_progress_bar", "false",
        cwd=tmp_path,
    )
    logged = scalars(tmp_path / "runs" / "clip-tiny" / "version_0")
    for reason, n in expected.items():
        assert logged[f"data/train/skipped_{reason}"] == n, reason
    assert "train/loss" in logged and logged["val/retrieval/num_samples"] == 24


@pytest.mark.slow
@pytest.mark.ddp
def test_evaluation_is_identical_on_one_and_two_processes(tmp_path):
    """Test split of 23 images (odd): retrieval and zero-shot metrics from 2 DDP processes equal
    those of one process."""
    common = ["--config", TINY, "--data.init_args.root", str(tmp_path / "world"), "--trainer.enable_progress_bar", "false"]
    lit_vlm("fit", *common, "--trainer.max_epochs", "2", cwd=tmp_path)
    ckpt = json.loads((tmp_path / "runs/clip-tiny/version_0/checkpoints/index.json").read_text())["last"]
    timing = json.loads((tmp_path / "runs/clip-tiny/version_0/fit.json").read_text())["time"]
    assert 0 < timing["validation_s"] < timing["fit_s"]  # the sanity check and 2 validations
    assert timing["train_s"] == pytest.approx(timing["fit_s"] - timing["validation_s"], abs=0.11)
    lit_vlm("test", *common, "--ckpt_path", ckpt, cwd=tmp_path)
    lit_vlm("test", *common, "--ckpt_path", ckpt, "--trainer.devices", "2", "--trainer.strategy", "ddp", cwd=tmp_path)
    one = json.loads((tmp_path / "runs/clip-tiny/version_1/results.json").read_text())
    two = json.loads((tmp_path / "runs/clip-tiny/version_2/results.json").read_text())
    assert one["world_size"] == 1 and two["world_size"] == 2
    keys = [k for k in one["metrics"] if k.startswith(("test/retrieval/", "test/zeroshot/"))]
    assert len(keys) >= 15
    assert {k: one["metrics"][k] for k in keys} == {k: two["metrics"][k] for k in keys}
    assert one["metrics"]["test/retrieval/num_samples"] == 23 == two["metrics"]["test/retrieval/num_samples"]


def test_clip_capabilities():
    torch.manual_seed(0)
    model = CLIP(VisionTransformer("tiny"), TextTransformer("tiny", vocab_size=60, context_length=16), embed_dim=8)
    ids = torch.randint(5, 60, (3, 10))
    mask = torch.ones(3, 10, dtype=torch.bool)
    mask[1, 6:] = False
    ids[~mask] = 0
    emb = model.encode_text(ids, mask)
    assert emb.shape == (3, 8) and torch.allclose(emb.norm(dim=-1), torch.ones(3))
    # padding columns past the longest caption change nothing
    pad = torch.zeros(3, 6, dtype=torch.long)
    wide = model.encode_text(torch.cat([ids, pad], 1), torch.cat([mask, pad.bool()], 1))
    assert torch.allclose(emb, wide, atol=1e-6)
    img = model.encode_image(torch.randn(2, 3, 32, 32))
    assert img.shape == (2, 8)
    # logit scale: initialised to log(1/0.07), clamped to log(100) after a step
    assert model.logit_scale.exp().item() == pytest.approx(1 / 0.07)
    with torch.no_grad():
        model.logit_scale.fill_(10.0)
    model.on_train_batch_end(None, None, 0)
    assert model.logit_scale.exp().item() == pytest.approx(100.0)


@pytest.mark.slow
def test_generation_callbacks_through_the_cli_and_offline_scoring_agree(tmp_path):
    """A user adds the VQA and captioning callbacks to a config and runs `lit-vlm test` on the
    synthetic world (with the generating test double as the family); the results JSON holds the
    metrics, and `lit-vlm eval vqa|caption` on the written predictions prints the same numbers."""
    import os
    import shutil

    extra = tmp_path / "generation.yaml"
    extra.write_text(
        "trainer:\n"
        "  callbacks:\n"
        "    - class_path: lit_vlm.callbacks.VQAEvaluation\n"
        "    - class_path: lit_vlm.callbacks.CaptionEvaluation\n"
        "      init_args: {splits: [test], metrics: [BLEU, ROUGE_L, CIDEr]}\n"
        "model:\n"
        "  class_path: doubles.GeneratingDouble\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT / "tests") + os.pathsep + os.environ.get("PYTHONPATH", "")}

    def run(*args):
        proc = subprocess.run([sys.executable, "-m", "lit_vlm", *args], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)
        assert proc.returncode == 0, proc.stderr[-4000:]
        return proc

    world = tmp_path / "world"
    run("test", "--config", TINY, "--config", str(extra), "--data.init_args.root", str(world), "--trainer.enable_progress_bar", "false")
    run_dir = tmp_path / "runs" / "clip-tiny" / "version_0"
    metrics = json.loads((run_dir / "results.json").read_text())["metrics"]
    assert metrics["test/vqa/num_questions"] > 23 * 4 and 0 <= metrics["test/vqa/overall"] <= 1
    assert {"test/vqa/answer_type/yes_no", "test/vqa/answer_type/number", "test/caption/CIDEr"} <= set(metrics)

    out = tmp_path / "vqa.json"
    run("eval", "vqa", "--predictions", str(run_dir / "vqa_predictions_test.json"),
        "--annotations", str(world / "annotations" / "vqa_test_annotations.json"),
        "--questions", str(world / "annotations" / "vqa_test_questions.json"), "--output", str(out))
    offline = json.loads(out.read_text())
    assert offline["overall"] == pytest.approx(metrics["test/vqa/overall"], rel=1e-6)
    assert offline["answer_type/yes/no"] == pytest.approx(metrics["test/vqa/answer_type/yes_no"], rel=1e-6)
    if shutil.which("java"):
        out = tmp_path / "caption.json"
        run("eval", "caption", "--predictions", str(run_dir / "caption_predictions_test.json"),
            "--references", str(world / "annotations" / "captions_test.json"), "--metrics", "BLEU", "ROUGE_L", "CIDEr",
            "--output", str(out))
        offline = json.loads(out.read_text())
        assert offline["CIDEr"] == pytest.approx(metrics["test/caption/CIDEr"], rel=1e-6)
