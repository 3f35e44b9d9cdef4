"""Evaluation callbacks give the same metrics in one process and in 2 CPU DDP processes (gloo), on
an odd-sized set split unevenly over the ranks (no distributed sampler: nothing padded or
duplicated), and those equal a direct computation on the whole set.

Each configuration is a subprocess running tests/ddp_eval_worker.py (Lightning starts the second
rank itself). Adding a callback is one line in the worker's ``CALLBACKS``."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from ddp_eval_worker import coco_captions, make_samples
from doubles import GeneratingDouble

WORKER = Path(__file__).resolve().parent / "ddp_eval_worker.py"
NUM_IMAGES = 23  # odd: 12 + 11 images on 2 ranks


def start_worker(out: Path, devices: int, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "worker.log", "w") as log:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(
            [sys.executable, str(WORKER), "--devices", str(devices), "--out", str(out), "--num-images", str(NUM_IMAGES), *extra],
            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=out,
            start_new_session=True,  # its own process group: a timeout ends rank 1 and Java with it
        )


def finish_worker(proc: subprocess.Popen, out: Path, timeout: float = 180) -> dict:
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        pytest.fail(f"evaluation worker timed out after {timeout:.0f} s:\n{(out / 'worker.log').read_text()[-4000:]}")
    assert proc.returncode == 0, (out / "worker.log").read_text()[-4000:]
    return json.loads((out / "metrics.json").read_text())


def finish_all(runs: list[tuple[subprocess.Popen, Path]]) -> list[dict]:
    """Wait for every worker (none is left running, whatever fails); raise the first failure."""
    results, failures = [], []
    for proc, out in runs:
        try:
            results.append(finish_worker(proc, out))
        except BaseException as err:  # noqa: BLE001 - pytest.fail is a BaseException
            failures.append(err)
    if failures:
        raise failures[0]
    return results


def check_per_sample(per_sample: dict, metrics: dict, units: int) -> None:
    """Every per-sample (num, den) pair sums back to its metric; every mean_of to its derived metric."""
    assert len(per_sample["ids"]) == units
    ratios = {}
    for name, parts in per_sample["metrics"].items():
        assert len(parts["num"]) == len(parts["den"]) == units, name
        ratios[name] = sum(parts["num"]) / sum(parts["den"])
        assert ratios[name] == pytest.approx(metrics[name], rel=1e-12, abs=1e-12), name
    for name, parts in per_sample["mean_of"].items():
        assert sum(ratios[p] for p in parts) / len(parts) == pytest.approx(metrics[name], rel=1e-12), name


def direct_caption_metrics(samples: list[dict]) -> dict[str, float]:
    """pycocoevalcap called directly, as COCOEvalCap does, on the double's captions of the whole set."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    texts = GeneratingDouble().generate(torch.stack([s["image"] for s in samples]))  # [N] strings
    order = sorted(range(len(samples)), key=lambda i: str(samples[i]["image_id"]))  # the callback's order
    gts = {samples[i]["image_id"]: [{"caption": c} for c in samples[i]["captions"]] for i in order}
    res = {samples[i]["image_id"]: [{"caption": texts[i]}] for i in order}
    tokenizer = PTBTokenizer()
    gts, res = tokenizer.tokenize(gts), tokenizer.tokenize(res)
    out = dict(zip(("BLEU_1", "BLEU_2", "BLEU_3", "BLEU_4"), Bleu(4).compute_score(gts, res, verbose=0)[0]))
    meteor = Meteor()
    out["METEOR"] = meteor.compute_score(gts, res)[0]
    del meteor  # its __del__ ends the java process
    out["ROUGE_L"] = Rouge().compute_score(gts, res)[0]
    out["CIDEr"] = Cider().compute_score(gts, res)[0]
    return {k: float(v) for k, v in out.items()}


