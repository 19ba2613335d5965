"""Built-in target profiles, importable as edgequant._toolchains."""
