"""Every package folder of the project is listed in setup.cfg, so a non-editable install is complete."""
import configparser
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_is_installed():
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    listed = set(cfg["options"]["packages"].split())
    mapping = dict(line.split(" = ") for line in cfg["options"]["package_dir"].strip().splitlines())
    found = set()
    for top, name in (("nnunet_ima", "nnunet_ima"), ("nnunet_ima_trainers", "nnunet_ima_trainers"),
                      ("eval", "nnunet_ima_eval")):
        for init in (ROOT / top).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / top).parts
            found.add(".".join((name, *rel)))
    assert found == listed, f"missing from setup.cfg: {found - listed}; stale: {listed - found}"
    assert mapping == {"nnunet_ima_eval": "eval"}
