"""Unit tests. A package so that test files may share a basename with tests/stages/ (pytest prepend import mode)."""
