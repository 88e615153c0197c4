"""The command lines: flags, messages and exit codes over the library's functions.

Every command module has the same shape: `define_flags()`, `main(argv)` and `run()`,
which defines the flags and hands `main` to absl; flags are defined only by `run()`, so
the modules can be imported side by side (tests, notebooks).
"""
