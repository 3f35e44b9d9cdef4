"""Few-shot in-context evaluation: OpenFlamingo's answer post-processing, the prompts (k
demonstrations, RICES most similar last, zero-shot as two text-only demonstrations)."""

from __future__ import annotations

import torch

from lit_vlm.callbacks.fewshot import FewShotEvaluation, _Images, postprocess_answer, postprocess_caption


def test_generations_are_cut_as_openflamingo_cuts_them():
    assert postprocess_answer(" yes Question: is it red? Short answer: no") == "yes"
    assert postprocess_answer("top left, top right") == "top left"
    assert postprocess_answer("2 Short") == "2"
    assert postprocess_caption(" a red circle. Output: a blue") == "a red circle."


def _pool_and_queries():
    pool = _Images(torch.arange(5.0)[:, None, None, None].expand(5, 3, 2, 2).clone(), ids=list(range(5)),
                   captions=[[f"caption {i}."] for i in range(5)], labels=[0, 1, 0, 1, 0],
                   questions=[(i, 100 + i, f"question {i}?", f"answer {i}") for i in range(5)])
    pool.features = torch.nn.functional.normalize(torch.tensor([[1.0, 0], [0.8, 0.6], [0, 1.0], [0.6, 0.8], [-1.0, 0]]), dim=-1)
    queries = _Images(torch.full((1, 3, 2, 2), 9.0), ids=["q"], captions=[["a query."]], labels=[1],
                      questions=[(0, 7, "what is it?", None)])
    queries.features = torch.tensor([[0.0, 1.0]])
    return pool, queries


def test_prompts_hold_k_demonstrations_rices_most_similar_last_and_zero_shot_text_only():
    callback = FewShotEvaluation(root="unused")
    pool, queries = _pool_and_queries()
    callback._pool, callback._pool_questions, callback._classes = pool, pool.questions, ["circle", "square"]
    rng = torch.Generator().manual_seed(0)
    # RICES: by cosine to the query (0, 1): pool 2 (1.0), 3 (0.8), 1 (0.6) -> the 3 most similar, the most similar last
    text, images = callback._prompt("captioning", "rices", 3, rng, queries, 0)
    assert text == ("<image>Output: caption 1.<|endofchunk|><image>Output: caption 3.<|endofchunk|>"
                    "<image>Output: caption 2.<|endofchunk|><image>Output:")
    assert [float(i[0, 0, 0]) for i in images] == [1.0, 3.0, 2.0, 9.0]
    text, images = callback._prompt("vqa", "rices", 2, rng, queries, queries.questions[0])
    assert text == ("<image>Question: question 3? Short answer: answer 3<|endofchunk|>"
                    "<image>Question: question 2? Short answer: answer 2<|endofchunk|><image>Question: what is it? Short answer:")
    text, images = callback._prompt("classification", "rices", 1, rng, queries, 0)
    assert text == "<image>Output: circle<|endofchunk|><image>Output:" and len(images) == 2
    # zero-shot: two demonstrations without their images; only the query's image is given
    text, images = callback._prompt("captioning", "random", 0, rng, queries, 0)
    assert text.count("<image>") == 1 and text.count("<|endofchunk|>") == 2 and text.endswith("<image>Output:")
    assert len(images) == 1 and float(images[0][0, 0, 0]) == 9.0
    # random demonstrations: k distinct pool images, drawn by the generator
    picks = {callback._prompt("captioning", "random", 4, torch.Generator().manual_seed(s), queries, 0)[0] for s in range(6)}
    assert len(picks) > 1 and all(p.count("<image>") == 5 for p in picks)
