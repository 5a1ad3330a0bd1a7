"""The classify command line as a new user meets it: bring your own images (any size, a model that
fits, --image-size), one line for every bad argument before any work, no mixing with an old run,
the verdict sentence, --quick's Delta, evaluation progress and AutoAttack's announced cost."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from nnunet_ima.classify import cli
from nnunet_ima.classify.cli import apply_quick, build_parser, main, quick_delta
from nnunet_ima.classify.evaluate import EvalConfig, aa_announcement, evaluate
from nnunet_ima.classify.models import IMAGE_SIDES, build_model, input_problem, model_for_shape
from nnunet_ima.classify.presets import get_preset
from nnunet_ima.classify.verdict import verdict

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread
TINY = ["--epochs", "1", "--limit-train", "40", "--limit-test", "10", "--pgd-steps", "2", "--k", "2",
        "--n", "1", "--quiet"]


def write_folder(root, n=16, size=20, seed=0):
    """Two classes of size x size grey PNGs: dark images with noise (a) and bright ones (b)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for c, level in (("a", 70), ("b", 180)):
        (root / c).mkdir(parents=True, exist_ok=True)
        for k in range(n):
            img = np.clip(level + rng.normal(0, 25, (size, size)), 0, 255).astype(np.uint8)
            Image.fromarray(img, mode="L").save(root / c / f"{k}.png")
    return root


@pytest.fixture(scope="module")
def folder20(tmp_path_factory):
    return write_folder(tmp_path_factory.mktemp("images20"))


def call(argv, capsys):
    """main(argv) -> (exit code, stdout, stderr); argparse's own errors count as their exit code."""
    try:
        rc = main(argv)
    except SystemExit as e:
        rc = e.code
    out = capsys.readouterr()
    return rc, out.out, out.err


# --- your own images -----------------------------------------------------------------------------
def test_imagefolder_20px_run_end_to_end(folder20, tmp_path, capsys):
    out = tmp_path / "run"
    rc, text, err = call(["run", "--dataset", "imagefolder", "--data-root", str(folder20), "--model", "digits_mlp",
                          "--epochs", "2", "--eps", "0.5", "1", "--pgd-steps", "3", "--k", "3", "--n",
                          "2", "-o", str(out), "--quiet"], capsys)
    assert rc == 0, err
    assert "S. Acc." in text and "P. 0.5" in text and "IF. 1" in text
    rows = [line.split()[0] for line in (out / "table.txt").read_text().splitlines()[2:]]
    assert rows == ["STD", "SAT3", "IMA"]  # SAT named with its eps (the preset's 3.0), as in the papers
    for eps in ("0.5", "1"):
        assert f"At eps {eps} under attack (worst of PGD, IFGSM), IMA is " in text and "clean accuracy: IMA" in text
    assert (out / "verdict.txt").read_text().count("At eps") == 2
    assert json.loads((out / "run.json").read_text())["model"] == "digits_mlp"
    assert str(out.resolve()) in text


def test_resnet18_on_20px_stops_before_training(folder20, tmp_path, capsys):
    out = tmp_path / "run"
    rc, text, err = call(["run", "--dataset", "imagefolder", "--data-root", str(folder20), "--model", "resnet18_in",
                          "-o", str(out)] + TINY, capsys)
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    assert "--image-size" in err and "--model" in err and "20x20" in err and "Traceback" not in err
    assert not out.exists()


def test_default_model_follows_the_image_size():
    assert model_for_shape((1, 20, 20)) == "digits_mlp"
    assert model_for_shape((1, 28, 28)) == "fashion_cnn" and model_for_shape((3, 32, 32)) == "svhn_cnn"
    assert model_for_shape((1, 36, 36)) == "resnet18_in" and model_for_shape((2,)) == "moons_mlp"
    assert get_preset("imagefolder").model_by_size and "aa" not in get_preset("imagefolder").eval_attacks


@pytest.mark.parametrize("name", sorted(IMAGE_SIDES))
def test_image_side_table_matches_the_networks(name):
    lo, hi = IMAGE_SIDES[name]
    sides = [(lo - 1, False), (lo, True)] + ([(hi, True), (hi + 1, False)] if hi else [])
    for side, fits in sides:
        assert (input_problem(name, (1, side, side)) is None) == fits, side
        model = build_model(name, 2, (1, side, side)).train()
        try:
            with torch.no_grad():
                model(torch.zeros(2, 1, side, side))
            ran = True
        except (RuntimeError, ValueError):
            ran = False
        assert ran == fits, (name, side)


