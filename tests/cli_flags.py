"""Running an absl CLI's main() in process more than once (launch/train.py in the tests)."""

from __future__ import annotations


def reset_config_flags(flags) -> None:
    """Forget the previous parse: ml_collections defines one `config.*` flag per --config.x
    override it reads from sys.argv, and defining one again from another test module is
    absl's DuplicateFlagError; so those flags are removed and the rest unparsed."""
    for name in [n for n in flags if n.startswith("config.")]:
        delattr(flags, name)
    flags.unparse_flags()
