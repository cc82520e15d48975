"""Training-free proxies: derivative methods agree, closed forms on linear networks, determinism,
the superformer path, the proxy scorer (fitness, RL/GA end to end) and auto-scaling."""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from vitas.core.config import ProxyConfig, load_config
from vitas.core.data import write_digits
from vitas.core.errors import UserError
from vitas.core.stage import execute
from vitas.search.proxies import measures as P
from vitas.search import runner
from vitas.search.scoring.proxy import ProxyScorer
from vitas.search.scaling import best_choice, candidates, deepen, scale, seed_stages, widen
from vitas.supernet.model import Superformer
from vitas.supernet.space import space_from_config
from vitas.supernet.static import StaticViT
from vitas.cli import main as cli_main

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "yamls" / "demo-digits.yaml"
TINY = {"patch_size": 8, "embed_dim": 16, "depth": 2, "num_heads": [2, 2], "attn_dim": [16, 16],
        "mlp_dim": [32, 32]}


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data") / "digits"
    write_digits(root)
    return root


def tiny_vit(seed: int = 0) -> StaticViT:
    torch.manual_seed(seed)
    return StaticViT(TINY, num_classes=10, img_size=32).eval()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b).norm(dim=1) / b.norm(dim=1)).max())


# ------------------------------------------------------------------ derivative methods
@pytest.mark.parametrize("norm,radius", [("identity", "unit"), ("keep", "sqrt_n")])
def test_velocity_and_acceleration_methods_agree(norm: str, radius: str) -> None:
    """Forward-mode AD, central differences and reverse-mode AD give the same v and a (float64)."""
    net = tiny_vit().double()
    shape = (3, 32, 32)
    u0, u1 = P.circle_basis(shape, 3, torch.float64)
    thetas = P.circle_thetas(4)
    r = P.circle_radius(shape, radius)
    out = {}
    with P.proxy_output(net, "features", norm, explicit_norm=True) as f:
        for method in ("jvp", "fd", "reverse"):
            out[method] = P.circle_derivatives(f, u0, u1, r, thetas, method)
    for method in ("fd", "reverse"):
        assert rel(out[method][0], out["jvp"][0]) < 1e-3, method
        assert rel(out[method][1], out["jvp"][1]) < 1e-3, method


def test_float32_length_distortion_fd_matches_jvp() -> None:
    """The default path (float32 central differences) gives L^E within 1e-3 of forward-mode AD."""
    net = tiny_vit()
    cfg = ProxyConfig()
    fd, _ = P.length_distortion(net, (3, 32, 32), 0, cfg, curvature=False)
    ad, _ = P.length_distortion(net, (3, 32, 32), 0, dataclasses.replace(cfg, velocity="jvp"), curvature=False)
    assert abs(fd / ad - 1) < 1e-3


# ------------------------------------------------------------------ closed forms
@pytest.mark.parametrize("radius", ["unit", "sqrt_n"])
def test_linear_network_closed_forms(radius: str) -> None:
    """f(x) = A x: L^E = sum_theta r ||A x'(theta)||; curvature of the image ellipse."""
    shape, D = (3, 4, 4), 5
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(math.prod(shape), D, bias=False)).double()
    A = net[1].weight.detach()
    cfg = ProxyConfig(radius=radius, output="logits", norm="keep", thetas=10)
    for velocity in ("fd", "jvp"):
        got_len, got_curv = P.length_distortion(net, shape, 7, dataclasses.replace(cfg, velocity=velocity),
                                                curvature=True, dtype=torch.float64)
        u0, u1 = (u.reshape(-1) for u in P.circle_basis(shape, 7, torch.float64))
        r = P.circle_radius(shape, radius)
        lengths, curvs = [], []
        for t in P.circle_thetas(10).tolist():
            v = A @ (r * (-u0 * math.sin(t) + u1 * math.cos(t)))
            a = -A @ (r * (u0 * math.cos(t) + u1 * math.sin(t)))
            lengths.append(float(v.norm()))
            curvs.append(math.sqrt(float(v @ v * (a @ a) - (v @ a) ** 2)) / float(v.norm()) ** 3)
        assert got_len == pytest.approx(sum(lengths), rel=1e-6), velocity
        assert got_curv == pytest.approx(sum(curvs) / len(curvs), rel=1e-4), velocity


@pytest.mark.parametrize("method", ["vmap", "loop"])
def test_linear_network_ntk_condition(method: str) -> None:
    """f(x) = sum(W x): per-sample gradients are 1 x^T, so Theta = D X X^T and kappa = cond(X X^T)."""
    torch.manual_seed(0)
    X = torch.randn(6, 10)
    net = nn.Linear(10, 4, bias=False)
    kappa = P.condition_number(P.ntk_spectrum(net, X, method))
    ev = torch.linalg.eigvalsh((X @ X.T).double())
    assert kappa == pytest.approx(float(ev[-1] / ev[0]), rel=1e-4)


