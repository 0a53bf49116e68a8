"""A bash completion script for leasectl and leaseagent, generated from their parsers.

Generated, not written by hand, so it can never drift from the flags: every
command, every flag (the etcd flags after a command too) and every value of
a flag with fixed choices (`-o`, `--log-level`, ...). `install.sh` installs
it as /usr/share/bash-completion/completions/{leasectl,leaseagent}.
"""

from __future__ import annotations

import argparse
import shlex


def _flags(parser: argparse.ArgumentParser) -> list[str]:
    return sorted({opt for action in parser._actions for opt in action.option_strings
                   if action.help != argparse.SUPPRESS or opt.startswith("--etcd")})


def _choices(parser: argparse.ArgumentParser) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for action in parser._actions:
        if action.choices and action.option_strings:
            for opt in action.option_strings:
                out[opt] = [str(c) for c in action.choices]
    return out


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _words(words: list[str]) -> str:
    return shlex.quote(" ".join(words))


def _function(name: str, parser: argparse.ArgumentParser) -> str:
    commands = _subcommands(parser)
    lines = [
        f"_{name}() {{",
        '    local cur="${COMP_WORDS[COMP_CWORD]}" prev="${COMP_WORDS[COMP_CWORD-1]}" cmd="" i',
        "    for ((i = 1; i < COMP_CWORD; i++)); do",
        '        case "${COMP_WORDS[i]}" in',
    ]
    if commands:
        lines.append(f"            {'|'.join(sorted(commands))}) cmd=\"${{COMP_WORDS[i]}}\"; break ;;")
    lines += ["        esac", "    done", '    case "$cmd:$prev" in']
    for command, sub in [("", parser), *sorted(commands.items())]:
        for opt, choices in sorted(_choices(sub).items()):
            lines.append(f'        "{command}:{opt}") COMPREPLY=($(compgen -W {_words(choices)} '
                         '-- "$cur")); return ;;')
        nested = sorted(_subcommands(sub))
        if command and nested:  # `leasectl config <TAB>`: get, set
            lines.append(f'        "{command}:{command}") COMPREPLY=($(compgen -W '
                         f'{_words(nested)} -- "$cur")); return ;;')
    lines += ["    esac", '    case "$cmd" in']
    lines.append(f'        "") COMPREPLY=($(compgen -W {_words(_flags(parser) + sorted(commands))} '
                 '-- "$cur")) ;;')
    for command, sub in sorted(commands.items()):
        lines.append(f'        {command}) COMPREPLY=($(compgen -W {_words(_flags(sub))} '
                     '-- "$cur")) ;;')
    lines += ["    esac", "}", f"complete -o default -F _{name} {name}", ""]
    return "\n".join(lines)


def bash_completion() -> str:
    from leaseagent.cli.leasectl import build_parser
    from leaseagent.config import agent_parser

    return ("# bash completion for leasectl and leaseagent, made by `leasectl completion bash`\n"
            + _function("leasectl", build_parser({}))
            + _function("leaseagent", agent_parser({})))
