"""Fuzz harnesses: property-based (hypothesis) in `make test`, long runs and coverage-guided (atheris) in `make fuzz`.

See docs/fuzzing.md for the targets, the properties each one checks, the profiles and the findings.
"""
