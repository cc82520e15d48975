"""Superformer training options (issue: supernet training that ranks): in-place distillation in
every sampler, AlphaNet's bounded divergence, cost-aware sampling, gradient projection, max-subnet
warm-up. Each option's mechanism, on tiny models."""
from __future__ import annotations

import dataclasses
import json
from collections import Counter
from pathlib import Path
from typing import Optional

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vitas.core.config import SupernetConfig, config_from_dict, load_config
from vitas.core.engine import Trainer, project_off
from vitas.core.errors import UserError
from vitas.supernet import train as supernet_train
from vitas.supernet.model import Superformer
from vitas.supernet.sampling import CostBins, SubnetSampler
from vitas.supernet.space import SearchSpace

from train_setup import TINY_SPACE, tiny_space

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "yamls" / "demo-digits.yaml"


def demo_space() -> SearchSpace:
    return SearchSpace(load_config(DEMO).space)


def cost_fn(space: SearchSpace):
    return lambda arch: space.cost(arch, 10)


# ----------------------------------------------------------------------------- cost-aware sampling
def test_cost_bins_are_drawn_evenly_where_genes_are_not() -> None:
    space = demo_space()
    bins = CostBins(space, cost_fn(space), bins=6)
    rng = np.random.default_rng(0)
    drawn = Counter(bins.bin_of(space.cost(bins.draw(rng), 10).macs) for _ in range(1800))
    counts = [drawn[i] for i in range(len(bins.bins))]
    assert len(bins.bins) >= 4 and min(counts) > 0.75 * 1800 / len(bins.bins), counts
    genes = Counter()
    for _ in range(1800):
        macs = space.cost(space.sample(rng), 10).macs
        genes[next((i for i, (lo, hi) in enumerate(bins.bins) if lo <= macs <= hi), -1)] += 1
    uneven = [genes[i] for i in range(len(bins.bins))]
    assert max(uneven) > 2 * min(uneven), uneven  # what the option corrects


def test_a_bin_holding_a_sliver_of_the_space_is_drawn_as_often_and_never_fails() -> None:
    """The fidelity space's top MACs bin holds ~0.03 % of the genes: rejection sampling once
    failed there after 1,840 training steps. The pooled bins draw it like any other."""
    from vitas.core.config import load_config
    from vitas.supernet.space import space_from_config

    space = space_from_config(load_config(ROOT / "yamls" / "fidelity-counting.yaml"))
    bins = CostBins(space, lambda a: space.cost(a, 6), bins=8)
    assert len(bins.bins) == 8 and len(bins.pools[-1]) < 0.001 * sum(map(len, bins.pools))
    rng = np.random.default_rng(0)
    drawn = Counter(bins.bin_of(space.cost(bins.draw(rng), 6).macs) for _ in range(4000))
    assert min(drawn[i] for i in range(8)) > 0.8 * 500, drawn
    arch = bins.draw(rng)
    arch["mlp_dim"].append(0)  # a caller's edit does not reach the pool
    assert all(len(a["mlp_dim"]) == a["depth"] for pool in bins.pools for a in pool)


# ----------------------------------------------------------------------------- passes
def sampler(space: Optional[SearchSpace] = None, **options) -> SubnetSampler:
    space = space or tiny_space()
    sec = dataclasses.replace(SupernetConfig(epochs=3), **options)
    return SubnetSampler(space, sec, cost_fn(space))


def test_distillation_adds_the_teacher_to_every_sampler() -> None:
    for mode in ("uniform", "autoslim", "sandwich"):
        passes = sampler(sampling=mode, distill=True).passes(step=4, epoch=1)
        assert passes[0].name == "max" and [p.name for p in passes].count("max") == 1
    assert [p.name for p in sampler(sampling="uniform").passes(4, 1)] == ["rand"]


