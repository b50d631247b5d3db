"""The README's Python example runs as written (on the bundled digits, one epoch, in a temporary folder)."""

import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def python_example() -> str:
    section = README.read_text().split("### Python\n", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_python_example_runs(tmp_path, monkeypatch, capsys):
    code = python_example()
    for old, new in (('load_data("fashion_mnist")', 'load_data("digits")'), ("epochs=5", "epochs=1"),
                     ('out_dir="runs/mine"', f'out_dir="{tmp_path}/mine"')):
        assert old in code, old  # the example still says what this test adapts
        code = code.replace(old, new)
    monkeypatch.chdir(tmp_path)
    exec(compile(code, str(README), "exec"), {})
    out = capsys.readouterr().out
    assert out.startswith("| model | arch | test acc |") and "student distilled" in out and "gap recovered" in out
    assert (tmp_path / "mine" / "metrics.jsonl").exists()


def test_the_scheme_commands_are_valid(capsys):
    """Every `kdistill run ...` of the README's schemes block names a recipe and overrides that check."""
    from kdistill.cli import main

    block = README.read_text().split("**Schemes**", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    commands = [line.split("#")[0].split()[2:] for line in block.splitlines() if line.startswith("kdistill run ")]
    assert len(commands) == 6
    for recipe, *overrides in commands:
        assert main(["check", recipe, *overrides, "--quiet"]) == 0, capsys.readouterr().err