@pytest.mark.slow
@pytest.mark.ddp
@pytest.mark.skipif(shutil.which("java") is None, reason="captioning metrics need Java")
def test_caption_metrics_identical_on_one_and_two_processes(tmp_path):
    samples = make_samples(NUM_IMAGES)
    references = tmp_path / "captions.json"
    references.write_text(json.dumps(coco_captions(samples)))
    # one process takes the references from the batches; two processes from the DataModule's
    # eval_annotations() file: all three paths must agree. The runs overlap (most of their time is
    # process start-up and Java).
    one = start_worker(tmp_path / "one", 1, "--callbacks", "caption")
    two = start_worker(tmp_path / "two", 2, "--callbacks", "caption", "--captions-json", str(references))
    try:
        direct = direct_caption_metrics(samples)  # meanwhile, in this process
    finally:
        one, two = finish_all([(one, tmp_path / "one"), (two, tmp_path / "two")])

    assert one["world_size"] == 1 and two["world_size"] == 2
    caption_one, caption_two = one["metrics"]["caption"], two["metrics"]["caption"]
    assert caption_one == caption_two
    assert one["per_sample"] == two["per_sample"]
    check_per_sample(one["per_sample"]["caption"], caption_one, NUM_IMAGES)
    assert set(one["per_sample"]["caption"]["metrics"]) == {"ROUGE_L", "CIDEr"}  # BLEU / METEOR are not per-image means
    assert caption_one["num_samples"] == NUM_IMAGES
    assert {k: caption_one[k] for k in direct} == direct
    assert 0 < direct["BLEU_4"] < direct["BLEU_1"] < 1 and 0 < direct["METEOR"] < 1 and direct["CIDEr"] > 0
    # what was logged (float32 in Lightning): the same on both, and equal to the direct values
    assert one["logged"] == two["logged"]
    for name, value in direct.items():
        assert one["logged"][f"test/caption/{name}"] == pytest.approx(value, rel=1e-6)

    # the predictions file (rank 0), COCO results format, every image once
    written = json.loads((Path(two["log_dir"]) / "caption_predictions_test.json").read_text())
    texts = GeneratingDouble().generate(torch.stack([s["image"] for s in samples]))
    assert sorted(written, key=lambda r: r["image_id"]) == [
        {"image_id": s["image_id"], "caption": t} for s, t in zip(samples, texts)
    ]
    # and the qualitative table in TensorBoard: num_examples=4 rows under a header
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(two["log_dir"])
    events.Reload()
    table = events.Tensors("test/caption/examples/text_summary")[-1].tensor_proto.string_val[0].decode()
    assert table.count("\n") == 5 and f"| {samples[0]['image_id']} | {texts[0]} |" in table


@pytest.mark.slow
@pytest.mark.ddp
def test_retrieval_zeroshot_vqa_identical_on_one_and_two_processes(tmp_path):
    """The embedding-based callbacks and VQA: 1 and 2 processes log identical metrics, every sample
    once, and VQA equals lit_vlm.vqa on the whole set computed directly."""
    from ddp_eval_worker import vqa_files

    from lit_vlm.metrics import retrieval_metrics
    from lit_vlm.vqa import vqa_accuracy

    names = ["retrieval", "zeroshot", "vqa"]
    runs = [(start_worker(tmp_path / name, n, "--callbacks", *names), tmp_path / name) for name, n in (("one", 1), ("two", 2))]
    one, two = finish_all(runs)
    assert one["world_size"] == 1 and two["world_size"] == 2
    for name in names:
        assert one["metrics"][name] == two["metrics"][name], name
    assert one["logged"] == two["logged"]
    assert one["per_sample"] == two["per_sample"]  # what reports resample: identical under DDP too
    check_per_sample(one["per_sample"]["retrieval"], one["metrics"]["retrieval"], NUM_IMAGES)
    check_per_sample(one["per_sample"]["zeroshot"], one["metrics"]["zeroshot"], NUM_IMAGES)
    check_per_sample(one["per_sample"]["vqa"], one["metrics"]["vqa"], int(one["metrics"]["vqa"]["num_questions"]))
    assert {"i2t_R@1", "t2i_R@5", "overall"} <= set(one["per_sample"]["retrieval"]["metrics"]) | set(one["per_sample"]["vqa"]["metrics"])
    assert set(one["per_sample"]["retrieval"]["mean_of"]) == {"rmean", "mean_R@1"}

    samples = make_samples(NUM_IMAGES)
    num_questions = sum(len(s["questions"]) for s in samples)
    assert one["metrics"]["retrieval"]["num_samples"] == NUM_IMAGES == one["metrics"]["zeroshot"]["num_samples"]
    assert one["metrics"]["vqa"]["num_questions"] == num_questions > 10

    # VQA, directly: the double's answers to every question of the whole set
    double = GeneratingDouble()
    predictions = {}
    for s in samples:
        for q in s["questions"]:
            predictions[q["question_id"]] = double.generate(s["image"][None], [q["question"]])[0]
    _, annotations = vqa_files(samples)
    direct = vqa_accuracy(predictions, annotations)
    assert one["metrics"]["vqa"]["overall"] == pytest.approx(direct["overall"], abs=1e-12)

    # retrieval, directly: the double's embeddings of the whole set, in id order
    from ddp_eval_worker import CONTEXT_LENGTH, VOCAB

    from lit_vlm.datamodules.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_words(VOCAB)
    order = sorted(range(len(samples)), key=lambda i: samples[i]["sample_id"])
    images = torch.stack([samples[i]["image"] for i in order])  # [I, 3, H, W]
    captions = [c for i in order for c in samples[i]["captions"]]
    owner = torch.tensor([row for row, i in enumerate(order) for _ in samples[i]["captions"]])  # [T]
    ids, mask = tokenizer.encode(captions, CONTEXT_LENGTH)
    expected = retrieval_metrics(double.encode_image(images), double.encode_text(ids, mask), owner)
    for key in ("i2t_R@1", "i2t_R@5", "t2i_R@1", "t2i_R@5", "rmean"):
        assert one["metrics"]["retrieval"][key] == pytest.approx(expected[key], abs=1e-9), key


