"""The file format shared by the exporter and every runtime: layout, packing, manifest, op schemas, tokenizer (no torch)."""
