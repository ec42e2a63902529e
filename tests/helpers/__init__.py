"""Helpers the tests share (not tests themselves): `lora` (random adapters, the shipped shields' concepts),
`sd15_tiny` and `family_tiny` (pipelines with real block layouts at toy width), `reference` (a plain torch
Scrambled-Grid). The tests import them as `helpers.…`: tests/ is on sys.path through tests/conftest.py."""
