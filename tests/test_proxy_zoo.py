"""The proxy zoo: each proxy against a closed form or a hand computation on a tiny network, As-ViT's
NTK conventions (pooled features, averaged over inits), invariances, determinism, invalid marking."""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import kendalltau
from torch import nn

from vitas.core.config import ProxyConfig, load_config
from vitas.core.errors import UserError
from vitas.search.proxies import measures as P
from vitas.search.proxies import ensemble, zoo
from vitas.search.proxies.activation import nwot
from vitas.search.proxies.gradients import layer_weights, linearised_gradients, loss_gradients
from vitas.search.proxies.saliency import dss, snip, synflow
from vitas.search.proxies.zico import zico
from vitas.supernet.complexity import arch_cost
from vitas.supernet.model import Superformer
from vitas.supernet.space import space_from_config
from vitas.supernet.static import StaticViT

ROOT = Path(__file__).resolve().parents[1]
TINY = {"patch_size": 8, "embed_dim": 16, "depth": 2, "num_heads": [2, 2], "attn_dim": [16, 16],
        "mlp_dim": [32, 32]}


def tiny_vit(seed: int = 0) -> StaticViT:
    torch.manual_seed(seed)
    return StaticViT(TINY, num_classes=10, img_size=32).eval()


def batch(n: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g), torch.arange(n) % 10


def softmax_linear_grad(W: np.ndarray, X: np.ndarray, y: np.ndarray) -> np.ndarray:
    """dL/dW of the mean cross-entropy of logits X W^T (hand-written)."""
    z = X @ W.T
    p = np.exp(z - z.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    p[np.arange(len(y)), y] -= 1.0
    return p.T @ X / len(y)


def linear_classifier(d: int = 12, classes: int = 5, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(d, classes, bias=False)).double()


# ------------------------------------------------------------------ closed forms
def test_snip_and_zico_of_a_linear_classifier_match_hand_computation() -> None:
    """Logits W x with cross-entropy: dL/dW = (softmax - onehot)^T X / n per batch."""
    net = linear_classifier()
    g = torch.Generator().manual_seed(1)
    X = torch.randn(8, 12, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 3, 4, 0, 1, 2])
    W = net[1].weight.detach().numpy()
    grads = loss_gradients(net, X, y, batches=2)
    G = [softmax_linear_grad(W, X[b::2].numpy(), y[b::2].numpy()) for b in (0, 1)]  # interleaved batches
    np.testing.assert_allclose(grads[1]["1.weight"].numpy(), G[1], rtol=1e-10)
    whole = softmax_linear_grad(W, X.numpy(), y.numpy())
    assert snip(layer_weights(net), grads) == pytest.approx(float(np.abs(W * whole).sum()), rel=1e-10)
    std = np.abs(G[0] - G[1]) / 2  # two batches: the population std is half their difference
    mean_abs = (np.abs(G[0]) + np.abs(G[1])) / 2
    assert zico(grads) == pytest.approx(math.log(float((mean_abs[std > 0] / std[std > 0]).sum())), rel=1e-10)


def test_zico_is_invariant_to_scaling_the_loss() -> None:
    net, (x, y) = tiny_vit().double(), batch()  # float64: in float32 rounding moves it by ~1e-4
    x = x.double()
    plain = zico(loss_gradients(net, x, y, 2))
    scaled = zico(loss_gradients(net, x, y, 2, loss_fn=lambda z, t: 7.0 * nn.functional.cross_entropy(z, t)))
    assert scaled == pytest.approx(plain, rel=1e-6)


def test_zico_without_varying_gradients_is_invalid() -> None:
    """Two identical batches: every gradient has zero spread, nothing to measure."""
    net = tiny_vit()
    x, y = batch(4)
    x, y = x.repeat_interleave(2, dim=0), y.repeat_interleave(2)  # batch 0 and batch 1 alike
    assert zico(loss_gradients(net, x, y, 2)) is None


def test_synflow_of_a_linear_chain_is_twice_the_path_sum() -> None:
    """R = 1^T |W2| |W1| 1 and, per layer, sum |W * dR/dW| = R: synflow = 2 R."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(6, 4, bias=False), nn.Linear(4, 3, bias=False))
    W1, W2 = (np.abs(net[i].weight.detach().numpy().astype(np.float64)) for i in (1, 2))
    R = float(np.ones(3) @ W2 @ W1 @ np.ones(6))
    assert synflow(linearised_gradients(net, (6,))) == pytest.approx(2 * R, rel=1e-10)
    assert (net[1].weight < 0).any()  # the model itself was not made positive


class ToyBlock(nn.Module):
    """x -> attn.qkv -> attn.proj -> mlp.fc1 -> mlp.fc2 -> head, all linear (a hand-checkable DSS)."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.Module()
        self.attn.qkv, self.attn.proj = nn.Linear(5, 6, bias=False), nn.Linear(6, 5, bias=False)
        self.mlp = nn.Module()
        self.mlp.fc1, self.mlp.fc2 = nn.Linear(5, 7, bias=False), nn.Linear(7, 5, bias=False)
        self.head = nn.Linear(5, 3, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.mlp.fc2(self.mlp.fc1(self.attn.proj(self.attn.qkv(x)))))


