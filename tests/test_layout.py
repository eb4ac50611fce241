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


def test_the_package_shows_the_lesson_on_top_and_the_rooms_as_folders():
    """At most 16 entries in lit_lora/, no folder holding a single module, every module in the README's tables."""
    package = ROOT / "lit_lora"
    entries = [p for p in package.iterdir() if p.name != "__pycache__"]
    assert len(entries) <= 16, sorted(p.name for p in entries)
    readme = (ROOT / "README.md").read_text()
    for folder in (p for p in entries if p.is_dir()):
        assert (folder / "__init__.py").read_text().startswith('"""'), f"{folder.name}/__init__.py says what it holds"
        modules = [p for p in folder.iterdir() if p.suffix == ".py" and p.name != "__init__.py"]
        assert len(modules) >= 2, f"lit_lora/{folder.name}/ holds a single module"
    for module in package.rglob("*"):
        if module.suffix in (".py", ".cpp") and module.name != "__init__.py":
            assert f"`{module.relative_to(ROOT).as_posix()}`" in readme, f"the README's tables miss {module.relative_to(ROOT)}"


def test_old_import_paths_still_work_with_a_warning():
    import importlib
    import sys
    import warnings

    import lit_lora
    from lit_lora.files.checkpoint import load_checkpoint

    assert lit_lora.load_checkpoint is load_checkpoint
    for old, new in lit_lora.MOVED.items():
        sys.modules.pop(f"lit_lora.{old}", None)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            module = importlib.import_module(f"lit_lora.{old}")
        assert module is importlib.import_module(f"lit_lora.{new}")
        assert any(f"lit_lora.{new}" in str(w.message) for w in caught if w.category is DeprecationWarning)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        from lit_lora.speed import CompiledDecoding
    from lit_lora.speed.decoding import CompiledDecoding as moved
    assert CompiledDecoding is moved and caught


def test_every_import_the_guides_show_works():
    import importlib.util
    import warnings

    lines = set()
    for doc in [ROOT / "README.md", *sorted((ROOT / "howto").glob("*.md"))]:
        lines.update(re.findall(r"from (lit_lora[\w.]*) import ([\w, ]+)", doc.read_text()))
    assert len(lines) >= 5
    for module, names in sorted(lines):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # the README shows an old path on purpose
            imported = importlib.import_module(module)
        for name in (n.strip() for n in names.split(",") if n.strip()):
            assert hasattr(imported, name) or importlib.util.find_spec(f"{module}.{name}"), f"from {module} import {name}"
