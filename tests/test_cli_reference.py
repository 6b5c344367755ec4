"""docs/cli.md is what the CLI says: regenerated in memory from the command tree and compared with the file."""
from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_script():
    spec = importlib.util.spec_from_file_location("cli_reference", ROOT / "scripts" / "cli_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_docs_cli_md_is_current():
    script = load_script()
    generated = script.render()
    written = (ROOT / "docs" / "cli.md").read_text()
    assert written == generated, f"docs/cli.md is out of date: run `{script.COMMAND}` and commit docs/cli.md"


def test_the_reference_lists_every_command_and_option():
    import typer

    from attnflow.cli import app

    text = load_script().render()
    root = typer.main.get_command(app)
    for name, command in root.commands.items():
        subs = command.commands.items() if hasattr(command, "commands") else [(None, command)]
        for sub, leaf in subs:
            title = " ".join(filter(None, ["attnflow", name, sub]))
            assert f"\n## {title}\n" in text, title
            section = text.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]
            for param in leaf.params:
                shown = param.opts[-1] if param.param_type_name == "option" else param.name
                assert f"`{shown}" in section or f" {shown}" in section, (title, shown)
