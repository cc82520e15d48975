"""Bad input to every stage: one line `vitas: error: ...`, exit code 2, and no output folder;
the same through `vitas submit` (local executor and the real Slurm), with nothing queued."""
from __future__ import annotations

import subprocess
import uuid
from pathlib import Path

import pytest

from vitas.cli import main

ROOT = Path(__file__).resolve().parents[1]
DEMO = str(ROOT / "yamls" / "demo-digits.yaml")
SEED = '{"patch_size": 8, "embed_dim": 16, "depth": 1, "num_heads": [2], "attn_dim": [16], "mlp_dim": [32]}'

CASES = {  # name: (arguments after `vitas`, text the error must contain); {data} is a real data root
    "train-supernet, missing data": (["train-supernet", "data.root=/no/such/dir"], "data.root"),
    "train-supernet, bad sampling": (["train-supernet", "data.root={data}", "supernet.sampling=x"],
                                     "supernet.sampling"),
    "train-supernet, projection without a max pass": (
        ["train-supernet", "data.root={data}", "supernet.grad_projection=true", "supernet.sampling=uniform"],
        "supernet.grad_projection"),
    "train-supernet, identity shifting off without identities": (
        ["train-supernet", "data.root={data}", "supernet.identity_shift=false", "space.identity=false"],
        "supernet.identity_shift"),
    "train-supernet, patch cycle without a max pass": (
        ["train-supernet", "data.root={data}", "supernet.patch_cycle=true", "supernet.sampling=uniform"],
        "supernet.patch_cycle"),
    "train-supernet, progressive shrinking of an unknown field": (
        ["train-supernet", "data.root={data}", "supernet.progressive=[width]"], "supernet.progressive"),
    "search, no superformer": (["search", "data.root={data}"], "checkpoint not found"),
    "search, infeasible budget": (["search", "data.root={data}", "search.scorer=proxy",
                                   "search.macs_min=5", "search.macs_max=10"], "no architecture has macs"),
    "search, misspelt key": (["search", "search.populaton=3"], "search.population"),
    "rank, missing data": (["rank", "data.root=/no/such/dir"], "data.root"),
    "search, hold-out of 0": (["search", "data.root={data}", "data.holdout_per_class=0"],
                              "data.holdout_per_class is 0"),
    "search, bad algorithm": (["search", "data.root={data}", "search.algorithm=pso"], "search.algorithm"),
    "search, rl budget nobody meets": (["search", "data.root={data}", "search.scorer=proxy",
                                        "search.algorithm=rl", "search.macs_max=10"], "no architecture has macs"),
    "rank, missing data": (["rank", "data.root=/no/such/dir"], "data.root"),
    "rank, too few archs": (["rank", "data.root={data}", "rank.archs=1"], "rank.archs must be >= 2"),
    "scale, no seed": (["scale", "data.root={data}"], "scale.seed_arch"),
    "scale, bad seed": (["scale", "data.root={data}", "--seed-arch", '{"depth": 1}'], "--seed-arch"),
    "scale, fractional width": (["scale", "data.root={data}", "--seed-arch", SEED.replace('"embed_dim": 16', '"embed_dim": 16.5')],
                                "embed_dim"),
    "scale, depth 0": (["scale", "data.root={data}", "--seed-arch",
                        '{"patch_size": 8, "embed_dim": 16, "depth": 0, "num_heads": [], "attn_dim": [], "mlp_dim": []}'],
                       "depth"),
    "scale, negative limit": (["scale", "data.root={data}", "--seed-arch", SEED, "scale.param_limit=-5"],
                              "scale.param_limit must be >= 1"),
    "retrain, no arch": (["retrain", "data.root={data}"], "run the search first"),
    "retrain, arch outside the space": (["retrain", "data.root={data}", "--arch", SEED], "embed_dim"),
    "retrain, min_lr above lr": (["retrain", "data.root={data}", "retrain.min_lr=1"], "retrain.min_lr"),
    "retrain, bad init": (["retrain", "data.root={data}", "retrain.init=imagenet"], "retrain.init"),
    "evaluate, missing checkpoint": (["evaluate", "data.root={data}", "--checkpoint", "/no/ckpt.pth"],
                                     "checkpoint not found"),
    "proxy, bad arch": (["proxy", "data.root={data}", "--arch", "{not json"], "not valid JSON"),
    "proxy, missing arch file": (["proxy", "data.root={data}", "--arch", "nope.json"], "file not found"),
}
STAGES = ("train-supernet", "search", "rank", "scale", "retrain", "evaluate")