def test_condition_number_invalid_cases() -> None:
    assert P.condition_number(torch.tensor([2.0, 10.0], dtype=torch.float64)) == pytest.approx(5.0)
    for bad in ([0.0, 1.0], [-1e-9, 1.0], [math.nan, 1.0], [1.0, math.inf]):
        assert P.condition_number(torch.tensor(bad, dtype=torch.float64)) is None


def test_record_with_singular_ntk_is_invalid() -> None:
    """Identical images make Theta singular: kappa None and valid False, L^E still a number."""
    net = tiny_vit()
    images = torch.randn(1, 3, 32, 32).expand(4, -1, -1, -1).contiguous()
    rec = P.proxy_scores(net, None, images, ProxyConfig(inits=1, thetas=4), curvature=False)
    assert rec["ntk_condition"] is None and rec["valid"] is False
    assert rec["length_distortion"] > 0


# ------------------------------------------------------------------ superformer path
@pytest.fixture(scope="module")
def demo_space():
    return space_from_config(load_config(DEMO))


def test_superformer_ntk_reaches_sliced_weights(demo_space) -> None:
    """The NTK of the active subnet (gradients through the slices taken inside forward) equals the
    NTK of the extracted static model."""
    sf = Superformer(demo_space, 10).eval()
    arch = demo_space.sample(np.random.default_rng(1))
    sf.set_active(arch)
    P.reinit(sf, 0)
    images = torch.randn(4, 3, 32, 32)
    in_place = P.ntk_spectrum(sf, images)
    extracted = P.ntk_spectrum(sf.extract(arch).eval(), images)
    assert torch.allclose(in_place, extracted, rtol=1e-4)
    assert float(in_place[0]) > 0


def test_proxies_deterministic_and_arch_dependent(demo_space) -> None:
    """Fixed seeds give identical proxies (also after scoring another arch); archs differ."""
    cfg = ProxyConfig(inits=2, thetas=4)
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    a, b = demo_space.min_arch(), demo_space.max_arch()
    sf = Superformer(demo_space, 10)
    first = P.proxy_scores(sf, a, images, cfg)
    P.proxy_scores(sf, b, images, cfg)
    again = P.proxy_scores(Superformer(demo_space, 10), a, images, cfg)
    other = P.proxy_scores(sf, b, images, cfg)
    assert first == again
    assert first["valid"] and other["valid"]
    for key in P.FIELDS:
        assert first[key] != other[key]


def test_reinit_is_per_tensor_and_leaves_global_rng(demo_space) -> None:
    sf = Superformer(demo_space, 10)
    state = torch.random.get_rng_state()
    P.reinit(sf, 5)
    assert torch.equal(state, torch.random.get_rng_state())
    w = sf.blocks[0].mlp.fc1.weight.detach().clone()
    P.reinit(sf, 5, {"blocks.0.mlp.fc1.weight"})
    assert torch.equal(w, sf.blocks[0].mlp.fc1.weight)
    P.reinit(sf, 6)
    assert not torch.equal(w, sf.blocks[0].mlp.fc1.weight)


def test_bad_proxy_option_is_user_error() -> None:
    with pytest.raises(UserError, match="proxy.radius"):
        P.check_proxy_config(ProxyConfig(radius="big"))


# ------------------------------------------------------------------ scorer
def scorer_cfg(out: Path, digits: Path, *overrides: str):
    return load_config(DEMO, [f"output_dir={out}", f"data.root={digits}", "proxy.inits=1",
                              "proxy.thetas=4", "proxy.ntk_images=4", *overrides])


def test_proxy_scorer_fitness(tmp_path, digits) -> None:
    recs = [{"length_distortion": 3.0, "ntk_condition": 10.0, "valid": True},
            {"length_distortion": 1.0, "ntk_condition": 100.0, "valid": True},
            {"length_distortion": 9.0, "ntk_condition": None, "valid": False},
            {"length_distortion": 2.0, "ntk_condition": 20.0, "valid": True}]
    fit = ProxyScorer(scorer_cfg(tmp_path, digits)).fitness(recs)
    assert list(fit[[0, 1, 3]]) == [-2.0, -6.0, -4.0]  # rank sums 1+1, 3+3, 2+2
    assert fit[2] < -6.0
    weighted = ProxyScorer(scorer_cfg(tmp_path, digits, "proxy.combine=weighted"))
    fit = weighted.fitness(recs)
    expect = [math.log(3) - math.log(10), math.log(1) - math.log(100), None, math.log(2) - math.log(20)]
    assert fit[0] == pytest.approx(expect[0]) and fit[3] == pytest.approx(expect[3])
    assert fit[2] < min(fit[0], fit[1], fit[3])
    with pytest.raises(UserError, match="proxy.combine must be one of"):
        ProxyScorer(scorer_cfg(tmp_path, digits, "proxy.combine=mean"))


