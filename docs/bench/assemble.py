"""Assemble docs/benchmarks.md from the per-family result pages in docs/bench/.

    python docs/bench/assemble.py
"""

import re
from pathlib import Path

HERE = Path(__file__).parent
ORDER = ["foundation", "quantize", "prune", "compensate", "evopress", "adapters", "merge",
         "attention", "kernels", "inference", "deploy", "training", "scale", "spill"]

HEADER = """# Benchmark results

Every number here was measured by a script in `benchmarks/`, on the machine named in its section.
Unless a section says otherwise the machine is the project's development machine: a shared
2-core x86-64 CPU with 24 GB of memory and no GPU, often heavily loaded by parallel work while
these numbers were taken, so wall-clock times are pessimistic; quality numbers (perplexity,
accuracy, loss) do not depend on load. Sections are kept in `docs/bench/<family>.md` and
assembled with `python docs/bench/assemble.py`.

"""


def main() -> None:
    pages = [HERE / f"{name}.md" for name in ORDER if (HERE / f"{name}.md").exists()]
    pages += sorted(p for p in HERE.glob("*.md") if p not in pages)
    body = "\n\n".join(p.read_text().strip() for p in pages)
    body = re.sub(r"\]\((?!https?:|/|bench/)([^)]+\.png)\)", r"](bench/\1)", body)  # images live here
    (HERE.parent / "benchmarks.md").write_text(HEADER + body + "\n")


if __name__ == "__main__":
    main()
