"""The catalog: schema of an entry and of the taxonomy, YAML loading with line numbers, validation,
BibTeX and scaffolding of new entries."""