@pytest.mark.slow
@pytest.mark.ddp
def test_predictions_identical_on_one_and_two_processes(tmp_path):
    """lit-vlm predict's files: 2 processes (uneven shards, sample 0 seen by both) write exactly the
    rows of 1 process, every sample once, equal to the double applied to the whole set."""
    import numpy as np

    runs = [(start_worker(tmp_path / name, n, "--predict"), tmp_path / name) for name, n in (("one", 1), ("two", 2))]
    one, two = finish_all(runs)
    assert one["world_size"] == 1 and two["world_size"] == 2
    files = {}
    for name in ("one", "two"):
        folder = tmp_path / name / "predictions"
        index = [json.loads(line) for line in (folder / "index.jsonl").read_text().splitlines()]
        files[name] = (index, np.load(folder / "image_emb.npy"))
    (index_one, emb_one), (index_two, emb_two) = files["one"], files["two"]
    assert index_one == index_two and np.array_equal(emb_one, emb_two)

    samples = sorted(make_samples(NUM_IMAGES), key=lambda s: s["sample_id"])
    assert [row["sample_id"] for row in index_two] == [s["sample_id"] for s in samples]  # every sample once
    images = torch.stack([s["image"] for s in samples])
    double = GeneratingDouble()
    assert [row["caption"] for row in index_two] == double.generate(images)
    np.testing.assert_allclose(emb_two, double.encode_image(images).numpy(), rtol=0, atol=1e-6)


@pytest.mark.slow
@pytest.mark.ddp
def test_fewshot_identical_on_one_and_two_processes(tmp_path):
    """Few-shot evaluation shards its queries over the ranks: 1 and 2 processes give the same value
    for every task, method, shot count and seed (demonstrations are drawn per query, not per rank)."""
    from lit_vlm.datamodules import synth

    world = tmp_path / "world"
    synth.generate(world, synth.SynthConfig(num_train=8, num_val=2, num_test=5, shard_size=4, image_size=32, seed=5),
                   num_workers=1, progress=False)
    extra = ("--fewshot-root", str(world), "--model", "doubles.InterleavedDouble")
    runs = [(start_worker(tmp_path / name, n, *extra), tmp_path / name) for name, n in (("one", 1), ("two", 2))]
    one, two = finish_all(runs)
    assert one["world_size"] == 1 and two["world_size"] == 2
    values = one["metrics"]["fewshot"]
    assert len(values) == 3 * 2 * 2 and all(len(v) == 2 for v in values.values())  # tasks x methods x shots; 2 seeds
    assert values == two["metrics"]["fewshot"]
    assert one["logged"] == two["logged"]
    assert len({v for vals in values.values() for v in vals}) > 3  # the double's answers differ by prompt
    written = json.loads((Path(two["log_dir"]) / "fewshot_test.json").read_text())
    assert written["values"] == values
