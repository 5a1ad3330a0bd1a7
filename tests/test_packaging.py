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
                      ("eval", "nnunet_ima_eval"), ("nnunet_ima_demo", "nnunet_ima_demo")):
        for init in (ROOT / top).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / top).parts
            found.add(".".join((name, *rel)))
    assert found == listed, f"missing from setup.cfg: {found - listed}; stale: {listed - found}"
    assert mapping == {"nnunet_ima_eval": "eval"}


def _imports(path: Path) -> set[str]:
    import ast

    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
        elif isinstance(node, ast.ImportFrom) and node.level == 1:  # relative, inside the kernel's folder
            names |= {f"nnunet_ima.{node.module}"} if node.module else {f"nnunet_ima.{a.name}" for a in node.names}
    return names


def test_the_kernel_imports_nothing_from_the_layers_above_it():
    """Layering (ARCHITECTURE.md): the kernel modules (nnunet_ima/*.py) import neither the trainers,
    the evaluation, the classification app nor the demo; test data does not ship in the package."""
    above = ("nnunet_ima_trainers", "nnunet_ima_eval", "nnunet_ima.classify", "nnunet_ima_demo")
    offenders = {}
    for path in sorted((ROOT / "nnunet_ima").glob("*.py")):
        bad = sorted(m for m in _imports(path) if m.startswith(above))
        if bad:
            offenders[path.name] = bad
    assert not offenders, f"kernel modules import upward: {offenders}"
    shipped = "\n".join(p.read_text() for p in (ROOT / "nnunet_ima").rglob("*.py"))
    assert "def synthetic_shapes" not in shipped  # test data lives in tests/data_gen.py
