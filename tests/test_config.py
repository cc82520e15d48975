"""Config schema: defaults, overrides, type errors, unknown keys with suggestions, CLI exit codes."""
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from vitas.core.config import Config, config_from_dict, load_config, save_config
from vitas.core.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path, tree):
    path = tmp_path / "x.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def test_defaults_and_output_dir_absolute(tmp_path):
    cfg = load_config(write(tmp_path, {"output_dir": "rel/out"}))
    assert Path(cfg.output_dir).is_absolute() and cfg.output_dir.endswith("rel/out")
    assert cfg.search.algorithm == "ga" and cfg.supernet.sampling == "uniform"


@pytest.mark.parametrize("override, key, expected", [
    ("search.population=30", ("search", "population"), 30),
    ("search.macs_max=1.3e9", ("search", "macs_max"), 1_300_000_000),
    ("supernet.lr=1e-3", ("supernet", "lr"), 1e-3),
    ("supernet.lr=2", ("supernet", "lr"), 2.0),
    ("space.patch_size=[16,32]", ("space", "patch_size"), [16, 32]),
    ("space.channels.embed=cyclic", ("space", "channels"), None),
    ("search.macs_min=null", ("search", "macs_min"), None),
    ("data.auto_augment=rand-m9", ("data", "auto_augment"), "rand-m9"),
    ("data.root=2024", ("data", "root"), "2024"),  # a number where a path is meant: the path
    ("supernet.checkpoint=7", ("supernet", "checkpoint"), "7"),
    ("search.algorithm=random", ("search", "algorithm"), "random"),
])
def test_overrides(tmp_path, override, key, expected):
    cfg = load_config(write(tmp_path, {}), [override])
    value = getattr(getattr(cfg, key[0]), key[1])
    if key[1] == "channels":
        assert value.embed == "cyclic"
    else:
        assert value == expected and type(value) is type(expected)


@pytest.mark.parametrize("override, message", [
    ("search.population=many", "search.population' must be int"),
    ("supernet.ema=3", "supernet.ema' must be bool"),
    ("space.patch_size=16", "space.patch_size' must be list of int"),
    ("search.populaton=3", "did you mean 'search.population'"),
    ("serch.population=3", "did you mean 'search'"),
    ("search.population", "not of the form"),
    ("search.algorithm=gaa", "search.algorithm must be one of ga, nsga2, rl, random, got 'gaa' (did you mean 'ga'?)"),
    ("supernet.sampling=sandwitch", "did you mean 'sandwich'"),
    ("space.channels.embed=cyclik", "space.channels.embed must be one of left, bilateral, cyclic"),
    ("search.population=1", "search.population must be >= 2, got 1"),
    ("space.img_size=0", "space.img_size must be >= 1, got 0"),
    ("supernet.min_lr=1", "supernet.min_lr 1.0 is larger than supernet.lr"),
    ("search.macs_min=10", None),  # alone it is fine
    ("search.checkpoint=x.pth", "config key 'search.checkpoint' has moved: use 'supernet.checkpoint'"),
    ("proxy.rank_archs=4", "has moved: use 'rank.archs'"),
    ("search.proxy_weights=[1,2]", "has moved: use 'proxy.weights'"),
])
def test_bad_overrides(tmp_path, override, message):
    if message is None:
        load_config(write(tmp_path, {}), [override])
        return
    with pytest.raises(UserError) as exc:
        load_config(write(tmp_path, {}), [override])
    assert message in str(exc.value)


@pytest.mark.parametrize("text, line", [
    ("search:\n  population: 3\n  population: 4\n", "key 'population' is given twice (lines 2 and 3)"),
    ("search: {generations: 1}\nsearch: {population: 4}\n", "key 'search' is given twice (lines 1 and 2)"),
    ("space:\n  channels:\n    embed: left\n    embed: cyclic\n", "key 'embed' is given twice (lines 3 and 4)"),
])
def test_duplicate_yaml_keys_are_refused(tmp_path, text, line):
    path = tmp_path / "dup.yaml"
    path.write_text(text)
    with pytest.raises(UserError) as exc:
        load_config(path)
    assert line in str(exc.value) and str(path) in str(exc.value)


def test_macs_range_relation(tmp_path):
    with pytest.raises(UserError, match="search.macs_min 10 is larger than search.macs_max 5"):
        load_config(write(tmp_path, {"search": {"macs_min": 10, "macs_max": 5}}))


def test_yaml_unknown_key_suggests(tmp_path):
    with pytest.raises(UserError, match=r"unknown config key 'supernet.sampeling' \(did you mean 'supernet.sampling'\?\)"):
        load_config(write(tmp_path, {"supernet": {"sampeling": "uniform"}}))


def test_round_trip_through_dict(tmp_path):
    cfg = load_config(ROOT / "yamls" / "demo-digits.yaml", ["search.population=7"])
    save_config(cfg, tmp_path / "resolved.yaml")
    again = load_config(tmp_path / "resolved.yaml")
    assert again == cfg and config_from_dict(cfg.to_dict()) == cfg
    assert isinstance(Config().to_dict()["space"]["channels"], dict)


def test_missing_file(tmp_path):
    with pytest.raises(UserError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "vitas", *args], capture_output=True, text=True, cwd=ROOT)


def test_cli_misspelt_key_exit_2(tmp_path):
    path = write(tmp_path, {"search": {"populaton": 3}})
    res = run_cli("arch", "sample", "-c", str(path), "-n", "1")
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert lines == ["vitas: error: unknown config key 'search.populaton' (did you mean 'search.population'?)"]


def test_cli_help_lists_subcommands():
    res = run_cli("--help")
    assert res.returncode == 0
    for sub in ("data", "arch"):
        assert sub in res.stdout


def test_cli_unknown_subcommand_exit_2():
    assert run_cli("no-such-command").returncode == 2


def test_recipe_overrides_keep_their_value_rules():
    """A section that overrides a shared recipe default keeps the field's rule (epochs >= 1 ...)."""
    import dataclasses

    from vitas.core.config import RetrainConfig, SupernetConfig, TrainingRecipe

    base = {f.name: f.metadata for f in dataclasses.fields(TrainingRecipe)}
    for cls in (SupernetConfig, RetrainConfig):
        for f in dataclasses.fields(cls):
            if base.get(f.name):
                assert f.metadata == base[f.name], (cls.__name__, f.name)