@pytest.mark.parametrize("algorithm", ["rl", "ga"])
def test_search_with_proxy_scorer_end_to_end(tmp_path, digits, algorithm: str) -> None:
    cfg = scorer_cfg(tmp_path, digits, "search.scorer=proxy", f"search.algorithm={algorithm}",
                     "search.steps=3", "search.population=3", "search.generations=1")
    summary = execute(runner.STAGE, cfg)
    result = json.loads((tmp_path / "search" / "result.json").read_text())
    assert summary["scores"]["valid"] is True
    assert summary["scores"]["length_distortion"] > 0 and summary["scores"]["ntk_condition"] > 1
    assert (tmp_path / "search" / "arch.json").is_file() and result


def test_proxy_search_resumed_with_other_proxy_settings_is_refused(tmp_path, digits) -> None:
    """Cached L^E summed over 4 angles must not be ranked against L^E over 8."""
    args = ("search.scorer=proxy", "search.algorithm=ga", "search.population=3")
    execute(runner.STAGE, scorer_cfg(tmp_path, digits, *args, "search.generations=1"))
    more = scorer_cfg(tmp_path, digits, *args, "search.generations=2", "proxy.thetas=8")
    with pytest.raises(UserError, match="proxy.thetas=4"):
        execute(runner.STAGE, more)
    execute(runner.STAGE, scorer_cfg(tmp_path, digits, *args, "search.generations=2"))  # continues


def test_vitas_proxy_cli(tmp_path, digits, capsys) -> None:
    arch = json.dumps(TINY | {"embed_dim": 48, "attn_dim": [32, 32], "mlp_dim": [64, 64]})
    code = cli_main(["proxy", "-c", str(DEMO), f"data.root={digits}", f"output_dir={tmp_path}",
                     "proxy.inits=1", "proxy.thetas=4", "proxy.ntk_images=4", "--arch", arch])
    assert code == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(out) == {"length_distortion", "ntk_condition", "curvature", "valid"}
    assert out["valid"] and out["curvature"] > 0
    assert cli_main(["proxy", "-c", str(DEMO), f"data.root={digits}", "--arch", '{"depth": 2}']) == 2


# ------------------------------------------------------------------ scaling
def test_scaling_moves() -> None:
    arch = dict(TINY, depth=3, num_heads=[2, 4, 2], attn_dim=[16, 32, 16], mlp_dim=[32, 64, 48])
    stages = seed_stages(3)
    assert stages == [0, 1, 2]
    deeper, st = deepen(arch, stages, 1)
    assert deeper["depth"] == 4 and deeper["num_heads"] == [2, 4, 4, 2] and st == [0, 1, 1, 2]
    deeper, st = deepen(arch, stages, 3)  # empty last stage: copy of the layer before, at the end
    assert deeper["mlp_dim"] == [32, 64, 48, 48] and st == [0, 1, 2, 3]
    wide = widen(arch, 1.1)
    assert wide["embed_dim"] == 20 and wide["attn_dim"] == [18, 36, 18] and wide["mlp_dim"] == [36, 72, 54]
    assert all(a % h == 0 for a, h in zip(wide["attn_dim"], wide["num_heads"]))
    fixed = widen(dict(arch, attn_dim=[128, 256, 128]), 1.2, head_dim=64)
    assert fixed["attn_dim"] == [192, 320, 192] and fixed["num_heads"] == [3, 5, 3]
    cands = candidates(arch, stages)
    assert len(cands) == 16 and {c["ratio"] for c in cands} == {1.05, 1.1, 1.15, 1.2}


def test_best_choice_rank_sum() -> None:
    """Scaling keeps the best fitness of the configured scorer: by default As-ViT's rank sum."""
    scorer = ProxyScorer(load_config(DEMO))
    recs = [{"length_distortion": 1.0, "ntk_condition": 5.0, "valid": True},
            {"length_distortion": 3.0, "ntk_condition": 50.0, "valid": True},
            {"length_distortion": 2.0, "ntk_condition": 4.0, "valid": True},
            {"length_distortion": 9.0, "ntk_condition": None, "valid": False}]
    assert best_choice(recs, scorer) == 2  # rank sums 3+2, 1+3, 2+1
    tie = [dict(r, ntk_condition=k) for r, k in zip(recs[:3], (5.0, 6.0, 5.5))]
    assert best_choice(tie, scorer) == 0  # sums 4, 4, 4: the first wins
    assert best_choice([dict(r, valid=False) for r in recs], scorer) == -1
    weighted = ProxyScorer(load_config(DEMO, ["proxy.combine=weighted", "proxy.weights=[1,0]"]))
    assert best_choice(recs, weighted) == 1  # L^E alone


