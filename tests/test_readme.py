"""README's commands cannot rot: CI runs the README's test command verbatim, the install command
installs what the tests need, and the Python example runs."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _bash_blocks(text):
    return re.findall(r"```bash\n(.*?)```", text, flags=re.S)


def test_ci_runs_readme_test_command_verbatim():
    readme = (ROOT / "README.md").read_text()
    blocks = _bash_blocks(readme)
    assert len(blocks) >= 2, "README must open with the install+demo and the test command"
    install, test_cmd = blocks[0].strip(), blocks[1].strip()
    assert "nnunet-ima demo" in install and "pip install" in install
    assert "pytest" in test_cmd
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test_cmd in [line.strip() for line in ci], ".ci/run must run README's test command verbatim"
    # the install command must install pytest too, or the test command fails for a newcomer
    assert '".[test]"' in install


def test_readme_python_example_runs():
    """The kernel example in README (the ```python block after 'Python API') executes as written."""
    readme = (ROOT / "README.md").read_text()
    m = re.search(r"## Python API.*?```python\n(.*?)```", readme, flags=re.S)
    assert m, "README needs a '## Python API' section with a python example"
    namespace = {}
    exec(compile(m.group(1), "README.md", "exec"), namespace)


def _readme_commands(prefix):
    readme = (ROOT / "README.md").read_text()
    cmds = []
    for block in re.findall(r"```(?:bash)?\n(.*?)```", readme, flags=re.S):
        for line in block.splitlines():
            line = line.split("  #")[0].strip()
            if line.startswith(prefix):
                cmds.append(line)
    return cmds


def test_readme_attack_and_classify_commands_parse():
    """Every nnunet-ima-attack / classify command shown in README is accepted by the real parser
    (full runs of both are covered by the end-to-end tests and the README workflow test)."""
    import shlex

    from nnunet_ima.classify.cli import build_parser as classify_parser
    from nnunet_ima_eval.cli import _check_attacks
    from nnunet_ima_eval.cli import build_parser as attack_parser

    torchrun = _readme_commands("torchrun")
    attack = _readme_commands("nnunet-ima-attack") + [  # torchrun ... -m nnunet_ima_eval ARGS: the same arguments
        "nnunet-ima-attack " + c.split("-m nnunet_ima_eval", 1)[1] for c in torchrun if "-m nnunet_ima_eval " in c]
    classify = [c.replace("torchrun --nproc_per_node 2 -m", "python -m") for c in
                _readme_commands("python -m nnunet_ima.classify") + torchrun if "nnunet_ima.classify" in c]
    assert attack and classify
    for cmd in attack:
        args = attack_parser().parse_args(shlex.split(cmd.replace("$DEVICE", "cpu"))[1:])
        _check_attacks(args)  # --suite / --attacks resolved as the command does
        assert args.eps and args.attacks
    for cmd in classify:
        classify_parser().parse_args(shlex.split(cmd)[3:])


def test_readme_settings_table_names_every_trainer_setting():
    """Every NNUNET_IMA_<KEY> the trainers read has a row in README's settings table."""
    from nnunet_ima_trainers.config import KEYS

    readme = (ROOT / "README.md").read_text()
    table = re.search(r"\| key \(`NNUNET_IMA_\.\.\.`\).*?\n\n", readme, flags=re.S).group(0)
    rows = set(re.findall(r"`([A-Z_]+)`", table))
    missing = [k for k in KEYS if k.upper() not in rows]
    assert not missing, f"README settings table lacks {missing}"
