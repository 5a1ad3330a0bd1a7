"""``python -m nnunet_ima.classify`` results that cannot mislead (issue 24): a resumed run compares what
produced each checkpoint (data, split, seed, hyperparameters) and refuses a changed one in one line;
``--resume`` with nothing to resume is refused; a damaged PNG is one line naming it; an unwritable
``--output`` is refused before any work; a training bound beyond the images' whole range is warned."""
from __future__ import annotations

import json

import pytest

from test_classify_cli import call, write_folder

pytestmark = pytest.mark.usefixtures("one_thread")
TINY = ["--epochs", "1", "--pgd-steps", "2", "--k", "2", "--n", "1", "--quiet"]


@pytest.fixture(scope="module")
def folder6(tmp_path_factory):
    return write_folder(tmp_path_factory.mktemp("images6"), n=10, size=6)


def one_line(rc, err, *words):
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, err
    for w in words:
        assert w in lines[0], (w, lines[0])


def log_epochs(folder) -> list[int]:
    return [json.loads(x)["epoch"] for x in (folder / "train_log.jsonl").read_text().splitlines()]


def test_resume_refuses_changed_data_settings_and_hyperparameters(folder6, tmp_path, capsys):
    out = tmp_path / "t"
    data = ["--dataset", "imagefolder", "--data-root", str(folder6), "-o", str(out)]
    args = ["train", "--method", "std", "--test-split", "0.2"] + data + TINY
    assert call(args, capsys)[0] == 0
    before = (out / "checkpoint.pt").read_bytes()
    for change, words in ((["--test-split", "0.5"], ("--test-split", "0.2", "0.5")),
                          (["--lr", "0.5"], ("--lr", "0.5")),
                          (["--seed", "3"], ("--seed", "3"))):
        argv = list(args)
        for flag, value in zip(change[::2], change[1::2]):
            if flag in argv:
                argv[argv.index(flag) + 1] = value
            else:
                argv += [flag, value]
        rc, _, err = call(argv + ["--resume", "--epochs", "2"], capsys)
        one_line(rc, err, "--resume", *words)
        assert (out / "checkpoint.pt").read_bytes() == before and log_epochs(out) == [1]  # nothing trained
    # the same settings continue the run
    rc, _, err = call(args + ["--resume", "--epochs", "2"], capsys)
    assert rc == 0, err
    assert log_epochs(out) == [1, 2]
    # eval on another split than the checkpoint was trained on would test on training images: refused
    rc, _, err = call(["eval", str(out / "checkpoint.pt"), "--test-split", "0.5", "--data-root", str(folder6),
                       "--dataset", "imagefolder", "--eps", "0.1", "--quiet"], capsys)
    one_line(rc, err, "--test-split", "0.5", "0.2")


def test_run_resume_checks_every_method_before_training_any(folder6, tmp_path, capsys):
    out = tmp_path / "r"
    args = ["run", "--methods", "std", "sat", "--dataset", "imagefolder", "--data-root", str(folder6),
            "--attacks", "pgd", "--eps", "0.1", "-o", str(out)] + TINY
    assert call(args, capsys)[0] == 0
    stamps = {p.parent.name: p.stat().st_mtime_ns for p in out.glob("*/checkpoint.pt")}
    assert len(stamps) == 2
    rc, _, err = call(args + ["--resume", "--test-split", "0.5"], capsys)
    one_line(rc, err, "--test-split", "std")
    assert {m: (out / m / "checkpoint.pt").stat().st_mtime_ns for m in stamps} == stamps
    # a folder without a run: --resume has nothing to continue and says so
    empty = tmp_path / "empty"
    rc, _, err = call(args[:-len(TINY) - 2] + ["-o", str(empty)] + TINY + ["--resume"], capsys)
    one_line(rc, err, "--resume", "no run")
    assert not empty.exists()
    rows = (out / "results.csv").read_text().splitlines()
    assert rows[0].split(",")[-1] == "norm" and all(r.endswith(",l2") for r in rows[1:])  # each row names its norm


def test_damaged_png_is_one_line_naming_it(tmp_path, capsys):
    root = write_folder(tmp_path / "img", n=6, size=6)
    bad = root / "b" / "3.png"
    bad.write_bytes(bad.read_bytes()[:40])
    out = tmp_path / "out"
    rc, _, err = call(["train", "--method", "std", "--dataset", "imagefolder", "--data-root", str(root), "-o",
                       str(out)] + TINY, capsys)
    one_line(rc, err, str(bad), "cannot be read")
    assert not out.exists()


def test_output_that_cannot_be_written_is_refused_before_any_work(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("mine")
    rc, _, err = call(["train", "--method", "std", "-o", str(blocker / "out"), "--limit-train", "40",
                       "--limit-test", "10"] + TINY, capsys)
    one_line(rc, err, "--output", "cannot write")
    assert blocker.read_text() == "mine"


def test_training_bound_beyond_the_images_whole_range_is_warned(tmp_path, capsys):
    root = write_folder(tmp_path / "img", n=8, size=1)  # 1 x 1 images in [0, 1]: an L2 ball of 3 holds them all
    out = tmp_path / "out"
    rc, _, err = call(["train", "--method", "sat", "--dataset", "imagefolder", "--data-root", str(root),
                       "--eps-max", "3", "--delta", "0.1", "-o", str(out)] + TINY, capsys)
    assert rc == 0, err
    warning = [line for line in err.splitlines() if "warning: --eps-max 3" in line]
    assert warning and "whole range" in warning[0] and "3 per pixel" in warning[0], err
    assert (out / "checkpoint.pt").is_file()
    rc, _, err = call(["train", "--method", "sat", "--dataset", "imagefolder", "--data-root", str(root),
                       "--eps-max", "0.1", "--delta", "0.05", "--eps", "0.1", "-o", str(tmp_path / "small")] + TINY,
                      capsys)
    assert rc == 0 and "warning" not in err, err


def test_eps_that_float32_cannot_hold_is_refused(tmp_path, capsys):
    rc, _, err = call(["train", "--method", "sat", "--eps-max", "1e30", "-o", str(tmp_path / "o")] + TINY, capsys)
    one_line(rc, err, "--eps-max", "float32")
    rc, _, err = call(["run", "--eps", "0.1", "1e30", "-o", str(tmp_path / "o")] + TINY, capsys)
    one_line(rc, err, "--eps", "float32")
    assert not (tmp_path / "o").exists()