def test_scale_writes_trajectory_and_resumes(tmp_path, digits) -> None:
    seed = {"patch_size": 8, "embed_dim": 16, "depth": 1, "num_heads": [2], "attn_dim": [16], "mlp_dim": [32]}
    cfg = scorer_cfg(tmp_path, digits, "scale.param_limit=12000")
    path = tmp_path / "scale" / "trajectory.json"
    traj = scale(cfg, seed, path)
    steps = traj["steps"]
    assert steps[0]["arch"] == seed and len(steps) >= 2
    assert steps[-1]["params"] >= 12000 > steps[-2]["params"]
    assert all(len(s["candidates"]) == 16 for s in steps[1:])
    assert [s["arch"]["depth"] for s in steps] == list(range(1, len(steps) + 1))
    on_disk = json.loads((tmp_path / "scale" / "trajectory.json").read_text())
    assert on_disk["steps"][-1]["arch"] == steps[-1]["arch"]
    cfg2 = scorer_cfg(tmp_path, digits, "scale.param_limit=12000")
    assert scale(cfg2, seed, path)["steps"] == on_disk["steps"]  # nothing recomputed


def test_submit_scale_runs_the_stage_from_the_config(tmp_path, digits, capsys) -> None:
    """`vitas submit scale` (local executor) grows scale.seed_arch; without a seed,
    `vitas scale` is a one-line error."""
    seed = {"patch_size": 8, "embed_dim": 16, "depth": 1, "num_heads": [2], "attn_dim": [16], "mlp_dim": [32]}
    (tmp_path / "seed.json").write_text(json.dumps(seed))
    common = ["-c", str(DEMO), f"output_dir={tmp_path / 'run'}", f"data.root={digits}", "proxy.inits=1",
              "proxy.thetas=4", "proxy.ntk_images=4", "scale.param_limit=8000"]
    code = cli_main(["submit", "scale", *common, f"scale.seed_arch={tmp_path / 'seed.json'}",
                     "launch.executor=local", "--wait"])
    assert code == 0 and json.loads(capsys.readouterr().out.splitlines()[-1])["state"] == "completed"
    steps = json.loads((tmp_path / "run" / "scale" / "trajectory.json").read_text())["steps"]
    assert steps[0]["arch"] == seed and steps[-1]["params"] >= 8000 > steps[-2]["params"]
    assert cli_main(["scale", *common]) == 2
    assert "scale.seed_arch is not set" in capsys.readouterr().err


@pytest.mark.parametrize("combine", ["weighted", "ensemble", "rank_sum"])
def test_search_with_any_proxies_and_an_ensemble(tmp_path, digits, combine) -> None:
    """`search.scorer=proxy` with proxies and weights chosen in config, or an ensemble file:
    every chosen proxy is computed and the choice has the best fitness of the archive."""
    from vitas.search.proxies.ensemble import rank_ensemble

    names = ["length_distortion", "snip", "params"]
    extra = [f"proxy.names={json.dumps(names)}", "proxy.weights=[1.0, 0.5, 0.25]",
             f"proxy.combine={combine}", "proxy.zico_batches=2"]
    if combine == "ensemble":
        path = rank_ensemble(["synflow", "macs"], [1.0, 1.0]).save(tmp_path / "ens.json")
        extra.append(f"proxy.ensemble={path}")
    cfg = scorer_cfg(tmp_path, digits, "search.scorer=proxy", "search.population=4",
                     "search.generations=1", *extra)
    summary = execute(runner.STAGE, cfg)
    expect = ["synflow", "macs"] if combine == "ensemble" else names
    costs = {"params", "macs"}  # the architecture's own cost fields, beside the scores
    assert set(expect) - costs <= set(summary["scores"]) and summary["scores"]["valid"]
    result = json.loads((tmp_path / "search" / "result.json").read_text())
    scored = [r for r in result["evaluated"] if r["feasible"]]
    assert summary["fitness"] == max(r["fitness"] for r in scored)


def test_an_ensemble_scorer_without_its_file_is_one_line(tmp_path, digits, capsys) -> None:
    code = cli_main(["search", "-c", str(DEMO), f"output_dir={tmp_path / 'run'}", f"data.root={digits}",
                     "search.scorer=proxy", "proxy.combine=ensemble", f"proxy.ensemble={tmp_path / 'no.json'}"])
    assert code == 2 and "proxy.ensemble: file not found" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
