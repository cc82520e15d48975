"""Evaluate and predict: checkpoint, URL and exported folder agree; bad inputs are one-line errors."""
import hashlib
import json
import os
from pathlib import Path

import pytest
import torch

from vitas.core.checkpoint import save_checkpoint
from vitas.core.config import load_config
from vitas.core.data import write_digits
from vitas.core.errors import UserError
from vitas.inference.evaluate import evaluate_checkpoint, load_model
from vitas.inference.predict import predict
from vitas.supernet.export import export
from vitas.supernet.space import SearchSpace
from vitas.supernet.static import StaticViT
from vitas.cli import main

ROOT = Path(__file__).resolve().parents[1]
ARCH = {"patch_size": 8, "embed_dim": 48, "depth": 2, "num_heads": [2, 2], "attn_dim": [32, 32],
        "mlp_dim": [64, 64]}


class Evil:
    """Unpickling this runs a shell command."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def vitas(capsys, *args) -> tuple[int, str, str]:
    """Run the `vitas` command line in this process: (exit code, stdout, stderr)."""
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Digits data and a retrain-format checkpoint of a (briefly fitted) StaticViT."""
    tmp = tmp_path_factory.mktemp("inference")
    data = tmp / "digits"
    write_digits(data)
    cfg = load_config(ROOT / "yamls" / "demo-digits.yaml", [f"output_dir={tmp}", f"data.root={data}"])
    torch.manual_seed(0)
    model = StaticViT(SearchSpace(cfg.space).validate(ARCH), num_classes=10, img_size=32)
    with torch.no_grad():
        model.head.bias.copy_(torch.linspace(-1, 1, 10))  # a clear ranking of the classes
    ckpt = tmp / "model.pth"
    save_checkpoint({"model": model.state_dict(), "arch": model.arch, "model_args": model.model_args,
                     "config": cfg.to_dict(), "space": SearchSpace(cfg.space).spec(),
                     "class_names": [str(i) for i in range(10)]}, ckpt)
    return tmp, data, ckpt, model


def test_evaluate_checkpoint_url_and_export_agree(setup):
    tmp, data, ckpt, model = setup
    direct = evaluate_checkpoint(str(ckpt), str(data), workers=0)
    folder = export(model, tmp / "export", data_config=dict(mean=(0.5,) * 3, std=(0.5,) * 3,
                                                             interpolation="bilinear", crop_pct=1.0))
    exported = evaluate_checkpoint(str(folder), str(data), workers=0)
    digest = hashlib.sha256(ckpt.read_bytes()).hexdigest()
    by_url = evaluate_checkpoint(ckpt.as_uri(), str(data), sha256=digest, cache=str(tmp / "cache"),
                                 workers=0)
    assert direct["images"] == 360 and 0 <= direct["top1"] <= direct["top5"] <= 100
    assert exported == direct == by_url


def test_predict_top5_probabilities(setup, capsys):
    tmp, data, ckpt, _ = setup
    images = [sorted((data / "val" / c).glob("*.png"))[0] for c in ("3", "7")]
    code, stdout, stderr = vitas(capsys, "predict", "--checkpoint", ckpt, "--data", data, *images)
    assert code == 0, stderr
    out = json.loads(stdout.strip().splitlines()[-1])["predictions"]
    assert [p["image"] for p in out] == [str(i) for i in images]
    for item in out:
        probs = [hit["prob"] for hit in item["topk"]]
        assert len(probs) == 5 and probs == sorted(probs, reverse=True)
        assert all(0 <= p <= 1 for p in probs) and sum(probs) <= 1 + 1e-6
        assert {hit["class"] for hit in item["topk"]} <= {str(i) for i in range(10)}
        assert item["topk"][0]["class"] == str(item["topk"][0]["index"])
    assert "%" in stdout.splitlines()[1]  # human-readable lines before the JSON


def test_predict_names_from_checkpoint_and_errors(setup):
    tmp, data, ckpt, _ = setup
    image = sorted((data / "val" / "0").glob("*.png"))[0]
    [item] = predict(str(ckpt), [str(image)], topk=3)
    assert len(item["topk"]) == 3
    with pytest.raises(UserError, match="image not found"):
        predict(str(ckpt), [str(tmp / "missing.png")])
    (tmp / "not-an-image.png").write_text("hello")
    with pytest.raises(UserError, match="not-an-image.png cannot be decoded"):
        predict(str(ckpt), [str(tmp / "not-an-image.png")])