def test_dss_of_a_linear_chain_matches_hand_computation() -> None:
    """dR/d|A_i| = outer(left, right) of the path products; the attention terms are nuclear-norm
    products, each MLP term equals R; the head is not part of DSS."""
    torch.manual_seed(0)
    net = ToyBlock()
    mats = [np.abs(m.weight.detach().numpy().astype(np.float64))
            for m in (net.attn.qkv, net.attn.proj, net.mlp.fc1, net.mlp.fc2, net.head)]
    R = float(np.ones(3) @ mats[4] @ mats[3] @ mats[2] @ mats[1] @ mats[0] @ np.ones(5))
    expect = 2 * R
    for i in (0, 1):  # qkv, proj
        left = np.ones(3)
        for m in mats[:i:-1]:
            left = left @ m
        right = np.ones(5)
        for m in mats[:i]:
            right = m @ right
        grad = np.outer(left, right)
        expect += np.linalg.norm(grad, "nuc") * np.linalg.norm(mats[i], "nuc")
    assert dss(linearised_gradients(net, (5,))) == pytest.approx(expect, rel=1e-10)


def test_nwot_matches_hand_computed_kernel_and_ignores_input_scale() -> None:
    """K = c c^T + (1-c)(1-c)^T of the ReLU patterns; a bias-free ReLU net's pattern does not
    change when the inputs are scaled by a positive number."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(10, 40, bias=False), nn.ReLU(), nn.Linear(40, 3, bias=False))
    X = torch.randn(6, 10)
    c = (X @ net[0].weight.detach().T > 0).double().numpy()
    K = c @ c.T + (1 - c) @ (1 - c).T
    assert nwot(net, X) == pytest.approx(float(np.linalg.slogdet(K)[1]), rel=1e-10)
    assert nwot(net, 3.5 * X) == nwot(net, X)
    assert nwot(net, torch.cat([X[:3], X[:3]])) is None  # repeated images: K singular
    assert nwot(nn.Linear(10, 3), X) is None  # no activations to take a pattern of


# ------------------------------------------------------------------ As-ViT's NTK conventions
class PooledFeatures(nn.Module):
    """A StaticViT up to the pooled tokens before the final norm, written out independently."""

    def __init__(self, vit: StaticViT) -> None:
        super().__init__()
        self.patch_embed, self.blocks = vit.patch_embed, vit.blocks
        self.cls_token, self.pos_embed = vit.cls_token, vit.pos_embed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.patch_embed(x)
        t = torch.cat([self.cls_token.expand(len(t), -1, -1), t], dim=1) + self.pos_embed
        for block in self.blocks:
            t = block(t)
        return t[:, 0]  # TINY pools the class token


def test_ntk_features_differentiates_pooled_features_before_the_final_norm() -> None:
    net, (x, _) = tiny_vit(), batch(6)
    cfg = ProxyConfig()
    features = P.ntk_condition(net, x, cfg)
    expect = P.condition_number(P.ntk_spectrum(PooledFeatures(net), x, "loop"))
    assert features == pytest.approx(expect, rel=1e-4)
    logits = P.ntk_condition(net, x, dataclasses.replace(cfg, ntk_output="logits"))
    assert logits == pytest.approx(P.condition_number(P.ntk_spectrum(net, x, "loop")), rel=1e-4)
    with torch.no_grad():
        net.head.weight.mul_(3.0).add_(0.5)
    assert P.ntk_condition(net, x, cfg) == pytest.approx(features, rel=1e-6)  # head not in it
    assert P.ntk_condition(net, x, dataclasses.replace(cfg, ntk_output="logits")) != pytest.approx(logits, rel=1e-3)


def test_ntk_condition_is_invariant_to_scaling_the_output() -> None:
    """Theta scales by c^2 when the output does: kappa is unchanged."""
    net, (x, _) = tiny_vit(), batch(6)
    scaled = nn.Sequential(net, nn.Linear(10, 10, bias=False))
    with torch.no_grad():
        scaled[1].weight.copy_(4.0 * torch.eye(10))
    base = P.condition_number(P.ntk_spectrum(net, x, "loop"))
    grads = P.ntk_gradients(scaled, x, "loop")[:-1]  # the scaling layer's own weight left out
    theta = sum(g.double() @ g.double().T for g in grads)
    assert P.condition_number(torch.linalg.eigvalsh(theta)) == pytest.approx(base, rel=1e-5)


def test_kappa_is_averaged_over_initialisations_as_as_vit() -> None:
    net, (x, _) = tiny_vit(), batch(6)
    cfg = ProxyConfig(inits=3, thetas=4)
    per_init = [P.ntk_condition(P.initialised(net, None, cfg.seed + k), x, cfg) for k in range(3)]
    assert zoo.compute_proxies(["ntk_condition"], net, None, x, cfg)["ntk_condition"] == pytest.approx(
        sum(per_init) / 3, rel=1e-9)
    first = zoo.compute_proxies(["ntk_condition"], net, None, x, dataclasses.replace(cfg, ntk_average=False))
    assert first["ntk_condition"] == pytest.approx(per_init[0], rel=1e-9)
    assert P.proxy_scores(net, None, x, cfg, curvature=False)["ntk_condition"] == pytest.approx(
        sum(per_init) / 3, rel=1e-9)


# ------------------------------------------------------------------ the zoo
@pytest.fixture(scope="module")
def demo_space():
    return space_from_config(load_config(ROOT / "yamls" / "demo-digits.yaml"))


def test_every_proxy_is_deterministic_and_depends_on_the_arch(demo_space) -> None:
    cfg = ProxyConfig(inits=2, thetas=4)
    x, y = batch(8)
    a, b = demo_space.min_arch(), demo_space.max_arch()
    sf = Superformer(demo_space, 10)
    first = zoo.compute_proxies(zoo.NAMES, sf, a, x, cfg, y)
    zoo.compute_proxies(zoo.NAMES, sf, b, x, cfg, y)
    again = zoo.compute_proxies(zoo.NAMES, Superformer(demo_space, 10), a, x, cfg, y)
    other = zoo.compute_proxies(zoo.NAMES, sf, b, x, cfg, y)
    assert first == again
    assert first["valid"] and other["valid"]
    for name in zoo.NAMES:
        assert first[name] != other[name], name
    assert (first["params"], first["macs"]) == tuple(arch_cost(a, demo_space, 10))


def test_per_init_proxies_are_averaged_over_the_redrawn_inits() -> None:
    net, (x, y) = tiny_vit(), batch(8)
    cfg = ProxyConfig(inits=2, thetas=4)
    values = []
    for k in range(2):
        m = P.initialised(net, None, cfg.seed + k)
        values.append(zico(loss_gradients(m, x, y, 2)))
    assert zoo.compute_proxies(["zico"], net, None, x, cfg, y)["zico"] == pytest.approx(sum(values) / 2, rel=1e-9)


def test_data_free_proxies_do_not_depend_on_the_images() -> None:
    net, (x, y) = tiny_vit(), batch(8)
    cfg = ProxyConfig(inits=1, thetas=4)
    one = zoo.compute_proxies(["synflow", "dss", "params", "macs"], net, None, x, cfg)
    two = zoo.compute_proxies(["synflow", "dss", "params", "macs"], net, None, 5 * x + 1, cfg)
    assert one == two


def test_plain_model_cost() -> None:
    net, (x, _) = tiny_vit(), batch(2)
    rec = zoo.compute_proxies(["params", "macs"], net, None, x, ProxyConfig())
    assert rec["params"] == sum(p.numel() for p in net.parameters())
    tokens, E = 17, 16  # (32/8)^2 patches + class token
    per_layer = tokens * (4 * 16 * E + 2 * E * 32) + 2 * tokens * tokens * 16
    assert rec["macs"] == 16 * 3 * 64 * E + 2 * per_layer + E * 10


def test_non_finite_or_degenerate_values_are_invalid_never_numbers() -> None:
    net, (x, y) = tiny_vit(), batch(8)
    cfg = ProxyConfig(inits=2, thetas=4)
    same = x[:1].expand(8, -1, -1, -1).contiguous()
    rec = zoo.compute_proxies(["length_distortion", "ntk_condition", "nwot", "zico"], net, None, same, cfg, y)
    assert rec["ntk_condition"] is None and rec["nwot"] is None and rec["valid"] is False
    assert rec["length_distortion"] > 0  # the circle does not use the images
    nan = x.clone()
    nan[0, 0, 0, 0] = math.nan
    rec = zoo.compute_proxies(["snip", "synflow"], net, None, nan, cfg, y)
    assert rec["snip"] is None and rec["synflow"] is not None and rec["valid"] is False


def test_bad_requests_are_user_errors() -> None:
    net, (x, y) = tiny_vit(), batch(6)
    with pytest.raises(UserError, match="unknown proxy 'grad_norm'"):
        zoo.compute_proxies(["grad_norm"], net, None, x, ProxyConfig())
    with pytest.raises(UserError, match="need the labels"):
        zoo.compute_proxies(["snip"], net, None, x, ProxyConfig())
    with pytest.raises(UserError, match="zico_batches=4"):
        zoo.compute_proxies(["zico"], net, None, x, ProxyConfig(zico_batches=4), y)
    with pytest.raises(UserError, match="proxy.ntk_output"):
        zoo.compute_proxies(["ntk_condition"], net, None, x, ProxyConfig(ntk_output="pooled"))


# ------------------------------------------------------------------ the ensemble
def table(n: int = 60, seed: int = 0) -> tuple[list[dict], np.ndarray]:
    """Records whose accuracy follows 2 log(snip) - log(kappa) plus noise; zico is noise."""
    rng = np.random.default_rng(seed)
    snip_, kappa = np.exp(rng.normal(size=n)), np.exp(rng.normal(size=n))
    acc = 2 * np.log(snip_) - np.log(kappa) + 0.3 * rng.normal(size=n)
    recs = [{"snip": float(s), "ntk_condition": float(k), "zico": float(z), "valid": True}
            for s, k, z in zip(snip_, kappa, rng.normal(size=n))]
    return recs, acc


def test_rank_ensemble_by_hand() -> None:
    """Ranks in each proxy's direction (kappa: lower is better), weighted, over the records."""
    recs = [{"length_distortion": 3.0, "ntk_condition": 10.0}, {"length_distortion": 1.0, "ntk_condition": 100.0},
            {"length_distortion": 2.0, "ntk_condition": None}, {"length_distortion": 2.0, "ntk_condition": 20.0}]
    got = ensemble.rank_ensemble(["length_distortion", "ntk_condition"], [1.0, 3.0]).score(recs)
    # valid: 0, 1, 3; L^E ranks (higher better) 3, 1, 2; kappa ranks (lower better) 3, 1, 2
    assert got[[0, 1, 3]] == pytest.approx([(3 + 9) / 12, (1 + 3) / 12, (2 + 6) / 12])
    assert math.isnan(got[2])


