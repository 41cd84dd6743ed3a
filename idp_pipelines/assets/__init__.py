"""Thin asset definitions per domain: read resources, call the core, return MaterializeResult + metadata."""
