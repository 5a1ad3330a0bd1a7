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