def test_image_size_resizes_what_the_model_sees(folder20, tmp_path, capsys, monkeypatch):
    seen = []
    real = cli.train.__globals__["build_model"]

    def recording(*args, **kw):
        model = real(*args, **kw)
        model.register_forward_pre_hook(lambda m, inp: seen.append(tuple(inp[0].shape[1:])))
        return model
    monkeypatch.setitem(cli.train.__globals__, "build_model", recording)
    out = tmp_path / "t"
    rc, text, err = call(["train", "--dataset", "imagefolder", "--data-root", str(folder20), "--image-size", "12",
                          "--method", "std", "-o", str(out)] + TINY, capsys)
    assert rc == 0, err
    assert seen and set(seen) == {(1, 12, 12)}
    ck = torch.load(out / "checkpoint.pt", weights_only=True)
    assert tuple(ck["meta"]["in_shape"]) == (1, 12, 12) and ck["meta"]["data"]["image_size"] == 12
    # eval finds the data, the size and the split in the checkpoint
    rc, text, err = call(["eval", str(out / "checkpoint.pt"), "--eps", "0.5", "--pgd-steps", "2", "--quiet"],
                         capsys)
    assert rc == 0 and "STD" in text, err


def test_images_of_different_sizes_need_image_size(tmp_path, capsys):
    write_folder(tmp_path / "mixed", n=3, size=20)
    write_folder(tmp_path / "more", n=1, size=24)
    (tmp_path / "more" / "a" / "0.png").rename(tmp_path / "mixed" / "a" / "big.png")
    rc, _, err = call(["run", "--dataset", "imagefolder", "--data-root", str(tmp_path / "mixed"), "-o",
                       str(tmp_path / "o")] + TINY, capsys)
    assert rc == 2 and "--image-size" in err and "24x24" in err and not (tmp_path / "o").exists()


def test_test_split_fraction(folder20):
    from nnunet_ima.classify.datasets import load_dataset

    s = load_dataset("imagefolder", folder20, test_split=0.25, val_split=0.0)
    assert (len(s.train), s.val, len(s.test)) == (24, None, 8)


# --- every bad argument: one line, exit 2, nothing written ----------------------------------------
BAD = [
    (["run", "--attacks", "pgd", "foo"], "--attacks", "foo"),
    (["run", "--eps=-0.1"], "--eps", "-0.1"),
    (["run", "--eps", "abc"], "--eps", "abc"),
    (["train", "--epochs", "0"], "--epochs", "0"),
    (["train", "--eps-max", "-1"], "--eps-max", "-1"),
    (["train", "--device", "cuda:x"], "--device", "cuda:x"),
    (["train", "--device", "mps"], "--device", "mps"),
    (["train", "--init-from", "/nonexistent.pt"], "--init-from", "/nonexistent.pt"),
    (["train", "--device", "cuda"], "--device", "cuda"),
    (["run", "--methods", "std", "foo"], "--methods", "foo"),
    (["run", "--methods", "std", "sat:-1"], "--methods", "sat:-1"),
    (["run", "--delta", "5"], "--delta", "5"),
    (["run", "--image-size", "16"], "--image-size", "16"),
    (["run", "--methods", "ima", "std", "--init-from", "std"], "--init-from", "std"),
    (["train", "--init-from", "std"], "--init-from", "std"),
    (["run", "--eval-split", "val", "--dataset", "digits", "--ima-beta", "2"], "--ima-beta", "2"),
    (["train", "--resume", "--overwrite"], "--resume", "--overwrite"),
]


