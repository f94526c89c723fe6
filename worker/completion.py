"""Shell completion for bash and zsh, written from the parser itself, so it never drifts.

The script is static: a TAB costs the shell a lookup, not a Python start. It completes the
commands, each command's flags, the values of flags that take a fixed set (``--input-format
json``), and file names after flags that take a file. zsh loads the bash script through
``bashcompinit``, as zsh documents for bash completions.
"""

from __future__ import annotations

import argparse
import shlex
from collections.abc import Iterable

_FILE_METAVARS = frozenset({"FILE", "LEDGER"})


def _words(items: Iterable[str]) -> str:
    return shlex.quote(" ".join(items))


def bash(parser: argparse.ArgumentParser, prog: str = "devserver-reaper") -> str:
    """A bash completion script for ``parser``'s commands and flags."""
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    commands: dict[str, argparse.ArgumentParser] = dict(subparsers.choices)
    top = [o for a in parser._actions for o in a.option_strings]
    cases: list[str] = []
    values: list[str] = []
    files: set[str] = set()
    for name, sub in commands.items():
        flags = [o for a in sub._actions for o in a.option_strings]
        cases.append(f"        {name}) opts={_words(flags)} ;;")
        for action in sub._actions:
            if action.choices:
                choices = _words(str(c) for c in action.choices)
                # a flag's value follows the flag; a command's first word (plan show,
                # completion bash) follows the command's name
                for option in action.option_strings or [name]:
                    values.append(f"        {name}:{option}) choices={choices} ;;")
            if action.metavar in _FILE_METAVARS:
                files.update(action.option_strings)
    function = "_" + prog.replace("-", "_")
    return f"""\
# {prog} completion for bash: source <({prog} completion bash)
{function}() {{
    local cur="${{COMP_WORDS[COMP_CWORD]}}" prev="${{COMP_WORDS[COMP_CWORD-1]}}"
    local commands={_words(commands)} command="" opts="" choices="" word
    for word in "${{COMP_WORDS[@]:1:$((COMP_CWORD-1))}}"; do
        case " $commands " in *" $word "*) command="$word"; break ;; esac
    done
    if [[ -z "$command" ]]; then
        COMPREPLY=($(compgen -W "$commands {" ".join(top)}" -- "$cur"))
        return
    fi
    case "$command:$prev" in
{chr(10).join(values)}
    esac
    if [[ -n "$choices" ]]; then
        COMPREPLY=($(compgen -W "$choices" -- "$cur"))
        return
    fi
    case "$prev" in
        {"|".join(sorted(files)) or "--no-file-flag"})
            COMPREPLY=($(compgen -f -- "$cur"))
            return ;;
    esac
    case "$command" in
{chr(10).join(cases)}
    esac
    if [[ "$cur" == -* ]]; then
        COMPREPLY=($(compgen -W "$opts" -- "$cur"))
    else
        COMPREPLY=($(compgen -f -- "$cur"))
    fi
}}
complete -F {function} {prog}
"""


def zsh(parser: argparse.ArgumentParser, prog: str = "devserver-reaper") -> str:
    """The bash script, loaded into zsh through ``bashcompinit``."""
    return (
        f"# {prog} completion for zsh: source <({prog} completion zsh)\n"
        "autoload -U +X compinit && compinit\n"
        "autoload -U +X bashcompinit && bashcompinit\n" + bash(parser, prog)
    )
