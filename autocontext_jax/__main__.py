"""`python -m autocontext_jax SUBCOMMAND ...`: the `autocontext` command (cli/commands.py)."""

from autocontext_jax.cli.commands import main

if __name__ == "__main__":
    main()
