"""Test helpers: launch helpers, small model/flag sets, reference implementations and data
writers shared by the unit and integration tests (importable as ``helpers.*``)."""
