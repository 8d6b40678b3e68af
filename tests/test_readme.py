"""The README's section "Your own model, data and pruning rule" runs as written."""

import re

from .conftest import REPO

SECTION = "## Your own model, data and pruning rule"


def extract_python_blocks(markdown: str, heading: str) -> list[str]:
  """The ```python blocks between ``heading`` and the next heading of its level."""
  start = markdown.index(heading + "\n")
  level = heading.split()[0]
  following = re.search(rf"^{level} ", markdown[start + len(heading) :], flags=re.M)
  end = start + len(heading) + following.start() if following else len(markdown)
  return re.findall(r"^```python\n(.*?)^```", markdown[start:end], flags=re.M | re.S)


def test_the_readme_section_on_your_own_model_data_and_pruning_rule_runs(tmp_path, monkeypatch):
  blocks = extract_python_blocks((REPO / "README.md").read_text(), SECTION)
  assert len(blocks) >= 4  # your model, your data (a run and its analysis), your pruning rule
  monkeypatch.chdir(tmp_path)  # the blocks write their workdirs under runs/
  namespace = {"__name__": "readme"}
  for i, block in enumerate(blocks):  # in order, in one namespace, as a reader runs them
    exec(compile(block, f"README.md ({SECTION!r}, python block {i})", "exec"), namespace)
  assert (tmp_path / "runs" / "tabular" / "config.json").exists()
  assert namespace["result"].rounds[-1].round == 1  # the last block's run finished
