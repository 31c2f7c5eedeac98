"""Write nbs/index.ipynb (the README's source for `nbdev_readme`) from README.md, one markdown cell per
section.

Used once to create the notebook; from then on the notebook is edited and README.md regenerated from it
(`nbdev_readme`, which needs Quarto). `tests/test_workbench.py` checks that the two say the same.
"""
import json
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def sections(readme: str) -> list[str]:
    "README text split before each `## ` heading; joined with blank lines they give the text back."
    return [s.strip("\n") for s in re.split(r"\n\n(?=## )", readme.rstrip("\n"))]


def readme_from_index(nb: dict) -> str:
    "The README text that the markdown cells of `nb` make, one blank line between cells."
    markdown = ["".join(c["source"]).strip("\n") for c in nb["cells"] if c["cell_type"] == "markdown"]
    return "\n\n".join(markdown) + "\n"


def main() -> int:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    cells = []
    for k, sec in enumerate(sections(text)):
        src = [l + "\n" for l in sec.split("\n")]
        src[-1] = src[-1].rstrip("\n")
        cells.append({"cell_type": "markdown", "id": f"readme{k:02d}", "metadata": {}, "source": src})
    from set_kernelspec import KERNELSPEC  # the project's kernel, as every notebook names it
    nb = {"cells": cells, "metadata": {"kernelspec": dict(KERNELSPEC)}, "nbformat": 4, "nbformat_minor": 5}
    assert readme_from_index(nb) == text, "the sections do not give the README back"
    (REPO / "nbs" / "index.ipynb").write_text(json.dumps(nb, sort_keys=True, indent=1,
                                                         ensure_ascii=False) + "\n")
    print(f"nbs/index.ipynb: {len(cells)} markdown cells")
    return 0


if __name__ == "__main__":
    sys.exit(main())
