"""SigLIP (gather and ring, chunked or not), focal and FILIP under 2-process CPU DDP (gloo).

For every loss, the DDP-averaged loss and gradients (of a tiny model's parameters, through real
DistributedDataParallel, and of each rank's input features) must equal those of one process
holding the whole global batch. All cases run inside ONE pair of worker processes
(tests/ddp_loss_worker.py runs :func:`run_rank` on each rank). With two ranks "next" and "previous"
on the ring are the same rank, so the ring cases and the ``ppermute`` exchange are run once more
with three ranks, where sending a gradient the wrong way round would show.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from ddp_procs import run_ranks

from lit_vlm.losses import clip_loss, filip_loss, focal_clip_loss, siglip_loss

pytestmark = pytest.mark.ddp

GLOBAL_BATCH = 12  # divisible by 2 and by 3 ranks
D_IN, D = 6, 5
PATCHES, TOKENS = 3, 4
ATOL = 1e-5

CASES = {
    # name: loss on the tiny model's embeddings (same call in one process and in each rank)
    "siglip_gather": lambda m, b: siglip_loss(*m.embed(b), m.scale(), m.bias, mode="gather"),
    "siglip_gather_chunk3": lambda m, b: siglip_loss(*m.embed(b), m.scale(), m.bias, mode="gather", chunk_size=3),
    "siglip_ring": lambda m, b: siglip_loss(*m.embed(b), m.scale(), m.bias, mode="ring"),
    "siglip_ring_chunk3": lambda m, b: siglip_loss(*m.embed(b), m.scale(), m.bias, mode="ring", chunk_size=3),
    "focal_sigmoid": lambda m, b: focal_clip_loss(*m.embed(b), m.scale(), gamma=2.0, form="sigmoid"),
    "focal_softmax": lambda m, b: focal_clip_loss(*m.embed(b), m.scale(), gamma=2.0, form="softmax"),
    "filip": lambda m, b: filip_loss(*m.embed_tokens(b), b["text_mask"], m.scale()),
    "filip_chunk3": lambda m, b: filip_loss(*m.embed_tokens(b), b["text_mask"], m.scale(), chunk_size=3),
    # hard negatives (some rows empty) as extra texts
    "clip_negatives": lambda m, b: clip_loss(*m.embed(b), m.scale(), **m.negatives(b)),
    "siglip_negatives": lambda m, b: siglip_loss(*m.embed(b), m.scale(), m.bias, chunk_size=3, **m.negatives(b)),
    "focal_sigmoid_negatives": lambda m, b: focal_clip_loss(*m.embed(b), m.scale(), form="sigmoid", **m.negatives(b)),
    "filip_negatives": lambda m, b: filip_loss(*m.embed_tokens(b), b["text_mask"], m.scale(), **m.negative_tokens(b)),
    "focal_sigmoid_bias": lambda m, b: focal_clip_loss(*m.embed(b), m.scale(), form="sigmoid", logit_bias=m.bias),
    "focal_softmax_negatives": lambda m, b: focal_clip_loss(*m.embed(b), m.scale(), form="softmax", **m.negatives(b)),
}
RING_CASES = ("siglip_ring", "siglip_ring_chunk3")
INPUTS = ("image", "text", "image_tokens", "text_tokens", "negatives")


class TinyTowers(torch.nn.Module):
    """Two linear projections, a learned log-scale and a bias: enough to check every gradient path."""

    def __init__(self) -> None:
        super().__init__()
        self.image = torch.nn.Linear(D_IN, D)
        self.text = torch.nn.Linear(D_IN, D)
        self.log_scale = torch.nn.Parameter(torch.tensor(math.log(4.0)))
        self.bias = torch.nn.Parameter(torch.tensor(-1.5))

    def scale(self) -> torch.Tensor:
        return self.log_scale.exp()

    def embed(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        return F.normalize(self.image(batch["image"]), dim=-1), F.normalize(self.text(batch["text"]), dim=-1)

    def negatives(self, batch: dict) -> dict[str, torch.Tensor]:
        return {"negative_emb": F.normalize(self.text(batch["negatives"]), dim=-1), "negative_valid": batch["negative_valid"]}

    def negative_tokens(self, batch: dict) -> dict[str, torch.Tensor]:
        tokens = F.normalize(self.text(batch["negatives"]), dim=-1)[:, :, None, :].expand(-1, -1, TOKENS, -1)  # [B, K, L, D]
        mask = torch.arange(TOKENS)[None, None, :] < 2  # [1, 1, L]: two real tokens each
        return {"negative_tokens": tokens, "negative_mask": mask.expand(tokens.shape[0], 2, TOKENS),
                "negative_valid": batch["negative_valid"]}

    def embed_tokens(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        image = F.normalize(self.image(batch["image_tokens"]), dim=-1)  # [B, P, D]
        text = F.normalize(self.text(batch["text_tokens"]), dim=-1)  # [B, L, D]
        return image, text

    def forward(self, case: str, batch: dict) -> dict[str, torch.Tensor]:
        return CASES[case](self, batch)


def make_model() -> TinyTowers:
    torch.manual_seed(0)
    return TinyTowers()


def make_batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    image = torch.randn(GLOBAL_BATCH, D_IN, generator=g)
    text = image + 0.7 * torch.randn(GLOBAL_BATCH, D_IN, generator=g)  # pairs are related: non-trivial loss
    lengths = torch.tensor([4, 2, 3, 1, 4, 3, 2, 1, 3, 4, 1, 2])
    return {
        "image": image,
        "text": text,
        "image_tokens": torch.randn(GLOBAL_BATCH, PATCHES, D_IN, generator=g),
        "text_tokens": torch.randn(GLOBAL_BATCH, TOKENS, D_IN, generator=g),
        "text_mask": torch.arange(TOKENS)[None, :] < lengths[:, None],  # [B, L] padding on the right
        "negatives": text[:, None, :] + 0.3 * torch.randn(GLOBAL_BATCH, 2, D_IN, generator=g),  # [B, K, D_IN] near the caption
        "negative_valid": torch.arange(2)[None, :] < (lengths[:, None] % 3),  # [B, K]: 0, 1 or 2 negatives per row
    }


def with_leaf_inputs(batch: dict) -> dict:
    return {k: v.clone().requires_grad_(True) if k in INPUTS else v for k, v in batch.items()}


def run_rank(rank: int, world: int) -> dict:
    """Run on each rank by tests/ddp_loss_worker.py: every case through DDP, plus the ring exchange itself."""
    return _run_cases(rank, world, list(CASES))


def run_ring_rank(rank: int, world: int) -> dict:
    """Like :func:`run_rank`, for the ring cases only (run with three ranks)."""
    return _run_cases(rank, world, list(RING_CASES))


def _run_cases(rank: int, world: int, cases: list[str]) -> dict:
    import torch.distributed as dist

    from lit_vlm.distributed import ppermute

    model = make_model().train()
    ddp = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
    per = GLOBAL_BATCH // world
    local = {k: v[rank * per : (rank + 1) * per] for k, v in make_batch().items()}
    results: dict = {}
    for case in cases:
        model.zero_grad(set_to_none=True)
        batch = with_leaf_inputs(local)
        loss = ddp(case, batch)["loss"]
        loss.backward()  # DDP averages parameter gradients over ranks
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss)
        results[case] = {
            "loss": mean_loss / world,
            "grads": {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None},
            # d(global loss)/d(this rank's inputs): the local loss's DDP weight is 1/world
            "input_grads": {k: batch[k].grad / world for k in INPUTS if batch[k].grad is not None},
        }
    # the ring exchange on its own: value from the previous rank, gradient from the next one
    x = torch.full((3,), float(rank + 1), requires_grad=True)
    y = ppermute(x, shift=1)
    (y * 10.0 * (rank + 1)).sum().backward()
    results["ppermute"] = {"received": y.detach(), "grad": x.grad.clone()}
    return results


def run_workers(target: str, out_dir: Path, world: int = 2, timeout: float = 120) -> list:
    """Start tests/ddp_loss_worker.py once per rank (plain subprocesses, gloo over loopback, a file store); their results."""
    worker = str(Path(__file__).with_name("ddp_loss_worker.py"))  # ranks meet through a file store in out_dir
    run_ranks([[worker, target, str(rank), str(world), str(out_dir)] for rank in range(world)], timeout)
    return [torch.load(out_dir / f"rank{rank}.pt") for rank in range(world)]


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    return run_workers("test_ddp_contrastive:run_rank", tmp_path_factory.mktemp("ddp_contrastive"))


@pytest.fixture(scope="module")
def ring3_results(tmp_path_factory):
    return run_workers("test_ddp_contrastive:run_ring_rank", tmp_path_factory.mktemp("ddp_ring3"), world=3)


def single_process(case: str, batch: dict) -> tuple[float, dict, dict]:
    model = make_model().train()
    batch = with_leaf_inputs(batch)
    loss = model(case, batch)["loss"]
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return loss.item(), grads, {k: batch[k].grad for k in INPUTS if batch[k].grad is not None}


def check_against_global_batch(case: str, ddp_results: list) -> None:
    ref_loss, ref_grads, ref_inputs = single_process(case, make_batch())
    for rank, got in enumerate(r[case] for r in ddp_results):
        assert got["loss"].item() == pytest.approx(ref_loss, abs=ATOL), rank
        nonzero = {n: g for n, g in got["grads"].items() if g.abs().max() > 0}  # DDP may zero-fill unused ones
        assert set(nonzero) == set(ref_grads), (rank, set(nonzero), set(ref_grads))
        for name, g in ref_grads.items():
            assert torch.allclose(got["grads"][name], g, atol=ATOL, rtol=0), (rank, name, got["grads"][name], g)
    assert set(ddp_results[0][case]["input_grads"]) == set(ref_inputs)
    for key, g in ref_inputs.items():
        got = torch.cat([r[case]["input_grads"][key] for r in ddp_results])  # ranks hold consecutive slices
        assert torch.allclose(got, g, atol=ATOL, rtol=0), (key, got, g)
    # the check is meaningful: the global batch is not what one rank would see alone
    half = {k: v[: GLOBAL_BATCH // len(ddp_results)] for k, v in make_batch().items()}
    assert abs(single_process(case, half)[0] - ref_loss) > 1e-3


@pytest.mark.parametrize("case", list(CASES))
def test_ddp_loss_and_grads_equal_global_batch(case, ddp_results):
    check_against_global_batch(case, ddp_results)


@pytest.mark.parametrize("case", RING_CASES)
def test_ring_with_three_ranks_equals_global_batch(case, ring3_results):
    check_against_global_batch(case, ring3_results)


@pytest.mark.parametrize("world", [2, 3])
def test_ddp_ppermute_passes_values_forward_and_gradients_back(world, ddp_results, ring3_results):
    for rank, r in enumerate(ddp_results if world == 2 else ring3_results):
        prev, nxt = (rank - 1) % world, (rank + 1) % world
        assert torch.equal(r["ppermute"]["received"], torch.full((3,), float(prev + 1)))
        # x went to the next rank, whose loss weighs what it received by 10 * (its rank + 1)
        assert torch.equal(r["ppermute"]["grad"], torch.full((3,), 10.0 * (nxt + 1)))