@pytest.mark.parametrize("argv, arg, value", BAD, ids=[" ".join(b[0]) for b in BAD])
def test_bad_argument_is_one_line_before_any_work(argv, arg, value, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "out"
    tiny = TINY[2:] if "--epochs" in argv else TINY
    rc, text, err = call(argv + ["-o", str(out)] + tiny, capsys)
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1, err
    assert arg in lines[0] and value in lines[0] and "Traceback" not in err
    assert not out.exists()  # nothing trained, no checkpoint, no log


def test_init_from_that_is_not_a_fitting_checkpoint(tmp_path, capsys):
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    torch.save({"model": {"w": torch.zeros(3)}}, tmp_path / "other.pt")
    for name, words in (("junk.pt", "could not load"), ("other.pt", "do not fit --model moons_mlp")):
        out = tmp_path / "out"
        rc, _, err = call(["train", "--init-from", str(tmp_path / name), "-o", str(out)] + TINY, capsys)
        assert rc == 2 and len(err.strip().splitlines()) == 1 and "--init-from" in err and words in err, err
        assert not out.exists()


def test_bad_device_in_a_real_process(tmp_path):
    """The real entry point: exit code 2, one stderr line, no traceback, no output folder."""
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    r = subprocess.run([sys.executable, "-m", "nnunet_ima.classify", "train", "--device", "cuda", "-o",
                        str(tmp_path / "o")], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "--device cuda" in r.stderr and "Traceback" not in r.stderr and not (tmp_path / "o").exists()


def test_a_finished_run_is_never_appended_to(tmp_path, capsys):
    out = tmp_path / "t"
    args = ["train", "--method", "std", "-o", str(out)] + TINY
    assert call(args, capsys)[0] == 0
    log = out / "train_log.jsonl"
    rc, _, err = call(args, capsys)
    assert rc == 2 and "--resume" in err and "--overwrite" in err and len(log.read_text().splitlines()) == 1
    assert call(args + ["--overwrite"], capsys)[0] == 0
    assert [json.loads(x)["epoch"] for x in log.read_text().splitlines()] == [1]  # started again, not appended
    assert call(args[:-len(TINY)] + TINY[2:] + ["--epochs", "2", "--resume"], capsys)[0] == 0
    assert [json.loads(x)["epoch"] for x in log.read_text().splitlines()] == [1, 2]  # continued


def test_run_refuses_a_folder_with_a_run(tmp_path, capsys):
    out = tmp_path / "r"
    args = ["run", "--methods", "std", "--attacks", "pgd", "--eps", "0.1", "-o", str(out)] + TINY
    assert call(args, capsys)[0] == 0
    before = (out / "std" / "checkpoint.pt").stat().st_mtime_ns
    rc, _, err = call(args, capsys)
    assert rc == 2 and "--output" in err and "--resume" in err
    assert (out / "std" / "checkpoint.pt").stat().st_mtime_ns == before


# --- what the run says ------------------------------------------------------------------------------
def table(ima_pgd, sat_pgd, ima_clean=0.90):
    return {"std": {"clean": 0.95, "pgd": {0.5: 0.40}}, "sat0.3": {"clean": 0.93, "pgd": {0.5: sat_pgd}},
            "ima": {"clean": ima_clean, "pgd": {0.5: ima_pgd}}}


def test_verdict_sentences_from_hand_made_tables():
    (above,) = verdict(table(0.62, 0.55))
    assert above.startswith("At eps 0.5 under attack (PGD), IMA is above STD (62.0% vs 40.0%, +22.0 points) and "
                            "above SAT0.3 (62.0% vs 55.0%, +7.0 points)")
    assert above.endswith("clean accuracy: IMA 90.0%, below STD (95.0%, -5.0 points).")
    (below,) = verdict(table(0.35, 0.55, ima_clean=0.97))
    assert "IMA is below STD (35.0% vs 40.0%, -5.0 points) and below SAT0.3" in below
    assert "clean accuracy: IMA 97.0%, above STD (95.0%, +2.0 points)" in below
    (level,) = verdict(table(0.403, 0.55, ima_clean=0.948))
    assert "IMA is level with STD (40.3% vs 40.0%, +0.3 points)" in level and "level with STD (95.0%" in level
    two = verdict({"std": {"clean": 1.0, "pgd": {0.1: 0.5, 0.2: 0.1}, "ifgsm": {0.1: 0.4, 0.2: 0.3}},
                   "ima": {"clean": 1.0, "pgd": {0.1: 0.6, 0.2: 0.2}, "ifgsm": {0.1: 0.3, 0.2: 0.4}}})
    assert len(two) == 2 and "worst of PGD, IFGSM" in two[0] and "below STD (30.0% vs 40.0%" in two[0]
    assert verdict({"std": {"clean": 1.0, "pgd": {0.1: 0.5}}}) == []


def test_quick_keeps_delta_unless_margins_cannot_reach_the_tested_noise():
    assert quick_delta(0.01, 10, 0.1, 0.3)[0] == 0.01
    delta, text = quick_delta(0.01, 2, 0.1, 0.3)
    assert delta == pytest.approx(0.05) and "raised from 0.01 to 0.05" in text
    quick = build_parser().parse_args(["run", "--quick"])
    q, _, _, message = apply_quick(get_preset("digits"), quick, ("std", "ima"))  # 10 x 0.1 reaches 0.5
    assert q.delta == 0.1 and "10 epochs instead of 20" in message and "Delta 0.1 kept" in message
    q, _, _, message = apply_quick(get_preset("moons"), quick, ("ima",))  # 10 x 0.01 would stop below 0.2
    assert q.delta == pytest.approx(0.02) and "raised from 0.01 to 0.02" in message and "(0.2)" in message
    q, _, _, message = apply_quick(get_preset("moons"), quick, ("std", "sat"))
    assert q.delta == 0.01 and "Delta" not in message  # no IMA, nothing said about Delta


def test_evaluation_progress_and_autoattack_cost(capsys):
    from nnunet_ima.classify.datasets import IndexedDataset

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(36, 2)).eval()
    x = torch.rand(10, 1, 6, 6)
    cfg = EvalConfig(eps=(0.3,), norm="l2", attacks=("pgd",), pgd_steps=2, batch_size=4, progress=True)
    evaluate(model, IndexedDataset(x, model(x).argmax(1).detach()), 2, cfg, desc="eval m")
    text = capsys.readouterr().out
    assert text.count("eval m: first batch took") == 1 and "expected about" in text
    note = aa_announcement(EvalConfig(attacks=("pgd", "aa"), clip=(0.0, 1.0)), 2)
    assert "x the time of PGD-100" in note and "--attacks pgd" in note
    assert aa_announcement(EvalConfig(attacks=("pgd", "aa"), clip=None), 2) is None
    small = torch.rand(3, 1, 4, 4)  # torchattacks' L2 Square divides by h // 5: skipped with a note, no crash
    lin = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 2)).eval()
    r = evaluate(lin, IndexedDataset(small, lin(small).argmax(1).detach()), 2,
                 EvalConfig(eps=(0.3,), attacks=("aa",), clip=(0.0, 1.0), progress=False))
    assert "aa" not in r and "at least 5x5" in r["notes"][0]
