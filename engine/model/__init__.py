"""Models: what a decoder layer looks like (structure), loading a model or the embedded default (load),
and writing a pruned one that plain `transformers` loads (export)."""
