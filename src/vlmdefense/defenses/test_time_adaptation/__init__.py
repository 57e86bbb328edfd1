"""Test-time adaptation defenses: prompts tuned per test input on its random views."""
