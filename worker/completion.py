"""Shell completion for bash and zsh, written from the parser itself, so it never drifts.

The script is static: a TAB costs the shell a lookup, not a Python start. It completes the
commands, each command's flags, the values of flags that take a fixed set (``--input-format
json``, ``--log-format console``), and file names where a file is expected: after a flag that
takes a file and in a command's file arguments (``plan show PLAN``, ``report LEDGER...``).
After a flag that takes other text (``--stream``, ``--rate``) it offers nothing rather than
the directory's files, and between flags of a command that takes no argument, its flags.
zsh loads the bash script through ``bashcompinit``, as zsh documents for bash completions.
"""

from __future__ import annotations

import argparse
import shlex
from collections.abc import Iterable

from worker import helptext

_FILE_METAVARS = frozenset({"FILE", "LEDGER", "PLAN"})


def _words(items: Iterable[str]) -> str:
    return shlex.quote(" ".join(items))


def _choices(action: argparse.Action) -> tuple[str, ...]:
    """The fixed values an action takes: argparse's choices, or a setting's (``--log-format``),
    which the settings check rather than the parser."""
    if action.choices:
        return tuple(str(choice) for choice in action.choices)
    return next((helptext.CHOICES[o] for o in action.option_strings if o in helptext.CHOICES), ())


def bash(parser: argparse.ArgumentParser, prog: str = "devserver-reaper") -> str:
    """A bash completion script for ``parser``'s commands and flags."""
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    commands: dict[str, argparse.ArgumentParser] = dict(subparsers.choices)
    top = [o for a in parser._actions for o in a.option_strings]
    top_files = [o for a in parser._actions if a.metavar in _FILE_METAVARS
                 for o in a.option_strings]  # fmt: skip
    cases: list[str] = []
    values: list[str] = []
    files: list[str] = []
    texts: list[str] = []
    for name, sub in commands.items():
        flags = [o for a in sub._actions for o in a.option_strings]
        # what a word that is no flag's value is: a file (plan show PLAN), or nothing at all
        # (run takes no argument): then the command's flags are offered
        takes_files = any(not a.option_strings and a.metavar in _FILE_METAVARS
                          for a in sub._actions)  # fmt: skip
        cases.append(f"        {name}) opts={_words(flags)}; args={int(takes_files)} ;;")
        for action in sub._actions:
            choices = _choices(action)
            if choices:
                # a flag's value follows the flag; a command's first word (plan show,
                # completion bash) follows the command's name
                for option in action.option_strings or [name]:
                    values.append(f"        {name}:{option}) choices={_words(choices)} ;;")
            elif action.option_strings and action.nargs != 0:  # the flag takes a value
                kind = files if action.metavar in _FILE_METAVARS else texts
                kind.extend(f"{name}:{option}" for option in action.option_strings)
    function = "_" + prog.replace("-", "_")
    return f"""\
# {prog} completion for bash: source <({prog} completion bash)
{function}() {{
    local cur="${{COMP_WORDS[COMP_CWORD]}}" prev="${{COMP_WORDS[COMP_CWORD-1]}}"
    local commands={_words(commands)} command="" opts="" choices="" args=0 word
    for word in "${{COMP_WORDS[@]:1:$((COMP_CWORD-1))}}"; do
        case " $commands " in *" $word "*) command="$word"; break ;; esac
    done
    if [[ -z "$command" ]]; then
        case "$prev" in
            {"|".join(top_files) or "--no-file-flag"})
                COMPREPLY=($(compgen -f -- "$cur"))
                return ;;
        esac
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
    case "$command:$prev" in
        {"|".join(files) or "--no-file-flag"})
            COMPREPLY=($(compgen -f -- "$cur"))
            return ;;
        {"|".join(texts) or "--no-text-flag"})
            COMPREPLY=()  # a name, a URL, a number: nothing to offer, and no file
            return ;;
    esac
    case "$command" in
{chr(10).join(cases)}
    esac
    if [[ "$cur" == -* || "$args" == 0 ]]; then
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
