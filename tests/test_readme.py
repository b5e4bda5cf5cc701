"""The README's Python examples run as written."""

import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_blocks_run():
  blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
  assert blocks, "README.md should show a runnable example"
  for block in blocks:
    exec(compile(block, str(README), "exec"), {})


def test_readme_names_the_commands_ci_runs():
  text = README.read_text()
  ci = (README.parent / ".ci" / "run").read_text()
  test_command = "pip install -e '.[test]' && python -m pytest"
  assert test_command in text and test_command in ci