def one_error_line(err: str, needle: str) -> None:
    lines = [line for line in err.splitlines() if not line.startswith("20")]  # drop log lines
    assert len(lines) == 1 and lines[0].startswith("vitas: error: ") and needle in lines[0], err


@pytest.mark.parametrize("name", list(CASES))
def test_stage_errors_are_one_line_exit_2_and_write_nothing(name, tiny_digits, tmp_path, capsys) -> None:
    args, needle = CASES[name]
    out = tmp_path / "run"
    argv = [a.replace("{data}", str(tiny_digits)) for a in args]
    code = main([argv[0], "-c", DEMO, f"output_dir={out}", *argv[1:]])
    assert code == 2
    one_error_line(capsys.readouterr().err, needle)
    assert not out.exists(), sorted(p.name for p in out.rglob("*"))


@pytest.mark.parametrize("executor", ["local", "slurm"])
@pytest.mark.parametrize("name", [n for n in CASES if CASES[n][0][0] in STAGES])
def test_submit_refuses_the_same_before_queueing(name, executor, tiny_digits, tmp_path, capsys,
                                                 request) -> None:
    if executor == "slurm":
        request.getfixturevalue("slurm_cluster")
    args, needle = CASES[name]
    out = tmp_path / "run"
    job = f"vitas-refused-{uuid.uuid4().hex[:8]}"
    argv = [a.replace("{data}", str(tiny_digits)) for a in args]
    code = main(["submit", argv[0], "-c", DEMO, f"output_dir={out}", f"launch.executor={executor}",
                 f"launch.job_name={job}", *argv[1:]])
    assert code == 2
    one_error_line(capsys.readouterr().err, needle)
    assert not out.exists(), sorted(p.name for p in out.rglob("*"))
    if executor == "slurm":
        queued = subprocess.run(["squeue", "-h", "-n", job], capture_output=True, text=True, check=True)
        assert queued.stdout.strip() == ""


TINY = '{"patch_size": 8, "embed_dim": 48, "depth": 2, "num_heads": [2, 2], "attn_dim": [32, 32], "mlp_dim": [64, 64]}'


def last_json(capsys: pytest.CaptureFixture) -> str:
    return capsys.readouterr().out.strip().splitlines()[-1]


def test_overrides_may_stand_before_and_after_options(capsys) -> None:
    assert main(["arch", "cost", "-c", DEMO, "--arch", TINY, "space.img_size=64"]) == 0
    after = last_json(capsys)
    assert main(["arch", "cost", "-c", DEMO, "space.img_size=64", "--arch", TINY, "data.workers=0"]) == 0
    assert last_json(capsys) == after
    assert main(["arch", "cost", "-c", DEMO, "--arch", TINY]) == 0
    assert last_json(capsys) != after  # the override took effect wherever it stood


def test_unknown_option_names_the_subcommand(capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["arch", "cost", "-c", DEMO, "--arch", TINY, "--colour", "red"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "vitas arch cost: error: unrecognized arguments: --colour" in err


def test_debug_works_after_the_command() -> None:
    from vitas.core.errors import UserError
    with pytest.raises(UserError, match="missing field"):
        main(["arch", "cost", "-c", DEMO, "--arch", '{"depth": 1}', "--debug"])


@pytest.mark.parametrize("content, needle", [
    (b"space:\n\timg_size: 32\n", "is not valid YAML: while scanning"),
    (b"space: [1, 2\n", "is not valid YAML"),
    (b"space: !!python/object:os.system {}\n", "is not valid YAML"),
    (b"\xff\xfe\x00s", "is not UTF-8 text"),
])
def test_broken_config_files_are_one_line(tmp_path, capsys, content, needle) -> None:
    path = tmp_path / "x.yaml"
    path.write_bytes(content)
    assert main(["arch", "sample", "-c", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("vitas: error: config file") and needle in err, err
