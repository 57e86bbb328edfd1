"""The workbench: models, data, attacks, the evaluation protocol and the harness a notebook calls."""
