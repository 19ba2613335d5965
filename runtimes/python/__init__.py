"""Device-side runtime adapter, importable by the exporter as edgequant._runtime."""
