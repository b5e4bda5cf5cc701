"""The README's Python examples run as written."""

import pathlib
import re

import jax

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_blocks_run():
  blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
  assert blocks, "README.md should show a runnable example"
  for block in blocks:
    namespace = {}
    exec(compile(block, str(README), "exec"), namespace)
    # An example whose result is never read would still run asynchronously on a device and stall the next
    # test's 8-device collectives (XLA:CPU aborts a rendezvous that waits 40 s).
    jax.block_until_ready([v for v in namespace.values() if isinstance(v, (jax.Array, dict, list, tuple))])


def test_readme_names_the_commands_ci_runs():
  text = README.read_text()
  ci = (README.parent / ".ci" / "run").read_text()
  test_command = "pip install -e '.[test]' && python -m pytest -n 2 --dist loadfile"
  assert test_command in text and test_command in ci
