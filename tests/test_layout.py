"""The README's reading order matches the teaching files, and each stays within its line budget."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def reading_order_rows():
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Reading order"):]
    rows = re.findall(r"^\| \d+b? \| `([^`]+)`(, `(\w+)\(\)`)? \| (\d+) \| (\d+|-) \|", section, re.M)
    assert len(rows) >= 6, "the README's reading order table lists the teaching path"
    return [(path, function or None, int(lines), None if budget == "-" else int(budget))
            for path, _, function, lines, budget in rows]


def counted_lines(path: str, function: str = None) -> int:
    source = (ROOT / path).read_text()
    if function is None:
        return len(source.splitlines())
    node = next(n for n in ast.walk(ast.parse(source)) if isinstance(n, ast.FunctionDef) and n.name == function)
    return node.end_lineno - node.lineno + 1


def test_reading_order_line_counts_are_current_and_within_budget():
    for path, function, stated, budget in reading_order_rows():
        actual = counted_lines(path, function)
        assert abs(actual - stated) <= max(5, stated // 20), f"README says {path} {function or ''} has {stated} lines: {actual}"
        if budget is not None:
            assert actual <= budget, f"{path} {function or ''} has {actual} lines, over its budget of {budget}"


def test_the_numbered_journey_agrees_between_readme_and_scripts():
    """Each step's scripts say the step number the README gives them."""
    readme = (ROOT / "README.md").read_text()
    steps = {}
    for number, block in re.findall(r"^# (\d)\. [^\n]*\n((?:(?!^# \d\.)[\s\S])*?)(?=^# \d\.|^```)", readme, re.M):
        for script in re.findall(r"python ((?:scripts|finetune|generate)/\w+\.py)", block):
            steps[script] = number
    assert set(steps.values()) == {"1", "2", "3", "4", "5", "6"}
    for script, number in steps.items():
        first_line = (ROOT / script).read_text().splitlines()[0]
        assert first_line.startswith(f'"""Step {number}'), f"{script} opens with {first_line!r}, not step {number}"


def test_every_entry_script_is_a_numbered_step():
    """scripts/, finetune/ and generate/ hold the journey only: measurements live in benchmarks/."""
    for folder in ("scripts", "finetune", "generate"):
        for script in sorted((ROOT / folder).glob("*.py")):
            assert script.read_text().startswith('"""Step '), f"{script.relative_to(ROOT)} names no step of the journey"
