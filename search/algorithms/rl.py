"""REINFORCE search in the form of As-ViT's Algorithm 1 (training-free ViT topology search).

The policy is one independent categorical per genome position, logits initialised near zero.
Each step samples an architecture (resampled until it fits the budget, a bounded number of
times), scores it, and rewards it with the sum over the scorer's `reward_terms` of
sign * (m_t - m_{t-1}) / (max - min of m over the last `window` values). An exponential moving
average of the reward is the baseline; Adam updates the logits. The result is the argmax of every
categorical. The state (logits, Adam, sampler RNG, baseline, reward history, archive) is plain
tensors and values, so a restarted search continues to exactly the same result.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from vitas.core.config import SearchConfig
from vitas.core.errors import UserError
from vitas.search.algorithms.base import SearchAlgorithm
from vitas.search.archive import Archive

INVALID_REWARD = -1.0  # a sampled architecture the scorer marks invalid: as bad as a full-range drop


@dataclass(frozen=True)
class ReinforceSettings:
    """What shapes an RL search's path (from `search.*`)."""

    lr: float
    momentum: float
    window: int
    seed: int


class Reinforce(SearchAlgorithm):
    """As-ViT's policy-gradient search over `archive`'s space; `step()` runs one policy update."""

    name = "rl"
    round_name = "step"

    def __init__(self, archive: Archive, settings: ReinforceSettings, rounds: int, max_tries: int = 1000):
        super().__init__(archive, settings, rounds)
        if not 0.0 <= settings.momentum < 1.0:
            raise UserError(f"search.rl_baseline_momentum must be in [0, 1), got {settings.momentum}")
        if not settings.lr > 0:
            raise UserError(f"search.rl_lr must be > 0, got {settings.lr}")
        if not archive.scorer.reward_terms:
            raise UserError(f"scorer '{archive.scorer.name}' defines no reward terms for RL")
        lr, seed = settings.lr, settings.seed
        self.momentum, self.window, self.max_tries = settings.momentum, settings.window, max_tries
        init = torch.Generator().manual_seed(seed)
        sizes = (self.space.xu - self.space.xl + 1).tolist()
        self.logits = [torch.nn.Parameter(1e-3 * torch.randn(n, generator=init, dtype=torch.float64))
                       for n in sizes]
        self.optimizer = torch.optim.Adam(self.logits, lr=lr)
        self.sampler = torch.Generator().manual_seed(seed + 1)
        self.step_count = 0
        self.baseline: Optional[float] = None
        self.history: dict[str, list[float]] = {name: [] for name, _ in archive.scorer.reward_terms}
        self.trace: list[dict] = []

    # ------------------------------------------------------------------ state
    def state(self) -> dict:
        """Plain tensors and values: everything `load` needs to continue identically."""
        return {"step": self.step_count, "logits": [p.detach().clone() for p in self.logits],
                "optimizer": self.optimizer.state_dict(), "sampler": self.sampler.get_state(),
                "baseline": self.baseline, "history": {k: list(v) for k, v in self.history.items()},
                "trace": [dict(t) for t in self.trace], "archive": self.archive.state()}

    def load(self, state: dict) -> None:
        """Continue from `state()`."""
        self.step_count = int(state["step"])
        with torch.no_grad():
            for p, saved in zip(self.logits, state["logits"]):
                p.copy_(saved)
        self.optimizer.load_state_dict(state["optimizer"])
        self.sampler.set_state(state["sampler"])
        self.baseline = state["baseline"]
        self.history = {k: list(v) for k, v in state["history"].items()}
        self.trace = [dict(t) for t in state["trace"]]
        self.archive.load(state["archive"])

    @staticmethod
    def settings_from(search_cfg: SearchConfig) -> ReinforceSettings:
        return ReinforceSettings(search_cfg.rl_lr, search_cfg.rl_baseline_momentum,
                                 search_cfg.rl_window, search_cfg.seed)

    @staticmethod
    def rounds_from(search_cfg: SearchConfig) -> int:
        return search_cfg.steps

    @property
    def position(self) -> int:
        return self.step_count

    # ------------------------------------------------------------------ policy
    def _sample(self) -> tuple[np.ndarray, dict]:
        """A genome from the policy whose architecture fits the budget (bounded resampling)."""
        probs = [torch.softmax(p.detach(), dim=0) for p in self.logits]
        for _ in range(self.max_tries):
            x = np.array([int(torch.multinomial(pr, 1, generator=self.sampler)) for pr in probs])
            arch = self.space.decode(x)
            if self.archive.budget.feasible(self.archive.cost(arch)):
                return x, arch
        raise UserError(f"the RL policy drew no architecture inside the budget in {self.max_tries} "
                        "samples; widen search.macs_min/max, params_min/max or latency_min/max")

    def _reward(self, record: dict) -> float:
        """As-ViT's normalised-delta reward; the first step (no previous value) earns 0."""
        if not self.archive.scored(record):
            return INVALID_REWARD
        reward = 0.0
        for name, sign in self.archive.scorer.reward_terms:
            hist = self.history[name]
            value = float(record[name])
            previous = hist[-1] if hist else None
            hist.append(value)
            del hist[:-self.window]
            spread = max(hist) - min(hist)
            if previous is not None and spread > 0:
                reward += sign * (value - previous) / spread
        return reward

    def entropy(self) -> float:
        """Sum of the categoricals' entropies (nats): how undecided the policy still is."""
        with torch.no_grad():
            return float(sum(-(torch.softmax(p, 0) * torch.log_softmax(p, 0)).sum() for p in self.logits))

    def step(self) -> dict[str, float]:
        """Sample, score, reward and update once; returns the step's log scalars."""
        x, arch = self._sample()
        record = self.archive.evaluate([arch], found=self.step_count)[0]
        reward = self._reward(record)
        if self.baseline is None:
            self.baseline = reward
        else:
            self.baseline = self.momentum * self.baseline + (1.0 - self.momentum) * reward
        advantage = reward - self.baseline
        log_prob = sum(torch.log_softmax(p, 0)[int(i)] for p, i in zip(self.logits, x))
        self.optimizer.zero_grad()
        (-advantage * log_prob).backward()
        self.optimizer.step()
        self.step_count += 1
        entry = {"step": self.step_count, "key": record["key"], "reward": reward,
                 "baseline": self.baseline, "entropy": self.entropy()}
        self.trace.append(entry)
        return {k: entry[k] for k in ("reward", "baseline", "entropy")} | {"archs": len(self.archive)}

    def argmax_arch(self) -> dict:
        """The policy's most probable choice per position, decoded to a canonical architecture."""
        return self.space.decode(np.array([int(torch.argmax(p.detach())) for p in self.logits]))

    def choose(self) -> tuple[Optional[dict], dict]:
        """As-ViT's answer, the policy's argmax, when it is valid and inside the budget (and not
        re-measured past a latency limit); else the best feasible architecture seen (result.json's
        `rl.argmax_chosen` says which)."""
        argmax = self.archive.evaluate([self.argmax_arch()], found=self.step_count)[0]
        chosen = self.archive.choosable(argmax)
        extra = {"rl": {"argmax": argmax, "argmax_chosen": chosen, "final_entropy": self.entropy(),
                        "trace": self.trace}}
        return (argmax if chosen else self.archive.best()), extra
