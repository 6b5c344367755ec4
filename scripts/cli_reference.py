"""Write docs/cli.md, the command-line reference, from the ``attnflow`` command itself.

    python scripts/cli_reference.py            # rewrite docs/cli.md
    python scripts/cli_reference.py --check    # exit 1 when docs/cli.md differs from what the CLI says

It walks the command tree (``attnflow``, its commands, ``plot``'s subcommands) and renders, for each command,
its usage line, its help text and every argument and option with the help record ``--help`` prints (choices,
defaults, bounds and "required" included). tests/test_cli_reference.py fails when the file is stale.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUTPUT = ROOT / "docs" / "cli.md"
COMMAND = "python scripts/cli_reference.py"


def _commands(command, ctx):
    """(click context, command) of the command and every command below it, in the order --help lists them."""
    yield ctx, command
    if hasattr(command, "commands"):
        for name in command.list_commands(ctx):
            sub = command.get_command(ctx, name)
            if sub is None or getattr(sub, "hidden", False):
                continue
            yield from _commands(sub, type(ctx)(sub, info_name=name, parent=ctx))


def _anchor(title: str) -> str:
    """GitHub's anchor of a heading: lower case, spaces to hyphens, punctuation other than - and _ dropped."""
    return re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-")


def _escape(text: str) -> str:
    """Plain text as Markdown: `*`, and `<` before a letter, escaped outside backquoted spans, so that flow_* or
    <label> stay as written."""
    parts = text.split("`")
    parts[::2] = [re.sub(r"(\*|<(?=[A-Za-z/!?]))", r"\\\1", part) for part in parts[::2]]
    return "`".join(parts)


def _help_text(text: str) -> list[str]:
    """A command's help as Markdown: plain paragraphs as they are, click's no-rewrap (\\b) paragraphs as code."""
    out = []
    for paragraph in re.split(r"\n\s*\n", text.strip()):
        if paragraph.startswith("\b"):
            out += ["```text", paragraph.lstrip("\b").strip("\n"), "```", ""]
        else:
            out += [_escape(paragraph.strip()), ""]
    return out


def _param_line(record: tuple[str, str]) -> str:
    names, help_text = record
    help_text = " ".join(help_text.split())
    extra = ""
    match = re.fullmatch(r"(.*?)\s*\[((?:default|required|x|[-\d.]+<=x)[^\[\]]*)\]", help_text)
    if match:  # click's trailing "[default: ...; bounds; required]": shown apart from the help text
        help_text, extra = match.group(1), match.group(2)
    line = f"- `{names}`"
    if help_text:
        line += f": {_escape(help_text)}"
    if extra:
        line += f" *[{_escape(extra)}]*"
    return line


def render() -> str:
    """docs/cli.md's text, from the CLI as it is now."""
    import typer

    from attnflow.cli import app

    root = typer.main.get_command(app)
    root_ctx = root.context_class(root, info_name="attnflow")
    commands = list(_commands(root, root_ctx))
    lines = [
        "# attnflow command-line reference",
        "",
        f"<!-- generated from the attnflow command by `{COMMAND}`; edit the command's help texts, not this file -->",
        "",
        "Every command and option as `attnflow COMMAND --help` prints it. The README explains what each",
        "command does and why; this page lists what each accepts.",
        "",
    ]
    for ctx, _ in commands[1:]:
        lines.append(f"- [{ctx.command_path}](#{_anchor(ctx.command_path)})")
    lines.append("")
    for ctx, command in commands:
        lines += [f"## {ctx.command_path}", ""]
        usage = " ".join([ctx.command_path, *command.collect_usage_pieces(ctx)])
        lines += ["```text", f"Usage: {usage}", "```", ""]
        lines += _help_text(command.help or "")
        arguments, options = [], []
        for param in command.get_params(ctx):
            record = param.get_help_record(ctx)
            if record is None:
                continue
            (arguments if param.param_type_name == "argument" else options).append(_param_line(record))
        for title, items in (("Arguments", arguments), ("Options", options)):
            if items:
                lines += [f"### {title}", "", *items, ""]
        if hasattr(command, "commands"):
            subs = [c for c, _ in commands if c.parent is ctx]
            lines += ["### Commands", "", *(f"- [{c.command_path}](#{_anchor(c.command_path)})" for c in subs), ""]
    return "\n".join(lines).rstrip("\n") + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    text = render()
    if argv == ["--check"]:
        if not OUTPUT.is_file() or OUTPUT.read_text() != text:
            print(f"{OUTPUT.relative_to(ROOT)} is out of date: run {COMMAND}", file=sys.stderr)
            return 1
        return 0
    if argv:
        print(f"usage: {COMMAND} [--check]", file=sys.stderr)
        return 2
    OUTPUT.parent.mkdir(exist_ok=True)
    OUTPUT.write_text(text)
    print(f"wrote {OUTPUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
