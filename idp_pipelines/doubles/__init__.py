"""Test doubles: stand-ins for external systems, with injected behaviour, that tests AND `make bench` use.

They ship inside the package (not under tests/) because `make bench` and `make up` run them from an
installed checkout without the test tree; no production code path imports this package.
"""