def test_extra_random_subnets_keep_the_first_draw_and_draw_anew() -> None:
    space = demo_space()
    for mode, names in [("sandwich", ["max", "min", "rand", "rand2", "rand3"]), ("uniform", ["rand", "rand2", "rand3"]),
                        ("autoslim", ["rand", "rand2", "rand3"])]:
        distinct = 0
        for step in range(30):
            one = sampler(space, sampling=mode).passes(step, 1)
            three = sampler(space, sampling=mode, random_subnets=3).passes(step, 1)
            assert [p.name for p in three] == names and three[:len(one)] == one  # a run with one is unchanged
            distinct += len({space.key(p.arch) for p in three if p.name.startswith("rand")}) == 3
        assert distinct >= 25  # fresh draws, not copies of the first
    binned = sampler(space, sampling="sandwich", random_subnets=2, cost_sampling="macs_bins", cost_bins=4)
    pooled = {space.key(a) for pool in binned.bins.pools for a in pool}
    assert all(space.key(p.arch) in pooled for step in range(20) for p in binned.passes(step, 1)[2:])


def test_patch_cycle_gives_each_patch_size_the_max_and_min_passes_in_turn() -> None:
    space = tiny_space()
    s = sampler(sampling="sandwich", patch_cycle=True, max_warmup_epochs=1)
    assert s.passes(3, 0)[0].arch == space.max_arch()  # the warm-up keeps the space's max subnet
    seen: Counter = Counter()
    for step in range(40):
        passes = s.passes(step, 1)
        plain = sampler(sampling="sandwich").passes(step, 1)
        assert [p.name for p in passes] == ["max", "min", "rand"] and passes[2] == plain[2]
        for p, q in zip(passes[:2], plain[:2]):
            assert p.arch == {**q.arch, "patch_size": p.arch["patch_size"]}
        assert passes[0].arch["patch_size"] == passes[1].arch["patch_size"]
        seen[passes[0].arch["patch_size"]] += 1
    assert seen == {8: 20, 16: 20} and space.max_arch()["patch_size"] == 8
    assert sampler(sampling="sandwich", patch_cycle=True).passes(5, 1) == s.passes(5, 1)  # step alone


def test_without_identity_shifting_each_pass_runs_on_blocks_drawn_anywhere() -> None:
    space = tiny_space(depth=[1, 2, 3], identity=True)
    s = sampler(space, sampling="sandwich", identity_shift=False)
    where: Counter = Counter()
    for step in range(300):
        passes, plain = s.passes(step, 1), sampler(space, sampling="sandwich").passes(step, 1)
        assert [p.arch for p in passes] == [p.arch for p in plain] and plain[0].layers is None
        for p in passes:
            depth = space.canonical(p.arch)["depth"]
            assert len(p.layers) == depth and list(p.layers) == sorted(set(p.layers))
            assert 0 <= p.layers[0] and p.layers[-1] < 3
        where[passes[1].layers[0]] += 1  # the min subnet: one layer
    assert set(where) == {0, 1, 2} and min(where.values()) > 70  # even over the 3 blocks
    assert s.passes(7, 1) == sampler(space, sampling="sandwich", identity_shift=False).passes(7, 1)


def test_max_warmup_trains_the_max_subnet_alone_first() -> None:
    s = sampler(sampling="sandwich", max_warmup_epochs=1)
    assert [p.name for p in s.passes(3, 0)] == ["max"]
    assert [p.name for p in s.passes(3, 1)] == ["max", "min", "rand"]


