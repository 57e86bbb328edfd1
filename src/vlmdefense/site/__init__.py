"""The documentation site generated from the catalog and the results."""