def test_class_mismatch_is_refused(setup, tmp_path):
    _, data, ckpt, _ = setup
    other = tmp_path / "letters"
    for split in ("train", "val"):
        for name in ("a", "b"):
            (other / split / name).mkdir(parents=True)
    with pytest.raises(UserError, match="differ from the model's"):
        evaluate_checkpoint(str(ckpt), str(other), workers=0)


def test_malicious_checkpoint_refused_by_cli(setup, tmp_path, capsys):
    _, data, _, _ = setup
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pth"
    torch.save({"model": Evil(marker)}, evil)
    code, _, err = vitas(capsys, "evaluate", "--checkpoint", evil, "--data", data)
    assert code == 2
    assert err.startswith("vitas: error: refusing to load") and err.count("\n") == 1
    assert not marker.exists()
    image = sorted((data / "val" / "0").glob("*.png"))[0]
    code, _, err = vitas(capsys, "predict", "--checkpoint", evil, image)
    assert code == 2 and err.count("\n") == 1 and not marker.exists()


def test_not_a_retrain_checkpoint(setup, tmp_path, capsys):
    _, data, _, _ = setup
    save_checkpoint({"model": {}, "space": {}}, tmp_path / "super.pth")
    with pytest.raises(UserError, match="not a retrain checkpoint"):
        load_model(str(tmp_path / "super.pth"))
    code, _, err = vitas(capsys, "evaluate", "--checkpoint", tmp_path / "absent.pth", "--data", data)
    assert code == 2 and "checkpoint not found" in err


@pytest.mark.parametrize("change, message", [
    (lambda c: c.pop("config"), "'model_args' and 'config' must be mappings"),
    (lambda c: c.update(model_args=[1, 2]), "'model_args' and 'config' must be mappings"),
    (lambda c: c["model_args"].update(colour="red"), "model_args do not describe a model"),
    (lambda c: c["model_args"]["arch"].update(depth=3), "model_args do not describe a model"),
    (lambda c: c.update(model={"head.weight": torch.zeros(1)}), "weights do not fit"),
])
def test_crafted_retrain_checkpoints_are_user_errors(setup, tmp_path, change, message):
    _, _, ckpt, _ = setup
    state = torch.load(ckpt, weights_only=True)
    change(state)
    save_checkpoint(state, tmp_path / "crafted.pth")
    with pytest.raises(UserError, match=message):
        load_model(str(tmp_path / "crafted.pth"))


def test_truncated_export_is_a_user_error(setup, tmp_path):
    _, _, _, model = setup
    out = export(model, tmp_path / "exported")
    weights = out / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(UserError, match="cannot load exported model"):
        load_model(str(out))


def test_ema_weights_for_evaluate_predict_and_export(setup, tmp_path, capsys):
    tmp, data, ckpt, model = setup
    image = sorted((data / "val" / "0").glob("*.png"))[0]
    with pytest.raises(UserError, match="has no EMA weights"):
        load_model(str(ckpt), ema=True)
    state = torch.load(ckpt, weights_only=True)
    ema = {k: v.clone() for k, v in state["model"].items()}
    ema["head.bias"] = -ema["head.bias"]  # the EMA model ranks the classes the other way round
    save_checkpoint({**state, "ema": ema}, tmp_path / "ema.pth")
    raw, averaged = (predict(str(tmp_path / "ema.pth"), [str(image)], ema=flag)[0]["topk"][0]["index"]
                     for flag in (False, True))
    assert raw == predict(str(ckpt), [str(image)])[0]["topk"][0]["index"] and averaged != raw
    code, out, err = vitas(capsys, "export", "--checkpoint", tmp_path / "ema.pth", "--ema", tmp_path / "out")
    assert code == 0, err
    assert predict(str(tmp_path / "out"), [str(image)])[0]["topk"][0]["index"] == averaged
    with pytest.raises(UserError, match="exported folder"):
        load_model(str(tmp_path / "out"), ema=True)
    code, out, _ = vitas(capsys, "evaluate", "--checkpoint", tmp_path / "ema.pth", "--data", data, "--ema")
    assert code == 0
    expected = evaluate_checkpoint(str(tmp_path / "out"), str(data), workers=0)
    assert json.loads(out.strip().splitlines()[-1]) == expected