def test_ridge_ensemble_learns_directions_and_round_trips_as_json(tmp_path) -> None:
    recs, acc = table()
    ens = ensemble.fit_ensemble(recs, acc, ["snip", "ntk_condition", "zico"])
    w = dict(zip(ens.names, ens.weights))
    assert w["snip"] > 0 > w["ntk_condition"] and abs(w["zico"]) < 0.2 * w["snip"]
    test, acc_test = table(seed=1)
    assert kendalltau(ens.score(test), acc_test).statistic > 0.6
    again = ensemble.Ensemble.load(ens.save(tmp_path / "ens.json"))
    assert json.loads((tmp_path / "ens.json").read_text())["method"] == "ridge"
    assert np.array_equal(again.score(test), ens.score(test))
    bad = dict(test[0], snip=-1.0)  # no log of a negative SNIP: not a number, never ranked
    assert math.isnan(ens.score([bad])[0])


def test_constant_proxy_gets_no_weight() -> None:
    recs, acc = table()
    recs = [dict(r, zico=1.5) for r in recs]
    ens = ensemble.fit_ensemble(recs, acc, ["snip", "zico"])
    assert ens.weights[1] == 0.0 and np.isfinite(ens.score(recs)).all()


def test_cross_validation_never_sees_its_test_split() -> None:
    """Replacing a fold's targets by garbage leaves that fold's out-of-fold scores unchanged (its
    targets never reach its model) and changes the other folds' (they train on it)."""
    recs, acc = table(40)
    names = ["snip", "ntk_condition", "zico"]
    scores = ensemble.cross_validated_scores(recs, acc, names, folds=5, seed=3)
    assert np.isfinite(scores).all()
    for test in ensemble.fold_indices(40, 5, seed=3):
        poisoned = acc.copy()
        poisoned[test] = np.random.default_rng(9).normal(scale=100, size=len(test))
        again = ensemble.cross_validated_scores(recs, poisoned, names, folds=5, seed=3)
        others = np.setdiff1d(np.arange(40), test)
        assert np.array_equal(again[test], scores[test])
        assert not np.allclose(again[others], scores[others])


def test_bad_ensembles_are_user_errors(tmp_path) -> None:
    with pytest.raises(UserError, match="unknown proxy"):
        ensemble.rank_ensemble(["l_e"])
    with pytest.raises(UserError, match="method"):
        ensemble.Ensemble("mean", ["snip"], [1.0])
    (tmp_path / "x.json").write_text("{not json")
    with pytest.raises(UserError, match="cannot read the proxy ensemble"):
        ensemble.Ensemble.load(tmp_path / "x.json")