def test_progressive_shrinking_holds_fields_at_max_until_their_turn_then_samples_as_plain() -> None:
    space = tiny_space()
    options = dict(sampling="sandwich", epochs=8, max_warmup_epochs=1,
                   progressive=["depth", "num_heads+attn_dim", "embed_dim"], progressive_epochs=6)
    s, top = sampler(**options), space.max_arch()
    assert s.schedule == [(1, ["depth"]), (3, ["num_heads", "attn_dim"]), (5, ["embed_dim"])]
    assert [p.name for p in s.passes(0, 0)] == ["max"]
    held = {1: ("num_heads", "attn_dim", "embed_dim"), 3: ("embed_dim",), 5: ()}
    for epoch, fields in held.items():
        seen: dict[str, set] = {f: set() for f in ("depth", "num_heads", "attn_dim", "embed_dim", "mlp_dim", "patch_size")}
        for step in range(60):
            passes = s.passes(step, epoch)
            assert passes[0].arch == top and [p.name for p in passes] == ["max", "min", "rand"]
            for p in passes:
                space.validate(p.arch)
                for f in fields:
                    assert p.arch[f] == (top[f] if f == "embed_dim" else [top[f][0]] * p.arch["depth"])
                for f in seen:
                    seen[f].add(json.dumps(p.arch[f]))
        free = {"depth", "num_heads", "attn_dim", "embed_dim", "mlp_dim", "patch_size"} - set(fields)
        assert all(len(seen[f]) > 1 for f in free), seen  # the released fields and the unlisted ones vary
    assert s.passes(17, 1)[1].arch == {**top, "depth": 1, "num_heads": [top["num_heads"][0]],
                                       "attn_dim": [top["attn_dim"][0]], "mlp_dim": [16], "patch_size": 16}
    plain = sampler(sampling="sandwich", epochs=8, max_warmup_epochs=1)
    for step in range(40):  # everything released: the plain sampler's passes, step for step
        assert s.passes(step, 5) == plain.passes(step, 5) and s.passes(step, 7) == plain.passes(step, 7)
    assert sampler(**options).passes(9, 3) == s.passes(9, 3)  # a function of (step, epoch) alone


def test_progressive_default_span_is_half_the_epochs_after_the_warmup() -> None:
    s = sampler(sampling="uniform", epochs=20, max_warmup_epochs=2, progressive=["depth", "mlp_dim", "embed_dim"])
    assert s.schedule == [(2, ["depth"]), (5, ["mlp_dim"]), (8, ["embed_dim"])]


@pytest.mark.parametrize("options, space_changes, needle", [
    ({"progressive": ["width"]}, {}, "unknown arch field 'width'"),
    ({"progressive": ["depth", "embed_dim+depth"]}, {}, "names a field twice"),
    ({"progressive": ["depth"], "cost_sampling": "macs_bins"}, {}, "cost_sampling=macs_bins"),
    ({"progressive_epochs": 2}, {}, "lists no field"),
    ({"progressive": ["depth", "embed_dim", "mlp_dim"], "progressive_epochs": 2}, {}, "an epoch per item"),
    ({"progressive": ["depth"], "progressive_epochs": 3, "max_warmup_epochs": 1}, {}, "an epoch per item"),
    ({"progressive": ["attn_dim"]}, {"attn_dim": None, "head_dim": 8}, "attn_dim follows num_heads"),
], ids=["unknown", "twice", "bins", "epochs-alone", "too-short", "past-the-end", "head-dim"])
def test_progressive_refuses_what_cannot_run(options: dict, space_changes: dict, needle: str) -> None:
    with pytest.raises(UserError, match=needle):
        sampler(tiny_space(**space_changes), sampling="sandwich", **options)


# ----------------------------------------------------------------------------- distillation
def one_step(options: dict, tmp_path: Path):
    """A Superformer, its Trainer and one train step of the tiny space with `options`."""
    cfg = config_from_dict({"space": TINY_SPACE, "supernet": {"epochs": 2, "lr": 1e-3, "drop_path": 0.0,
                                                              "amp": False, "warmup_epochs": 0, **options}})
    space = SearchSpace(cfg.space)
    torch.manual_seed(0)
    model = Superformer(space, 10)
    trainer = Trainer(model, cfg.supernet, 5, tmp_path, torch.device("cpu"))
    s = SubnetSampler(space, cfg.supernet, cost_fn(space))
    step = supernet_train.make_train_step(trainer, s, space, cfg, None, torch.nn.CrossEntropyLoss())
    images, target = torch.randn(6, 3, 32, 32), torch.randint(0, 10, (6,))
    return model, trainer, s, step, (images, target)


