"""Where the bench scripts' --record goes: docs/benchmarks/history.md, newest last.

docs/benchmarks.md holds the current answer to each question, written by hand from these runs.
"""

from pathlib import Path

HISTORY = Path(__file__).resolve().parent.parent / "docs" / "benchmarks" / "history.md"
HEADER = (
    "# Benchmark runs\n\nEvery run recorded by `bench/*.py --record`, newest last, each with its machine, commit "
    "and command. The current answers are in [../benchmarks.md](../benchmarks.md).\n"
)


def record(text: str) -> None:
    """Append one run's markdown to the history."""
    if not HISTORY.exists():
        HISTORY.write_text(HEADER)
    with open(HISTORY, "a") as f:
        f.write("\n" + text.rstrip("\n") + "\n")


def publish(lines: list[str], save: bool) -> None:
    """Print a run's markdown lines; with save (a bench's --record), append them to the history too."""
    text = "\n".join(lines)
    print(text)
    if save:
        record(text)
