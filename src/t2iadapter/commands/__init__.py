"""Sub-commands of the `t2iadapter` CLI: one module each, discovered by `t2iadapter.cli`."""