def test_distillation_targets_are_the_max_subnet_without_gradient(tmp_path: Path, monkeypatch) -> None:
    seen = []
    real = supernet_train.distill_loss

    def spy(logits, teacher, kind):
        seen.append(teacher)
        return real(logits, teacher, kind)

    monkeypatch.setattr(supernet_train, "distill_loss", spy)
    model, trainer, s, step, batch = one_step({"sampling": "uniform", "distill": True}, tmp_path)
    before = Superformer(model.space, 10)
    before.load_state_dict(model.state_dict())
    before.set_max()
    with torch.no_grad():
        expected = F.softmax(before(batch[0]), dim=-1)
    step(batch)
    assert len(seen) == 1 and not seen[0].requires_grad and seen[0].grad_fn is None
    assert torch.allclose(seen[0], expected, atol=1e-6)


def test_alpha_divergence_is_zero_at_the_teacher_and_bounded() -> None:
    torch.manual_seed(0)
    logits = torch.randn(4, 10, requires_grad=True)
    teacher = F.softmax(logits.detach(), dim=-1)
    assert supernet_train.distill_loss(logits, teacher, "alpha").item() == pytest.approx(0.0, abs=1e-6)
    far = torch.zeros(4, 10)
    far[:, 0] = 1.0  # a confident teacher against a very different student
    student = torch.full((4, 10), -20.0)
    student[:, 9] = 20.0
    student.requires_grad_(True)
    loss = supernet_train.distill_loss(student, far, "alpha")
    loss.backward()
    assert loss.item() > 0 and torch.isfinite(student.grad).all() and student.grad.abs().max() < 10


# ----------------------------------------------------------------------------- gradient projection
def test_projection_removes_exactly_the_conflicting_component() -> None:
    g1 = torch.tensor([1.0, 0.0, 2.0])
    g2 = torch.tensor([-2.0, 1.0, 1.0])  # dot = 0: no conflict
    assert torch.equal(project_off(g2, g1), g2)
    g2 = torch.tensor([-3.0, 1.0, 1.0])  # dot = -1: conflict
    out = project_off(g2, g1)
    assert torch.dot(out, g1).abs() < 1e-6
    assert torch.allclose(out - g2, (1 / 5) * g1)  # only along g1


def test_a_projected_step_holds_the_max_gradient_plus_the_projected_rest(tmp_path: Path) -> None:
    """The step's gradient = g_max + (g_rest projected off g_max): orthogonal to g_max where they
    conflicted, whatever the others contributed."""
    options = {"sampling": "sandwich", "grad_projection": True}
    model, trainer, s, step, batch = one_step(options, tmp_path)
    passes = s.passes(0, 0)
    reference = Superformer(model.space, 10)
    reference.load_state_dict(model.state_dict())
    params = dict(reference.named_parameters())

    def grads(names: list[str]) -> torch.Tensor:
        return torch.cat([params[n].grad.reshape(-1) if params[n].grad is not None
                          else torch.zeros(params[n].numel()) for n in names])

    crit = torch.nn.CrossEntropyLoss()
    reference.set_active(passes[0].arch, passes[0].side)
    crit(reference(batch[0]), batch[1]).backward()
    names = list(params)
    g_max = grads(names).clone()
    reference.zero_grad(set_to_none=True)
    for p in passes[1:]:
        reference.set_active(p.arch, p.side)
        crit(reference(batch[0]), batch[1]).backward()
    g_rest = grads(names)
    expected = g_max + project_off(g_rest, g_max)

    captured = {}
    real_step = trainer.step

    def capture() -> dict:
        captured["grad"] = torch.cat([p.grad.reshape(-1) if p.grad is not None else torch.zeros(p.numel())
                                      for p in model.parameters()])
        return real_step()

    trainer.step = capture  # type: ignore[method-assign]
    scalars = step(batch)
    trainer.step()
    assert torch.allclose(captured["grad"], expected, atol=1e-6)
    cosine = float(torch.dot(g_max, g_rest) / (g_max.norm() * g_rest.norm()))
    assert scalars["grad_cosine"] == pytest.approx(cosine, abs=1e-5)
    if cosine < 0:
        assert torch.dot(captured["grad"] - g_max, g_max).abs() < 1e-5
